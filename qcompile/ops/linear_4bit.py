"""``qcompile::linear_4bit``: F.linear with an NF4 / FP4 weight (bitsandbytes ``Linear4bit``)."""


import torch
import torch.nn.functional as F

from qcompile.formats.blockwise import dequantize_4bit
from qcompile.ops.dispatch import check_kernels, triton_kernel, use_triton


def linear_4bit_reference(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    bias: torch.Tensor | None,
    nested_offset: float,
    blocksize: int,
    out_features: int,
    in_features: int,
    compute_dtype: torch.dtype,
) -> torch.Tensor:
    """What bitsandbytes ``Linear4bit`` computes: dequantize the weight to ``compute_dtype``,
    ``F.linear`` in ``compute_dtype`` (x and bias cast to it), result cast back to ``x.dtype``."""
    weight = dequantize_4bit(packed, absmax, code, blocksize, (out_features, in_features), compute_dtype,
                             nested_absmax, nested_code, nested_offset)
    out = F.linear(x.to(compute_dtype), weight, None if bias is None else bias.to(compute_dtype))
    return out.to(x.dtype)


def _check_shapes(x: torch.Tensor, packed: torch.Tensor, out_features: int, in_features: int) -> None:
    if x.shape[-1] != in_features:
        raise ValueError(f"x: last dimension {x.shape[-1]} does not match in_features {in_features}")
    if packed.numel() != (out_features * in_features + 1) // 2:
        raise ValueError(
            f"packed: {packed.numel()} bytes, expected {(out_features * in_features + 1) // 2} "
            f"for a [{out_features}, {in_features}] weight"
        )


# Spelled out so that sizes are `int`, not the `SymInt` custom_op would infer; other
# components (the rewrite pass, codegen) depend on this exact signature.
SCHEMA = (
    "(Tensor x, Tensor packed, Tensor absmax, Tensor code, Tensor? nested_absmax, Tensor? nested_code, "
    "Tensor? bias, float nested_offset, int blocksize, int out_features, int in_features, "
    "ScalarType compute_dtype, str kernels) -> Tensor"
)


@torch.library.custom_op("qcompile::linear_4bit", mutates_args=(), schema=SCHEMA)
def linear_4bit(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    bias: torch.Tensor | None,
    nested_offset: float,
    blocksize: int,
    out_features: int,
    in_features: int,
    compute_dtype: torch.dtype,
    kernels: str,
) -> torch.Tensor:
    """``x @ W.T + bias`` for a blockwise 4-bit W [out_features, in_features]; x is (..., in_features).

    packed: uint8 [ceil(N*K/2)], high nibble first; absmax float32 [blocks] (uint8 with double
    quant, then nested_absmax float32 [ceil(blocks/256)], nested_code float32 [256] and the
    mean nested_offset); code float32 [16]. Output dtype is x.dtype.
    """
    _check_shapes(x, packed, out_features, in_features)
    args = (x, packed, absmax, code, nested_absmax, nested_code, bias, nested_offset, blocksize,
            out_features, in_features, compute_dtype)
    if use_triton(kernels, x):
        return triton_kernel("linear_4bit", "linear_4bit")(*args)
    return linear_4bit_reference(*args)


@linear_4bit.register_fake
def _(x, packed, absmax, code, nested_absmax, nested_code, bias, nested_offset, blocksize, out_features,
      in_features, compute_dtype, kernels):
    check_kernels(kernels)
    torch._check(x.shape[-1] == in_features, lambda: f"x: last dimension does not match in_features {in_features}")
    return x.new_empty((*x.shape[:-1], out_features))


def _setup_context(ctx, inputs, output) -> None:
    (x, packed, absmax, code, nested_absmax, nested_code, bias, nested_offset, blocksize, out_features,
     in_features, compute_dtype, _kernels) = inputs
    ctx.save_for_backward(packed, absmax, code, nested_absmax, nested_code)
    ctx.constants = (nested_offset, blocksize, out_features, in_features, compute_dtype)
    ctx.x_dtype = x.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad):
    # The quantized weight is frozen (QLoRA): only x and bias get gradients.
    packed, absmax, code, nested_absmax, nested_code = ctx.saved_tensors
    nested_offset, blocksize, out_features, in_features, compute_dtype = ctx.constants
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        weight = dequantize_4bit(packed, absmax, code, blocksize, (out_features, in_features), compute_dtype,
                                 nested_absmax, nested_code, nested_offset)
        grad_x = (grad.to(compute_dtype) @ weight).to(ctx.x_dtype)
    if ctx.needs_input_grad[6]:
        grad_bias = grad.reshape(-1, out_features).sum(0).to(ctx.bias_dtype)
    return grad_x, None, None, None, None, None, grad_bias, None, None, None, None, None, None


linear_4bit.register_autograd(_backward, setup_context=_setup_context)
