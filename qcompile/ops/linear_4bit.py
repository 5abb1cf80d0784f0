"""``qcompile::linear_4bit``: F.linear with an NF4 / FP4 weight (bitsandbytes ``Linear4bit``)."""


import torch
import torch.nn.functional as F

from qcompile.formats.blockwise import (
    CHUNK_ELEMENTS,
    byte_pair_table,
    decode_blocks,
    decode_workspace,
    dequantize_4bit,
    float_absmax,
)
from qcompile.formats.fourbit import FourBitScheme
from qcompile.ops.banded import band_rows
from qcompile.ops.bindings import bind
from qcompile.ops.dispatch import check_kernels, codegen_function, use_cpu_kernels, use_triton

# The reference linear dequantizes CHUNK_ELEMENTS weights (a band of whole rows, ``ops/banded.py``) at a time
# into one reused buffer that stays in cache; dequantizing a whole 4096x4096 weight instead allocates 64 MiB
# of fresh pages per call, and on a 2-core AVX-512 CPU the page faults alone took ~20 ms.
# Measured (4096x4096 NF4 + double quant, M=1): 3-4x faster than one whole-weight dequantize.


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
    chunk_weights: int = CHUNK_ELEMENTS,
) -> torch.Tensor:
    """What bitsandbytes ``Linear4bit`` computes: dequantize the weight to ``compute_dtype``,
    ``F.linear`` in ``compute_dtype`` (x and bias cast to it), result cast back to ``x.dtype``.

    The weight is dequantized a band of rows (output features) at a time, each band's slice of
    the output computed before the next is decoded, so no full-precision copy of the weight exists.
    """
    x_c = x.to(compute_dtype)
    bias_c = None if bias is None else bias.to(compute_dtype)
    absmax = float_absmax(absmax, nested_absmax, nested_code, nested_offset)
    rows = band_rows(in_features, chunk_weights)
    if in_features % blocksize or in_features % 2 or rows >= out_features:
        # Blocks straddle rows (or one band is the whole weight): decode it in one go.
        weight = dequantize_4bit(packed, absmax, code, blocksize, (out_features, in_features), compute_dtype)
        return F.linear(x_c, weight, bias_c).to(x.dtype)
    table = byte_pair_table(code)
    packed_rows = packed.reshape(out_features, in_features // 2)
    absmax_rows = absmax[: out_features * (in_features // blocksize)].view(out_features, in_features // blocksize)
    band = torch.empty((rows, in_features), dtype=compute_dtype, device=x.device)
    workspace = decode_workspace(rows * in_features // 2, compute_dtype, x.device)
    out = x_c.new_empty((*x.shape[:-1], out_features))
    for start in range(0, out_features, rows):
        stop = min(start + rows, out_features)
        weight = decode_blocks(packed_rows[start:stop], absmax_rows[start:stop], table, band[: stop - start], workspace)
        out[..., start:stop] = F.linear(x_c, weight, None if bias_c is None else bias_c[start:stop])
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
        return codegen_function("lowbit", "linear_4bit")(*args)
    if use_cpu_kernels(kernels, x):
        out = codegen_function("cpu_lowbit", "linear_4bit")(*args)
        if out is not None:
            return out
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


def _arguments(p):
    """A ``Packed4bit``'s arguments: the one place, beside SCHEMA, that lists them in order."""
    tensors = (p.packed, p.absmax, p.code, p.nested_absmax, p.nested_code)
    return tensors, (p.nested_offset, p.scheme.blocksize, p.shape[0], p.shape[1], p.scheme.compute_dtype)


bind(FourBitScheme, linear_4bit, _arguments)
