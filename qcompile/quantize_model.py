"""``qcompile.quantize``: pack a model's planned linears now, layer by layer, leaving no float copy of them.

    model = build_model()                                   # float, on the CPU (or on the meta device)
    qcompile.quantize(model, "quant.json", device="cuda")   # packs straight to the GPU, one layer at a time
    model.forward = torch.compile(model.forward, backend="qcompile", options={"config": "quant.json"})

Each planned weight is moved to ``device`` alone, packed there, and replaced by a released placeholder
(one NaN broadcast to its shape, :func:`qcompile.pack_cache.adopt_packed`): the device never holds more
float weights than the largest layer. The packed forms sit in the pack cache, where the backend finds
them (same config, same plan: nothing is packed again). Weights are frozen (``requires_grad=False``), as
bitsandbytes freezes its 4-bit weights; LoRA adapters (peft's ``lora_*`` modules) are never quantized.

With ``checkpoint`` (safetensors files, or a directory of them), the model may be built on the meta
device (``accelerate.init_empty_weights()``): the files are read one tensor at a time, each planned
weight packed as it arrives, so host memory holds one tensor beyond the packed model.

A quantized model runs through ``torch.compile(..., backend="qcompile")``; calling its quantized linears
without it raises (their float data is gone), naming the module. A weight that something else reads in
float (the embedding of a tied head a rule quantizes) is packed and kept.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qcompile import config as config_module
from qcompile.adopt_bnb import adopt_bitsandbytes, bitsandbytes_config
from qcompile.config import QuantConfig
from qcompile.fallback import FallbackPolicy, guard
from qcompile.formats import PackedWeight, Scheme
from qcompile.pack_cache import adopt_packed, is_released, packed_keys
from qcompile.passes.names import WeightNames, parameter_aliases
from qcompile.passes.plan import linear_decisions
from qcompile.passes.sites import float_reader

log = logging.getLogger("qcompile")

ADAPTER_MARK = ".lora_"  # peft's LoRA modules (lora_A, lora_B, lora_embedding_*, lora_magnitude_vector)


@dataclasses.dataclass(frozen=True)
class QuantizeResult:
    """What :func:`quantize` did: names of the weights packed, those packed but kept float (read in float
    elsewhere), the bytes of packed data made, the bitsandbytes layers adopted, and the config used: compile
    with it (``options={"config": result.config}``) so that the backend's plan is the same."""

    packed: tuple[str, ...]
    kept_float: tuple[str, ...]
    packed_bytes: int
    adopted: tuple[str, ...] = ()
    config: QuantConfig | None = None


@dataclasses.dataclass
class PlannedWeight:
    """One planned weight: its module(s), name, scheme and whether it is stored (in, out)."""

    name: str
    parameter: nn.Parameter
    owners: list[nn.Module]
    scheme: Scheme
    transposed: bool
    keep_float: bool


def quantize(
    model: nn.Module,
    config: str | os.PathLike[str] | Mapping[str, Any] | QuantConfig | None = None,
    device: str | torch.device | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
) -> QuantizeResult:
    """Pack ``model``'s planned linear weights now (see the module docstring); returns what was packed.

    config: as the backend's ``config`` option (default: NF4 + double quant, ``lm_head`` float).
    device: where the packed weights and the rest of the model go (default: where each weight is).
    checkpoint: safetensors file(s) or a directory holding them (a ``*.index.json`` is not needed) to
        load the model's tensors from, for a model built on the meta device.
    """
    adopted = adopt_bitsandbytes(model)  # bitsandbytes layers become plain linears on their own packed bytes
    bnb_config = bitsandbytes_config(model) if config is None and adopted else None
    cfg = bnb_config if bnb_config is not None else config_module.load(config)
    if adopted and checkpoint is not None:
        raise ValueError(f"{adopted[0]}: a bitsandbytes layer; checkpoint= loads into float or meta models only")
    target = torch.device(device) if device is not None else None
    if checkpoint is not None and callable(getattr(model, "tie_weights", None)):
        model.tie_weights()  # as from_pretrained does: a tied head is saved once, under the embedding's name
    targets = planned_targets(model, cfg)
    if checkpoint is None:
        meta = [name for name, p in model.named_parameters() if p.device.type == "meta"]
        if meta:
            raise ValueError(f"{meta[0]}: on the meta device (not loaded); pass checkpoint= to load and quantize "
                             f"the model's tensors from safetensors files ({len(meta)} meta parameters)")
        packed = [_pack(t, t.parameter.detach(), target) for t in targets.values()]
        if target is not None:
            _move_rest(model, targets, target, adopted)
    else:
        packed = _load_and_pack(model, targets, Path(checkpoint), target)
    guard_packed(targets.values())
    kept = tuple(t.name for t in targets.values() if t.keep_float)
    if kept:
        log.info("qcompile.quantize: %d weights packed but kept float, read in float elsewhere (e.g. %s)",
                 len(kept), kept[0])
    return QuantizeResult(tuple(targets), kept, sum(p.nbytes for p in packed), tuple(adopted), cfg)


def planned_targets(model: nn.Module, cfg: QuantConfig) -> dict[str, PlannedWeight]:
    """The weights ``cfg`` quantizes in ``model`` (LoRA adapters never), by primary name, once per parameter."""
    aliases = parameter_aliases(model)
    out: dict[str, PlannedWeight] = {}
    seen: dict[int, PlannedWeight] = {}
    for module, name, weight, scheme in linear_decisions(model, cfg, include_meta=True):
        if scheme is None or ADAPTER_MARK in f".{name}":
            continue
        if id(weight) in seen:
            seen[id(weight)].owners.append(module)
            continue
        if is_released(weight):
            if any(scheme == key[0] for key in packed_keys(weight)):
                continue  # adopted from bitsandbytes with this very scheme
            raise ValueError(f"{name}: already quantized (its float data was released, or it was adopted from "
                             "bitsandbytes with another scheme); build or load the model again to quantize it with "
                             "another config")
        names = WeightNames(tuple(aliases.get(id(weight), [name])), model)
        transposed = not isinstance(module, nn.Linear)  # transformers' Conv1D stores (in, out)
        seen[id(weight)] = out[name] = PlannedWeight(name, weight, [module], scheme, transposed,
                                               keep_float=float_reader(names) is not None)
    return out


def _pack(target: PlannedWeight, data: torch.Tensor, device: torch.device | None, mapped: bool = False) -> PackedWeight:
    """Pack ``data`` (the weight's values) on ``device`` and install it as the weight's packed form.
    ``mapped``: ``data`` lives in a memory-mapped file, so a float copy that is kept must be copied out."""
    with torch.no_grad():
        on_device = data.to(device=device or data.device, dtype=target.parameter.dtype,
                            copy=mapped and target.keep_float)
        packed = target.scheme.pack(on_device.t() if target.transposed else on_device, name=target.name)
    install_packed(target, packed, on_device)
    return packed


def install_packed(target: PlannedWeight, packed: PackedWeight, float_data: torch.Tensor) -> None:
    """Make ``packed`` the weight's packed form and drop its float data (unless it is read in float elsewhere:
    then it becomes ``float_data``); freeze it."""
    adopt_packed(target.parameter, target.scheme, target.transposed, packed,
                 float_data=float_data if target.keep_float else None)
    target.parameter.requires_grad_(False)


def guard_packed(targets: Iterable[PlannedWeight]) -> None:
    """Make every released weight's modules raise when run outside a qcompile graph (no float data left)."""
    policy = FallbackPolicy("error")
    for t in targets:
        if not t.keep_float:
            for module in t.owners:
                guard(module, t.name, t.parameter, policy, released=True)


def _move_rest(model: nn.Module, targets: dict[str, PlannedWeight], device: torch.device, adopted: list[str]) -> None:
    """Move every parameter and buffer that was not packed to ``device`` (one at a time, keeping ties)."""
    elsewhere = [name for name in adopted if model.get_parameter(name).device != device]
    if elsewhere:
        raise ValueError(f"{elsewhere[0]}: adopted from bitsandbytes on {model.get_parameter(elsewhere[0]).device}; "
                         f"load the bitsandbytes model on {device} instead of moving it")
    done = {id(t.parameter) for t in targets.values()} | {id(model.get_parameter(name)) for name in adopted}
    with torch.no_grad():
        for _, param in model.named_parameters():
            if id(param) not in done:
                param.data = param.data.to(device)
    _move_buffers(model, device)


def _shards(checkpoint: Path) -> list[Path]:
    if checkpoint.is_dir():
        files = sorted(checkpoint.glob("*.safetensors"))
        if not files:
            raise ValueError(f"{checkpoint}: no *.safetensors files in this directory")
        return files
    if not checkpoint.exists():
        raise ValueError(f"{checkpoint}: no such file or directory")
    return [checkpoint]


def _shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape, from the files' headers (no data read)."""
    from safetensors import safe_open

    shapes = {}
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():
                shapes[key] = tuple(f.get_slice(key).get_shape())
    return shapes


def _check_matches(model: nn.Module, shapes: Mapping[str, tuple[int, ...]], checkpoint: Path) -> None:
    """Raise before anything is loaded when the checkpoint lacks one of the model's meta parameters, or a
    shape differs: a failed load must not leave the model half quantized."""
    missing = []
    for aliases in parameter_aliases(model).values():
        param = model.get_parameter(aliases[0])
        found = [name for name in aliases if name in shapes]
        if not found:
            if param.device.type == "meta":
                missing.append(aliases[0])
            continue
        if shapes[found[0]] != tuple(param.shape):
            raise ValueError(f"{found[0]}: checkpoint shape {shapes[found[0]]} != model shape {tuple(param.shape)}")
    if missing:
        raise ValueError(f"{missing[0]}: not in {checkpoint} ({len(missing)} parameters missing); the model "
                         "must match the checkpoint's names")


def _tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the files, one at a time (a shard is memory-mapped, not read whole)."""
    try:
        from safetensors import safe_open
    except ImportError as e:
        raise ImportError("qcompile.quantize(checkpoint=...) reads safetensors files: pip install safetensors") from e
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():
                yield key, f.get_tensor(key)


def _load_and_pack(model: nn.Module, targets: dict[str, PlannedWeight], checkpoint: Path,
                   device: torch.device | None) -> list[PackedWeight]:
    """Stream the checkpoint into ``model``: planned weights packed as they arrive, the rest assigned."""
    device = device or torch.device("cpu")
    files = _shards(checkpoint)
    _check_matches(model, _shapes(files), checkpoint)
    by_name: dict[str, PlannedWeight] = {}
    for t in targets.values():
        for alias in parameter_aliases(model).get(id(t.parameter), [t.name]):
            by_name[alias] = t
        if t.parameter.device.type == "meta":  # a meta tensor's data cannot be set: give it a real parameter
            placeholder = torch.empty((), dtype=t.parameter.dtype, device=device).expand(t.parameter.shape)
            t.parameter = swap_parameter(model, t.parameter, placeholder)
    aliases = parameter_aliases(model)
    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = {name: (model.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2])
               for name, _ in model.named_buffers(remove_duplicate=False)}
    loaded: set[int] = set()
    packed, unexpected = [], []
    for key, tensor in _tensors(files):
        target = by_name.get(key)
        if target is not None:
            if id(target.parameter) not in loaded:
                packed.append(_pack(target, tensor, device, mapped=True))
                loaded.add(id(target.parameter))
        elif key in params:
            param = params[key]
            if id(param) in loaded:  # a tied weight saved under both names: the first one wins
                continue
            # A copy: safetensors' tensors are views of the memory-mapped shard, and one kept view would keep
            # the whole shard mapped (and resident) for as long as the model lives.
            value = tensor.to(device=device, dtype=param.dtype, copy=True)
            if param.device.type == "meta":
                names = aliases.get(id(param), [key])
                param = swap_parameter(model, param, value, names)
                params.update((name, param) for name in names)
            else:
                param.data = value
            loaded.add(id(param))
        elif key in buffers:
            module, attr = buffers[key]
            old = module._buffers[attr]
            module._buffers[attr] = tensor.to(device=device, dtype=old.dtype if old.is_floating_point() else None,
                                              copy=True)
        else:
            unexpected.append(key)
        del tensor
    if unexpected:
        log.warning("qcompile.quantize: %d tensors in %s match nothing in the model (e.g. %s)",
                    len(unexpected), checkpoint, unexpected[0])
    meta_buffers = [name for name, b in model.named_buffers() if b.device.type == "meta"]
    if meta_buffers:
        raise ValueError(f"{meta_buffers[0]}: a buffer on the meta device that the checkpoint does not hold; build "
                         "the model with accelerate.init_empty_weights() (buffers stay real) instead of "
                         "torch.device('meta')")
    _move_buffers(model, device)
    return packed


def swap_parameter(model: nn.Module, old: nn.Parameter, value: torch.Tensor,
                    names: list[str] | None = None) -> nn.Parameter:
    """Put a new parameter holding ``value`` wherever ``old`` is (all its names: ties stay tied)."""
    new = nn.Parameter(value, requires_grad=old.requires_grad)
    for name in names or parameter_aliases(model)[id(old)]:
        owner, _, attr = name.rpartition(".")
        model.get_submodule(owner)._parameters[attr] = new
    return new


def _move_buffers(model: nn.Module, device: torch.device) -> None:
    for module in model.modules():
        for key, buffer in module._buffers.items():
            if buffer is not None and buffer.device != device:
                module._buffers[key] = buffer.to(device)
