"""The names of the parameters a dynamo graph reads, exactly as ``named_parameters()`` gives them.

Dynamo hands the backend each parameter as a placeholder whose ``grapharg.source`` is a chain of
source objects, e.g. for transformers 5.24, whose ``forward`` is wrapped by a decorator taking
``*args``::

    L['args'] -> [0] -> <nn.Module> -> ._modules -> ['model'] -> <nn.Module> -> ... -> ._parameters -> ['weight']

The root of the chain is whatever held the model (``L['self']``, ``L['args'][0]``, a global, a
closure cell, an item of a list of models). Names are relative to the *first* ``nn.Module`` in the
chain, the one dynamo marks with an ``NNModuleSource``:

1. The chain is walked as source objects (never as text), giving the structural name
   (``model.layers.0.q_proj.weight``).
2. The first module itself is looked up from dynamo's frame when dynamo is tracing, and every
   name the parameter has under it (``named_parameters(remove_duplicate=False)``) is an alias:
   a tied head is found as both ``model.embed_tokens.weight`` and ``lm_head.weight``.

A parameter whose chain has a step this module does not understand gets no name (an empty
``WeightNames``), which the plan shows as unresolved; it is never given a guessed name.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import types
from typing import Any

from torch import fx, nn
from torch._dynamo import source as dynamo_source
from torch._dynamo.eval_frame import OptimizedModule

log = logging.getLogger("qcompile")

_MISSING = object()


@dataclasses.dataclass(frozen=True)
class WeightNames:
    """Every qualified name of one parameter under the model's first ``nn.Module`` (primary first).

    ``names`` is empty when the name could not be resolved. ``root`` is that first module when it
    could be found (needed to reach the modules owning the parameter), else None. ``in_submodule_frame``:
    the graph's frame is a submodule's (see :func:`enclosing_model`), so dynamo may run the graph on the
    weights of the submodule's siblings.
    """

    names: tuple[str, ...] = ()
    root: nn.Module | None = dataclasses.field(default=None, compare=False, repr=False)
    in_submodule_frame: bool = dataclasses.field(default=False, compare=False)

    @property
    def resolved(self) -> bool:
        return bool(self.names)

    @property
    def module_names(self) -> tuple[str, ...]:
        """The module part of every name (``lm_head`` for ``lm_head.weight``)."""
        return tuple(name.rpartition(".")[0] for name in self.names)

    def owners(self) -> list[tuple[str, nn.Module]]:
        """``(module name, module)`` for each module holding the parameter under one of its names."""
        if self.root is None:
            return []
        out = []
        for module_name in self.module_names:
            try:
                out.append((module_name, self.root.get_submodule(module_name)))
            except AttributeError:
                continue
        return out


def parameter_aliases(root: nn.Module) -> dict[int, list[str]]:
    """``id(parameter)`` -> every name it has under ``root`` (``named_parameters(remove_duplicate=False)``).

    ``_orig_mod`` parts (a submodule replaced by its ``torch.compile`` wrapper) are left out."""
    names: dict[int, list[str]] = {}
    for name, param in root.named_parameters(remove_duplicate=False):
        name = _without_compile_wrappers(name)
        if name not in names.setdefault(id(param), []):
            names[id(param)].append(name)
    return names


def _without_compile_wrappers(name: str) -> str:
    return ".".join(part for part in name.split(".") if part != "_orig_mod")


def primary_first(primary: str | None, aliases: list[str]) -> tuple[str, ...]:
    """``aliases`` with ``primary`` first when it is one of them."""
    ordered = [primary] if primary in aliases else []
    return tuple(ordered + [a for a in aliases if a not in ordered])


def _chain(source: Any) -> list[Any]:
    """The source and its bases, root first."""
    chain = []
    while source is not None:
        chain.append(source)
        source = getattr(source, "base", None) if isinstance(source, dynamo_source.ChainedSource) else None
    return chain[::-1]


def _structural_parts(steps: list[Any]) -> list[str] | None:
    """Name parts for the steps after the first module's marker, or None for a step not understood."""
    parts: list[str] = []
    i = 0
    while i < len(steps):
        step = steps[i]
        if isinstance(step, dynamo_source.NNModuleSource):
            i += 1  # a marker: the value of its base is a module
            continue
        if isinstance(step, dynamo_source.AttrSource) and step.member in ("_modules", "_parameters", "_buffers"):
            # module._modules['fc'] / ._parameters['weight']: the key is the name part.
            key = steps[i + 1] if i + 1 < len(steps) else None
            if not isinstance(key, dynamo_source.DictGetItemSource) or not isinstance(key.index, str):
                return None
            parts.append(key.index)
            i += 2
            continue
        if isinstance(step, dynamo_source.AttrSource):
            parts.append(step.member)  # a specialized module's attribute: L['self'].fc.weight
        elif isinstance(step, dynamo_source.GetItemSource) and isinstance(step.index, (int, str)):
            parts.append(str(step.index))
        else:
            return None
        i += 1
    return parts


def _evaluate(steps: list[Any], f_locals: dict[str, Any], f_globals: dict[str, Any]) -> Any:
    """The value of a source chain in dynamo's root frame, or _MISSING for a step not understood."""
    value: Any = _MISSING
    for step in steps:
        if isinstance(step, dynamo_source.LocalSource):
            value = f_locals.get(step.local_name, _MISSING)
            if step.is_derefed_cell_contents and isinstance(value, types.CellType):
                value = value.cell_contents
        elif isinstance(step, dynamo_source.GlobalSource):
            value = f_globals.get(step.global_name, _MISSING)
        elif isinstance(step, dynamo_source.NNModuleSource):
            continue
        elif isinstance(step, dynamo_source.AttrSource):
            value = getattr(value, step.member, _MISSING)
        elif isinstance(step, (dynamo_source.GetItemSource, dynamo_source.DictGetItemSource)):
            try:
                value = value[step.index]
            except (KeyError, IndexError, TypeError):
                return _MISSING
        else:
            return _MISSING
        if value is _MISSING:
            return _MISSING
    return value


def _dynamo_frame() -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The locals and globals of the frame dynamo is compiling, when called from inside a backend."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
        root = tx.output.root_tx
        return root.f_locals, root.f_globals
    except (AttributeError, AssertionError, RuntimeError, ImportError):
        return None


def enclosing_model(module: nn.Module) -> tuple[nn.Module, str]:
    """The outermost module running on the Python stack that contains ``module``, and ``module``'s name in it.

    Dynamo compiles a submodule's forward as a frame of its own when the model's frame breaks inside
    it, and when each layer is compiled on its own (regional compilation, ``layer.compile()``). Names
    relative to that submodule (``self_attn.q_proj``) would miss rules written for the model
    (``model.layers.0.*``); the model is still running, in eager frames further up the stack, as the
    ``self`` of its forward. ``torch.compile``'s wrapper (``OptimizedModule``) is not a model, and its
    ``_orig_mod`` is left out of names. ``(module, "")`` when nothing encloses it.
    """
    best: tuple[nn.Module, str] = (module, "")
    frame = sys._getframe(1)
    seen: set[int] = set()
    while frame is not None:
        candidate = frame.f_locals.get("self") if frame.f_code.co_varnames[:1] == ("self",) else None
        if isinstance(candidate, nn.Module) and id(candidate) not in seen and candidate is not module:
            seen.add(id(candidate))
            if not isinstance(candidate, OptimizedModule):
                name = next((n for n, m in candidate.named_modules(remove_duplicate=False) if m is module), None)
                if name is not None:
                    best = (candidate, _without_compile_wrappers(name))
        frame = frame.f_back
    return best


class ParameterNames:
    """Resolves the names of one graph's weights; one instance per backend call."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self._frame = _dynamo_frame()
        self._aliases: dict[int, dict[int, list[str]]] = {}  # id(root module) -> id(param) -> names
        self._enclosing: dict[int, tuple[nn.Module, str]] = {}  # id(root module) -> (model, root's name in it)

    def _with_aliases(self, structural: str | None, tensor: Any, root: Any, in_submodule: bool = False) -> WeightNames:
        if isinstance(root, nn.Module):
            if id(root) not in self._aliases:
                self._aliases[id(root)] = parameter_aliases(root)
            aliases = self._aliases[id(root)].get(id(tensor), [])
            if aliases:
                return WeightNames(primary_first(structural, aliases), root, in_submodule)
        module = root if isinstance(root, nn.Module) else None
        return WeightNames((structural,) if structural else (), module, in_submodule)

    def for_placeholder(self, node: fx.Node, tensor: Any) -> WeightNames:
        """The names of the parameter behind a dynamo placeholder (empty when unresolved)."""
        source = getattr(node.meta.get("grapharg"), "source", None)
        if source is None:
            return WeightNames()
        chain = _chain(source)
        first = next((i for i, s in enumerate(chain) if isinstance(s, dynamo_source.NNModuleSource)), None)
        if first is None:
            return WeightNames()
        parts = _structural_parts(chain[first:])
        structural = ".".join(parts) if parts else None
        root: Any = _MISSING
        if self._frame is not None:
            root = _evaluate(chain[:first], *self._frame)
        if structural is None and not isinstance(root, nn.Module):
            log.warning("qcompile: cannot name the parameter behind %s (source %s)", node.name, source.name)
        prefix = ""
        if isinstance(root, nn.Module) and structural is not None:
            if id(root) not in self._enclosing:
                self._enclosing[id(root)] = enclosing_model(root)
            root, prefix = self._enclosing[id(root)]
            structural = f"{prefix}.{structural}" if prefix else structural
        return self._with_aliases(structural, tensor, root, in_submodule=bool(prefix))

    def for_attr(self, target: str, tensor: Any) -> WeightNames:
        """Names for a ``get_attr`` / ``call_module`` weight: the graph module is the model."""
        return self._with_aliases(target, tensor, self.gm)

