"""``qcompile.quantize``: packing ahead, no float copy left, the backend reusing the packed forms.

Outputs are compared with ``qcompile.reference.dequantized_model`` of a float copy (same packing, same
compute), and the float model's outputs are checked to differ, so a model that kept running in float
fails. Memory is checked by the storage each tensor really holds (``qcompile.memory_footprint``).
"""

from __future__ import annotations

import copy

import pytest
import torch

import qcompile
from qcompile.pack_cache import cached_packed_weights, is_released
from qcompile.reference import dequantized_model
from tests.models import tiny_llama

transformers = pytest.importorskip("transformers")

CONFIG = qcompile.QuantConfig()  # NF4 + double quant, bf16 compute, lm_head float
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _ids(batch: int = 2, seq: int = 9) -> torch.Tensor:
    return torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(0))


def _compiled_logits(model, config=CONFIG, plans=None, **kwargs):
    torch._dynamo.reset()
    options = {"config": config, "inner": "eager", "on_plan": (plans if plans is not None else []).append}
    compiled = torch.compile(model, backend="qcompile", options=options)
    with torch.no_grad():
        return compiled(**kwargs).logits


def _projection_weights(model):
    return {n: p for n, p in model.named_parameters() if n.rsplit(".", 2)[-2] in PROJECTIONS}


def test_quantize_packs_every_projection_and_keeps_no_float_copy():
    model = tiny_llama()
    reference = dequantized_model(copy.deepcopy(model), CONFIG)
    float_model = copy.deepcopy(model)
    before = qcompile.memory_footprint(model)
    result = qcompile.quantize(model, CONFIG)

    weights = _projection_weights(model)
    assert sorted(result.packed) == sorted(weights) and len(weights) == 2 * len(PROJECTIONS)
    assert result.kept_float == ()
    for name, p in weights.items():
        assert is_released(p), name
        assert p.untyped_storage().nbytes() == p.element_size()  # one NaN, broadcast
        assert not p.requires_grad
    assert not is_released(model.lm_head.weight)

    after = qcompile.memory_footprint(model)
    float_weight_bytes = sum(p.numel() * p.element_size() for p in weights.values())
    assert after.packed_bytes == result.packed_bytes > 0
    assert before.float_bytes - after.float_bytes == float_weight_bytes - len(weights) * 4
    assert after.released_weights == after.packed_weights == len(weights)
    assert after.total_bytes < before.total_bytes

    packed_before = {n: cached_packed_weights(p)[0] for n, p in weights.items()}
    plans = []
    ids = _ids()
    out = _compiled_logits(model, plans=plans, input_ids=ids)
    with torch.no_grad():
        assert torch.equal(out, reference(input_ids=ids).logits)
        assert not torch.allclose(out, float_model(input_ids=ids).logits, atol=1e-3)
    # The backend used the packed forms made by quantize(): nothing was packed again.
    assert all(cached_packed_weights(p) == [packed_before[n]] for n, p in weights.items())
    rows = [r for plan in plans for r in plan.rows if r.quantized]
    assert len(rows) == len(weights)
    assert all("packed ahead" in (r.release or "") for r in rows)
    assert plans[0].footprint is not None and plans[0].footprint.released_weights == len(weights)
    assert "model holds" in plans[0].table()


def test_eager_call_after_quantize_raises_naming_the_module():
    model = tiny_llama()
    qcompile.quantize(model, CONFIG)
    with pytest.raises(RuntimeError, match=r"model\.layers\.0\.self_attn\.q_proj\.weight holds no float data"):
        with torch.no_grad():
            model(input_ids=_ids())


def test_compiling_with_another_config_than_quantize_used_is_an_error():
    model = tiny_llama()
    qcompile.quantize(model, CONFIG)
    other = qcompile.QuantConfig(default=qcompile.FP4())
    with pytest.raises(Exception, match="released .*cannot be packed with"):
        _compiled_logits(model, config=other, input_ids=_ids())
    skip_all = qcompile.QuantConfig(default=None)
    with pytest.raises(Exception, match="reads it outside a quantized linear"):
        _compiled_logits(model, config=skip_all, input_ids=_ids())


def test_quantize_again_is_a_no_op_with_the_same_config_and_an_error_with_another():
    model = tiny_llama()
    qcompile.quantize(model, CONFIG)
    assert qcompile.quantize(model, CONFIG).packed == ()
    with pytest.raises(ValueError, match="already quantized"):
        qcompile.quantize(model, qcompile.QuantConfig(default=qcompile.FP4()))


def test_meta_weights_need_a_checkpoint():
    from accelerate import init_empty_weights

    with init_empty_weights():
        empty = transformers.LlamaForCausalLM(tiny_llama().config)
    with pytest.raises(ValueError, match="meta device .*checkpoint="):
        qcompile.quantize(empty, CONFIG)


@pytest.mark.parametrize("shards", ["one", "several"])
def test_quantize_while_loading_a_checkpoint_equals_quantizing_in_memory(tmp_path, shards):
    pytest.importorskip("safetensors")
    from accelerate import init_empty_weights

    model = tiny_llama()
    model.save_pretrained(tmp_path, max_shard_size="40KB" if shards == "several" else "1GB")
    files = sorted(tmp_path.glob("*.safetensors"))
    assert (len(files) > 1) == (shards == "several")
    in_memory = copy.deepcopy(model)
    qcompile.quantize(in_memory, CONFIG)

    with init_empty_weights():
        empty = transformers.LlamaForCausalLM(model.config).eval()
    result = qcompile.quantize(empty, CONFIG, checkpoint=tmp_path)
    assert sorted(result.packed) == sorted(_projection_weights(empty))
    assert not [n for n, p in empty.named_parameters() if p.device.type == "meta"]
    for name, p in _projection_weights(empty).items():
        assert is_released(p), name
        ours, theirs = cached_packed_weights(p)[0], cached_packed_weights(dict(in_memory.named_parameters())[name])[0]
        assert torch.equal(ours.packed, theirs.packed) and torch.equal(ours.absmax, theirs.absmax), name
    ids = _ids()
    assert torch.equal(_compiled_logits(empty, input_ids=ids), _compiled_logits(in_memory, input_ids=ids))


def test_checkpoint_that_does_not_match_the_model_is_an_error(tmp_path):
    pytest.importorskip("safetensors")
    from accelerate import init_empty_weights

    tiny_llama().save_pretrained(tmp_path)
    wider = tiny_llama().config
    wider.intermediate_size = 256
    with init_empty_weights():
        empty = transformers.LlamaForCausalLM(wider)
    with pytest.raises(ValueError, match=r"_proj\.weight: checkpoint shape \(\d+, \d+\) != model shape"):
        qcompile.quantize(empty, CONFIG, checkpoint=tmp_path)

    deeper = tiny_llama(layers=3).config
    with init_empty_weights():
        empty = transformers.LlamaForCausalLM(deeper)
    with pytest.raises(ValueError, match=r"model\.layers\.2\..*not in .*parameters missing"):
        qcompile.quantize(empty, CONFIG, checkpoint=tmp_path)
    assert not any(is_released(p) for p in empty.parameters())  # checked before anything was loaded
    with pytest.raises(ValueError, match="no such file"):
        qcompile.quantize(empty, CONFIG, checkpoint=tmp_path / "nothing")


def test_gpt2_conv1d_and_a_quantized_tied_head_keep_what_the_embedding_reads():
    config = transformers.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                     tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    with_head = qcompile.QuantConfig(rules=(qcompile.Rule("lm_head", qcompile.NF4()),))
    reference = dequantized_model(copy.deepcopy(model), with_head)
    result = qcompile.quantize(model, with_head)
    assert result.kept_float == ("transformer.wte.weight",)  # the tied head: the embedding reads it in float
    assert not is_released(model.lm_head.weight) and cached_packed_weights(model.lm_head.weight)
    assert is_released(model.transformer.h[0].attn.c_attn.weight)  # Conv1D, stored (in, out)
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(_compiled_logits(model, config=with_head, input_ids=ids), reference(input_ids=ids).logits)


def test_qlora_on_a_quantized_base_trains_only_the_adapters():
    peft = pytest.importorskip("peft")
    base = tiny_llama().train()
    base.config.use_cache = False
    reference = dequantized_model(copy.deepcopy(base), CONFIG)
    qcompile.quantize(base, CONFIG)
    lora = peft.LoraConfig(r=8, lora_alpha=16, target_modules=list(PROJECTIONS), lora_dropout=0.0)
    model = peft.get_peft_model(base, lora)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    torch._dynamo.reset()
    plans = []
    compiled = torch.compile(model, backend="qcompile",
                             options={"config": CONFIG, "inner": "eager", "on_plan": plans.append})
    ids = _ids()
    out = compiled(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    assert sum(r.quantized for plan in plans for r in plan.rows) == 2 * len(PROJECTIONS)
    with torch.no_grad():  # LoRA B starts at zero: the first logits are the quantized base's
        assert torch.allclose(out.logits, reference(input_ids=ids).logits, atol=1e-5)


def test_quantize_to_a_device_moves_the_rest_and_keeps_ties():
    config = transformers.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                     tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    reference = dequantized_model(copy.deepcopy(model), CONFIG)
    result = qcompile.quantize(model, CONFIG, device="cpu")  # the one device here: the move path, at least
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert all(is_released(model.get_parameter(name)) for name in result.packed)
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(_compiled_logits(model, input_ids=ids), reference(input_ids=ids).logits)
