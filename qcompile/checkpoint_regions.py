"""Training graphs with activation checkpointing, compiled region by region.

With ``torch.utils.checkpoint(..., use_reentrant=False)`` inside a compiled model (transformers'
``gradient_checkpointing_enable``), dynamo puts each checkpointed layer in a
``tag_activation_checkpoint`` body. Compiled whole, inductor recomputes and differentiates every
layer in one backward graph, and that graph holds more at its peak than eager checkpointing does
(benchmarks/qlora.py, 4 layers: 84.5 MiB of tensors against 66.9 for bitsandbytes + peft eager).

Here each body is compiled on its own (``torch.compile`` of the body graph, so its shapes get
dynamo's guards and recompiles) and the outer graph runs each one under an eager non-reentrant
``checkpoint``: the forward keeps only the regions' inputs, and the backward recomputes and
differentiates one region at a time, as eager checkpointing does (71.2 MiB, 68.2 on CPU with
``CPU_REGION_PATCHES``). The rest of the outer graph (embedding, final norm, head, loss) runs eagerly.

Selective checkpointing (a ``context_fn``) keeps the whole-graph path: its policy decides per op,
and the ops of a compiled region are not visible to it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import fx
from torch.utils.checkpoint import checkpoint

# checkpoint() arguments a traced region may carry that apply unchanged to the eager checkpoint.
_PASSED_KWARGS = ("preserve_rng_state", "determinism_check", "debug")

# Inductor options for a region body on CPU. Fused backward kernels (silu backward with the LoRA adds)
# keep all their inputs and outputs live at once; unfused, the peak of benchmarks/qlora.py falls from
# 71.2 to 68.2 MiB at the same steps/s on CPU. Not applied on CUDA, where fusion saves memory traffic
# and no GPU measurement has been made.
CPU_REGION_PATCHES = {"max_fusion_size": 1}


def _checkpoint_hop() -> Any:
    return getattr(torch.ops.higher_order, "tag_activation_checkpoint", None)


def has_activation_checkpoint(gm: fx.GraphModule) -> bool:
    """Whether ``gm`` holds a checkpointed region (dynamo's ``tag_activation_checkpoint``, which
    ``torch.utils.checkpoint`` with ``use_reentrant=False`` becomes), in it or in a submodule it calls."""
    hop = _checkpoint_hop()
    return hop is not None and any(
        node.op == "call_function" and node.target is hop for module in gm.modules()
        if isinstance(module, fx.GraphModule) for node in module.graph.nodes)


def _region_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    hop = _checkpoint_hop()
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is hop]


def checkpoint_regions_compilable(gm: fx.GraphModule) -> bool:
    """Whether ``gm`` has checkpointed regions at its top level and none uses selective checkpointing."""
    nodes = _region_nodes(gm)
    return bool(nodes) and all("_checkpoint_context_fn" not in getattr(gm, n.args[0].target).meta for n in nodes)


def _canonical(body: fx.GraphModule) -> fx.GraphModule:
    """``body`` with nothing that tells one layer from another: its values renamed by position and its
    ``quantized_linear`` calls without the weight's name (the op finds it from the parameter,
    ``pack_cache.name_of``). The layers of a model then trace to one graph, which inductor compiles
    once and finds in its cache for the others (the parameters' names were in dynamo's input names)."""
    linear = torch.ops.qcompile.quantized_linear.default
    inputs = 0
    for index, node in enumerate(body.graph.nodes):
        if node.op == "placeholder":
            node.target = f"region_input_{inputs}"
            node._rename(node.target)
            inputs += 1
        elif node.op != "output":
            node._rename(f"region_value_{index}")  # dynamo numbered them across the whole model's trace
        if node.op == "call_function" and node.target is linear:
            node.args = (*node.args[:5], "", *node.args[6:])
    body.recompile()
    return body


def _region(name: str, body: Callable[..., Any], kwargs: dict[str, Any]) -> Callable[..., Any]:
    def run(*args: Any) -> Any:
        return checkpoint(body, *args, use_reentrant=False, **kwargs)

    run.__name__ = run.__qualname__ = f"checkpointed_{name}"
    return run


def compile_checkpoint_regions(gm: fx.GraphModule, backend: Callable[..., Any]) -> Callable[..., Any]:
    """Rewrite ``gm`` so that each checkpointed region runs ``torch.compile(body, backend=backend)`` under
    an eager non-reentrant checkpoint; returns the outer graph's callable (run eagerly). Call only when
    :func:`checkpoint_regions_compilable` is true."""
    for node in _region_nodes(gm):
        body_node = node.args[0]
        compiled = torch.compile(_canonical(getattr(gm, body_node.target)), backend=backend)
        kwargs = {k: v for k, v in node.kwargs.items() if k in _PASSED_KWARGS}
        node.target = _region(body_node.target, compiled, kwargs)
        node.args = node.args[1:]
        node.kwargs = {}
        if not body_node.users:
            gm.graph.erase_node(body_node)
    gm.recompile()
    return gm.forward
