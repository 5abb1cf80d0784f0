"""Find the linear ops of a dynamo graph and the parameter behind each weight.

Forms recognised (``x`` any tensor of rank >= 2 unless noted, ``W`` a weight):

* ``F.linear(x, W, b)`` / ``torch._C._nn.linear`` (what dynamo records for nn.Linear);
* ``call_module`` of an ``nn.Linear`` submodule (graphs built without inlining);
* ``x @ W.t()``, ``torch.matmul(x, W.t())``, ``torch.mm(x, W.t())`` with ``W`` in linear layout (out, in);
* ``x @ P`` / ``matmul`` / ``mm`` with a parameter ``P`` in (in, out) layout, used transposed;
* ``torch.addmm(b, x, W.t())`` and ``torch.addmm(b, x, P)`` with default ``beta``/``alpha``.

A site records the graph nodes, the real weight tensor (from the example
inputs dynamo hands the backend) and the module's qualified name, recovered
from the placeholder's dynamo source (``L['self']._modules['lm_head']._parameters['weight']``).
"""

from __future__ import annotations

import dataclasses
import operator
import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn

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
    module_name: str | None  # e.g. "model.layers.0.self_attn.q_proj"
    param_name: str | None  # e.g. "weight"
    shape: tuple[int, ...]  # of the weight in linear layout (out_features, in_features)
    dtype: torch.dtype | None
    input_rank: int | None

    @property
    def qualified_name(self) -> str:
        """The parameter's fully qualified name, e.g. ``lm_head.weight``."""
        if self.module_name is None:
            return self.node.name
        return f"{self.module_name}.{self.param_name}" if self.module_name else str(self.param_name)


_TOKEN = re.compile(
    r"\._(?:modules|parameters|buffers)\['(?P<dict_key>[^']+)'\]"  # _modules['fc1']
    r"|\[['\"](?P<item_key>[^'\"]+)['\"]\]"  # ['fc1'] on a ModuleDict
    r"|\[(?P<index>\d+)\]"  # [0] on a ModuleList
    r"|\.(?P<attr>[A-Za-z_]\w*)"  # .fc1
)
_ROOT = re.compile(r"^[LG]\[['\"][^'\"]+['\"]\]")


def source_to_qualified_name(source_name: str) -> tuple[str, str] | None:
    """``L['self']._modules['fc1']._parameters['weight']`` -> ``("fc1", "weight")``.

    The root (the local or global holding the model) is dropped; returns None when the
    text is not a chain of attribute and item accesses.
    """
    root = _ROOT.match(source_name)
    if root is None:
        return None
    rest, names = source_name[root.end():], []
    while rest:
        m = _TOKEN.match(rest)
        if m is None:
            return None
        names.append(next(v for v in m.groupdict().values() if v is not None))
        rest = rest[m.end():]
    if not names:
        return None
    return ".".join(names[:-1]), names[-1]


def _source_name(node: fx.Node) -> str | None:
    grapharg = node.meta.get("grapharg")
    source = getattr(grapharg, "source", None)
    if source is None:
        return None
    name = source.name
    return name() if callable(name) else name


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

    def weight_info(self, node: fx.Node) -> tuple[torch.Tensor | None, bool, str | None, str | None]:
        """(real tensor, is a parameter, module name, parameter name) for a weight operand."""
        if node.op == "placeholder":
            tensor = self.real.get(node)
            qualified = None
            source_name = _source_name(node)
            if source_name is not None:
                qualified = source_to_qualified_name(source_name)
            module, param = qualified if qualified else (None, None)
            is_param = isinstance(tensor, nn.Parameter) and qualified is not None
            return (tensor if isinstance(tensor, torch.Tensor) else None), is_param, module, param
        if node.op == "get_attr":
            tensor = _get_attr(self.gm, str(node.target))
            module, _, param = str(node.target).rpartition(".")
            return tensor, isinstance(tensor, nn.Parameter), module, param
        return None, False, None, None

    def make(self, node, form, x, weight_node, bias, transposed) -> LinearSite:
        tensor, is_param, module, param = self.weight_info(weight_node)
        value = tensor if tensor is not None else _example_value(weight_node)
        shape = tuple(value.shape) if value is not None else ()
        if transposed:
            shape = tuple(reversed(shape))
        return LinearSite(
            node=node, form=form, input=x, bias=bias, weight_node=weight_node,
            parameter=tensor if is_param else None, is_parameter=is_param, transposed=transposed,
            module_name=module, param_name=param, shape=shape,
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
            tensor, is_param, _, _ = self.weight_info(node)
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
                return _call_module_site(node, module)
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


def _call_module_site(node: fx.Node, module: nn.Linear) -> LinearSite:
    module_name = str(node.target)
    return LinearSite(
        node=node, form="call_module", input=node.args[0], bias=None, weight_node=None,
        parameter=module.weight, is_parameter=True, transposed=False, module_name=module_name,
        param_name="weight", shape=tuple(module.weight.shape), dtype=module.weight.dtype,
        input_rank=_rank(node.args[0]),
    )


def find_linear_sites(gm: fx.GraphModule, example_inputs: Sequence[object] = ()) -> list[LinearSite]:
    """Every linear op of ``gm``, in graph order.

    ``example_inputs`` are the real inputs dynamo passes the backend, one per placeholder;
    they give the parameter behind each weight placeholder.
    """
    finder = _SiteFinder(gm, example_inputs)
    sites = []
    for node in gm.graph.nodes:
        site = finder.site(node)
        if site is not None:
            sites.append(site)
    return sites
