"""transformers' quantization_config for GPTQ, HQQ and quanto (and AWQ), loaded verbatim."""

import logging

import pytest
import torch

import qcompile
from qcompile import QuantConfig
from qcompile.formats import AWQ, GPTQ, HQQ, Int8WeightOnly, Quanto

# As AutoGPTQ writes quantize_config.json / transformers' config.json for a GPTQ checkpoint.
AUTOGPTQ = {"quant_method": "gptq", "bits": 4, "group_size": 128, "damp_percent": 0.01, "desc_act": True,
            "static_groups": False, "sym": True, "true_sequential": True, "checkpoint_format": "gptq",
            "model_name_or_path": None, "model_file_base_name": None}
# transformers' GPTQConfig(bits=3, dataset="c4", ...).to_dict(), abridged to what it writes.
TRANSFORMERS_GPTQ = {"quant_method": "gptq", "bits": 3, "tokenizer": None, "dataset": "c4", "group_size": 64,
                     "damp_percent": 0.1, "desc_act": False, "sym": False, "true_sequential": True,
                     "use_cuda_fp16": False, "model_seqlen": None, "block_name_to_quantize": None,
                     "module_name_preceding_first_block": None, "batch_size": 1, "pad_token_id": None,
                     "use_exllama": True, "max_input_length": None, "exllama_config": {"version": 1},
                     "cache_block_outputs": True, "modules_in_block_to_quantize": None,
                     "modules_to_not_convert": ["mlp.down_proj"]}
HQQ_TO_DICT = {"quant_method": "hqq", "skip_modules": ["lm_head"],
               "quant_config": {"weight_quant_params": {"nbits": 3, "channel_wise": True, "group_size": 64,
                                                        "optimize": True, "round_zero": False, "axis": 1,
                                                        "view_as_float": False},
                                "scale_quant_params": None, "zero_quant_params": None, "offload_meta": False}}


def test_autogptq_config_loads_verbatim():
    config = QuantConfig.from_dict(AUTOGPTQ)
    assert config.default == GPTQ(bits=4, group_size=128, sym=True, desc_act=True, damp_percent=0.01)
    assert config.scheme_for("lm_head")[0] is None and config.scheme_for("model.layers.0.mlp.up_proj")[0] is not None


def test_transformers_gptq_config_in_a_config_json_loads_with_its_skip_list():
    config = QuantConfig.from_dict({"model_type": "llama", "quantization_config": TRANSFORMERS_GPTQ})
    assert config.default == GPTQ(bits=3, group_size=64, sym=False, desc_act=False, damp_percent=0.1)
    assert config.scheme_for("model.layers.3.mlp.down_proj")[0] is None  # substring, as transformers matches
    assert config.scheme_for("lm_head")[0] is not None  # a list replaces the lm_head default


def test_hqq_config_nested_and_flat():
    nested = QuantConfig.from_dict(HQQ_TO_DICT)
    assert nested.default == HQQ(bits=3, group_size=64) and nested.scheme_for("lm_head")[0] is None
    flat = QuantConfig.from_dict({"quant_method": "hqq", "nbits": 4, "group_size": 32, "axis": 1, "optimize": False})
    assert flat.default == HQQ(bits=4, group_size=32, iters=0)


def test_awq_config_loads_verbatim():
    config = QuantConfig.from_dict({"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True,
                                    "version": "gemm", "modules_to_not_convert": None})
    assert config.default == AWQ(bits=4, group_size=128) and config.scheme_for("lm_head")[0] is None


def test_quanto_weights_map_to_their_schemes():
    assert QuantConfig.from_dict({"quant_method": "quanto", "weights": "int8"}).default == Int8WeightOnly()
    assert QuantConfig.from_dict({"quant_method": "quanto", "weights": "int4", "activations": None,
                                  "modules_to_not_convert": None}).default == Quanto(bits=4)


def test_quanto_int4_is_min_max_with_a_float_shift():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0)) * 0.05
    packed = qcompile.pack(w, Quanto(bits=4, group_size=128))
    groups = w.view(64, 2, 128)
    lo, hi = groups.amin(-1), groups.amax(-1)
    scale = (hi - lo) / 15
    assert torch.equal(packed.scales, scale.t().half())
    torch.testing.assert_close(packed.zeros.float(), (-lo / scale).t(), rtol=1e-3, atol=1e-3)  # float16
    assert (packed.dequantize(torch.float32) - w).abs().max() <= scale.max() * 0.51


@pytest.mark.parametrize(("config", "message"), [
    ({**AUTOGPTQ, "checkpoint_format": "gptq_v2"}, r"checkpoint_format: 'gptq_v2' is not supported"),
    ({**AUTOGPTQ, "bits": 5}, r"gptq.bits: 5 is not allowed"),
    ({k: v for k, v in AUTOGPTQ.items() if k != "bits"}, r"bits: missing"),
    ({"quant_method": "hqq", "nbits": 4, "group_size": 64, "axis": 0}, r"axis: 0 is not supported"),
    ({**HQQ_TO_DICT, "quant_config": {**HQQ_TO_DICT["quant_config"], "zero_quant_params": {"nbits": 8}}},
     r"quant_config.zero_quant_params: quantized scales / zeros are not supported"),
    ({"quant_method": "quanto", "weights": "int3"}, r"weights: 'int3' is not supported"),
    ({"quant_method": "quanto", "weights": "int8", "activations": "int8"}, r"activations: 'int8' is not supported"),
    ({"quant_method": "awq", "bits": 4, "version": "gemv"}, r"version: 'gemv' is not supported"),
    ({"quant_method": "gptq", "bits": 4, "modules_to_not_convert": "lm_head"}, r"modules_to_not_convert: expected"),
    ({"quantization_config": {"quant_method": "eetq"}}, r"quant_method: 'eetq' is not supported"),
])
def test_settings_qcompile_cannot_honour_are_errors_naming_the_key(config, message):
    with pytest.raises(ValueError, match=message):
        QuantConfig.from_dict(config)


def test_unknown_keys_of_another_library_are_logged_not_fatal(caplog):
    with caplog.at_level(logging.WARNING, logger="qcompile"):
        config = QuantConfig.from_dict({**AUTOGPTQ, "some_future_key": 1})
    assert config.default.bits == 4 and "some_future_key" in caplog.text
