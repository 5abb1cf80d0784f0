"""The "cuda" rounding rule of blockwise quantization: the bytes bitsandbytes' CUDA kernels write.

See :mod:`qcompile.formats.blockwise` for both rules and how one is picked; this file holds the CUDA one
(``kQuantizeBlockwise`` / ``dQuantizeNF4`` / ``dQuantizeFP4`` / ``dQuantize<0>`` of csrc/kernels.cu, built with
``--use_fast_math``), emulated in plain torch so it runs, and is tested, on the CPU.
"""

from __future__ import annotations

import functools

import torch

from qcompile.formats.blockwise import _pack_nibbles, _ranks
from qcompile.formats.codes import dynamic_code
from qcompile.formats.scheme import check_finite

# Smallest normal float32. The CUDA kernels are built with --use_fast_math: operands and results
# below it in magnitude are flushed to zero.
_FLT_MIN = 2.0**-126
# dQuantizeNF4's comparison literals as the compiler rounds them to float32 (checked against the
# immediates of the sm_90 SASS of bitsandbytes 0.50.2), ascending: the nibble is the number of
# them strictly below the scaled value.
_CUDA_NF4_THRESHOLD_BITS = (
    0xBF591CD9, 0xBF1C5270, 0xBEEB8480, 0xBEADEA76, 0xBE703CEC, 0xBE0D38BC, 0xBD3A7871,
    0x3D22FAFF, 0x3DF64863, 0x3E5067E0, 0x3E9582D4, 0x3EC753F9, 0x3F006D03, 0x3F248DAF, 0x3F5C89D9,
)  # fmt: skip
# dQuantizeFP4's literals on |v|, ascending (0.00260417f, 0.0859375f, 0.20833333f, 0.29166667f,
# 0.4166667f, 0.583333f, 0.8333333f), and the 3 magnitude bits of the number of them below |v|.
_CUDA_FP4_THRESHOLD_BITS = (0x3B2AAAB9, 0x3DB00000, 0x3E555555, 0x3E955555, 0x3ED55556, 0x3F155550, 0x3F555555)
_CUDA_FP4_MAGNITUDE_NIBBLES = (0b000, 0b001, 0b110, 0b111, 0b100, 0b101, 0b010, 0b011)
_FP4_SIGN = 0b1000



def _float32_from_bits(bits: tuple[int, ...]) -> torch.Tensor:
    signed = [b - (1 << 32) if b >= 1 << 31 else b for b in bits]
    return torch.tensor(signed, dtype=torch.int32).view(torch.float32)


@functools.cache
def _cuda_fourbit_rule(kind: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    if kind == "nf4":
        return _float32_from_bits(_CUDA_NF4_THRESHOLD_BITS).to(device), None
    if kind == "fp4":
        magnitude = torch.tensor(_CUDA_FP4_MAGNITUDE_NIBBLES, dtype=torch.uint8)
        return _float32_from_bits(_CUDA_FP4_THRESHOLD_BITS).to(device), magnitude.to(device)
    raise ValueError(f"quant_type: unknown 4-bit format {kind!r}; allowed: nf4, fp4")


@functools.cache
def _dynamic_midpoints(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(the first 255 dynamic code values, the 255 float32 midpoints ``(code[k] + code[k + 1]) * 0.5``)."""
    code = dynamic_code(torch.device("cpu"))
    midpoints = (code[:-1] + code[1:]) * 0.5  # float32 add, then an exact halving, as dQuantize
    return code[:-1].contiguous().to(device), midpoints.to(device)


def flush_subnormals(x: torch.Tensor) -> torch.Tensor:
    """``x`` with subnormal values replaced by 0 (a new tensor), as the fast-math CUDA kernels read them."""
    return x.masked_fill(x.abs() < _FLT_MIN, 0.0)


def _cuda_reciprocal(absmax: torch.Tensor) -> torch.Tensor:
    """``1 / absmax`` of flushed, non-negative absmax values, as the kernels' ``rcp.approx.ftz.f32``: inf for
    0, and 0 for absmax above 2**126 (a subnormal result is flushed). The correctly rounded reciprocal: the
    hardware's approximation may differ by one ulp (see the module docstring)."""
    inv = 1.0 / absmax
    return inv.masked_fill_(inv < _FLT_MIN, 0.0)


def _cuda_nibbles(scaled: torch.Tensor, kind: str) -> torch.Tensor:
    """dQuantizeNF4 / dQuantizeFP4 of float32 ``scaled`` (NaN gives nibble 0), as uint8."""
    thresholds, magnitude_nibbles = _cuda_fourbit_rule(kind, scaled.device)
    if magnitude_nibbles is None:
        return _ranks(scaled, thresholds)
    nibbles = magnitude_nibbles[_ranks(scaled.abs(), thresholds).long()]
    # `v < 0` under flush-to-zero: a negative subnormal product counts as +0, so no sign bit.
    nibbles |= (scaled <= -_FLT_MIN).to(torch.uint8) << 3
    return nibbles


def quantize_4bit_cuda(flat: torch.Tensor, blocksize: int, kind: str, name: str,
                        chunk_elements: int) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_4bit under the "cuda" rule (see the module docstring)."""
    device = flat.device
    n = flat.numel()
    blocks = -(-n // blocksize)
    absmax = torch.empty(blocks, dtype=torch.float32, device=device)
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=device)
    chunk_blocks = max(1, chunk_elements // blocksize)
    half = blocksize // 2  # blocksize is even, so every block starts on a byte boundary
    # float16 widens to normal float32 values only: nothing to flush.
    flush = flat.dtype != torch.float16
    for b0 in range(0, blocks, chunk_blocks):
        b1 = min(b0 + chunk_blocks, blocks)
        start, stop = b0 * blocksize, min(b1 * blocksize, n)
        if stop - start == (b1 - b0) * blocksize:
            x = flat[start:stop].float()
        else:
            # The kernel reads 0.0 past the end: the partial last block is padded, not special-cased,
            # and with an odd count the pad element's nibble is stored too.
            x = torch.zeros((b1 - b0) * blocksize, dtype=torch.float32, device=device)
            x[:stop - start] = flat[start:stop]
        x = x.view(b1 - b0, blocksize)
        if flush:
            x = flush_subnormals(x)
        block_absmax = x.abs().amax(dim=1)
        absmax[b0:b1] = block_absmax
        scaled = x * _cuda_reciprocal(block_absmax)[:, None]
        nibbles = _cuda_nibbles(scaled, kind)
        byte_stop = (stop + 1) // 2
        packed[b0 * half:byte_stop] = _pack_nibbles(nibbles.view(-1))[:byte_stop - b0 * half]
    check_finite(absmax, name)
    return packed, absmax


def dynamic_code_index_cuda(x: torch.Tensor) -> torch.Tensor:
    """int64 index of the dynamic code value bitsandbytes' CUDA ``dQuantize<0>`` picks for each float32 ``x``.

    The kernel's binary search over the sorted code, from index 127 in steps of 64 down to 1,
    ends on an even index ``p`` having learnt ``j``, the number of ``code[0..254]`` strictly below
    ``x``: ``p = j`` or ``j - 1``. Its last comparison against the float32 midpoint of
    ``code[j - 1]`` and ``code[j]`` picks the nearer of the two, a tie going to ``p`` (the even one).
    NaN (an all-zero block's ``0 * inf``) fails every comparison and gets index 0.
    """
    lows, midpoints = _dynamic_midpoints(x.device)
    flat = x.reshape(-1)
    below = torch.searchsorted(lows, flat)  # j: code values strictly below x (side="left")
    lower = (below - 1).clamp_(min=0)
    midpoint = midpoints[lower]
    # j == 0 needs no case of its own: x <= code[0] < midpoints[0], so it stays at index 0.
    up = (flat > midpoint) | ((flat == midpoint) & (below % 2 == 0))
    index = lower + up
    return index.masked_fill_(flat.isnan(), 0).view(x.shape)


def nested_codes_cuda(padded: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 codes, nested absmax) of [blocks, 256] centered absmax values under ``dQuantize<0>``."""
    padded = flush_subnormals(padded)
    nested_absmax = padded.abs().amax(dim=1)
    return dynamic_code_index_cuda(padded * _cuda_reciprocal(nested_absmax)[:, None]).to(torch.uint8), nested_absmax
