"""The backend end to end: the rewrite fires, outputs match, packed weights are shared."""

import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import qcompile
import qcompile.ops  # noqa: F401  (registers torch.ops.qcompile.*)
from qcompile import NF4, QuantConfig, Rule
from qcompile.pack_cache import cached_packed_weights
from tests.models import MLP, BrokenMLP, dequantized_reference, tiny_llama

ROOT = Path(__file__).parents[2]
SEED_JSON = ROOT / "examples" / "bnb_nf4.json"
FP32_NF4 = NF4(double_quant=True, compute_dtype=torch.float32)
CONFIG = QuantConfig(default=FP32_NF4, rules=(Rule("lm_head", None),))
QCOMPILE_OPS = {torch.ops.qcompile.quantized_linear.default}


class Recorder:
    """Options that record each plan and each rewritten graph (an eager inner compiler)."""

    def __init__(self):
        self.plans, self.graphs = [], []

    def options(self, config=CONFIG, **extra):
        return {"config": config, "inner": self.inner, "on_plan": self.plans.append, **extra}

    def inner(self, gm, example_inputs):
        self.graphs.append(gm)
        return gm.forward

    def op_count(self):
        return sum(1 for gm in self.graphs for n in gm.graph.nodes if n.target in QCOMPILE_OPS)

    @staticmethod
    def packed_bytes(model):
        """Bytes of the packed forms made for the model's parameters."""
        return sum(p.nbytes for param in model.parameters() for p in cached_packed_weights(param))


@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_mlp_rewrite_fires_and_matches_dequantized_model(inner):
    model = MLP().eval()
    x = torch.randn(5, 64)
    plans = []
    compiled = torch.compile(model, backend="qcompile",
                             options={"config": CONFIG, "inner": inner, "on_plan": plans.append})
    with torch.no_grad():
        out = compiled(x)
        expected = dequantized_reference(model, FP32_NF4)(x)
    plan, = plans
    assert [r.module for r in plan.quantized] == ["fc1", "fc2"]
    assert [r.module for r in plan.skipped] == ["lm_head"]
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # and the quantization is real: the float model differs
    assert (out - model(x)).abs().max() > 1e-4


def test_graph_contains_qcompile_ops_not_linears():
    rec = Recorder()
    with torch.no_grad():
        torch.compile(MLP(), backend="qcompile", options=rec.options())(torch.randn(2, 64))
    gm, = rec.graphs
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.qcompile.quantized_linear.default) == 2
    assert targets.count(torch._C._nn.linear) == 1  # lm_head


def test_graph_break_gives_two_rewritten_graphs():
    rec = Recorder()
    model = BrokenMLP().eval()
    x = torch.randn(3, 64)
    with torch.no_grad():
        out = torch.compile(model, backend="qcompile", options=rec.options())(x)
        expected = dequantized_reference(model, FP32_NF4)(x)
    assert len(rec.plans) == 2
    assert [r.module for p in rec.plans for r in p.quantized] == ["fc1", "fc2"]
    assert rec.op_count() == 2
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_recompile_for_new_shape_adds_no_packed_memory():
    rec = Recorder()
    model = MLP().eval()
    compiled = torch.compile(model, backend="qcompile", dynamic=False, options=rec.options())
    with torch.no_grad():
        compiled(torch.randn(2, 64))
        first = rec.packed_bytes(model)
        compiled(torch.randn(7, 64))  # a new static shape: dynamo recompiles
        compiled(torch.randn(3, 5, 64))
    assert len(rec.graphs) >= 2
    assert first > 0
    assert rec.packed_bytes(model) == first
    assert len(cached_packed_weights(model.fc1.weight)) == 1


def test_shared_weight_is_packed_once():
    model = MLP(d_in=128, hidden=128).eval()
    model.fc2.weight = model.fc1.weight  # one parameter behind two linears
    rec = Recorder()
    x = torch.randn(2, 128)
    with torch.no_grad():
        out = torch.compile(model, backend="qcompile", options=rec.options())(x)
        expected = dequantized_reference(model, FP32_NF4)(x)  # both linears quantized there too
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    gm, = rec.graphs
    assert rec.op_count() == 2
    assert len(cached_packed_weights(model.fc1.weight)) == 1
    weights = {n.args[1] for n in gm.graph.nodes if n.target in QCOMPILE_OPS}
    assert len(weights) == 1  # both ops read the one parameter, and its one packed form
    assert [r.aliases for r in rec.plans[0].quantized] == [("fc2",), ("fc2",)]  # fc1 (= fc2), twice
    assert [r.shared for r in rec.plans[0].quantized] == [False, True]
    assert torch.isfinite(out).all()


def test_release_weights_frees_float_data_and_keeps_results():
    model = MLP().eval()
    x = torch.randn(4, 64)
    with torch.no_grad():
        expected = dequantized_reference(model, FP32_NF4)(x)
        compiled = torch.compile(model, backend="qcompile",
                                 options={"config": CONFIG, "inner": "eager", "release_weights": True})
        first = compiled(x)
        second = compiled(x)  # recompiles once: the released weights fail the stride guards
        # the eager model says loudly that its weights are gone, never computes with them
        with pytest.raises(RuntimeError, match=r"fc1\.weight holds no float data"):
            model(x)
    torch.testing.assert_close(first, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(second, expected, rtol=1e-5, atol=1e-5)
    assert model.fc1.weight.untyped_storage().nbytes() == 4  # one float left
    assert model.lm_head.weight.untyped_storage().nbytes() == 32 * 128 * 4  # skipped: kept


def test_llm_int8_config_fires():
    rec = Recorder()
    config = QuantConfig.from_dict({"load_in_8bit": True, "llm_int8_threshold": 6.0})
    model = MLP().eval()
    x = torch.randn(4, 64)
    x[:, 3] = 20.0  # an outlier column
    with torch.no_grad():
        out = torch.compile(model, backend="qcompile", options=rec.options(config))(x)
        ref = model(x)
    assert rec.op_count() == 2
    assert [type(p) for p in cached_packed_weights(model.fc1.weight)][0].__name__ == "PackedInt8"
    assert ((out - ref).norm() / ref.norm()) < 0.05


def test_plan_is_logged(caplog):
    with caplog.at_level(logging.INFO, logger="qcompile"), torch.no_grad():
        torch.compile(MLP(), backend="qcompile", options={"config": CONFIG, "inner": "eager"})(torch.randn(2, 64))
    text = caplog.text
    assert "fc1" in text and "skip: skipped by rule 'lm_head'" in text and "2 of 3 linear sites quantized" in text


@pytest.mark.parametrize(("options", "key"), [
    ({"config": CONFIG, "colour": 1}, "options.colour"),
    ({"config": CONFIG, "kernels": "cuda"}, "options.kernels"),
    ({"config": CONFIG, "inner": "tvm"}, "options.inner"),
    ({"config": CONFIG, "release_weights": "yes"}, "options.release_weights"),
    ({"config": 3}, "config"),
    ({"config": CONFIG, "mode": "fastest"}, "options.mode"),
    ({"config": CONFIG, "mode": "max-autotune", "inner": "eager"}, "options.mode"),
])
def test_bad_options_name_the_key(options, key):
    # a ValueError whose message comes first, not dynamo's BackendCompilerFailed wrapping it
    with pytest.raises(ValueError, match="^" + key.replace(".", r"\.")) as info:
        torch.compile(MLP(), backend="qcompile", options=options)(torch.randn(2, 64))
    assert not isinstance(info.value, torch._dynamo.exc.BackendCompilerFailed)
    # make_backend checks them before anything is compiled
    with pytest.raises(ValueError, match="^" + key.replace(".", r"\.")):
        qcompile.make_backend(**options)


def test_explain_plans_without_packing():
    model = MLP()
    plan = qcompile.explain(model, torch.randn(2, 64), config=CONFIG)
    assert [r.module for r in plan.quantized] == ["fc1", "fc2"]
    assert plan.bytes_before == (64 * 128 + 128 * 128 + 128 * 32) * 4
    assert plan.bytes_after < plan.bytes_before
    assert cached_packed_weights(model.fc1.weight) == []
    table = str(plan)
    assert "fc1" in table and "lm_head" in table and "skip:" in table


def _llama_plan_checks(plans, model):
    names = {r.module for p in plans for r in p.quantized}
    skipped = {r.module for p in plans for r in p.skipped}
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert names == linears - {"lm_head"}
    assert skipped == {"lm_head"}


@pytest.mark.parametrize("dynamic", [False, True])
def test_llama_generate_equals_the_quantized_reference(dynamic):
    """generate() under a compiled forward gives the tokens of the eager quantized reference, not the float ones."""
    from qcompile.reference import dequantized_model

    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    kwargs = {"attention_mask": torch.ones_like(ids), "max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    rec = Recorder()
    with torch.no_grad():
        expected = dequantized_model(model, CONFIG).generate(ids, **kwargs)
        float_tokens = model.generate(ids, **kwargs)
        model.forward = torch.compile(model.forward, backend="qcompile", dynamic=dynamic, options=rec.options())
        out = model.generate(ids, **kwargs)
    _llama_plan_checks(rec.plans, model)
    assert rec.op_count() > 0
    assert not torch.equal(float_tokens, expected)  # so equality below tells quantized from float
    assert torch.equal(out, expected)


def test_llama_matches_dequantized_model_with_inductor():
    model = tiny_llama()
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(0))
    plans = []
    with torch.no_grad():
        expected = dequantized_reference(model, FP32_NF4)(ids).logits
        compiled = torch.compile(model, backend="qcompile", options={"config": CONFIG, "on_plan": plans.append})
        logits = compiled(ids).logits
    _llama_plan_checks(plans, model)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


def test_entry_point_works_without_importing_qcompile(tmp_path):
    script = textwrap.dedent(f"""
        import sys, torch
        model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
        assert "qcompile" not in sys.modules
        # the backend name is resolved through the torch_dynamo_backends entry point
        compiled = torch.compile(model, backend="qcompile", options={{"config": {str(SEED_JSON)!r}, "inner": "eager"}})
        with torch.no_grad():
            out = compiled(torch.randn(3, 64))
        assert out.shape == (3, 8)
        ops = [n for n in sys.modules["qcompile.pack_cache"]._PACKED.values()]
        print("packed", len(ops))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "packed 2" in result.stdout


def test_gradients_reach_input_and_bias_not_the_frozen_weight(caplog):
    """The QLoRA path: backward through quantized linears to the input and biases."""
    model = MLP()
    for linear in (model.fc1, model.fc2):
        linear.weight.requires_grad_(False)  # the base weights are frozen, as peft does
    x = torch.randn(4, 64, requires_grad=True)
    reference = dequantized_reference(model, FP32_NF4)
    rec = Recorder()
    with caplog.at_level(logging.WARNING, logger="qcompile"):
        out = torch.compile(model, backend="qcompile", options=rec.options())(x)
    assert rec.op_count() == 2
    out.square().sum().backward()
    grad_x = x.grad.clone()
    x.grad = None
    reference(x).square().sum().backward()
    torch.testing.assert_close(grad_x, x.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.fc1.bias.grad, reference.fc1.bias.grad, rtol=1e-5, atol=1e-5)
    assert model.fc1.weight.grad is None
    assert model.lm_head.weight.grad is not None  # skipped, so still trained
    assert "require grad" not in caplog.text


def test_trainable_weights_stay_float_and_the_user_is_told(caplog):
    model = MLP()
    x = torch.randn(4, 64, requires_grad=True)
    rec = Recorder()
    with caplog.at_level(logging.WARNING, logger="qcompile"):
        out = torch.compile(model, backend="qcompile", options=rec.options())(x)
    assert rec.op_count() == 0
    assert "2 weights stay float because they require grad" in caplog.text  # lm_head: skipped by rule
    torch.testing.assert_close(out, model(x))
    torch._dynamo.reset()
    with caplog.at_level(logging.WARNING, logger="qcompile"):
        torch.compile(model, backend="qcompile", options=rec.options(quantize_trainable=True))(x)
    assert rec.op_count() == 2 and "2 quantized weights require grad but will get no gradient" in caplog.text


def test_seed_config_bf16_compute_matches_reference_model():
    """With bf16 compute the eager reference must compute in bf16 too; then only float rounding remains."""
    from qcompile.reference import dequantized_model

    config = QuantConfig.from_file(SEED_JSON)
    model = MLP().eval()
    x = torch.randn(6, 64)
    with torch.no_grad():
        out = torch.compile(model, backend="qcompile", options={"config": config})(x)
        expected = dequantized_model(model, config)(x)
    assert [type(m).__name__ for m in dequantized_model(model, config).children()] == \
        ["DequantizedLinear", "DequantizedLinear", "Linear"]
    torch.testing.assert_close(out, expected, rtol=1e-3, atol=1e-3)


def test_release_keeps_a_weight_something_else_reads():
    """A weight tied to an embedding is quantized for the linear but must stay for the lookup."""

    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(64, 32)
            self.out = torch.nn.Linear(32, 64, bias=False)
            self.out.weight = self.embed.weight

        def forward(self, ids):
            return self.out(self.embed(ids))

    model = Tied()
    ids = torch.tensor([[1, 5, 9]])
    rec = Recorder()
    with torch.no_grad():
        config = QuantConfig(default=FP32_NF4, rules=(Rule("out", FP32_NF4),))  # the default keeps tied heads
        compiled = torch.compile(model, backend="qcompile", options=rec.options(config, release_weights=True))
        first, second = compiled(ids), compiled(ids)
    assert rec.op_count() == 1
    assert model.embed.weight.untyped_storage().nbytes() == 64 * 32 * 4
    torch.testing.assert_close(first, second)
    assert torch.isfinite(first).all()


def test_inductor_mode_passes_through_options():
    model = MLP().eval()
    x = torch.randn(2, 64)
    plans = []
    options = {"config": CONFIG, "mode": "max-autotune-no-cudagraphs", "on_plan": plans.append}
    with torch.no_grad():
        out = torch.compile(model, backend="qcompile", options=options)(x)
        expected = dequantized_reference(model, FP32_NF4)(x)
    assert len(plans[0].quantized) == 2
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_public_names_stay_functions_whatever_is_imported_first():
    import importlib

    for module in ("qcompile.explainer", "qcompile.report", "qcompile.formats.pack", "qcompile.config"):
        importlib.import_module(module)
    assert callable(qcompile.explain) and callable(qcompile.pack)
    assert qcompile.Plan.__name__ == "Plan" and qcompile.QuantConfig.__name__ == "QuantConfig"
