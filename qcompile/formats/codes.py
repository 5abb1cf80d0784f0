"""Code tables of the bitsandbytes formats, reproduced bit for bit.

* the 16-value NF4 and FP4 tables (``bitsandbytes.functional.get_4bit_type``), in nibble order;
* the decision boundaries bitsandbytes' torch ``quantize_4bit`` kernel uses to pick a nibble;
* the 256-value signed 8-bit "dynamic" code of double quantization
  (``bitsandbytes.functional.create_dynamic_map()``), and the 65536-entry lookup
  table through which bitsandbytes' CPU library (``quantize_cpu``) maps a
  normalized value to a code index.

Everything is built with the same float32 operations bitsandbytes uses, because the
nibble / byte chosen for a value sitting on a decision boundary depends on the last
bit of those boundaries. Tables are cached per device; callers must not mutate them
(the ``PackedWeight`` classes store clones).
"""

from __future__ import annotations

import functools

import torch

# NF4: quantiles of N(0, 1) normalized to [-1, 1] (QLoRA). Hardcoded in bitsandbytes too.
NF4_VALUES: tuple[float, ...] = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)

# FP4 (1 sign, 2 exponent, 1 mantissa bit, bitsandbytes' bias) in bit-pattern order,
# before normalization by the largest magnitude (12). Index 8 (sign bit, zero) holds +0.0:
# bitsandbytes writes it as the integer `-0`, which is 0, and checkpoints store that bit pattern.
FP4_RAW_VALUES: tuple[float, ...] = (
    0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0,
    0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0,
)  # fmt: skip

# The nibble of the k-th smallest FP4 value, i.e. ``torch.argsort(fp4_code)`` on CPU as
# bitsandbytes computes it. Fixed here because the two zeros (nibbles 0 and 8) tie and an
# unstable sort on another device could order them differently; bitsandbytes' choice
# (a zero maps to nibble 0, +0.0) is what checkpoints contain.
FP4_SORTED_NIBBLES: tuple[int, ...] = (11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3)

FOUR_BIT_KINDS = ("nf4", "fp4")

# Resolution of bitsandbytes' CPU quantization lookup table: [-1, 1] in 65536 steps.
DYNAMIC_LUT_SIZE = 65536


def _check_kind(kind: str) -> None:
    if kind not in FOUR_BIT_KINDS:
        raise ValueError(f"quant_type: unknown 4-bit format {kind!r}; allowed: nf4, fp4")


@functools.cache
def _fourbit_code(kind: str, device: torch.device) -> torch.Tensor:
    _check_kind(kind)
    values = NF4_VALUES if kind == "nf4" else FP4_RAW_VALUES
    data = torch.tensor(values, dtype=torch.float32)
    # Same float32 division as get_4bit_type (FP4's 1/12 steps are not exact in fp32).
    data.div_(data.abs().max())
    return data.to(device)


def fourbit_code(kind: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16 float32 values of ``kind`` ("nf4" or "fp4"), indexed by nibble. Do not mutate."""
    return _fourbit_code(kind, torch.device(device))


@functools.cache
def _fourbit_bounds(kind: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    code = _fourbit_code(kind, torch.device("cpu"))
    if kind == "nf4":
        order = torch.arange(16)  # the NF4 table is already sorted
    else:
        order = torch.tensor(FP4_SORTED_NIBBLES, dtype=torch.int64)
    ordered = code[order]
    bounds = (ordered[:-1] + ordered[1:]) / 2  # float32 midpoints, as bitsandbytes computes them
    nibble_of_rank = None if kind == "nf4" else order.to(torch.uint8).to(device)
    return bounds.to(device), nibble_of_rank


def fourbit_bounds(kind: str, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor | None]:
    """(15 float32 decision boundaries between the sorted code values, nibble of each rank).

    A normalized value ``v`` gets rank ``r`` = number of boundaries strictly below ``v``
    (``torch.bucketize(v, bounds)``, ties go to the lower value) and nibble
    ``nibble_of_rank[r]``; ``nibble_of_rank`` is None for NF4, whose table is sorted.
    """
    return _fourbit_bounds(kind, torch.device(device))


@functools.cache
def _dynamic_code(device: torch.device) -> torch.Tensor:
    # create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8), step for step:
    # for each exponent i, the float32 means of linspace(0.1, 1, 2**i + 1) scaled by 10**(i-6),
    # positive and negative; plus 0 and 1; sorted. 2 * 127 + 2 = 256 values, no padding.
    data: list[float] = []
    max_exponent_bits, non_sign_bits = 7, 7
    for i in range(max_exponent_bits):
        items = 2 ** (i + non_sign_bits - max_exponent_bits) + 1
        boundaries = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        scale = 10 ** (-(max_exponent_bits - 1) + i)
        data += (scale * means).tolist()
        data += (-scale * means).tolist()
    data.append(0)
    data.append(1.0)
    data.sort()
    return torch.tensor(data, dtype=torch.float32).to(device)


def dynamic_code(device: torch.device | str = "cpu") -> torch.Tensor:
    """bitsandbytes' 256-value signed dynamic 8-bit code (sorted float32), used for nested absmax."""
    return _dynamic_code(torch.device(device))


@functools.cache
def _dynamic_lut(device: torch.device) -> torch.Tensor:
    code = _dynamic_code(torch.device("cpu"))
    midpoints = 0.5 * (code[:-1] + code[1:])
    # LUT slot i stands for the float32 value -1 + (2 * i) / 65535 and holds the index of
    # the first code value whose upper midpoint is not below it (nearest code, ties down).
    slots = torch.arange(DYNAMIC_LUT_SIZE, dtype=torch.float32)
    values = -1.0 + (2.0 * slots) / (DYNAMIC_LUT_SIZE - 1)
    lut = torch.searchsorted(midpoints, values, right=False).to(torch.uint8)
    return lut.to(device)


def dynamic_lut(device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8[65536]: the code index bitsandbytes' CPU ``quantize_blockwise`` gives each LUT slot."""
    return _dynamic_lut(torch.device(device))
