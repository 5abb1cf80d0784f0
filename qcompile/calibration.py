"""``qcompile.calibrate``: quantize with methods that learn from data (GPTQ), through the compiled graph.

    config = qcompile.calibrate(model, batches, {"format": "qcompile", "version": 1,
                                                 "default": {"type": "gptq", "bits": 4, "group_size": 128}})
    model.forward = torch.compile(model.forward, backend="qcompile", options={"config": config})

``batches`` is an iterable; each item is one forward call's input: a tensor (``model(t)``), a tuple
(``model(*t)``) or a dict of keyword arguments (``model(**d)``). The model is compiled with a pass that
observes the input of every linear whose scheme needs calibration (``passes/observe_linear.py``;
``formats/observations.py``: GPTQ accumulates ``X^T X``, the Hessian of its layer-wise error, AWQ the
mean |x| per input feature and a sample of input rows), the batches are run, and each such weight is
quantized from what was recorded. With ``sequential=True`` (the default, as GPTQ does) this
goes in stages, in the order the model runs its linears, linears that read one input together (q, k,
v): a stage's Hessians are recorded with every earlier stage already quantized, so each layer corrects
the error of those before it. That runs the batches once per stage; ``sequential=False`` runs them
once and quantizes every layer from the float model's inputs (faster, a little less accurate).

Every planned weight is then packed ahead, as :func:`qcompile.quantize` does (schemes without
calibration are packed from the weight): the float data is released and the backend, compiled with
the returned config, runs the packed forms. Progress goes to stderr, one line per stage.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import fx, nn

from qcompile import config as config_module
from qcompile.config import QuantConfig
from qcompile.formats.awq import AWQ, search_scale
from qcompile.formats.observations import Observations
from qcompile.passes.observe_linear import observe_linears
from qcompile.passes.scale_fold import ScaleFold, find_scale_folds
from qcompile.passes.sites import find_linear_sites
from qcompile.quantize_model import PlannedWeight, guard_packed, install_packed, planned_targets


class _Recorder:
    """What calibration observes: per wanted weight, what its scheme needs of its inputs; in the discovery
    run, the order in which the model reads them and which read the same input."""

    def __init__(self, targets: Mapping[int, PlannedWeight]) -> None:
        self.targets = targets
        self.active: set[int] = set()
        self.observations: dict[int, Observations] = {}
        self.discovering = False
        self.order: list[tuple[int, str]] = []  # (weight id, its input's graph node)
        self.folds: dict[str, ScaleFold] = {}  # input key -> the norm AWQ's scale can be folded into

    def wanted(self, parameter: torch.Tensor) -> bool:
        return id(parameter) in self.targets

    def observe(self, x: torch.Tensor, weight: torch.Tensor, input_key: str) -> None:
        key = id(weight)
        if self.discovering:
            self.order.append((key, input_key))
        if key not in self.active:
            return
        if key not in self.observations:
            self.observations[key] = Observations(self.targets[key].scheme.calibration)
        self.observations[key].add(x)

    def backend(self):
        def calibration_backend(gm: fx.GraphModule, example_inputs: list[Any]):
            sites = find_linear_sites(gm, example_inputs)
            wanted = [s for s in sites if s.parameter is not None and self.wanted(s.parameter)
                      and s.node.graph is gm.graph]
            for node, fold in find_scale_folds(gm, example_inputs, wanted).items():
                self.folds[f"{id(gm.graph)}:{node.name}"] = fold
            observe_linears(gm, sites, self.wanted, self.observe)
            return gm.forward

        return calibration_backend

    def input_key(self, weight_id: int) -> str:
        return next(key for wid, key in self.order if wid == weight_id)

    def stages(self) -> list[list[int]]:
        """Weights in the order the model first read them, grouped by shared input (q, k and v: one stage)."""
        stages: list[list[int]] = []
        seen: set[int] = set()
        last_input = None
        for key, input_id in self.order:
            if key in seen:
                continue
            seen.add(key)
            if stages and input_id == last_input:
                stages[-1].append(key)
            else:
                stages.append([key])
            last_input = input_id
        return stages


def calibrate(
    model: nn.Module,
    batches: Iterable[Any],
    config: str | os.PathLike[str] | Mapping[str, Any] | QuantConfig | None = None,
    *,
    sequential: bool = True,
    progress: bool = True,
) -> QuantConfig:
    """Quantize ``model``'s planned linears, calibrating those whose scheme needs data (see the module
    docstring); returns the config to compile with. ``config`` as the backend's option."""
    cfg = config_module.load(config)
    targets = planned_targets(model, cfg)
    calibrated = {id(t.parameter): t for t in targets.values() if t.scheme.calibration is not None}
    if not calibrated:
        raise ValueError("config: no scheme in it needs calibration (gptq, awq); use qcompile.quantize(model, config)")
    inputs = list(batches)
    if not inputs:
        raise ValueError("batches: empty; calibration needs at least one forward call's input")
    recorder = _Recorder(calibrated)
    compiled = torch.compile(model, backend=recorder.backend())
    with torch.no_grad():
        recorder.discovering = True
        _run(compiled, inputs[:1])
        recorder.discovering = False
        stages = recorder.stages() if sequential else [list(dict.fromkeys(key for key, _ in recorder.order))]
        seen = {key for stage in stages for key in stage}
        unseen = [t.name for key, t in calibrated.items() if key not in seen]
        if unseen:
            raise ValueError(f"{unseen[0]}: never run by the calibration batches ({len(unseen)} weights not reached); "
                             "pass inputs that run every layer the config calibrates")
        packed: dict[int, Any] = {}
        start = time.perf_counter()
        for index, stage in enumerate(stages, 1):
            recorder.active = set(stage)
            _run(compiled, inputs)
            by_input: dict[str, list[int]] = {}
            for key in stage:
                by_input.setdefault(recorder.input_key(key), []).append(key)
            for input_key, keys in by_input.items():
                packed.update(_quantize_group([calibrated[k] for k in keys], keys, recorder, input_key))
            if progress:
                _progress(index, len(stages), calibrated[stage[0]].name, time.perf_counter() - start)
        recorder.active = set()
    for target in targets.values():
        data = target.parameter.detach()
        form = packed.get(id(target.parameter))
        if form is None:
            form = target.scheme.pack(data.t() if target.transposed else data, name=target.name)
        install_packed(target, form, data)
    guard_packed(targets.values())
    return cfg


def _run(compiled: Any, inputs: list[Any]) -> None:
    for item in inputs:
        if isinstance(item, Mapping):
            compiled(**item)
        elif isinstance(item, tuple):
            compiled(*item)
        else:
            compiled(item)


def _quantize_group(targets: list[PlannedWeight], keys: list[int], recorder: _Recorder,
                    input_key: str) -> dict[int, Any]:
    """Pack the linears that read one input. When the input's maker can take AWQ's scale (a norm that nothing
    else reads) and every reader is AWQ with one scheme, they share one scale, searched on their concatenated
    weights, ``1 / s`` is folded into the norm and the packed forms keep no input scale."""
    observations = [recorder.observations.pop(key) for key in keys]
    fold = recorder.folds.get(input_key)
    if (fold is None or fold.readers != len(targets) or len({t.scheme for t in targets}) != 1
            or not isinstance(targets[0].scheme, AWQ)):
        # Each linear its own search (and AWQ's 1 / s applied by the op): on all-MiniLM-L6-v2, whose norms
        # also feed the residual (nothing to fold into), one scale for q, k, v gave 0.9771 mean cosine at
        # int4 g128 against 0.9810 for one each.
        return {key: _quantize(t, obs) for key, t, obs in zip(keys, targets, observations, strict=True)}
    weights = [_weight(t).float() for t in targets]
    s = search_scale(torch.cat(weights), observations[0].abs_mean, observations[0].sample_rows, targets[0].scheme)
    forms = {key: _quantize(t, obs, s, folded=True) for key, t, obs in zip(keys, targets, observations, strict=True)}
    with torch.no_grad():
        for parameter in (fold.weight, fold.bias):
            if parameter is not None:
                parameter.copy_((parameter.float() / s).to(parameter.dtype))
    return forms


def _weight(target: PlannedWeight) -> torch.Tensor:
    parameter = target.parameter.detach()
    return parameter.t() if target.transposed else parameter


def _quantize(target: PlannedWeight, observations: Observations, scale: torch.Tensor | None = None,
              folded: bool = False):
    """Pack the weight from what was observed (AWQ: with ``scale`` when given; ``folded``: its input already
    divided by it), and put the dequantized weight in its place so that later stages see this layer as it
    will run."""
    parameter = target.parameter
    weight = _weight(target)
    if scale is None:
        packed = target.scheme.pack_calibrated(weight, observations, name=target.name)
    else:
        packed = target.scheme.pack_calibrated(weight, observations, name=target.name, scale=scale)
        if folded:
            packed.input_scale = None
    dequantized = packed.dequantize(parameter.dtype)
    with torch.no_grad():
        parameter.copy_(dequantized.t() if target.transposed else dequantized)
    return packed


def _progress(done: int, total: int, name: str, seconds: float) -> None:
    width = 30
    filled = width * done // total
    end = "\n" if done == total else ""
    print(f"\rqcompile.calibrate [{'#' * filled}{'.' * (width - filled)}] {done}/{total} {name} {seconds:.1f} s\x1b[K",
          end=end, file=sys.stderr, flush=True)
