"""Decide, per linear site, a scheme or a skip with its reason."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING

from qcompile.formats import Scheme
from qcompile.passes.sites import LinearSite

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


def plan_sites(sites: Sequence[LinearSite], config: QuantConfig) -> list[SitePlan]:
    """A scheme or a skip reason for every site, in order."""
    plans = []
    for site in sites:
        problem = _site_problem(site)
        if problem is not None:
            plans.append(SitePlan(site, None, problem, "site"))
            continue
        scheme, decided_by = config.scheme_for(site.module_name or "")
        if scheme is None:
            plans.append(SitePlan(site, None, f"skipped by {decided_by}", decided_by))
            continue
        reason = scheme.unsupported_reason(site.shape, site.dtype)
        if reason is not None:
            plans.append(SitePlan(site, None, f"{scheme.kind}: {reason}", decided_by))
            continue
        plans.append(SitePlan(site, scheme, None, decided_by))
    return plans
