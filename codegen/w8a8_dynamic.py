"""W8A8 dynamic: per-token asymmetric int8 activations (quantized at run time), per-channel
symmetric int8 weights, int8 x int8 ``tl.dot`` with int32 accumulation.

Activation quantization (one program per row, the whole row in registers, one read of x)::

    lo = min(min(x_row), 0); hi = max(max(x_row), 0)      # the range always holds 0
    scale = max((hi - lo) / 255, fp32 eps)
    zp    = round(-lo / scale) - 128   (in [-128, 127] because the range holds 0)
    q     = clamp(round(x / scale) + zp, -128, 127)

Including 0 in the range (torchao's convention, and qcompile.ops.int8_common's) keeps zp inside
int8 and makes a constant row well defined; for rows that straddle 0 (the usual case) it is exactly
``(max - min) / 255``.

GEMM: ``x ~ (q - zp) * scale`` and ``W ~ w * wscale``, so
``y[m, n] = scale[m] * wscale[n] * (sum_k q[m,k] w[n,k] - zp[m] * sum_k w[n,k]) + bias[n]``.
The weight row sums come from the same weight tiles the dot consumes (a reduction per K step), so
W is read once and no extra tensor has to be stored or passed.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import triton
import triton.language as tl

from qcompile.codegen import _common as common
from qcompile.codegen import autotune
from qcompile.codegen._tl_utils import grouped_tile, load_tile, load_tile_t, rint, split_k_range, store_split_tile

FN = "w8a8_dynamic"
MAX_ROW = common.MAX_ROW  # the quantization kernel keeps a whole row in registers


@triton.jit
def w8a8_quant_kernel(
    x_ptr,
    q_ptr,
    scale_ptr,
    zp_ptr,
    K,
    stride_xm,
    stride_qm,
    BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0)
    rk = tl.arange(0, BLOCK_K)
    mask = rk < K
    x = tl.load(x_ptr + row * stride_xm + rk, mask=mask, other=0.0).to(tl.float32)
    # Masked lanes read 0, which the range holds anyway.
    lo = tl.minimum(tl.min(x, axis=0), 0.0)
    hi = tl.maximum(tl.max(x, axis=0), 0.0)
    # At least fp32 eps (as qcompile.ops' reference), so an all-zero row is harmless.
    scale = tl.maximum(tl.math.div_rn(hi - lo, 255.0), 1.1920928955078125e-07)
    zp = rint(tl.math.div_rn(-lo, scale)) - 128.0
    q = rint(tl.math.div_rn(x, scale)) + zp
    q = tl.minimum(tl.maximum(q, -128.0), 127.0)
    tl.store(q_ptr + row * stride_qm + rk, q.to(tl.int8), mask=mask)
    tl.store(scale_ptr + row, scale)
    tl.store(zp_ptr + row, zp.to(tl.int32))


@triton.jit
def w8a8_gemm_kernel(
    q_ptr,
    w_ptr,
    x_scale_ptr,
    x_zp_ptr,
    w_scale_ptr,
    bias_ptr,
    y_ptr,
    M,
    N,
    K,
    stride_qm,
    stride_wn,
    stride_ym,
    HAS_BIAS: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    rm, rn, m_mask, n_mask = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    # Split K: each split corrects its own partial sum for the zero point (w_sum over its K range).
    w_sum = tl.zeros((BLOCK_N,), dtype=tl.int32)
    pid_k = tl.program_id(1)
    k_begin, k_end = split_k_range(pid_k, K, BLOCK_K, SPLIT_K)
    for k0 in range(k_begin, k_end, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_mask = rk < k_end
        a = load_tile(q_ptr, rm, rk, m_mask, k_mask, stride_qm)
        b = load_tile_t(w_ptr, rn, rk, n_mask, k_mask, stride_wn)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        w_sum += tl.sum(b.to(tl.int32), axis=0)
    zp = tl.load(x_zp_ptr + rm, mask=m_mask, other=0)
    x_scale = tl.load(x_scale_ptr + rm, mask=m_mask, other=0.0)
    w_scale = tl.load(w_scale_ptr + rn, mask=n_mask, other=0.0)
    out = (acc - zp[:, None] * w_sum[None, :]).to(tl.float32) * (x_scale[:, None] * w_scale[None, :])
    store_split_tile(out, bias_ptr, y_ptr, rm, rn, m_mask, n_mask, stride_ym, pid_k, HAS_BIAS, SPLIT_K, INTERPRET)


_ARGS = [
    "q_ptr", "w_ptr", "x_scale_ptr", "x_zp_ptr", "w_scale_ptr", "bias_ptr", "y_ptr",
    "M", "N", "K", "stride_qm", "stride_wn", "stride_ym",
]


def _smem(meta: dict[str, Any], stages: int, named: dict[str, Any]) -> int:
    bm, bn, bk = meta["BLOCK_M"], meta["BLOCK_N"], meta["BLOCK_K"]
    return stages * (bm * bk + bk * bn)


def int8_gemm_heuristic(named: dict[str, Any]) -> Any:
    """(Shared with LLM.int8().) The int8 tiles of int8_gemm_spaces by M, for autotuning off."""
    m = named["M"]
    if m <= 16:
        return autotune.config(BLOCK_M=16, BLOCK_N=64, BLOCK_K=256, GROUP_M=8, num_warps=4, num_stages=4)
    if m <= 64:
        return autotune.config(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=3)
    return autotune.config(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3)


def int8_gemm_spaces() -> dict[str, list]:
    """int8 tiles: BLOCK_K >= 32 (int8 MMA needs K multiples of 32) and deeper K steps than 16-bit."""
    return autotune.tile_spaces(
        ((16, 64, 256, 4, 4), (32, 64, 128, 4, 4), (64, 64, 128, 4, 3), (64, 128, 128, 4, 3),
         (128, 128, 128, 8, 3), (128, 256, 64, 8, 3)),
        (64, 128, 256),
    )


@functools.cache  # built on first use: nothing is benchmarked or read from disk at import
def _tuned(split_k: bool) -> autotune.TunedKernel:
    return int8_tuned_kernel("w8a8_dynamic_gemm", w8a8_gemm_kernel, _ARGS, _smem, split_k)


def int8_tuned_kernel(name: str, kernel: Any, arg_names: list[str], smem: Any, split_k: bool) -> autotune.TunedKernel:
    """(Shared with LLM.int8().) The int8 GEMM's tuned launcher, or its small-M split-K variant."""
    if split_k:
        return autotune.TunedKernel(
            f"{name}_split_k", kernel, arg_names, common.split_k_spaces(int8_gemm_spaces()),
            common.split_k_heuristic(int8_gemm_heuristic), common.split_k_interpreter_config, smem,
            autotune.gemm_useful, key_names=["N", "K"], reset_to_zero=["y_ptr"],
        )
    return autotune.TunedKernel(
        name, kernel, arg_names, int8_gemm_spaces(), int8_gemm_heuristic, autotune.gemm_interpreter_config, smem,
        autotune.gemm_useful, key_names=["N", "K"],
    )


def quantize_activations(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q int8 [M, K], scale fp32 [M], zero point int32 [M]) for a 2-D x with unit K stride."""
    common.check_runnable(FN, w8a8_quant_kernel, x2)
    m, k = x2.shape
    block_k, warps = common.row_launch(FN, k)
    q = torch.empty((m, k), device=x2.device, dtype=torch.int8)
    scale = torch.empty(m, device=x2.device, dtype=torch.float32)
    zp = torch.empty(m, device=x2.device, dtype=torch.int32)
    if m:
        # enable_fp_fusion=False: the rounding in rint must not fuse with the division's result.
        autotune.run_kernel(w8a8_quant_kernel, (m,), (x2, q, scale, zp, k, x2.stride(0), q.stride(0)),
                            BLOCK_K=block_k, num_warps=warps, enable_fp_fusion=False)
    return q, scale, zp


def w8a8_dynamic(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    config: Any = None,
) -> torch.Tensor:
    """W8A8 dynamic linear in x.dtype; see the module docstring for the numerics.

    config: force one GEMM launch config (triton.Config or dict), bypassing tuning.
    """
    x2, weight, weight_scale, bias = common.check_int8_linear(FN, w8a8_gemm_kernel, x, weight, weight_scale, bias)
    n, k = weight.shape
    m = x2.shape[0]

    out_shape = (*x.shape[:-1], n)
    if m == 0:
        return x.new_zeros(out_shape)
    q, x_scale, x_zp = quantize_activations(x2)
    def make_args(y: torch.Tensor) -> tuple:
        return (q, weight, x_scale, x_zp, weight_scale, bias if bias is not None else weight_scale, y, m, n, k,
                q.stride(0), weight.stride(0), y.stride(0))

    y = common.launch_gemm(_tuned(False), _tuned(True), make_args, m, n, x, autotune.as_config(config),
                           (k, None if bias is None else bias.dtype), HAS_BIAS=bias is not None,
                           INTERPRET=autotune.interpreting())
    return y.reshape(out_shape)


# The name qcompile.ops.linear_w8a8_dynamic looks up.
linear_w8a8_dynamic = w8a8_dynamic
