"""Rewrite planned linear sites into ``torch.ops.qcompile.*`` calls.

The packed tensors become buffers of the GraphModule, read through ``get_attr``.
Inductor (through AOT autograd) lifts a dynamo graph's parameters and buffers as
inputs and looks each one's dynamo source up in ``gm._param_name_to_source``, so
every buffer added here gets a unique source there. Adding new placeholders
instead fails dynamo's input metadata checks. We chose buffers over inductor's
freezing because they also work with ``inner="eager"``, keep one copy of each
packed tensor shared across graphs, and do not depend on inference-only freezing.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import torch
from torch import fx
from torch._dynamo.source import ConstantSource

from qcompile.formats import PackedWeight
from qcompile.passes.plan import SitePlan

_UNSAFE = re.compile(r"[^0-9A-Za-z_]")


def _buffer_prefix(plan: SitePlan) -> str:
    return "_qcompile_" + _UNSAFE.sub("_", plan.site.qualified_name)


class _BufferRegistry:
    """Registers each packed weight's tensors on the GraphModule once, however many sites share it."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.names: dict[int, dict[str, str]] = {}

    def names_for(self, packed: PackedWeight, prefix: str) -> dict[str, str]:
        if id(packed) in self.names:
            return self.names[id(packed)]
        names = {}
        for tensor_name, tensor in packed.op_tensors().items():
            if tensor is None:
                continue
            buffer_name = f"{prefix}_{tensor_name}"
            while hasattr(self.gm, buffer_name):
                buffer_name += "_"
            self.gm.register_buffer(buffer_name, tensor)
            if hasattr(self.gm, "_param_name_to_source"):
                self.gm._param_name_to_source[buffer_name] = ConstantSource(f"__qcompile__{buffer_name}")
            names[tensor_name] = buffer_name
        self.names[id(packed)] = names
        return names


def _bias_node(graph: fx.Graph, plan: SitePlan) -> fx.Node | None:
    site = plan.site
    if site.form == "call_module":
        module = site.node.graph.owning_module.get_submodule(str(site.node.target))
        return graph.get_attr(f"{site.node.target}.bias") if module.bias is not None else None
    return site.bias


def rewrite_linears(
    gm: fx.GraphModule,
    plans: Sequence[SitePlan],
    packed_for: Callable[[SitePlan], PackedWeight],
    kernels: str,
) -> list[SitePlan]:
    """Replace every quantized site of ``plans`` with its scheme's op; returns the sites rewritten."""
    graph = gm.graph
    buffers = _BufferRegistry(gm)
    rewritten = []
    for plan in plans:
        if plan.scheme is None:
            continue
        site = plan.site
        packed = packed_for(plan)
        names = buffers.names_for(packed, _buffer_prefix(plan))
        with graph.inserting_before(site.node):
            tensor_args = [
                graph.get_attr(names[tensor_name]) if tensor is not None else None
                for tensor_name, tensor in packed.op_tensors().items()
            ]
            bias = _bias_node(graph, plan)
            new = graph.call_function(
                packed.scheme.op,
                args=(site.input, *tensor_args, bias, *packed.op_constants(), kernels),
            )
        new.meta.update({k: v for k, v in site.node.meta.items() if k in ("example_value", "val", "stack_trace")})
        site.node.replace_all_uses_with(new)
        graph.erase_node(site.node)
        _erase_if_dead(graph, site)
        rewritten.append(plan)
    graph.lint()
    gm.recompile()
    return rewritten


def _erase_if_dead(graph: fx.Graph, site) -> None:
    """Remove a now-unused ``W.t()`` that fed the replaced matmul (placeholders stay: dynamo passes them)."""
    if site.weight_node is None:
        return
    for user in list(site.weight_node.users):
        if not user.users and user.op in ("call_method", "call_function") and user.target in ("t", torch.t, getattr):
            graph.erase_node(user)


def weight_fully_rewritten(site) -> bool:
    """True when nothing left in the graph reads the site's weight placeholder."""
    node = site.weight_node
    return node is not None and node.op == "placeholder" and not node.users
