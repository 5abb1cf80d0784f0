"""``qcompile::expect_quantized``: the marker a quantized module's guard puts into every graph dynamo traces.

qcompile's backend removes it before planning; a graph compiled by any other backend runs it, which
raises or warns that the module runs in float there (``qcompile/fallback.py`` explains the mechanism).
It has a side effect as far as fx and inductor know, so that no dead-code pass drops it.
"""

from __future__ import annotations

import torch

from qcompile.fallback import foreign_graph_ran

SCHEMA = "(Tensor x, str name, str on_fallback) -> ()"


@torch.library.custom_op("qcompile::expect_quantized", mutates_args=(), schema=SCHEMA)
def expect_quantized(x: torch.Tensor, name: str, on_fallback: str) -> None:
    """Report that ``name``'s module runs in a graph qcompile did not compile (``x``: its input, for the device)."""
    foreign_graph_ran(name, on_fallback)


@expect_quantized.register_fake
def _(x, name, on_fallback):
    return None


torch.fx.node.has_side_effect(torch.ops.qcompile.expect_quantized.default)
