"""Host (Python) time of one quantized linear on the CUDA path, measured on a CPU with the launches stubbed.

    python -m benchmarks.host_overhead [--reps 5000] [--out benchmarks/results/cpu]

No GPU is needed: the Triton kernels are imported under the interpreter (so CPU tensors pass the device
checks) and then everything that distinguishes the interpreter from CUDA is switched back to the CUDA
behaviour: autotune mode "fast" with the winner already cached (as after the first call), the
interpreter flag off, and ``run_kernel`` (the one place every launch goes through) replaced by a stub that
keeps its device guard but launches nothing. What remains is all the host work qcompile does per call before
handing a kernel to Triton's launcher (on CUDA the guard also switches the current device, not timed here). NF4 +
double quant, bf16, 4096x4096, M = 1 (the GEMV and its split-K sum: two launches).

Rows (microseconds per call, best of 5 rounds):

* ``codegen``: ``qcompile.codegen.lowbit.linear_4bit``: argument checks, variant choice, config lookup,
  argument assembly, two stubbed launches;
* ``format_op``: ``torch.ops.qcompile.linear_4bit(..., kernels="triton")``: the above plus custom-op dispatch;
* ``quantized_linear``: ``torch.ops.qcompile.quantized_linear``, the op the rewrite emits: the above plus the
  per-call packed-weight lookup;
* ``launches``: how many launches one call makes (counted by the stub);
* ``llm_int8_*``: the same for LLM.int8() (threshold 6, fp16): activation quantization, outlier columns and
  the int8 GEMM, three launches.

Both entry points decide each launch once per call signature (``codegen/autotune.py``, step 5): these are
the costs of every call after a shape's first.

Triton's own launcher (``kernel[grid](...)``, a few microseconds per launch in Triton 3) is not included.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch

from benchmarks.call_overhead import per_call_us, run


@contextlib.contextmanager
def cuda_like_host_path(launches: list[int]) -> Iterator[None]:
    """Inside: qcompile's codegen takes its CUDA host path on CPU tensors, launching nothing."""
    from qcompile.codegen import _common, autotune

    saved = (autotune.run_kernel, autotune.interpreting, autotune.autotune_mode, _common.interpreting)

    def stub(kernel: Any, grid: Any, args: Any, **kwargs: Any) -> None:
        # run_kernel without Triton's launch: the device guard stays (a no-op context on CPU; on CUDA it also
        # switches the current device twice, which this machine cannot time).
        with autotune.device_guard(autotune.tensor_device(args)):
            launches[0] += 1

    autotune.run_kernel = stub
    real_interpreting = saved[1]
    autotune.interpreting = lambda: real_interpreting() and False  # still reads the variable, as on CUDA
    autotune.autotune_mode = lambda: "fast"
    _common.interpreting = lambda: True  # check_runnable: CPU tensors pass (interpreted kernels)
    try:
        yield
    finally:
        autotune.run_kernel, autotune.interpreting, autotune.autotune_mode, _common.interpreting = saved


@contextlib.contextmanager
def seeded_winners() -> Iterator[None]:
    """Inside: every tuned lowbit kernel's cache answers at once with its heuristic config, as after tuning;
    the kernels' caches are as before afterwards."""
    from qcompile.codegen import autotune, llm_int8, lowbit

    tuned = [lowbit._tuned(variant) for variant in ("gemv", "gemm_split_k", "gemm")]
    tuned += [llm_int8._tuned(split) for split in (False, True)]
    saved = [(t._disk, t._winners, t._keys, t.plans) for t in tuned]
    for t in tuned:
        t._disk, t._winners, t._keys, t.plans = autotune.AutotuneCache(), {}, {}, {}
        t._disk.get = lambda key, t=t: autotune.config_to_dict(t.interpreter_config({}))
    try:
        yield
    finally:
        for t, (disk, winners, keys, plans) in zip(tuned, saved, strict=True):
            t._disk, t._winners, t._keys, t.plans = disk, winners, keys, plans


def measure(reps: int) -> dict[str, float]:
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("run with TRITON_INTERPRET=1 (the kernels must be importable without a GPU)")
    import qcompile.ops  # noqa: F401
    from qcompile import NF4
    from qcompile.codegen import lowbit
    from qcompile.ops import binding, op_arguments
    from qcompile.ops.quantized_linear import scheme_key
    from qcompile.pack_cache import packed_weight

    torch.manual_seed(0)
    n = k = 4096
    linear = torch.nn.Linear(k, n, bias=False, dtype=torch.bfloat16)
    scheme = NF4(double_quant=True, compute_dtype=torch.bfloat16)
    x = torch.randn(1, k, dtype=torch.bfloat16)
    packed = packed_weight(linear.weight, scheme, False, "weight")
    key = scheme_key(scheme)
    op = binding(scheme).op
    args = op_arguments(packed, x, None, "triton")
    codegen_args = args[:-1]
    launches = [0]
    with torch.no_grad(), seeded_winners(), cuda_like_host_path(launches):
        lowbit.linear_4bit(*codegen_args)
        launches[0] = 0
        lowbit.linear_4bit(*codegen_args)
        rows = {"launches": float(launches[0]),
                "codegen": per_call_us(lambda: lowbit.linear_4bit(*codegen_args), reps),
                "format_op": per_call_us(lambda: op(*args), reps),
                "quantized_linear": per_call_us(lambda: torch.ops.qcompile.quantized_linear.default(
                    x, linear.weight, None, key, False, "weight", "triton"), reps)}
        rows.update(_llm_int8_rows(reps, launches))
    return rows


def _llm_int8_rows(reps: int, launches: list[int]) -> dict[str, float]:
    """The LLM.int8() rows (threshold 6, fp16, same shape and M): activation quantization, outlier columns, GEMM."""
    from qcompile import Int8
    from qcompile.codegen import llm_int8
    from qcompile.ops import op_arguments
    from qcompile.ops.quantized_linear import scheme_key
    from qcompile.pack_cache import packed_weight

    linear = torch.nn.Linear(4096, 4096, bias=False, dtype=torch.float16)
    x = torch.randn(1, 4096, dtype=torch.float16)
    scheme = Int8(threshold=6.0)
    x_, weight, weight_scale, bias, threshold, _ = op_arguments(packed_weight(linear.weight, scheme, False, "weight"),
                                                                x, None, "triton")
    key = scheme_key(scheme)
    llm_int8.linear_int8(x, weight, weight_scale, None, threshold)
    launches[0] = 0
    llm_int8.linear_int8(x, weight, weight_scale, None, threshold)
    return {"llm_int8_launches": float(launches[0]),
            "llm_int8_codegen": per_call_us(lambda: llm_int8.linear_int8(x, weight, weight_scale, None, threshold),
                                            reps),
            "llm_int8_quantized_linear": per_call_us(lambda: torch.ops.qcompile.quantized_linear.default(
                x, linear.weight, None, key, False, "weight", "triton"), reps)}


def main(argv: list[str] | None = None) -> None:
    run(argv, __doc__.splitlines()[0], measure, 5000, "host_overhead.json", shape=[4096, 4096], m=1,
        scheme="nf4 double quant, bf16", unit="microseconds per call; launches: count")


if __name__ == "__main__":
    main()
