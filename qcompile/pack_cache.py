"""Packed weights, found at run time from the parameter a call was given, and never stale.

Dynamo reuses one graph for every instance of a model class (parameters are graph inputs), so a
packed weight must not be a constant of the graph: the rewritten op takes the float parameter and
asks :func:`packed_weight` for its packed form on every call. The cache is keyed weakly by the
parameter object (the cache never keeps a model alive) and by ``(scheme, transposed)``.

Each entry records a stamp of the parameter when it was packed: its version counter (bumped by
every in-place write: ``load_state_dict``, ``copy_``, optimizer steps), data pointer, dtype,
device and shape (``model.to(...)`` and ``param.data = ...`` swap the data). A call whose
parameter no longer matches its stamp repacks it, logging the parameter's name. Writes through
``param.data`` (a tensor with its own version counter) are invisible to the stamp. The entry also keeps
a strided sample of the values packed, which the backend compares whenever it compiles a graph that
uses the parameter (:func:`drop_if_changed`): peft's ``merge_and_unload`` writes merged weights through
``.data`` and changes the modules, so dynamo recompiles and the merged weights are packed. A graph
that is not recompiled sees such writes only after :func:`invalidate`.

Per call this costs one weak-dictionary lookup and the stamp comparison (measured by
``benchmarks/call_overhead.py``).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import weakref
from collections.abc import Iterable

import torch
from torch.utils.weak import WeakTensorKeyDictionary

from qcompile.formats import PackedWeight, Scheme

log = logging.getLogger("qcompile")

_PACKED: WeakTensorKeyDictionary = WeakTensorKeyDictionary()
# Tensors that alias a packed parameter's data (an autograd-saved copy of it, say) find the
# parameter here: (data_ptr, shape, stride, dtype, device) -> the parameter, weakly.
_BY_DATA: dict[tuple, weakref.ref] = {}
_LOCK = threading.Lock()
# Parameter -> its qualified name, for the messages of ops whose graph carries no name (checkpointed region
# bodies, which leave names out so that identical layers compile to one cached graph).
_NAMES: WeakTensorKeyDictionary = WeakTensorKeyDictionary()


def remember_name(parameter: torch.Tensor, name: str) -> None:
    """Record ``name`` as ``parameter``'s name for :func:`name_of`."""
    _NAMES[parameter] = name


def name_of(weight: torch.Tensor) -> str:
    """The name recorded for ``weight`` (or the parameter it aliases), else ``"weight"``."""
    owner, _ = _entries(weight)
    return _NAMES.get(owner) or _NAMES.get(weight) or "weight"


def version_of(t: torch.Tensor) -> int:
    """``t._version``, or -1 for an inference-mode tensor."""
    try:
        return t._version
    except RuntimeError:  # an inference-mode tensor has no version counter (and cannot change outside it)
        return -1


def _stamp(t: torch.Tensor) -> tuple:
    return (version_of(t), t.data_ptr(), t.dtype, t.device, tuple(t.shape))


def _data_key(t: torch.Tensor) -> tuple:
    return (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype, t.device)


# Elements sampled per dimension of a parameter (64 x 64 of a weight matrix), to notice writes through .data.
SAMPLE_STEPS = 64
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _content_sample(t: torch.Tensor) -> torch.Tensor | None:
    """Every (size // SAMPLE_STEPS)-th element along each dimension of ``t``, copied; None for a tensor without
    float data (released, meta) or of an element size the comparison does not handle."""
    if t.device.type == "meta" or is_released(t) or t.numel() == 0 or t.element_size() not in _BITS:
        return None
    with torch.no_grad():
        return t.detach()[tuple(slice(None, None, max(1, size // SAMPLE_STEPS)) for size in t.shape)].clone()


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    # Bit patterns, so that a NaN equals itself.
    return a.shape == b.shape and torch.equal(a.view(_BITS[a.element_size()]), b.view(_BITS[b.element_size()]))


@dataclasses.dataclass
class _Entry:
    packed: PackedWeight
    stamp: tuple
    sample: torch.Tensor | None  # _content_sample of the values packed (None: released, nothing to compare)


def _entries(weight: torch.Tensor) -> tuple[torch.Tensor, dict | None]:
    """The packed parameter ``weight`` is (or aliases, with the same data, shape and strides), and its entries."""
    entries = _PACKED.get(weight)
    if entries is not None:
        return weight, entries
    ref = _BY_DATA.get(_data_key(weight))
    owner = ref() if ref is not None else None
    if owner is not None and _data_key(owner) == _data_key(weight):
        return owner, _PACKED.get(owner)
    return weight, None


def is_released(parameter: torch.Tensor) -> bool:
    """True once the parameter's floating-point data was dropped (released, or packed elsewhere)."""
    return released_how(parameter) is not None


def released_how(parameter: torch.Tensor) -> str | None:
    """How the parameter lost its float data, for the plan: ``"released"`` (``release_weights=True`` after a
    graph's first call) or ``"packed ahead"`` (:func:`adopt_packed`: quantize, a checkpoint, bitsandbytes);
    None while it holds its data."""
    return getattr(parameter, "_qcompile_released", None)


def packed_weight(weight: torch.Tensor, scheme: Scheme, transposed: bool, name: str) -> PackedWeight:
    """The packed form of ``weight`` (used as ``weight.T`` when ``transposed``), packing when missing or stale.
    ``name`` is for messages; ``""``: the name recorded by :func:`remember_name`."""
    key = (scheme, transposed)
    owner, entries = _entries(weight)
    entry = entries.get(key) if entries is not None else None
    if entry is not None and entry.stamp == _stamp(owner):
        return entry.packed
    with _LOCK:
        entries = _PACKED.get(owner)
        entry = entries.get(key) if entries is not None else None
        if entry is not None and entry.stamp == _stamp(owner):
            return entry.packed
        name = name or name_of(owner)
        if is_released(owner):
            raise ValueError(
                f"{name}: its floating-point data was released (qcompile.quantize or release_weights=True), "
                f"so it cannot be packed with {scheme}; compile with the config it was packed with, or keep the weights"
            )
        if entry is not None:
            log.info("qcompile: %s changed since it was packed (version %d -> %d); repacking",
                     name, entry.stamp[0], version_of(owner))
        if owner.device.type == "meta":
            raise ValueError(f"{name}: weight is on the meta device (not loaded); load its data before running")
        with torch.no_grad():
            detached = owner.detach()
            packed = scheme.pack(detached.t() if transposed else detached, name=name)
        _PACKED.setdefault(owner, {})[key] = _Entry(packed, _stamp(owner), _content_sample(owner))
        _BY_DATA[_data_key(owner)] = weakref.ref(owner)
        if len(_BY_DATA) > 2 * len(_PACKED) + 64:
            _prune_data_index()
        return packed


def _prune_data_index() -> None:
    for key in [k for k, ref in _BY_DATA.items() if ref() is None or _data_key(ref()) != k]:
        del _BY_DATA[key]


def cached_packed_weights(parameter: torch.Tensor) -> list[PackedWeight]:
    """All packed forms made so far for ``parameter`` (for tests and memory accounting)."""
    with _LOCK:
        return [entry.packed for entry in _PACKED.get(parameter, {}).values()]


def packed_keys(parameter: torch.Tensor) -> list[tuple[Scheme, bool]]:
    """The ``(scheme, transposed)`` keys of the packed forms made so far for ``parameter``."""
    with _LOCK:
        return list(_PACKED.get(parameter, {}))


def invalidate(parameters: torch.nn.Module | Iterable[torch.Tensor]) -> int:
    """Forget the packed forms of ``parameters`` (a module: all of its parameters); returns how many.

    Needed only after writing a parameter through ``param.data`` (which bypasses the version
    counter); every other change is seen on the next call. A released parameter cannot be repacked.
    """
    params = parameters.parameters() if isinstance(parameters, torch.nn.Module) else parameters
    dropped = 0
    with _LOCK:
        for p in params:
            entries = _PACKED.get(p)
            if entries and not is_released(p):
                dropped += len(entries)
                del _PACKED[p]
    return dropped


def drop_if_changed(parameter: torch.Tensor, name: str) -> bool:
    """Forget ``parameter``'s packed forms if its values differ from those they were packed from although its
    stamp does not (a write through ``param.data``), logging a warning that names it; True if they were.

    Compares the strided sample kept at packing: it catches writes that touch most of the weight (a merged
    LoRA update does), not necessarily a write to a few elements. The backend calls it for every parameter
    of a graph it compiles; it costs a copy of the sample and a comparison (a device sync on a GPU).
    """
    with _LOCK:
        entries = _PACKED.get(parameter)
        if not entries:
            return False
        now = _content_sample(parameter)
        changed = now is not None and any(
            entry.sample is not None and entry.stamp == _stamp(parameter) and not _same_values(entry.sample, now)
            for entry in entries.values())
        if changed:
            del _PACKED[parameter]
            log.warning("qcompile: %s changed since it was packed, by a write its version counter did not see "
                        "(through param.data, as peft's merge_and_unload writes); repacking it. Call "
                        "qcompile.invalidate(model) after such writes: a graph that is not recompiled does not "
                        "check", name)
        return changed


def release_parameter(parameter: torch.nn.Parameter) -> None:
    """Drop the parameter's floating-point storage, keeping its shape, dtype and device.

    The data becomes a single NaN broadcast to the original shape (one element of storage), so
    anything that still reads it gets NaN, never a plausible wrong answer; the backend only
    releases weights nothing else reads, and guards the owning modules' eager forward. The packed
    forms made so far stay valid: their stamps move to the new data.
    """
    if is_released(parameter):
        return
    with _LOCK:
        nan = torch.full((1,), float("nan"), dtype=parameter.dtype, device=parameter.device)
        entries = _PACKED.get(parameter, {})
        fresh = {key: entry for key, entry in entries.items() if entry.stamp == _stamp(parameter)}
        parameter.data = nan.expand(parameter.shape)
        parameter._qcompile_released = "released"
        for entry in fresh.values():
            entry.stamp = _stamp(parameter)
            entry.sample = None
        if fresh:
            _BY_DATA[_data_key(parameter)] = weakref.ref(parameter)


def adopt_packed(parameter: torch.nn.Parameter, scheme: Scheme, transposed: bool, packed: PackedWeight,
                 float_data: torch.Tensor | None = None) -> None:
    """Make ``packed`` (packed elsewhere: :func:`qcompile.quantize`, a checkpoint, a bitsandbytes layer) the
    packed form of ``parameter`` for ``(scheme, transposed)``.

    Without ``float_data`` the parameter becomes released (see :func:`release_parameter`) on the packed
    tensors' device: a NaN broadcast to its shape, so no float copy of it exists anywhere. With
    ``float_data`` (a weight that something else reads in float, such as a tied embedding) the parameter's
    data becomes ``float_data`` and stays usable. The parameter may be on the meta device before.
    """
    device = next(t for t in packed.tensors().values() if t is not None).device
    with _LOCK:
        if float_data is None:
            nan = torch.full((1,), float("nan"), dtype=parameter.dtype, device=device)
            parameter.data = nan.expand(parameter.shape)
            parameter._qcompile_released = "packed ahead"
        else:
            parameter.data = float_data
        _PACKED[parameter] = {(scheme, transposed): _Entry(packed, _stamp(parameter), _content_sample(parameter))}
        _BY_DATA[_data_key(parameter)] = weakref.ref(parameter)
