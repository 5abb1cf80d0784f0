"""Shared settings of the bitsandbytes 4-bit formats (NF4 and FP4)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from qcompile.dtypes import FLOAT_DTYPES
from qcompile.formats.scheme import Scheme, check_dtype, check_type

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
