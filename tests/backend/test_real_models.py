"""Real transformers models, built from configs with random weights, compiled with the seed JSON.

For each: the plan's names are ``named_modules()`` names, the heads (``lm_head``, and tied output
embeddings) stay float, every other linear is quantized, and the output equals
``qcompile.reference.dequantized_model`` (same quantize/dequantize, same bf16 compute).
"""

from pathlib import Path

import pytest
import torch
from torch import nn

import qcompile
from qcompile.passes.sites import linear_weight_of
from qcompile.reference import dequantized_model

transformers = pytest.importorskip("transformers")

SEED_JSON = Path(__file__).parents[2] / "examples" / "bnb_nf4.json"
SMALL = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "max_position_embeddings": 64}


def llama(tied):
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL, num_key_value_heads=2,
                                                                   tie_word_embeddings=tied))


def mistral(tied):
    return transformers.MistralForCausalLM(transformers.MistralConfig(**SMALL, num_key_value_heads=2,
                                                                       tie_word_embeddings=tied))


def qwen2(tied):
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**SMALL, num_key_value_heads=2,
                                                                   tie_word_embeddings=tied))


def phi(tied):
    return transformers.PhiForCausalLM(transformers.PhiConfig(**SMALL, tie_word_embeddings=tied))


def gpt2(tied):
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64, tie_word_embeddings=tied))


def bert(tied):
    return transformers.BertForMaskedLM(transformers.BertConfig(**SMALL, tie_word_embeddings=tied))


def t5(tied):
    return transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=128, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, tie_word_embeddings=tied))


CASES = [(build, tied) for build in (llama, mistral, qwen2, phi, gpt2, bert, t5) for tied in (False, True)]


def inputs_for(model):
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    if model.config.is_encoder_decoder:
        return {"input_ids": ids, "decoder_input_ids": ids[:, :5]}
    return {"input_ids": ids}


def heads(model):
    """Modules whose weight transformers + bitsandbytes keep in float: lm_head and tied output embeddings."""
    tied = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    return {name for name, m in model.named_modules()
            if linear_weight_of(m) and ("lm_head" in name or id(linear_weight_of(m)[0]) in tied)}


@pytest.mark.parametrize(("build", "tied"), CASES, ids=[f"{b.__name__}-{'tied' if t else 'untied'}" for b, t in CASES])
def test_real_model_names_heads_and_outputs(build, tied):
    torch.manual_seed(0)
    model = build(tied).eval()
    inputs = inputs_for(model)
    config = qcompile.QuantConfig.from_file(SEED_JSON)
    plans = []
    compiled = torch.compile(model, backend="qcompile",
                             options={"config": config, "inner": "eager", "on_plan": plans.append})
    with torch.no_grad():
        out = compiled(**inputs).logits
        expected = dequantized_model(model, config)(**inputs).logits
        original = model(**inputs).logits
    rows = [r for p in plans for r in p.rows]
    module_names = {name for name, _ in model.named_modules()}
    linears = {name for name, m in model.named_modules() if linear_weight_of(m)}
    assert rows and all(r.module in module_names and set(r.aliases) <= module_names for r in rows)
    assert {r.module for r in rows if r.quantized} == linears - heads(model)
    assert heads(model) or build is bert  # BERT's untied decoder has no head name to skip (see the README)
    assert all(not r.quantized for r in rows if r.module in heads(model) or set(r.aliases) & heads(model))
    rel = ((out.float() - expected.float()).norm() / expected.float().norm()).item()
    assert rel < 1e-2, rel  # bf16 compute on both sides; only rounding differs
    quantization = ((original - expected).norm() / original.norm()).item()
    assert quantization > 1e-3  # and the reference really is quantized
