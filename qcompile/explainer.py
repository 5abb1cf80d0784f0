"""The function behind ``qcompile.explain``: the quantization plan of a model, without packing or compiling kernels.

The module is not named ``explain`` so that importing it never shadows the function on the package."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

from qcompile import config as config_module
from qcompile.config import QuantConfig
from qcompile.fallback import strip_expect_quantized
from qcompile.passes.sites import find_linear_sites
from qcompile.report import Plan, PlanRow, rows_for


def explain(
    model: torch.nn.Module | Any,
    *example_inputs: Any,
    config: str | os.PathLike[str] | Mapping[str, Any] | QuantConfig | None = None,
    dynamic: bool | None = None,
    **example_kwargs: Any,
) -> Plan:
    """The plan qcompile would apply to ``model`` called on ``example_inputs``.

    Dynamo captures the model (the call runs once, eagerly, under ``torch.no_grad``);
    each linear site gets a row: module name, shape, scheme and bytes before and
    after, or the reason it is skipped. Nothing is packed. ``print(plan)`` shows a table.
    """
    quant_config = config_module.load(config)
    rows: list[PlanRow] = []
    seen: set[int] = set()

    def capture(gm: torch.fx.GraphModule, inputs: list[Any]) -> Any:
        strip_expect_quantized(gm)  # a model compiled with qcompile before: its guards' markers
        plans = quant_config.plan(find_linear_sites(gm, inputs))
        graph_id = gm.meta.get("dynamo_compile_id")
        rows.extend(rows_for(plans, str(graph_id) if graph_id is not None else str(len(rows)), seen))
        return gm.forward

    compiled = torch.compile(model, backend=capture, dynamic=dynamic)
    with torch.no_grad():
        compiled(*example_inputs, **example_kwargs)
    return Plan(tuple(rows))
