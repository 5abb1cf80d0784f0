"""CUDA graphs and packed weights: a replay must not run weights that changed after it was recorded.

``quantized_linear`` finds each weight's packed form per call and repacks a weight that changed. A CUDA
graph replay (inductor's ``mode="reduce-overhead"``) runs no Python: it launches the kernels it recorded,
which read the packed tensors of the recording. Inductor records again when a parameter's address changes
(another model instance, ``param.data = ...``), but not when its values change in place
(``load_state_dict``, ``copy_``, an RL loop syncing policy weights): the replays would go on computing with
the old weights, silently. Repacking in place cannot help: the 4-bit double-quant offset is a kernel
argument recorded in the graph.

So for a graph compiled with CUDA graphs, every call first compares the version counter of each quantized
weight with the one it had when the graph first ran with that weight's memory, and raises
:class:`StaleCudaGraphError` naming the weight when it moved: recompile (``torch.compiler.reset()``) after
changing weights in place, or compile without CUDA graphs. The check costs a version and an address read
per quantized weight per call. A write through ``param.data`` changes no version counter and is not seen;
``qcompile.invalidate`` cannot reach a replay either: reset instead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx

from qcompile.pack_cache import version_of


class StaleCudaGraphError(RuntimeError):
    """A CUDA graph would replay the packed form of a weight that changed in place after it was recorded."""


def records_cuda_graphs(example_inputs: Sequence[Any], inner: Any, mode: str | None) -> bool:
    """Whether inductor will record CUDA graphs for this graph: inductor is the inner compiler, CUDA graphs are
    on (``mode="reduce-overhead"`` or inductor's own setting) and the graph's inputs are on a CUDA device."""
    if inner != "inductor":
        return False
    patches = torch._inductor.list_mode_options(mode) if mode and mode != "default" else {}
    if not patches.get("triton.cudagraphs", torch._inductor.config.triton.cudagraphs):
        return False
    return any(isinstance(t, torch.Tensor) and t.is_cuda for t in example_inputs)


def refuse_stale_weights(gm: fx.GraphModule, weights: Sequence[tuple[fx.Node | None, torch.Tensor, str]]
                         ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A wrapper for ``gm`` compiled with CUDA graphs: a call whose quantized weights changed in place since the
    graph first ran with them raises :class:`StaleCudaGraphError` instead of replaying. Call it before the inner
    compiler runs (it reads ``gm``'s placeholders); apply what it returns to the compiled function.

    ``weights``: (the node feeding the weight, the parameter that compiled it, its name) per quantized linear.
    A placeholder's weight is read from each call's inputs (dynamo passes parameters as inputs, so another
    instance brings its own, and the wrapper keeps no reference to the compiling instance's weights); otherwise
    it is the parameter itself, which ``gm`` holds anyway.
    """
    positions = {node: i for i, node in enumerate(n for n in gm.graph.nodes if n.op == "placeholder")}
    sources = [(positions.get(node), None if node in positions else parameter, name)
               for node, parameter, name in weights]

    def wrap(compiled: Callable[..., Any]) -> Callable[..., Any]:
        recorded: dict[int, int] = {}  # address of a weight's data -> its version when first run there
        boxed = getattr(compiled, "_boxed_call", False)

        def call(*args: Any) -> Any:
            inputs = args[0] if boxed else args
            for position, parameter, name in sources:
                weight = parameter if position is None else inputs[position]
                address, version = weight.data_ptr(), version_of(weight)
                if recorded.setdefault(address, version) != version:
                    raise StaleCudaGraphError(
                        f"{name} changed in place (version {recorded[address]} -> {version}) after this graph "
                        "recorded its CUDA graphs, which would replay its old packed weight; call "
                        "torch.compiler.reset() after changing weights (the next call recompiles and records "
                        "again), or compile without CUDA graphs (a mode other than 'reduce-overhead')")
            return compiled(*args)

        if boxed:
            call._boxed_call = True
        return call

    return wrap
