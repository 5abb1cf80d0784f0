"""The shared definition of the ops whose weight is per-channel int8: ``(x, weight, weight_scale, bias, kernels)``.

``linear_int8_weight_only`` and ``linear_w8a8_dynamic`` differ only in their reference
math and their kernel; the schema, shape checks, fake implementation and gradient
(through the dequantized weight, straight-through for any activation quantization) are
the same, so they are defined once here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from qcompile.formats import Scheme
from qcompile.ops.bindings import bind
from qcompile.ops.dispatch import check_kernels, codegen_function, use_triton

# Spelled out so that the op's argument types are fixed; the rewrite pass and codegen
# depend on this exact signature.
SCHEMA = "(Tensor x, Tensor weight, Tensor weight_scale, Tensor? bias, str kernels) -> Tensor"

Reference = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def dequantize_per_channel(weight: torch.Tensor, weight_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``weight * weight_scale[:, None]`` computed in float32, cast to ``dtype``."""
    return (weight.float() * weight_scale.float()[:, None]).to(dtype)


def define_per_channel_int8_op(name: str, reference: Reference, kernel_module: str, doc: str,
                               scheme_type: type[Scheme]):
    """Register ``qcompile::<name>`` and bind ``scheme_type`` to it; on Triton it calls
    ``qcompile.codegen.<kernel_module>.<name>``."""

    def implementation(x, weight, weight_scale, bias, kernels):
        if x.shape[-1] != weight.shape[1]:
            raise ValueError(
                f"x: last dimension {x.shape[-1]} does not match the weight's in_features {weight.shape[1]}"
            )
        if use_triton(kernels, x):
            return codegen_function(kernel_module, name)(x, weight, weight_scale, bias)
        return reference(x, weight, weight_scale, bias)

    implementation.__name__ = name
    implementation.__doc__ = doc
    op = torch.library.custom_op(f"qcompile::{name}", mutates_args=(), schema=SCHEMA)(implementation)

    @op.register_fake
    def _(x, weight, weight_scale, bias, kernels):
        check_kernels(kernels)
        torch._check(x.shape[-1] == weight.shape[1], lambda: "x: last dimension does not match the weight")
        return x.new_empty((*x.shape[:-1], weight.shape[0]))

    def setup_context(ctx, inputs, output) -> None:
        x, weight, weight_scale, bias, _kernels = inputs
        ctx.save_for_backward(weight, weight_scale)
        ctx.x_dtype = x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype

    def backward(ctx, grad):
        weight, weight_scale = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad.to(ctx.x_dtype) @ dequantize_per_channel(weight, weight_scale, ctx.x_dtype)
        if ctx.needs_input_grad[3]:
            grad_bias = grad.reshape(-1, weight.shape[0]).sum(0).to(ctx.bias_dtype)
        return grad_x, None, None, grad_bias, None

    op.register_autograd(backward, setup_context=setup_context)
    bind(scheme_type, op, lambda p: ((p.weight, p.weight_scale), ()))
    return op
