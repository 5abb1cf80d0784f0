"""HQQ: affine integers with a searched range and a half-quadratic zero-point solver, and its path
through the backend (the same op as ``affine``)."""

import pytest
import torch

import qcompile
from qcompile.formats import HQQ, Affine
from qcompile.formats.hqq import optimize_zero, shrink
from qcompile.ops import linear
from qcompile.reference import dequantized_model
from tests.models import MLP


def heavy_tailed(shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    normal = torch.randn(shape, generator=gen)
    return normal * 0.02 / torch.rand(shape, generator=gen).clamp(min=0.05).sqrt()  # a few large weights


def test_shrink_is_the_lp_proximal_operator():
    x = torch.tensor([-2.0, -0.5, 0.0, 0.01, 0.5, 2.0])
    beta, p = 10.0, 0.7
    expected = torch.sign(x) * torch.relu(x.abs() - x.abs().clamp(min=1e-12) ** (p - 1) / beta)
    assert torch.equal(shrink(x, beta, p), expected)
    assert shrink(x, beta, p)[3] == 0  # small errors are all "dense noise": shrunk to zero
    assert shrink(x, beta, p)[5] == pytest.approx(2.0 - 2.0 ** -0.3 / 10)


def test_solver_never_ends_worse_than_it_starts():
    groups = heavy_tailed((512, 64)).reshape(512, 64)
    lo, hi = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    scale = (hi - lo) / 15
    start = torch.round(-lo / scale)

    def l1(zero):
        q = torch.clamp(torch.round(groups / scale + zero), 0, 15)
        return (groups - (q - zero) * scale).abs().mean()

    solved = optimize_zero(groups, scale, start, 15, iters=20)
    assert l1(solved) < l1(start)
    assert not torch.equal(solved, start) and not torch.equal(solved, solved.round())  # float zero points


def test_packed_form_has_float16_zeros_and_the_affine_formula():
    w = heavy_tailed((64, 128))
    packed = qcompile.pack(w, HQQ(bits=4, group_size=64))
    assert packed.qzeros is None and packed.zeros.dtype == torch.float16 and packed.zeros.shape == (2, 64)
    g = packed.g_idx.long()
    from qcompile.formats.int32_words import unpack_int32

    q = unpack_int32(packed.qweight, 4, 0).float()
    expected = ((q - packed.zeros.float()[g]) * packed.scales.float()[g]).t()
    assert torch.equal(packed.dequantize(torch.float32), expected)
    # float16 zero per group instead of a 4-bit one: 12 more bits per group of 64
    assert packed.bits_per_weight == pytest.approx(Affine(bits=4, group_size=64).bits_per_weight((64, 128)) + 12 / 64)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_hqq_beats_round_to_nearest_at_equal_bits(bits):
    w = heavy_tailed((256, 512), seed=bits)
    rtn = qcompile.pack(w, Affine(bits=bits, group_size=64)).dequantize(torch.float32)
    hqq = qcompile.pack(w, HQQ(bits=bits, group_size=64)).dequantize(torch.float32)
    plain = qcompile.pack(w, HQQ(bits=bits, group_size=64, scale_search=False)).dequantize(torch.float32)
    assert (hqq - w).norm() < 0.97 * (rtn - w).norm()
    assert (hqq - w).norm() < (plain - w).norm()


def test_linear_through_the_affine_op():
    packed = qcompile.pack(heavy_tailed((96, 128)), HQQ(bits=3, group_size=32, compute_dtype=torch.bfloat16))
    x = torch.randn(4, 128)
    expected = torch.nn.functional.linear(x.bfloat16(), packed.dequantize(torch.bfloat16)).float()
    torch.testing.assert_close(linear(packed, x, kernels="reference"), expected, rtol=0, atol=0)


@pytest.mark.parametrize(("settings", "message"), [
    ({"sym": True}, r"hqq.sym: true is not allowed"),
    ({"iters": -1}, r"hqq.iters: -1 is not allowed"),
    ({"scale_search": 1}, r"hqq.scale_search: expected bool"),
    ({"bits": 6}, r"hqq.bits: 6 is not allowed"),
    ({"axis": 0}, r"hqq.axis: unknown setting"),
])
def test_bad_settings_name_the_key(settings, message):
    with pytest.raises(ValueError, match=message):
        qcompile.formats.scheme_from_dict({"type": "hqq", **settings}, key="hqq")


@pytest.mark.parametrize("scheme", [{"type": "hqq", "bits": 4, "group_size": 32},
                                    {"type": "affine", "bits": 3, "group_size": 32, "sym": True}],
                         ids=["hqq", "affine"])
@torch.no_grad()
def test_backend_rewrites_to_the_affine_op_and_equals_the_reference(scheme):
    model = MLP().eval()
    config = qcompile.QuantConfig.from_dict({"format": "qcompile", "version": 1, "default": scheme,
                                             "rules": [{"match": "lm_head", "scheme": "skip"}]})
    plans = []
    compiled = torch.compile(model, backend="qcompile",
                             options={"config": config, "inner": "eager", "on_plan": plans.append})
    x = torch.randn(3, 64)
    out = compiled(x)
    rows = {r.module: r for p in plans for r in p.rows}
    assert rows["fc1"].quantized and rows["fc2"].quantized and not rows["lm_head"].quantized
    assert rows["fc1"].scheme.startswith(scheme["type"])
    torch.testing.assert_close(out, dequantized_model(model, config)(x), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, model(x), rtol=1e-3, atol=1e-3)  # quantized, not the float model
