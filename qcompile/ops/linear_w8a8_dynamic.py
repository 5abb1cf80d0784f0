"""``qcompile::linear_w8a8_dynamic``: int8 weights, per-token asymmetric int8 activations, int32 accumulation."""


import torch

from qcompile.formats.w8a8_dynamic import W8A8Dynamic
from qcompile.ops.int8_common import int8_matmul, quantize_per_token_asymmetric
from qcompile.ops.per_channel_int8 import define_per_channel_int8_op


def linear_w8a8_dynamic_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """y[m, n] = s_x[m] * s_w[n] * (sum_k q_x[m, k] q_w[n, k] - z[m] * sum_k q_w[n, k]) + bias[n].

    x = (q_x - z) * s_x per row (token), computed at run time; W = q_w * s_w per row. The
    integer sum is exact int32; the zero point enters only through the weight's row sums,
    which is why an asymmetric activation costs one extra [N] vector, not another matmul.
    """
    n = weight.shape[0]
    a = x.reshape(-1, x.shape[-1])
    q, scale, zero_point = quantize_per_token_asymmetric(a)
    acc = int8_matmul(q, weight)
    row_sums = weight.sum(dim=1, dtype=torch.int32)
    acc = acc - zero_point[:, None] * row_sums[None, :]
    out = acc.float() * scale[:, None] * weight_scale.float()[None, :]
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype).reshape(*x.shape[:-1], n)


linear_w8a8_dynamic = define_per_channel_int8_op(
    "linear_w8a8_dynamic", linear_w8a8_dynamic_reference, "w8a8_dynamic",
    "W8A8 linear: weight int8 [N, K], weight_scale float32 [N]; x (..., K) is quantized per token at run time. "
    "The gradient is straight-through the activation quantization.",
    W8A8Dynamic,
)
