"""@triton.jit helpers shared by the kernel families (no kernels here)."""

import triton
import triton.language as tl


@triton.jit
def cast(x, DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """``x.to(DTYPE)`` rounding to nearest even, also under the interpreter.

    Triton 3.9's interpreter truncates fp32 -> bf16 (the GPU rounds to nearest even). Under the
    interpreter the rounding is done on the bits first (0x7FFF plus the lowest kept bit, then clear
    the low half), after which the cast is exact. NaN/Inf payloads are not special-cased.
    """
    if INTERPRET and DTYPE == tl.bfloat16:
        xf = x.to(tl.float32)
        bits = xf.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True).to(tl.bfloat16)
    else:
        return x.to(DTYPE)


@triton.jit
def rint(x):
    """Round fp32 to the nearest integer, ties to even (torch.round), for |x| < 2**22.

    Adding and subtracting 1.5 * 2**23 leaves only integer bits under round-to-nearest-even fp32 adds.
    libdevice's rint would do, but the interpreter has no libdevice; callers launch with
    enable_fp_fusion=False so the add is not fused into a preceding multiply (an FMA would round
    the product and the sum once, not twice as torch does).
    """
    return (x + 12582912.0) - 12582912.0


@triton.jit
def grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(rm, rn, m_mask, n_mask): rows and columns of this program's [BLOCK_M, BLOCK_N] output tile.

    Grouped program order: GROUP_M row tiles walk the N tiles together, so weight tiles stay in L2.
    The launch grid is one program per tile, ``cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N)``.
    """
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * grid_n
    first_m = (pid // width) * GROUP_M
    group_size = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_size
    pid_n = (pid % width) // group_size
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return rm, rn, rm < M, rn < N


@triton.jit
def load_tile(ptr, rows, cols, row_mask, col_mask, stride_row):
    """[rows, cols] tile of a row-major matrix with unit column stride; 0 where masked."""
    return tl.load(ptr + rows[:, None] * stride_row + cols[None, :], mask=row_mask[:, None] & col_mask[None, :],
                   other=0)


@triton.jit
def load_tile_t(ptr, rows, cols, row_mask, col_mask, stride_row):
    """[cols, rows] tile (transposed) of a row-major matrix with unit column stride; 0 where masked.

    For W [N, K]: ``load_tile_t(w_ptr, rn, rk, ...)`` is the [BLOCK_K, BLOCK_N] operand of ``x @ W.T``.
    """
    return tl.load(ptr + rows[None, :] * stride_row + cols[:, None], mask=col_mask[:, None] & row_mask[None, :],
                   other=0)


@triton.jit
def dot_f32(a, b, acc, DOT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    """``acc + a @ b`` accumulated in fp32.

    Under the interpreter both operands go to fp32 first: its bf16 tl.dot multiplies the raw uint16
    bit patterns. 16-bit x 16-bit products are exact in fp32, so products and fp32 sum are the same.
    """
    if INTERPRET:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION, out_dtype=tl.float32)


@triton.jit
def store_tile(acc, bias_ptr, y_ptr, rm, rn, m_mask, n_mask, stride_ym, HAS_BIAS: tl.constexpr,
               INTERPRET: tl.constexpr):
    """GEMM epilogue: ``acc`` (fp32) plus bias[n] in fp32, cast to y's dtype, stored to y [M, N]."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + rm[:, None] * stride_ym + rn[None, :]
    tl.store(y_ptrs, cast(acc, y_ptr.dtype.element_ty, INTERPRET), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def split_k_range(pid_k, K, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    """(k_begin, k_end): split ``pid_k``'s share of [0, K), a whole number of BLOCK_K steps.

    Both ends are multiples of BLOCK_K (or K itself); the last splits may be empty.
    """
    k_chunk = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_begin = pid_k * k_chunk
    return k_begin, tl.minimum(k_begin + k_chunk, K)


@triton.jit
def store_split_tile(acc, bias_ptr, y_ptr, rm, rn, m_mask, n_mask, stride_ym, pid_k, HAS_BIAS: tl.constexpr,
                     SPLIT_K: tl.constexpr, INTERPRET: tl.constexpr):
    """Split-K GEMM epilogue: store like ``store_tile`` when SPLIT_K == 1; otherwise atomically add the
    fp32 partial sum into y (fp32, zeroed by the caller), the bias added by split 0 only."""
    if SPLIT_K == 1:
        store_tile(acc, bias_ptr, y_ptr, rm, rn, m_mask, n_mask, stride_ym, HAS_BIAS, INTERPRET)
    else:
        if HAS_BIAS:
            bias = tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)
            acc += bias[None, :] * (pid_k == 0).to(tl.float32)
        tl.atomic_add(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc, mask=m_mask[:, None] & n_mask[None, :])
