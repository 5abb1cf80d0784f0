"""Quantized checkpoints in bitsandbytes' layout: :func:`save_quantized` and :func:`load_quantized`.

    qcompile.quantize(model, cfg)
    qcompile.save_quantized(model, "out")            # transformers + bitsandbytes can load "out"
    ...
    with accelerate.init_empty_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained("out"))
    qcompile.load_quantized(model, "out")            # also loads what transformers' save_pretrained wrote
    model.forward = torch.compile(model.forward, backend="qcompile", options={"config": "out/config.json"})

The layout is the one ``save_pretrained`` writes for a model loaded with ``BitsAndBytesConfig``:

* safetensors files (``model.safetensors``, or ``model-00001-of-0000N.safetensors`` shards plus
  ``model.safetensors.index.json``: ``{"metadata": {"total_size": bytes}, "weight_map": {key: file}}``),
  with the header metadata ``{"format": "pt"}`` that transformers checks;
* a quantized linear ``m`` holds what ``bitsandbytes.nn.Linear4bit`` / ``Linear8bitLt`` put in their
  state dicts, under the module's name: 4-bit ``m.weight`` (the packed bytes viewed as the quant storage
  dtype, shape ``[(N*K+1)//2 // itemsize, 1]``), ``m.weight.absmax``, ``m.weight.quant_map``, with double
  quant ``m.weight.nested_absmax`` and ``m.weight.nested_quant_map``, and ``m.weight.quant_state.
  bitsandbytes__nf4`` (or ``__fp4``: a uint8 tensor holding the JSON of blocksize, original dtype and
  [N, K] shape, nested offset); LLM.int8() ``m.weight`` (int8 [N, K]), ``m.SCB`` (float32 [N], row absmax)
  and ``m.weight_format`` (0: row-major). transformers' ``Conv1D`` (GPT-2) stores its weight (in, out); its
  quantized form is the [out, in] one, as transformers quantizes ``weight.T``. A bias stays ``m.bias``;
* every other parameter and persistent buffer as ``state_dict()`` holds it; a tied weight once, under
  its first name (``model.embed_tokens.weight``, not ``lm_head.weight``), as transformers saves it.

For a transformers model ``config.json`` also carries ``quantization_config``, a ``BitsAndBytesConfig``
dict (all thirteen keys, as ``BitsAndBytesConfig.to_dict()`` writes them). transformers reads it to decide,
before loading any tensor, which modules become ``Linear4bit`` / ``Linear8bitLt``: every ``nn.Linear`` and
``Conv1D`` except those ``llm_int8_skip_modules`` names (a name matches a module when it equals the start
of its name up to a dot, or its end), with the 4-bit type, double quant, compute dtype and quant storage
of the config, or LLM.int8() with ``llm_int8_threshold``. The packed shapes, blocksize and nested state
come from each module's ``quant_state`` entry. So one config must describe every quantized linear (one
scheme) and the skip list names every linear left in float. The compute dtype is not in the tensors:
only the config records it. ``load_quantized`` reads the compute dtype (and the int8 threshold) from
there, and keys the packed forms by the scheme ``config.json``'s quantization_config plans, so the model
compiles with that config as is.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import re
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qcompile import config as config_module
from qcompile.config import QuantConfig, Rule
from qcompile.dtypes import dtype_name
from qcompile.fallback import FallbackPolicy, guard
from qcompile.formats import Int8, Packed4bit, PackedInt8, PackedWeight, Scheme
from qcompile.formats.fourbit import FourBitScheme
from qcompile.pack_cache import adopt_packed, cached_packed_weights, is_released, packed_weight
from qcompile.passes.names import WeightNames, parameter_aliases
from qcompile.passes.plan import linear_decisions
from qcompile.passes.sites import float_reader, linear_weight_of
from qcompile.quantize_model import ADAPTER_MARK, QuantizeResult, swap_parameter

log = logging.getLogger("qcompile")

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
DEFAULT_MAX_SHARD_SIZE = "50GB"  # transformers 5's save_pretrained default
# bitsandbytes' 4-bit blocksize; a BitsAndBytesConfig has no blocksize key, so transformers quantizes with it.
BNB_BLOCKSIZE = 64

_QUANT_STATE = "weight.quant_state.bitsandbytes__"
# Keys of a bitsandbytes module's state dict, relative to the module (longest first: "weight" last).
_BNB_SUFFIXES = ("weight.nested_quant_map", "weight.nested_absmax", "weight.quant_map", "weight.absmax",
                 "weight_format", "SCB", "weight")
_SHARD_PATTERN = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


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
    """Write ``model``'s packed linears and its other tensors to ``directory`` in bitsandbytes' layout
    (see the module docstring); returns the directory.

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
                         "in bitsandbytes' layout; call qcompile.quantize(model, config) first")
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
            raise ValueError(f"{name}: packed with {len(schemes)} schemes ({_scheme_text(schemes[0])} and "
                             f"{_scheme_text(schemes[1])}); a bitsandbytes checkpoint holds one form per weight: "
                             "qcompile.invalidate(model) and compile or quantize with one config")
        form = packed_weight(weight, schemes[0], transposed, name)  # repacks a float weight changed since
        reader = float_reader(WeightNames(tuple(aliases.get(id(weight), [name])), model))
        if reader is not None:
            raise ValueError(f"{name}: tied to {reader}, which reads it in float; bitsandbytes' layout holds one "
                             "form per tensor, so a tied weight cannot be saved packed (transformers keeps tied "
                             "heads in float: skip this module in the config)")
        if not isinstance(form, (Packed4bit, PackedInt8)) or (isinstance(form, PackedInt8) and form.master is not None):
            raise ValueError(f"{name}: packed as {_scheme_text(form.scheme)}, which has no bitsandbytes layout; "
                             "allowed: nf4, fp4 (Linear4bit) and int8 without has_fp16_weight (Linear8bitLt)")
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
                state = entry.packed.to_bitsandbytes()
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
        stale = path.name in (WEIGHTS_NAME, INDEX_NAME) or _SHARD_PATTERN.fullmatch(path.name)
        if stale and path.name not in keep and path.is_file():
            path.unlink()


def _shard_bytes(value: int | str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    elif isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", value)
        unit = match.group(2).upper() if match else None
        if match is None or unit not in _SIZE_UNITS:
            raise ValueError(f"max_shard_size: {value!r} is not a size; allowed: bytes as an int, or a number with "
                             f"a unit: {', '.join(u for u in _SIZE_UNITS if u)}")
        size = int(float(match.group(1)) * _SIZE_UNITS[unit])
    else:
        raise ValueError(f"max_shard_size: expected an int or a string like '5GB', got {type(value).__name__}")
    if size <= 0:
        raise ValueError(f"max_shard_size: {value!r} is not allowed; allowed: a size > 0")
    return size


# ---- config.json for transformers ---------------------------------------------------------------------------

def _is_transformers_model(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    return callable(getattr(config, "to_dict", None)) and callable(getattr(config, "save_pretrained", None))


def _scheme_text(scheme: Scheme) -> str:
    settings = ", ".join(f"{k}={v}" for k, v in scheme.to_dict().items() if k != "type")
    return f"{scheme.kind}({settings})"


def _bnb_key(scheme: Scheme) -> tuple:
    """What a BitsAndBytesConfig records of a scheme: two schemes with different keys need two configs."""
    if isinstance(scheme, FourBitScheme):
        return ("4bit", scheme.kind, scheme.blocksize, scheme.double_quant, scheme.compute_dtype, scheme.quant_storage)
    if isinstance(scheme, Int8):
        return ("8bit", scheme.threshold, scheme.has_fp16_weight)
    raise ValueError(f"{scheme.kind}: has no bitsandbytes layout")


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
    """The quantization_config for ``config.json``; ValueError when one BitsAndBytesConfig cannot describe
    the model (two schemes, a packed module transformers would not convert)."""
    entries = list(packed.values())
    first = entries[0]
    for entry in entries[1:]:
        if _bnb_key(entry.packed.scheme) != _bnb_key(first.packed.scheme):
            raise ValueError(
                f"{first.module_name} is packed as {_scheme_text(first.packed.scheme)} but {entry.module_name} as "
                f"{_scheme_text(entry.packed.scheme)}: config.json's quantization_config (one BitsAndBytesConfig) "
                "describes one scheme for every quantized linear; quantize the model with one scheme")
    for entry in entries:
        if not _transformers_converts(entry.module):
            raise ValueError(f"{entry.module_name}: a {type(entry.module).__name__}, which transformers does not "
                             "replace with a bitsandbytes module (only nn.Linear and Conv1D); skip it in the config")
    scheme = first.packed.scheme
    skip = [name for name, module in model.named_modules()
            if name not in packed and (_transformers_converts(module) or linear_weight_of(module) is not None)]
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
        if decided != have:
            wrote = "skip" if decided is None else _scheme_text(decided)
            stored = "float" if have is None else _scheme_text(have)
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


# ---- loading ------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class _Group:
    """The bitsandbytes entries of one linear module in the checkpoint, and where they go."""

    module_name: str
    parameter: nn.Parameter
    owners: list[nn.Module]
    transposed: bool
    keys: dict[str, str]  # full key -> key relative to the module
    scheme: Scheme | None  # the planned scheme (None: no config, the file's scheme)
    skipped: bool = False  # the config keeps this linear float
    tensors: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class _Info:
    file: Path
    shape: tuple[int, ...]
    dtype: str


def load_quantized(model: nn.Module, directory: str | os.PathLike[str], device: str | torch.device | None = None,
                   config: str | os.PathLike[str] | Mapping[str, Any] | QuantConfig | None = None) -> QuantizeResult:
    """Load a checkpoint in bitsandbytes' layout (:func:`save_quantized`, or transformers' ``save_pretrained``
    of a bitsandbytes model) into ``model``, built on the meta device (``accelerate.init_empty_weights()``)
    or real; returns what was packed.

    Files are read one tensor at a time. Each linear whose entries are a bitsandbytes state gets that packed
    form on ``device`` (default: the CPU), bit for bit, installed as :func:`qcompile.quantize` installs it: the
    parameter released (no float copy of it is ever made), frozen, its module guarded against eager calls.
    Every other tensor is assigned to its parameter or buffer on ``device``, in the model's dtype.

    config: the config the model will be compiled with; default ``config.json``'s quantization_config when the
        directory has one. It sets the compute dtype (and the int8 threshold), which bitsandbytes does not
        store, and the packed forms are kept under the schemes it plans; a module it plans differently from
        the file (another format, blocksize, double quant, or skipped) is a ValueError. Without any config,
        the file's schemes with float32 compute are used.
    """
    directory = Path(directory)
    target = torch.device(device) if device is not None else torch.device("cpu")
    files = _checkpoint_files(directory)
    cfg = _config_for(directory, config)
    header = _read_header(files)
    _tie_declared_weights(model, header)

    aliases = parameter_aliases(model)
    linears: dict[str, tuple[nn.Module, nn.Parameter, bool]] = {}
    for name, module in model.named_modules():
        linear = linear_weight_of(module)
        if linear is not None and isinstance(linear[0], nn.Parameter):
            linears[name] = (module, linear[0], linear[1])
    planned = _planned_schemes(model, cfg) if cfg is not None else None
    groups, unexpected = _find_groups(model, header, linears, planned, aliases)
    by_key = {key: group for group in groups.values() for key in group.keys}

    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = {name: (model.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2])
               for name, _ in model.named_buffers(remove_duplicate=False)}
    packed_ids = {id(group.parameter) for group in groups.values()}
    _check_float_tensors(header, by_key, params, buffers, unexpected)
    _check_missing(directory, header, params, packed_ids)

    done: list[tuple[_Group, PackedWeight]] = []
    loaded_buffers: set[str] = set()
    try:
        from safetensors import safe_open
    except ImportError as e:  # _read_header imported it already
        raise ImportError("qcompile.load_quantized reads safetensors files: pip install safetensors") from e
    with torch.no_grad():
        for path in files:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for key in f.keys():
                    if key in unexpected:
                        continue
                    group = by_key.get(key)
                    if group is not None:
                        group.tensors[group.keys[key]] = f.get_tensor(key).to(target)
                        if len(group.tensors) == len(group.keys):
                            done.append((group, _install(model, group, aliases)))
                    elif key in params:
                        param = params[key]
                        value = f.get_tensor(key).to(device=target, dtype=param.dtype)
                        if param.device.type == "meta":  # a meta tensor's data cannot be set: a new parameter
                            names = aliases.get(id(param), [key])
                            params.update(dict.fromkeys(names, swap_parameter(model, param, value, names)))
                        else:
                            param.data = value
                    else:
                        module, attr = buffers[key]
                        old = module._buffers[attr]
                        tensor = f.get_tensor(key)
                        module._buffers[attr] = tensor.to(
                            device=target, dtype=old.dtype if old is not None and old.is_floating_point() else None)
                        loaded_buffers.add(key)
    if unexpected:
        warnings.warn(f"qcompile.load_quantized: {len(unexpected)} tensors in {directory} match nothing in the "
                      f"model and were not loaded (e.g. {sorted(unexpected)[0]})", stacklevel=2)
    _finish_buffers(model, target, loaded_buffers)
    order = {name: i for i, name in enumerate(linears)}
    done.sort(key=lambda item: order[item[0].module_name])
    policy = FallbackPolicy("error")
    for group, _ in done:
        for module in group.owners:
            guard(module, f"{group.module_name}.weight", group.parameter, policy, released=True)
    if cfg is None:  # the file's own schemes, module by module: what to compile with
        cfg = QuantConfig(default=None, rules=tuple(Rule(group.module_name, packed.scheme) for group, packed in done))
    return QuantizeResult(tuple(f"{group.module_name}.weight" for group, _ in done), (),
                          sum(packed.nbytes for _, packed in done), config=cfg)


def _checkpoint_files(directory: Path) -> list[Path]:
    if not directory.is_dir():
        raise ValueError(f"{directory}: not a directory")
    index = directory / INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index}: no weight_map")
        files = [directory / name for name in dict.fromkeys(weight_map.values())]
        absent = [str(p) for p in files if not p.is_file()]
        if absent:
            raise ValueError(f"{absent[0]}: listed in {INDEX_NAME} but missing ({len(absent)} files missing)")
        return files
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{directory}: no *.safetensors files in this directory")
    return files


def _config_for(directory: Path, config: Any) -> QuantConfig | None:
    if config is not None:
        return config_module.load(config)
    path = directory / CONFIG_NAME
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or data.get("quantization_config") is None:
        return None
    return QuantConfig.from_dict({"quantization_config": data["quantization_config"]})


def _read_header(files: list[Path]) -> dict[str, _Info]:
    """Every key of the files with its shape and dtype, from the headers (no tensor data is read)."""
    try:
        from safetensors import safe_open
    except ImportError as e:
        raise ImportError("qcompile.load_quantized reads safetensors files: pip install safetensors") from e
    header: dict[str, _Info] = {}
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():
                if key in header:
                    raise ValueError(f"{key}: in both {header[key].file.name} and {path.name}")
                part = f.get_slice(key)
                header[key] = _Info(path, tuple(part.get_shape()), part.get_dtype())
    return header


def _tie_declared_weights(model: nn.Module, header: Mapping[str, _Info]) -> None:
    """Tie the weights a transformers model declares tied (``all_tied_weights_keys``, target -> source) when the
    checkpoint holds one of them, as ``from_pretrained`` does: a model built under ``init_empty_weights()``
    is not tied yet (transformers 5 ties when it initializes or loads weights)."""
    tied = getattr(model, "all_tied_weights_keys", None)
    if not isinstance(tied, Mapping):
        return
    for target, source in tied.items():
        if (target in header) == (source in header):
            continue  # both stored (then they are separate tensors), or neither (reported as missing)
        if target in header:
            target, source = source, target  # tie to the one the checkpoint holds
        try:
            parameter = model.get_parameter(source)
            owner = model.get_submodule(target.rpartition(".")[0])
        except AttributeError:
            continue
        attr = target.rpartition(".")[2]
        if isinstance(owner._parameters.get(attr), nn.Parameter) and owner._parameters[attr] is not parameter:
            owner._parameters[attr] = parameter


def _planned_schemes(model: nn.Module, cfg: QuantConfig) -> dict[int, Scheme | None]:
    """id(module) -> the scheme ``cfg`` plans for the linear (None: kept float)."""
    return {id(module): scheme for module, _, _, scheme in linear_decisions(model, cfg, include_meta=True)}


def _split_key(key: str) -> tuple[str, str] | None:
    """(module name, key relative to it) when ``key`` can be a bitsandbytes module's entry."""
    head, sep, tail = key.partition("." + _QUANT_STATE)
    if sep:
        return head, _QUANT_STATE + tail
    for suffix in _BNB_SUFFIXES:
        if key.endswith("." + suffix):
            return key[:-len(suffix) - 1], suffix
    return None


def _find_groups(model: nn.Module, header: Mapping[str, _Info],
                 linears: Mapping[str, tuple[nn.Module, nn.Parameter, bool]],
                 planned: Mapping[int, Scheme | None] | None,
                 aliases: Mapping[int, list[str]]) -> tuple[dict[str, _Group], set[str]]:
    """The bitsandbytes states in the checkpoint, by module, checked against the model and the plan; and the
    keys of states whose module is not a linear of the model (unexpected)."""
    marked = {split[0] for key in header if (split := _split_key(key)) is not None
              and (split[1].startswith(_QUANT_STATE) or split[1] == "SCB")}
    groups: dict[str, _Group] = {}
    unexpected: set[str] = set()
    for key in header:
        split = _split_key(key)
        if split is None or split[0] not in marked:
            continue
        module_name, rel = split
        if module_name not in linears:
            unexpected.add(key)
            continue
        group = groups.get(module_name)
        if group is None:
            module, parameter, transposed = linears[module_name]
            owners = [m for m, p, _ in linears.values() if p is parameter]
            group = groups[module_name] = _Group(module_name, parameter, owners, transposed, {}, None)
            names = WeightNames(tuple(aliases.get(id(parameter), [f"{module_name}.weight"])), model)
            reader = float_reader(names)
            if reader is not None:
                raise ValueError(f"{module_name}.weight: packed in the checkpoint, but tied to {reader}, which reads "
                                 "it in float; a packed checkpoint cannot hold a tied weight")
            if planned is not None:
                group.scheme = planned.get(id(module))
                group.skipped = group.scheme is None
        group.keys[key] = rel
    groups = {name: groups[name] for name in linears if name in groups}  # model order: errors name the first
    for group in groups.values():
        _check_group(group, header)
    return groups, unexpected


def _check_group(group: _Group, header: Mapping[str, _Info]) -> None:
    """Shapes and the planned scheme against the file, before anything is loaded."""
    name = group.module_name
    rels = set(group.keys.values())
    shape = tuple(group.parameter.shape)
    expected = shape[::-1] if group.transposed else shape
    quant_states = [k for k, r in group.keys.items() if r.startswith(_QUANT_STATE)]
    if "SCB" in rels:
        required = ["weight", "SCB"]
    elif len(quant_states) != 1:
        raise ValueError(f"{name}: expected one '{_QUANT_STATE}nf4' or '...fp4' entry, found {sorted(quant_states)}")
    else:
        meta = _quant_state_json(header[quant_states[0]].file, quant_states[0])
        nested = "weight.nested_absmax" in rels or "nested_offset" in meta  # as Packed4bit._from_bnb decides
        required = ["weight", "weight.absmax", "weight.quant_map"]
        required += ["weight.nested_absmax", "weight.nested_quant_map"] if nested else []
    absent = [rel for rel in required if rel not in rels]
    if absent:  # checked here, so that a broken checkpoint fails before anything is loaded
        raise ValueError(f"{name}.{absent[0]}: missing from the checkpoint, which holds the rest of the module's "
                         f"bitsandbytes state ({len(absent)} entries missing)")
    weight_key = next(k for k, r in group.keys.items() if r == "weight")
    if "SCB" in rels:
        file_shape = header[weight_key].shape
        file_scheme: tuple = ("int8",)
    else:
        file_shape = tuple(meta.get("shape") or ())
        file_scheme = (group.keys[quant_states[0]][len(_QUANT_STATE):], meta.get("blocksize"), nested)
    if tuple(file_shape) != tuple(expected):
        raise ValueError(f"{weight_key}: checkpoint shape {tuple(file_shape)} != model shape {tuple(expected)}"
                         + (" (the [out, in] form of the model's Conv1D weight)" if group.transposed else ""))
    scheme = group.scheme
    if scheme is None:
        if group.skipped:
            raise ValueError(f"{name}: packed in the checkpoint ({_file_scheme_text(file_scheme)}), but the config "
                             "keeps it float; load with the config the checkpoint was saved with")
        return
    if file_scheme[0] == "int8":
        ok = isinstance(scheme, Int8) and not scheme.has_fp16_weight
    else:
        ok = (isinstance(scheme, FourBitScheme) and scheme.kind == file_scheme[0]
              and scheme.blocksize == file_scheme[1] and scheme.double_quant == file_scheme[2])
    if not ok:
        raise ValueError(f"{name}: the checkpoint holds it as {_file_scheme_text(file_scheme)}, but the config plans "
                         f"{_scheme_text(scheme)}; load with the config the checkpoint was saved with")


def _file_scheme_text(file_scheme: tuple) -> str:
    if file_scheme[0] == "int8":
        return "int8 (LLM.int8())"
    kind, blocksize, nested = file_scheme
    return f"{kind}(blocksize={blocksize}, double_quant={nested})"


def _quant_state_json(path: Path, key: str) -> dict[str, Any]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        blob = f.get_tensor(key)
    try:
        meta = json.loads(bytes(blob.tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, TypeError, ValueError) as e:
        raise ValueError(f"{key}: not a bitsandbytes quant state (JSON in uint8): {e}") from e
    if not isinstance(meta, dict):
        raise ValueError(f"{key}: not a bitsandbytes quant state, expected a JSON object")
    return meta


def _check_float_tensors(header: Mapping[str, _Info], by_key: Mapping[str, _Group],
                         params: Mapping[str, nn.Parameter], buffers: Mapping[str, tuple[nn.Module, str]],
                         unexpected: set[str]) -> None:
    """Sort every key that is not a bitsandbytes entry into a parameter, a buffer or unexpected; check shapes."""
    for key, info in header.items():
        if key in by_key or key in unexpected:
            continue
        if key in params:
            model_shape = tuple(params[key].shape)
        elif key in buffers:
            module, attr = buffers[key]
            buffer = module._buffers[attr]
            model_shape = tuple(buffer.shape) if buffer is not None else info.shape
        else:
            unexpected.add(key)
            continue
        if info.shape != model_shape:
            raise ValueError(f"{key}: checkpoint shape {info.shape} != model shape {model_shape}")


def _check_missing(directory: Path, header: Mapping[str, _Info], params: Mapping[str, nn.Parameter],
                   packed_ids: set[int]) -> None:
    """ValueError naming a parameter the checkpoint does not hold (under any of its names), and the count."""
    covered = {id(params[key]) for key in header if key in params} | packed_ids
    missing: dict[int, str] = {}  # one name per parameter (a tied one is missing under all its names)
    for name, param in params.items():
        if id(param) not in covered:
            missing.setdefault(id(param), name)
    if missing:
        first = next(iter(missing.values()))
        raise ValueError(f"{first}: not in {directory} ({len(missing)} parameters missing); the model must match "
                         "the checkpoint's names")


def _install(model: nn.Module, group: _Group, aliases: Mapping[int, list[str]]) -> PackedWeight:
    """Build the packed form from the group's tensors and make it the parameter's (released, frozen)."""
    old = group.parameter
    if old.device.type == "meta":  # a meta tensor's data cannot be set: give it a real parameter
        device = next(iter(group.tensors.values())).device
        placeholder = torch.empty((), dtype=old.dtype, device=device).expand(old.shape)
        names = aliases.get(id(old), [f"{group.module_name}.weight"])
        group.parameter = swap_parameter(model, old, placeholder, names)
    scheme = group.scheme
    compute = scheme.compute_dtype if isinstance(scheme, FourBitScheme) else None
    try:
        packed = PackedWeight.from_bitsandbytes(group.tensors, compute)
    except ValueError as e:
        raise ValueError(f"{group.module_name}.{e}") from e
    if scheme is not None:
        packed.scheme = scheme  # same storage settings (checked); the config's compute dtype / threshold
    if isinstance(packed, PackedInt8) and group.parameter.is_floating_point():
        packed.dtype = group.parameter.dtype  # bitsandbytes does not record it
    group.tensors.clear()
    adopt_packed(group.parameter, packed.scheme, group.transposed, packed)
    group.parameter.requires_grad_(False)
    return packed


def _finish_buffers(model: nn.Module, device: torch.device, loaded: set[str]) -> None:
    """Buffers not in the checkpoint (non-persistent ones: rotary tables) move to ``device``; a meta one is an
    error, a missing persistent one a warning."""
    missing = []
    for module_name, module in model.named_modules():
        for attr, buffer in list(module._buffers.items()):
            if buffer is None:
                continue
            name = f"{module_name}.{attr}" if module_name else attr
            if buffer.device.type == "meta":
                raise ValueError(f"{name}: a buffer on the meta device that the checkpoint does not hold; build the "
                                 "model with accelerate.init_empty_weights() (buffers stay real) instead of "
                                 "torch.device('meta')")
            if name not in loaded and attr not in module._non_persistent_buffers_set:
                missing.append(name)
            if buffer.device != device:
                module._buffers[attr] = buffer.to(device)
    if missing:
        warnings.warn(f"qcompile.load_quantized: {len(missing)} persistent buffers are not in the checkpoint and "
                      f"keep the model's values (e.g. {missing[0]})", stacklevel=3)
