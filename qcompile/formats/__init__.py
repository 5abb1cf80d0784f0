"""Quantization formats. Each file defines one scheme and registers it."""

from qcompile.formats.fp4 import FP4
from qcompile.formats.int8 import Int8
from qcompile.formats.int8_weight_only import Int8WeightOnly
from qcompile.formats.nf4 import NF4
from qcompile.formats.scheme import PackedWeight, Scheme, scheme_from_dict
from qcompile.formats.w8a8_dynamic import W8A8Dynamic

__all__ = ["FP4", "NF4", "Int8", "Int8WeightOnly", "W8A8Dynamic", "PackedWeight", "Scheme", "scheme_from_dict"]
