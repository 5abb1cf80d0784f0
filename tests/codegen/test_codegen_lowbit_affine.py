"""The low-bit family's affine decode (GPTQ layout: 2/3/4/8 bits, packed or float16 zeros, act-order g_idx,
AWQ's input scale) in GEMV, split-K and GEMM, against the torch reference (interpreter on CPU)."""

import zlib

import codegen_refs as ref
import pytest
import torch
from codegen_refs import requires_interpreter

import qcompile
from qcompile.formats import AWQ, GPTQ, HQQ, Affine
from qcompile.formats.observations import Observations
from qcompile.ops import linear, op_arguments

N, K = 64, 96  # K is not a multiple of the 32-wide tiles' steps for BLOCK_K=64: masked tails


def _packed(scheme, seed, n=N, k=K):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * 0.05
    if scheme.calibration == "hessian":
        x = torch.randn(256, k, generator=gen)
        return scheme.pack_calibrated(w, Observations("hessian", rows=256, hessian=x.t() @ x))
    if scheme.calibration == "activations":
        obs = Observations("activations")
        obs.add(torch.randn(256, k, generator=gen) * (1 + 10 * (torch.arange(k) % 17 == 0)))
        return scheme.pack_calibrated(w, obs)
    return qcompile.pack(w, scheme)


def _run(packed, x, bias, variant, config=None):
    from qcompile.codegen.lowbit import linear_affine

    args = op_arguments(packed, x, bias, "triton")[:-1]
    return linear_affine(*args, variant=variant, config=config)


SCHEMES = {
    "int2-g32": Affine(bits=2, group_size=32),
    "int3-g32-sym": Affine(bits=3, group_size=32, sym=True),
    "int4-per-channel": Affine(bits=4, group_size=-1),
    "int8-g32": Affine(bits=8, group_size=32),
    "hqq-int4-float-zeros": HQQ(bits=4, group_size=32),
    "gptq-int4-act-order": GPTQ(bits=4, group_size=32, desc_act=True, sym=False),
    "gptq-int3-act-order": GPTQ(bits=3, group_size=32, desc_act=True),
    "awq-int4-input-scale": AWQ(bits=4, group_size=32),
}


@requires_interpreter
@pytest.mark.parametrize("variant", ["gemv", "gemm_split_k", "gemm"])
@pytest.mark.parametrize("name", list(SCHEMES))
@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_every_decode_in_every_variant_matches_the_reference(name, variant, compute_dtype):
    scheme = SCHEMES[name]
    import dataclasses

    scheme = dataclasses.replace(scheme, compute_dtype=compute_dtype)
    packed = _packed(scheme, zlib.crc32(name.encode()))
    m = {"gemv": 3, "gemm_split_k": 17, "gemm": 65}[variant]
    x = torch.randn(m, K, dtype=compute_dtype)
    bias = torch.randn(N, dtype=compute_dtype) if variant != "gemm" else None
    y = _run(packed, x, bias, variant)
    expected = linear(packed, x, bias, kernels="reference")
    assert y.dtype == x.dtype and y.shape == (m, N)
    torch.testing.assert_close(y, expected, **ref.tolerance(compute_dtype))


@requires_interpreter
@pytest.mark.parametrize("split_k", [1, 2, 3])
def test_gemv_split_k_and_odd_shapes(split_k):
    packed = _packed(Affine(bits=3, group_size=32), 7, n=32, k=160)
    x = torch.randn(2, 160)
    bias = torch.randn(32)
    config = dict(BLOCK_N=16, BLOCK_K=32, SPLIT_K=split_k, num_warps=4)
    y = _run(packed, x, bias, "gemv", config)
    torch.testing.assert_close(y, linear(packed, x, bias, kernels="reference"), **ref.tolerance(torch.float32))


@requires_interpreter
def test_the_op_runs_the_kernel_with_kernels_triton_and_m_zero():
    packed = _packed(Affine(bits=4, group_size=32), 3)
    x = torch.randn(2, 5, K)
    torch.testing.assert_close(linear(packed, x, kernels="triton"), linear(packed, x, kernels="reference"),
                               **ref.tolerance(torch.float32))
    assert linear(packed, torch.randn(0, K), kernels="triton").shape == (0, N)


@requires_interpreter
def test_bad_arguments_are_named():
    from qcompile.codegen.lowbit import linear_affine

    packed = _packed(Affine(bits=4, group_size=32), 3)
    args = list(op_arguments(packed, torch.randn(1, K), None, "triton")[:-1])
    with pytest.raises(ValueError, match="bits 5 is not allowed"):
        linear_affine(*args[:8], 5, *args[9:])
    with pytest.raises(ValueError, match="linear_affine: variant 'gemmm' is not allowed"):
        linear_affine(*args, variant="gemmm")
    args[2], args[3] = None, None  # neither qzeros nor zeros
    with pytest.raises(ValueError, match="exactly one of qzeros"):
        linear_affine(*args)
