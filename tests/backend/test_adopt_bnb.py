"""Models loaded with a BitsAndBytesConfig, adopted (``qcompile.adopt_bnb``) and run on qcompile's ops.

A tiny Llama is saved locally and loaded back by transformers with bitsandbytes (NF4 + double quant + bf16
compute, FP4, LLM.int8()). Adoption must keep bitsandbytes' packed tensors exactly (they equal
``qcompile.pack`` of the same float weights), leave no float copy, and the compiled model must compute what
bitsandbytes' own numerics give: ``dequantize_4bit`` + ``F.linear`` per 4-bit layer, the bnb model's own
forward for LLM.int8().
"""

from __future__ import annotations

import copy
import logging
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qcompile
from qcompile import config as config_module
from qcompile.adopt_bnb import adopt_bitsandbytes, bitsandbytes_config
from qcompile.formats import blockwise
from qcompile.ops import binding
from qcompile.pack_cache import cached_packed_weights, is_released
from tests.models import tiny_llama

bnb = pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
MODULES = [f"model.layers.{i}.{p}" for i in range(2) for p in PROJECTIONS]
FOUR_BIT = {
    "nf4-double-quant-bf16": {"bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
                              "bnb_4bit_compute_dtype": torch.bfloat16},
    "fp4": {"bnb_4bit_quant_type": "fp4"},
}
IDS = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(directory of a saved tiny Llama, its float weights by name)."""
    model = tiny_llama()
    path = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(path)
    return path, {name: p.detach().clone() for name, p in model.named_parameters()}


def _load(path, **settings):
    config = transformers.BitsAndBytesConfig(**settings)
    return transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=config).eval()


class _Dequantized(nn.Module):
    """bitsandbytes' ``Linear4bit`` as dequantize_4bit + F.linear, in its compute dtype."""

    def __init__(self, layer):
        super().__init__()
        self.weight = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
        self.bias = layer.bias
        self.compute_dtype = layer.compute_dtype

    def forward(self, x):
        dtype = self.compute_dtype or x.dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        return F.linear(x.to(dtype), self.weight.to(dtype), bias).to(x.dtype)


def _reference(model):
    """A copy of the bnb ``model`` with each Linear4bit replaced by :class:`_Dequantized` (before any forward:
    bitsandbytes' CPU forward repacks its weights)."""
    reference = copy.deepcopy(model)
    for name, module in list(reference.named_modules()):
        if isinstance(module, bnb.nn.Linear4bit):
            parent, _, child = name.rpartition(".")
            setattr(reference.get_submodule(parent), child, _Dequantized(module))
    return reference


def _compile_and_run(model, config, *args):
    plans = []
    compiled = torch.compile(model, backend="qcompile",
                             options={"config": config, "inner": "eager", "on_plan": plans.append})
    with torch.no_grad():
        out = compiled(*args)
    return getattr(out, "logits", out), [row for plan in plans for row in plan.rows]


def _assert_same_packed(packed, expected):
    assert packed.scheme == expected.scheme and packed.shape == expected.shape
    assert binding(packed.scheme).arguments(packed)[1] == binding(expected.scheme).arguments(expected)[1]
    for key, tensor in expected.tensors().items():
        got = packed.tensors()[key]
        assert (got is None) == (tensor is None), key
        if tensor is not None:
            assert torch.equal(got, tensor), key


def _assert_adopted(model, names, floats):
    """Each name is an adopted plain Linear's weight, released, holding the packed bytes of its float weight."""
    assert names == [f"{m}.weight" for m in MODULES]
    for name in names:
        module = model.get_submodule(name.rpartition(".")[0])
        assert type(module) is nn.Linear and module.weight.shape == floats[name].shape
        param = module.weight
        assert is_released(param) and not param.requires_grad
        assert param.untyped_storage().nbytes() == param.element_size()  # one NaN: no float data
        [packed] = cached_packed_weights(param)
        _assert_same_packed(packed, qcompile.pack(floats[name], packed.scheme, name))
    assert not any(isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for m in model.modules())


def _assert_plan(rows):
    assert {r.module for r in rows if r.quantized} == set(MODULES)
    assert [r.module for r in rows if not r.quantized] == ["lm_head"]


@pytest.mark.parametrize("settings", FOUR_BIT.values(), ids=FOUR_BIT.keys())
def test_adopted_4bit_model_runs_on_qcompile_ops_with_bitsandbytes_bytes(checkpoint, settings):
    path, floats = checkpoint
    model = _load(path, load_in_4bit=True, **settings)
    with torch.no_grad():
        expected = _reference(model)(IDS).logits
        float_logits = transformers.AutoModelForCausalLM.from_pretrained(path)(IDS).logits
    bnb_bytes = {f"{name}.weight": model.get_submodule(name).weight.data_ptr() for name in MODULES}

    names = adopt_bitsandbytes(model)

    _assert_adopted(model, names, floats)
    for name in names:  # bitsandbytes' tensors themselves, not copies
        [packed] = cached_packed_weights(model.get_parameter(name))
        assert packed.packed.data_ptr() == bnb_bytes[name]
    config = bitsandbytes_config(model)
    assert config == config_module.load({"quantization_config": model.config.quantization_config.to_dict()})
    out, rows = _compile_and_run(model, config, IDS)
    _assert_plan(rows)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)  # bit-identical on torch 2.13's CPU
    assert (out - float_logits).abs().max() > 1e-3  # and quantized: not the float model
    with pytest.raises(RuntimeError, match=r"model\.layers\.0\.self_attn\.q_proj"), torch.no_grad():
        model(IDS)
    assert adopt_bitsandbytes(model) == []  # a second adoption finds nothing left to adopt
    assert bitsandbytes_config(model) == config


def test_adopted_int8_model_equals_bitsandbytes_llm_int8(checkpoint):
    path, floats = checkpoint
    model = _load(path, load_in_8bit=True)  # bitsandbytes 0.50 runs LLM.int8() on the CPU
    with torch.no_grad():
        expected = copy.deepcopy(model)(IDS).logits  # int8 activations and outlier columns: bnb's own forward

    names = adopt_bitsandbytes(model)

    _assert_adopted(model, names, floats)
    config = bitsandbytes_config(model)
    assert config.default == qcompile.Int8(threshold=6.0)
    out, rows = _compile_and_run(model, config, IDS)
    _assert_plan(rows)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)  # bit-identical on torch 2.13's CPU


def _repack_for_cpu(model):
    """What an eager bitsandbytes forward does on a CPU with AVX512-BF16; done by hand elsewhere."""
    with torch.no_grad():
        model(IDS)
    for name in MODULES:
        weight = model.get_submodule(name).weight
        if not getattr(weight.quant_state, "packing_format_for_cpu", False):
            weight.data, weight.quant_state = bnb.functional._convert_weight_packed_for_cpu(weight.data,
                                                                                             weight.quant_state)


@pytest.mark.parametrize("settings", FOUR_BIT.values(), ids=FOUR_BIT.keys())
def test_cpu_repacked_layers_are_adopted_in_the_standard_layout(checkpoint, settings, caplog):
    path, floats = checkpoint
    model = _load(path, load_in_4bit=True, **settings)
    with torch.no_grad():
        expected = _reference(model)(IDS).logits
    _repack_for_cpu(model)

    with caplog.at_level(logging.WARNING, logger="qcompile"):
        names = adopt_bitsandbytes(model)

    assert "14 bitsandbytes layers" in caplog.text and "repacked" in caplog.text
    for name in names:
        [packed] = cached_packed_weights(model.get_parameter(name))
        ours = qcompile.pack(floats[name], packed.scheme, name)
        assert torch.equal(packed.packed, ours.packed)  # the permutation is undone exactly
        absmax = blockwise.float_absmax(packed.absmax, packed.nested_absmax, packed.nested_code,
                                        packed.nested_offset)
        original = blockwise.float_absmax(ours.absmax, ours.nested_absmax, ours.nested_code, ours.nested_offset)
        if packed.scheme.double_quant:  # bitsandbytes' bf16 rounding, then nested again
            assert ((absmax - original).abs() / original).max() < 1e-2
        else:  # exactly what bitsandbytes kept: the float32 absmax rounded to bfloat16
            assert torch.equal(absmax, original.bfloat16().float())
    out, rows = _compile_and_run(model, bitsandbytes_config(model), IDS)
    _assert_plan(rows)
    assert ((out - expected).norm() / expected.norm()) < 1e-2


def test_plain_bitsandbytes_modules_with_bias_and_no_compute_dtype():
    torch.manual_seed(0)
    model = nn.Sequential(bnb.nn.Linear4bit(64, 128, quant_type="nf4", compress_statistics=False), nn.ReLU(),
                          bnb.nn.Linear4bit(128, 32, quant_type="nf4", compress_statistics=False)).to("cpu")
    biases = [model[0].bias, model[2].bias]
    x = torch.randn(3, 64)
    with torch.no_grad():
        expected = _reference(model)(x)

    assert adopt_bitsandbytes(model) == ["0.weight", "2.weight"]

    assert [model[0].bias, model[2].bias] == biases and model[0].bias is biases[0]  # the same parameters
    config = bitsandbytes_config(model)  # no quantization_config: the layers' own settings
    assert config == qcompile.QuantConfig(default=qcompile.NF4(compute_dtype=torch.float32), rules=())
    out, rows = _compile_and_run(model, config, x)
    assert {r.module for r in rows if r.quantized} == {"0", "2"}
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_config_from_the_layers_keeps_float_linears_float_and_names_disagreeing_layers(checkpoint, monkeypatch):
    path, _ = checkpoint
    model = _load(path, load_in_4bit=True, **FOUR_BIT["nf4-double-quant-bf16"])
    scheme = qcompile.NF4(double_quant=True, compute_dtype=torch.bfloat16)
    kept = "model.layers.0.mlp.down_proj"  # as if bitsandbytes had been told to keep it float
    model.model.layers[0].mlp.down_proj = nn.Linear(128, 64, bias=False)

    config = bitsandbytes_config(model)
    assert config.scheme_for(kept)[0] is None and config.scheme_for("model.layers.1.mlp.down_proj")[0] == scheme

    monkeypatch.setattr(model.config, "quantization_config", None)
    config = bitsandbytes_config(model)
    assert config.default == scheme and {r.match for r in config.rules} == {kept, "lm_head"}
    adopt_bitsandbytes(model)
    assert bitsandbytes_config(model) == config  # the same from the adopted layers

    model = _load(path, load_in_4bit=True, **FOUR_BIT["nf4-double-quant-bf16"])
    model.model.layers[1].mlp.down_proj.compute_dtype = torch.float16
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj.*quantization_config gives it"):
        bitsandbytes_config(model)
    monkeypatch.setattr(model.config, "quantization_config", None)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj .* model\.layers\.1\.mlp\.down_proj"):
        bitsandbytes_config(model)


def test_a_layer_that_cannot_be_adopted_leaves_the_model_as_it_was(checkpoint):
    path, _ = checkpoint
    model = _load(path, load_in_8bit=True)
    model.model.layers[1].mlp.up_proj.state.has_fp16_weights = True
    before = dict(model.named_modules())
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj.*has_fp16_weights"):
        adopt_bitsandbytes(model)
    assert dict(model.named_modules()) == before


def test_a_model_without_bitsandbytes_layers_is_left_alone(monkeypatch):
    model = tiny_llama()
    before = dict(model.named_modules())
    assert adopt_bitsandbytes(model) == [] and bitsandbytes_config(model) is None
    assert dict(model.named_modules()) == before

    for name in ("bitsandbytes", "bitsandbytes.nn"):  # bitsandbytes not installed
        monkeypatch.setitem(sys.modules, name, None)
    assert adopt_bitsandbytes(model) == []

    class Linear4bit(nn.Linear):  # a module that claims to come from bitsandbytes
        pass

    Linear4bit.__module__ = "bitsandbytes.nn.modules"
    model.model.layers[0].mlp.up_proj = Linear4bit(64, 128)
    with pytest.raises(ImportError, match=r"model\.layers\.0\.mlp\.up_proj.*bitsandbytes cannot be imported"):
        adopt_bitsandbytes(model)


def test_quantize_adopts_a_bitsandbytes_model_and_returns_the_config_to_compile_with(checkpoint):
    path, floats = checkpoint
    model = _load(path, load_in_4bit=True, **FOUR_BIT["nf4-double-quant-bf16"])
    with torch.no_grad():
        expected = _reference(model)(IDS).logits
    result = qcompile.quantize(model)  # no config: the model's own BitsAndBytesConfig
    assert list(result.adopted) == [f"{m}.weight" for m in MODULES]
    assert result.packed == () and result.packed_bytes == 0  # nothing packed again
    assert result.config == bitsandbytes_config(model)
    _assert_adopted(model, list(result.adopted), floats)
    out, rows = _compile_and_run(model, result.config, IDS)
    _assert_plan(rows)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="adopted from bitsandbytes with another scheme"):
        qcompile.quantize(model, qcompile.QuantConfig(default=qcompile.FP4()))


def test_compiling_bitsandbytes_layers_without_adopting_them_says_how(caplog):
    layer = bnb.nn.Linear4bit(64, 32, compute_dtype=torch.float32, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(32, 64), requires_grad=False, quant_type="nf4")
    layer = layer.to("cpu").eval()
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="qcompile", options={"inner": "eager"})
    with caplog.at_level(logging.WARNING, logger="qcompile"), torch.no_grad():
        compiled(torch.randn(3, 64))
    assert any("bitsandbytes' own ops" in r.getMessage() and "qcompile.quantize(model)" in r.getMessage()
               for r in caplog.records)
