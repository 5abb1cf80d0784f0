"""``qcompile::linear_affine``: F.linear with an affine group-wise integer weight (GPTQ layout; affine, hqq)."""

import torch

from qcompile.formats.affine import AffineScheme
from qcompile.formats.blockwise import CHUNK_ELEMENTS
from qcompile.formats.packed_affine import decode_affine
from qcompile.ops.banded import banded_linear
from qcompile.ops.bindings import bind
from qcompile.ops.dispatch import check_kernels, codegen_function, use_cpu_kernels, use_triton


def linear_affine_reference(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor | None,
    zeros: torch.Tensor | None,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    input_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    bits: int,
    out_features: int,
    in_features: int,
    compute_dtype: torch.dtype,
    chunk_weights: int = CHUNK_ELEMENTS,
) -> torch.Tensor:
    """Dequantize to ``compute_dtype`` a band of rows at a time; ``F.linear`` in ``compute_dtype``; cast back."""

    def decode_rows(start: int, stop: int) -> torch.Tensor:
        return decode_affine(qweight, qzeros, zeros, scales, g_idx, bits, out_features, slice(start, stop),
                             compute_dtype, input_scale)

    return banded_linear(x, bias, out_features, in_features, compute_dtype, decode_rows, chunk_weights)


SCHEMA = (
    "(Tensor x, Tensor qweight, Tensor? qzeros, Tensor? zeros, Tensor scales, Tensor g_idx, Tensor? input_scale, "
    "Tensor? bias, "
    "int bits, int out_features, int in_features, ScalarType compute_dtype, str kernels) -> Tensor"
)


@torch.library.custom_op("qcompile::linear_affine", mutates_args=(), schema=SCHEMA)
def linear_affine(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor | None,
    zeros: torch.Tensor | None,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    input_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    bits: int,
    out_features: int,
    in_features: int,
    compute_dtype: torch.dtype,
    kernels: str,
) -> torch.Tensor:
    """``x @ W.T + bias`` for an affine group-wise W [out_features, in_features] (``formats/packed_affine.py``);
    on Triton the low-bit family's affine decode (``codegen/lowbit.py``); on CPU at decode sizes the fused
    C++ kernel (``codegen/cpu_lowbit.py``)."""
    if x.shape[-1] != in_features:
        raise ValueError(f"x: last dimension {x.shape[-1]} does not match in_features {in_features}")
    if use_triton(kernels, x):
        return codegen_function("lowbit", "linear_affine")(x, qweight, qzeros, zeros, scales, g_idx, input_scale, bias,
                                                        bits, out_features, in_features, compute_dtype)
    if use_cpu_kernels(kernels, x):
        out = codegen_function("cpu_lowbit", "linear_affine")(x, qweight, qzeros, zeros, scales, g_idx, input_scale,
                                                              bias, bits, out_features, in_features, compute_dtype)
        if out is not None:
            return out
    return linear_affine_reference(x, qweight, qzeros, zeros, scales, g_idx, input_scale, bias, bits, out_features,
                                   in_features, compute_dtype)


@linear_affine.register_fake
def _(x, qweight, qzeros, zeros, scales, g_idx, input_scale, bias, bits, out_features, in_features, compute_dtype,
      kernels):
    check_kernels(kernels)
    torch._check(x.shape[-1] == in_features, lambda: f"x: last dimension does not match in_features {in_features}")
    return x.new_empty((*x.shape[:-1], out_features))


def _setup_context(ctx, inputs, output) -> None:
    x, qweight, qzeros, zeros, scales, g_idx, input_scale, bias, bits, out_features, _, compute_dtype, _ = inputs
    ctx.save_for_backward(qweight, qzeros, zeros, scales, g_idx, input_scale)
    ctx.constants = (bits, out_features, compute_dtype)
    ctx.x_dtype = x.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad):
    # The quantized weight is frozen: only x and bias get gradients.
    qweight, qzeros, zeros, scales, g_idx, input_scale = ctx.saved_tensors
    bits, out_features, compute_dtype = ctx.constants
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        weight = decode_affine(qweight, qzeros, zeros, scales, g_idx, bits, out_features, dtype=compute_dtype,
                               input_scale=input_scale)
        grad_x = (grad.to(compute_dtype) @ weight).to(ctx.x_dtype)
    if ctx.needs_input_grad[7]:
        grad_bias = grad.reshape(-1, out_features).sum(0).to(ctx.bias_dtype)
    return grad_x, None, None, None, None, None, None, grad_bias, None, None, None, None, None


linear_affine.register_autograd(_backward, setup_context=_setup_context)


def _arguments(p):
    """A ``PackedAffine``'s arguments, in the order of SCHEMA."""
    tensors = (p.qweight, p.qzeros, p.zeros, p.scales, p.g_idx, p.input_scale)
    return tensors, (p.scheme.bits, p.shape[0], p.shape[1], p.scheme.compute_dtype)


bind(AffineScheme, linear_affine, _arguments)
