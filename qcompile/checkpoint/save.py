"""save_quantized: write packed linears and the rest of a model in bitsandbytes' layout, or GPTQ's (v1) for
GPTQ / affine integer weights."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qcompile.checkpoint.layout import (
    BNB_BLOCKSIZE,
    DEFAULT_MAX_SHARD_SIZE,
    INDEX_NAME,
    SHARD_PATTERN,
    SIZE_UNITS,
    WEIGHTS_NAME,
    scheme_text,
)
from qcompile.config import QuantConfig
from qcompile.dtypes import dtype_name
from qcompile.formats import Int8, Packed4bit, PackedAffine, PackedInt8, PackedWeight, Scheme
from qcompile.formats.affine import AffineScheme
from qcompile.formats.fourbit import FourBitScheme
from qcompile.pack_cache import cached_packed_weights, is_released, packed_weight
from qcompile.passes.names import WeightNames, parameter_aliases
from qcompile.passes.plan import linear_decisions
from qcompile.passes.sites import float_reader, linear_weight_of
from qcompile.quantize_model import ADAPTER_MARK

# ---- saving -----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class _PackedLinear:
    """A linear module whose weight has a packed form, and that form."""

    module_name: str
    module: nn.Module
    parameter: nn.Parameter
    packed: PackedWeight


def save_quantized(model: nn.Module, directory: str | os.PathLike[str],
                   max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> Path:
    """Write ``model``'s packed linears and its other tensors to ``directory`` in bitsandbytes' layout, or in
    GPTQ's (v1: ``qweight``, ``qzeros``, ``scales``, ``g_idx``) for gptq and affine weights (see the module
    docstring); returns the directory. One model, one layout: its quantization_config describes every
    quantized linear. hqq, quanto and awq weights (float zero points, an input scale) cannot be saved yet.

    The packed form of each linear is the one in the pack cache (:func:`qcompile.quantize`, or the
    backend's). For a transformers model (``model.config`` with ``to_dict`` / ``save_pretrained``) also
    writes ``config.json`` with the ``quantization_config`` that makes
    ``AutoModelForCausalLM.from_pretrained(directory)`` load it as a bitsandbytes model, and the
    generation config. max_shard_size: bytes per safetensors file, an int or ``"5GB"`` / ``"500MiB"``;
    a larger tensor gets a file of its own, and a module's bitsandbytes entries are never split.
    """
    try:
        from safetensors.torch import save_file
    except ImportError as e:
        raise ImportError("qcompile.save_quantized writes safetensors files: pip install safetensors") from e
    limit = _shard_bytes(max_shard_size)
    packed = _packed_linears(model)
    if not packed:
        raise ValueError(f"{type(model).__name__}: no linear weight has a packed form, so there is nothing to save "
                         "packed; call qcompile.quantize(model, config) or qcompile.calibrate first")
    transformers_config = None
    if _is_transformers_model(model):
        transformers_config = _transformers_quantization_config(model, packed)
    groups = _tensor_groups(model, packed)

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shards = _split_shards(groups, limit)
    names = [WEIGHTS_NAME] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    _remove_stale_weights(directory, names)
    weight_map: dict[str, str] = {}
    total = 0
    for name, shard in zip(names, shards, strict=True):
        tensors = _cpu_tensors(shard)
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        save_file(tensors, str(directory / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        del tensors
    if len(names) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    if transformers_config is not None:
        _write_transformers_config(model, directory, transformers_config)
    return directory


def _packed_linears(model: nn.Module) -> dict[str, _PackedLinear]:
    """Every linear module whose weight has a packed form, by module name, in module order."""
    aliases = parameter_aliases(model)
    out: dict[str, _PackedLinear] = {}
    for module_name, module in model.named_modules():
        linear = linear_weight_of(module)
        if linear is None or ADAPTER_MARK in f".{module_name}":
            continue
        weight, transposed = linear
        name = f"{module_name}.weight"
        schemes = list(dict.fromkeys(form.scheme for form in cached_packed_weights(weight)))
        if not schemes:
            if is_released(weight):
                raise ValueError(f"{name}: its float data was released but it has no packed form to save")
            continue
        if len(schemes) > 1:
            raise ValueError(f"{name}: packed with {len(schemes)} schemes ({scheme_text(schemes[0])} and "
                             f"{scheme_text(schemes[1])}); a bitsandbytes checkpoint holds one form per weight: "
                             "qcompile.invalidate(model) and compile or quantize with one config")
        form = packed_weight(weight, schemes[0], transposed, name)  # repacks a float weight changed since
        reader = float_reader(WeightNames(tuple(aliases.get(id(weight), [name])), model))
        if reader is not None:
            raise ValueError(f"{name}: tied to {reader}, which reads it in float; bitsandbytes' layout holds one "
                             "form per tensor, so a tied weight cannot be saved packed (transformers keeps tied "
                             "heads in float: skip this module in the config)")
        if isinstance(form, PackedAffine):
            reason = form.gptq_reason()
            if reason is not None:
                raise ValueError(f"{name}: packed as {scheme_text(form.scheme)}, which has no checkpoint layout yet: "
                                 f"{reason}; allowed: nf4, fp4, int8 (bitsandbytes), gptq and affine (GPTQ)")
        elif not isinstance(form, (Packed4bit, PackedInt8)) or (isinstance(form, PackedInt8)
                                                                and form.master is not None):
            raise ValueError(f"{name}: packed as {scheme_text(form.scheme)}, which has no checkpoint layout; allowed: "
                             "nf4, fp4 (Linear4bit), int8 without has_fp16_weight (Linear8bitLt), gptq and affine")
        out[module_name] = _PackedLinear(module_name, module, weight, form)
    return out


def _tensor_groups(model: nn.Module, packed: Mapping[str, _PackedLinear]) -> list[list[tuple[str, torch.Tensor]]]:
    """The tensors to write, in ``state_dict()`` order: one group per packed linear (its bitsandbytes
    entries), one per other tensor; a tensor reachable under several names (a tied weight) once."""
    seen: set[int] = set()
    groups: list[list[tuple[str, torch.Tensor]]] = []
    for key, tensor in model.state_dict(keep_vars=True).items():
        module_name, _, attr = key.rpartition(".")
        entry = packed.get(module_name)
        if entry is not None and attr == "weight":
            if id(entry.parameter) not in seen:
                seen.add(id(entry.parameter))
                form = entry.packed
                state = form.to_gptq() if isinstance(form, PackedAffine) else form.to_bitsandbytes()
                groups.append([(f"{module_name}.{rel}", t) for rel, t in state.items()])
            continue
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        if is_released(tensor):
            raise ValueError(f"{key}: its float data was released (packed elsewhere), and it is not the weight of "
                             "a linear module that bitsandbytes' layout could save packed")
        groups.append([(key, tensor.detach())])
    return groups


def _split_shards(groups: list[list[tuple[str, torch.Tensor]]], limit: int) -> list[list[tuple[str, torch.Tensor]]]:
    shards: list[list[tuple[str, torch.Tensor]]] = []
    current: list[tuple[str, torch.Tensor]] = []
    size = 0
    for group in groups:
        nbytes = sum(t.numel() * t.element_size() for _, t in group)
        if current and size + nbytes > limit:
            shards.append(current)
            current, size = [], 0
        current.extend(group)
        size += nbytes
    if current or not shards:
        shards.append(current)
    return shards


def _cpu_tensors(shard: Iterable[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The shard's tensors on the CPU, contiguous, none sharing storage (safetensors refuses shared ones)."""
    out: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for key, tensor in shard:
        t = tensor.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in storages and t.numel():
            t = t.clone()
            ptr = t.untyped_storage().data_ptr()
        storages.add(ptr)
        out[key] = t
    return out


def _remove_stale_weights(directory: Path, keep: list[str]) -> None:
    """Delete weight files an earlier save left that this one does not write (as save_pretrained does),
    so that a loader globbing ``*.safetensors`` does not read them."""
    for path in directory.iterdir():
        stale = path.name in (WEIGHTS_NAME, INDEX_NAME) or SHARD_PATTERN.fullmatch(path.name)
        if stale and path.name not in keep and path.is_file():
            path.unlink()


def _shard_bytes(value: int | str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    elif isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", value)
        unit = match.group(2).upper() if match else None
        if match is None or unit not in SIZE_UNITS:
            raise ValueError(f"max_shard_size: {value!r} is not a size; allowed: bytes as an int, or a number with "
                             f"a unit: {', '.join(u for u in SIZE_UNITS if u)}")
        size = int(float(match.group(1)) * SIZE_UNITS[unit])
    else:
        raise ValueError(f"max_shard_size: expected an int or a string like '5GB', got {type(value).__name__}")
    if size <= 0:
        raise ValueError(f"max_shard_size: {value!r} is not allowed; allowed: a size > 0")
    return size


# ---- config.json for transformers ---------------------------------------------------------------------------

def _is_transformers_model(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    return callable(getattr(config, "to_dict", None)) and callable(getattr(config, "save_pretrained", None))

def _config_key(scheme: Scheme) -> tuple:
    """What a quantization_config records of a scheme: two schemes with different keys need two configs."""
    if isinstance(scheme, AffineScheme):
        return ("gptq", *sorted(_gptq_settings(scheme).items()))
    if isinstance(scheme, FourBitScheme):
        return ("4bit", scheme.kind, scheme.blocksize, scheme.double_quant, scheme.compute_dtype, scheme.quant_storage)
    if isinstance(scheme, Int8):
        return ("8bit", scheme.threshold, scheme.has_fp16_weight)
    raise ValueError(f"{scheme.kind}: has no checkpoint layout (bitsandbytes or GPTQ)")


def _gptq_settings(scheme: AffineScheme) -> dict[str, Any]:
    """What GPTQ's quantization_config says of an affine scheme with integer zeros (gptq's own calibration
    settings, or an ``affine`` scheme's storage written as GPTQ's)."""
    return {"bits": scheme.bits, "group_size": scheme.group_size, "sym": scheme.sym,
            "desc_act": getattr(scheme, "desc_act", False), "damp_percent": getattr(scheme, "damp_percent", 0.1),
            "static_groups": getattr(scheme, "static_groups", False)}


def _gptq_config_dict(scheme: AffineScheme, skip_modules: list[str]) -> dict[str, Any]:
    """GPTQ's quantization_config (format v1, as AutoGPTQ / transformers write it) for ``scheme``."""
    return {"quant_method": "gptq", **_gptq_settings(scheme), "true_sequential": True,
            "checkpoint_format": "gptq", "modules_to_not_convert": list(skip_modules)}


def _storage_key(scheme: Scheme | None) -> Any:
    """A scheme as far as its stored form goes: GPTQ's loader plans gptq where an affine scheme was saved, and
    a config.json cannot carry the compute dtype of a GPTQ scheme."""
    if isinstance(scheme, AffineScheme):
        return ("gptq", scheme.bits, scheme.group_size, scheme.sym)
    return scheme


def _quantization_config_dict(scheme: Scheme, skip_modules: list[str]) -> dict[str, Any]:
    """The ``BitsAndBytesConfig(...).to_dict()`` that quantizes every linear with ``scheme`` except
    ``skip_modules`` (a list, possibly empty: null would make transformers add its default skips)."""
    four_bit = isinstance(scheme, FourBitScheme)
    if four_bit and scheme.blocksize != BNB_BLOCKSIZE:
        raise ValueError(f"{scheme.kind}.blocksize: {scheme.blocksize} cannot be written to a BitsAndBytesConfig, "
                         f"which has no blocksize (transformers and bitsandbytes use {BNB_BLOCKSIZE}); allowed: "
                         f"{BNB_BLOCKSIZE}")
    if not four_bit and not isinstance(scheme, Int8):
        raise ValueError(f"{scheme.kind}: has no BitsAndBytesConfig; allowed: nf4, fp4, int8")
    return {
        "_load_in_4bit": four_bit,
        "_load_in_8bit": not four_bit,
        "bnb_4bit_compute_dtype": dtype_name(scheme.compute_dtype) if four_bit else "float32",
        "bnb_4bit_quant_storage": dtype_name(scheme.quant_storage) if four_bit else "uint8",
        "bnb_4bit_quant_type": scheme.kind if four_bit else "fp4",
        "bnb_4bit_use_double_quant": scheme.double_quant if four_bit else False,
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False if four_bit else scheme.has_fp16_weight,
        "llm_int8_skip_modules": list(skip_modules),
        "llm_int8_threshold": 6.0 if four_bit else scheme.threshold,
        "load_in_4bit": four_bit,
        "load_in_8bit": not four_bit,
        "quant_method": "bitsandbytes",
    }


def _transformers_converts(module: nn.Module) -> bool:
    """Whether transformers' ``replace_with_bnb_linear`` would make ``module`` a bitsandbytes module."""
    return type(module) is nn.Linear or (type(module).__name__ == "Conv1D"
                                         and type(module).__module__.startswith("transformers."))


def _transformers_quantization_config(model: nn.Module, packed: Mapping[str, _PackedLinear]) -> dict[str, Any]:
    """The quantization_config for ``config.json`` (a BitsAndBytesConfig, or GPTQ's); ValueError when one
    config cannot describe the model (two schemes, a packed module transformers would not convert)."""
    entries = list(packed.values())
    first = entries[0]
    for entry in entries[1:]:
        if _config_key(entry.packed.scheme) != _config_key(first.packed.scheme):
            raise ValueError(
                f"{first.module_name} is packed as {scheme_text(first.packed.scheme)} but {entry.module_name} as "
                f"{scheme_text(entry.packed.scheme)}: config.json's quantization_config (one BitsAndBytesConfig or "
                "GPTQ config) describes one scheme for every quantized linear; quantize the model with one scheme")
    for entry in entries:
        if not _transformers_converts(entry.module):
            raise ValueError(f"{entry.module_name}: a {type(entry.module).__name__}, which transformers does not "
                             "replace with a bitsandbytes module (only nn.Linear and Conv1D); skip it in the config")
    scheme = first.packed.scheme
    skip = [name for name, module in model.named_modules()
            if name not in packed and (_transformers_converts(module) or linear_weight_of(module) is not None)]
    if isinstance(scheme, AffineScheme):
        qconfig = _gptq_config_dict(scheme, skip)
    else:
        qconfig = _quantization_config_dict(scheme, skip)
    # load_quantized plans with this config (as the compiled model will): it must pick exactly the packed
    # linears, with their schemes, or the packed forms would not be found under the planned scheme.
    planned = QuantConfig.from_dict({"quantization_config": qconfig})
    names = {id(module): name for name, module in model.named_modules()}
    for module, _, _, decided in linear_decisions(model, planned, include_meta=True):
        name = names.get(id(module), "")
        if ADAPTER_MARK in f".{name}":
            continue
        entry = packed.get(name)
        have = None if entry is None else entry.packed.scheme
        if _storage_key(decided) != _storage_key(have):
            wrote = "skip" if decided is None else scheme_text(decided)
            stored = "float" if have is None else scheme_text(have)
            raise ValueError(f"{name}: the quantization_config written for it ({wrote}) does not match how it is "
                             f"stored ({stored}); its name cannot be told apart in llm_int8_skip_modules")
    return qconfig


def _write_transformers_config(model: nn.Module, directory: Path, quantization_config: dict[str, Any]) -> None:
    config = copy.deepcopy(model.config)
    config.quantization_config = quantization_config
    config.architectures = [type(model).__name__]
    dtype = getattr(model, "dtype", None)
    if isinstance(dtype, torch.dtype):
        config.dtype = dtype_name(dtype)  # as save_pretrained records it
    config.save_pretrained(str(directory))
    can_generate = getattr(model, "can_generate", None)
    generation = getattr(model, "generation_config", None)
    if callable(can_generate) and can_generate() and generation is not None:
        generation.save_pretrained(str(directory))


