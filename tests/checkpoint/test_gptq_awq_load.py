"""Existing GPTQ (v1) and AutoAWQ GEMM checkpoints load into a meta model and run on qcompile's ops.

The checkpoints are written here as those libraries write them (tensor names, shapes, dtypes, the
quantization_config in config.json), from packed forms whose decode the tests know.
"""

from __future__ import annotations

import json

import pytest
import torch

import qcompile
from qcompile.checkpoint import load_quantized
from qcompile.pack_cache import cached_packed_weights, is_released
from tests.formats.test_awq import awq_pack
from tests.models import tiny_llama

safetensors_torch = pytest.importorskip("safetensors.torch")
accelerate = pytest.importorskip("accelerate")

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _write(directory, model, quantized: dict[str, dict[str, torch.Tensor]], quantization_config) -> None:
    tensors = {}
    for name, tensor in model.state_dict().items():
        module = name.rpartition(".")[0]
        if module in quantized and name.endswith(".weight"):
            continue  # a quantized linear has no float weight in these checkpoints
        tensors[name] = tensor.detach().clone().contiguous()
    for module, entries in quantized.items():
        tensors.update({f"{module}.{key}": value.contiguous() for key, value in entries.items()})
    safetensors_torch.save_file(tensors, str(directory / "model.safetensors"))
    config = model.config.to_dict()
    config["quantization_config"] = quantization_config
    (directory / "config.json").write_text(json.dumps(config))


def _meta_llama():
    from transformers import LlamaForCausalLM

    with accelerate.init_empty_weights():
        return LlamaForCausalLM(tiny_llama().config).eval()


def _ids():
    return torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(4))


@torch.no_grad()
def test_gptq_checkpoint_loads_and_equals_the_model_it_was_made_from(tmp_path):
    model = tiny_llama()
    float_copy = tiny_llama()
    batches = [{"input_ids": torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(i))}
               for i in range(4)]
    gptq = {"quant_method": "gptq", "bits": 4, "group_size": 32, "damp_percent": 0.1, "desc_act": True,
            "static_groups": False, "sym": False, "true_sequential": True, "checkpoint_format": "gptq"}
    config = qcompile.calibrate(model, batches, gptq, progress=False)
    quantized = {}
    for name, module in model.named_modules():
        if name.rpartition(".")[2] in PROJECTIONS:
            packed = cached_packed_weights(module.weight)[0]
            quantized[name] = {"qweight": packed.qweight, "qzeros": packed.qzeros, "scales": packed.scales,
                               "g_idx": packed.g_idx}
    assert any(not torch.equal(q["g_idx"], q["g_idx"].sort().values) for q in quantized.values())  # act-order
    _write(tmp_path, float_copy, quantized, gptq)

    loaded = _meta_llama()
    result = load_quantized(loaded, tmp_path)
    assert len(result.packed) == 14 and all(is_released(loaded.get_parameter(n)) for n in result.packed)
    expected = torch.compile(model, backend="qcompile", options={"config": config, "inner": "eager"})(
        input_ids=_ids()).logits
    torch._dynamo.reset()
    out = torch.compile(loaded, backend="qcompile", options={"config": result.config, "inner": "eager"})(
        input_ids=_ids()).logits
    assert torch.equal(out, expected)


@torch.no_grad()
def test_awq_checkpoint_loads_and_decodes_as_autoawq_does(tmp_path):
    model = tiny_llama()
    gen = torch.Generator().manual_seed(0)
    quantized, reference = {}, tiny_llama()
    for name, module in reference.named_modules():
        if name.rpartition(".")[2] not in PROJECTIONS:
            continue
        n, k = module.weight.shape
        q = torch.randint(0, 16, (k, n), generator=gen)
        zeros = torch.randint(0, 16, (k // 32, n), generator=gen)  # AWQ zero points are stored as they are
        scales = (torch.rand(k // 32, n, generator=gen) * 0.02 + 0.001).half()
        g = torch.arange(k) // 32
        module.weight.copy_(((q.float() - zeros.float()[g]) * scales.float()[g]).t())  # AutoAWQ's dequantize
        quantized[name] = {"qweight": awq_pack(q), "qzeros": awq_pack(zeros), "scales": scales}
    awq = {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm",
           "modules_to_not_convert": None}
    _write(tmp_path, model, quantized, awq)
    loaded = _meta_llama()
    result = load_quantized(loaded, tmp_path)
    assert len(result.packed) == 14
    out = torch.compile(loaded, backend="qcompile", options={"config": result.config, "inner": "eager"})(
        input_ids=_ids()).logits
    for name, param in model.named_parameters():  # the float parts as in the file
        if name.rpartition(".")[0].rpartition(".")[2] not in PROJECTIONS:
            reference.get_parameter(name).copy_(param)
    torch.testing.assert_close(out, reference(input_ids=_ids()).logits, rtol=1e-5, atol=1e-5)


def test_gptq_checkpoint_without_its_config_or_with_wrong_shapes_is_refused(tmp_path):
    model = tiny_llama()
    packed = qcompile.pack(torch.randn(64, 64), qcompile.Affine(bits=4, group_size=32))
    entries = {"qweight": packed.qweight, "qzeros": packed.qzeros, "scales": packed.scales, "g_idx": packed.g_idx}
    _write(tmp_path, model, {"model.layers.0.self_attn.q_proj": entries}, None)
    with pytest.raises(ValueError, match="q_proj: a GPTQ / AWQ linear in the checkpoint, but no config plans it"):
        load_quantized(_meta_llama(), tmp_path)
    gptq = {"quant_method": "gptq", "bits": 4, "group_size": 64, "sym": False}
    with pytest.raises(ValueError, match=r"q_proj.qzeros: checkpoint shape \(2, 8\) != \(1, 8\)"):
        load_quantized(_meta_llama(), tmp_path, config=gptq)


@torch.no_grad()
def test_calibrated_gptq_model_saves_in_gptqs_layout_and_loads_back_bit_exact(tmp_path):
    from qcompile.checkpoint import save_quantized

    model = tiny_llama()
    batches = [{"input_ids": torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(i))}
               for i in range(4)]
    config = qcompile.calibrate(model, batches, {"format": "qcompile", "version": 1,
                                                 "default": {"type": "gptq", "bits": 3, "group_size": 32,
                                                             "desc_act": True},
                                                 "rules": [{"match": "lm_head", "scheme": "skip"}]}, progress=False)
    save_quantized(model, tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert written["quant_method"] == "gptq" and written["bits"] == 3 and written["desc_act"] is True
    assert written["checkpoint_format"] == "gptq" and written["modules_to_not_convert"] == ["lm_head"]
    keys = set(safetensors_torch.load_file(str(tmp_path / "model.safetensors")))
    assert {"model.layers.0.mlp.down_proj.qweight", "model.layers.0.mlp.down_proj.g_idx"} <= keys
    assert "model.layers.0.mlp.down_proj.weight" not in keys and "lm_head.weight" in keys

    expected = torch.compile(model, backend="qcompile", options={"config": config, "inner": "eager"})(
        input_ids=_ids()).logits
    torch._dynamo.reset()
    loaded = _meta_llama()
    result = load_quantized(loaded, tmp_path)
    out = torch.compile(loaded, backend="qcompile", options={"config": result.config, "inner": "eager"})(
        input_ids=_ids()).logits
    assert torch.equal(out, expected)


def test_weights_gptqs_layout_cannot_hold_are_refused_by_name(tmp_path):
    from qcompile.checkpoint import save_quantized

    model = tiny_llama()
    qcompile.quantize(model, {"format": "qcompile", "version": 1, "default": {"type": "hqq", "group_size": 32},
                              "rules": [{"match": "lm_head", "scheme": "skip"}]})
    with pytest.raises(ValueError, match=r"q_proj.weight: packed as hqq.*float16"):
        save_quantized(model, tmp_path)
