"""AWQ: the activation-aware scale and clip searches, the input scale in the op, and AutoAWQ's GEMM layout."""

import pytest
import torch

import qcompile
from qcompile.formats import AWQ, Affine, PackedAffine
from qcompile.formats.awq import search_scale
from qcompile.formats.observations import Observations
from qcompile.ops import linear

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ: nibble i of a word holds column AWQ_ORDER[i]


def awq_pack(values: torch.Tensor) -> torch.Tensor:
    """AutoAWQ's GEMM packing of 4-bit values [rows, cols] along cols, written with Python integers."""
    rows, cols = values.shape
    out = torch.empty(rows, cols // 8, dtype=torch.int32)
    for r in range(rows):
        for c in range(cols // 8):
            word = 0
            for i in range(8):
                word |= int(values[r, 8 * c + AWQ_ORDER[i]]) << (4 * i)
            out[r, c] = word - (1 << 32) if word >= 1 << 31 else word
    return out


def activations(tokens=1024, features=256, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, features, generator=gen)
    x[:, torch.randperm(features, generator=gen)[:8]] *= 20  # salient input channels
    return x


def observed(x):
    obs = Observations("activations")
    obs.add(x[: len(x) // 2])
    obs.add(x[len(x) // 2 :])
    return obs


def weight(shape, seed=1):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.02


def test_observations_keep_the_mean_magnitude_and_a_sample():
    x = activations()
    obs = observed(x)
    torch.testing.assert_close(obs.abs_mean, x.abs().mean(0))
    assert torch.equal(obs.sample_rows, x)


def test_awq_beats_round_to_nearest_on_the_layer_output_and_stores_the_input_scale():
    x, w = activations(), weight((128, 256))
    packed = AWQ(group_size=64).pack_calibrated(w, observed(x))
    rtn = qcompile.pack(w, Affine(bits=4, group_size=64))
    ref = x @ w.t()

    def error(p):
        return float((linear(p, x) - ref).norm() / ref.norm())

    assert packed.input_scale is not None and packed.input_scale.shape == (256,)
    assert error(packed) < 0.8 * error(rtn)
    # The op computes with the stored pieces: (x / s) against the quantized W s.
    torch.testing.assert_close(linear(packed, x), x @ packed.dequantize(torch.float32).t(), rtol=1e-5, atol=1e-5)


def test_scale_search_tries_ratio_zero_first_and_keeps_the_best():
    x, w = activations(), weight((64, 256))
    s = search_scale(w, x.abs().mean(0), x, AWQ(group_size=64))
    assert s.shape == (256,) and torch.isfinite(s).all() and (s > 0).all()
    assert not torch.allclose(s, torch.ones_like(s))  # salient channels got scaled up
    salient = x.abs().mean(0) > 5
    assert s[salient].mean() > s[~salient].mean()


def test_autoawq_gemm_checkpoint_tensors_load_and_decode():
    gen = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (128, 64), generator=gen)  # [K, N]
    zeros = torch.randint(0, 16, (2, 64), generator=gen)  # zero 0 included: AWQ stores zeros as they are
    zeros[0, 0] = 0
    scales = (torch.rand(2, 64, generator=gen) * 0.01).half()
    packed = PackedAffine.from_awq(AWQ(group_size=64), awq_pack(q), awq_pack(zeros), scales)
    g = torch.arange(128) // 64
    expected = ((q.float() - zeros.float()[g]) * scales.float()[g]).t()
    assert torch.equal(packed.dequantize(torch.float32), expected)
    x = torch.randn(3, 128)
    torch.testing.assert_close(linear(packed, x), x @ expected.t(), rtol=1e-5, atol=1e-5)


def test_awq_layout_shape_errors_name_the_tensor():
    q = awq_pack(torch.zeros(128, 64, dtype=torch.int64))
    with pytest.raises(ValueError, match="scales: shape"):
        PackedAffine.from_awq(AWQ(group_size=64), q, awq_pack(torch.zeros(2, 64, dtype=torch.int64)),
                              torch.ones(4, 64).half())
    with pytest.raises(ValueError, match="4-bit"):
        PackedAffine.from_awq(AWQ(bits=3, group_size=64), q, q, torch.ones(2, 64).half())


def test_pack_without_calibration_and_bad_settings_say_what_to_do():
    with pytest.raises(ValueError, match=r"fc.weight: awq needs calibration data"):
        qcompile.pack(weight((64, 256)), AWQ(), name="fc.weight")
    with pytest.raises(ValueError, match="awq.sym: true is not allowed"):
        AWQ(sym=True)


@torch.no_grad()
def test_calibrate_with_awq_through_the_backend():
    from qcompile.reference import dequantized_model
    from tests.models import MLP

    torch.manual_seed(0)
    model = MLP().eval()
    x = activations(64, 64, seed=3)
    config = {"format": "qcompile", "version": 1, "default": {"type": "awq", "group_size": 32},
              "rules": [{"match": "lm_head", "scheme": "skip"}]}
    reference = model(x)
    rtn = dequantized_model(model, qcompile.QuantConfig.from_dict(
        {**config, "default": {"type": "affine", "bits": 4, "group_size": 32}}))(x)
    result = qcompile.calibrate(model, [x[:32], x[32:]], config, progress=False)
    plans = []
    compiled = torch.compile(model, backend="qcompile",
                             options={"config": result, "inner": "eager", "on_plan": plans.append})
    out = compiled(x)
    assert [r.module for p in plans for r in p.rows if r.quantized] == ["fc1", "fc2"]
    assert (out - reference).norm() < 0.9 * (rtn - reference).norm()


class NormThenLinears(torch.nn.Module):
    """A layer norm read only by two linears (foldable), and one also read by a residual (not foldable)."""

    def __init__(self):
        super().__init__()
        self.norm_a = torch.nn.LayerNorm(64)
        self.a1 = torch.nn.Linear(64, 64)
        self.a2 = torch.nn.Linear(64, 64)
        self.norm_b = torch.nn.LayerNorm(64)
        self.b = torch.nn.Linear(64, 64)

    def forward(self, x):
        n = self.norm_a(x)
        h = self.a1(n) * torch.sigmoid(self.a2(n))
        m = self.norm_b(h)
        return self.b(m) + m


@torch.no_grad()
def test_awq_scale_is_folded_into_a_norm_only_linears_read():
    import copy

    from qcompile.pack_cache import cached_packed_weights

    torch.manual_seed(0)
    model = NormThenLinears().eval()
    with torch.no_grad():
        for norm in (model.norm_a, model.norm_b):
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.1, 0.1)
    original = copy.deepcopy(model)
    x = activations(128, 64, seed=4)
    config = {"format": "qcompile", "version": 1, "default": {"type": "awq", "group_size": 32}}
    result = qcompile.calibrate(model, [x[:64], x[64:]], config, progress=False)
    forms = {name: cached_packed_weights(getattr(model, name).weight)[0] for name in ("a1", "a2", "b")}
    assert forms["a1"].input_scale is None and forms["a2"].input_scale is None  # folded into norm_a
    assert forms["b"].input_scale is not None  # norm_b's output also feeds the residual
    assert not torch.equal(model.norm_a.weight, original.norm_a.weight)
    assert not torch.equal(model.norm_a.bias, original.norm_a.bias)
    assert torch.equal(model.norm_b.weight, original.norm_b.weight)
    # The compiled model equals the float model with the folded norm and the packed weights, decoded.
    reference = copy.deepcopy(original)
    reference.norm_a.load_state_dict(model.norm_a.state_dict())
    for name, form in forms.items():
        getattr(reference, name).weight.copy_(form.dequantize(torch.float32))
    out = torch.compile(model, backend="qcompile", options={"config": result, "inner": "eager"})(x)
    torch.testing.assert_close(out, reference(x), rtol=1e-5, atol=1e-5)
    assert (out - original(x)).norm() < 0.1 * original(x).norm()
