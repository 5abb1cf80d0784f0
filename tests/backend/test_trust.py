"""Every call runs the packed form of the parameter it was given, fresh, under the model's own names.

Each test here reproduces a way a compiled model used to run something other than what its config
says, without telling the user.
"""

from pathlib import Path

import pytest
import torch
from torch import nn

import qcompile
from qcompile import FP4, NF4, QuantConfig, Rule
from qcompile.pack_cache import cached_packed_weights
from qcompile.reference import dequantized_model
from tests.models import MLP, tiny_llama

SEED_JSON = Path(__file__).parents[2] / "examples" / "bnb_nf4.json"
CONFIG = QuantConfig(default=NF4(double_quant=True, compute_dtype=torch.float32), rules=(Rule("lm_head", None),))


def compile_counting(model, config=CONFIG, **options):
    """The compiled model and the list of plans its graphs produced."""
    plans = []
    compiled = torch.compile(model, backend="qcompile",
                             options={"config": config, "inner": "eager", "on_plan": plans.append, **options})
    return compiled, plans


def assert_matches_reference(out, model, x, config=CONFIG):
    expected = dequantized_model(model, config)(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_two_instances_of_one_class_each_run_their_own_weights():
    a, b = MLP().eval(), MLP().eval()
    x = torch.randn(3, 64)
    ca, plans = compile_counting(a)
    cb, _ = compile_counting(b)
    assert_matches_reference(ca(x), a, x)
    assert_matches_reference(cb(x), b, x)
    assert_matches_reference(ca(x), a, x)  # and back
    assert len(plans) == 1  # dynamo reused one graph for both: exactly the case that broke


@torch.no_grad()
def test_two_llamas_share_a_graph_but_not_weights():
    first, second = tiny_llama(seed=0), tiny_llama(seed=1)
    ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(0))
    outs = [torch.compile(m, backend="qcompile", options={"config": CONFIG})(ids).logits for m in (first, second)]
    for model, out in zip((first, second), outs, strict=True):
        torch.testing.assert_close(out, dequantized_model(model, CONFIG)(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("change", ["load_state_dict", "copy_", "to_dtype", "init_"])
@torch.no_grad()
def test_weights_changed_after_compile_are_repacked(change):
    model, donor = MLP().eval(), MLP().eval()
    x = torch.randn(3, 64)
    compiled, _ = compile_counting(model)
    compiled(x)
    if change == "load_state_dict":
        model.load_state_dict(donor.state_dict())
    elif change == "copy_":
        model.fc1.weight.copy_(donor.fc1.weight)
    elif change == "to_dtype":
        model.to(torch.bfloat16)
        x = x.to(torch.bfloat16)
    else:
        nn.init.normal_(model.fc2.weight)
    out = compiled(x)
    assert_matches_reference(out, model, x) if change != "to_dtype" else torch.testing.assert_close(
        out, dequantized_model(model, CONFIG)(x), rtol=2e-2, atol=2e-2)
    assert len(cached_packed_weights(model.fc1.weight)) == 1  # replaced, not added


@torch.no_grad()
def test_writes_through_data_need_invalidate():
    model, donor = MLP().eval(), MLP().eval()
    x = torch.randn(3, 64)
    compiled, _ = compile_counting(model)
    compiled(x)
    model.fc1.weight.data.copy_(donor.fc1.weight)  # .data bypasses the version counter
    assert qcompile.invalidate(model) == 2
    assert_matches_reference(compiled(x), model, x)


@pytest.mark.parametrize("merge", ["merge_and_unload", "merge_adapter"])
@torch.no_grad()
def test_peft_merged_weights_are_repacked_when_the_graph_recompiles(merge, caplog):
    """peft merges a LoRA update into the base weight through ``.data`` (no version bump): the stale packed
    form would run the base without its adapter. The merge changes the modules, dynamo recompiles, and the
    backend finds the changed values."""
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5, generator=torch.Generator().manual_seed(len(name)))
    ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(0))
    compiled, plans = compile_counting(model)
    before = compiled(ids).logits
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    packed_before = cached_packed_weights(q_proj.weight)
    merged = model.merge_and_unload() if merge == "merge_and_unload" else (model.merge_adapter(), model)[1]
    with caplog.at_level("WARNING", logger="qcompile"):
        after = compiled(ids).logits
    assert len(plans) == 2  # the merge recompiled
    warned = [r.getMessage() for r in caplog.records if "changed since it was packed" in r.getMessage()]
    assert len(warned) == 4 and any("layers.0.self_attn.q_proj" in message for message in warned)
    assert cached_packed_weights(q_proj.weight) != packed_before
    reference = dequantized_model(merged.base_model.model if merge == "merge_adapter" else merged, CONFIG)
    torch.testing.assert_close(after, reference(ids).logits, rtol=1e-4, atol=1e-4)
    assert (after - before).abs().max() > 1e-2  # the merged weights were quantized, not the adapter in float


@torch.no_grad()
def test_a_recompile_keeps_the_packed_forms_of_unchanged_weights(caplog):
    model = MLP().eval()
    compiled, plans = compile_counting(model)
    compiled(torch.randn(3, 64))
    packed = cached_packed_weights(model.fc1.weight)
    with caplog.at_level("WARNING", logger="qcompile"):
        compiled(torch.randn(3, 5, 64))  # another rank: a second graph
    assert len(plans) == 2 and "changed since it was packed" not in caplog.text
    assert cached_packed_weights(model.fc1.weight)[0] is packed[0]


def tied_llama():
    model = tiny_llama()
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    return model


@torch.no_grad()
def test_tied_head_is_kept_by_the_default_skip_and_named_both_ways():
    model = tied_llama()
    ids = torch.randint(0, 128, (1, 5))
    compiled, plans = compile_counting(model, str(SEED_JSON))
    compiled(ids)
    head, = [r for p in plans for r in p.rows if "lm_head" in (r.module, *r.aliases)]
    assert {head.module, *head.aliases} == {"lm_head", "model.embed_tokens"}
    assert not head.quantized and "lm_head" in head.skip_reason


@torch.no_grad()
def test_a_rule_on_a_tied_head_applies():
    model = tied_llama()
    ids = torch.randint(0, 128, (1, 5))
    config = QuantConfig(default=CONFIG.default, rules=(Rule("lm_head", FP4(compute_dtype=torch.float32)),))
    compiled, plans = compile_counting(model, config)
    out = compiled(ids).logits
    head, = [r for p in plans for r in p.rows if "lm_head" in (r.module, *r.aliases)]
    assert head.quantized and head.scheme.startswith("fp4")
    torch.testing.assert_close(out, dequantized_model(model, config)(ids).logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(model.model.embed_tokens.weight, model.lm_head.weight)  # the embedding stays float


class TiedAcrossABreak(nn.Module):
    """The embedding reads the weight in one graph, the tied head in another."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(64, 32)
        self.mid = nn.Linear(32, 32)
        self.head = nn.Linear(32, 64, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        h = self.embed(ids)
        torch._dynamo.graph_break()
        return self.head(self.mid(h))


@torch.no_grad()
def test_release_weights_keeps_what_another_graph_reads():
    model = TiedAcrossABreak().eval()
    ids = torch.tensor([[1, 5, 9]])
    config = QuantConfig(default=CONFIG.default, rules=(Rule("head", CONFIG.default),))
    compiled, plans = compile_counting(model, config, release_weights=True)
    first, second, third = compiled(ids), compiled(ids), compiled(ids)  # the second call recompiles
    assert torch.isfinite(third).all()
    torch.testing.assert_close(first, second)
    torch.testing.assert_close(first, third)
    rows = {r.module: r for p in plans for r in p.quantized}
    assert rows["mid"].release.startswith("released")
    assert rows["head"].release.startswith("kept: tied")
    assert model.embed.weight.untyped_storage().nbytes() == 64 * 32 * 4
    assert model.mid.weight.untyped_storage().nbytes() == 4


@torch.no_grad()
def test_released_module_run_eagerly_raises_instead_of_nan():
    model = MLP().eval()
    compiled, _ = compile_counting(model, release_weights=True)
    x = torch.randn(2, 64)
    compiled(x)
    with pytest.raises(RuntimeError, match=r"fc1\.weight holds no float data"):
        model(x)
    torch.testing.assert_close(compiled(x), compiled(x))


def test_autocast_output_dtype_equals_eager():
    model = MLP().eval()
    x = torch.randn(3, 64)
    compiled, plans = compile_counting(model)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        eager = model(x)
        out = compiled(x)
        expected = dequantized_model(model, CONFIG)(x)
    assert plans[0].quantized and eager.dtype == out.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2)


def test_meta_weights_name_the_parameter():
    with torch.device("meta"):
        model = MLP()
    x = torch.randn(2, 64, device="meta")
    plan = qcompile.explain(model, x, config=CONFIG)
    assert not plan.quantized and all("meta device" in r.skip_reason for r in plan.rows)
    with pytest.raises(ValueError, match=r"^fc1\.weight: weight is on the meta device"):
        with torch.no_grad():
            torch.compile(model, backend="qcompile", options={"config": CONFIG})(x)


def test_peft_lora_on_the_seed_json_compiles_and_trains():
    peft = pytest.importorskip("peft")
    model = tiny_llama()
    model = peft.get_peft_model(model, peft.LoraConfig(r=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    compiled, plans = compile_counting(model, str(SEED_JSON))
    loss = compiled(input_ids=ids, labels=ids).loss
    loss.backward()
    rows = [r for p in plans for r in p.rows]
    lora = [r for r in rows if ".lora_" in r.module]
    base = [r for r in rows if r.module.endswith("q_proj.base_layer")]
    assert lora and all(r.skip_reason.startswith("trainable") for r in lora)
    assert base and all(r.quantized for r in base)
    assert all(r.module.startswith("base_model.model.") for r in rows)
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    with torch.no_grad():
        reference = dequantized_model(model, QuantConfig.from_file(SEED_JSON))
        expected = reference(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-2, atol=1e-2)


@torch.no_grad()
def test_peft_lora_for_inference_quantizes_chained_adapter_linears():
    """Under no_grad nothing is trained, so lora_A and lora_B are quantized too: B(A(x)) chains two rewrites."""
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=8, target_modules=["q_proj"], lora_dropout=0.0))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.normal_()  # peft starts B at zero; make the adapter matter
    ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(0))
    config = QuantConfig(default=CONFIG.default, rules=(Rule("*lm_head*", None),))
    compiled, plans = compile_counting(model, config)
    out = compiled(input_ids=ids).logits
    lora = [r for p in plans for r in p.rows if ".lora_" in r.module]
    assert lora and all(r.quantized for r in lora)
    torch.testing.assert_close(out, dequantized_model(model, config)(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
