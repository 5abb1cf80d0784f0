"""Affine group-wise integer weights in the GPTQ checkpoint layout.

The layout is checked against an unpacker written from the format's description with Python
integers (a run of int32 words read as one little-endian bit string), independent of
``qcompile.formats.int32_words``; numerics against the affine formula and its error bound.
"""

import pytest
import torch
from torch.library import opcheck

import qcompile
from qcompile.formats import Affine, PackedAffine
from qcompile.formats.affine import round_to_nearest_params
from qcompile.ops import binding, linear, op_arguments
from qcompile.ops.linear_affine import linear_affine_reference

BITS = (2, 3, 4, 8)


def weight(shape, seed=0, scale=0.05, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * scale).to(dtype)


def gptq_unpack(words: torch.Tensor, bits: int, axis: int) -> torch.Tensor:
    """GPTQ's int32 packing read back: along ``axis``, each run of words (one word, three for 3 bits) is
    one little-endian bit string whose values sit back to back from bit 0, ``bits`` wide each."""
    per_run, per_words = (32, 3) if bits == 3 else (32 // bits, 1)
    w = words.t() if axis == 1 else words
    rows, cols = w.shape
    out = torch.empty(rows // per_words * per_run, cols, dtype=torch.int64)
    for c in range(cols):
        for run in range(rows // per_words):
            bitstring = 0
            for j in range(per_words):
                bitstring |= (int(w[run * per_words + j, c]) & 0xFFFFFFFF) << (32 * j)
            for i in range(per_run):
                out[run * per_run + i, c] = (bitstring >> (bits * i)) & ((1 << bits) - 1)
    return out.t() if axis == 1 else out


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("sym", [False, True])
def test_gptq_layout_holds_the_integers_and_zero_minus_one(bits, sym):
    w = weight((64, 128), seed=bits)
    scheme = Affine(bits=bits, group_size=32, sym=sym)
    packed = qcompile.pack(w, scheme)
    per_run, words = (32, 3) if bits == 3 else (32 // bits, 1)
    assert packed.qweight.dtype == torch.int32 and packed.qweight.shape == (128 * words // per_run, 64)
    assert packed.qzeros.dtype == torch.int32 and packed.qzeros.shape == (4, 64 * words // per_run)
    assert packed.scales.dtype == torch.float16 and packed.scales.shape == (4, 64)
    assert torch.equal(packed.g_idx, torch.arange(128, dtype=torch.int32) // 32)
    q = gptq_unpack(packed.qweight, bits, axis=0)  # [K, N]
    zero = gptq_unpack(packed.qzeros, bits, axis=1) + 1  # v1 stores zero - 1
    if sym:
        assert (zero == 2 ** (bits - 1)).all()
    # The formula, from the unpacked integers: W[n, k] = (q[k, n] - zero[g, n]) * scale[g, n].
    g = packed.g_idx.long()
    expected = ((q.float() - zero.float()[g]) * packed.scales.float()[g]).t()
    assert torch.equal(packed.dequantize(torch.float32), expected)


@pytest.mark.parametrize("bits", BITS)
def test_gptq_tensors_load_back_bit_exact(bits):
    w = weight((96, 256), seed=7)
    packed = qcompile.pack(w, Affine(bits=bits, group_size=64))
    loaded = PackedAffine.from_gptq(packed.scheme, packed.qweight.clone(), packed.qzeros.clone(),
                                    packed.scales.clone(), packed.g_idx.clone())
    for name, tensor in packed.tensors().items():
        assert (tensor is None) == (loaded.tensors()[name] is None)
        if tensor is not None:
            assert torch.equal(tensor, loaded.tensors()[name]), name
    assert torch.equal(loaded.dequantize(torch.float32), packed.dequantize(torch.float32))


def test_gptq_tensors_with_wrong_shapes_are_refused_by_name():
    packed = qcompile.pack(weight((64, 128)), Affine(bits=4, group_size=32))
    with pytest.raises(ValueError, match="scales: shape"):
        PackedAffine.from_gptq(Affine(bits=4, group_size=64), packed.qweight, packed.qzeros, packed.scales)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", [32, 128, -1])
@pytest.mark.parametrize("sym", [False, True])
def test_error_is_at_most_one_step_and_half_a_step_inside_the_range(bits, group_size, sym):
    w = weight((64, 256), seed=bits + group_size)
    scheme = Affine(bits=bits, group_size=group_size, sym=sym)
    packed = qcompile.pack(w, scheme)
    step = packed.scales.float()[packed.g_idx.long()].t()  # [N, K]
    err = (packed.dequantize(torch.float32) - w).abs()
    # Rounding to the nearest level costs at most half a step; the clamped ends (the zero point is an
    # integer, so the grid is shifted by up to half a step) at most one step.
    assert (err <= step * 1.001).all()
    assert (err <= step * 0.501).float().mean() > 0.95


def test_all_non_negative_group_keeps_its_zero_point_in_range():
    """GPTQ's layout stores zero - 1: a zero of 0 would wrap to 2**bits; such a group gets zero 1."""
    w = weight((32, 64)).abs()
    packed = qcompile.pack(w, Affine(bits=4, group_size=32))
    zero = gptq_unpack(packed.qzeros, 4, axis=1) + 1
    assert (zero == 1).all()
    assert (packed.dequantize(torch.float32) - w).abs().max() <= packed.scales.float().max() * 0.501


def test_round_to_nearest_params_refuse_nan():
    w = weight((8, 64))
    w[3, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        round_to_nearest_params(w, Affine(group_size=32), "layer.weight")


@pytest.mark.parametrize("bits", BITS)
def test_row_and_column_bands_equal_slices_of_the_whole_weight(bits):
    packed = qcompile.pack(weight((96, 128), seed=3), Affine(bits=bits, group_size=32))
    whole = packed.dequantize(torch.bfloat16)
    assert torch.equal(packed.dequantize_rows(5, 70, torch.bfloat16), whole[5:70])
    step = packed.column_band_step()
    assert torch.equal(packed.dequantize_cols(step, 128, torch.bfloat16), whole[:, step:])
    with pytest.raises(ValueError, match="multiples"):
        packed.dequantize_cols(1, 128)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_linear_equals_f_linear_on_the_dequantized_weight(bits, compute_dtype):
    packed = qcompile.pack(weight((320, 128), seed=5), Affine(bits=bits, group_size=64, compute_dtype=compute_dtype))
    x = torch.randn(2, 3, 128)
    bias = torch.randn(320)
    expected = torch.nn.functional.linear(x.to(compute_dtype), packed.dequantize(compute_dtype),
                                          bias.to(compute_dtype)).float()
    out = linear(packed, x, bias, kernels="reference")  # "auto" on CPU: the C++ kernel (tests/codegen)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 320)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # In bands of output features (128, 128, 64), as a large weight is decoded: the same result.
    banded = linear_affine_reference(*op_arguments(packed, x, bias, "reference")[:-1], chunk_weights=1)
    torch.testing.assert_close(banded, out, rtol=0, atol=0)


def test_op_passes_opcheck_and_gradients_reach_x_and_bias():
    scheme = Affine(bits=4, group_size=32)
    packed = qcompile.pack(weight((48, 128)), scheme)
    x = torch.randn(5, 128, requires_grad=True)
    bias = torch.randn(48, requires_grad=True)
    opcheck(binding(scheme).op, op_arguments(packed, x, bias, "reference"))
    linear(packed, x, bias).sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(5, 48) @ packed.dequantize(torch.float32))
    assert torch.equal(bias.grad, torch.full((48,), 5.0))


def test_triton_on_cpu_without_the_interpreter_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    packed = qcompile.pack(weight((32, 64)), Affine(group_size=32))
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        linear(packed, torch.randn(1, 64), kernels="triton")


@pytest.mark.parametrize(("settings", "message"), [
    ({"bits": 5}, r"affine.bits: 5 is not allowed; allowed: 2, 3, 4, 8"),
    ({"group_size": 48}, r"affine.group_size: 48 is not allowed"),
    ({"sym": "yes"}, r"affine.sym: expected bool"),
    ({"compute_dtype": "int8"}, r"compute_dtype: dtype int8 is not supported here"),
])
def test_bad_settings_name_the_key(settings, message):
    with pytest.raises(ValueError, match=message):
        qcompile.formats.scheme_from_dict({"type": "affine", **settings})


@pytest.mark.parametrize(("shape", "scheme", "message"), [
    ((64, 100), Affine(group_size=32), "in_features 100 is not a multiple of group_size 32"),
    ((64, 80), Affine(bits=3, group_size=-1), "in_features 80 is not a multiple of 32"),
    ((20, 64), Affine(bits=4, group_size=32), "out_features 20 is not a multiple of 8"),
])
def test_shapes_the_layout_cannot_hold_are_refused(shape, scheme, message):
    with pytest.raises(ValueError, match=message):
        qcompile.pack(weight(shape), scheme)


def test_config_round_trip_and_bits_per_weight():
    scheme = qcompile.formats.scheme_from_dict({"type": "affine", "bits": 3, "group_size": 64, "sym": True})
    assert scheme == Affine(bits=3, group_size=64, sym=True)
    assert qcompile.formats.scheme_from_dict(scheme.to_dict()) == scheme
    packed = qcompile.pack(weight((128, 256)), scheme)
    assert packed.bits_per_weight == pytest.approx(scheme.bits_per_weight((128, 256)))
    # 3 bits + (fp16 scale + 3-bit zero) per 64 weights + an int32 g_idx entry per 128 weights
    assert scheme.bits_per_weight((128, 256)) == pytest.approx(3 + 19 / 64 + 32 / 128)
