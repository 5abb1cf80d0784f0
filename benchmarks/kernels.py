"""Kernel benchmark: each qcompile scheme's linear kernel against cuBLAS bf16, bitsandbytes and the roofline.

    python -m benchmarks.kernels [--out benchmarks/results/gpu] [--schemes nf4_dq,llm_int8] [--m 1,16,4096]
    python -m benchmarks.kernels --smoke --out /tmp/kb        # tiny shapes on CPU (reference + interpreter)
    qcompile bench ...                                         # the same, from the console script

Shapes are the Llama-3-8B linear layers (q/o 4096x4096, k/v 1024x4096, gate/up 14336x4096,
down 4096x14336; layers with the same shape are measured once), M = 1, 2, 4, ..., 1024, 4096, bf16
activations. Every kernel is called once first (that call autotunes it and the chosen config is
recorded), then timed with ``triton.testing.do_bench`` (median; a perf_counter loop off CUDA). On CUDA
each row also has ``median_s_cudagraph`` (``do_bench_cudagraph``: replayed from a CUDA graph, the kernels'
time without host cost) and ``host_s`` (host time per call, launches not waited for).

Writes ``kernels.json`` (device, versions, measured peaks, one row per case, goals) and the plots
``kernels_speedup.png`` (speedup over torch bf16 against M, one panel per shape) and
``kernels_roofline.png`` (% of the roofline against M) into ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.roofline import Peaks, linear_flops, measure_peaks, roofline_seconds
from benchmarks.timing import cudagraph_seconds, environment, host_seconds, median_seconds, progress, results_dir

# (name, layers, out_features N, in_features K) of Llama-3-8B; equal shapes are measured once.
LLAMA3_8B_SHAPES = (
    ("qo_proj", ("q_proj", "o_proj"), 4096, 4096),
    ("kv_proj", ("k_proj", "v_proj"), 1024, 4096),
    ("gate_up_proj", ("gate_proj", "up_proj"), 14336, 4096),
    ("down_proj", ("down_proj",), 4096, 14336),
)
SMOKE_SHAPES = (("smoke_a", ("tiny",), 64, 64), ("smoke_b", ("tiny",), 32, 128))
DEFAULT_MS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)
SMOKE_MS = (1, 8)
OUTLIER_COLUMNS = 8  # activation columns scaled past LLM.int8()'s threshold, as real LLM activations have
OUTLIER_SCALE = 20.0


@dataclass(frozen=True)
class SchemeCase:
    name: str
    make: Callable[[], Any]  # -> qcompile scheme
    int8_compute: bool  # int8 tensor-core dot: the roofline uses the int8 peak
    bnb: str | None  # bitsandbytes baseline name, see _bnb_module


def schemes() -> dict[str, SchemeCase]:
    import qcompile

    bf16 = torch.bfloat16
    cases = [
        SchemeCase("nf4_dq", lambda: qcompile.NF4(blocksize=64, double_quant=True, compute_dtype=bf16), False,
                   "bnb_linear4bit_nf4_dq"),
        SchemeCase("fp4", lambda: qcompile.FP4(blocksize=64, double_quant=False, compute_dtype=bf16), False,
                   "bnb_linear4bit_fp4"),
        SchemeCase("llm_int8", lambda: qcompile.Int8(threshold=6.0), True, "bnb_linear8bitlt"),
        SchemeCase("int8_weight_only", lambda: qcompile.Int8WeightOnly(), False, None),
        SchemeCase("w8a8_dynamic", lambda: qcompile.W8A8Dynamic(), True, None),
        # GPTQ's layout (a GPTQ or AWQ checkpoint runs this decode; act-order only permutes g_idx), HQQ's
        # float16 zeros, and quanto's float8: the low-bit family's other decodes.
        SchemeCase("affine_int4_g128", lambda: qcompile.Affine(bits=4, group_size=128, compute_dtype=bf16), False,
                   None),
        SchemeCase("affine_int3_g128", lambda: qcompile.Affine(bits=3, group_size=128, compute_dtype=bf16), False,
                   None),
        SchemeCase("hqq_int4_g64", lambda: qcompile.HQQ(bits=4, group_size=64, compute_dtype=bf16), False, None),
        SchemeCase("float8", lambda: qcompile.Float8(), False, None),
    ]
    return {c.name: c for c in cases}


# ---- autotune config capture ------------------------------------------------------------------

@contextlib.contextmanager
def record_launches() -> Iterator[list[dict[str, Any]]]:
    """Record every tuned Triton launch (kernel name, tuning mode, chosen config) made inside the block.

    ``codegen.autotune.TunedKernel.launch`` returns the config it launched or tuned; there is no
    public "last winner" API, so this wraps that method for the duration of the block only.
    Empty when Triton (or the codegen package) is unavailable.
    """
    records: list[dict[str, Any]] = []
    try:
        from qcompile.codegen import autotune
    except ImportError:
        yield records
        return
    original = autotune.TunedKernel.launch

    def launch(self: Any, grid: Any, args: Any, m: int, config: Any = None, **constexprs: Any) -> Any:
        chosen = original(self, grid, args, m, config, **constexprs)
        mode = "forced" if config is not None else autotune.autotune_mode()
        records.append({"kernel": self.name, "mode": mode, "m_bucket": autotune.m_bucket(m),
                        "config": autotune.config_to_dict(chosen) if hasattr(chosen, "kwargs") else repr(chosen)})
        return chosen

    autotune.TunedKernel.launch = launch
    try:
        yield records
    finally:
        autotune.TunedKernel.launch = original


# ---- baselines ---------------------------------------------------------------------------------

def _bnb_module(kind: str, weight: torch.Tensor, device: torch.device) -> torch.nn.Module:
    """A bitsandbytes layer holding ``weight`` [N, K], quantized the way users get it (``.to(device)``)."""
    import bitsandbytes as bnb

    n, k = weight.shape
    if kind.startswith("bnb_linear4bit"):
        quant_type = "nf4" if kind.endswith(("nf4", "nf4_dq")) else "fp4"
        layer = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=torch.bfloat16,
                                  compress_statistics=kind.endswith("_dq"), quant_type=quant_type)
        layer.load_state_dict({"weight": weight.detach().cpu()})
    elif kind == "bnb_linear8bitlt":
        layer = bnb.nn.Linear8bitLt(k, n, bias=False, has_fp16_weights=False, threshold=6.0)
        layer.load_state_dict({"weight": weight.detach().cpu().to(torch.float16)})
    else:
        raise ValueError(f"bnb baseline {kind!r} is unknown")
    return layer.to(device).eval()


def _bnb_available() -> str | None:
    """None when bitsandbytes imports, else why not."""
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means "no bitsandbytes baseline"
        return f"{type(exc).__name__}: {exc}"
    return None


# ---- one case ----------------------------------------------------------------------------------

def _activations(m: int, k: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    cols = torch.randperm(k, generator=g)[: min(OUTLIER_COLUMNS, k)]
    x[:, cols] *= OUTLIER_SCALE
    return x.to(device=device, dtype=torch.bfloat16)


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


def _measure(fn: Callable[[], torch.Tensor], device: torch.device, smoke: bool) -> tuple[float, torch.Tensor,
                                                                                           list[dict[str, Any]]]:
    """(median seconds, first output, tuned launches of the first call)."""
    with record_launches() as launches:
        y = fn()  # autotunes on a miss; the winner is cached for the timed calls
    reps = {"cpu_reps": 3, "cpu_warmup": 1} if smoke else {}
    return median_seconds(fn, device, **reps), y, launches


def _host_and_graph(fn: Callable[[], torch.Tensor], device: torch.device) -> dict[str, Any]:
    """On CUDA: the time replayed from a CUDA graph (the kernels alone) and the host time per call (what a
    decode step pays per linear without CUDA graphs); ``median_s`` above has both in it."""
    if device.type != "cuda":
        return {}
    return {"median_s_cudagraph": cudagraph_seconds(fn), "host_s": host_seconds(fn, device)}


def _row(base: dict[str, Any], seconds: float, bytes_moved: int, flops: int, peaks: Peaks,
         int8_compute: bool) -> dict[str, Any]:
    bound = roofline_seconds(bytes_moved, flops, peaks, int8_compute)
    return {
        **base,
        "median_s": seconds,
        "tflops": flops / seconds / 1e12,
        "gbps": bytes_moved / seconds / 1e9,
        "bytes_moved": bytes_moved,
        "flops": flops,
        **bound,
        "pct_roofline": 100.0 * bound["roofline_s"] / seconds,
    }


def _cases(shape: tuple, m: int, cases: list[SchemeCase], impls: tuple[str, ...], device: torch.device,
           peaks: Peaks, smoke: bool, bnb: bool, strict: bool, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """The rows of one (shape, M): torch bf16, each scheme in each impl, and the bitsandbytes baselines."""
    import qcompile
    from qcompile.ops import linear

    shape_name, layers, n, k = shape
    weight = (torch.randn(n, k, generator=torch.Generator().manual_seed(n * 31 + k)) * 0.02).to(
        device=device, dtype=torch.bfloat16)
    x = _activations(m, k, device)
    act_bytes = m * k * 2 + m * n * 2
    flops = linear_flops(m, n, k)
    base = {"shape": shape_name, "layers": list(layers), "N": n, "K": k, "M": m}
    ref = F.linear(x, weight)
    rows: list[dict[str, Any]] = []

    def guarded(base_row: dict[str, Any], body: Callable[[], dict[str, Any]]) -> None:
        try:
            rows.append(body())
        except Exception as exc:  # noqa: BLE001 - one failing case must not lose an hour of GPU results
            if strict:
                raise
            rows.append({**base_row, "error": f"{type(exc).__name__}: {exc}"})
            log(f"  error {base_row}: {exc}")

    bf16_base = {**base, "scheme": "bf16", "impl": "cublas" if device.type == "cuda" else "torch"}

    def bf16_case() -> dict[str, Any]:
        seconds, _, _ = _measure(lambda: F.linear(x, weight), device, smoke)
        row = _row(bf16_base, seconds, n * k * 2 + act_bytes, flops, peaks, False)
        return {**row, **_host_and_graph(lambda: F.linear(x, weight), device)}

    guarded(bf16_base, bf16_case)
    for case in cases:
        packed = qcompile.pack(weight, case.make())

        def scheme_case(case: SchemeCase, packed: Any, impl: str, row_base: dict[str, Any]) -> dict[str, Any]:
            seconds, y, launches = _measure(lambda: linear(packed, x, kernels=impl), device, smoke)
            row = _row(row_base, seconds, packed.nbytes + act_bytes, flops, peaks, case.int8_compute)
            row.update(rel_err_vs_bf16=_rel_err(y, ref), autotune=launches,
                       **_host_and_graph(lambda: linear(packed, x, kernels=impl), device))
            return row

        for impl in impls:
            row_base = {**base, "scheme": case.name, "impl": impl, "bits_per_weight": packed.bits_per_weight}
            guarded(row_base, functools.partial(scheme_case, case, packed, impl, row_base))

        def bnb_case(case: SchemeCase, weight_bytes: int, bnb_base: dict[str, Any]) -> dict[str, Any]:
            layer = _bnb_module(case.bnb, weight, device)
            with torch.no_grad():
                seconds, y, _ = _measure(lambda: layer(x), device, smoke)
                timings = _host_and_graph(lambda: layer(x), device)
            # Same format, same minimum traffic as qcompile's packed weight.
            row = _row(bnb_base, seconds, weight_bytes + act_bytes, flops, peaks, case.int8_compute)
            row["rel_err_vs_bf16"] = _rel_err(y, ref)
            return {**row, **timings}

        if case.bnb and bnb:
            bnb_base = {**base, "scheme": case.bnb, "impl": "bitsandbytes", "baseline_for": case.name}
            guarded(bnb_base, functools.partial(bnb_case, case, packed.nbytes, bnb_base))
        del packed
    _add_speedups(rows)
    return rows


def run(shapes: tuple = LLAMA3_8B_SHAPES, ms: tuple[int, ...] = DEFAULT_MS, scheme_names: tuple[str, ...] | None = None,
        impls: tuple[str, ...] = ("triton",), device: torch.device | None = None, smoke: bool = False,
        baselines: bool = True, strict: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure every (shape, M, scheme, impl) plus the baselines; return the results document."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    table = schemes()
    scheme_names = scheme_names or tuple(table)
    unknown = [s for s in scheme_names if s not in table]
    if unknown:
        raise ValueError(f"--schemes: {unknown} unknown; allowed: {', '.join(table)}")
    bnb_missing = _bnb_available() if baselines else "disabled (--no-baselines)"
    log(f"device: {environment(device)['device']}; measuring peaks ...")
    peaks = measure_peaks(device, smoke=smoke)
    log(f"peaks: copy {peaks.copy_gbps:.1f} GB/s, bf16 {peaks.bf16_tflops:.2f} TFLOP/s, "
        f"int8 {peaks.int8_tops if peaks.int8_tops is None else round(peaks.int8_tops, 2)} TOP/s")

    rows: list[dict[str, Any]] = []
    work = [(shape, m) for shape in shapes for m in ms]
    for shape, m in progress(work, total=len(work), desc="kernels"):
        rows.extend(_cases(shape, m, [table[s] for s in scheme_names], impls, device, peaks, smoke,
                           bnb=bnb_missing is None, strict=strict, log=log))

    doc = {
        "benchmark": "kernels",
        "smoke": smoke,
        "environment": environment(device),
        "peaks": peaks.to_dict(),
        "activation_dtype": "bfloat16",
        "activation_outliers": {"columns": OUTLIER_COLUMNS, "scale": OUTLIER_SCALE},
        "shapes": [{"name": s[0], "layers": list(s[1]), "N": s[2], "K": s[3]} for s in shapes],
        "ms": list(ms),
        "schemes": list(scheme_names),
        "impls": list(impls),
        "bitsandbytes_baselines": bnb_missing or "measured",
        "autotune_note": (
            "autotune: the configs each case's first call launched or tuned (TunedKernel.launch). "
            "mode 'off' under TRITON_INTERPRET=1 (interpreter config, not tuned)."
        ),
        "results": rows,
    }
    doc["goals"] = goals(rows, judged=not smoke)
    return doc


def _add_speedups(rows: list[dict[str, Any]]) -> None:
    """speedup_vs_bf16 (bf16 time / this time) and, for qcompile rows, speedup_vs_bnb, within one (shape, M)."""
    same = [r for r in rows if "median_s" in r]
    bf16 = next((r for r in same if r["scheme"] == "bf16"), None)
    bnb = {r["baseline_for"]: r for r in same if "baseline_for" in r}
    for r in same:
        if bf16 is not None:
            r["speedup_vs_bf16"] = bf16["median_s"] / r["median_s"]
        if r["scheme"] in bnb:
            r["speedup_vs_bnb"] = bnb[r["scheme"]]["median_s"] / r["median_s"]


# ---- goals (issue 5) ---------------------------------------------------------------------------

GOALS = (
    # (scheme, M, metric, threshold, text)
    ("nf4_dq", 1, "speedup_vs_bf16", 3.5, "NF4+DQ M=1 >= 3.5x cuBLAS bf16"),
    ("nf4_dq", 1, "pct_roofline", 85.0, "NF4+DQ M=1 >= 85% of bandwidth roofline"),
    ("nf4_dq", 16, "speedup_vs_bf16", 3.0, "NF4+DQ M=16 >= 3.0x"),
    ("nf4_dq", 4096, "speedup_vs_bf16", 0.95, "NF4+DQ M=4096 >= 0.95x"),
    ("llm_int8", 1, "speedup_vs_bf16", 1.7, "LLM.int8() M=1 >= 1.7x bf16"),
    ("llm_int8", 4096, "speedup_vs_bf16", 1.2, "LLM.int8() M=4096 >= 1.2x bf16"),
    ("llm_int8", None, "speedup_vs_bnb", 5.0, "LLM.int8() >= 5x bitsandbytes (every M)"),
)


def goals(rows: list[dict[str, Any]], judged: bool = True) -> list[dict[str, Any]]:
    """Each goal's worst value over the shapes (triton rows only); met is None when nothing was measured
    or the run is not judged (smoke: tiny shapes on CPU say nothing about the GPU goals)."""
    out = []
    for scheme, m, metric, threshold, text in GOALS:
        vals = [(r[metric], r["shape"], r["M"]) for r in rows
                if r["scheme"] == scheme and r.get("impl") == "triton" and metric in r and (m is None or r["M"] == m)]
        worst = min(vals) if vals else None
        out.append({"goal": text, "scheme": scheme, "M": m, "metric": metric, "threshold": threshold,
                    "worst": worst[0] if worst else None, "worst_at": {"shape": worst[1], "M": worst[2]} if worst
                    else None, "met": (worst[0] >= threshold) if worst and judged else None})
    return out


# ---- plots -------------------------------------------------------------------------------------

def plot(doc: dict[str, Any], out_dir: Path) -> list[Path]:
    """kernels_speedup.png and kernels_roofline.png: one panel per shape, x = M (log2), one line per series."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in doc["results"] if "median_s" in r]
    shapes = [s["name"] for s in doc["shapes"]]
    series = sorted({(r["scheme"], r["impl"], r.get("baseline_for", r["scheme"])) for r in rows},
                    key=lambda s: (s[0] != "bf16", s[2], s[1]))
    # One colour per qcompile scheme (its bitsandbytes baseline shares it), one line style per implementation.
    family = sorted({s[2] for s in series if s[0] != "bf16"})
    colours = {name: plt.get_cmap("tab10")(i % 10) for i, name in enumerate(family)}
    colours["bf16"] = "black"
    styles = {"triton": "-", "cublas": "-", "torch": "-", "reference": "-.", "bitsandbytes": "--"}
    paths = []
    for metric, fname, ylabel, hline in (
        ("speedup_vs_bf16", "kernels_speedup.png", "speedup over torch bf16 (x, log)", 1.0),
        ("pct_roofline", "kernels_roofline.png", "% of roofline", 100.0),
    ):
        cols = min(2, len(shapes))
        nrows = -(-len(shapes) // cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(6.5 * cols, 4.2 * nrows), squeeze=False)
        for ax, shape in zip(axes.flat, shapes, strict=False):
            info = next(s for s in doc["shapes"] if s["name"] == shape)
            for scheme, impl, fam in series:
                pts = sorted((r["M"], r[metric]) for r in rows
                             if r["shape"] == shape and r["scheme"] == scheme and r["impl"] == impl and metric in r)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], styles.get(impl, ":"), marker="o", ms=3,
                            color=colours.get(fam), label=f"{scheme} ({impl})")
            ax.axhline(hline, color="grey", lw=0.8, ls=":")
            ax.set_xscale("log", base=2)
            if metric == "speedup_vs_bf16":
                ax.set_yscale("log", base=2)
            ax.set_title(f"{shape} {'/'.join(info['layers'])}: N={info['N']} K={info['K']}", fontsize=9)
            ax.set_xlabel("M (tokens)")
            ax.set_ylabel(ylabel)
            ax.grid(True, alpha=0.3)
        for ax in list(axes.flat)[len(shapes):]:
            ax.axis("off")
        handles, labels = axes.flat[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
        env = doc["environment"]
        fig.suptitle(f"qcompile kernels on {env['device']} (torch {env['torch']}, triton {env['triton']})",
                     fontsize=10)
        fig.tight_layout()
        path = out_dir / fname
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)
    return paths


# ---- command line -------------------------------------------------------------------------------

def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def _names(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default benchmarks/results/<device>; smoke: required)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU: reference + interpreter kernels")
    parser.add_argument("--shapes", type=_names, default=None,
                        help=f"subset of {', '.join(s[0] for s in LLAMA3_8B_SHAPES)}")
    parser.add_argument("--m", type=_ints, default=None, help="comma-separated M values")
    parser.add_argument("--schemes", type=_names, default=None, help="subset of nf4_dq, fp4, llm_int8, "
                        "int8_weight_only, w8a8_dynamic, affine_int4_g128, affine_int3_g128, hqq_int4_g64, float8")
    parser.add_argument("--impls", type=_names, default=None,
                        help="kernels to time: triton and/or reference (default: triton; smoke: both)")
    parser.add_argument("--autotune", choices=("off", "fast", "max"), default=None,
                        help="sets QCOMPILE_AUTOTUNE for this run")
    parser.add_argument("--no-baselines", action="store_true", help="skip bitsandbytes")
    parser.add_argument("--strict", action="store_true", help="stop at the first failing case")
    parser.add_argument("--fresh", action="store_true",
                        help="overwrite kernels.json instead of merging this run's rows into it")
    return parser


@contextlib.contextmanager
def _env(name: str, value: str | None) -> Iterator[None]:
    """``os.environ[name] = value`` inside the block (nothing when value is None), restored after."""
    if value is None:
        yield
        return
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda:
        # Triton reads this when the kernels are decorated (first import of qcompile.codegen).
        os.environ.setdefault("TRITON_INTERPRET", "1")
    device = torch.device("cuda" if cuda else "cpu")
    all_shapes = SMOKE_SHAPES if args.smoke else LLAMA3_8B_SHAPES
    if args.shapes:
        known = {s[0]: s for s in (*LLAMA3_8B_SHAPES, *SMOKE_SHAPES)}
        missing = [s for s in args.shapes if s not in known]
        if missing:
            print(f"--shapes: {missing} unknown; allowed: {', '.join(known)}", file=sys.stderr)
            return 2
        all_shapes = tuple(known[s] for s in args.shapes)
    ms = args.m or (SMOKE_MS if args.smoke else DEFAULT_MS)
    impls = args.impls or (("reference", "triton") if not cuda else ("triton",))
    args.out = results_dir(args.out, args.smoke, cuda)
    if args.out is None:
        return 2
    with _env("QCOMPILE_AUTOTUNE", args.autotune):
        doc = run(all_shapes, ms, args.schemes, impls, device, smoke=args.smoke, baselines=not args.no_baselines,
                  strict=args.strict)
    path = args.out / "kernels.json"
    if not args.fresh:
        doc = merge(path, doc)
    doc["plots"] = [p.name for p in plot(doc, args.out)]
    path.write_text(json.dumps(doc, indent=1) + "\n")
    _summary(doc)
    print(f"wrote {path} and {', '.join(doc['plots'])}")
    return 0


def merge(path: Path, doc: dict[str, Any]) -> dict[str, Any]:
    """``doc`` with the rows of an earlier ``kernels.json`` at ``path`` that this run did not measure.

    A sweep split into several commands (``--schemes``, ``--shapes``, ``--m``) accumulates into one file.
    Only a file from the same device, library versions and smoke setting is merged; rows keep the
    roofline of the run that measured them, ``runs`` lists every run's peaks.
    """
    keys = ("device", "torch", "triton", "bitsandbytes")
    try:
        old = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        old = None
    this_run = {"peaks": doc["peaks"], "schemes": doc["schemes"], "ms": doc["ms"],
                "shapes": [s["name"] for s in doc["shapes"]]}
    if (not isinstance(old, dict) or old.get("benchmark") != "kernels" or old.get("smoke") != doc["smoke"]
            or any(old.get("environment", {}).get(k) != doc["environment"][k] for k in keys)):
        doc["runs"] = [this_run]
        return doc

    def key(r: dict[str, Any]) -> tuple:
        return (r["shape"], r["M"], r["scheme"], r["impl"])

    new_keys = {key(r) for r in doc["results"]}
    rows = [r for r in old.get("results", []) if key(r) not in new_keys] + doc["results"]
    rows.sort(key=lambda r: (r["shape"], r["M"]))
    shapes = {s["name"]: s for s in [*old.get("shapes", []), *doc["shapes"]]}
    order = [s[0] for s in (*LLAMA3_8B_SHAPES, *SMOKE_SHAPES)]
    merged = {
        **doc,
        "shapes": sorted(shapes.values(), key=lambda s: order.index(s["name"]) if s["name"] in order else 99),
        "ms": sorted(set(old.get("ms", [])) | set(doc["ms"])),
        "schemes": list(dict.fromkeys([*old.get("schemes", []), *doc["schemes"]])),
        "runs": [*old.get("runs", []), this_run],
        "results": rows,
    }
    merged["goals"] = goals(rows, judged=not doc["smoke"])
    return merged


def _summary(doc: dict[str, Any]) -> None:
    for r in doc["results"]:
        if "error" in r:
            print(f"{r['shape']:13s} M={r['M']:<5d} {r['scheme']:22s} {r['impl']:12s} ERROR {r['error'][:80]}")
            continue
        extra = f" vs bnb {r['speedup_vs_bnb']:.2f}x" if "speedup_vs_bnb" in r else ""
        print(f"{r['shape']:13s} M={r['M']:<5d} {r['scheme']:22s} {r['impl']:12s} {r['median_s'] * 1e6:10.1f} us "
              f"{r['tflops']:7.2f} TFLOP/s {r['gbps']:8.1f} GB/s {r['pct_roofline']:6.1f}% roof "
              f"x{r.get('speedup_vs_bf16', float('nan')):.2f}{extra}")
    for g in doc["goals"]:
        if g["worst"] is not None:
            verdict = "not judged (smoke)" if g["met"] is None else "met" if g["met"] else "NOT met"
            print(f"goal: {g['goal']}: worst {g['worst']:.2f} at {g['worst_at']} -> {verdict}")


if __name__ == "__main__":
    raise SystemExit(main())
