"""GPTQ's solver: second-order error compensation, act-order, static groups, dead columns, the layout."""

import pytest
import torch

import qcompile
from qcompile.formats import GPTQ, Affine
from qcompile.formats.gptq import solve
from qcompile.formats.int32_words import unpack_int32
from qcompile.formats.observations import Observations


def correlated_inputs(tokens=2048, features=256, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mix = torch.eye(features) + 0.3 * torch.randn(features, features, generator=gen) / features**0.5
    x = torch.randn(tokens, features, generator=gen) @ mix
    x[:, :6] *= 8  # a few large input channels, as in real activations
    return x


def hessian_of(x):
    return Observations("hessian", rows=x.shape[0], hessian=x.t() @ x)


def weight(shape, seed=1):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.02


def output_error(packed, w, x):
    ref = x @ w.t()
    return float((x @ packed.dequantize(torch.float32).t() - ref).norm() / ref.norm())


@pytest.mark.parametrize("settings", [{}, {"desc_act": True}, {"group_size": 64, "sym": False},
                                      {"bits": 3, "group_size": 64, "desc_act": True}, {"group_size": -1},
                                      {"desc_act": True, "static_groups": True}],
                         ids=["default", "act-order", "g64-asym", "int3-act-order", "per-channel", "static"])
def test_gptq_beats_round_to_nearest_on_the_layer_output(settings):
    x, w = correlated_inputs(), weight((128, 256))
    scheme = GPTQ(**settings)
    gptq = scheme.pack_calibrated(w, hessian_of(x))
    rtn = qcompile.pack(w, Affine(bits=scheme.bits, group_size=scheme.group_size, sym=scheme.sym))
    assert output_error(gptq, w, x) < 0.93 * output_error(rtn, w, x)


def test_act_order_groups_follow_the_solving_order_and_static_groups_the_original_one():
    x, w = correlated_inputs(), weight((64, 256))
    hessian = x.t() @ x
    _, scale, _, g_idx = solve(w, hessian, GPTQ(group_size=64, desc_act=True))
    assert scale.shape == (64, 4) and torch.equal(torch.bincount(g_idx), torch.full((4,), 64))
    perm = torch.argsort(torch.diagonal(hessian), descending=True)
    assert torch.equal(g_idx[perm], torch.arange(256) // 64)  # the i-th solved column is in group i // 64
    _, _, _, static = solve(w, hessian, GPTQ(group_size=64, desc_act=True, static_groups=True))
    assert torch.equal(static, torch.arange(256) // 64)


def test_layout_holds_the_solved_integers():
    x, w = correlated_inputs(), weight((64, 256))
    scheme = GPTQ(group_size=64, desc_act=True, sym=False)
    q, scale, zero, g_idx = solve(w, x.t() @ x, scheme)
    packed = scheme.pack_calibrated(w, hessian_of(x))
    assert torch.equal(unpack_int32(packed.qweight, 4, 0).t(), q.int())
    assert torch.equal(unpack_int32(packed.qzeros, 4, 1) + 1, zero.t().int())
    assert torch.equal(packed.g_idx, g_idx.int()) and torch.equal(packed.scales, scale.t().half())
    expected = (q.float() - zero[:, g_idx]) * scale[:, g_idx]
    assert torch.equal(packed.dequantize(torch.float32), expected)


def test_dead_input_columns_get_zero_weight_and_no_nan():
    x, w = correlated_inputs(), weight((64, 256))
    x[:, 10] = 0  # an input feature the calibration data never sets
    packed = GPTQ(sym=False).pack_calibrated(w, hessian_of(x))
    dequantized = packed.dequantize(torch.float32)
    assert torch.isfinite(dequantized).all()
    assert dequantized[:, 10].abs().max() <= packed.scales.float().max()  # quantized zero: within one step


def test_singular_hessian_gets_more_damping_and_never_nan():
    x = correlated_inputs(tokens=8)  # rank 8 of 256: singular without damping
    packed = GPTQ(damp_percent=0.001).pack_calibrated(weight((64, 256)), hessian_of(x))
    assert torch.isfinite(packed.dequantize(torch.float32)).all()


def test_pack_without_calibration_says_to_calibrate():
    with pytest.raises(ValueError, match=r"layer.weight: gptq needs calibration data .*qcompile.calibrate"):
        qcompile.pack(weight((64, 256)), GPTQ(), name="layer.weight")


@pytest.mark.parametrize(("settings", "message"), [
    ({"damp_percent": 0}, r"gptq.damp_percent: 0.0 is not allowed"),
    ({"desc_act": "true"}, r"gptq.desc_act: expected bool"),
    ({"static_groups": 1}, r"gptq.static_groups: expected bool"),
    ({"bits": 1}, r"gptq.bits: 1 is not allowed"),
])
def test_bad_settings_name_the_key(settings, message):
    with pytest.raises(ValueError, match=message):
        qcompile.formats.scheme_from_dict({"type": "gptq", **settings})
