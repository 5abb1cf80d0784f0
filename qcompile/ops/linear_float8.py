"""``qcompile::linear_float8``: F.linear with float8 e4m3 weights and a per-row scale (quanto's float8)."""

import torch

from qcompile.formats.float8 import Float8, decode_float8
from qcompile.ops.banded import banded_linear
from qcompile.ops.bindings import bind
from qcompile.ops.dispatch import check_kernels, codegen_function, use_triton


def linear_float8_reference(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                            compute_dtype: torch.dtype) -> torch.Tensor:
    """Decode a band of rows to ``compute_dtype``, ``F.linear`` in it, cast back to x's dtype."""
    n, k = weight.shape
    return banded_linear(x, bias, n, k, compute_dtype,
                         lambda start, stop: decode_float8(weight[start:stop], scale[start:stop], compute_dtype))


SCHEMA = "(Tensor x, Tensor weight, Tensor scale, Tensor? bias, ScalarType compute_dtype, str kernels) -> Tensor"


@torch.library.custom_op("qcompile::linear_float8", mutates_args=(), schema=SCHEMA)
def linear_float8(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                  compute_dtype: torch.dtype, kernels: str) -> torch.Tensor:
    """``x @ W.T + bias`` with W = float8 e4m3 bytes [N, K] (uint8) times scale [N]; x is (..., K)."""
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x: last dimension {x.shape[-1]} does not match the weight's in_features {weight.shape[1]}")
    if use_triton(kernels, x):
        return codegen_function("lowbit", "linear_float8")(x, weight, scale, bias, compute_dtype)
    return linear_float8_reference(x, weight, scale, bias, compute_dtype)


@linear_float8.register_fake
def _(x, weight, scale, bias, compute_dtype, kernels):
    check_kernels(kernels)
    torch._check(x.shape[-1] == weight.shape[1], lambda: "x: last dimension does not match the weight")
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _setup_context(ctx, inputs, output) -> None:
    x, weight, scale, bias, compute_dtype, _ = inputs
    ctx.save_for_backward(weight, scale)
    ctx.compute_dtype = compute_dtype
    ctx.x_dtype = x.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad):
    weight, scale = ctx.saved_tensors
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = (grad.to(ctx.compute_dtype) @ decode_float8(weight, scale, ctx.compute_dtype)).to(ctx.x_dtype)
    if ctx.needs_input_grad[3]:
        grad_bias = grad.reshape(-1, weight.shape[0]).sum(0).to(ctx.bias_dtype)
    return grad_x, None, None, grad_bias, None, None


linear_float8.register_autograd(_backward, setup_context=_setup_context)

# No compute_dtype setting (quanto has none): the matmul runs in the dtype of the weight it replaced.
bind(Float8, linear_float8, lambda p: ((p.weight, p.scale), (p.dtype,)))
