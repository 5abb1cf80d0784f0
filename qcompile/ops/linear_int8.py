"""``qcompile::linear_int8``: LLM.int8() (bitsandbytes ``Linear8bitLt`` inference forward)."""


import torch

from qcompile.formats.int8 import Int8
from qcompile.formats.packed_int8 import INV_127
from qcompile.ops.bindings import bind
from qcompile.ops.dispatch import check_kernels, codegen_function, use_triton
from qcompile.ops.int8_common import int8_matmul, int8_vectorwise_quant

# 1 / (127 * 127) as bitsandbytes writes it (int8_mm_dequant).
_INV_127_SQUARED = 6.200124e-05


def linear_int8_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    threshold: float,
) -> torch.Tensor:
    """bitsandbytes ``MatMul8bitLt.forward`` for a frozen int8 weight, step for step.

    1. x (as float16) is quantized row-wise to int8; with threshold > 0, the columns holding
       any |x| >= threshold are outlier columns, left out of the int8 part.
    2. int8 x int8 -> int32, dequantized with row_absmax(x) * SCB / 127**2 (float32), + bias,
       cast to x.dtype.
    3. outlier columns of x (original precision) @ the dequantized weight columns, added.
    """
    n = weight.shape[0]
    a = x.reshape(-1, x.shape[-1])
    ca, sca, outlier_cols = int8_vectorwise_quant(a.to(torch.float16), threshold)
    acc = int8_matmul(ca, weight)
    out = acc * (sca.unsqueeze(-1) * weight_scale.unsqueeze(0)) * _INV_127_SQUARED
    if bias is not None:
        out = out + bias.to(x.dtype)  # Linear8bitLt casts the bias to x.dtype first
    out = out.to(x.dtype)
    if threshold > 0.0 and outlier_cols.numel():
        sub_a = a[:, outlier_cols]
        sub_w = (weight[:, outlier_cols] * weight_scale.view(-1, 1) * INV_127).to(a.dtype)
        out = out.addmm(sub_a, sub_w.t())
    return out.reshape(*x.shape[:-1], n)


# Spelled out so that sizes are `int`, not the `SymInt` custom_op would infer; other
# components (the rewrite pass, codegen) depend on this exact signature.
SCHEMA = (
    "(Tensor x, Tensor weight, Tensor weight_scale, Tensor? bias, float threshold, str kernels) -> Tensor"
)


@torch.library.custom_op("qcompile::linear_int8", mutates_args=(), schema=SCHEMA)
def linear_int8(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    threshold: float,
    kernels: str,
) -> torch.Tensor:
    """LLM.int8() linear: weight int8 [N, K], weight_scale float32 [N] (bitsandbytes' SCB, the row
    absmax); threshold 0 = plain vector-wise int8, > 0 = outlier columns in 16-bit. x is (..., K)."""
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x: last dimension {x.shape[-1]} does not match the weight's in_features {weight.shape[1]}")
    if use_triton(kernels, x):
        return codegen_function("llm_int8", "linear_int8")(x, weight, weight_scale, bias, threshold)
    return linear_int8_reference(x, weight, weight_scale, bias, threshold)


@linear_int8.register_fake
def _(x, weight, weight_scale, bias, threshold, kernels):
    check_kernels(kernels)
    torch._check(x.shape[-1] == weight.shape[1], lambda: "x: last dimension does not match the weight")
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _setup_context(ctx, inputs, output) -> None:
    x, weight, weight_scale, bias, _threshold, _kernels = inputs
    ctx.save_for_backward(weight, weight_scale)
    ctx.x_dtype = x.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad):
    # As bitsandbytes: grad_x = grad @ (CB * SCB / 127) in x's dtype; the int8 weight is frozen.
    weight, weight_scale = ctx.saved_tensors
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        dequantized = (weight.to(ctx.x_dtype) * (weight_scale.unsqueeze(1) * INV_127)).to(ctx.x_dtype)
        grad_x = grad.to(ctx.x_dtype) @ dequantized
    if ctx.needs_input_grad[3]:
        grad_bias = grad.reshape(-1, weight.shape[0]).sum(0).to(ctx.bias_dtype)
    return grad_x, None, None, grad_bias, None, None


linear_int8.register_autograd(_backward, setup_context=_setup_context)

bind(Int8, linear_int8, lambda p: ((p.weight, p.weight_scale), (p.scheme.threshold,)))
