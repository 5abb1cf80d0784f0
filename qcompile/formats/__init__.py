"""Quantization formats. Each file defines one scheme and registers it."""

from qcompile.formats.affine import Affine, AffineScheme
from qcompile.formats.awq import AWQ
from qcompile.formats.float8 import Float8, PackedFloat8
from qcompile.formats.fp4 import FP4
from qcompile.formats.gptq import GPTQ
from qcompile.formats.hqq import HQQ
from qcompile.formats.int8 import Int8
from qcompile.formats.int8_weight_only import Int8WeightOnly
from qcompile.formats.nf4 import NF4
from qcompile.formats.packed4bit import Packed4bit
from qcompile.formats.packed_affine import PackedAffine
from qcompile.formats.packed_int8 import PackedInt8, PackedInt8PerChannel
from qcompile.formats.quanto import Quanto
from qcompile.formats.scheme import PackedWeight, Scheme, scheme_from_dict
from qcompile.formats.w8a8_dynamic import W8A8Dynamic

# `pack` lives in qcompile.formats.pack (exported as qcompile.pack); it is not re-exported
# here so that the name keeps meaning the submodule.
__all__ = [
    "AWQ",
    "Affine",
    "AffineScheme",
    "PackedAffine",
    "FP4",
    "Float8",
    "PackedFloat8",
    "GPTQ",
    "HQQ",
    "NF4",
    "Int8",
    "Int8WeightOnly",
    "W8A8Dynamic",
    "PackedWeight",
    "Packed4bit",
    "PackedInt8",
    "PackedInt8PerChannel",
    "Quanto",
    "Scheme",
    "scheme_from_dict",
]
