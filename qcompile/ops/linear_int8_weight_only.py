"""``qcompile::linear_int8_weight_only``: per-channel int8 weight, float activations."""


import torch
import torch.nn.functional as F

from qcompile.formats.int8_weight_only import Int8WeightOnly
from qcompile.ops.per_channel_int8 import define_per_channel_int8_op, dequantize_per_channel


def linear_int8_weight_only_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """``F.linear(x, weight * scale, bias)`` with the weight dequantized to x.dtype."""
    w = dequantize_per_channel(weight, weight_scale, x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


linear_int8_weight_only = define_per_channel_int8_op(
    "linear_int8_weight_only", linear_int8_weight_only_reference, "int8_weight_only",
    "Linear with weight int8 [N, K] and weight_scale float32 [N] (``W = weight * scale``); x is (..., K).",
    Int8WeightOnly,
)
