"""Host cost of one quantized linear call on CPU: what finding the packed weight per call adds.

    python -m benchmarks.call_overhead [--reps 20000] [--out benchmarks/results/cpu]

A quantized linear now runs as ``qcompile::quantized_linear(x, weight, ...)``, which looks the
parameter's packed form up (and checks it is fresh) on every call, then runs the format's op.
Before, the packed tensors were graph constants passed straight to the format's op. On a tiny
shape (x [1, 64], weight [64, 64], NF4 + double quant, reference kernels) the compute is a few
microseconds, so the difference between the rows is the per-call cost of the design:

* ``format_op``: ``torch.ops.qcompile.linear_4bit`` with the packed tensors (the old call);
* ``quantized_linear``: the op the rewrite emits now (lookup + stamp check + the format's op);
* ``quantized_linear_with_decision``: the same with a config key, as the rewrite emits it: the weight's
  own recorded decision is looked up first (``qcompile/decisions.py``);
* ``lookup``: ``pack_cache.packed_weight`` alone (weak-dictionary lookup + stamp comparison);
* ``decision_lookup``: ``quantized_linear.own_scheme`` alone.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from benchmarks.timing import environment, results_dir


def per_call_us(fn, reps: int) -> float:
    """Microseconds per ``fn()`` call: the best of 5 rounds of ``reps`` calls."""
    for _ in range(min(reps, 1000)):
        fn()
    best = float("inf")
    for _ in range(5):  # the best of 5 rounds: a shared machine only ever adds time
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, (time.perf_counter() - start) / reps)
    return best * 1e6


def measure(reps: int) -> dict[str, float]:
    import qcompile.ops  # noqa: F401  (registers the ops)
    from qcompile import NF4
    from qcompile.config import QuantConfig
    from qcompile.decisions import config_key, record
    from qcompile.ops import binding, op_arguments
    from qcompile.ops.quantized_linear import own_scheme, scheme_key
    from qcompile.pack_cache import packed_weight

    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 64)
    weight, bias = linear.weight, linear.bias
    scheme = NF4(double_quant=True, compute_dtype=torch.float32)
    x = torch.randn(1, 64)
    packed = packed_weight(weight, scheme, False, "weight")
    key = scheme_key(scheme)
    config = config_key(QuantConfig(default=scheme))
    record(config, weight, key)
    format_op = binding(scheme).op
    args = op_arguments(packed, x, bias, "reference")
    quantized_linear = torch.ops.qcompile.quantized_linear.default
    with torch.no_grad():
        rows = {
            "format_op": per_call_us(lambda: format_op(*args), reps),
            "quantized_linear": per_call_us(
                lambda: quantized_linear(x, weight, bias, key, False, "weight", "reference"), reps),
            "quantized_linear_with_decision": per_call_us(
                lambda: quantized_linear(x, weight, bias, key, False, "weight", "reference", config), reps),
            "lookup": per_call_us(lambda: packed_weight(weight, scheme, False, "weight"), reps),
            "decision_lookup": per_call_us(lambda: own_scheme(weight, key, config), reps),
        }
    rows["added_per_call"] = rows["quantized_linear"] - rows["format_op"]
    return rows


def run(argv: list[str] | None, description: str, measure_rows, default_reps: int, filename: str,
        **extra: object) -> None:
    """Parse ``--reps`` / ``--out``, print ``measure_rows(reps)`` (name -> microseconds) and write them to
    ``--out/filename`` with the environment and ``extra``; shared by the per-call overhead benchmarks."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--reps", type=int, default=default_reps)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    rows = measure_rows(args.reps)
    for name, us in rows.items():
        print(f"{name:18s} {us:8.2f}")
    out = results_dir(args.out, smoke=False, cuda=False)
    if out is not None:
        path = out / filename
        doc = {"environment": environment(torch.device("cpu")), "per_call_us": rows, **extra}
        path.write_text(json.dumps(doc, indent=2))
        print(f"wrote {path}")


def main(argv: list[str] | None = None) -> None:
    run(argv, __doc__.splitlines()[0], measure, 20000, "call_overhead.json")


if __name__ == "__main__":
    main()
