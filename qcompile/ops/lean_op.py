"""Ops on the per-call path, registered without ``torch.library.custom_op``'s per-call wrappers.

``custom_op`` runs every call through Python wrappers: its autograd kernel (with grad off too, to decide
that no graph is needed), a redispatch, and an aliasing check of the outputs. For ``quantized_linear``
(eight arguments, grad off, as inductor's compiled graphs call it) that was 17 us per call on a 2-core
Sapphire Rapids CPU, more than the C++ kernel of a 256x256 NF4 linear. An op defined with
``Library.define``, one kernel below autograd (``CompositeExplicitAutograd``) and an ``Autograd`` kernel
that goes straight below autograd unless a graph is needed costs 5.5 us there (both timed against the op's
Python body called directly; ``python -m benchmarks.call_overhead`` shows the effect: the op, lookup
included, now costs less than a format op registered with ``custom_op``).

The op stays a ``torch.library`` op with a fake implementation, checked by ``opcheck`` like the others;
only its registration differs. Use it for ops that compiled graphs call once per linear per step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def define_lean_op(
    library: torch.library.Library,
    name: str,
    schema: str,
    impl: Callable[..., Any],
    fake: Callable[..., Any],
    backward: Callable[..., tuple[Any, ...]],
    setup_context: Callable[[Any, tuple[Any, ...], Any], None],
) -> torch._ops.OpOverload:
    """Define ``<library's namespace>::name`` with ``schema`` (its argument list and return, without the name),
    run by ``impl`` on every device, traced by ``fake``, and differentiated as ``torch.library.register_autograd``
    would: ``setup_context(ctx, inputs, output)`` and ``backward(ctx, *grads)`` returning one gradient (or None)
    per input. A graph is recorded only when grad is enabled and a tensor input requires grad; otherwise the
    call goes below autograd at once. Returns the op's default overload."""
    library.define(name + schema)
    library.impl(name, impl, "CompositeExplicitAutograd")
    torch.library.register_fake(f"{library.ns}::{name}", fake, lib=library)
    op = getattr(getattr(torch.ops, library.ns), name).default
    # Callers may leave trailing defaulted arguments out; setup_context and backward see every input.
    defaults = tuple(argument.default_value for argument in op._schema.arguments)

    class _Function(torch.autograd.Function):
        @staticmethod
        def forward(*inputs: Any) -> Any:
            return op(*inputs)  # grad is off inside forward: the Autograd kernel below goes straight down

        @staticmethod
        def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
            setup_context(ctx, inputs, output)

        @staticmethod
        def backward(ctx: Any, *grads: Any) -> Any:
            return backward(ctx, *grads)

    _Function.__name__ = _Function.__qualname__ = f"{name}_function"

    def autograd_kernel(*inputs: Any) -> Any:
        if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in inputs):
            return _Function.apply(*inputs, *defaults[len(inputs):])
        with torch._C._AutoDispatchBelowAutograd():
            return op(*inputs)

    library.impl(name, autograd_kernel, "Autograd")
    return op
