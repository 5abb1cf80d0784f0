"""Weight-only int8: ``y = x @ (W * scale[:, None]).T + bias`` with W int8 [N, K], scale fp32 [N].

One tiled GEMM: the int8 weight tile is converted to x's dtype in registers (exact: |q| <= 127 fits
fp16/bf16), ``tl.dot`` accumulates in fp32 (IEEE for fp32 x), and the per-output-channel scale and
the bias are applied once in the epilogue (``sum_k x*q*s == s * sum_k x*q``). For small M the tile
is 16 rows tall (the smallest ``tl.dot`` tile); decode stays memory bound on the int8 weight reads.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import triton
import triton.language as tl

from qcompile.codegen import _common as common
from qcompile.codegen import autotune
from qcompile.codegen._tl_utils import dot_f32, grouped_tile, load_tile, load_tile_t, split_k_range, store_split_tile

FN = "int8_weight_only"


@triton.jit
def int8_weight_only_kernel(
    x_ptr,
    w_ptr,
    scale_ptr,
    bias_ptr,
    y_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_ym,
    HAS_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    rm, rn, m_mask, n_mask = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    pid_k = tl.program_id(1)
    k_begin, k_end = split_k_range(pid_k, K, BLOCK_K, SPLIT_K)
    for k0 in range(k_begin, k_end, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_mask = rk < k_end
        x = load_tile(x_ptr, rm, rk, m_mask, k_mask, stride_xm)
        q = load_tile_t(w_ptr, rn, rk, n_mask, k_mask, stride_wn)
        if INTERPRET:
            # The interpreter's int8 -> bf16 cast works on raw bit patterns; dot_f32 takes fp32 there.
            w = q.to(tl.float32)
        else:
            w = q.to(x.dtype)
        acc = dot_f32(x, w, acc, DOT_PRECISION, INTERPRET)
    acc = acc * tl.load(scale_ptr + rn, mask=n_mask, other=0.0)[None, :]
    store_split_tile(acc, bias_ptr, y_ptr, rm, rn, m_mask, n_mask, stride_ym, pid_k, HAS_BIAS, SPLIT_K, INTERPRET)


_ARGS = ["x_ptr", "w_ptr", "scale_ptr", "bias_ptr", "y_ptr", "M", "N", "K", "stride_xm", "stride_wn", "stride_ym"]


def _smem(meta: dict[str, Any], stages: int, named: dict[str, Any]) -> int:
    x_bytes = named["x_ptr"].element_size()
    bm, bn, bk = meta["BLOCK_M"], meta["BLOCK_N"], meta["BLOCK_K"]
    return stages * (bm * bk * x_bytes + bk * bn) + bk * bn * x_bytes


@functools.cache  # built on first use: nothing is benchmarked or read from disk at import
def _tuned(split_k: bool) -> autotune.TunedKernel:
    if split_k:
        return autotune.TunedKernel(
            "int8_weight_only_gemm_split_k", int8_weight_only_kernel, _ARGS,
            common.split_k_spaces(autotune.gemm_spaces()), common.split_k_heuristic(autotune.gemm_heuristic),
            common.split_k_interpreter_config, _smem, autotune.gemm_useful, key_names=["N", "K"],
            reset_to_zero=["y_ptr"],
        )
    return autotune.TunedKernel(
        "int8_weight_only_gemm", int8_weight_only_kernel, _ARGS, autotune.gemm_spaces(), autotune.gemm_heuristic,
        autotune.gemm_interpreter_config, _smem, autotune.gemm_useful, key_names=["N", "K"],
    )


def int8_weight_only(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    config: Any = None,
) -> torch.Tensor:
    """``x @ (weight * weight_scale[:, None]).T + bias`` in x.dtype with fp32 accumulation.

    config: force one launch config (triton.Config or dict), bypassing tuning; for tests/benchmarks.
    """
    x2, weight, weight_scale, bias = common.check_int8_linear(
        FN, int8_weight_only_kernel, x, weight, weight_scale, bias
    )
    n, k = weight.shape
    m = x2.shape[0]

    out_shape = (*x.shape[:-1], n)
    if m == 0:
        return x.new_zeros(out_shape)
    def make_args(y: torch.Tensor) -> tuple:
        return (x2, weight, weight_scale, bias if bias is not None else weight_scale, y, m, n, k,
                x2.stride(0), weight.stride(0), y.stride(0))

    interpret = autotune.interpreting()
    y = common.launch_gemm(_tuned(False), _tuned(True), make_args, m, n, x, autotune.as_config(config),
                           (k, None if bias is None else bias.dtype), HAS_BIAS=bias is not None,
                           DOT_PRECISION=common.dot_precision(x.dtype, interpret), INTERPRET=interpret)
    return y.reshape(out_shape)


# The name qcompile.ops.linear_int8_weight_only looks up.
linear_int8_weight_only = int8_weight_only
