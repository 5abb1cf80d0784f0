"""The bytes a model holds: float tensors and qcompile's packed weights (``qcompile.memory_footprint``).

transformers' ``model.get_memory_footprint()`` sums ``numel * element_size`` over parameters and buffers.
That overcounts a weight whose float data qcompile released (a NaN broadcast to the full shape holds one
element) and misses packed forms, which live in qcompile's pack cache, not in parameters. Here every
tensor counts the storage it really holds, once (tied weights and views share storage), and the packed
forms of the model's parameters are added: ``total`` is what the model keeps in memory. For a model
quantized by bitsandbytes, transformers counts the packed ``weight`` bytes but not the absmax and nested
state, which are not parameters; ``packed_bytes`` here includes them.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from qcompile.pack_cache import cached_packed_weights, is_released


@dataclasses.dataclass(frozen=True)
class MemoryFootprint:
    """Bytes held by a model, by kind; ``str()`` gives one line."""

    float_bytes: int  # parameters and buffers (each storage once); released weights hold one element
    packed_bytes: int  # packed forms of its parameters (codes, scales, nested state)
    packed_weights: int  # how many parameters have a packed form
    released_weights: int  # how many of them hold no float data

    @property
    def total_bytes(self) -> int:
        return self.float_bytes + self.packed_bytes

    def __str__(self) -> str:
        mib = 2**20
        return (f"{self.total_bytes / mib:.2f} MiB: float tensors {self.float_bytes / mib:.2f} MiB, packed "
                f"{self.packed_bytes / mib:.2f} MiB ({self.packed_weights} packed weights, "
                f"{self.released_weights} without a float copy)")


def _storage_key(t: torch.Tensor) -> tuple:
    return (t.device, t.untyped_storage().data_ptr())


def memory_footprint(model: nn.Module) -> MemoryFootprint:
    """The bytes ``model`` holds now (see the module docstring). Meta tensors count nothing."""
    seen: set[tuple] = set()
    float_bytes = packed_bytes = packed_count = released = 0
    tensors = [p for _, p in model.named_parameters(remove_duplicate=False)]
    tensors += [b for _, b in model.named_buffers(remove_duplicate=False)]
    for t in tensors:
        if t.device.type == "meta":
            continue
        key = _storage_key(t)
        if key in seen:
            continue
        seen.add(key)
        float_bytes += t.untyped_storage().nbytes()
    counted: set[int] = set()
    for p in model.parameters():
        if id(p) in counted:
            continue
        counted.add(id(p))
        forms = cached_packed_weights(p)
        if forms:
            packed_count += 1
            released += is_released(p)
            for form in forms:
                for t in form.tensors().values():
                    if t is not None and _storage_key(t) not in seen:
                        seen.add(_storage_key(t))
                        packed_bytes += t.untyped_storage().nbytes()
    return MemoryFootprint(float_bytes, packed_bytes, packed_count, released)
