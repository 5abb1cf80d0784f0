"""Find the linear ops of a dynamo graph and the parameter behind each weight.

Forms recognised (``x`` any tensor of rank >= 2 unless noted, ``W`` a weight):

* ``F.linear(x, W, b)`` / ``torch._C._nn.linear`` (what dynamo records for nn.Linear);
* ``call_module`` of an ``nn.Linear`` submodule (graphs built without inlining);
* ``x @ W.t()``, ``torch.matmul(x, W.t())``, ``torch.mm(x, W.t())`` with ``W`` in linear layout (out, in);
* ``x @ P`` / ``matmul`` / ``mm`` with a parameter ``P`` in (in, out) layout, used transposed;
* ``torch.addmm(b, x, W.t())`` and ``torch.addmm(b, x, P)`` with default ``beta``/``alpha``.

A site records the graph nodes, the real weight tensor (from the example
inputs dynamo hands the backend) and every name the parameter has under the model
(``names.py``: from dynamo's source objects, never from their text).
"""

from __future__ import annotations

import dataclasses
import logging
import operator
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn

from qcompile.passes.names import ParameterNames, WeightNames

log = logging.getLogger("qcompile")

LINEAR_TARGETS = (torch._C._nn.linear, F.linear)
MATMUL_TARGETS = (operator.matmul, torch.matmul, torch.mm, torch.Tensor.matmul, torch.Tensor.mm)
ADDMM_TARGETS = (torch.addmm, torch.Tensor.addmm)
TRANSPOSE_METHODS = ("t", "T", "mT")


@dataclasses.dataclass(frozen=True, eq=False)
class LinearSite:
    """One linear op in a graph: ``y = x @ weight.T + bias`` with weight (out_features, in_features)."""

    node: fx.Node  # the op to replace
    form: str  # "linear", "call_module", "matmul" or "addmm"
    input: fx.Node  # x
    bias: fx.Node | None  # a graph node, or None
    weight_node: fx.Node | None  # the placeholder / get_attr feeding the weight (None for call_module)
    parameter: torch.Tensor | None  # the real parameter tensor (None when the weight is computed)
    is_parameter: bool  # the weight is an nn.Parameter of a module
    transposed: bool  # the parameter is stored (in, out) and used transposed
    weight_names: WeightNames  # every name of the parameter, primary first (empty: unresolved)
    shape: tuple[int, ...]  # of the weight in linear layout (out_features, in_features)
    dtype: torch.dtype | None
    input_rank: int | None

    @property
    def module_name(self) -> str | None:
        """The primary module name, e.g. ``model.layers.0.self_attn.q_proj`` (None when unresolved)."""
        names = self.weight_names.names
        return names[0].rpartition(".")[0] if names else None

    @property
    def module_names(self) -> tuple[str, ...]:
        """The module part of every name of the weight (a tied head: ``lm_head`` and ``model.embed_tokens``)."""
        return self.weight_names.module_names

    @property
    def param_name(self) -> str | None:
        names = self.weight_names.names
        return names[0].rpartition(".")[2] if names else None

    @property
    def qualified_name(self) -> str:
        """The parameter's fully qualified name, e.g. ``lm_head.weight``; the node's name when unresolved."""
        names = self.weight_names.names
        return names[0] if names else f"<{self.node.name}>"


def _example_value(node: fx.Node) -> torch.Tensor | None:
    value = node.meta.get("example_value", node.meta.get("val"))
    return value if isinstance(value, torch.Tensor) else None


def _rank(node: object) -> int | None:
    value = _example_value(node) if isinstance(node, fx.Node) else None
    return value.dim() if value is not None else None


class _SiteFinder:
    def __init__(self, gm: fx.GraphModule, example_inputs: Sequence[object]):
        self.gm = gm
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        self.real = {node: value for node, value in zip(placeholders, example_inputs, strict=False)}
        self.names = ParameterNames(gm)
        # A placeholder of a higher-order op's body -> the operand the op passes it (see body_calls).
        self.outer: dict[fx.Node, object] = {}

    def weight_info(self, node: fx.Node) -> tuple[torch.Tensor | None, bool, WeightNames]:
        """(real tensor, is a parameter, its names) for a weight operand."""
        while node in self.outer:  # a body's placeholder: what the graph around it passed
            outer = self.outer[node]
            if not isinstance(outer, fx.Node):
                return None, False, WeightNames()
            node = outer
        if node.op == "placeholder":
            tensor = self.real.get(node)
            if not isinstance(tensor, torch.Tensor):
                return None, False, WeightNames()
            return tensor, isinstance(tensor, nn.Parameter), self.names.for_placeholder(node, tensor)
        if node.op == "get_attr":
            tensor = _get_attr(self.gm, str(node.target))
            return tensor, isinstance(tensor, nn.Parameter), self.names.for_attr(str(node.target), tensor)
        return None, False, WeightNames()

    def make(self, node, form, x, weight_node, bias, transposed) -> LinearSite:
        tensor, is_param, names = self.weight_info(weight_node)
        value = tensor if tensor is not None else _example_value(weight_node)
        shape = tuple(value.shape) if value is not None else ()
        if transposed:
            shape = tuple(reversed(shape))
        return LinearSite(
            node=node, form=form, input=x, bias=bias, weight_node=weight_node,
            parameter=tensor if is_param else None, is_parameter=is_param, transposed=transposed,
            weight_names=names, shape=shape,
            dtype=value.dtype if value is not None else None, input_rank=_rank(x),
        )

    def weight_operand(self, node: object) -> tuple[fx.Node, bool] | None:
        """For the right operand of a matmul: (weight node, stored (in, out)) or None."""
        if not isinstance(node, fx.Node):
            return None
        # W.t() / W.T / torch.t(W): the weight is stored in linear layout (out, in).
        if node.op == "call_method" and node.target in ("t",) and len(node.args) == 1:
            inner = node.args[0]
        elif node.op == "call_function" and node.target in (torch.t, getattr) and _is_transpose(node):
            inner = node.args[0]
        else:
            inner = None
        if isinstance(inner, fx.Node) and inner.op in ("placeholder", "get_attr"):
            return inner, False
        if node.op in ("placeholder", "get_attr"):
            tensor, is_param, _ = self.weight_info(node)
            if is_param and tensor is not None and tensor.dim() == 2:
                return node, True
        return None

    def site(self, node: fx.Node) -> LinearSite | None:
        if node.op == "call_function" and node.target in LINEAR_TARGETS:
            x, weight = _arg(node, 0, "input"), _arg(node, 1, "weight")
            bias = _arg(node, 2, "bias")
            if isinstance(weight, fx.Node) and isinstance(x, fx.Node):
                return self.make(node, "linear", x, weight, bias, transposed=False)
            return None
        if node.op == "call_module":
            module = self.gm.get_submodule(str(node.target))
            if type(module) is nn.Linear and node.args and isinstance(node.args[0], fx.Node):
                return _call_module_site(node, module, self.names)
            return None
        if node.op in ("call_function", "call_method") and _is_matmul(node):
            x, other = node.args[0], node.args[1]
            operand = self.weight_operand(other)
            if operand is not None and isinstance(x, fx.Node):
                return self.make(node, "matmul", x, operand[0], None, transposed=operand[1])
            return None
        if node.op in ("call_function", "call_method") and _is_addmm(node):
            if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1 or len(node.args) != 3:
                return None
            bias, x, other = node.args
            operand = self.weight_operand(other)
            if operand is not None and isinstance(x, fx.Node) and isinstance(bias, fx.Node):
                return self.make(node, "addmm", x, operand[0], bias, transposed=operand[1])
        return None


def _is_transpose(node: fx.Node) -> bool:
    if node.target is torch.t:
        return True
    return node.target is getattr and len(node.args) == 2 and node.args[1] in TRANSPOSE_METHODS


def _is_matmul(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in ("matmul", "mm", "__matmul__") and len(node.args) == 2
    return node.target in MATMUL_TARGETS and len(node.args) == 2


def _is_addmm(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target == "addmm"
    return node.target in ADDMM_TARGETS


def _arg(node: fx.Node, index: int, name: str) -> object:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name)


def _get_attr(gm: fx.GraphModule, target: str) -> torch.Tensor | None:
    try:
        value = gm.get_parameter(target)
    except AttributeError:
        try:
            value = gm.get_buffer(target)
        except AttributeError:
            return None
    return value


def _call_module_site(node: fx.Node, module: nn.Linear, names: ParameterNames) -> LinearSite:
    return LinearSite(
        node=node, form="call_module", input=node.args[0], bias=None, weight_node=None,
        parameter=module.weight, is_parameter=True, transposed=False,
        weight_names=names.for_attr(f"{node.target}.weight", module.weight),
        shape=tuple(module.weight.shape), dtype=module.weight.dtype,
        input_rank=_rank(node.args[0]),
    )


def linear_weight_of(module: nn.Module) -> tuple[torch.Tensor, bool] | None:
    """(weight, stored (in, out)) when ``module``'s forward is a plain linear of its weight, else None.

    ``nn.Linear`` (and subclasses keeping its forward) and transformers' ``Conv1D`` (GPT-2), whose
    forward reads the weight only in ``addmm``.
    """
    cls = type(module)
    if isinstance(module, nn.Linear) and cls.forward is nn.Linear.forward:
        return module.weight, False
    if cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers."):
        return module.weight, True
    return None


def float_reader(weight_names: WeightNames) -> str | None:
    """For a tied weight: the first module holding it that is not a plain linear (an embedding), or None."""
    if len(weight_names.names) < 2:
        return None
    for name, module in weight_names.owners():
        if linear_weight_of(module) is None:
            return name
    return None


def find_linear_sites(gm: fx.GraphModule, example_inputs: Sequence[object] = ()) -> list[LinearSite]:
    """Every linear op of ``gm``, in graph order.

    ``example_inputs`` are the real inputs dynamo passes the backend, one per placeholder;
    they give the parameter behind each weight placeholder.
    """
    finder = _SiteFinder(gm, example_inputs)
    sites: list[LinearSite] = []
    visited: set[int] = set()

    def visit(module: fx.GraphModule) -> None:
        for node in module.graph.nodes:
            body = body_call(module, node)
            if body is not None:
                if id(body) not in visited:  # a body two calls share: its ops resolve weights per call
                    visited.add(id(body))
                    placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
                    finder.outer.update(zip(placeholders, node.args[1:], strict=False))
                    visit(body)
                continue
            site = finder.site(node)
            if site is not None:
                sites.append(site)
            elif node.op == "call_function" and isinstance(node.target, torch._ops.HigherOrderOperator):
                _warn_unvisited(module, node)

    visit(gm)
    return sites


# Higher-order ops whose body is ``args[0]`` (a ``get_attr`` of a GraphModule) called on ``args[1:]`` in
# order: activation checkpointing (``torch.utils.checkpoint`` under dynamo, gradient checkpointing in
# transformers) and plain ``wrap``. Their linears are found and rewritten inside the body.
def _body_first_hops() -> tuple[object, ...]:
    hops = torch.ops.higher_order
    return tuple(getattr(hops, name) for name in ("tag_activation_checkpoint", "wrap") if hasattr(hops, name))


def body_call(module: fx.GraphModule, node: fx.Node) -> fx.GraphModule | None:
    """The body GraphModule ``node`` calls when it is a higher-order op qcompile looks inside, else None."""
    if node.op != "call_function" or node.target not in _body_first_hops() or not node.args:
        return None
    body_node = node.args[0]
    if not isinstance(body_node, fx.Node) or body_node.op != "get_attr":
        return None
    return _submodule(module, str(body_node.target))


def _submodule(module: fx.GraphModule, target: str) -> fx.GraphModule | None:
    try:
        body = module.get_submodule(target)
    except AttributeError:
        return None
    return body if isinstance(body, fx.GraphModule) else None


def _warn_unvisited(module: fx.GraphModule, node: fx.Node) -> None:
    """Warn when another higher-order op's body holds linear ops: qcompile does not rewrite them."""
    bodies = [a for a in node.args if isinstance(a, fx.Node) and a.op == "get_attr"]
    for body_node in bodies:
        body = _submodule(module, str(body_node.target))
        if body is not None and any(n.target in LINEAR_TARGETS for n in body.graph.nodes):
            log.warning("qcompile: linear ops inside %s (%s) are not quantized: qcompile does not look inside "
                        "this higher-order op; they run as the graph computes them", node.target, node.name)
            return
