"""Frames of submodules: a graph break inside a layer, or each layer compiled on its own.

Dynamo then compiles a layer's forward as a frame of its own, and reuses that graph for every other
layer of the same class. Each weight must still be named as in the model (so that rules written
for the model match) and run with its own decision, not the one of the layer that compiled first.
"""

import pytest
import torch
from torch import nn

from qcompile import FP4, NF4, QuantConfig, Rule
from qcompile.reference import dequantized_model

NF4_FP32 = NF4(double_quant=True, compute_dtype=torch.float32)
CONFIG = QuantConfig(default=NF4_FP32, rules=(Rule("blocks.1.*", None), Rule("blocks.2.up", FP4()),
                                               Rule("lm_head", None)))


class Block(nn.Module):
    def __init__(self, graph_break: bool):
        super().__init__()
        self.up, self.down = nn.Linear(32, 64), nn.Linear(64, 32)
        self.graph_break = graph_break

    def forward(self, x):
        h = torch.relu(self.up(x))
        if self.graph_break:
            torch._dynamo.graph_break()
        return x + self.down(h)


class Stack(nn.Module):
    def __init__(self, graph_break: bool = False):
        super().__init__()
        self.blocks = nn.ModuleList([Block(graph_break) for _ in range(3)])
        self.lm_head = nn.Linear(32, 16)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.lm_head(x)


def _run(model, compile_how: str, x):
    plans = []
    options = {"config": CONFIG, "inner": "eager", "on_plan": plans.append}
    if compile_how == "whole":
        out = torch.compile(model, backend="qcompile", options=options)(x)
    else:  # regional compilation: each layer compiled in place
        for block in model.blocks:
            block.compile(backend="qcompile", options=options)
        out = model(x)
    return out, [row for plan in plans for row in plan.rows]


@pytest.mark.parametrize("compile_how", ["whole", "per_layer"])
@torch.no_grad()
def test_layers_in_frames_of_their_own_follow_the_config_by_full_name(compile_how):
    torch.manual_seed(0)
    model = Stack(graph_break=compile_how == "whole").eval()
    x = torch.randn(4, 32)
    out, rows = _run(model, compile_how, x)
    names = {row.module for row in rows}
    assert names and all(name.startswith(("blocks.", "lm_head")) for name in names), names
    expected = dequantized_model(model, CONFIG)(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # What the reference does differently per layer: blocks.1 float, blocks.2.up FP4, the rest NF4.
    all_nf4 = dequantized_model(model, QuantConfig(default=NF4_FP32, rules=(Rule("lm_head", None),)))(x)
    assert not torch.allclose(out, all_nf4, rtol=1e-4, atol=1e-4)
