"""The ``qcompile`` torch.compile backend.

    torch.compile(model, backend="qcompile", options={"config": "quant.json"})

For each graph dynamo captures: find the linear sites and every name of their
weights, plan them with the config, rewrite the sites to
``torch.ops.qcompile.quantized_linear`` (which finds each parameter's packed form per
call), pack the weights, log the plan, and hand the graph to the inner compiler.
The entry point ``torch_dynamo_backends: qcompile`` makes the name
work in an interpreter that never imported qcompile.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import fx, nn
from torch._dynamo.exc import ShortenTraceback

from qcompile import config as config_module
from qcompile.checkpoint_regions import (
    CPU_REGION_PATCHES,
    checkpoint_regions_compilable,
    compile_checkpoint_regions,
    has_activation_checkpoint,
)
from qcompile.config import QuantConfig
from qcompile.cuda_graphs import records_cuda_graphs, refuse_stale_weights
from qcompile.decisions import config_key, record
from qcompile.fallback import ON_FALLBACK, FallbackPolicy, guard, note_compiled_frame, strip_expect_quantized
from qcompile.memory import memory_footprint
from qcompile.ops.dispatch import KERNELS
from qcompile.ops.quantized_linear import scheme_key
from qcompile.pack_cache import drop_if_changed, packed_weight, released_how, remember_name
from qcompile.passes.plan import TRAINABLE, LinearDecision, SitePlan, linear_decisions
from qcompile.passes.rewrite_linear import rewrite_linears
from qcompile.passes.sites import find_linear_sites
from qcompile.release import kept_reason, note_float_reads, release
from qcompile.report import Plan, rows_for

log = logging.getLogger("qcompile")

INNER = ("inductor", "eager")
_OPTION_KEYS = (
    "config", "inner", "kernels", "release_weights", "quantize_trainable", "on_plan", "mode", "on_fallback",
)
# inductor's modes; torch.compile refuses `mode` together with `options`, so it is also an option here.
INDUCTOR_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclasses.dataclass(frozen=True)
class BackendOptions:
    """The backend's ``options`` dict, validated.

    config: a path (.json/.toml), a dict, or a QuantConfig; default: ``QuantConfig()``.
    inner: "inductor" (default), "eager", or a backend callable ``(gm, example_inputs) -> callable``.
    kernels: "auto" (Triton on CUDA, reference torch code on CPU), "reference", or "triton".
    release_weights: free each packed parameter's floating-point data after the first call, where that
        is safe (``qcompile/release.py``); the plan says which weights were kept and why.
    quantize_trainable: also quantize weights that require grad while grad is enabled (default: they stay
        float, skipped in the plan; quantized weights never get a gradient).
    on_plan: called with the :class:`~qcompile.report.Plan` of every graph compiled.
    mode: inductor's mode ("reduce-overhead" for CUDA graphs, "max-autotune", ...), for the inner inductor.
    on_fallback: "error" (default) or "warn": what happens when a quantized module runs in float outside
        qcompile's graphs (dynamo's recompile limit, a frame it skips, another backend compiling the model;
        ``qcompile/fallback.py``).
    """

    config: QuantConfig
    inner: str | Callable[..., Any] = "inductor"
    kernels: str = "auto"
    release_weights: bool = False
    quantize_trainable: bool = False
    on_plan: Callable[[Plan], None] | None = None
    mode: str | None = None
    on_fallback: str = "error"

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None) -> BackendOptions:
        options = dict(options or {})
        for key in options:
            if key not in _OPTION_KEYS:
                raise ValueError(f"options.{key}: unknown option; allowed: {', '.join(_OPTION_KEYS)}")
        inner = options.get("inner", "inductor")
        if not callable(inner) and inner not in INNER:
            raise ValueError(f"options.inner: {inner!r} is not allowed; allowed: {', '.join(INNER)} or a callable")
        kernels = options.get("kernels", "auto")
        if kernels not in KERNELS:
            raise ValueError(f"options.kernels: {kernels!r} is not allowed; allowed: {', '.join(KERNELS)}")
        release = options.get("release_weights", False)
        if not isinstance(release, bool):
            raise ValueError(f"options.release_weights: expected true or false, got {release!r}")
        trainable = options.get("quantize_trainable", False)
        if not isinstance(trainable, bool):
            raise ValueError(f"options.quantize_trainable: expected true or false, got {trainable!r}")
        on_plan = options.get("on_plan")
        if on_plan is not None and not callable(on_plan):
            raise ValueError(f"options.on_plan: expected a callable, got {on_plan!r}")
        mode = options.get("mode")
        if mode is not None and mode not in INDUCTOR_MODES:
            raise ValueError(f"options.mode: {mode!r} is not allowed; allowed: {', '.join(INDUCTOR_MODES)}")
        if mode is not None and inner != "inductor":
            raise ValueError(f"options.mode: {mode!r} applies to inner='inductor' only, not {inner!r}")
        on_fallback = options.get("on_fallback", "error")
        if on_fallback not in ON_FALLBACK:
            raise ValueError(f"options.on_fallback: {on_fallback!r} is not allowed; allowed: {', '.join(ON_FALLBACK)}")
        return cls(
            config=config_module.load(options.get("config")),
            inner=inner, kernels=kernels, release_weights=release, quantize_trainable=trainable, on_plan=on_plan,
            mode=mode, on_fallback=on_fallback,
        )


def _graph_id(gm: fx.GraphModule) -> str:
    compile_id = gm.meta.get("dynamo_compile_id")
    return str(compile_id) if compile_id is not None else "0"


class QcompileError(ShortenTraceback, ValueError):
    """A user error found while compiling (a bad option or config, a weight that cannot be used).

    Dynamo wraps any other exception a backend raises in ``BackendCompilerFailed``; this one it
    passes through, so the user sees qcompile's ``ValueError`` (it is one) and its message first.
    """

    def __init__(self, message: str):
        super().__init__(message, first_useful_frame=None)


def quantize_graph(
    gm: fx.GraphModule, example_inputs: Sequence[Any], opts: BackendOptions
) -> tuple[Plan, list[SitePlan], list[SitePlan], list[LinearDecision]]:
    """Plan and rewrite ``gm`` in place.

    Returns the plan, the sites rewritten, those of them whose weights may be released, and the config's
    decision for every linear of the models in this graph."""
    start = time.perf_counter()
    graph_id = _graph_id(gm)
    strip_expect_quantized(gm)
    sites = find_linear_sites(gm, example_inputs)
    _warn_bitsandbytes_ops(gm, graph_id)
    plans = opts.config.plan(sites, quantize_trainable=opts.quantize_trainable)
    for plan in plans:
        if plan.site.parameter is not None and plan.site.parameter.device.type == "meta":
            raise ValueError(f"{plan.site.qualified_name}: weight is on the meta device (not loaded); load the "
                             "model's weights before compiling (e.g. load_state_dict(..., assign=True))")
    key = config_key(opts.config)
    linears = _record_decisions(key, plans, opts.config)
    rewritten = rewrite_linears(gm, plans, opts.kernels, key)
    for plan in rewritten:  # pack now: errors (NaN weights, say) surface at compile time, not mid-call
        drop_if_changed(plan.site.parameter, plan.site.qualified_name)
        packed_weight(plan.site.parameter, plan.scheme, plan.site.transposed, plan.site.qualified_name)
        remember_name(plan.site.parameter, plan.site.qualified_name)
    names = {id(s.parameter): s.qualified_name for s in sites if s.parameter is not None}
    note_float_reads(gm, example_inputs, graph_id, names)
    trainable = [p.site.qualified_name for p in rewritten if p.site.parameter.requires_grad]
    if trainable and torch.is_grad_enabled():
        # Only with quantize_trainable: quantized weights are frozen, gradients reach x and bias only.
        log.warning("qcompile: %d quantized weights require grad but will get no gradient (e.g. %s); "
                    "freeze them (requires_grad_(False)) or skip them in the config", len(trainable), trainable[0])
    frozen_out = [p.site.qualified_name for p in plans if p.skip_reason == TRAINABLE]
    if frozen_out:
        # Next to frozen weights that were quantized, trainable ones are adapters (QLoRA): float by design.
        level = logging.INFO if rewritten else logging.WARNING
        log.log(level, "qcompile: %d weights stay float because they require grad while grad is enabled (e.g. %s); "
                    "run under torch.no_grad() / inference_mode, freeze them with requires_grad_(False), "
                    "or pass quantize_trainable=True", len(frozen_out), frozen_out[0])
    release_notes: dict[int, str] = {}
    releasable = []
    for plan in rewritten:
        how = released_how(plan.site.parameter)
        if how == "packed ahead":
            release_notes[id(plan)] = "packed ahead (quantize), no float copy"
        elif how is not None:
            release_notes[id(plan)] = "released by an earlier graph, no float copy"
    if opts.release_weights:
        for plan in rewritten:
            if id(plan) in release_notes:
                continue
            reason = kept_reason(plan)
            release_notes[id(plan)] = f"kept: {reason}" if reason else "released after the first call"
            if reason is None:
                releasable.append(plan)
    rows = rows_for(plans, graph_id, set(), release_notes)
    footprints = [memory_footprint(root) for root in _roots(plans)]
    plan = Plan(tuple(rows), pass_seconds=time.perf_counter() - start,
                footprint=footprints[0] if len(footprints) == 1 else None)
    return plan, rewritten, releasable, linears


def _warn_bitsandbytes_ops(gm: fx.GraphModule, graph_id: str) -> None:
    """bitsandbytes' layers traced as they are run bitsandbytes' ops, not qcompile's: say how to adopt them."""
    ops = sorted({str(n.target) for n in gm.graph.nodes if n.op == "call_function"
                  and getattr(n.target, "namespace", None) == "bitsandbytes"})
    if ops:
        log.warning("qcompile: graph %s runs bitsandbytes' own ops (%s): its Linear4bit / Linear8bitLt layers were "
                    "not adopted; call qcompile.quantize(model) before compiling to run them on qcompile's ops "
                    "(README: 'Memory')", graph_id, ", ".join(ops))


def _roots(plans: Sequence[SitePlan]) -> list[nn.Module]:
    roots: list[nn.Module] = []
    for plan in plans:
        root = plan.site.weight_names.root
        if root is not None and all(root is not r for r in roots):
            roots.append(root)
    return roots


def _record_decisions(key: str, plans: Sequence[SitePlan], config: QuantConfig) -> list[LinearDecision]:
    """Record the config's decision for every linear weight of the models in this graph (``qcompile/decisions.py``);
    returns those of the plain linear modules.

    The graph's own decisions are recorded last: they also cover linears that are not plain modules."""
    linears = [decision for root in _roots(plans) for decision in linear_decisions(root, config)]
    for _, _, weight, scheme in linears:
        record(key, weight, None if scheme is None else scheme_key(scheme))
    for plan in plans:
        if plan.site.parameter is not None and plan.decided_by != "site":
            record(key, plan.site.parameter, None if plan.scheme is None else scheme_key(plan.scheme))
    return linears


def _guard_modules(linears: list[LinearDecision], policy: FallbackPolicy) -> None:
    """Give a fallback guard (``qcompile/fallback.py``) to every linear module the config quantizes: those
    this graph rewrote, and those it has not shown qcompile (dynamo may run them as Python from the start,
    and they would run in float unseen). Tied embeddings are not linears: they keep reading floats."""
    for module, name, weight, scheme in linears:
        if scheme is not None:
            guard(module, name, weight, policy)


def _after_backward(out: Any, fn: Callable[[], None]) -> None:
    """Run ``fn`` now, or, when ``out`` holds tensors autograd may still differentiate, at the end of the
    first backward pass through them: a compiled backward checks the sizes and strides of the tensors its
    forward saved (the weights among them), so they must not be released while it is pending. If no
    backward ever runs, ``fn`` never does (the weights stay)."""
    tensors = [t for t in (out if isinstance(out, (list, tuple)) else [out])
               if isinstance(t, torch.Tensor) and t.grad_fn is not None]
    if not tensors:
        fn()
        return
    queued = []

    def queue(_grad_outputs: Any) -> None:
        if not queued:
            queued.append(True)
            torch.autograd.Variable._execution_engine.queue_callback(fn)

    for tensor in tensors:
        tensor.grad_fn.register_prehook(queue)


def _after_first_call(compiled: Callable[..., Any], first_call: Callable[[Any], None]) -> Callable:
    """Wrap ``compiled`` so that ``first_call(outputs)`` runs once, right after its first call.

    Why not at compile time: the fallback guards are module hooks, and dynamo may still be tracing the
    frame when it calls the backend (a graph break compiles the graph before it, then tracing goes on
    or restarts); hooks appearing mid-trace make its replay diverge (``SpeculationLogDivergence``).
    A compiled graph first runs after its frame is traced. Released weights must wait for it too:
    dynamo checks its guards against the parameters right after the backend returns. Once released,
    the parameters' new strides fail the guards of this graph: the next call recompiles once and the
    new graph finds the packed weights that were made before the release.
    """
    pending = [first_call]

    def call(*args: Any, **kwargs: Any) -> Any:
        out = compiled(*args, **kwargs)
        while pending:
            pending.pop()(out)
        return out

    # Inductor's compiled functions take one list argument; the flag tells dynamo so.
    if getattr(compiled, "_boxed_call", False):
        call._boxed_call = True
    return call


def _compile(gm: fx.GraphModule, example_inputs: Sequence[Any], opts: BackendOptions, mode: str | None):
    note_compiled_frame()
    try:
        plan, rewritten, releasable, linears = quantize_graph(gm, example_inputs, opts)
    except ValueError as e:
        raise QcompileError(str(e)) from e
    if plan.rows:
        log.info("qcompile plan for graph %s (passes took %.3fs):\n%s", _graph_id(gm), plan.pass_seconds, plan.table())
    if opts.on_plan is not None:
        opts.on_plan(plan)
    stale_check = None
    if rewritten and records_cuda_graphs(example_inputs, opts.inner, opts.mode or mode):
        stale_check = refuse_stale_weights(gm, [(p.site.weight_node, p.site.parameter, p.site.qualified_name)
                                                for p in rewritten])
    compiled = _inner_compile(gm, example_inputs, opts, opts.mode or mode)
    if stale_check is not None:
        compiled = stale_check(compiled)
    if not rewritten and all(scheme is None for *_, scheme in linears):
        return compiled
    # Guards even when this graph rewrote nothing: the model's quantized linears may all run outside graphs
    # (eager activation checkpointing, which dynamo falls back to when it cannot trace a layer).
    policy = FallbackPolicy(opts.on_fallback, opts.quantize_trainable)

    def release_all() -> None:
        for plan in releasable:
            release(plan, policy)

    def first_call(out: Any) -> None:
        _guard_modules(linears, policy)
        if releasable:
            _after_backward(out, release_all)

    return _after_first_call(compiled, first_call)


def qcompile_backend(
    gm: fx.GraphModule, example_inputs: Sequence[Any], options: Mapping[str, Any] | None = None,
    mode: str | None = None,
) -> Callable[..., Any]:
    """The torch.compile backend: quantize the graph's linear layers, then run the inner compiler.

    Options arrive with the first graph, so a bad option or config raises then, as a ``ValueError``
    (:class:`QcompileError`) that dynamo does not wrap; :func:`make_backend` checks them earlier.
    """
    try:
        opts = BackendOptions.from_options(options)
    except ValueError as e:
        raise QcompileError(str(e)) from e
    return _compile(gm, example_inputs, opts, mode)


def make_backend(**options: Any) -> Callable[[fx.GraphModule, Sequence[Any]], Callable[..., Any]]:
    """A qcompile backend with ``options`` checked (and the config loaded) now, not at the first call.

        torch.compile(model, backend=qcompile.make_backend(config="quant.json"))

    Raises ValueError naming the bad option or config key.
    """
    opts = BackendOptions.from_options(options)

    def qcompile(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable[..., Any]:
        return _compile(gm, example_inputs, opts, None)

    return qcompile


def _inner_compile(gm: fx.GraphModule, example_inputs: Sequence[Any], opts: BackendOptions, mode: str | None):
    if callable(opts.inner):
        return opts.inner(gm, example_inputs)
    if opts.inner == "eager":
        return gm.forward  # a checkpointed region runs as an eager checkpoint of its body
    from torch._inductor.compile_fx import compile_fx

    config_patches = dict(torch._inductor.list_mode_options(mode)) if mode and mode != "default" else {}
    if torch.is_grad_enabled() and has_activation_checkpoint(gm):
        # CUDA graphs need the whole graph; selective checkpointing needs its regions traced whole.
        if not config_patches.get("triton.cudagraphs") and checkpoint_regions_compilable(gm):
            on_cpu = all(t.device.type == "cpu" for t in example_inputs if isinstance(t, torch.Tensor))
            region_patches = {**config_patches, **(CPU_REGION_PATCHES if on_cpu else {})}
            return compile_checkpoint_regions(gm, functools.partial(compile_fx, config_patches=region_patches or None))
        config_patches.update(CHECKPOINT_PATCHES)
    return compile_fx(gm, example_inputs, config_patches=config_patches or None)


# Inductor options for a training graph with activation checkpointing compiled whole (selective
# checkpointing, CUDA graphs; other checkpointed graphs are compiled region by region,
# qcompile/checkpoint_regions.py). Its backward recomputes and differentiates every checkpointed layer in
# one graph; inductor's buffer reuse keeps each freed buffer allocated until a later buffer of the same
# size takes it, so one layer's freed MLP-sized buffers stay held through the next layer's recomputation.
# Without reuse the peak tensor memory of benchmarks/qlora.py compiled whole (non-reentrant
# checkpointing) falls from 87.8 to 84.5 MiB; results are unchanged.
CHECKPOINT_PATCHES = {"allow_buffer_reuse": False}
