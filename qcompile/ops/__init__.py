"""qcompile's torch.library ops (namespace ``qcompile``), registered when this package is imported.

The rewrite pass emits ``quantized_linear`` (the float parameter in, its packed form found per
call); that op runs one of the format ops below, which take the packed tensors themselves.

Each op file defines one op, its fake (meta) implementation, its autograd formula (x and
bias only: quantized weights are frozen) and a plain-torch reference implementation
(``<op>_reference``) that the Triton kernels in ``qcompile.codegen`` are tested against, and binds
the scheme types it runs (``bindings.py``: the op and its argument list, in one place).
"""

from qcompile.ops import (
    bindings,
    expect_quantized,
    linear_4bit,
    linear_affine,
    linear_float8,
    linear_int8,
    linear_int8_weight_only,
    linear_w8a8_dynamic,
    quantized_linear,
)
from qcompile.ops.bindings import binding, linear, op_arguments
from qcompile.ops.dispatch import KERNELS, check_kernels, use_triton

__all__ = [
    "KERNELS",
    "binding",
    "bindings",
    "linear",
    "op_arguments",
    "check_kernels",
    "expect_quantized",
    "linear_4bit",
    "linear_affine",
    "linear_float8",
    "linear_int8",
    "linear_int8_weight_only",
    "linear_w8a8_dynamic",
    "quantized_linear",
    "use_triton",
]
