"""Compile time of the demo model: plain inductor against qcompile (+ inductor), on this machine.

    python -m benchmarks.compile_time [--repeats 3] [--layers 4] [--out benchmarks/results/compile_time_cpu.json]

Each measurement runs in a fresh interpreter with inductor's caches pointed at an
empty directory, so neither side profits from an earlier compile. The time is the
first call of the compiled model (capture + passes + inductor + run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile

import torch

_CHILD = r"""
import json, sys, time, torch
from qcompile.demo import tiny_llama, SEED_CONFIG
backend, layers = sys.argv[1], int(sys.argv[2])
model = tiny_llama(layers)
ids = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1))
plans = []
options = {"config": str(SEED_CONFIG), "on_plan": plans.append} if backend == "qcompile" else None
compiled = torch.compile(model, backend=backend, options=options)
with torch.no_grad():
    start = time.perf_counter()
    compiled(ids)
    seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "pass_seconds": sum(p.pass_seconds for p in plans)}))
"""


def measure(backend: str, layers: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "TORCHINDUCTOR_FX_GRAPH_CACHE": "0",
               "TORCHINDUCTOR_AUTOGRAD_CACHE": "0"}
        out = subprocess.run([sys.executable, "-c", _CHILD, backend, str(layers)], env=env, check=True,
                             capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    runs: dict[str, list[dict[str, float]]] = {"inductor": [], "qcompile": []}
    for i in range(args.repeats):
        for backend in runs:  # interleaved, so drift in machine load hits both sides
            runs[backend].append(measure(backend, args.layers))
            print(f"run {i} {backend}: {runs[backend][-1]['seconds']:.2f}s", flush=True)
    inductor = statistics.median(r["seconds"] for r in runs["inductor"])
    qcompile_s = statistics.median(r["seconds"] for r in runs["qcompile"])
    passes = statistics.median(r["pass_seconds"] for r in runs["qcompile"])
    result = {
        "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
        "torch": torch.__version__, "layers": args.layers, "repeats": args.repeats,
        "inductor_seconds_median": inductor, "qcompile_seconds_median": qcompile_s,
        "qcompile_pass_seconds_median": passes,
        "overhead_total": qcompile_s / inductor - 1, "overhead_passes": passes / inductor, "runs": runs,
    }
    print(f"plain inductor {inductor:.2f}s, qcompile {qcompile_s:.2f}s ({result['overhead_total']:+.1%}); "
          f"qcompile's own passes {passes:.3f}s = {result['overhead_passes']:.1%} of the inductor compile")
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
