"""float8 (e4m3) weight-only: torch's own conversion for the bytes, the op, the config, the backend."""

import pytest
import torch
from torch.library import opcheck

import qcompile
from qcompile.formats import Float8
from qcompile.ops import binding, linear, op_arguments


def weight(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.05


def test_bytes_are_torchs_e4m3_of_the_row_scaled_weight():
    w = weight((48, 64))
    packed = qcompile.pack(w, Float8())
    scale = w.abs().amax(1) / 448
    assert torch.equal(packed.scale, scale)
    assert torch.equal(packed.weight, (w / scale[:, None]).to(torch.float8_e4m3fn).view(torch.uint8))
    assert (packed.dequantize(torch.float32).abs().amax(1) - w.abs().amax(1)).abs().max() < 1e-6
    # e4m3 has 3 mantissa bits: at most half a unit (2**-4 relative) of rounding
    assert ((packed.dequantize(torch.float32) - w).abs() <= w.abs() * 2**-4 + scale[:, None] * 2**-9).all()


def test_op_passes_opcheck_and_equals_the_dequantized_linear():
    packed = qcompile.pack(weight((32, 64)), Float8())
    x = torch.randn(3, 64, requires_grad=True)
    bias = torch.randn(32, requires_grad=True)
    opcheck(binding(Float8()).op, op_arguments(packed, x, bias, "reference"))
    expected = torch.nn.functional.linear(x, packed.dequantize(torch.float32), bias)
    torch.testing.assert_close(linear(packed, x, bias), expected, rtol=1e-6, atol=1e-6)
    assert packed.bits_per_weight == pytest.approx(8 + 32 / 64)


def test_quanto_float8_config_loads():
    config = qcompile.QuantConfig.from_dict({"quant_method": "quanto", "weights": "float8", "activations": None})
    assert config.default == Float8()


def test_nan_weights_are_refused_by_name():
    w = weight((8, 16))
    w[1, 2] = float("inf")
    with pytest.raises(ValueError, match="layer.weight: weight contains NaN or Inf values"):
        qcompile.pack(w, Float8(), name="layer.weight")
