"""Where a per-input-feature scale on some linears' shared input can be folded into the op that makes it.

AWQ multiplies weight columns by ``s`` and needs the input divided by ``s``. When the input is the output
of a norm's elementwise weight (``weight * h``, as RMSNorm ends, or ``F.layer_norm(h, shape, weight,
bias)``) and nothing but those linears reads it, dividing the norm's weight (and bias) by ``s`` does it
for free; otherwise the op applies ``1 / s`` (``formats/awq.py``).
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn

from qcompile.passes.sites import LinearSite

_MUL = (operator.mul, torch.mul, torch.Tensor.mul)
_LAYER_NORM = (F.layer_norm, torch.layer_norm)


@dataclasses.dataclass(frozen=True)
class ScaleFold:
    """Parameters to divide by ``s`` (a norm's weight, and its bias when it has one) for an input read only by
    ``readers`` linear sites."""

    weight: nn.Parameter
    bias: nn.Parameter | None
    readers: int


def _parameter(node: object, features: int, real: dict[fx.Node, object]) -> nn.Parameter | None:
    """The 1-D parameter of ``features`` elements a placeholder node stands for, if it is read only once."""
    if not isinstance(node, fx.Node) or node.op != "placeholder" or len(node.users) != 1:
        return None
    value = real.get(node)
    if isinstance(value, nn.Parameter) and value.dim() == 1 and value.shape[0] == features:
        return value
    return None


def find_scale_folds(gm: fx.GraphModule, example_inputs: Sequence[object],
                     sites: Sequence[LinearSite]) -> dict[fx.Node, ScaleFold]:
    """For each input node of ``sites`` (in ``gm``'s own graph) that only those sites read and that a norm's
    weight makes, its fold."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    real = dict(zip(placeholders, example_inputs, strict=False))
    by_input: dict[fx.Node, list[LinearSite]] = {}
    for site in sites:
        by_input.setdefault(site.input, []).append(site)
    folds = {}
    for node, readers in by_input.items():
        if set(node.users) != {site.node for site in readers} or node.op != "call_function":
            continue
        features = readers[0].shape[1] if len(readers[0].shape) == 2 else -1
        if node.target in _MUL and len(node.args) == 2 and not node.kwargs:
            weight = _parameter(node.args[0], features, real)
            if weight is None:
                weight = _parameter(node.args[1], features, real)
            if weight is not None:
                folds[node] = ScaleFold(weight, None, len(readers))
        elif node.target in _LAYER_NORM:
            args = list(node.args) + [None] * (5 - len(node.args))
            weight = _parameter(node.kwargs.get("weight", args[2]), features, real)
            bias_node = node.kwargs.get("bias", args[3])
            bias = _parameter(bias_node, features, real)
            if weight is not None and (bias_node is None or bias is not None):
                folds[node] = ScaleFold(weight, bias, len(readers))
    return folds
