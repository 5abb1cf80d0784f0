"""load_quantized: read a checkpoint in bitsandbytes', GPTQ's or AutoAWQ's layout into a model, never in float."""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qcompile import config as config_module
from qcompile.checkpoint.layout import (
    AFFINE_SUFFIXES,
    BNB_SUFFIXES,
    CONFIG_NAME,
    INDEX_NAME,
    QUANT_STATE,
    scheme_text,
)
from qcompile.config import QuantConfig, Rule
from qcompile.fallback import FallbackPolicy, guard
from qcompile.formats import AWQ, GPTQ, Int8, PackedAffine, PackedInt8, PackedWeight, Scheme
from qcompile.formats.fourbit import FourBitScheme
from qcompile.formats.int32_words import run_length
from qcompile.pack_cache import adopt_packed
from qcompile.passes.names import WeightNames, parameter_aliases
from qcompile.passes.plan import linear_decisions
from qcompile.passes.sites import float_reader, linear_weight_of
from qcompile.quantize_model import QuantizeResult, swap_parameter

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
    of a bitsandbytes model), or a GPTQ (format v1: ``qweight``, ``qzeros``, ``scales``, ``g_idx``) or AutoAWQ
    GEMM checkpoint, into ``model``, built on the meta device (``accelerate.init_empty_weights()``) or real;
    returns what was packed. GPTQ and AWQ checkpoints need their ``quantization_config`` (in ``config.json``,
    or ``config=``) for the bits and group size.

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
            # Every tensor kept is copied out: safetensors' tensors are views of the memory-mapped file, and one
            # kept view would keep the whole shard mapped (and resident) for as long as the model lives.
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for key in f.keys():
                    if key in unexpected:
                        continue
                    group = by_key.get(key)
                    if group is not None:
                        group.tensors[group.keys[key]] = f.get_tensor(key).to(target, copy=True)
                        if len(group.tensors) == len(group.keys):
                            done.append((group, _install(model, group, aliases)))
                    elif key in params:
                        param = params[key]
                        value = f.get_tensor(key).to(device=target, dtype=param.dtype, copy=True)
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
                            device=target, dtype=old.dtype if old is not None and old.is_floating_point() else None,
                            copy=True)
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
    head, sep, tail = key.partition("." + QUANT_STATE)
    if sep:
        return head, QUANT_STATE + tail
    for suffix in BNB_SUFFIXES + AFFINE_SUFFIXES:
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
              and (split[1].startswith(QUANT_STATE) or split[1] in ("SCB", "qweight"))}
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
    quant_states = [k for k, r in group.keys.items() if r.startswith(QUANT_STATE)]
    if "qweight" in rels:
        _check_affine_group(group, header, expected)
        return
    if "SCB" in rels:
        required = ["weight", "SCB"]
    elif len(quant_states) != 1:
        raise ValueError(f"{name}: expected one '{QUANT_STATE}nf4' or '...fp4' entry, found {sorted(quant_states)}")
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
        file_scheme = (group.keys[quant_states[0]][len(QUANT_STATE):], meta.get("blocksize"), nested)
    if tuple(file_shape) != tuple(expected):
        raise ValueError(f"{weight_key}: checkpoint shape {tuple(file_shape)} != model shape {tuple(expected)}"
                         + (" (the [out, in] form of the model's Conv1D weight)" if group.transposed else ""))
    scheme = group.scheme
    if scheme is None:
        if group.skipped:
            raise ValueError(f"{name}: packed in the checkpoint ({_filescheme_text(file_scheme)}), but the config "
                             "keeps it float; load with the config the checkpoint was saved with")
        return
    if file_scheme[0] == "int8":
        ok = isinstance(scheme, Int8) and not scheme.has_fp16_weight
    else:
        ok = (isinstance(scheme, FourBitScheme) and scheme.kind == file_scheme[0]
              and scheme.blocksize == file_scheme[1] and scheme.double_quant == file_scheme[2])
    if not ok:
        raise ValueError(f"{name}: the checkpoint holds it as {_filescheme_text(file_scheme)}, but the config plans "
                         f"{scheme_text(scheme)}; load with the config the checkpoint was saved with")


def _check_affine_group(group: _Group, header: Mapping[str, _Info], expected: tuple[int, ...]) -> None:
    """A GPTQ / AWQ linear: the config's scheme says which layout and its bits and group size; shapes agree."""
    name, scheme = group.module_name, group.scheme
    if scheme is None:
        raise ValueError(f"{name}: a GPTQ / AWQ linear in the checkpoint, but no config plans it (GPTQ or AWQ): load "
                         "with the checkpoint's quantization_config (config.json, or config=)")
    if not isinstance(scheme, (GPTQ, AWQ)):
        raise ValueError(f"{name}: the checkpoint holds it as GPTQ / AWQ integers (qweight), but the config plans "
                         f"{scheme_text(scheme)}; load with the checkpoint's quantization_config")
    rels = {r: k for k, r in group.keys.items()}
    absent = [rel for rel in ("qweight", "qzeros", "scales") if rel not in rels]
    if absent:
        raise ValueError(f"{name}.{absent[0]}: missing from the checkpoint, which holds the module's qweight")
    out_features, in_features = expected
    per_run, words = run_length(scheme.bits)
    groups = scheme.groups(in_features)
    if isinstance(scheme, AWQ):
        shapes = {"qweight": (in_features, out_features // 8), "qzeros": (groups, out_features // 8)}
    else:
        shapes = {"qweight": (in_features // per_run * words, out_features),
                  "qzeros": (groups, out_features // per_run * words), "g_idx": (in_features,)}
    shapes["scales"] = (groups, out_features)
    for rel, shape in shapes.items():
        if rel in rels and tuple(header[rels[rel]].shape) != shape:
            raise ValueError(f"{rels[rel]}: checkpoint shape {tuple(header[rels[rel]].shape)} != {shape}, what "
                             f"{scheme_text(scheme)} stores for the model's [{out_features}, {in_features}] weight")


def _filescheme_text(file_scheme: tuple) -> str:
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
        if "qweight" in group.tensors:
            packed = _affine_from_checkpoint(group, scheme)
        else:
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


def _affine_from_checkpoint(group: _Group, scheme: Scheme) -> PackedWeight:
    t, dtype = group.tensors, group.parameter.dtype
    if isinstance(scheme, AWQ):
        return PackedAffine.from_awq(scheme, t["qweight"], t["qzeros"], t["scales"], dtype)
    return PackedAffine.from_gptq(scheme, t["qweight"], t["qzeros"], t["scales"], t.get("g_idx"), dtype)


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

