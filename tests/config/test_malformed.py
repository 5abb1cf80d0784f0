"""Every malformed config raises a ValueError that names the offending key."""

import json

import pytest
import torch

import qcompile
from qcompile import QuantConfig
from qcompile.config import load

SEED = {
    "_load_in_4bit": True, "_load_in_8bit": False, "bnb_4bit_compute_dtype": "bfloat16",
    "bnb_4bit_quant_storage": "uint8", "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
    "llm_int8_enable_fp32_cpu_offload": False, "llm_int8_has_fp16_weight": False,
    "llm_int8_skip_modules": None, "llm_int8_threshold": 6.0, "load_in_4bit": True, "load_in_8bit": False,
    "quant_method": "bitsandbytes",
}
NF4_DEFAULT = {"type": "nf4"}


def seed(**changes):
    return {**SEED, **changes}


def own(default=NF4_DEFAULT, rules=(), **extra):
    return {"default": default, "rules": list(rules), **extra}


MALFORMED = [
    # (config, a key the message must name)
    (seed(load_in_8bit=True, _load_in_8bit=True), "load_in_4bit/load_in_8bit"),
    (seed(load_in_4bit=False, _load_in_4bit=False), "load_in_4bit/load_in_8bit"),
    (seed(load_in_4bit=False), "load_in_4bit"),  # disagrees with _load_in_4bit
    (seed(bnb_4bit_quant_type="nf3"), "bnb_4bit_quant_type"),
    (seed(bnb_4bit_quant_type=4), "bnb_4bit_quant_type"),
    (seed(bnb_4bit_compute_dtype="float64"), "bnb_4bit_compute_dtype"),
    (seed(bnb_4bit_compute_dtype="bfloat61"), "bnb_4bit_compute_dtype"),
    (seed(bnb_4bit_compute_dtype=16), "bnb_4bit_compute_dtype"),
    (seed(bnb_4bit_quant_storage="int4"), "bnb_4bit_quant_storage"),
    (seed(bnb_4bit_use_double_quant="yes"), "bnb_4bit_use_double_quant"),
    (seed(llm_int8_threshold=-1.0), "llm_int8_threshold"),
    (seed(llm_int8_threshold="6"), "llm_int8_threshold"),
    (seed(llm_int8_threshold=float("inf")), "llm_int8_threshold"),
    (seed(llm_int8_skip_modules="lm_head"), "llm_int8_skip_modules"),
    (seed(llm_int8_skip_modules=[1, 2]), "llm_int8_skip_modules"),
    (seed(llm_int8_has_fp16_weight=1), "llm_int8_has_fp16_weight"),
    (seed(quant_method="gptq"), "quant_method"),
    (seed(load_in_3bit=True), "load_in_3bit"),
    ({"quantization_config": seed(bnb_4bit_quant_type="int4")}, "quantization_config.bnb_4bit_quant_type"),
    ({"quantization_config": "bnb"}, "quantization_config"),
    (own(default={"type": "nf5"}), "default.type"),
    (own(default={"blocksize": 64}), "default.type"),
    (own(default={"type": "nf4", "blocksize": 48}), "nf4.blocksize"),
    (own(default={"type": "nf4", "blocksize": 8192}), "nf4.blocksize"),
    (own(default={"type": "nf4", "blocksize": 16}), "nf4.blocksize"),
    (own(default={"type": "fp4", "blocksize": "64"}), "fp4.blocksize"),
    (own(default={"type": "nf4", "double_quant": "true"}), "nf4.double_quant"),
    (own(default={"type": "nf4", "compute_dtype": "int8"}), "default.compute_dtype"),
    (own(default={"type": "nf4", "quant_storage": "float64"}), "default.quant_storage"),
    (own(default={"type": "nf4", "group_size": 128}), "default.group_size"),
    (own(default={"type": "int8", "threshold": -0.5}), "int8.threshold"),
    (own(default={"type": "int8", "threshold": True}), "int8.threshold"),
    (own(default="none"), "default"),
    ({"rules": []}, "default"),
    (own(rules=[{"match": "lm_head"}]), "rules[0].scheme"),
    (own(rules=[{"scheme": "skip"}]), "rules[0].match"),
    (own(rules=[{"match": "", "scheme": "skip"}]), "rules[0].match"),
    (own(rules=[{"match": "x", "scheme": "skp"}]), "rules[0].scheme"),
    (own(rules=[{"match": "x", "scheme": {"type": "squeezellm"}}]), "rules[0].scheme.type"),
    (own(rules=[{"match": "x", "scheme": "skip", "why": 1}]), "rules[0].why"),
    (own(rules={"lm_head": "skip"}), "rules"),
    (own(rules=["lm_head"]), "rules[0]"),
    (own(version=2), "version"),
    (own(format="gguf"), "format"),
    (own(extra=True), "extra"),
    ({"hidden_size": 64}, "config"),
]


@pytest.mark.parametrize(("config", "key"), MALFORMED, ids=[k + f"-{i}" for i, (_, k) in enumerate(MALFORMED)])
def test_malformed_config_names_the_key(config, key):
    with pytest.raises(ValueError) as info:
        QuantConfig.from_dict(config)
    assert key in str(info.value)


@pytest.mark.parametrize(("config", "key"), MALFORMED[::5], ids=[k for _, k in MALFORMED[::5]])
def test_malformed_config_is_refused_before_and_at_compile(config, key):
    """make_backend refuses it before anything runs; torch.compile's first call raises the same ValueError,
    not dynamo's BackendCompilerFailed."""
    with pytest.raises(ValueError) as early:
        qcompile.make_backend(config=config)
    assert key in str(early.value)
    model = torch.nn.Linear(8, 4)
    with pytest.raises(ValueError) as late:
        torch.compile(model, backend="qcompile", options={"config": config})(torch.randn(2, 8))
    assert str(late.value).startswith(str(early.value))  # dynamo may append its hints
    assert not isinstance(late.value, torch._dynamo.exc.BackendCompilerFailed)


def test_bad_files_name_the_problem(tmp_path):
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        QuantConfig.from_file(bad_json)
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text("default = [")
    with pytest.raises(ValueError, match="not valid TOML"):
        QuantConfig.from_file(bad_toml)
    with pytest.raises(ValueError, match="unknown file type"):
        QuantConfig.from_file(tmp_path / "c.yaml")
    with pytest.raises(ValueError, match="cannot read"):
        QuantConfig.from_file(tmp_path / "missing.json")
    top_level_list = tmp_path / "list.json"
    top_level_list.write_text(json.dumps([1]))
    with pytest.raises(ValueError, match="top level"):
        QuantConfig.from_file(top_level_list)


def test_load_rejects_other_types():
    with pytest.raises(ValueError, match="config"):
        load(42)
