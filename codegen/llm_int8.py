"""LLM.int8() (bitsandbytes ``MatMul8bitLt`` inference) as three kernels and no host sync.

bitsandbytes' semantics, which these kernels reproduce:

* activations are quantized from ``x.to(float16)``; an element is an outlier when
  ``|x| >= threshold`` (threshold compared in fp16); outlier *columns* are the columns with any
  outlier element in any row;
* a row's absmax ``row_stats`` is taken after zeroing the outlier *elements* (other elements of an
  outlier column still count), ``q = round(x * (127 / row_stats))`` (ties to even), and every
  element of an outlier column is then zeroed in ``q``;
* ``y = q @ Wq.T * row_stats[:, None] * weight_scale[None, :] / 127**2 + bias``
  ``+ x[:, cols] @ (Wq[:, cols] * weight_scale[:, None] / 127).to(x.dtype).T``;
  ``weight_scale`` is bitsandbytes' SCB, the per-row absmax of the weight.

Kernels:

1. ``llm_int8_quant_kernel``, one program per row with the whole row in registers (a single read of
   x): outlier mask, row absmax without outlier elements, int8 row, and the column flags. Column
   flags need a reduction over all rows, which no single program sees; every program stores ``1``
   into ``flags[k]`` for its outlier elements. All writers write the same value, so plain stores are
   race free and need no atomics; the zeroed flag buffer is the only extra pass (a memset).
   Because the flags are complete only when the whole kernel is done, the zeroing of outlier
   columns in ``q`` is deferred to the GEMM, which reads the flags anyway.
2. ``llm_int8_compact_kernel``, one program: turns the K flags into a sorted list of outlier column
   indices and their count with a prefix sum (``tl.cumsum``). The count stays on the device: no
   ``nonzero()`` and no host synchronisation, so the op can be captured in CUDA graphs.
3. ``llm_int8_gemm_kernel``: int8 x int8 ``tl.dot`` with int32 accumulation, masking the outlier
   columns of the activation tile as it is loaded; epilogue applies ``row_stats * weight_scale / 127**2``,
   then loops over the (few) outlier columns, gathering x (original dtype) and the matching weight
   columns dequantized to x.dtype, with a 16-bit ``tl.dot`` in fp32, and adds the bias.

``threshold == 0`` disables the decomposition: no flags, no compaction, no outlier loop.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import triton
import triton.language as tl

from qcompile.codegen import _common as common
from qcompile.codegen import autotune
from qcompile.codegen._tl_utils import (
    cast,
    dot_f32,
    grouped_tile,
    load_tile,
    load_tile_t,
    rint,
    split_k_range,
    store_split_tile,
)
from qcompile.codegen.w8a8_dynamic import int8_tuned_kernel

FN = "linear_int8"
MAX_ROW = common.MAX_ROW  # the quantization kernel keeps a whole row in registers


@triton.jit
def llm_int8_quant_kernel(
    x_ptr,
    q_ptr,
    row_stats_ptr,
    flags_ptr,
    K,
    stride_xm,
    stride_qm,
    threshold,
    HAS_THRESHOLD: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0)
    rk = tl.arange(0, BLOCK_K)
    mask = rk < K
    # bitsandbytes quantizes A.to(float16).
    x = tl.load(x_ptr + row * stride_xm + rk, mask=mask, other=0.0).to(tl.float16).to(tl.float32)
    ax = tl.abs(x)
    if HAS_THRESHOLD:
        outlier = (ax >= threshold) & mask
        tl.store(flags_ptr + rk, tl.full((BLOCK_K,), 1, tl.int8), mask=outlier)
        x = tl.where(outlier, 0.0, x)
        ax = tl.where(outlier, 0.0, ax)
    row_max = tl.max(ax, axis=0)
    # torch evaluates bitsandbytes' `127.0 / row_stats` as reciprocal(row_stats) * 127 (two roundings).
    inv = tl.math.div_rn(1.0, tl.where(row_max > 0.0, row_max, 1.0)) * 127.0
    q = tl.where(row_max > 0.0, rint(x * inv), 0.0)
    tl.store(q_ptr + row * stride_qm + rk, q.to(tl.int8), mask=mask)
    tl.store(row_stats_ptr + row, row_max)


@triton.jit
def llm_int8_compact_kernel(
    flags_ptr,
    cols_ptr,
    count_ptr,
    K,
    BLOCK: tl.constexpr,
):
    base = tl.full([], 0, tl.int32)  # a tensor from the start: loop-carried types must not change
    for k0 in range(0, K, BLOCK):
        rk = k0 + tl.arange(0, BLOCK)
        flag = tl.load(flags_ptr + rk, mask=rk < K, other=0).to(tl.int32)
        slot = base + tl.cumsum(flag, axis=0) - flag
        tl.store(cols_ptr + slot, rk, mask=flag != 0)
        base += tl.sum(flag, axis=0)
    tl.store(count_ptr, base)


@triton.jit
def llm_int8_gemm_kernel(
    q_ptr,
    w_ptr,
    row_stats_ptr,
    w_scale_ptr,
    bias_ptr,
    x_ptr,
    flags_ptr,
    cols_ptr,
    count_ptr,
    y_ptr,
    M,
    N,
    K,
    stride_qm,
    stride_wn,
    stride_xm,
    stride_ym,
    HAS_BIAS: tl.constexpr,
    HAS_OUTLIERS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    BLOCK_O: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    rm, rn, m_mask, n_mask = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    pid_k = tl.program_id(1)
    k_begin, k_end = split_k_range(pid_k, K, BLOCK_K, SPLIT_K)
    for k0 in range(k_begin, k_end, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_mask = rk < k_end
        a = load_tile(q_ptr, rm, rk, m_mask, k_mask, stride_qm)
        if HAS_OUTLIERS:
            flag = tl.load(flags_ptr + rk, mask=k_mask, other=0)
            a = tl.where(flag[None, :] != 0, 0, a).to(tl.int8)
        b = load_tile_t(w_ptr, rn, rk, n_mask, k_mask, stride_wn)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
    row_stats = tl.load(row_stats_ptr + rm, mask=m_mask, other=0.0)
    w_scale = tl.load(w_scale_ptr + rn, mask=n_mask, other=0.0)
    # 1 / 127**2 as bitsandbytes' torch backend (int8_mm_dequant) and qcompile.ops' reference write it.
    out = acc.to(tl.float32) * (row_stats[:, None] * w_scale[None, :]) * 6.200124e-05
    if HAS_OUTLIERS:
        # The 16-bit part: only the outlier columns, gathered through the compacted index list.
        x_dtype = x_ptr.dtype.element_ty
        # Split 0 alone adds the outlier part (the others iterate over no columns).
        n_out = tl.where(pid_k == 0, tl.load(count_ptr), 0)
        w_deq_scale = w_scale * 0.007874015748031496  # weight_scale / 127
        # Accumulated straight into `out`: a separate [BLOCK_M, BLOCK_N] accumulator spilled registers
        # at 64x128 tiles (ptxas: 255 registers, 56-328 bytes of spills).
        for o0 in range(0, n_out, BLOCK_O):
            ro = o0 + tl.arange(0, BLOCK_O)
            o_mask = ro < n_out
            cols = tl.load(cols_ptr + ro, mask=o_mask, other=0)
            xo = load_tile(x_ptr, rm, cols, m_mask, o_mask, stride_xm)
            wq = load_tile_t(w_ptr, rn, cols, n_mask, o_mask, stride_wn)
            wo = cast(wq.to(tl.float32) * w_deq_scale[None, :], x_dtype, INTERPRET)
            out = dot_f32(xo, wo, out, DOT_PRECISION, INTERPRET)
    store_split_tile(out, bias_ptr, y_ptr, rm, rn, m_mask, n_mask, stride_ym, pid_k, HAS_BIAS, SPLIT_K, INTERPRET)


_ARGS = [
    "q_ptr", "w_ptr", "row_stats_ptr", "w_scale_ptr", "bias_ptr", "x_ptr", "flags_ptr", "cols_ptr", "count_ptr",
    "y_ptr", "M", "N", "K", "stride_qm", "stride_wn", "stride_xm", "stride_ym",
]


def _smem(meta: dict[str, Any], stages: int, named: dict[str, Any]) -> int:
    bm, bn, bk = meta["BLOCK_M"], meta["BLOCK_N"], meta["BLOCK_K"]
    x_bytes = named["x_ptr"].element_size()
    return stages * (bm * bk + bk * bn) + 32 * (bm + bn) * x_bytes


@functools.cache  # built on first use: nothing is benchmarked or read from disk at import
def _tuned(split_k: bool) -> autotune.TunedKernel:
    return int8_tuned_kernel("llm_int8_gemm", llm_int8_gemm_kernel, _ARGS, _smem, split_k)


@functools.lru_cache(maxsize=64)  # per call otherwise: a tensor round trip, ~3 us
def _fp16_threshold(threshold: float) -> float:
    # bitsandbytes compares the fp16 activations with the threshold in fp16.
    return float(torch.tensor(float(threshold), dtype=torch.float16))


def _quantize(x2: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Run the fused activation kernel: (q with outlier columns NOT yet zeroed, row_stats, flags or None)."""
    m, k = x2.shape
    block_k, warps = common.row_launch(FN, k)
    q = torch.empty((m, k), device=x2.device, dtype=torch.int8)
    row_stats = torch.empty(m, device=x2.device, dtype=torch.float32)
    flags = torch.zeros(k, device=x2.device, dtype=torch.int8) if threshold > 0 else None
    if m:
        # enable_fp_fusion=False: x * inv must be rounded before rint's add (as torch does).
        autotune.run_kernel(
            llm_int8_quant_kernel, (m,),
            (x2, q, row_stats, flags if flags is not None else q, k, x2.stride(0), q.stride(0),
             _fp16_threshold(threshold) if threshold > 0 else 0.0),
            HAS_THRESHOLD=threshold > 0, BLOCK_K=block_k, num_warps=warps, enable_fp_fusion=False,
        )
    return q, row_stats, flags


def _compact(flags: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    k = flags.numel()
    cols = torch.empty(k, device=flags.device, dtype=torch.int32)
    count = torch.empty(1, device=flags.device, dtype=torch.int32)
    block = min(1024, common.next_power_of_2(k))
    autotune.run_kernel(llm_int8_compact_kernel, (1,), (flags, cols, count, k), BLOCK=block, num_warps=4)
    return cols, count


def _check_threshold(threshold: float) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise ValueError(f"{FN}: threshold must be a number, got {type(threshold).__name__}")
    threshold = float(threshold)
    if not threshold >= 0.0 or threshold == float("inf"):
        raise ValueError(f"{FN}: threshold must be a finite number >= 0, got {threshold}")
    return threshold


def int8_vectorwise_quant(
    x: torch.Tensor, threshold: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Same outputs as ``bitsandbytes.functional.int8_vectorwise_quant(x.to(float16), threshold)``.

    (q int8 [..., K], row_stats fp32 [rows], outlier_cols int64 or None when threshold == 0). For
    tests and debugging: it synchronises to size ``outlier_cols``; ``linear_int8`` never does.
    """
    threshold = _check_threshold(threshold)
    common.check_runnable(FN, llm_int8_quant_kernel, x)
    common.check_dtype(FN, "x", x, common.FLOAT_DTYPES)
    x2 = common.as_2d_input(FN, x, x.shape[-1])
    q, row_stats, flags = _quantize(x2, threshold)
    outlier_cols = None
    if flags is not None:
        cols, count = _compact(flags)
        outlier_cols = cols[: int(count.item())].to(torch.int64)
        if x2.shape[0] > 1:
            q[:, outlier_cols] = 0
    return q.reshape(x.shape), row_stats, outlier_cols


def linear_int8(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    threshold: float,
    *,
    config: Any = None,
) -> torch.Tensor:
    """LLM.int8() linear in x.dtype: int8 weight [N, K], weight_scale = per-row absmax (bnb SCB) [N].

    config: force one GEMM launch config (triton.Config or dict), bypassing tuning.
    """
    threshold = _check_threshold(threshold)
    x2, weight, weight_scale, bias = common.check_int8_linear(FN, llm_int8_gemm_kernel, x, weight, weight_scale, bias)
    n, k = weight.shape
    m = x2.shape[0]

    out_shape = (*x.shape[:-1], n)
    if m == 0:
        return x.new_zeros(out_shape)
    q, row_stats, flags = _quantize(x2, threshold)
    if flags is not None:
        cols, count = _compact(flags)
    else:
        flags = cols = count = row_stats  # unused stand-ins (HAS_OUTLIERS=False)
    def make_args(y: torch.Tensor) -> tuple:
        return (q, weight, row_stats, weight_scale, bias if bias is not None else weight_scale, x2, flags, cols,
                count, y, m, n, k, q.stride(0), weight.stride(0), x2.stride(0), y.stride(0))

    interpret = autotune.interpreting()
    y = common.launch_gemm(_tuned(False), _tuned(True), make_args, m, n, x, autotune.as_config(config),
                           (k, None if bias is None else bias.dtype), HAS_BIAS=bias is not None,
                           HAS_OUTLIERS=threshold > 0, DOT_PRECISION=common.dot_precision(x.dtype, interpret),
                           INTERPRET=interpret, BLOCK_O=32)
    return y.reshape(out_shape)
