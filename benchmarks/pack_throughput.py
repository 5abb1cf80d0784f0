"""Packing throughput on CPU: qcompile.pack against bitsandbytes, same machine, same run.

    python -m benchmarks.pack_throughput [--out FILE] [--shapes 4096x4096,4096x14336] [--repeats 3]

Throughput is GB/s of *input* weight (numel * element size of the original dtype) per
second of wall time, best of ``--repeats`` runs after one warm-up. bitsandbytes is timed
through its public functions: ``quantize_4bit`` (NF4, with / without double quant) and,
for int8, ``int8_vectorwise_quant`` of the float16-cast weight, i.e. what ``Int8Params``
does (the cast is included in both timings).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "pack_throughput_cpu.json"
DEFAULT_SHAPES = ((4096, 4096), (4096, 14336))
DEFAULT_DTYPES = ("bfloat16", "float32")


def _best_seconds(fns: list[Callable[[], Any]], repeats: int) -> list[float]:
    """Best wall time of each function over ``repeats`` rounds, after one warm-up round.

    The functions are interleaved within each round so that a background load on a shared
    machine hits them alike; the best of the rounds is the least disturbed one.
    """
    for fn in fns:
        fn()  # warm-up: thread pool, caches, lazy tables, allocator
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return best


def _cases(weight: torch.Tensor) -> list[tuple[str, Callable[[], Any], Callable[[], Any] | None]]:
    """(name, qcompile pack, bitsandbytes equivalent or None)."""
    import qcompile

    try:
        import bitsandbytes.functional as bnbf
    except ImportError:  # bitsandbytes is a test extra; still measure qcompile alone
        bnbf = None

    def bnb_4bit(double_quant: bool) -> Callable[[], Any] | None:
        if bnbf is None:
            return None
        return lambda: bnbf.quantize_4bit(weight, blocksize=64, compress_statistics=double_quant, quant_type="nf4")

    bnb_int8 = None if bnbf is None else (lambda: bnbf.int8_vectorwise_quant(weight.to(torch.float16)))
    return [
        ("nf4", lambda: qcompile.pack(weight, qcompile.NF4()), bnb_4bit(False)),
        ("nf4_double_quant", lambda: qcompile.pack(weight, qcompile.NF4(double_quant=True)), bnb_4bit(True)),
        ("int8", lambda: qcompile.pack(weight, qcompile.Int8()), bnb_int8),
    ]


def run(shapes: tuple[tuple[int, int], ...] = DEFAULT_SHAPES, dtypes: tuple[str, ...] = DEFAULT_DTYPES,
        repeats: int = 3, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure every (shape, dtype, format) and return the results document."""
    results = []
    for shape in shapes:
        for dtype_name in dtypes:
            dtype = getattr(torch, dtype_name)
            weight = torch.randn(shape, dtype=torch.float32).mul_(0.02).to(dtype)
            gigabytes = weight.numel() * weight.element_size() / 1e9
            for name, ours, theirs in _cases(weight):
                times = _best_seconds([ours] if theirs is None else [ours, theirs], repeats)
                q_s = times[0]
                row: dict[str, Any] = {
                    "format": name, "shape": list(shape), "dtype": dtype_name,
                    "qcompile_s": q_s, "qcompile_gbps": gigabytes / q_s,
                }
                if theirs is not None:
                    b_s = times[1]
                    row.update(bnb_s=b_s, bnb_gbps=gigabytes / b_s, speedup=b_s / q_s)
                results.append(row)
                log(
                    f"{name:17s} {shape[0]}x{shape[1]:<6d} {dtype_name:9s} qcompile {row['qcompile_gbps']:6.2f} GB/s"
                    + (f"  bnb {row['bnb_gbps']:6.2f} GB/s  x{row['speedup']:.2f}" if "bnb_gbps" in row else "")
                )
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"machine": machine_info(), "repeats": repeats, "unit": "GB/s of input weight",
            "load_average_1_5_15min_at_end": load, "results": results}


def machine_info() -> dict[str, Any]:
    """CPU, thread count and library versions, so numbers are read against the right machine."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import bitsandbytes

        info["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:
        info["bitsandbytes"] = None
    return info


def _parse_shapes(text: str) -> tuple[tuple[int, int], ...]:
    shapes = []
    for item in text.split(","):
        rows, cols = item.lower().split("x")
        shapes.append((int(rows), int(cols)))
    return tuple(shapes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON results file (default {DEFAULT_OUT})")
    parser.add_argument("--shapes", type=_parse_shapes, default=DEFAULT_SHAPES, help="e.g. 4096x4096,4096x14336")
    parser.add_argument("--dtypes", default=",".join(DEFAULT_DTYPES), help="comma-separated, e.g. bfloat16,float32")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    doc = run(args.shapes, tuple(d.strip() for d in args.dtypes.split(",")), args.repeats)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
