"""Each weight's own decision under a config, for graphs that dynamo runs on other modules' weights.

Dynamo reuses a compiled graph for any call whose guards pass, and parameters are graph inputs:
a graph compiled for one frame of ``model.layers[0]`` (each layer compiled on its own, or a graph
break inside a layer) also runs ``model.layers[1]``'s weights. The scheme baked into that graph was
decided for layer 0's names; a rule can decide layer 1 differently (``model.layers.1.*`` skipped, or
another scheme). So the backend records, when it compiles a graph, the decision for every linear
weight of the model under that config, and ``quantized_linear`` follows the decision of the weight
it is given. Keyed by the config (its canonical JSON's hash), since one model can be compiled with
two configs; weak in the parameter.
"""

from __future__ import annotations

import hashlib
import json
import threading

import torch
from torch.utils.weak import WeakTensorKeyDictionary

from qcompile.config import QuantConfig

UNDECIDED = "undecided"  # not a scheme key (those are JSON objects)

_LOCK = threading.Lock()
_DECISIONS: WeakTensorKeyDictionary = WeakTensorKeyDictionary()  # parameter -> {config key: scheme key or None}


def config_key(config: QuantConfig) -> str:
    """A short, stable key of ``config`` (its canonical JSON's hash)."""
    text = json.dumps(config.to_dict(), sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def record(key: str, parameter: torch.Tensor, scheme_key: str | None) -> None:
    """``parameter`` is quantized with ``scheme_key`` (None: kept float) under the config with ``key``."""
    with _LOCK:
        decisions = _DECISIONS.get(parameter)
        if decisions is None:
            decisions = _DECISIONS[parameter] = {}
        decisions[key] = scheme_key


def decided(key: str, parameter: torch.Tensor) -> str | None:
    """The scheme key recorded for ``parameter`` under ``key``, None for float, or :data:`UNDECIDED`."""
    decisions = _DECISIONS.get(parameter)
    if decisions is None:
        return UNDECIDED
    return decisions.get(key, UNDECIDED)
