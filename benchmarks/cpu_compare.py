"""qcompile against bitsandbytes on CPU, for real: pack throughput, the compiled NF4 / LLM.int8() linear forward,
and end-to-end decode tokens/s.

    python -m benchmarks.cpu_compare [--out benchmarks/results/cpu/cpu_compare.json] [--m 1,16] [--parts ...]

* Pack: ``benchmarks.pack_throughput`` (qcompile.pack against ``bitsandbytes.functional.quantize_4bit`` /
  ``int8_vectorwise_quant``), GB/s of input weight.
* Forward: a bias-free ``nn.Linear(K, N)`` compiled with ``torch.compile(backend="qcompile")``
  (default kernels, "auto": the C++ CPU kernels; ``qcompile_reference``: the torch reference,
  ``kernels="reference"``, for scale; inductor behind both) against the bitsandbytes
  layer with the same settings, run as bitsandbytes users serve it (eager, eval mode:
  ``bnb_eager``), also under ``torch.compile`` (inductor) when that works, and in train mode
  (``bnb_eager_train_mode``: dequantize + F.linear, numerically what qcompile's reference computes).
  NF4 + double quant (compute dtype = activation dtype) against ``bnb.nn.Linear4bit``, and
  LLM.int8() (threshold 6.0; 4 activation columns scaled x20, so there are outliers) against
  ``bnb.nn.Linear8bitLt``. The dense ``F.linear`` is timed alongside for scale.
  Times are medians over interleaved rounds (one call of each per round), so background load on a
  shared machine hits every contender alike. Compile time (first call) is reported separately.
* Decode: ``benchmarks.cpu_decode`` (the demo model and a Llama 3.2 1B-shaped model; qcompile NF4, bitsandbytes
  NF4, inductor bf16, eager bf16), tokens/s of ``generate()``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.pack_throughput import machine_info
from benchmarks.pack_throughput import run as pack_run

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "cpu" / "cpu_compare.json"


def interleaved_medians(fns: dict[str, Callable[[], Any]], reps: int, warmup: int = 2) -> dict[str, dict[str, float]]:
    """{name: {median_s, min_s}} over ``reps`` rounds that call every function once each."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: {"median_s": statistics.median(t), "min_s": min(t)} for name, t in times.items()}


def _timed_first_call(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


SCHEMES = {
    "nf4_dq": "nf4 double_quant blocksize 64, compute dtype = activation dtype",
    "llm_int8": "LLM.int8() threshold 6.0",
}


def _bnb_layer(scheme: str, linear: torch.nn.Linear, dtype: torch.dtype, train: bool) -> torch.nn.Module:
    """The bitsandbytes layer holding ``linear``'s weight, quantized by ``.to`` as for its users.

    Mode matters on CPU: in eval mode bitsandbytes 0.50 runs its own CPU inference kernels
    (Linear4bit repacks the weight for them); in train mode it dequantizes and calls F.linear.
    """
    import bitsandbytes as bnb

    n, k = linear.weight.shape
    if scheme == "nf4_dq":
        layer = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=dtype, compress_statistics=True, quant_type="nf4")
    else:
        layer = bnb.nn.Linear8bitLt(k, n, bias=False, has_fp16_weights=False, threshold=6.0)
    layer.load_state_dict({"weight": linear.weight.detach().clone()})
    return layer.to("cpu").train(train).requires_grad_(False)


def _scheme(scheme: str, dtype: torch.dtype) -> Any:
    import qcompile

    if scheme == "nf4_dq":
        return qcompile.NF4(blocksize=64, double_quant=True, compute_dtype=dtype)
    return qcompile.Int8(threshold=6.0)


def _op_call(linear: torch.nn.Linear, config: Any, x: torch.Tensor) -> Callable[[], Any]:
    """The op the rewrite emits for this linear, called directly: what each linear of a compiled model
    pays per call, without the per-graph cost (dynamo's guards, inductor's wrapper: ~0.1-0.2 ms on this
    CPU, the same for any backend) that a one-linear graph charges to its one linear."""
    from qcompile.ops.quantized_linear import scheme_key

    key = scheme_key(config.default)
    op = torch.ops.qcompile.quantized_linear.default
    return lambda: op(x, linear.weight, None, key, False, "weight", "auto")


def forward_case(n: int, k: int, m: int, dtype: torch.dtype, reps: int, compile_bnb: bool,
                 scheme: str = "nf4_dq") -> dict[str, Any]:
    """One (scheme, shape, M, dtype): qcompile's compiled forward vs the bitsandbytes layer, plus dense."""
    import qcompile

    torch._dynamo.reset()
    torch.manual_seed(0)
    linear = torch.nn.Linear(k, n, bias=False, dtype=dtype).requires_grad_(False)
    linear.weight.normal_(0.0, 0.02)
    x = torch.randn(m, k, dtype=dtype)
    x[:, :4] *= 20  # outlier columns for LLM.int8() (harmless for NF4)
    layer = _bnb_layer(scheme, linear, dtype, train=False)
    layer_train = _bnb_layer(scheme, linear, dtype, train=True)
    config = qcompile.QuantConfig(default=_scheme(scheme, dtype))
    compiled = torch.compile(linear, backend="qcompile", options={"config": config}, dynamic=False)
    compiled_reference = torch.compile(linear, backend="qcompile", options={"config": config, "kernels": "reference"},
                                       dynamic=False)

    row: dict[str, Any] = {"shape": [n, k], "M": m, "dtype": str(dtype).removeprefix("torch."),
                           "scheme": SCHEMES[scheme], "scheme_name": scheme}
    fns: dict[str, Callable[[], Any]] = {}
    with torch.no_grad():
        y_q, row["qcompile_compile_s"] = _timed_first_call(lambda: compiled(x))
        y_r = compiled_reference(x)
        row["rel_diff_qcompile_vs_reference"] = ((y_q.float() - y_r.float()).norm() / y_r.float().norm()).item()
        y_t = layer_train(x)
        row["rel_diff_reference_vs_bnb_train"] = ((y_r.float() - y_t.float()).norm() / y_t.float().norm()).item()
        for mode, module in (("eval", layer), ("train", layer_train)):
            y_b = module(x)
            row[f"rel_diff_qcompile_vs_bnb_{mode}"] = ((y_q.float() - y_b.float()).norm() / y_b.float().norm()).item()
        fns["qcompile_compiled"] = lambda: compiled(x)
        fns["qcompile_op"] = _op_call(linear, config, x)
        fns["qcompile_reference"] = lambda: compiled_reference(x)
        fns["bnb_eager"] = lambda: layer(x)
        fns["bnb_eager_train_mode"] = lambda: layer_train(x)
        if compile_bnb:
            try:
                bnb_compiled = torch.compile(layer, backend="inductor", dynamic=False)
                _, row["bnb_compile_s"] = _timed_first_call(lambda: bnb_compiled(x))
                fns["bnb_compiled"] = lambda: bnb_compiled(x)
            except Exception as exc:  # noqa: BLE001 - bnb under torch.compile is optional, the eager number stands
                row["bnb_compiled_error"] = f"{type(exc).__name__}: {exc}"[:300]
        fns["dense_f_linear"] = lambda: F.linear(x, linear.weight)
        row["timings"] = interleaved_medians(fns, reps)
    t = row["timings"]
    row["speedup_qcompile_vs_bnb_eager"] = t["bnb_eager"]["median_s"] / t["qcompile_compiled"]["median_s"]
    row["speedup_qcompile_vs_dense"] = t["dense_f_linear"]["median_s"] / t["qcompile_compiled"]["median_s"]
    row["speedup_qcompile_op_vs_bnb_eager"] = t["bnb_eager"]["median_s"] / t["qcompile_op"]["median_s"]
    row["speedup_qcompile_op_vs_dense"] = t["dense_f_linear"]["median_s"] / t["qcompile_op"]["median_s"]
    row["speedup_qcompile_vs_bnb_train_mode"] = (t["bnb_eager_train_mode"]["median_s"]
                                                 / t["qcompile_compiled"]["median_s"])
    if "bnb_compiled" in t:
        row["speedup_qcompile_vs_bnb_compiled"] = t["bnb_compiled"]["median_s"] / t["qcompile_compiled"]["median_s"]
    return row


def _shapes(text: str) -> tuple[tuple[int, int], ...]:
    out = []
    for item in text.split(","):
        rows, cols = item.lower().split("x")
        out.append((int(rows), int(cols)))
    return tuple(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--parts", default="pack,forward,decode", help="pack, forward, decode (comma-separated)")
    parser.add_argument("--shapes", type=_shapes, default=((4096, 4096), (14336, 4096), (4096, 14336)),
                        help="NxK list, e.g. 4096x4096,14336x4096")
    parser.add_argument("--m", default="1,16", help="activation rows")
    parser.add_argument("--dtypes", default="bfloat16")
    parser.add_argument("--schemes", default="nf4_dq,llm_int8", help=f"forward schemes: {', '.join(SCHEMES)}")
    parser.add_argument("--reps", type=int, default=15, help="timed rounds of the forward comparison")
    parser.add_argument("--pack-repeats", type=int, default=5)
    parser.add_argument("--no-bnb-compile", action="store_true", help="skip torch.compile of bnb Linear4bit")
    parser.add_argument("--decode-models", default="demo,llama_1b", help="models for the decode part")
    parser.add_argument("--decode-tokens", type=int, default=32)
    args = parser.parse_args(argv)
    parts = {v.strip() for v in args.parts.split(",") if v.strip()}
    dtypes = tuple(getattr(torch, d.strip()) for d in args.dtypes.split(","))
    ms = tuple(int(v) for v in args.m.split(","))
    schemes = tuple(v.strip() for v in args.schemes.split(",") if v.strip())
    unknown = [v for v in schemes if v not in SCHEMES]
    if unknown:
        parser.error(f"--schemes: {unknown} unknown; allowed: {', '.join(SCHEMES)}")

    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    pack = None
    if "pack" in parts:
        print("pack throughput (GB/s of input weight):")
        pack = pack_run(args.shapes, tuple(str(d).removeprefix("torch.") for d in dtypes), args.pack_repeats)
    forward = []
    if "forward" in parts:
        print("compiled linear forward:")
    for scheme in schemes if "forward" in parts else ():
        for n, k in args.shapes:
            for dtype in dtypes:
                for m in ms:
                    row = forward_case(n, k, m, dtype, args.reps, not args.no_bnb_compile, scheme)
                    forward.append(row)
                    t = row["timings"]
                    line = "  ".join(f"{name} {v['median_s'] * 1e3:8.3f} ms" for name, v in t.items())
                    op_vs_bnb = row["speedup_qcompile_op_vs_bnb_eager"]
                    print(f"{scheme:8s} {n}x{k} M={m:<3d} {row['dtype']:8s} {line}  qcompile/bnb-eager "
                          f"x{row['speedup_qcompile_vs_bnb_eager']:.2f} (op x{op_vs_bnb:.2f})"
                          f" qcompile/dense x{row['speedup_qcompile_vs_dense']:.2f}"
                          f" (op x{row['speedup_qcompile_op_vs_dense']:.2f})", flush=True)
    decode = []
    if "decode" in parts:
        from benchmarks.cpu_decode import VARIANTS
        from benchmarks.cpu_decode import run as decode_run

        decode = decode_run(args.decode_models.split(","), list(VARIANTS), args.decode_tokens, repeats=3)
    doc = {
        "benchmark": "cpu_compare",
        "machine": machine_info(),
        "load_average_1_5_15min_at_start": load_start,
        "load_average_1_5_15min_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "pack": pack,
        "forward": {"reps": args.reps, "unit": "seconds per call (median of interleaved rounds)",
                    "results": forward},
        "decode": {"unit": "tokens/s, batch 1, 32-token prompt, greedy, dynamic cache", "results": decode},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
