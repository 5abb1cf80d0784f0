"""Compile every Triton kernel for a Hopper GPU (sm_90) on a machine without one.

    python -m tests.codegen.aot_sm90 [--spaces heuristic|fast|max]

Triton ships ptxas, so a kernel compiles to a cubin with no GPU present; only launching needs
one. Each codegen wrapper is called on small CPU tensors with the launch intercepted (its shape
checks, specializations and heuristic configs all run as on a GPU), then each intercepted launch
is compiled for sm_90. This catches what the interpreter lets through (compile-only type rules,
tl.dot shape limits) and measures the real shared memory of every config: an untuned kernel must
fit H100's per-program limit, and a tuned kernel's pruner estimate must not be below the real figure
(the pruner keeps configs by that estimate), and an untuned (heuristic) config must not spill
registers (ptxas -v). ``--spaces fast|max`` checks whole autotune spaces (slow; spills reported only).
It must run with TRITON_INTERPRET unset, so the test suite runs it as a subprocess.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

SM90_SHARED_LIMIT = 232448  # bytes one program may opt into on H100/H200 (227 KiB)
SM90_SM_COUNT = 132


@contextlib.contextmanager
def intercepted_launches(spaces: str) -> Iterator[list[tuple[Any, tuple, dict, int | None]]]:
    """Record ``(jit_fn, args, kwargs, estimated_smem)`` for every launch instead of running it."""
    from triton.runtime.jit import JITFunction

    from qcompile.codegen import _common as common
    from qcompile.codegen import autotune

    launches: list[tuple[Any, tuple, dict, int | None]] = []
    estimate: list[int | None] = [None]

    def run(self: Any, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> None:
        launches.append((self, args, kwargs, estimate[0]))

    real_launch = autotune.TunedKernel.launch

    def launch(self: Any, grid: Any, args: Any, m: int, config: Any = None, **constexprs: Any) -> Any:
        named = dict(zip(self.arg_names, args, strict=True))
        configs = [config or self.heuristic(named)]
        if spaces != "heuristic":
            configs += self.spaces[spaces]
        for cfg in configs:
            estimate[0] = self.smem_bytes({**cfg.kwargs, **constexprs}, cfg.num_stages, named)
            real_launch(self, grid, args, m, config=cfg, **constexprs)
        estimate[0] = None
        return configs[0]

    saved = (JITFunction.run, autotune.TunedKernel.launch, common.check_runnable, common.sm_count)
    JITFunction.run = run
    autotune.TunedKernel.launch = launch
    common.check_runnable = lambda fn, kernel, *tensors: torch.device("cpu")
    common.sm_count = lambda device: SM90_SM_COUNT
    try:
        yield launches
    finally:
        JITFunction.run, autotune.TunedKernel.launch, common.check_runnable, common.sm_count = saved


def call_every_wrapper() -> None:
    """Each codegen entry point at decode and prefill sizes, in the dtypes and options it supports."""
    import qcompile
    from qcompile.codegen.int8_weight_only import int8_weight_only
    from qcompile.codegen.llm_int8 import linear_int8
    from qcompile.codegen.lowbit import linear_4bit, linear_affine, linear_float8
    from qcompile.codegen.w8a8_dynamic import w8a8_dynamic
    from qcompile.ops import op_arguments

    n, k = 256, 512
    torch.manual_seed(0)
    w = torch.randn(n, k)
    bias = torch.randn(n)
    # K = 512 takes the aligned path (whole absmax blocks per row), K = 96 with blocksize 64 the general one.
    for kind, double_quant, compute, blocksize, in_features in (
        ("nf4", True, torch.bfloat16, 64, k), ("fp4", False, torch.float16, 64, k),
        ("nf4", True, torch.float32, 64, k), ("nf4", True, torch.bfloat16, 32, k),
        ("nf4", True, torch.bfloat16, 256, k), ("nf4", True, torch.bfloat16, 64, 96),
    ):
        scheme = (qcompile.NF4 if kind == "nf4" else qcompile.FP4)(blocksize=blocksize, double_quant=double_quant,
                                                                   compute_dtype=compute)
        packed = qcompile.pack(w[:, :in_features], scheme)
        for m in (1, 3, 16, 64, 256):
            x = torch.randn(m, in_features, dtype=compute)
            linear_4bit(*op_arguments(packed, x, bias.to(compute) if m == 3 else None, "triton")[:-1])
    # The affine decode: each bit width, packed and float16 zeros, AWQ's input scale.
    for scheme in (qcompile.Affine(bits=2, group_size=64, compute_dtype=torch.bfloat16),
                   qcompile.Affine(bits=3, group_size=128, compute_dtype=torch.float16),
                   qcompile.Affine(bits=8, group_size=-1, compute_dtype=torch.float32),
                   qcompile.HQQ(bits=4, group_size=64, compute_dtype=torch.bfloat16)):
        packed = qcompile.pack(w, scheme)
        for m in (1, 3, 16, 256):
            x = torch.randn(m, k, dtype=scheme.compute_dtype)
            linear_affine(*op_arguments(packed, x, bias.to(x.dtype) if m == 3 else None, "triton")[:-1])
    packed = qcompile.pack(w, qcompile.Affine(bits=4, group_size=128, compute_dtype=torch.bfloat16))
    packed.input_scale = torch.rand(k) + 0.5  # as AWQ stores it
    for m in (1, 16, 256):
        linear_affine(*op_arguments(packed, torch.randn(m, k, dtype=torch.bfloat16), None, "triton")[:-1])
    for dtype in (torch.bfloat16, torch.float32):
        fp8 = qcompile.pack(w.to(dtype), qcompile.Float8())
        for m in (1, 16, 256):
            linear_float8(torch.randn(m, k, dtype=dtype), fp8.weight, fp8.scale, bias.to(dtype) if m == 1 else None,
                          dtype)
    int8 = qcompile.pack(w.half(), qcompile.Int8(threshold=6.0))
    q, scale = int8.tensors()["weight"], int8.tensors()["weight_scale"]
    for dtype in (torch.float16, torch.bfloat16):
        for m in (1, 64, 256):
            x = torch.randn(m, k, dtype=dtype)
            b = bias.to(dtype) if m == 1 else None
            linear_int8(x, q, scale, b, 6.0)
            linear_int8(x, q, scale, b, 0.0)
            int8_weight_only(x, q, scale, b)
            w8a8_dynamic(x, q, scale, b)


def compile_sm90(fn: Any, args: tuple, kwargs: dict) -> Any:
    """``fn`` specialized for ``args`` / ``kwargs`` as a launch would, compiled for sm_90."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)


def ptxas_usage(ptx: str) -> tuple[int, int] | None:
    """(registers per thread, spill-store bytes) that ptxas reports for ``ptx`` on sm_90a; None if unknown."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        ptxas = get_ptxas(90).path
    except (ImportError, AttributeError, RuntimeError):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        done = subprocess.run([ptxas, "-arch=sm_90a", "-v", str(src), "-o", str(Path(tmp) / "kernel.cubin")],
                              capture_output=True, text=True)
    registers = re.search(r"Used (\d+) registers", done.stderr + done.stdout)
    spills = re.search(r"(\d+) bytes spill stores", done.stderr + done.stdout)
    if registers is None or spills is None:
        return None
    return int(registers.group(1)), int(spills.group(1))


def _describe(kwargs: dict) -> str:
    return " ".join(f"{k}={getattr(v, 'name', v)}" for k, v in kwargs.items() if k.isupper() or k.startswith("num_"))


def main(argv: list[str] | None = None, report: Callable[[str], None] = print) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spaces", choices=("heuristic", "fast", "max"), default="heuristic",
                        help="configs to compile per tuned launch: the heuristic's, or also a whole autotune space")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        report("TRITON_INTERPRET=1 is set: kernels would be built for the interpreter; unset it")
        return 2
    with intercepted_launches(args.spaces) as launches:
        call_every_wrapper()
    seen: set[tuple] = set()
    failures = 0
    start = time.perf_counter()
    for fn, fn_args, kwargs, estimated in launches:
        key = (fn.__name__, _describe(kwargs), tuple(str(getattr(a, "dtype", type(a).__name__)) for a in fn_args))
        if key in seen:
            continue
        seen.add(key)
        try:
            compiled = compile_sm90(fn, fn_args, kwargs)
        except Exception as exc:  # noqa: BLE001 - every failing kernel is reported, then the run fails
            failures += 1
            report(f"FAIL {fn.__name__} {key[1]}: {type(exc).__name__}: {str(exc)[:2000]}")
            continue
        shared = compiled.metadata.shared
        usage = ptxas_usage(compiled.asm["ptx"])
        registers = "?" if usage is None else f"{usage[0]} spills={usage[1]}"
        verdict = "ok"
        if estimated is not None and estimated < shared:
            # The pruner trusts the estimate: too low, and a config that does not fit may be kept.
            verdict = "FAIL: the pruner's shared-memory estimate is below the compiler's"
        elif estimated is None and shared > SM90_SHARED_LIMIT:
            verdict = "FAIL: does not fit"
        elif estimated is not None and estimated > SM90_SHARED_LIMIT:
            verdict = "pruned"  # the autotuner would skip it: nothing to check
        elif usage is not None and usage[1] > 0 and args.spaces == "heuristic":
            # A default (untuned) config that spills registers to local memory is a slow default.
            verdict = "FAIL: the heuristic's config spills registers"
        failures += verdict.startswith("FAIL")
        report(f"{verdict:4s} {fn.__name__} {key[1]} shared={shared} estimate={estimated} registers={registers}")
    report(f"compiled {len(seen)} kernel specializations for sm_90 in {time.perf_counter() - start:.1f}s, "
           f"{failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
