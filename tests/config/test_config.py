"""QuantConfig loading, round trips, defaults and rule matching."""

import json
from pathlib import Path

import pytest
import torch

from qcompile import FP4, NF4, Int8, QuantConfig, Rule
from qcompile.config import load

EXAMPLES = Path(__file__).parents[2] / "examples"
SEED_JSON = EXAMPLES / "bnb_nf4.json"


def test_seed_bitsandbytes_json_loads_verbatim():
    config = QuantConfig.from_file(SEED_JSON)
    assert config.default == NF4(blocksize=64, double_quant=True, compute_dtype=torch.bfloat16,
                                 quant_storage=torch.uint8)
    # llm_int8_skip_modules null: a causal LM keeps lm_head in its dtype.
    assert config.scheme_for("lm_head")[0] is None
    assert config.scheme_for("model.layers.0.self_attn.q_proj")[0] == config.default


def test_transformers_config_json_with_quantization_config(tmp_path):
    seed = json.loads(SEED_JSON.read_text())
    whole = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "quantization_config": seed}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(whole))
    assert QuantConfig.from_file(path) == QuantConfig.from_file(SEED_JSON)


def test_load_in_8bit_gives_llm_int8_with_threshold():
    config = QuantConfig.from_dict({"load_in_8bit": True, "llm_int8_threshold": 4.5,
                                    "llm_int8_skip_modules": ["out_proj"]})
    assert config.default == Int8(threshold=4.5, has_fp16_weight=False)
    assert config.scheme_for("decoder.out_proj")[0] is None
    assert config.scheme_for("lm_head")[0] == config.default  # an explicit skip list replaces the default


def test_bitsandbytes_defaults_follow_transformers():
    config = QuantConfig.from_dict({"load_in_4bit": True})
    assert config.default == FP4(blocksize=64, double_quant=False, compute_dtype=torch.float32)
    assert QuantConfig.from_dict({"load_in_8bit": True}).default.threshold == 6.0


def test_toml_example_and_rule_order():
    config = QuantConfig.from_file(EXAMPLES / "mixed.toml")
    assert config.scheme_for("lm_head") == (None, "rule 'lm_head'")
    assert config.scheme_for("model.layers.3.mlp.down_proj")[0] == Int8(threshold=6.0)
    assert config.scheme_for("model.layers.3.mlp.up_proj") == (config.default, "default")


@pytest.mark.parametrize("config", [
    QuantConfig(),
    QuantConfig(default=None, rules=(Rule("*.q_proj", FP4(blocksize=128, quant_storage=torch.bfloat16)),)),
    QuantConfig(default=Int8(threshold=0.0), rules=(Rule("a.*", None), Rule("b", NF4()))),
    QuantConfig.from_file(SEED_JSON),
    QuantConfig.from_file(EXAMPLES / "mixed.toml"),
])
def test_round_trip_is_lossless(config, tmp_path):
    as_dict = config.to_dict()
    assert QuantConfig.from_dict(as_dict) == config
    path = tmp_path / "c.json"
    path.write_text(json.dumps(as_dict))
    assert QuantConfig.from_file(path) == config


def test_default_config_is_qlora_nf4_and_skips_lm_head():
    config = load(None)
    assert config.default == NF4(double_quant=True, compute_dtype=torch.bfloat16)
    assert config.scheme_for("lm_head")[0] is None


def test_load_accepts_path_dict_and_config():
    config = QuantConfig.from_file(SEED_JSON)
    assert load(str(SEED_JSON)) == config
    assert load(SEED_JSON) == config
    assert load(json.loads(SEED_JSON.read_text())) == config
    assert load(config) is config


def test_rules_for_the_model_match_under_peft_names():
    """get_peft_model puts the model under base_model.model. and a LoRA layer's linear at .base_layer."""
    from qcompile import FP4, NF4, QuantConfig, Rule

    config = QuantConfig(default=NF4(), rules=(Rule("lm_head", None), Rule("model.layers.0.self_attn.q_proj", FP4())))
    assert config.scheme_for_names(["base_model.model.lm_head"])[0] is None  # the lm_head skip
    assert config.scheme_for_names(["base_model.model.model.layers.0.self_attn.q_proj.base_layer"])[0] == FP4()
    assert config.scheme_for_names(["base_model.model.model.layers.1.self_attn.q_proj.base_layer"])[0] == NF4()
