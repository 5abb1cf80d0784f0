"""Integer helpers shared by the int8 ops' reference implementations."""

from __future__ import annotations

import torch


def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b.T`` for int8 a [M, K], b [N, K], accumulated exactly, as int32 [M, N].

    On CPU ``torch._int_mm`` where it is right (4096x4096 at M=1: 0.18 ms against 43 ms in float64,
    most of which was allocating the float64 copy of the weight). It is wrong for K == 1 with N >= 2
    (torch 2.13, oneDNN 3.12; any M, contiguous or sliced a): ``b.T`` is then [1, N] with strides
    (1, 1), a layout that reads as both row and column major, and the result is uninitialised memory
    that changes from call to call (-213398720 where 6 was due). A sweep of every M, K, N < 40 and
    random shapes up to 257 x 1000 x 4097 found no other wrong shape; K == 0 gives zeros. K == 1 is
    an outer product, so its int32 matmul costs nothing. Elsewhere in float64: every product and
    partial sum is an integer below 128 * 128 * K < 2**53, so the result equals int32 accumulation
    for any realistic K, and float64 matmul exists on every device.
    """
    if a.device.type == "cpu":
        if a.shape[1] == 1:
            return a.to(torch.int32) @ b.to(torch.int32).t()
        return torch._int_mm(a, b.t())
    return (a.double() @ b.double().t()).to(torch.int32)


def int8_vectorwise_quant(a: torch.Tensor, threshold: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """bitsandbytes ``int8_vectorwise_quant`` of a 2-D float16 tensor, without modifying it.

    Elements with ``|a| >= threshold`` (threshold > 0) are outliers: they are left out of the
    row absmax, and with more than one row their whole columns are zeroed in the int8 result.
    Returns ``(int8 [M, K], row absmax float32 [M], outlier column indices int64)``.
    All-zero rows give int8 zeros (bitsandbytes would produce 0 * inf there).
    """
    outlier_cols = torch.empty(0, dtype=torch.int64, device=a.device)
    if threshold > 0.0:
        outliers = a.abs() >= threshold
        outlier_cols = torch.argwhere(outliers.any(dim=0)).view(-1)
        a = a.masked_fill(outliers, 0)
    row_stats = a.abs().amax(dim=1).float()
    multiplier = torch.where(row_stats == 0, torch.zeros_like(row_stats), 127.0 / row_stats)
    q = torch.round(a * multiplier.unsqueeze(-1)).to(torch.int8)
    if a.shape[0] > 1 and outlier_cols.numel():
        q[:, outlier_cols] = 0
    return q, row_stats, outlier_cols


def quantize_per_token_asymmetric(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row asymmetric int8 of a 2-D tensor: ``a ~= (q - zero_point) * scale``.

    The range [min(row, 0), max(row, 0)] maps onto [-128, 127]: ``scale = (max - min) / 255``
    (at least float32 eps, so an all-zero row is harmless), ``zero_point = -128 - round(min /
    scale)`` in [-128, 127], ``q = clamp(round(a / scale) + zero_point, -128, 127)``.
    Returns ``(q int8, scale float32 [M], zero_point int32 [M])``.
    """
    a = a.float()
    lo = a.amin(dim=1).clamp(max=0)
    hi = a.amax(dim=1).clamp(min=0)
    scale = ((hi - lo) / 255.0).clamp(min=torch.finfo(torch.float32).eps)
    zero_point = (-128 - torch.round(lo / scale)).clamp(-128, 127)
    q = (torch.round(a / scale[:, None]) + zero_point[:, None]).clamp(-128, 127).to(torch.int8)
    return q, scale, zero_point.to(torch.int32)
