"""qcompile: a torch.compile backend that quantizes linear layers inside the captured graph.

    torch.compile(model, backend="qcompile", options={"config": "quant.json"})

Public names are imported lazily so that ``import qcompile`` does no work.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "QuantConfig": "qcompile.config",
    "Rule": "qcompile.config",
    "NF4": "qcompile.formats",
    "FP4": "qcompile.formats",
    "Affine": "qcompile.formats",
    "HQQ": "qcompile.formats",
    "GPTQ": "qcompile.formats",
    "AWQ": "qcompile.formats",
    "Float8": "qcompile.formats",
    "calibrate": "qcompile.calibration",
    "Int8": "qcompile.formats",
    "Int8WeightOnly": "qcompile.formats",
    "W8A8Dynamic": "qcompile.formats",
    "Scheme": "qcompile.formats",
    "PackedWeight": "qcompile.formats",
    "pack": "qcompile.formats.pack",
    "linear": "qcompile.ops.bindings",
    "explain": "qcompile.explainer",
    "make_backend": "qcompile.backend",
    "invalidate": "qcompile.pack_cache",
    "Plan": "qcompile.report",
    "quantize": "qcompile.quantize_model",
    "memory_footprint": "qcompile.memory",
    "save_quantized": "qcompile.checkpoint",
    "load_quantized": "qcompile.checkpoint",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'qcompile' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_EXPORTS))
