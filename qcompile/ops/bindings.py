"""Which op runs a packed weight, and its argument list: one binding per scheme type, declared beside its op.

Formats (``qcompile.formats``) hold numerics and named tensors only and know nothing of ops. Each op
file binds the scheme types it serves with :func:`bind`, giving the op and a function from a packed
weight to the op's arguments; that function is the one place the op's argument order is written
down outside its schema. Everything that calls a format op (``quantized_linear``, :func:`linear`,
tests, benchmarks) goes through :func:`op_arguments`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import torch

from qcompile.formats import PackedWeight, Scheme

# (tensors after x and before bias, constants after bias and before kernels)
Arguments = tuple[tuple[torch.Tensor | None, ...], tuple[Any, ...]]


@dataclasses.dataclass(frozen=True)
class OpBinding:
    """A format op and how a packed weight fills its arguments: ``op(x, *tensors, bias, *constants, kernels)``."""

    op: torch._ops.OpOverload
    arguments: Callable[[Any], Arguments]


_BINDINGS: dict[type[Scheme], OpBinding] = {}
_RESOLVED: dict[type[Scheme], OpBinding] = {}  # scheme type -> its binding, found through the MRO once


def bind(scheme_types: type[Scheme] | tuple[type[Scheme], ...], op: Any, arguments: Callable[[Any], Arguments]) -> None:
    """Run weights packed with ``scheme_types`` (a class or a tuple; subclasses included) through ``op``
    (a ``custom_op`` or its overload), called with ``arguments(packed)``."""
    overload = getattr(op, "_opoverload", op)
    for scheme_type in scheme_types if isinstance(scheme_types, tuple) else (scheme_types,):
        if scheme_type in _BINDINGS:
            raise ValueError(f"scheme {scheme_type.__name__} is bound to an op twice")
        _BINDINGS[scheme_type] = OpBinding(overload, arguments)
    _RESOLVED.clear()  # a type resolved to a base class's binding may now have its own


def binding(scheme: Scheme) -> OpBinding:
    """The binding of ``scheme``'s type (or its nearest bound base class); ValueError when there is none."""
    found = _RESOLVED.get(type(scheme))  # every quantized linear call asks: skip the import and the MRO walk
    if found is not None:
        return found
    import qcompile.ops  # noqa: F401  (the op files bind on import; kept out of `import qcompile`)

    for cls in type(scheme).__mro__:
        if cls in _BINDINGS:
            _RESOLVED[type(scheme)] = _BINDINGS[cls]
            return _BINDINGS[cls]
    raise ValueError(f"scheme {scheme.kind!r}: no qcompile op runs it (no binding in qcompile/ops)")


def op_arguments(packed: PackedWeight, x: torch.Tensor, bias: torch.Tensor | None, kernels: str) -> tuple[Any, ...]:
    """The full argument tuple of ``binding(packed.scheme).op`` for ``x @ W.T + bias``."""
    tensors, constants = binding(packed.scheme).arguments(packed)
    return (x, *tensors, bias, *constants, kernels)


def linear(packed: PackedWeight, x: torch.Tensor, bias: torch.Tensor | None = None,
           kernels: str = "auto") -> torch.Tensor:
    """``F.linear(x, W, bias)`` with the quantized ``W`` of ``packed``, through its registered op
    (differentiable in ``x`` and ``bias``; ``kernels``: "auto", "reference" or "triton")."""
    return binding(packed.scheme).op(*op_arguments(packed, x, bias, kernels))


@functools.cache
def op_body(op: torch._ops.OpOverload) -> Callable[..., torch.Tensor]:
    """The Python function a ``torch.library.custom_op`` was made from (the op itself if that is not found):
    callers already inside an op's kernel use it to skip a second trip through the dispatcher."""
    from torch._library.custom_ops import OPDEFS

    opdef = OPDEFS.get(op._schema.name)
    return getattr(opdef, "_init_fn", None) or op
