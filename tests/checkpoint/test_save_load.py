"""``qcompile.checkpoint``: save_quantized / load_quantized in bitsandbytes' checkpoint layout.

Checked in both directions against transformers 5 + bitsandbytes on the CPU: a qcompile checkpoint loads
in ``from_pretrained`` as a bitsandbytes model, a ``save_pretrained`` of a bitsandbytes model loads with
``load_quantized``. Packed tensors are compared byte for byte; logits exactly (torch.equal).

bitsandbytes 0.50 quirk: on a CPU with AVX512-BF16, ``Linear4bit.forward`` in eval mode without grad first
repacks its weight into a CPU-only layout and computes in bfloat16 (``gemv_4bit``), which rounds the absmax
and the activations. The tests turn that off (``support_avx512bf16_for_cpu = False``, a no-op on other CPUs),
so bitsandbytes computes what qcompile's CPU op computes: ``dequantize_4bit`` in the compute dtype, then
``F.linear``. Packed bytes are read before any bitsandbytes forward.
"""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch

import qcompile
from qcompile.checkpoint import load_quantized, save_quantized
from qcompile.checkpoint.layout import INDEX_NAME
from qcompile.formats import FP4, NF4, Int8, Packed4bit
from qcompile.pack_cache import cached_packed_weights, is_released
from tests.models import tiny_llama

bnb = pytest.importorskip("bitsandbytes")
safetensors_torch = pytest.importorskip("safetensors.torch")
transformers = pytest.importorskip("transformers")
accelerate = pytest.importorskip("accelerate")
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

F32 = torch.float32
NF4_DQ = NF4(double_quant=True, compute_dtype=F32)
FP4_PLAIN = FP4(compute_dtype=F32)
INT8 = Int8()
SCHEMES = {"nf4-dq": NF4_DQ, "fp4": FP4_PLAIN, "int8": INT8}
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def config_of(scheme) -> qcompile.QuantConfig:
    return qcompile.QuantConfig(default=scheme)  # lm_head stays float, as transformers keeps it


def ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))


def tiny_gpt2(tied: bool = True):
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                     tie_word_embeddings=tied)
    return transformers.GPT2LMHeadModel(config).eval()


def tiny_llama_tied():
    model = tiny_llama()
    config = copy.deepcopy(model.config)
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def compiled_logits(model, config, input_ids) -> torch.Tensor:
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="qcompile", options={"config": config, "inner": "eager"})
    with torch.no_grad():
        return compiled(input_ids=input_ids).logits


def bnb_logits(model, input_ids) -> torch.Tensor:
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False  # see the module docstring
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def empty_model(directory):
    """The model of ``directory``'s config.json, built on the meta device (buffers real)."""
    config = transformers.AutoConfig.from_pretrained(directory)
    with accelerate.init_empty_weights():
        return transformers.AutoModelForCausalLM.from_config(config).eval()


def packed_forms(model) -> dict[str, object]:
    """module name -> packed form, for every linear whose weight was released."""
    out = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.nn.Parameter) and is_released(weight):
            forms = cached_packed_weights(weight)
            assert len(forms) == 1, name
            out[name] = forms[0]
    return out


def file_tensors(directory) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(directory.glob("*.safetensors")):
        out.update(safetensors_torch.load_file(str(path)))
    return out


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (packed bytes viewed as a float quant storage may read as NaN)."""
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8)))


def assert_same_packed(ours, theirs, name: str) -> None:
    assert type(ours) is type(theirs) and ours.scheme == theirs.scheme and ours.shape == theirs.shape, name
    for key, tensor in ours.tensors().items():
        other = theirs.tensors()[key]
        assert (tensor is None) == (other is None), (name, key)
        if tensor is not None:
            assert same_bytes(tensor, other), (name, key)
    if isinstance(ours, Packed4bit):
        assert ours.nested_offset == theirs.nested_offset, name


def assert_no_float_copy(model, packed_names) -> None:
    assert not [n for n, p in model.named_parameters() if p.device.type == "meta"]
    for name in packed_names:
        p = model.get_parameter(f"{name}.weight")
        assert is_released(p) and not p.requires_grad, name
        assert p.untyped_storage().nbytes() == p.element_size(), name  # one NaN, broadcast


def bnb_module_state(module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in module.state_dict().items() if k != "bias"}


# ---- (a) qcompile -> transformers + bitsandbytes ---------------------------------------------------------------

@pytest.mark.parametrize("build, scheme", [
    (tiny_llama, NF4_DQ),
    (tiny_llama, FP4_PLAIN),
    (tiny_llama, NF4(double_quant=True, compute_dtype=F32, quant_storage=torch.bfloat16)),
    (tiny_gpt2, NF4_DQ),  # Conv1D: stored (in, out), saved [out, in] as transformers quantizes it
    (tiny_llama, INT8),
], ids=["llama-nf4-dq", "llama-fp4", "llama-nf4-bf16-storage", "gpt2-nf4-dq", "llama-int8"])
def test_save_quantized_loads_in_transformers_as_bitsandbytes(tmp_path, build, scheme):
    model = build()
    cfg = config_of(scheme)
    result = qcompile.quantize(model, cfg)
    directory = save_quantized(model, tmp_path / "q")
    assert sorted((directory / name).name for name in ("config.json", "model.safetensors")) == sorted(
        p.name for p in directory.iterdir() if p.name != "generation_config.json")

    written = json.loads((directory / "config.json").read_text())["quantization_config"]
    four_bit = not isinstance(scheme, Int8)
    expected = transformers.BitsAndBytesConfig(
        load_in_4bit=four_bit, load_in_8bit=not four_bit, llm_int8_skip_modules=["lm_head"],
        **(dict(bnb_4bit_quant_type=scheme.kind, bnb_4bit_use_double_quant=scheme.double_quant,
                bnb_4bit_compute_dtype=scheme.compute_dtype, bnb_4bit_quant_storage=scheme.quant_storage)
           if four_bit else dict(llm_int8_threshold=scheme.threshold))).to_dict()
    assert written == expected

    ours = packed_forms(model)
    assert sorted(f"{n}.weight" for n in ours) == sorted(result.packed)
    files = file_tensors(directory)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(directory, device_map="cpu").eval()
    bnb_type = bnb.nn.Linear4bit if four_bit else bnb.nn.Linear8bitLt
    converted = {n for n, m in loaded.named_modules() if isinstance(m, bnb_type)}
    assert converted == set(ours)
    assert type(loaded.lm_head) is torch.nn.Linear
    for name, packed in ours.items():
        state = bnb_module_state(loaded.get_submodule(name))
        mine = packed.to_bitsandbytes()
        assert list(state) == list(mine), name
        for key, tensor in state.items():
            assert same_bytes(tensor, files[f"{name}.{key}"]), (name, key)
            assert same_bytes(tensor, mine[key]), (name, key)
    for key, tensor in model.state_dict().items():  # float tensors as they are
        if key.rpartition(".")[0] not in ours and key in files:
            assert torch.equal(files[key], tensor), key

    input_ids = ids()
    theirs = bnb_logits(loaded, input_ids)
    mine = compiled_logits(model, cfg, input_ids)
    # 4-bit: the same dequantize + F.linear in float32, so equal. LLM.int8(): the int8 matmul is exact (int32
    # accumulation) in both, and qcompile's op follows bitsandbytes' float rescale step for step, so equal too.
    assert torch.equal(mine, theirs)


# ---- (b) transformers + bitsandbytes -> qcompile -----------------------------------------------------------------

@pytest.mark.parametrize("bnb_config", [
    dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=F32),
    dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=F32),
    dict(load_in_8bit=True),
], ids=["nf4-dq", "fp4", "int8"])
def test_load_quantized_reads_what_transformers_saves_for_bitsandbytes(tmp_path, bnb_config):
    tiny_llama().save_pretrained(tmp_path / "float")
    quantized = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "float", quantization_config=transformers.BitsAndBytesConfig(**bnb_config), device_map="cpu").eval()
    quantized.save_pretrained(tmp_path / "bnb")
    states = {n: bnb_module_state(m) for n, m in quantized.named_modules()
              if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))}
    assert len(states) == 2 * len(PROJECTIONS)

    model = empty_model(tmp_path / "bnb")
    result = load_quantized(model, tmp_path / "bnb")
    assert [n.removesuffix(".weight") for n in result.packed] == list(states)
    assert result.kept_float == () and result.packed_bytes > 0
    assert_no_float_copy(model, states)
    ours = packed_forms(model)
    assert set(ours) == set(states)
    for name, state in states.items():
        mine = ours[name].to_bitsandbytes()
        assert list(mine) == list(state), name
        for key, tensor in state.items():
            assert same_bytes(mine[key], tensor), (name, key)
    for key, tensor in quantized.state_dict().items():
        if not any(key.startswith(f"{name}.weight") or key.startswith(f"{name}.SCB") for name in states):
            assert torch.equal(model.state_dict()[key], tensor), key

    input_ids = ids()
    config_json = str(tmp_path / "bnb" / "config.json")  # the BitsAndBytesConfig, verbatim
    assert torch.equal(compiled_logits(model, config_json, input_ids), bnb_logits(quantized, input_ids))

    # Saved again by qcompile: the same tensors, byte for byte, as transformers wrote.
    save_quantized(model, tmp_path / "again")
    theirs, mine = file_tensors(tmp_path / "bnb"), file_tensors(tmp_path / "again")
    assert sorted(mine) == sorted(theirs)
    assert all(same_bytes(mine[key], theirs[key]) for key in theirs)


# ---- (c) round trip ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("build, scheme", [
    (tiny_llama, NF4_DQ),
    (tiny_llama, FP4_PLAIN),
    (tiny_llama, INT8),
    (tiny_llama_tied, NF4_DQ),
    (tiny_gpt2, FP4_PLAIN),
], ids=["llama-nf4-dq", "llama-fp4", "llama-int8", "llama-tied-nf4-dq", "gpt2-tied-fp4"])
def test_round_trip_is_bit_exact(tmp_path, build, scheme):
    model = build()
    cfg = config_of(scheme)
    qcompile.quantize(model, cfg)
    save_quantized(model, tmp_path, max_shard_size="20KB")  # several shards, a tensor over the limit alone
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    shards = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(shards) > 2 and sorted(set(index["weight_map"].values())) == shards
    files = file_tensors(tmp_path)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in files.values())
    tied = [names for names in _aliases(model) if len(names) > 1]
    for names in tied:  # once, under the first name, as transformers saves it
        assert names[0] in files and not any(n in files for n in names[1:]), names

    empty = build_empty(model)
    result = load_quantized(empty, tmp_path)
    ours, theirs = packed_forms(model), packed_forms(empty)
    assert list(ours) == list(theirs) == [n.removesuffix(".weight") for n in result.packed]
    for name in ours:
        assert_same_packed(theirs[name], ours[name], name)
    assert_no_float_copy(empty, theirs)
    expected = {k: v for k, v in model.state_dict().items() if k.rpartition(".")[0] not in ours}
    got = empty.state_dict()
    for key, tensor in expected.items():
        assert got[key].dtype == tensor.dtype and torch.equal(got[key], tensor), key
    for names in tied:
        assert empty.get_parameter(names[0]) is empty.get_parameter(names[1])  # still tied

    input_ids = ids()
    assert torch.equal(compiled_logits(empty, cfg, input_ids), compiled_logits(model, cfg, input_ids))
    with pytest.raises(RuntimeError, match="holds no float data"):  # guarded as quantize() guards
        with torch.no_grad():
            empty(input_ids=input_ids)


def _aliases(model) -> list[list[str]]:
    from qcompile.passes.names import parameter_aliases

    return list(parameter_aliases(model).values())


def build_empty(model):
    with accelerate.init_empty_weights():
        return type(model)(copy.deepcopy(model.config)).eval()


def test_load_into_a_real_model_and_a_plain_module_round_trip(tmp_path):
    model = tiny_llama()
    qcompile.quantize(model, config_of(NF4_DQ))
    save_quantized(model, tmp_path)
    real = tiny_llama(seed=1)  # other random weights, overwritten
    load_quantized(real, tmp_path, config=config_of(NF4_DQ))
    for name, packed in packed_forms(model).items():
        assert_same_packed(packed_forms(real)[name], packed, name)
    assert torch.equal(real.lm_head.weight, model.lm_head.weight)

    from tests.models import MLP

    torch.manual_seed(0)
    mlp = MLP()
    cfg = qcompile.QuantConfig(default=FP4_PLAIN, rules=(qcompile.Rule("fc2", NF4_DQ),))  # no config.json: may mix
    qcompile.quantize(mlp, cfg)
    save_quantized(mlp, tmp_path / "mlp")
    assert not (tmp_path / "mlp" / "config.json").exists()
    with accelerate.init_empty_weights():
        empty = MLP()
    load_quantized(empty, tmp_path / "mlp", config=cfg)
    for name, packed in packed_forms(mlp).items():
        assert_same_packed(packed_forms(empty)[name], packed, name)

    with accelerate.init_empty_weights():
        bare = MLP()
    result = load_quantized(bare, tmp_path / "mlp")  # no config anywhere: the file's schemes, fp32 compute
    for name, packed in packed_forms(bare).items():
        assert result.config.scheme_for(name)[0] == packed.scheme, name
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    compiled = torch.compile(bare, backend="qcompile", options={"config": result.config, "inner": "eager"})
    with torch.no_grad():
        out = compiled(x)
        h = x
        for layer in (bare.fc1, bare.fc2, bare.lm_head):  # dequantize + F.linear in fp32, by hand
            [packed] = cached_packed_weights(layer.weight)
            h = torch.nn.functional.linear(h, packed.dequantize(torch.float32), layer.bias)
            h = torch.relu(h) if layer is not bare.lm_head else h
    torch.testing.assert_close(out, h, rtol=1e-5, atol=1e-5)


# ---- (d) errors ----------------------------------------------------------------------------------------------------

def test_mixed_schemes_name_two_modules(tmp_path):
    model = tiny_llama()
    cfg = qcompile.QuantConfig(default=NF4_DQ, rules=(qcompile.Rule("lm_head", None),
                                                      qcompile.Rule("*.mlp.*", FP4_PLAIN)))
    qcompile.quantize(model, cfg)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj is packed as nf4.* but "
                                         r"model\.layers\.0\.mlp\.gate_proj as fp4"):
        save_quantized(model, tmp_path)
    assert not list(tmp_path.iterdir())  # nothing written


def test_unquantized_model_and_unsavable_forms_are_errors(tmp_path):
    with pytest.raises(ValueError, match=r"call qcompile\.quantize\(model, config\) or qcompile\.calibrate first"):
        save_quantized(tiny_llama(), tmp_path)
    model = tiny_llama()
    qcompile.quantize(model, config_of(NF4(blocksize=128, compute_dtype=F32)))
    with pytest.raises(ValueError, match="blocksize: 128 .*BitsAndBytesConfig"):
        save_quantized(model, tmp_path)
    model = tiny_llama()
    qcompile.quantize(model, config_of(qcompile.Int8WeightOnly()))
    with pytest.raises(ValueError, match=r"q_proj\.weight: packed as int8_weight_only.*no checkpoint layout"):
        save_quantized(model, tmp_path)
    model = tiny_gpt2(tied=True)  # a quantized tied head: the embedding still reads it in float
    qcompile.quantize(model, qcompile.QuantConfig(default=NF4_DQ, rules=(qcompile.Rule("lm_head", NF4_DQ),)))
    with pytest.raises(ValueError, match=r"lm_head\.weight: tied to transformer\.wte"):
        save_quantized(model, tmp_path)


@pytest.fixture
def saved(tmp_path):
    model = tiny_llama()
    qcompile.quantize(model, config_of(NF4_DQ))
    return model, save_quantized(model, tmp_path / "q")


def test_shape_mismatch_is_an_error_before_anything_is_loaded(saved):
    model, directory = saved
    config = copy.deepcopy(model.config)
    config.intermediate_size = 256
    with accelerate.init_empty_weights():
        wider = transformers.LlamaForCausalLM(config)
    with pytest.raises(ValueError, match=r"mlp\.(down|gate|up)_proj\.weight: checkpoint shape \((64, 128|128, 64)\) "
                                         r"!= model shape"):
        load_quantized(wider, directory)
    assert all(p.device.type == "meta" for p in wider.parameters())
    config = copy.deepcopy(model.config)
    config.vocab_size = 256
    with accelerate.init_empty_weights():
        bigger = transformers.LlamaForCausalLM(config)
    with pytest.raises(ValueError, match=r"(embed_tokens|lm_head)\.weight: checkpoint shape \(128, 64\)"):
        load_quantized(bigger, directory)


def rewrite(directory, drop=(), add=None):
    path = directory / "model.safetensors"
    tensors = safetensors_torch.load_file(str(path))
    for key in drop:
        del tensors[key]
    tensors.update(add or {})
    safetensors_torch.save_file(tensors, str(path), metadata={"format": "pt"})


def test_missing_and_unexpected_tensors(saved):
    model, directory = saved
    rewrite(directory, drop=["model.norm.weight", "model.layers.1.input_layernorm.weight"],
            add={"model.extra.weight": torch.zeros(3), "model.more": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"model\.layers\.1\.input_layernorm\.weight: not in .*"
                                         r"\(2 parameters missing\)"):
        load_quantized(empty_model(directory), directory)
    rewrite(directory, add={"model.norm.weight": model.model.norm.weight.detach(),
                            "model.layers.1.input_layernorm.weight": model.model.layers[1].input_layernorm.weight})
    with pytest.warns(UserWarning, match=r"2 tensors .* match nothing in the model .*e\.g\. model\.extra\.weight"):
        load_quantized(empty_model(directory), directory)
    rewrite(directory, drop=["model.layers.0.mlp.up_proj.weight.absmax"])
    empty = empty_model(directory)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.up_proj\.weight\.absmax: missing .*\(1 entries"):
        load_quantized(empty, directory)
    assert all(p.device.type == "meta" and not is_released(p) for p in empty.parameters())  # nothing loaded
    rewrite(directory, drop=["model.layers.0.mlp.up_proj.weight"])
    with pytest.raises(ValueError, match=r"up_proj\.weight: missing from the checkpoint.*\(2 entries missing\)"):
        load_quantized(empty_model(directory), directory)


def test_config_that_plans_another_scheme_is_an_error(saved):
    _, directory = saved
    with pytest.raises(ValueError, match=r"q_proj: the checkpoint holds it as nf4\(blocksize=64, double_quant=True\), "
                                         r"but the config plans fp4"):
        load_quantized(empty_model(directory), directory, config=config_of(FP4_PLAIN))
    skip_attention = qcompile.QuantConfig(default=NF4_DQ, rules=(qcompile.Rule("*self_attn*", None),))
    with pytest.raises(ValueError, match=r"self_attn\.q_proj: packed in the checkpoint .* but the config keeps "
                                         r"it float"):
        load_quantized(empty_model(directory), directory, config=skip_attention)
    with pytest.raises(ValueError, match="not a directory"):
        load_quantized(empty_model(directory), directory / "missing")
