"""Rewrite planned linear sites into ``torch.ops.qcompile.quantized_linear`` calls.

The op takes the float parameter itself (a graph input, or a ``get_attr`` in graphs built
without dynamo) plus the scheme as text, and finds the packed form at run time
(``qcompile/ops/quantized_linear.py`` says why packed tensors are not graph constants).

The replacement returns what the original node returned: where the original's dtype differs
from its input's (``torch.autocast`` casts ``F.linear``'s operands), the input is cast to it first.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import fx

from qcompile.ops.quantized_linear import scheme_key
from qcompile.passes.plan import SitePlan
from qcompile.passes.sites import LinearSite, body_call

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _weight_node(graph: fx.Graph, site: LinearSite) -> fx.Node:
    if site.form == "call_module":
        return graph.get_attr(f"{site.node.target}.weight")
    assert site.weight_node is not None  # planned sites have a parameter behind their weight
    return site.weight_node


def _bias_node(graph: fx.Graph, site: LinearSite) -> fx.Node | None:
    if site.form == "call_module":
        module = site.node.graph.owning_module.get_submodule(str(site.node.target))
        return graph.get_attr(f"{site.node.target}.bias") if module.bias is not None else None
    return site.bias


def _value(node: object) -> torch.Tensor | None:
    if not isinstance(node, fx.Node):
        return None
    value = node.meta.get("example_value", node.meta.get("val"))
    return value if isinstance(value, torch.Tensor) else None


def _input_cast_to(graph: fx.Graph, site: LinearSite, x_node: fx.Node) -> fx.Node:
    """The site's input, cast to the dtype the original op returned when that differs (autocast)."""
    x, out = _value(x_node), _value(site.node)
    if x is None or out is None or x.dtype == out.dtype or out.dtype not in _FLOAT_DTYPES:
        return x_node
    cast = graph.call_method("to", (x_node, out.dtype))
    cast.meta["example_value"] = x.to(out.dtype)
    return cast


def rewrite_linears(gm: fx.GraphModule, plans: Sequence[SitePlan], kernels: str, config: str = "") -> list[SitePlan]:
    """Replace every quantized site of ``plans`` with ``quantized_linear``; returns the sites rewritten.

    ``config`` is the config's key (``qcompile.decisions.config_key``): each call then follows the decision
    recorded for the weight it is given, when dynamo runs this graph on another module's weights. For
    that reason a site the config keeps float in a submodule's frame is routed through the op too, with
    an empty scheme (float unless the weight's own decision says otherwise); it is not returned."""
    rewritten = []
    touched: dict[int, fx.GraphModule] = {}
    # A site's input or bias can be an earlier site's node (chained linears: a LoRA's B(A(x))),
    # replaced by then: follow the replacements.
    replaced: dict[fx.Node, fx.Node] = {}
    for plan in plans:
        site = plan.site
        graph = site.node.graph  # the body of a higher-order op (activation checkpoint) or gm's graph
        float_by_config = plan.scheme is None and plan.decided_by != "site" and site.weight_names.in_submodule_frame
        if plan.scheme is None and not (float_by_config and config and site.weight_node is not None):
            continue
        bias = _bias_node(graph, site)
        with graph.inserting_before(site.node):
            x = _input_cast_to(graph, site, replaced.get(site.input, site.input))
            scheme = "" if plan.scheme is None else scheme_key(plan.scheme)
            args = (x, _weight_node(graph, site), replaced.get(bias, bias), scheme,
                    site.transposed, site.qualified_name, kernels, config)
            new = graph.call_function(torch.ops.qcompile.quantized_linear.default, args=args)
        replaced[site.node] = new
        new.meta.update({k: v for k, v in site.node.meta.items() if k in ("example_value", "val", "stack_trace")})
        site.node.replace_all_uses_with(new)
        graph.erase_node(site.node)
        _erase_dead_transposes(graph, site)
        if plan.scheme is not None:
            rewritten.append(plan)
        owner = graph.owning_module or gm
        touched[id(owner)] = owner
    for owner in touched.values():
        owner.graph.lint()
        owner.recompile()
    return rewritten


def _erase_dead_transposes(graph: fx.Graph, site: LinearSite) -> None:
    """Remove a now-unused ``W.t()`` that fed the replaced matmul (placeholders stay: dynamo passes them)."""
    if site.weight_node is None:
        return
    for user in list(site.weight_node.users):
        if not user.users and user.op in ("call_method", "call_function") and user.target in ("t", torch.t, getattr):
            graph.erase_node(user)


def reads_outside_quantized_linears(node: fx.Node | None) -> bool:
    """True when something other than a ``quantized_linear`` reads the weight node (a tied embedding, say).

    Passing the weight into an activation-checkpoint body is not a read: the body's uses count."""
    if node is None:
        return True
    for user in node.users:
        if user.target is torch.ops.qcompile.quantized_linear.default:
            continue
        owner = node.graph.owning_module
        body = body_call(owner, user) if owner is not None else None
        if body is None:
            return True
        placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
        for index, arg in enumerate(user.args[1:]):
            if arg is node and (index >= len(placeholders) or reads_outside_quantized_linears(placeholders[index])):
                return True
    return False
