"""Shared settings of the bitsandbytes 4-bit formats (NF4 and FP4)."""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, ClassVar

import torch

from qcompile.dtypes import FLOAT_DTYPES, dtype_name
from qcompile.formats.scheme import Scheme, check_dtype, check_type

if TYPE_CHECKING:
    from qcompile.formats.packed4bit import Packed4bit

QUANT_STORAGE_DTYPES = (torch.uint8, torch.int8, torch.float16, torch.bfloat16, torch.float32)
# bitsandbytes' nested (double) quantization always uses blocks of 256 absmax values.
NESTED_BLOCKSIZE = 256


@dataclasses.dataclass(frozen=True)
class FourBitScheme(Scheme):
    """Blockwise absmax 4-bit quantization over the flattened weight, two codes per byte.

    blocksize: elements per absmax block, a power of two from 32 to 4096.
    double_quant: quantize the fp32 absmax values again (8-bit dynamic code, blocks of 256, mean offset).
    compute_dtype: dtype of the dequantized weight and the matmul (accumulation is fp32).
    quant_storage: dtype the packed bytes are viewed as, for FSDP-style sharding; bytes are identical.
    """

    blocksize: int = 64
    double_quant: bool = False
    compute_dtype: torch.dtype = torch.float32
    quant_storage: torch.dtype = torch.uint8

    dtype_fields: ClassVar = {"compute_dtype": FLOAT_DTYPES, "quant_storage": QUANT_STORAGE_DTYPES}

    def __post_init__(self) -> None:
        check_type(self, "blocksize", int)
        if not (32 <= self.blocksize <= 4096) or self.blocksize & (self.blocksize - 1):
            raise ValueError(
                f"{self.kind}.blocksize: {self.blocksize} is not allowed; "
                "allowed: a power of two from 32 to 4096 (32, 64, ..., 4096)"
            )
        check_type(self, "double_quant", bool)
        check_dtype(self, "compute_dtype")
        check_dtype(self, "quant_storage")

    # ---- numerics ----------------------------------------------------------
    def unsupported_reason(self, shape: tuple[int, ...], dtype: torch.dtype) -> str | None:
        """Adds bitsandbytes' quant_storage limit: the packed bytes must fill whole storage elements."""
        reason = super().unsupported_reason(shape, dtype)
        if reason is not None:
            return reason
        packed_bytes = (math.prod(shape) + 1) // 2
        itemsize = torch.empty((), dtype=self.quant_storage).element_size()
        if packed_bytes % itemsize:
            return (
                f"{packed_bytes} packed bytes are not a multiple of quant_storage "
                f"{dtype_name(self.quant_storage)} ({itemsize} bytes)"
            )
        return None

    def pack(self, weight: torch.Tensor, name: str = "weight") -> Packed4bit:
        """Quantize ``weight`` [out_features, in_features] exactly as ``bitsandbytes.functional.quantize_4bit``."""
        from qcompile.formats.packed4bit import Packed4bit

        return Packed4bit.quantize(weight, self, name)

    def bits_per_weight(self, shape: tuple[int, int]) -> float:
        """Storage bits per weight element, code tables included; see :func:`fourbit_storage_bytes`."""
        numel = math.prod(shape)
        return 8 * fourbit_storage_bytes(numel, self.blocksize, self.double_quant) / numel


def fourbit_storage_bytes(numel: int, blocksize: int, double_quant: bool) -> int:
    """Bytes of a packed 4-bit weight of ``numel`` elements, everything the op reads included.

    packed codes ceil(numel/2) + absmax (4 bytes per block, or 1 byte per block with double
    quant plus 4 bytes per 256 blocks of nested absmax) + code tables (the 16-entry fp32
    4-bit code, 64 bytes, and with double quant the 256-entry fp32 nested code, 1024 bytes).
    The tables are counted once per weight, i.e. amortized over its ``numel`` elements.
    The nested offset (one float passed to the op as a constant) is not counted.
    """
    blocks = -(-numel // blocksize)
    total = (numel + 1) // 2 + 16 * 4
    if double_quant:
        total += blocks + 4 * -(-blocks // NESTED_BLOCKSIZE) + 256 * 4
    else:
        total += 4 * blocks
    return total


def fourbit_bits_formula(blocksize: int = 64, double_quant: bool = True) -> tuple[str, float]:
    """The asymptotic bits per weight of a 4-bit format as a formula and its value.

    ``fourbit_bits_formula(64, True)`` -> ("4 + 8/64 + 32/(64*256)", 4.127). The exact figure
    for a given weight adds the code tables, ``8 * (64 + 1024) / numel`` bits with double
    quant (``8 * 64 / numel`` without); :meth:`FourBitScheme.bits_per_weight` includes them.
    """
    if double_quant:
        text = f"4 + 8/{blocksize} + 32/({blocksize}*{NESTED_BLOCKSIZE})"
        value = 4 + 8 / blocksize + 32 / (blocksize * NESTED_BLOCKSIZE)
    else:
        text = f"4 + 32/{blocksize}"
        value = 4 + 32 / blocksize
    return text, value
