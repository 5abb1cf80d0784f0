"""Plain-torch references for the codegen kernels (independent of qcompile.ops / qcompile.formats)."""

from __future__ import annotations

import torch


def dequantize_4bit(packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize, n, k):
    """fp32 W [n, k] from bitsandbytes' flat 4-bit layout (blocks over the flattened weight)."""
    pb = packed.reshape(-1).view(torch.uint8).long()
    q = torch.stack([pb >> 4, pb & 15], 1).reshape(-1)[: n * k]
    if nested_absmax is not None:
        blocks = torch.arange(absmax.numel())
        absmax = nested_code[absmax.long()] * nested_absmax[blocks // 256] + nested_offset
    flat = torch.arange(n * k)
    return (code.float()[q] * absmax.float()[flat // blocksize]).reshape(n, k)


def linear_4bit(x, w_fp32, bias, compute_dtype):
    y = x.to(compute_dtype).float() @ w_fp32.to(compute_dtype).float().T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def int8_weight_only(x, weight, scale, bias):
    y = x.float() @ (weight.float() * scale.float()[:, None]).T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def w8a8_quantize(x2):
    xf = x2.float()
    lo = xf.amin(1).clamp(max=0)
    hi = xf.amax(1).clamp(min=0)
    scale = ((hi - lo) / 255).clamp(min=torch.finfo(torch.float32).eps)
    zp = torch.round(-lo / scale) - 128
    q = torch.clamp(torch.round(xf / scale[:, None]) + zp[:, None], -128, 127)
    return q.to(torch.int8), scale, zp.to(torch.int32)


def w8a8_dynamic(x, weight, scale, bias):
    x2 = x.reshape(-1, x.shape[-1])
    q, s, zp = w8a8_quantize(x2)
    xd = (q.float() - zp.float()[:, None]) * s[:, None]
    y = xd @ (weight.float() * scale.float()[:, None]).T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], -1)


def llm_int8(x, weight, scb, bias, threshold):
    """bitsandbytes MatMul8bitLt inference, written out with its default (torch) backend semantics."""
    import bitsandbytes.functional as F

    x2 = x.reshape(-1, x.shape[-1])
    qa, row_stats, cols = F.int8_vectorwise_quant(x2.to(torch.float16), threshold=threshold)
    y = (qa.float() @ weight.float().T) * (row_stats[:, None] * scb.float()[None, :]) * 6.200124e-05
    if bias is not None:
        y = y + bias.float()
    if cols is not None and cols.numel():
        sub_b = (weight[:, cols].float() * scb.float()[:, None] / 127).to(x.dtype)
        y = y + x2[:, cols].float() @ sub_b.float().T
    return y.to(x.dtype).reshape(*x.shape[:-1], -1)


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    """Output-rounding tolerance of a result in ``dtype`` (the kernels accumulate in fp32)."""
    return {
        torch.float32: dict(atol=1e-4, rtol=1e-4),
        torch.float16: dict(atol=2e-2, rtol=2e-3),
        torch.bfloat16: dict(atol=1.5e-1, rtol=1.6e-2),
    }[dtype]


# ---- markers ------------------------------------------------------------------------------------

def _markers():
    import os

    import pytest

    interp = pytest.mark.skipif(
        os.environ.get("TRITON_INTERPRET") != "1", reason="CPU kernel tests need TRITON_INTERPRET=1 (no CUDA)"
    )
    cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
    return interp, cuda


requires_interpreter, requires_cuda = _markers()
