"""Never silently unquantized: a module qcompile quantized that runs in float outside qcompile's graphs is reported.

Each test forces one way it can happen (dynamo's recompile limit, another backend compiling the same
instance) and checks the report, or checks that the guard stays out of the way where nothing is wrong.
"""

import warnings

import pytest
import torch

import qcompile
from qcompile import NF4, QuantConfig
from qcompile.fallback import FloatFallbackWarning
from qcompile.reference import dequantized_model
from tests.models import MLP

CONFIG = QuantConfig(default=NF4(double_quant=True, compute_dtype=torch.float32))


def compiled_mlp(**options):
    model = MLP().eval()
    graphs = []

    def inner(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(model, backend="qcompile", dynamic=False,
                             options={"config": CONFIG, "inner": inner, **options})
    return model, compiled, graphs


@torch.no_grad()
def test_recompile_limit_fallback_raises_naming_the_module():
    model, compiled, _ = compiled_mlp()
    compiled(torch.randn(2, 64))
    with torch._dynamo.config.patch(recompile_limit=1):
        with pytest.raises(RuntimeError, match=r"fc1 ran in float although qcompile quantized its weight fc1\.weight"):
            compiled(torch.randn(3, 64))  # a new shape, no recompile allowed: dynamo runs forward as Python


@torch.no_grad()
def test_recompile_limit_fallback_warns_once_when_asked_and_runs_float():
    model, compiled, _ = compiled_mlp(on_fallback="warn")
    compiled(torch.randn(2, 64))
    x = torch.randn(3, 64)
    with torch._dynamo.config.patch(recompile_limit=1), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = compiled(x)
        compiled(x)
    fallbacks = [w for w in caught if issubclass(w.category, FloatFallbackWarning)]
    assert len(fallbacks) == 1, [str(w.message) for w in caught]
    assert "fc1" in str(fallbacks[0].message)
    torch.testing.assert_close(out, model(x))  # what the warning says: the float model ran


@torch.no_grad()
def test_plain_eager_calls_of_the_original_model_are_left_alone():
    model, compiled, _ = compiled_mlp()
    x = torch.randn(2, 64)
    quantized = compiled(x)
    eager = model(x)  # the user's float model, called on purpose: no torch.compile on the stack
    assert not torch.allclose(quantized, eager)
    float_part = torch.compiler.disable(lambda t: model(t))  # the user's explicit choice, inside a compiled region
    torch.testing.assert_close(torch.compile(lambda t: float_part(t) + 1, backend="eager")(x), eager + 1)


@torch.no_grad()
def test_another_backend_compiling_the_instance_raises():
    model, compiled, _ = compiled_mlp()
    x = torch.randn(2, 64)
    compiled(x)
    with pytest.raises(RuntimeError, match=r"fc1 ran in float .* compiled by another torch.compile backend"):
        torch.compile(model, backend="eager")(x)


@torch.no_grad()
def test_nested_compile_outer_backend_wins_and_is_reported():
    """transformers' generate() compiles __call__ around a forward the user compiled with qcompile."""
    model, compiled, _ = compiled_mlp()
    x = torch.randn(2, 64)
    compiled(x)
    outer = torch.compile(lambda t: compiled(t) + 1, backend="aot_eager")
    with pytest.raises(RuntimeError, match="compiled by another torch.compile backend"):
        outer(x)


@torch.no_grad()
def test_guards_add_no_recompile_and_qcompile_strips_their_markers():
    model, compiled, graphs = compiled_mlp()
    x = torch.randn(2, 64)
    compiled(x)
    compiled(torch.randn(2, 64))
    assert len(graphs) == 1  # installing the hooks after the first trace did not fail its guards
    y = torch.randn(7, 64)
    out = compiled(y)  # a recompile traces the hooks: their markers must be gone
    assert len(graphs) == 2
    assert not any(n.target is torch.ops.qcompile.expect_quantized.default for n in graphs[1].graph.nodes)
    assert any(n.target is torch.ops.qcompile.quantized_linear.default for n in graphs[1].graph.nodes)
    torch.testing.assert_close(out, dequantized_model(model, CONFIG)(y), rtol=1e-5, atol=1e-5)
    plan = qcompile.explain(model, x, config=CONFIG)  # explain captures the guarded model too
    assert {row.module for row in plan.quantized} == {"fc1", "fc2"}  # QuantConfig's default rule skips lm_head


@torch.no_grad()
def test_hook_traced_by_another_backend_carries_the_marker_through_inductor():
    """The marker survives dead-code elimination: inductor keeps and runs it."""
    model, compiled, _ = compiled_mlp(on_fallback="warn")
    x = torch.randn(2, 64)
    compiled(x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = torch.compile(model, backend="inductor")(x)
    assert any(issubclass(w.category, FloatFallbackWarning) for w in caught)
    torch.testing.assert_close(out, model(x))


def test_expect_quantized_passes_opcheck():
    x = torch.randn(2, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FloatFallbackWarning)
        torch.library.opcheck(torch.ops.qcompile.expect_quantized.default, (x, "fc1.weight", "warn"))


def test_on_fallback_option_is_checked():
    with pytest.raises(ValueError, match="options.on_fallback: 'ignore' is not allowed; allowed: error, warn"):
        qcompile.make_backend(on_fallback="ignore")


class TwoPaths(torch.nn.Module):
    """``b`` runs only when asked: the first graph never shows it to qcompile."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)

    def forward(self, x, use_b: bool):
        return self.b(x) if use_b else self.a(x)


@torch.no_grad()
def test_a_linear_no_graph_showed_qcompile_is_still_guarded():
    model = TwoPaths().eval()
    compiled = torch.compile(model, backend="qcompile", options={"config": CONFIG, "inner": "eager"})
    x = torch.randn(2, 64)
    compiled(x, False)
    with torch._dynamo.config.patch(recompile_limit=1):
        with pytest.raises(RuntimeError, match=r"b ran in float although qcompile quantized its weight b\.weight"):
            compiled(x, True)  # dynamo may not compile the new path: b would run in float, never planned


@torch.no_grad()
def test_guards_follow_the_config_and_the_grad_mode():
    """No report where the plan itself keeps the weight float: a skip rule, or a trainable weight under grad."""
    from qcompile import Rule

    model = TwoPaths().eval()
    config = QuantConfig(default=CONFIG.default, rules=(Rule("b", None),))
    compiled = torch.compile(model, backend="qcompile", options={"config": config, "inner": "eager"})
    x = torch.randn(2, 64)
    compiled(x, False)
    with torch._dynamo.config.patch(recompile_limit=1):
        torch.testing.assert_close(compiled(x, True), model(x, True))  # b is float by the config: no report
    model.a.weight.requires_grad_(True)
    with torch.enable_grad(), torch._dynamo.config.patch(recompile_limit=1):
        compiled(torch.randn(3, 5, 64), False)  # a trainable weight under grad is float by the plan: no report


class _CheckpointedWithSideEffect(torch.nn.Module):
    """A layer run under activation checkpointing whose forward has a side effect dynamo cannot keep inside
    the checkpoint (transformers 5.25's ``kernels`` layers set a context variable): dynamo runs the checkpoint
    eagerly, with itself disabled, inside the compiled forward."""

    def __init__(self):
        super().__init__()
        self.fc_in = torch.nn.Linear(64, 64)
        self.fc = torch.nn.Linear(64, 64)
        self.lm_head = torch.nn.Linear(64, 8)
        self.calls = {"n": 0}

    def _inner(self, h):
        self.calls["n"] += 1
        return torch.relu(self.fc(h))

    def forward(self, x):
        h = torch.utils.checkpoint.checkpoint(self._inner, self.fc_in(x), use_reentrant=False)
        return self.lm_head(h)


@pytest.mark.parametrize("on_fallback", ["error", "warn"])
def test_a_layer_run_by_eager_checkpointing_inside_the_compiled_forward_is_reported(on_fallback):
    torch.manual_seed(0)
    model = _CheckpointedWithSideEffect().train()
    model.requires_grad_(False)
    model.lm_head.weight.requires_grad_(True)
    compiled = torch.compile(model, backend="qcompile", options={"inner": "eager", "on_fallback": on_fallback})
    x = torch.randn(4, 64, requires_grad=True)
    if on_fallback == "error":
        with pytest.raises(RuntimeError, match=r"fc ran in float although qcompile quantized its weight fc.weight"):
            for _ in range(2):
                compiled(x).sum().backward()
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            compiled(x).sum().backward()
    assert any(issubclass(w.category, FloatFallbackWarning) and "fc ran in float" in str(w.message) for w in caught)
