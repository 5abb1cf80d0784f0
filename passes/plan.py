"""Decide, per linear site, a scheme or a skip with its reason."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from qcompile.formats import Scheme
from qcompile.passes.names import WeightNames, parameter_aliases
from qcompile.passes.sites import LinearSite, float_reader, linear_weight_of

if TYPE_CHECKING:
    from qcompile.config import QuantConfig


@dataclasses.dataclass(frozen=True, eq=False)
class SitePlan:
    """What happens to one site: ``scheme`` is set, or ``skip_reason`` says why not."""

    site: LinearSite
    scheme: Scheme | None
    skip_reason: str | None
    decided_by: str  # "default", "rule 'lm_head'", ...

    @property
    def quantized(self) -> bool:
        return self.scheme is not None


def _site_problem(site: LinearSite) -> str | None:
    """A reason no scheme can serve the site, independent of the config."""
    if site.form == "call_module":
        return None
    if site.weight_node is not None and site.weight_node.op not in ("placeholder", "get_attr"):
        return "weight is computed in the graph, not a parameter"
    if not site.is_parameter:
        return "weight is not a module parameter"
    if site.input_rank is not None and site.input_rank < 1:
        return "input is a scalar"
    if site.form in ("matmul", "addmm") and site.input_rank is not None and site.input_rank < 2:
        return "matmul with a 1-D input"
    if site.form == "addmm" and site.bias is not None:
        value = site.bias.meta.get("example_value")
        if value is not None and tuple(value.shape) != (site.shape[0],):
            return f"addmm bias of shape {tuple(value.shape)} is not a per-output bias ({site.shape[0]},)"
    return None


def _weight_problem(site: LinearSite) -> str | None:
    """A reason to leave a parameter weight alone that is about the weight, not the config."""
    weight = site.parameter
    if weight is not None and weight.device.type == "meta":
        return "weight is on the meta device (not loaded)"
    if not site.weight_names.resolved:
        return "the parameter's name could not be resolved from dynamo's source"
    return None


def _is_trainable(site: LinearSite) -> bool:
    weight = site.parameter
    return weight is not None and weight.requires_grad and torch.is_grad_enabled()


def decide_weight(
    config: QuantConfig, module_names: Sequence[str], float_reader: str | None
) -> tuple[Scheme | None, str, str | None]:
    """(scheme, decided by, skip reason) for a weight held by ``module_names``.

    ``float_reader`` names a module that reads the same weight in float (the embedding of a tied
    head). The default scheme does not quantize such a weight, as transformers keeps tied heads in
    float: the float copy stays for the embedding, so a packed one would add memory. A rule that
    names one of the modules does quantize it.
    """
    scheme, decided_by = config.scheme_for_names(module_names)
    if scheme is None:
        return None, decided_by, f"skipped by {decided_by}"
    if decided_by == "default" and float_reader is not None:
        return None, decided_by, f"tied to {float_reader}, which reads it in float (a rule naming it quantizes it)"
    return scheme, decided_by, None


TRAINABLE = "trainable: requires grad (an adapter or an unfrozen weight); quantized weights get no gradient"


def plan_sites(sites: Sequence[LinearSite], config: QuantConfig, quantize_trainable: bool = False) -> list[SitePlan]:
    """A scheme or a skip reason for every site, in order.

    A weight with several names (a tied head) is decided on all of them
    (:meth:`QuantConfig.scheme_for_names`). Weights that require grad while grad is enabled
    stay float unless ``quantize_trainable``.
    """
    plans = []
    for site in sites:
        problem = _site_problem(site) or _weight_problem(site)
        if problem is not None:
            plans.append(SitePlan(site, None, problem, "site"))
            continue
        scheme, decided_by, skip = decide_weight(config, site.module_names, float_reader(site.weight_names))
        if scheme is None:
            plans.append(SitePlan(site, None, skip, decided_by))
            continue
        if _is_trainable(site) and not quantize_trainable:
            plans.append(SitePlan(site, None, TRAINABLE, "site"))
            continue
        reason = scheme.unsupported_reason(site.shape, site.dtype)
        if reason is not None:
            plans.append(SitePlan(site, None, f"{scheme.kind}: {reason}", decided_by))
            continue
        plans.append(SitePlan(site, scheme, None, decided_by))
    return plans


# (module, weight name, weight, scheme or None: kept float)
LinearDecision = tuple[nn.Module, str, nn.Parameter, Scheme | None]


def linear_decisions(root: nn.Module, config: QuantConfig, include_meta: bool = False) -> list[LinearDecision]:
    """``(module, weight name, weight, scheme or None)`` for every plain linear under ``root``.

    Decided as :func:`plan_sites` decides a site, from the module tree alone (names, ties, shape and
    dtype), so it covers linears that no graph has shown qcompile yet; whether the weight is trainable
    is left to the caller, as it depends on the grad mode of each call. Weights on the meta device are
    left out unless ``include_meta``.
    """
    aliases = parameter_aliases(root)
    out = []
    for module_name, module in root.named_modules():
        linear = linear_weight_of(module)
        if linear is None or not isinstance(linear[0], nn.Parameter):
            continue
        if linear[0].device.type == "meta" and not include_meta:
            continue
        weight, stored_in_out = linear
        names = WeightNames(tuple(aliases.get(id(weight), [f"{module_name}.weight"])), root)
        scheme, _, _ = decide_weight(config, names.module_names, float_reader(names))
        shape = tuple(weight.shape[::-1]) if stored_in_out else tuple(weight.shape)
        if scheme is not None and (len(shape) != 2 or scheme.unsupported_reason(shape, weight.dtype) is not None):
            scheme = None
        out.append((module, names.names[0], weight, scheme))
    return out
