"""``qcompile::linear_w8a8_dynamic``: int8 weights, per-token asymmetric int8 activations, int32 accumulation."""


import torch

from qcompile.ops.dispatch import check_kernels, triton_kernel, use_triton
from qcompile.ops.int8_common import int8_matmul, quantize_per_token_asymmetric
from qcompile.ops.linear_int8_weight_only import dequantize_per_channel


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


# Spelled out so that sizes are `int`, not the `SymInt` custom_op would infer; other
# components (the rewrite pass, codegen) depend on this exact signature.
SCHEMA = (
    "(Tensor x, Tensor weight, Tensor weight_scale, Tensor? bias, str kernels) -> Tensor"
)


@torch.library.custom_op("qcompile::linear_w8a8_dynamic", mutates_args=(), schema=SCHEMA)
def linear_w8a8_dynamic(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    kernels: str,
) -> torch.Tensor:
    """W8A8 linear: weight int8 [N, K], weight_scale float32 [N]; x (..., K) is quantized per token."""
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x: last dimension {x.shape[-1]} does not match the weight's in_features {weight.shape[1]}")
    if use_triton(kernels, x):
        return triton_kernel("w8a8_dynamic", "linear_w8a8_dynamic")(x, weight, weight_scale, bias)
    return linear_w8a8_dynamic_reference(x, weight, weight_scale, bias)


@linear_w8a8_dynamic.register_fake
def _(x, weight, weight_scale, bias, kernels):
    check_kernels(kernels)
    torch._check(x.shape[-1] == weight.shape[1], lambda: "x: last dimension does not match the weight")
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _setup_context(ctx, inputs, output) -> None:
    x, weight, weight_scale, bias, _kernels = inputs
    ctx.save_for_backward(weight, weight_scale)
    ctx.x_dtype = x.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad):
    # Straight-through for the activation quantization: d/dx through the dequantized weight.
    weight, weight_scale = ctx.saved_tensors
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = grad.to(ctx.x_dtype) @ dequantize_per_channel(weight, weight_scale, ctx.x_dtype)
    if ctx.needs_input_grad[3]:
        grad_bias = grad.reshape(-1, weight.shape[0]).sum(0).to(ctx.bias_dtype)
    return grad_x, None, None, grad_bias, None


linear_w8a8_dynamic.register_autograd(_backward, setup_context=_setup_context)
