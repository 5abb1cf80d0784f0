"""The ``qcompile`` torch.compile backend.

    torch.compile(model, backend="qcompile", options={"config": "quant.json"})

For each graph dynamo captures: find the linear sites, plan them with the config,
pack each chosen weight once (cached per parameter), rewrite the sites to
``torch.ops.qcompile.*`` ops, log the plan, and hand the graph to the inner
compiler. The entry point ``torch_dynamo_backends: qcompile`` makes the name
work in an interpreter that never imported qcompile.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import fx

from qcompile import config as config_module
from qcompile.config import QuantConfig
from qcompile.ops.dispatch import KERNELS
from qcompile.pack_cache import packed_weight, release_parameter
from qcompile.passes.plan import SitePlan
from qcompile.passes.rewrite_linear import rewrite_linears, weight_fully_rewritten
from qcompile.passes.sites import find_linear_sites
from qcompile.report import Plan, rows_for

log = logging.getLogger("qcompile")

INNER = ("inductor", "eager")
_OPTION_KEYS = ("config", "inner", "kernels", "release_weights", "on_plan", "mode")
# inductor's modes; torch.compile refuses `mode` together with `options`, so it is also an option here.
INDUCTOR_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclasses.dataclass(frozen=True)
class BackendOptions:
    """The backend's ``options`` dict, validated.

    config: a path (.json/.toml), a dict, or a QuantConfig; default: ``QuantConfig()``.
    inner: "inductor" (default), "eager", or a backend callable ``(gm, example_inputs) -> callable``.
    kernels: "auto" (Triton on CUDA, reference torch code on CPU), "reference", or "triton".
    release_weights: free each packed parameter's floating-point data after packing.
    on_plan: called with the :class:`~qcompile.report.Plan` of every graph compiled.
    mode: inductor's mode ("reduce-overhead" for CUDA graphs, "max-autotune", ...), for the inner inductor.
    """

    config: QuantConfig
    inner: str | Callable[..., Any] = "inductor"
    kernels: str = "auto"
    release_weights: bool = False
    on_plan: Callable[[Plan], None] | None = None
    mode: str | None = None

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
        on_plan = options.get("on_plan")
        if on_plan is not None and not callable(on_plan):
            raise ValueError(f"options.on_plan: expected a callable, got {on_plan!r}")
        mode = options.get("mode")
        if mode is not None and mode not in INDUCTOR_MODES:
            raise ValueError(f"options.mode: {mode!r} is not allowed; allowed: {', '.join(INDUCTOR_MODES)}")
        if mode is not None and inner != "inductor":
            raise ValueError(f"options.mode: {mode!r} applies to inner='inductor' only, not {inner!r}")
        return cls(
            config=config_module.load(options.get("config")),
            inner=inner, kernels=kernels, release_weights=release, on_plan=on_plan, mode=mode,
        )


def _graph_id(gm: fx.GraphModule) -> str:
    compile_id = gm.meta.get("dynamo_compile_id")
    return str(compile_id) if compile_id is not None else "0"


def _pack(plan: SitePlan) -> Any:
    site = plan.site
    return packed_weight(site.parameter, plan.scheme, site.transposed, site.qualified_name)


def quantize_graph(
    gm: fx.GraphModule, example_inputs: Sequence[Any], opts: BackendOptions
) -> tuple[Plan, list[torch.nn.Parameter]]:
    """Plan, pack and rewrite ``gm`` in place; returns the plan and the parameters that may be released."""
    start = time.perf_counter()
    sites = find_linear_sites(gm, example_inputs)
    plans = opts.config.plan(sites)
    rewritten = rewrite_linears(gm, plans, _pack, opts.kernels)
    plan = Plan(tuple(rows_for(plans, _graph_id(gm), set())), pass_seconds=time.perf_counter() - start)
    trainable = [p.site.qualified_name for p in rewritten if p.site.parameter.requires_grad]
    if trainable and torch.is_grad_enabled():
        # Quantized weights are frozen: gradients reach the input and bias only (the QLoRA path).
        log.warning("qcompile: %d quantized weights require grad but will get no gradient (e.g. %s); "
                    "freeze them (requires_grad_(False)) or skip them in the config", len(trainable), trainable[0])
    releasable = []
    if opts.release_weights:
        # Only a weight nothing else in this graph reads (no tied embedding, say) is released.
        releasable = [p.site.parameter for p in rewritten if weight_fully_rewritten(p.site)]
    return plan, releasable


def _release_after_first_call(compiled: Callable[..., Any], parameters: list[torch.nn.Parameter]) -> Callable:
    """Wrap ``compiled`` so the parameters are released after its first call.

    Dynamo checks its guards against the parameters right after the backend returns,
    so they cannot change during compilation. Once released, the parameters' new
    strides fail the guards of this graph: the next call recompiles once and the new
    graph reuses the cached packed weights.
    """
    pending = list(parameters)

    def call(*args: Any, **kwargs: Any) -> Any:
        out = compiled(*args, **kwargs)
        while pending:
            release_parameter(pending.pop())
        return out

    # Inductor's compiled functions take one list argument; the flag tells dynamo so.
    if getattr(compiled, "_boxed_call", False):
        call._boxed_call = True
    return call


def qcompile_backend(
    gm: fx.GraphModule, example_inputs: Sequence[Any], options: Mapping[str, Any] | None = None,
    mode: str | None = None,
) -> Callable[..., Any]:
    """The torch.compile backend: quantize the graph's linear layers, then run the inner compiler."""
    opts = BackendOptions.from_options(options)
    plan, releasable = quantize_graph(gm, example_inputs, opts)
    if plan.rows:
        log.info("qcompile plan for graph %s (passes took %.3fs):\n%s", _graph_id(gm), plan.pass_seconds, plan.table())
    if opts.on_plan is not None:
        opts.on_plan(plan)
    compiled = _inner_compile(gm, example_inputs, opts, opts.mode or mode)
    return _release_after_first_call(compiled, releasable) if releasable else compiled


def _inner_compile(gm: fx.GraphModule, example_inputs: Sequence[Any], opts: BackendOptions, mode: str | None):
    if callable(opts.inner):
        return opts.inner(gm, example_inputs)
    if opts.inner == "eager":
        return gm.forward
    from torch._inductor.compile_fx import compile_fx

    config_patches = torch._inductor.list_mode_options(mode) if mode and mode != "default" else None
    return compile_fx(gm, example_inputs, config_patches=config_patches)


