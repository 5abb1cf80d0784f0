"""Low-bit integers packed into int32 words, as the GPTQ checkpoint format stores them.

GPTQ's ``qweight`` packs along in_features (the rows of the [in_features, out_features] integer
matrix) and ``qzeros`` along out_features (its columns); both use the same word layout along the
packed axis:

* 2, 4, 8 bits: ``32 / bits`` values per word, value ``i`` of a word in bits
  ``[i * bits, (i + 1) * bits)`` (the first value in the lowest bits).
* 3 bits: 32 values in 3 words (96 bits), value ``i`` in bits ``[3 i, 3 i + 3)`` of the 96-bit
  little-endian concatenation of the three words; values 10 and 21 straddle two words.

Both reduce to one rule: the values of a run are laid out back to back from bit 0 of the run's
first word. Words are int32 (their bit pattern; the sign is irrelevant).
"""

from __future__ import annotations

import torch

BITS = (2, 3, 4, 8)


def run_length(bits: int) -> tuple[int, int]:
    """``(values, words)`` of the smallest run that fills whole words: (16, 1), (32, 3), (8, 1), (4, 1)."""
    if bits not in BITS:
        raise ValueError(f"bits: {bits} is not allowed; allowed: {', '.join(map(str, BITS))}")
    return (32, 3) if bits == 3 else (32 // bits, 1)


def pack_int32(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Pack integers in ``[0, 2**bits)`` along ``dim`` (whose size must be a multiple of the run length)."""
    per_run, words = run_length(bits)
    moved = values.movedim(dim, -1).to(torch.int64)
    size = moved.shape[-1]
    if size % per_run:
        raise ValueError(f"{size} values do not fill whole {bits}-bit runs of {per_run}")
    runs = moved.reshape(*moved.shape[:-1], size // per_run, per_run)
    # Bit offset of each value within its run; the run as `words` 32-bit lanes, summed in int64.
    offsets = torch.arange(per_run, device=values.device) * bits
    out = torch.zeros((*runs.shape[:-1], words), dtype=torch.int64, device=values.device)
    for word in range(words):
        low = offsets - 32 * word  # the value's offset relative to this word (may be negative or >= 32)
        inside = (low > -bits) & (low < 32)
        shifted = torch.where(low >= 0, runs << low.clamp(min=0), runs >> (-low).clamp(min=0))
        out[..., word] = (shifted * inside).sum(-1) & 0xFFFFFFFF
    out = out.reshape(*out.shape[:-2], -1)
    out = torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)
    return out.movedim(-1, dim).contiguous()  # row-major, as checkpoints store it and the CPU kernel reads it


def unpack_int32(words: torch.Tensor, bits: int, dim: int, count: int | None = None) -> torch.Tensor:
    """Inverse of :func:`pack_int32`: int32 values in ``[0, 2**bits)``, ``count`` of them along ``dim``."""
    per_run, per_words = run_length(bits)
    moved = words.movedim(dim, -1).to(torch.int64) & 0xFFFFFFFF
    if moved.shape[-1] % per_words:
        raise ValueError(f"{moved.shape[-1]} words do not hold whole {bits}-bit runs of {per_words} words")
    runs = moved.reshape(*moved.shape[:-1], -1, per_words)
    offsets = torch.arange(per_run, device=words.device) * bits
    mask = (1 << bits) - 1
    values = torch.zeros((*runs.shape[:-1], per_run), dtype=torch.int64, device=words.device)
    for word in range(per_words):
        low = offsets - 32 * word
        inside = (low > -bits) & (low < 32)
        lane = runs[..., word : word + 1]
        part = torch.where(low >= 0, lane >> low.clamp(min=0), lane << (-low).clamp(min=0))
        values |= part * inside
    values = (values & mask).reshape(*values.shape[:-2], -1)
    if count is not None:
        values = values[..., :count]
    return values.to(torch.int32).movedim(-1, dim)
