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
