"""Never silently unquantized: tell the user when a module whose weight qcompile quantized runs in float.

A model compiled with qcompile can still run its linears in float, without qcompile seeing them:

* dynamo gives up on a frame (its recompile limit, say, during ``generate()`` with changing shapes)
  and runs the frame as plain Python: every module in it runs eagerly, in float;
* dynamo runs a module call eagerly inside a compiled region (a frame it skips);
* another backend compiles the model: the same instance compiled again with inductor, or an outer
  ``torch.compile`` around a function compiled with qcompile (the outer one wins). transformers'
  own auto-compile of ``model.__call__`` (static cache on CUDA) is not one of them: ``Module.__call__``
  is a frame dynamo skips, so a ``model.forward`` compiled with qcompile stays in charge (tested).

Every linear module whose weight qcompile quantized, or whose weight the config quantizes though no
graph has shown it to qcompile yet (a frame dynamo runs as Python from the start), gets a forward
pre-hook (:class:`FallbackGuard`):

* While dynamo traces (for any backend) it puts ``qcompile::expect_quantized`` into the graph.
  qcompile's backend removes those nodes (:func:`strip_expect_quantized`); any other backend runs
  them, and they report.
* When it runs eagerly, it asks dynamo whether a compiled region is active (dynamo's frame callback
  is set): then dynamo chose to run this module without compiling it, and it reports. It also reports
  when a frame qcompile compiled is on the Python stack although the callback is unset: torch runs
  code inside a compiled frame with dynamo disabled, as eager activation checkpointing does when
  dynamo cannot trace the checkpointed layer (transformers 5.25 with the ``kernels`` package: every
  checkpointed layer ran in float without a report before this check). A plain eager call (no
  ``torch.compile`` on the stack, or a ``torch.compiler.disable`` region under another backend's
  frame) is the user's float model and is left alone, unless the weight was released
  (``release_weights=True``): then it always raises, since the float data is gone.

Reporting follows the backend option ``on_fallback``: ``"error"`` (default) raises a RuntimeError
naming the module, ``"warn"`` warns once per compile (a :class:`FloatFallbackWarning`, naming the first
module) and lets it run in float. Hooks added after a graph was traced do not cause a recompile
(dynamo does not guard on module hooks by default: ``torch._dynamo.config.skip_nnmodule_hook_guards``).
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import warnings
import weakref
from typing import Any

import torch
from torch import fx, nn

log = logging.getLogger("qcompile")

ON_FALLBACK = ("error", "warn")

_REMEDY = (
    "To stay quantized: for generate(), compile model.forward with dynamic=True, or use the static cache "
    "(README, 'Generation'); compile the model with qcompile only, not again with another backend; raise "
    "torch._dynamo.config.recompile_limit if shapes really vary that much. "
    "To run in float anyway, compile with options={'on_fallback': 'warn'}."
)


class FloatFallbackWarning(UserWarning):
    """A module whose weight qcompile quantized ran in float (``on_fallback="warn"``)."""


@dataclasses.dataclass(eq=False)
class FallbackPolicy:
    """What one compile asked for on fallback; shared by the guards it installed (they warn once together)."""

    on_fallback: str
    quantize_trainable: bool = False
    warned: bool = False


def report(name: str, how: str, policy: FallbackPolicy | str, released: bool = False) -> None:
    """Raise or warn that ``name`` ran in float (``how`` says why), per ``policy``."""
    mode = policy if isinstance(policy, str) else policy.on_fallback
    if released:
        raise RuntimeError(
            f"qcompile: {name} holds no float data (packed by qcompile.quantize or released by "
            f"release_weights=True), but its module ran {how}; run the model through "
            "torch.compile(..., backend='qcompile'), or keep a float model (no quantize(), no release_weights)"
        )
    module = name.rpartition(".")[0] or name
    message = f"qcompile: {module} ran in float although qcompile quantized its weight {name}: it ran {how}. {_REMEDY}"
    if mode == "error":
        raise RuntimeError(message)
    if isinstance(policy, FallbackPolicy):
        if policy.warned:
            return
        policy.warned = True
    log.warning("%s", message)
    warnings.warn(message, FloatFallbackWarning, stacklevel=3)


def _compiled_region_active() -> bool:
    """Whether dynamo's frame callback is set: ``torch.compile`` code is on the stack but this frame runs as Python.

    The callback is None in plain eager code and inside ``torch.compiler.disable``; it is False while dynamo
    runs a frame it gave up on (recompile limit), and the backend's callback in frames it skips.
    """
    get = getattr(torch._C._dynamo.eval_frame, "get_eval_frame_callback", None)
    return get is not None and get() is not None


# The code objects of the frames qcompile's backend compiled (weak: code objects come and go with functions).
_QCOMPILE_CODES: weakref.WeakSet = weakref.WeakSet()


def note_compiled_frame() -> None:
    """Called by the backend while dynamo compiles a frame: remember that frame's code as qcompile's."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        _QCOMPILE_CODES.add(InstructionTranslator.current_tx().output.root_tx.f_code)
    except (AttributeError, AssertionError, RuntimeError, ImportError, TypeError):
        pass  # not inside dynamo (a graph built by hand): there is no frame to remember


def _inside_qcompile_frame() -> bool:
    """Whether a frame dynamo runs as qcompile compiled it (its transformed code) is on the Python stack."""
    if not _QCOMPILE_CODES:
        return False
    try:
        from torch._dynamo.utils import orig_code_map
    except ImportError:
        return False
    frame = sys._getframe(2)
    while frame is not None:
        original = orig_code_map.get(frame.f_code)
        if original is not None and original in _QCOMPILE_CODES:
            return True
        frame = frame.f_back
    return False


_EAGER = ("outside a qcompile graph (without torch.compile, or dynamo ran this code as plain Python: "
          "TORCH_LOGS=recompiles,graph_breaks says why)")
_FOREIGN = "in a graph compiled by another torch.compile backend (a nested torch.compile: the outer one wins)"


class FallbackGuard:
    """The forward pre-hook on a module owning a quantized weight (see the module docstring).

    While dynamo traces the hook it reads only ``name``, ``released`` and ``on_fallback`` (strings and a bool,
    guarded by value), never ``policy``: a new policy object from a later compile must not fail the guards
    of the graphs traced before it.
    """

    def __init__(self, name: str, policy: FallbackPolicy, weight: torch.Tensor, released: bool = False):
        self.name = name
        self.on_fallback = policy.on_fallback
        self.policy = policy
        self.weight = weakref.ref(weight)
        self.released = released

    def _planned_float(self) -> bool:
        """Whether the plan would keep the weight float now: it requires grad while grad is enabled."""
        weight = self.weight()
        trainable = weight is not None and weight.requires_grad and torch.is_grad_enabled()
        return trainable and not self.policy.quantize_trainable

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if torch.compiler.is_compiling():
            x = next((a for a in args if isinstance(a, torch.Tensor)), None)
            if x is not None:
                mode = "released" if self.released else self.on_fallback
                torch.ops.qcompile.expect_quantized.default(x, self.name, mode)
            return
        if self.released:
            report(self.name, _EAGER, self.policy, True)
        elif not self._planned_float() and (_compiled_region_active() or _inside_qcompile_frame()):
            report(self.name, _EAGER, self.policy)


# Module -> its guard, so that a recompile or a second compile updates the guard instead of adding one.
_GUARDS: weakref.WeakKeyDictionary[nn.Module, FallbackGuard] = weakref.WeakKeyDictionary()


def guard(module: nn.Module, name: str, weight: torch.Tensor, policy: FallbackPolicy, released: bool = False) -> None:
    """Install (or update) ``module``'s guard; ``name`` is the name of ``weight``, its quantized weight."""
    hook = _GUARDS.get(module)
    if hook is None:
        hook = _GUARDS[module] = FallbackGuard(name, policy, weight, released)
        module.register_forward_pre_hook(hook)
        return
    hook.policy = policy
    # Assign only on change: these are what traced graphs guard on.
    if (hook.name, hook.on_fallback) != (name, policy.on_fallback):
        hook.name, hook.on_fallback = name, policy.on_fallback
    if released and not hook.released:
        hook.released = True


def strip_expect_quantized(gm: fx.GraphModule) -> int:
    """Remove the ``expect_quantized`` nodes the guards put into a graph qcompile compiles; returns how many."""
    import qcompile.ops  # noqa: F401  (registers the op: explain() may run before anything imported it)
    from qcompile.passes.sites import body_call

    target = torch.ops.qcompile.expect_quantized.default
    nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is target]
    for node in nodes:
        gm.graph.erase_node(node)
    if nodes:
        gm.recompile()
    # Inside the bodies whose linears qcompile rewrites (activation checkpoints); markers in other
    # higher-order ops' bodies stay, and report: qcompile does not quantize there.
    bodies = [body for node in gm.graph.nodes if (body := body_call(gm, node)) is not None]
    return len(nodes) + sum(strip_expect_quantized(body) for body in bodies)


def foreign_graph_ran(name: str, on_fallback: str) -> None:
    """``expect_quantized``'s body: it only runs in graphs another backend compiled.

    ``on_fallback`` is the option, or ``"released"`` when the weight's float data was released."""
    report(name, _FOREIGN, on_fallback, released=on_fallback == "released")
