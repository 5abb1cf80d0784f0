"""The site finder: every linear form, the module name from the dynamo source, and the planner's skips."""

import pytest
import torch
from torch import fx, nn

from qcompile import NF4, QuantConfig, Rule
from qcompile.passes.sites import find_linear_sites


def capture(model, *inputs):
    """The linear sites of each graph dynamo captures, found inside the backend call.

    Dynamo drops the placeholders' source metadata once the backend returns, so the
    finder must run where the real backend runs it.
    """
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(find_linear_sites(gm, example_inputs))
        return gm.forward

    torch.compile(model, backend=backend)(*inputs)
    return graphs


class Forms(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 16)
        self.kin = nn.Parameter(torch.randn(16, 8))  # (in, out), used as h @ kin
        self.wout = nn.Parameter(torch.randn(16, 8))  # (out, in), used as a @ wout.t()
        self.bias = nn.Parameter(torch.randn(16))
        self.register_buffer("buf", torch.randn(16, 8))

    def forward(self, x):
        h = self.fc(x)  # linear
        a = h @ self.kin  # matmul with a transposed parameter
        b = torch.addmm(self.bias, a, self.wout.t())  # addmm in linear layout
        c = torch.nn.functional.linear(b, (self.kin * 2).t())  # computed weight
        d = a @ self.buf.t()  # a buffer, not a parameter
        e = torch.matmul(a, self.wout.t())  # matmul in linear layout
        return h.sum() + a.sum() + b.sum() + c.sum() + d.sum() + e.sum()


def test_finds_every_form_and_resolves_names():
    model = Forms()
    sites, = capture(model, torch.randn(4, 8))
    by_form = {}
    for s in sites:
        by_form.setdefault(s.form, []).append(s)
    linear = [s for s in by_form["linear"] if s.module_name == "fc"][0]
    assert linear.is_parameter and linear.shape == (16, 8) and linear.parameter is model.fc.weight
    kin = [s for s in by_form["matmul"] if s.param_name == "kin"][0]
    assert kin.transposed and kin.shape == (8, 16) and kin.parameter is model.kin
    addmm, = by_form["addmm"]
    assert addmm.param_name == "wout" and not addmm.transposed and addmm.shape == (16, 8) and addmm.bias is not None
    wout = [s for s in by_form["matmul"] if s.param_name == "wout"][0]
    assert not wout.transposed and wout.shape == (16, 8)
    buffer_site = [s for s in by_form["matmul"] if s.param_name == "buf"][0]
    assert not buffer_site.is_parameter
    computed = [s for s in by_form["linear"] if s.module_name != "fc"][0]
    assert not computed.is_parameter


def test_plan_records_reasons():
    model = Forms()
    sites, = capture(model, torch.randn(4, 8))
    with torch.no_grad():
        plans = QuantConfig(default=NF4(), rules=(Rule("fc", None),)).plan(sites)
    reasons = {(p.site.qualified_name if p.site.is_parameter else p.site.form): p.skip_reason for p in plans}
    assert reasons["fc.weight"] == "skipped by rule 'fc'"
    assert reasons["kin"] is None
    assert "not a module parameter" in [p.skip_reason for p in plans if p.site.param_name == "buf"][0]
    computed, = [p for p in plans if p.site.form == "linear" and p.site.module_name != "fc"]
    assert computed.skip_reason == "weight is computed in the graph, not a parameter"


def test_trainable_weights_stay_float_unless_asked():
    model = Forms()
    model.kin.requires_grad_(False)
    sites, = capture(model, torch.randn(4, 8))
    config = QuantConfig(default=NF4(), rules=())
    plans = {p.site.qualified_name: p for p in config.plan(sites) if p.site.is_parameter}
    assert plans["kin"].quantized
    assert plans["fc.weight"].skip_reason.startswith("trainable: requires grad")
    with torch.no_grad():
        assert config.plan(sites)[0].quantized  # inference: grad is off, nothing is trained
    assert config.plan(sites, quantize_trainable=True)[0].quantized


def test_unsupported_dtype_and_shape_are_skipped_with_reason():
    model = nn.Linear(8, 4).to(torch.float64)
    sites, = capture(model, torch.randn(2, 8, dtype=torch.float64))
    plan, = QuantConfig(default=NF4(), rules=()).plan(sites, quantize_trainable=True)
    assert plan.scheme is None and "float64" in plan.skip_reason


def test_call_module_form():
    model = nn.Sequential(nn.Linear(8, 4))
    gm = fx.symbolic_trace(model)
    site, = find_linear_sites(gm, [])
    assert site.form == "call_module" and site.module_name == "0" and site.parameter is model[0].weight


@pytest.mark.parametrize("bad", [torch.t])
def test_transpose_function_form(bad):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 8))

        def forward(self, x):
            return torch.matmul(x, bad(self.w))

    (site,), = capture(M(), torch.randn(2, 8))
    assert site.param_name == "w" and not site.transposed and site.shape == (4, 8)
