"""Timing, progress and environment helpers shared by the benchmarks (one job: measure and describe).

``median_seconds`` uses ``triton.testing.do_bench`` on CUDA (CUDA events, L2 flushed between runs,
median) and a plain ``time.perf_counter`` loop elsewhere (CPU, Triton interpreter), so one benchmark
script runs unchanged on a GPU and in CPU smoke tests.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch

T = TypeVar("T")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], Any], device: torch.device, *, warmup_ms: float = 25, rep_ms: float = 100,
                   cpu_reps: int = 10, cpu_warmup: int = 2) -> float:
    """Median wall time of one ``fn()`` call, in seconds.

    CUDA: ``triton.testing.do_bench(fn, warmup, rep, return_mode="median")``. Elsewhere: ``cpu_warmup``
    untimed calls, then the median of ``cpu_reps`` timed calls.
    """
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median") / 1e3
    for _ in range(cpu_warmup):
        fn()
    times = []
    for _ in range(max(1, cpu_reps)):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cudagraph_seconds(fn: Callable[[], Any], *, rep_ms: float = 100) -> float | str:
    """Median GPU time of one ``fn()`` replayed from a CUDA graph (``triton.testing.do_bench_cudagraph``):
    the kernels' own time, with no host launch cost in it. A string (why) when ``fn`` cannot be captured."""
    import triton.testing

    try:
        return triton.testing.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median") / 1e3
    except Exception as exc:  # noqa: BLE001 - a capture failure is a result to report, not a crash
        return f"{type(exc).__name__}: {exc}"[:300]


def host_seconds(fn: Callable[[], Any], device: torch.device, calls: int = 50) -> float:
    """Host time of one ``fn()`` call: the wall time of ``calls`` calls with no synchronization between them,
    divided by ``calls`` (the launches queue on the device; what is measured is the Python and launch cost)."""
    fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    sync(device)
    return elapsed / calls


def progress(items: Iterable[T], total: int | None = None, desc: str = "") -> Iterator[T]:
    """``tqdm`` when it is installed, else a one-line counter on stderr (nothing when stderr is not a TTY
    and not forced with ``QCOMPILE_BENCH_PROGRESS=1``, so logs stay readable)."""
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is not None:
        yield from tqdm(items, total=total, desc=desc, file=sys.stderr, leave=False)
        return
    show = sys.stderr.isatty() or os.environ.get("QCOMPILE_BENCH_PROGRESS") == "1"
    total = total if total is not None else (len(items) if hasattr(items, "__len__") else None)
    start = time.perf_counter()
    for i, item in enumerate(items):
        if show:
            of = f"/{total}" if total else ""
            sys.stderr.write(f"\r{desc} {i + 1}{of}  {time.perf_counter() - start:6.1f}s")
            sys.stderr.flush()
        yield item
    if show:
        sys.stderr.write("\n")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict[str, Any]:
    """Device name and library versions, so a results file is read against the right machine."""
    info: dict[str, Any] = {
        "device": device_name(device),
        "device_type": device.type,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
        "qcompile_autotune": os.environ.get("QCOMPILE_AUTOTUNE", "fast"),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(sm_count=props.multi_processor_count, total_memory_gib=props.total_memory / 2**30,
                    capability=f"{props.major}.{props.minor}")
    for name in ("triton", "bitsandbytes", "transformers", "qcompile"):
        info[name] = library_version(name)
    return info


def library_version(name: str) -> str | None:
    try:
        module = __import__(name)
    except Exception:  # noqa: BLE001 - an optional library that fails to import is simply absent
        return None
    return getattr(module, "__version__", "unknown")


RESULTS_DIR = Path(__file__).resolve().parent / "results"


def results_dir(out: Path | None, smoke: bool, cuda: bool) -> Path | None:
    """Where a benchmark writes: ``out``, else ``results/gpu`` or ``results/cpu``; None (after
    printing why) for a smoke run without ``--out``, whose results are not kept in the repository."""
    if out is None:
        if smoke:
            print("--smoke needs --out DIR (smoke results are not kept in benchmarks/results)", file=sys.stderr)
            return None
        out = RESULTS_DIR / ("gpu" if cuda else "cpu")
    out.mkdir(parents=True, exist_ok=True)
    return out
