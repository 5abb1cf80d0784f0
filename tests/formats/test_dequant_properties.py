"""Property tests (hypothesis): dequantization error bounds per format.

4-bit: every element is within ``absmax_of_its_block * half the widest gap of the sorted
code`` of its dequantized value; with double quant the block scale itself is approximate,
so the bound uses the dequantized absmax plus its own error. int8: half a step per row.
"""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qcompile
from qcompile.formats import FP4, NF4, Int8, Int8WeightOnly
from qcompile.formats.blockwise import dequantize_absmax, dequantize_error_bound

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def weights(draw, max_rows=24, max_cols=160):
    rows = draw(st.integers(1, max_rows))
    cols = draw(st.integers(1, max_cols))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([1e-6, 1e-2, 1.0, 300.0]))
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen) * scale
    if draw(st.booleans()):
        w[:, : cols // 2] = 0  # zero blocks
    if draw(st.booleans()):
        w = w.sign() * w.abs().pow(3)  # heavy tails
    limit = 60000.0 if dtype == torch.float16 else 1e30  # stay finite in the target dtype
    return w.clamp(-limit, limit).to(dtype)


def _block_absmax(w: torch.Tensor, blocksize: int) -> torch.Tensor:
    flat = w.float().reshape(-1)
    pad = (-flat.numel()) % blocksize
    return torch.nn.functional.pad(flat.abs(), (0, pad)).view(-1, blocksize).amax(dim=1)


@SETTINGS
@given(w=weights(), kind=st.sampled_from(["nf4", "fp4"]), blocksize=st.sampled_from([32, 64, 128]))
def test_fourbit_error_bound(w, kind, blocksize):
    scheme = (NF4 if kind == "nf4" else FP4)(blocksize=blocksize)
    packed = qcompile.pack(w, scheme)
    absmax = _block_absmax(w, blocksize)
    assert torch.equal(packed.absmax[: absmax.numel()].clamp(min=1e-38), absmax.clamp(min=1e-38))
    err = (packed.dequantize(torch.float32) - w.float()).abs().reshape(-1)
    per_element = absmax.repeat_interleave(blocksize)[: err.numel()]
    bound = per_element * dequantize_error_bound(kind) * (1 + 1e-6) + 1e-37
    assert (err <= bound).all()
    # Zero elements in zero blocks stay exactly zero.
    zero_blocks = (absmax == 0).repeat_interleave(blocksize)[: err.numel()]
    assert (packed.dequantize(torch.float32).reshape(-1)[zero_blocks] == 0).all()


@SETTINGS
@given(w=weights(max_rows=64, max_cols=256), kind=st.sampled_from(["nf4", "fp4"]))
def test_fourbit_double_quant_error_bound(w, kind):
    scheme = (NF4 if kind == "nf4" else FP4)(blocksize=32, double_quant=True)
    packed = qcompile.pack(w, scheme)
    true_absmax = _block_absmax(w, 32)
    approx = dequantize_absmax(packed.absmax, packed.nested_absmax, packed.nested_code, packed.nested_offset)
    # The 8-bit dynamic code has steps of at most ~1/64 of the nested block's range near 1.
    nested = packed.nested_absmax.repeat_interleave(256)[: approx.numel()]
    assert ((approx - true_absmax).abs() <= nested * (1 / 64) + 1e-6 * true_absmax.abs().max() + 1e-30).all()
    err = (packed.dequantize(torch.float32) - w.float()).abs().reshape(-1)
    scale = approx.abs().repeat_interleave(32)[: err.numel()]
    absmax_err = (approx - true_absmax).abs().repeat_interleave(32)[: err.numel()]
    bound = scale * dequantize_error_bound(kind) + absmax_err + 1e-6 * scale + 1e-30
    assert (err <= bound).all()


@SETTINGS
@given(w=weights(), scheme=st.sampled_from([Int8(), Int8WeightOnly()]))
def test_int8_error_bound(w, scheme):
    if scheme.kind == "int8" and w.float().abs().max() > 65504:
        return  # LLM.int8() refuses weights beyond float16; tested elsewhere
    packed = qcompile.pack(w, scheme)
    source = w.to(torch.float16).float() if scheme.kind == "int8" else w.float()
    step = source.abs().amax(dim=1, keepdim=True) / 127
    err = (packed.dequantize(torch.float32) - source).abs()
    assert (err <= step * (0.5 + 1e-5) + 1e-30).all()


def test_error_bound_constants():
    # Half the widest gap: NF4's is between -1 and -0.696, FP4's between 0.667 and 1.
    assert math.isclose(dequantize_error_bound("nf4"), (1 - 0.6961928009986877) / 2, rel_tol=1e-6)
    assert math.isclose(dequantize_error_bound("fp4"), (1 - 8 / 12) / 2, rel_tol=1e-6)
    with pytest.raises(ValueError, match="quant_type"):
        dequantize_error_bound("int4")
