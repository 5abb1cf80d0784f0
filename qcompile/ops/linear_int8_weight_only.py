"""``qcompile::linear_int8_weight_only``: per-channel int8 weight, float activations."""


import torch
import torch.nn.functional as F

from qcompile.ops.dispatch import check_kernels, triton_kernel, use_triton


def dequantize_per_channel(weight: torch.Tensor, weight_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``weight * weight_scale[:, None]`` computed in float32, cast to ``dtype``."""
    return (weight.float() * weight_scale.float()[:, None]).to(dtype)


def linear_int8_weight_only_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """``F.linear(x, weight * scale, bias)`` with the weight dequantized to x.dtype."""
    w = dequantize_per_channel(weight, weight_scale, x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


# Spelled out so that sizes are `int`, not the `SymInt` custom_op would infer; other
# components (the rewrite pass, codegen) depend on this exact signature.
SCHEMA = (
    "(Tensor x, Tensor weight, Tensor weight_scale, Tensor? bias, str kernels) -> Tensor"
)


@torch.library.custom_op("qcompile::linear_int8_weight_only", mutates_args=(), schema=SCHEMA)
def linear_int8_weight_only(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    kernels: str,
) -> torch.Tensor:
    """Linear with weight int8 [N, K] and weight_scale float32 [N] (``W = weight * scale``); x is (..., K)."""
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x: last dimension {x.shape[-1]} does not match the weight's in_features {weight.shape[1]}")
    if use_triton(kernels, x):
        return triton_kernel("int8_weight_only", "linear_int8_weight_only")(x, weight, weight_scale, bias)
    return linear_int8_weight_only_reference(x, weight, weight_scale, bias)


@linear_int8_weight_only.register_fake
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
    weight, weight_scale = ctx.saved_tensors
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = grad.to(ctx.x_dtype) @ dequantize_per_channel(weight, weight_scale, ctx.x_dtype)
    if ctx.needs_input_grad[3]:
        grad_bias = grad.reshape(-1, weight.shape[0]).sum(0).to(ctx.bias_dtype)
    return grad_x, None, None, grad_bias, None


linear_int8_weight_only.register_autograd(_backward, setup_context=_setup_context)
