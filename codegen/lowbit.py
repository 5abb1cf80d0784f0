"""The low-bit dequantize + matmul kernel family: one GEMV, split-K and GEMM for every weight format.

``y = x @ decode(W).T + bias``. The decode is a compile-time part of the kernels (``DECODE``), so each
format is a decode function, not a copied kernel:

* ``DECODE_LUT4`` (NF4 / FP4, bitsandbytes' layout): W [N, K] flattened, element ``i`` in byte ``i // 2``
  (high nibble for even ``i``), ``code[nibble] * absmax[i // blocksize]`` (blocks may straddle rows),
  the absmax optionally double-quantized (uint8 codes, a 256-entry code table, one fp32 scale per 256
  blocks, plus a mean offset).
* ``DECODE_AFFINE`` (affine, HQQ, GPTQ, AWQ, quanto: GPTQ's layout, ``formats/packed_affine.py``):
  ``BITS``-wide integers (2, 3, 4, 8) packed along K in int32 words, ``(q - zero[g]) * scale[g]`` with
  ``g = g_idx[k]`` (act-order permutations included), zero points packed like the integers (``- 1``
  stored) or float16 (``ZERO_PACKED``), times an optional per-input-feature scale (AWQ).
* ``DECODE_FP8`` (float8 e4m3 bytes [N, K], a float32 scale per row; ``formats/float8.py``): the e4m3
  bit layout decoded with integer and float arithmetic (no float8 types, so the interpreter runs it).

The weight is decoded in registers only; the 16-bit weight never reaches global memory. Kernel
arguments are the same for every decode: ``w_ptr`` (the packed weight) and four metadata pointers
``m0..m3`` whose meaning the decode gives (see :func:`linear_4bit` and :func:`linear_affine`).

Three variants, dispatched on M (rows of x):

* ``gemv`` (M <= GEMV_MAX_M, decode): memory bound. Each program owns BLOCK_N output features for
  BLOCK_M (<= 4) rows and a 1/SPLIT_K slice of K; the product is a broadcast multiply and a sum over
  K in registers (no tensor cores, no padding M to 16). SPLIT_K fills the GPU when N / BLOCK_N alone
  is too few programs: each split stores its fp32 partial sums to a workspace and
  ``split_k_sum_kernel`` adds them in split order with the bias, cast to x.dtype. Two launches, no
  zero-fill, no atomics: the result does not depend on the order the splits ran in.
* ``gemm_split_k`` (M <= SPLIT_K_MAX_M): still memory bound, but worth tensor cores. The tiled GEMM
  below with a second grid axis splitting K, partial sums added atomically into an fp32 buffer.
* ``gemm`` (larger M): compute bound. Classic tiled ``tl.dot`` with grouped program order for L2
  reuse; the [BLOCK_K, BLOCK_N] weight tile is dequantized in registers right before the dot.

Both have two paths, chosen per launch (ALIGNED, LUT4 only for now): when K % blocksize == 0 (every LLM shape) each
row holds whole absmax blocks, so a K step within one block needs one absmax per weight row and
each packed byte is loaded once for its two weights, which multiply x's even and odd columns (two
``tl.dot`` s of depth SUB / 2 in the GEMM). Otherwise every element loads its own byte and absmax
(the general path, not software-pipelined: its per-element staging overflowed shared memory).

Numerics: the decode in fp32 (``code[q] * absmax[b]``; ``(q - zero) * scale``), cast to compute_dtype,
``x.to(compute_dtype)``, products and the sum in fp32 (fp32 compute uses IEEE dots, not TF32), bias
added in fp32, result cast to x.dtype. Bit-equal decodes to the torch references in ``formats/``.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import triton
import triton.language as tl

from qcompile.codegen import _common as common
from qcompile.codegen import autotune
from qcompile.codegen._tl_utils import cast, dot_f32, grouped_tile, load_tile, split_k_range, store_split_tile

FN = "linear_4bit"
GEMV_MAX_M = 4
DECODE_LUT4 = 0
DECODE_AFFINE = 1
DECODE_FP8 = 2
VARIANTS = ("auto", "gemv", "gemm_split_k", "gemm")
NESTED_BLOCKSIZE = 256  # bitsandbytes' double quantization groups 256 absmax values


@triton.jit
def _block_absmax(block, mask, absmax_ptr, nested_absmax_ptr, nested_code_ptr, nested_offset, NESTED: tl.constexpr):
    """fp32 absmax of the blocks ``block`` (any shape), decoding the nested form when NESTED."""
    if NESTED:
        qabs = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        scale = tl.load(nested_absmax_ptr + block // 256, mask=mask, other=0.0)
        return tl.load(nested_code_ptr + qabs, mask=mask, other=0.0) * scale + nested_offset
    else:
        return tl.load(absmax_ptr + block, mask=mask, other=0.0)


@triton.jit
def _dequant_4bit(
    flat,
    mask,
    packed_ptr,
    absmax_ptr,
    code_ptr,
    nested_absmax_ptr,
    nested_code_ptr,
    nested_offset,
    BLOCKSIZE: tl.constexpr,
    NESTED: tl.constexpr,
):
    """fp32 weights at flat indices ``flat`` (any shape): code[nibble] * absmax[flat // BLOCKSIZE].

    The general path (any K): every element loads its own byte and absmax.
    """
    byte = tl.load(packed_ptr + (flat // 2), mask=mask, other=0).to(tl.int32)
    nibble = tl.where((flat % 2) == 0, byte >> 4, byte & 15)
    value = tl.load(code_ptr + nibble, mask=mask, other=0.0)
    absmax = _block_absmax(flat // BLOCKSIZE, mask, absmax_ptr, nested_absmax_ptr, nested_code_ptr, nested_offset,
                           NESTED)
    return value * absmax


@triton.jit
def _field(lo_word, hi_word, shift, BITS: tl.constexpr):
    """The BITS-wide field at bit ``shift`` of ``lo_word`` (continuing into ``hi_word`` for 3 bits)."""
    value = lo_word.to(tl.uint32, bitcast=True) >> shift.to(tl.uint32)
    if BITS == 3:
        # Fields 10 and 21 of a 3-bit run straddle two words: their top bits are the next word's lowest.
        spill = tl.where(shift > 29, 32 - shift, 0).to(tl.uint32)
        value = value | tl.where(shift > 29, hi_word.to(tl.uint32, bitcast=True) << spill, 0)
    return (value & ((1 << BITS) - 1)).to(tl.int32)


@triton.jit
def _packed_value(ptr, major, minor, minor_words, mask, BITS: tl.constexpr):
    """Value ``major`` of the runs packed along the major axis, at minor index ``minor``: words are laid out
    [major words, minor] with ``minor_words`` words per major word row (GPTQ's qweight: major k, minor n)."""
    RUN: tl.constexpr = 32 if BITS == 3 else 32 // BITS
    WORDS: tl.constexpr = 3 if BITS == 3 else 1
    bit = (major % RUN) * BITS
    word = (major // RUN) * WORDS + bit // 32
    shift = bit % 32
    lo = tl.load(ptr + word * minor_words + minor, mask=mask, other=0)
    hi = lo
    if BITS == 3:
        hi = tl.load(ptr + (word + 1) * minor_words + minor, mask=mask & (shift > 29), other=0)
    return _field(lo, hi, shift, BITS)


@triton.jit
def _dequant_affine(rn, rk, mask, N, qweight_ptr, scales_ptr, zeros_ptr, g_idx_ptr, input_scale_ptr,
                    BITS: tl.constexpr, ZERO_PACKED: tl.constexpr, HAS_INPUT_SCALE: tl.constexpr):
    """fp32 weights W[rn, rk] (broadcastable index tiles) of GPTQ's layout: (q - zero[g]) * scale[g]."""
    RUN: tl.constexpr = 32 if BITS == 3 else 32 // BITS
    WORDS: tl.constexpr = 3 if BITS == 3 else 1
    q = _packed_value(qweight_ptr, rk, rn, N, mask, BITS)
    g = tl.load(g_idx_ptr + rk, mask=mask, other=0)
    scale = tl.load(scales_ptr + g * N + rn, mask=mask, other=0.0).to(tl.float32)
    if ZERO_PACKED:
        # qzeros [groups, N / RUN * WORDS]: runs along n within row g; ``zero - 1`` stored.
        zero = (_packed_value(zeros_ptr + g * (N // RUN * WORDS), rn, 0, 1, mask, BITS) + 1).to(tl.float32)
    else:
        zero = tl.load(zeros_ptr + g * N + rn, mask=mask, other=0.0).to(tl.float32)
    w = (q.to(tl.float32) - zero) * scale
    if HAS_INPUT_SCALE:
        w = w * tl.load(input_scale_ptr + rk, mask=mask, other=0.0).to(tl.float32)
    return w


@triton.jit
def _dequant_fp8(rn, rk, mask, K, weight_ptr, scale_ptr):
    """fp32 W[rn, rk] of float8 e4m3 bytes [N, K] times scale[n]: (8 + m) * 2**(e - 10), or m * 2**-9 for e = 0."""
    byte = tl.load(weight_ptr + rn * K + rk, mask=mask, other=0).to(tl.int32)
    exponent = (byte >> 3) & 15
    mantissa = (byte & 7).to(tl.float32)
    magnitude = tl.where(exponent == 0, mantissa * 0.001953125,  # 2**-9
                         (mantissa + 8.0) * tl.exp2((exponent - 10).to(tl.float32)))
    value = tl.where((byte & 128) != 0, -magnitude, magnitude)
    return value * tl.load(scale_ptr + rn, mask=mask, other=0.0)


@triton.jit
def _decode(rn, rk, mask, N, K, w_ptr, m0_ptr, m1_ptr, m2_ptr, m3_ptr, f0, DECODE: tl.constexpr,
            BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, BITS: tl.constexpr, ZERO_PACKED: tl.constexpr,
            HAS_INPUT_SCALE: tl.constexpr):
    """fp32 weights W[rn, rk] (broadcastable index tiles, the general path) in the format DECODE names."""
    if DECODE == 0:  # DECODE_LUT4: m0 absmax, m1 code, m2 nested absmax, m3 nested code, f0 nested offset
        return _dequant_4bit(rn * K + rk, mask, w_ptr, m0_ptr, m1_ptr, m2_ptr, m3_ptr, f0, BLOCKSIZE, NESTED)
    elif DECODE == 1:  # DECODE_AFFINE: m0 scales, m1 qzeros or zeros, m2 g_idx, m3 input scale
        return _dequant_affine(rn, rk, mask, N, w_ptr, m0_ptr, m1_ptr, m2_ptr, m3_ptr, BITS, ZERO_PACKED,
                               HAS_INPUT_SCALE)
    else:  # DECODE_FP8: m0 the per-row scale
        return _dequant_fp8(rn, rk, mask, K, w_ptr, m0_ptr)


@triton.jit
def _dequant_byte_pairs(byte_index, scale, mask, packed_ptr, code_ptr, COMPUTE_DTYPE: tl.constexpr,
                        INTERPRET: tl.constexpr):
    """(even, odd) weights, in COMPUTE_DTYPE, of the bytes at ``byte_index``, each scaled by ``scale``.

    The aligned path (K % BLOCKSIZE == 0): each byte is loaded once for its two weights, and
    ``scale`` (one absmax per weight row of the step) is broadcast, not loaded per element.
    """
    byte = tl.load(packed_ptr + byte_index, mask=mask, other=0).to(tl.int32)
    even = tl.load(code_ptr + (byte >> 4), mask=mask, other=0.0) * scale
    odd = tl.load(code_ptr + (byte & 15), mask=mask, other=0.0) * scale
    return cast(even, COMPUTE_DTYPE, INTERPRET), cast(odd, COMPUTE_DTYPE, INTERPRET)


@triton.jit
def _even_odd_columns(x_ptr, rm, k_start, m_mask, k_end, stride_xm, COMPUTE_DTYPE: tl.constexpr,
                      INTERPRET: tl.constexpr, BLOCK_M: tl.constexpr, SUB: tl.constexpr):
    """x[rm, k_start:k_start + SUB] in COMPUTE_DTYPE, split into its even and odd columns [BLOCK_M, SUB // 2].

    One contiguous (vectorized, pipelinable) load, split in registers, rather than two stride-2 loads.
    """
    rk = k_start + tl.arange(0, SUB)
    x = cast(load_tile(x_ptr, rm, rk, m_mask, rk < k_end, stride_xm), COMPUTE_DTYPE, INTERPRET)
    return tl.split(tl.reshape(x, (BLOCK_M, SUB // 2, 2)))


@triton.jit
def lowbit_gemv_kernel(
    x_ptr,
    w_ptr,
    m0_ptr,
    m1_ptr,
    m2_ptr,
    m3_ptr,
    partial_ptr,
    M,
    N,
    K,
    stride_xm,
    f0,
    DECODE: tl.constexpr,
    BLOCKSIZE: tl.constexpr,
    NESTED: tl.constexpr,
    BITS: tl.constexpr,
    ZERO_PACKED: tl.constexpr,
    HAS_INPUT_SCALE: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    ALIGNED: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    STAGES: tl.constexpr,
):
    """partial[pid_k] (fp32 [SPLIT_K, M, N], contiguous) = x [M, K-slice] @ W[:, K-slice].T, no bias.

    STAGES > 1 software-pipelines the aligned loop (cp.async prefetch of the next steps' bytes and
    code values into shared memory, ~25 KB per stage at BLOCK_N=32, BLOCK_K=256); STAGES = 1 hides
    latency with many programs per SM instead. Which wins is the autotuner's call.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = rm < M
    n_mask = rn < N
    k_begin, k_end = split_k_range(pid_k, K, BLOCK_K, SPLIT_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if ALIGNED:
        # K % BLOCKSIZE == 0: rows start on block (and byte) boundaries, so a SUB-wide step (SUB
        # divides BLOCKSIZE) has one absmax per weight row, and its even and odd columns are the two
        # nibbles of [BLOCK_N, SUB // 2] bytes. Split boundaries are multiples of BLOCK_K, hence of SUB.
        SUB: tl.constexpr = BLOCK_K if BLOCK_K < BLOCKSIZE else BLOCKSIZE
        pair = tl.arange(0, SUB // 2)
        for k0 in tl.range(k_begin, k_end, BLOCK_K, num_stages=STAGES):
            for sub in tl.static_range(0, BLOCK_K, SUB):
                # A SUB-step is wholly inside [k_begin, k_end) or wholly past it (both ends are
                # multiples of SUB), so one mask per row covers it: uniform along the bytes of a row,
                # it lets their loads vectorize.
                row_ok = n_mask & ((rn * 0 + k0 + sub) < k_end)
                scale = _block_absmax(rn * (K // BLOCKSIZE) + (k0 + sub) // BLOCKSIZE, row_ok, m0_ptr,
                                      m2_ptr, m3_ptr, f0, NESTED)
                # Bytes as row start + arange (not flat index // 2), which the compiler sees as contiguous.
                byte_col = (k0 + sub) // 2 + pair
                w_even, w_odd = _dequant_byte_pairs(rn[:, None] * (K // 2) + byte_col[None, :], scale[:, None],
                                                    row_ok[:, None], w_ptr, m1_ptr, COMPUTE_DTYPE, INTERPRET)
                x_even, x_odd = _even_odd_columns(x_ptr, rm, k0 + sub, m_mask, k_end, stride_xm, COMPUTE_DTYPE,
                                                  INTERPRET, BLOCK_M, SUB)
                acc += tl.sum(x_even.to(tl.float32)[:, None, :] * w_even.to(tl.float32)[None, :, :]
                              + x_odd.to(tl.float32)[:, None, :] * w_odd.to(tl.float32)[None, :, :], axis=2)
    else:
        # At most 64 columns at a time: the [BLOCK_M, BLOCK_N, columns] product lives in registers,
        # and at 256 columns ptxas spilled (255 registers, BLOCK_M=4, BLOCK_N=32).
        GSUB: tl.constexpr = BLOCK_K if BLOCK_K < 64 else 64
        for k0 in tl.range(k_begin, k_end, BLOCK_K, num_stages=1):  # not pipelined, as in the GEMM
            for sub in tl.static_range(0, BLOCK_K, GSUB):
                rk = k0 + sub + tl.arange(0, GSUB)
                k_mask = rk < k_end
                x = cast(load_tile(x_ptr, rm, rk, m_mask, k_mask, stride_xm), COMPUTE_DTYPE, INTERPRET)
                w_mask = n_mask[:, None] & k_mask[None, :]
                w = _decode(rn[:, None], rk[None, :], w_mask, N, K, w_ptr, m0_ptr, m1_ptr, m2_ptr, m3_ptr, f0,
                            DECODE, BLOCKSIZE, NESTED, BITS, ZERO_PACKED, HAS_INPUT_SCALE)
                w = cast(w, COMPUTE_DTYPE, INTERPRET).to(tl.float32)
                acc += tl.sum(x.to(tl.float32)[:, None, :] * w[None, :, :], axis=2)
    tl.store(partial_ptr + (pid_k * M + rm[:, None]) * N + rn[None, :], acc, mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def split_k_sum_kernel(partial_ptr, bias_ptr, y_ptr, M, N, splits, stride_ym, HAS_BIAS: tl.constexpr,
                       INTERPRET: tl.constexpr, BLOCK_N: tl.constexpr):
    """y [M, N] (its dtype) = sum over s < splits of partial[s] (fp32 [*, M, N]) + bias, in split order."""
    row = tl.program_id(0)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = rn < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for split in range(0, splits):
        acc += tl.load(partial_ptr + (split * M + row) * N + rn, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_ym + rn, cast(acc, y_ptr.dtype.element_ty, INTERPRET), mask=mask)


@triton.jit
def lowbit_gemm_kernel(
    x_ptr,
    w_ptr,
    m0_ptr,
    m1_ptr,
    m2_ptr,
    m3_ptr,
    bias_ptr,
    y_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_ym,
    f0,
    DECODE: tl.constexpr,
    BLOCKSIZE: tl.constexpr,
    NESTED: tl.constexpr,
    BITS: tl.constexpr,
    ZERO_PACKED: tl.constexpr,
    HAS_INPUT_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    ALIGNED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    """y [M, N] = x [M, K] @ W.T (+ bias), W dequantized tile by tile in registers.

    y is x.dtype, or with SPLIT_K > 1 fp32 and zeroed: the grid's second axis splits K and the
    partial sums are added atomically.
    """
    rm, rn, m_mask, n_mask = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    k_begin, k_end = split_k_range(pid_k, K, BLOCK_K, SPLIT_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if ALIGNED:
        # As in the GEMV: per SUB-wide step one absmax per weight row; the even and odd columns
        # are two [SUB // 2, BLOCK_N] operands, multiplied with x's even and odd columns by two dots.
        SUB: tl.constexpr = BLOCK_K if BLOCK_K < BLOCKSIZE else BLOCKSIZE
        pair = tl.arange(0, SUB // 2)
        for k0 in range(k_begin, k_end, BLOCK_K):
            for sub in tl.static_range(0, BLOCK_K, SUB):
                col_ok = n_mask & ((rn * 0 + k0 + sub) < k_end)  # per weight row, as in the GEMV
                scale = _block_absmax(rn * (K // BLOCKSIZE) + (k0 + sub) // BLOCKSIZE, col_ok, m0_ptr,
                                      m2_ptr, m3_ptr, f0, NESTED)
                byte_col = (k0 + sub) // 2 + pair  # row start + arange: the loads vectorize
                w_even, w_odd = _dequant_byte_pairs(rn[None, :] * (K // 2) + byte_col[:, None], scale[None, :],
                                                    col_ok[None, :], w_ptr, m1_ptr, COMPUTE_DTYPE, INTERPRET)
                x_even, x_odd = _even_odd_columns(x_ptr, rm, k0 + sub, m_mask, k_end, stride_xm, COMPUTE_DTYPE,
                                                  INTERPRET, BLOCK_M, SUB)
                acc = dot_f32(x_even, w_even, acc, DOT_PRECISION, INTERPRET)
                acc = dot_f32(x_odd, w_odd, acc, DOT_PRECISION, INTERPRET)
    else:
        # Not software-pipelined: staging the per-element bytes and absmax of every stage in shared
        # memory needed up to 320 KiB (more than an H100 has) for the tile sizes the aligned path uses.
        # The affine decode (a g_idx, scale and zero gather per element) decodes 32 rows of the tile at a
        # time: whole [BLOCK_K, BLOCK_N] tiles spilled registers at the heuristic's sizes (sm_90 AOT check).
        GSUB: tl.constexpr = BLOCK_K if DECODE == 0 else (BLOCK_K if BLOCK_K < 32 else 32)
        for k0 in tl.range(k_begin, k_end, BLOCK_K, num_stages=1):
            for sub in tl.static_range(0, BLOCK_K, GSUB):
                rk = k0 + sub + tl.arange(0, GSUB)
                k_mask = rk < k_end
                x = cast(load_tile(x_ptr, rm, rk, m_mask, k_mask, stride_xm), COMPUTE_DTYPE, INTERPRET)
                w = _decode(rn[None, :], rk[:, None], k_mask[:, None] & n_mask[None, :], N, K, w_ptr, m0_ptr,
                            m1_ptr, m2_ptr, m3_ptr, f0, DECODE, BLOCKSIZE, NESTED, BITS, ZERO_PACKED,
                            HAS_INPUT_SCALE)
                w = cast(w, COMPUTE_DTYPE, INTERPRET)
                acc = dot_f32(x, w, acc, DOT_PRECISION, INTERPRET)
    store_split_tile(acc, bias_ptr, y_ptr, rm, rn, m_mask, n_mask, stride_ym, pid_k, HAS_BIAS, SPLIT_K, INTERPRET)


# ---- configs --------------------------------------------------------------------------------------

_ARGS = [
    "x_ptr", "w_ptr", "m0_ptr", "m1_ptr", "m2_ptr", "m3_ptr", "bias_ptr",
    "y_ptr", "M", "N", "K", "stride_xm", "stride_ym", "f0",
]
_GEMV_ARGS = [
    "x_ptr", "w_ptr", "m0_ptr", "m1_ptr", "m2_ptr", "m3_ptr", "partial_ptr",
    "M", "N", "K", "stride_xm", "f0",
]
GEMV_MAX_SPLIT_K = 16  # the largest SPLIT_K of the GEMV spaces: the workspace holds that many partials


def _gemv_spaces() -> dict[str, list]:
    # The GEMV loop is not software-pipelined (the AOT check shows no cp.async), so latency is hidden
    # by loads in flight: the unrolled SUB-steps of a wide BLOCK_K and many programs per SM (small
    # BLOCK_N, or SPLIT_K up to 16). Reasoned from Little's law, not yet measured on a GPU.
    cfg = autotune.config
    fast = [
        cfg(BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=sk, STAGES=1, num_warps=4, num_stages=1)
        for bn, bk in ((32, 128), (16, 256), (32, 256))
        for sk in (1, 4, 16)
    ] + [cfg(BLOCK_N=8, BLOCK_K=512, SPLIT_K=sk, STAGES=1, num_warps=4, num_stages=1) for sk in (1, 4)] + [
        cfg(BLOCK_N=bn, BLOCK_K=128, SPLIT_K=sk, STAGES=3, num_warps=4, num_stages=1)
        for bn in (16, 32)
        for sk in (4, 16)
    ]
    full = [
        cfg(BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=sk, STAGES=st, num_warps=w, num_stages=1)
        for bn in (8, 16, 32, 64, 128)
        for bk in (64, 128, 256, 512)
        for sk in (1, 2, 4, 8, 16)
        for w in (2, 4, 8)
        for st in (1, 2, 3)
        if bn * bk <= 16384
    ]
    return {"fast": fast, "max": full}


def _gemv_smem(meta: dict[str, Any], stages: int, named: dict[str, Any]) -> int:
    """Upper bound of one GEMV program's shared memory: with STAGES > 1, per stage the x slice, the
    packed bytes and both nibbles' fp32 code values (9 bytes per byte), and per-row block metadata."""
    x_bytes = named["x_ptr"].element_size()
    bm, bn, bk = meta["BLOCK_M"], meta["BLOCK_N"], meta["BLOCK_K"]
    steps = max(1, bk // meta["BLOCKSIZE"])
    return meta["STAGES"] * (bm * bk * x_bytes + bn * bk // 2 * 9 + 16 * bn * steps)


def gemm_smem(meta: dict[str, Any], stages: int, named: dict[str, Any]) -> int:
    """Shared memory of one GEMM program (an upper bound; the general path stages nothing).

    Per pipeline stage the x tile, the [BLOCK_K / 2, BLOCK_N] packed bytes and per-row block
    metadata; once, the dequantized dot operands. Checked against the compiler's figure for every
    config of the spaces by ``python -m tests.codegen.aot_sm90 --spaces max`` (Triton 3.9, sm_90).
    """
    x_bytes = named["x_ptr"].element_size()
    bm, bn, bk = meta["BLOCK_M"], meta["BLOCK_N"], meta["BLOCK_K"]
    steps = max(1, bk // meta["BLOCKSIZE"])  # SUB-steps of one BLOCK_K step, each with its own absmax
    operand_bytes = 2 * meta["COMPUTE_DTYPE"].primitive_bitwidth // 8
    return stages * (bm * bk * x_bytes + bk * bn // 2 + 8 * bn * steps) + bk * bn * operand_bytes


def _gemv_heuristic(named: dict[str, Any]) -> Any:
    block_n, block_k = 32, 256
    programs = triton.cdiv(named["N"], block_n) * triton.cdiv(named["M"], GEMV_MAX_M)
    # About 8 programs per SM: loads in flight, not pipelining, hide the memory latency here.
    split = common.split_k_for(programs, named["K"], block_k, named["x_ptr"].device, per_sm=8)
    return autotune.config(BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split, STAGES=1, num_warps=4, num_stages=1)


def _gemv_interpreter_config(named: dict[str, Any]) -> Any:
    # SPLIT_K=2 so the atomic split-K path is what CI exercises by default.
    return autotune.config(BLOCK_N=32, BLOCK_K=32, SPLIT_K=2, STAGES=1, num_warps=4, num_stages=1)


def _gemm_heuristic(named: dict[str, Any]) -> Any:
    """The shared GEMM heuristic for the LUT decode; smaller tiles for the affine and float8 decodes, which
    decode in 32-row steps and spilled registers at the shared tiles (sm_90 AOT check: 128x128x64 with 3-bit
    fields, 128x128x32 in fp32, 16x64x128 split-K). LUT4 is told apart by its packed size: half a byte a
    weight (affine: int32 words; float8: a byte a weight)."""
    w = named["w_ptr"]
    if w.dtype == torch.uint8 and w.numel() < named["N"] * named["K"]:
        return autotune.gemm_heuristic(named)
    m = named["M"]
    if m <= 16:
        return autotune.config(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=3)
    block_m = 32 if named["x_ptr"].element_size() == 4 else 64  # fp32's IEEE dot needs more registers
    return autotune.config(BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=3)


@functools.cache  # built on first use: nothing is benchmarked or read from disk at import
def _tuned(variant: str) -> autotune.TunedKernel:
    if variant == "gemv":
        return autotune.TunedKernel(
            "lowbit_gemv", lowbit_gemv_kernel, _GEMV_ARGS, _gemv_spaces(), _gemv_heuristic,
            _gemv_interpreter_config, _gemv_smem, key_names=["N", "K"],
        )
    if variant == "gemm_split_k":
        return autotune.TunedKernel(
            "lowbit_gemm_split_k", lowbit_gemm_kernel, _ARGS, common.split_k_spaces(autotune.gemm_spaces()),
            common.split_k_heuristic(_gemm_heuristic), common.split_k_interpreter_config, gemm_smem,
            autotune.gemm_useful, key_names=["N", "K"],
            reset_to_zero=["y_ptr"],
        )
    return autotune.TunedKernel(
        "lowbit_gemm", lowbit_gemm_kernel, _ARGS, autotune.gemm_spaces(), _gemm_heuristic,
        autotune.gemm_interpreter_config, gemm_smem, autotune.gemm_useful, key_names=["N", "K"],
    )


# ---- entry point ----------------------------------------------------------------------------------

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
    *,
    variant: str = "auto",
    config: Any = None,
) -> torch.Tensor:
    """``x @ dequantize_4bit(W).T + bias`` in x.dtype; see the module docstring for the layout.

    variant: ``auto`` (GEMV for M <= GEMV_MAX_M, split-K GEMM for M <= SPLIT_K_MAX_M, else GEMM),
        ``gemv``, ``gemm_split_k`` or ``gemm``.
    config: force one launch config (a triton.Config or a dict of meta-parameters and num_warps /
        num_stages), bypassing tuning; meant for tests and benchmarks.
    """
    n, k = int(out_features), int(in_features)
    if n <= 0 or k <= 0:
        raise ValueError(f"{FN}: out_features and in_features must be positive, got {n}, {k}")
    _check_options(FN, variant, compute_dtype)
    if not isinstance(blocksize, int) or blocksize <= 0 or blocksize & (blocksize - 1):
        raise ValueError(f"{FN}: blocksize must be a positive power of two, got {blocksize!r}")
    if (nested_absmax is None) != (nested_code is None):
        raise ValueError(f"{FN}: nested_absmax and nested_code must be given together (double quantization)")
    common.check_runnable(FN, lowbit_gemm_kernel, x, packed, absmax, code, nested_absmax, nested_code, bias)
    common.check_dtype(FN, "x", x, common.FLOAT_DTYPES)
    x2 = common.as_2d_input(FN, x, k)
    common.check_index_range(FN, n, k, x2.shape[0])

    # quant_storage may view the packed bytes as another dtype; the bytes are what matter.
    packed_u8 = common.flat(packed)
    if packed_u8.dtype != torch.uint8:
        packed_u8 = packed_u8.view(torch.uint8)
    common.check_numel(FN, "packed (as bytes)", packed_u8, (n * k + 1) // 2, at_least=True)
    nblocks = -(-n * k // blocksize)
    code = common.flat(code, torch.float32)
    common.check_numel(FN, "code", code, 16)
    absmax = common.flat(absmax)
    common.check_numel(FN, "absmax", absmax, nblocks, at_least=True)
    nested = nested_absmax is not None
    if nested:
        common.check_dtype(FN, "absmax (double-quantized)", absmax, (torch.uint8,))
        nested_code = common.flat(nested_code, torch.float32)
        common.check_numel(FN, "nested_code", nested_code, 256)
        nested_absmax = common.flat(nested_absmax, torch.float32)
        common.check_numel(FN, "nested_absmax", nested_absmax, -(-nblocks // NESTED_BLOCKSIZE), at_least=True)
    else:
        common.check_dtype(FN, "absmax", absmax, common.FLOAT_DTYPES)
        absmax = common.flat(absmax, torch.float32)
        # Unused pointers still need a tensor; absmax is a harmless stand-in.
        nested_absmax = nested_code = absmax
    bias = common.check_bias(FN, bias, n)
    # The aligned path needs whole blocks per row and dot operands at least 16 deep (SUB // 2 >= 16).
    aligned = k % blocksize == 0 and blocksize >= 32
    consts = dict(DECODE=DECODE_LUT4, BLOCKSIZE=blocksize, NESTED=nested, BITS=4, ZERO_PACKED=False,
                  HAS_INPUT_SCALE=False, ALIGNED=aligned)
    return _launch(x, x2, packed_u8, (absmax, code, nested_absmax, nested_code), bias, float(nested_offset), n, k,
                   compute_dtype, variant, config, consts)


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
    *,
    variant: str = "auto",
    config: Any = None,
) -> torch.Tensor:
    """``x @ W.T + bias`` in x.dtype for an affine group-wise W in GPTQ's layout (``formats/packed_affine.py``):
    qweight int32 [K * bits / 32, N], qzeros int32 [groups, N * bits / 32] (``zero - 1``) or zeros float16
    [groups, N], scales float16 [groups, N], g_idx int32 [K], input_scale [K] or None. variant / config as
    :func:`linear_4bit`."""
    name = "linear_affine"
    n, k = int(out_features), int(in_features)
    if n <= 0 or k <= 0:
        raise ValueError(f"{name}: out_features and in_features must be positive, got {n}, {k}")
    _check_options(name, variant, compute_dtype)
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"{name}: bits {bits!r} is not allowed; allowed: 2, 3, 4, 8")
    if (qzeros is None) == (zeros is None):
        raise ValueError(f"{name}: exactly one of qzeros (packed zero points) and zeros (float16) is expected")
    run, words = (32, 3) if bits == 3 else (32 // bits, 1)
    if k % run or (qzeros is not None and n % run):
        raise ValueError(f"{name}: in_features {k} (and out_features {n} with packed zeros) must be multiples of {run}")
    common.check_runnable(name, lowbit_gemm_kernel, x, qweight, qzeros, zeros, scales, g_idx, input_scale, bias)
    common.check_dtype(name, "x", x, common.FLOAT_DTYPES)
    common.check_dtype(name, "qweight", qweight, (torch.int32,))
    common.check_dtype(name, "g_idx", g_idx, (torch.int32,))
    x2 = common.as_2d_input(name, x, k)
    common.check_index_range(name, n, k, x2.shape[0])
    qweight = qweight.contiguous()
    common.check_numel(name, "qweight", qweight, k // run * words * n)
    g_idx = g_idx.contiguous()
    common.check_numel(name, "g_idx", g_idx, k)
    scales = scales.contiguous()
    zero_tensor = (qzeros if qzeros is not None else zeros).contiguous()
    groups = scales.shape[0]
    common.check_numel(name, "scales", scales, groups * n)
    common.check_numel(name, "zeros", zero_tensor, groups * (n // run * words if qzeros is not None else n))
    if input_scale is not None:
        input_scale = input_scale.reshape(-1).to(torch.float32).contiguous()
        common.check_numel(name, "input_scale", input_scale, k)
    bias = common.check_bias(name, bias, n)
    consts = dict(DECODE=DECODE_AFFINE, BLOCKSIZE=64, NESTED=False, BITS=bits, ZERO_PACKED=qzeros is not None,
                  HAS_INPUT_SCALE=input_scale is not None, ALIGNED=False)
    metadata = (scales, zero_tensor, g_idx, input_scale if input_scale is not None else scales)
    return _launch(x, x2, qweight, metadata, bias, 0.0, n, k, compute_dtype, variant, config, consts)


def linear_float8(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                  compute_dtype: torch.dtype, *, variant: str = "auto", config: Any = None) -> torch.Tensor:
    """``x @ (float8(weight) * scale[:, None]).T + bias`` in x.dtype: weight uint8 [N, K] (e4m3 bytes), scale
    float32 [N] (``formats/float8.py``). variant / config as :func:`linear_4bit`."""
    name = "linear_float8"
    _check_options(name, variant, compute_dtype)
    common.check_runnable(name, lowbit_gemm_kernel, x, weight, scale, bias)
    common.check_dtype(name, "x", x, common.FLOAT_DTYPES)
    common.check_dtype(name, "weight", weight, (torch.uint8,))
    if weight.dim() != 2:
        raise ValueError(f"{name}: weight has shape {tuple(weight.shape)}, expected (out_features, in_features)")
    n, k = weight.shape
    x2 = common.as_2d_input(name, x, k)
    common.check_index_range(name, n, k, x2.shape[0])
    scale = scale.reshape(-1).to(torch.float32).contiguous()
    common.check_numel(name, "scale", scale, n)
    bias = common.check_bias(name, bias, n)
    consts = dict(DECODE=DECODE_FP8, BLOCKSIZE=64, NESTED=False, BITS=8, ZERO_PACKED=False, HAS_INPUT_SCALE=False,
                  ALIGNED=False)
    return _launch(x, x2, weight.contiguous(), (scale, scale, scale, scale), bias, 0.0, n, k, compute_dtype, variant,
                   config, consts)


def _check_options(fn: str, variant: str, compute_dtype: torch.dtype) -> None:
    """ValueError naming ``fn`` for a variant or compute dtype the family does not have."""
    if variant not in VARIANTS:
        raise ValueError(f"{fn}: variant {variant!r} is not allowed; allowed: {', '.join(VARIANTS)}")
    if compute_dtype not in common.FLOAT_DTYPES:
        raise ValueError(f"{fn}: compute_dtype {compute_dtype} is not allowed; allowed: float16, bfloat16, float32")


def _launch(x: torch.Tensor, x2: torch.Tensor, w: torch.Tensor, metadata: tuple[torch.Tensor, ...],
            bias: torch.Tensor | None, f0: float, n: int, k: int, compute_dtype: torch.dtype, variant: str,
            config: Any, consts: dict[str, Any]) -> torch.Tensor:
    """Pick the variant for M and run it with the decode ``consts`` name; y in x.dtype, x's leading shape.

    Without a forced config, the variant's config and grids are decided once per call signature (sizes,
    dtypes, device, constexprs, autotune mode) and kept as a :class:`_Plan` in the tuned kernel's ``plans``:
    later calls with that signature allocate the output and launch, nothing else.
    """
    m = x2.shape[0]
    out_shape = (*x.shape[:-1], n)
    if m == 0:
        return x.new_zeros(out_shape)
    if variant == "auto":
        variant = "gemv" if m <= GEMV_MAX_M else "gemm_split_k" if m <= common.SPLIT_K_MAX_M else "gemm"
    tuned = _tuned(variant)
    interpret = autotune.interpreting()
    signature = None
    if config is None:
        signature = (autotune.mode_setting(), interpret, m, n, k, x2.dtype, compute_dtype, x2.device,
                     None if bias is None else bias.dtype, w.dtype, *(t.dtype for t in metadata), *consts.values())
        plan = tuned.plans.get(signature)
        if plan is not None:
            return plan(x2, w, metadata, bias, f0, out_shape)
    forced = autotune.as_config(config)
    consts = dict(consts, HAS_BIAS=bias is not None, COMPUTE_DTYPE=common.tl_dtype(compute_dtype), INTERPRET=interpret)
    if variant == "gemv":
        block_m = min(common.next_power_of_2(m), GEMV_MAX_M)
        consts = {key: v for key, v in consts.items() if key != "HAS_BIAS"}
        consts["BLOCK_M"] = block_m
        if forced is not None and "STAGES" not in forced.kwargs:
            consts["STAGES"] = 1  # a forced config from before the pipelined option
        if forced is not None and not 1 <= forced.kwargs.get("SPLIT_K", 1) <= GEMV_MAX_SPLIT_K:
            raise ValueError(f"{FN}: config SPLIT_K must be 1..{GEMV_MAX_SPLIT_K}, got {forced.kwargs['SPLIT_K']}")

        def grid(meta: dict[str, Any]) -> tuple[int, ...]:
            return (triton.cdiv(m, block_m), triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])
    else:
        consts["DOT_PRECISION"] = common.dot_precision(compute_dtype, interpret)
        if variant == "gemm":
            consts["SPLIT_K"] = 1
            grid = common.grouped_grid(m, n)
        else:
            grid = common.split_k_grid(m, n)
    # The GEMV's workspace has room for the most splits any config asks for: it is chosen (or tuned) in launch.
    out = _main_output(variant, GEMV_MAX_SPLIT_K, m, n, x2)
    used = tuned.launch(grid, _main_arguments(variant, x2, w, metadata, bias, out, m, n, k, f0), m, config=forced,
                        **consts)
    plan = _Plan(variant, tuned.decided(used, grid, consts), m, n, k, used.kwargs.get("SPLIT_K", 1), interpret)
    if signature is not None:
        tuned.remember_plan(signature, plan)
    return plan.finish(out, bias, x2.dtype, out_shape)


def _main_output(variant: str, splits: int, m: int, n: int, x2: torch.Tensor) -> torch.Tensor:
    """What the variant's kernel writes: the GEMV's fp32 partial sums [splits, m, n], the split-K GEMM's zeroed
    fp32 sums (added atomically), the GEMM's y in x.dtype."""
    if variant == "gemv":
        return torch.empty((splits, m, n), device=x2.device, dtype=torch.float32)
    if variant == "gemm_split_k":
        return torch.zeros((m, n), device=x2.device, dtype=torch.float32)
    return torch.empty((m, n), device=x2.device, dtype=x2.dtype)


def _main_arguments(variant: str, x2: torch.Tensor, w: torch.Tensor, metadata: tuple[torch.Tensor, ...],
                    bias: torch.Tensor | None, out: torch.Tensor, m: int, n: int, k: int, f0: float) -> tuple:
    """The variant's kernel arguments (``_GEMV_ARGS`` or ``_ARGS``)."""
    if variant == "gemv":
        return (x2, w, *metadata, out, m, n, k, x2.stride(0), f0)
    bias_arg = bias if bias is not None else metadata[0]  # an unused pointer still needs a tensor
    return (x2, w, *metadata, bias_arg, out, m, n, k, x2.stride(0), out.stride(0), f0)


class _Plan:
    """One call signature's launches, decided: the variant's kernel (config, grid, constexprs) and its epilogue.

    ``plan(x2, w, metadata, bias, f0, out_shape)`` allocates the output, launches and finishes (the GEMV's
    split sum, the split-K GEMM's cast); :func:`_launch` makes a plan from its first launch and runs the rest
    of that call with ``finish``, so a planned call and the first one run the same launches.
    """

    __slots__ = ("variant", "main", "m", "n", "k", "splits", "interpret")

    def __init__(self, variant: str, main: autotune.DecidedLaunch, m: int, n: int, k: int, splits: int,
                 interpret: bool) -> None:
        self.variant, self.main, self.m, self.n, self.k = variant, main, m, n, k
        self.splits, self.interpret = splits, interpret

    def __call__(self, x2: torch.Tensor, w: torch.Tensor, metadata: tuple[torch.Tensor, ...],
                 bias: torch.Tensor | None, f0: float, out_shape: tuple[int, ...]) -> torch.Tensor:
        out = _main_output(self.variant, self.splits, self.m, self.n, x2)
        self.main(_main_arguments(self.variant, x2, w, metadata, bias, out, self.m, self.n, self.k, f0))
        return self.finish(out, bias, x2.dtype, out_shape)

    def finish(self, out: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype,
               out_shape: tuple[int, ...]) -> torch.Tensor:
        """y (``out_shape``, ``dtype``) from the main launch's output: the GEMV's partial sums added in split
        order with the bias (a second launch), the split-K GEMM's fp32 sums cast, the GEMM's y as it is."""
        if self.variant == "gemm":
            return out.reshape(out_shape)
        if self.variant == "gemm_split_k":
            return out.to(dtype).reshape(out_shape)
        m, n = self.m, self.n
        y = torch.empty(out_shape, device=out.device, dtype=dtype)  # contiguous: row r of [m, n] at r * n
        block_n = 128
        autotune.run_kernel(
            split_k_sum_kernel, (m, -(-n // block_n)),  # not triton.cdiv: ~2 us on the host
            (out, bias if bias is not None else out, y, m, n, self.splits, n),
            HAS_BIAS=bias is not None, INTERPRET=self.interpret, BLOCK_N=block_n,
        )
        return y
