"""Insert a call that observes each chosen linear's input, for calibration (``qcompile.calibrate``).

Before every site whose weight ``observe`` wants (``wanted(parameter)``), the graph calls
``observe(x, weight, input_key)`` with the site's input, the weight the call was given and a text naming
the input's graph node (sites that read one node share it: q, k and v); the linear itself is left as
it is. The graph must run without dead-code elimination (calibration compiles with the eager
inner compiler), since the observer's result is unused.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import fx

from qcompile.passes.sites import LinearSite


def observe_linears(gm: fx.GraphModule, sites: Sequence[LinearSite],
                    wanted: Callable[[torch.Tensor], bool],
                    observe: Callable[[torch.Tensor, torch.Tensor, str], None]) -> int:
    """Add the observer before every wanted site of ``sites`` (all of ``gm`` or its bodies); returns how many."""
    touched: dict[int, fx.GraphModule] = {}
    count = 0
    for site in sites:
        if site.weight_node is None or site.parameter is None or not wanted(site.parameter):
            continue
        graph = site.node.graph
        with graph.inserting_before(site.node):
            graph.call_function(observe, (site.input, site.weight_node, f"{id(graph)}:{site.input.name}"))
        owner = graph.owning_module or gm
        touched[id(owner)] = owner
        count += 1
    for owner in touched.values():
        owner.recompile()
    return count
