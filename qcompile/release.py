"""``release_weights=True``: when a packed parameter's float data may be dropped, and guarding it after.

A float weight may be released only when nothing will read it again except qcompile's op, which
reads the packed form. That is shown, per parameter, by:

* one name only: a tied weight (an embedding and a head) is read by the embedding too;
* its owning modules are plain linears (``nn.Linear.forward`` or transformers' ``Conv1D``), whose
  forward reads the weight only in the linear op;
* in this graph, only ``quantized_linear`` reads it;
* no graph compiled so far read it outside a quantized linear (a graph break can put the embedding
  and the head of one tied weight in two graphs).

Otherwise the weight is kept and the plan says why. A released weight's owning modules' fallback
guard (``qcompile/fallback.py``) then raises whenever the module runs outside a qcompile graph
(dynamo gave up on the frame, another backend compiled it, or the user called the eager model), so
the model fails loudly instead of computing with the released data; a graph compiled later that
reads a released weight outside a quantized linear is refused with an error naming the weight.
"""

from __future__ import annotations

from typing import Any

from torch import fx, nn
from torch.utils.weak import WeakTensorKeyDictionary

from qcompile.fallback import FallbackPolicy, guard
from qcompile.pack_cache import is_released, release_parameter
from qcompile.passes.plan import SitePlan
from qcompile.passes.rewrite_linear import reads_outside_quantized_linears
from qcompile.passes.sites import linear_weight_of

# Parameters some compiled graph read outside a quantized linear -> that graph's id (weak keys).
_FLOAT_READERS: WeakTensorKeyDictionary = WeakTensorKeyDictionary()


def note_float_reads(gm: fx.GraphModule, example_inputs: Any, graph_id: str, names: dict[int, str]) -> None:
    """Record the parameters this (rewritten) graph reads outside quantized linears.

    Raises ValueError when one of them was already released: this graph would compute with it.
    ``names`` maps ``id(parameter)`` to its name, for the message.
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, value in zip(placeholders, example_inputs, strict=False):
        if not isinstance(value, nn.Parameter) or not node.users:
            continue
        if not reads_outside_quantized_linears(node):
            continue
        if is_released(value):
            raise ValueError(
                f"{names.get(id(value), node.name)}: its float data was released (qcompile.quantize or "
                f"release_weights=True) but graph {graph_id} reads it outside a quantized linear (a config that keeps "
                "it float?); compile with the config it was quantized with, or keep the weights"
            )
        _FLOAT_READERS.setdefault(value, graph_id)


def kept_reason(plan: SitePlan) -> str | None:
    """Why the site's weight must keep its float data, or None when it can be released."""
    site = plan.site
    names = site.weight_names
    if site.form == "call_module":
        return "not a graph input (graph built without dynamo)"
    if len(names.names) > 1:
        return f"tied: also {', '.join(names.names[1:])}"
    if reads_outside_quantized_linears(site.weight_node):
        return "read outside a quantized linear in this graph"
    if site.parameter in _FLOAT_READERS:
        return f"read outside a quantized linear by graph {_FLOAT_READERS[site.parameter]}"
    owners = names.owners()
    if not owners:
        return "its owning module could not be found"
    odd = [(name, module) for name, module in owners if linear_weight_of(module) is None]
    if odd:
        return f"owner {odd[0][0]} is a {type(odd[0][1]).__name__}, whose forward may read the weight"
    return None


def release(plan: SitePlan, policy: FallbackPolicy) -> None:
    """Release the site's weight; its owning modules' guards then refuse any float run."""
    site = plan.site
    if is_released(site.parameter):
        return
    for _, module in site.weight_names.owners():
        guard(module, site.qualified_name, site.parameter, policy, released=True)
    release_parameter(site.parameter)
