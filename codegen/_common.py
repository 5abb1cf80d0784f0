"""Input validation and small shared pieces of the qcompile.codegen entry points (no kernels here)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from qcompile.codegen.autotune import interpreting
from qcompile.codegen.autotune import mode_setting as autotune_mode_setting

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Offsets inside the kernels are int32: the flat weight index n * K + k must fit.
MAX_INT32 = 2**31 - 1
MAX_ROW = 65536  # the activation quantization kernels keep a whole row in registers


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def tl_dtype(dtype: torch.dtype) -> Any:
    import triton.language as tl

    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}[dtype]


def check_runnable(fn: str, kernel: Any, *tensors: torch.Tensor | None) -> torch.device:
    """The common device of ``tensors``; ValueError when the kernels cannot run there.

    CUDA tensors run compiled kernels. CPU tensors need the Triton interpreter, and triton decides
    that when a kernel is decorated, so TRITON_INTERPRET=1 must be set before this package is imported.
    """
    present = [t for t in tensors if t is not None]
    devices = {t.device for t in present}
    if len(devices) != 1:
        raise ValueError(f"{fn}: all tensors must be on one device, got {sorted(str(d) for d in devices)}")
    device = devices.pop()
    if device.type == "cuda":
        if _is_interpreted(kernel):
            raise ValueError(
                f"{fn}: got CUDA tensors but the kernels were built for the Triton interpreter "
                "(TRITON_INTERPRET=1 was set when qcompile.codegen was imported)"
            )
        return device
    if device.type == "cpu":
        if not interpreting() or not _is_interpreted(kernel):
            raise ValueError(
                f"{fn}: CPU tensors run only under the Triton interpreter; set TRITON_INTERPRET=1 "
                "before qcompile.codegen is imported, or use the reference implementation"
            )
        return device
    raise ValueError(f"{fn}: device {device} is not supported; allowed: cuda, or cpu under TRITON_INTERPRET=1")


def _is_interpreted(kernel: Any) -> bool:
    return type(kernel).__name__ == "InterpretedFunction"


def check_dtype(fn: str, name: str, tensor: torch.Tensor, allowed: tuple[torch.dtype, ...]) -> None:
    if tensor.dtype not in allowed:
        names = ", ".join(dtype_name(d) for d in allowed)
        raise ValueError(f"{fn}: {name} has dtype {dtype_name(tensor.dtype)}; allowed: {names}")


def check_numel(fn: str, name: str, tensor: torch.Tensor, expected: int, at_least: bool = False) -> None:
    ok = tensor.numel() >= expected if at_least else tensor.numel() == expected
    if not ok:
        what = f"at least {expected}" if at_least else f"{expected}"
        raise ValueError(f"{fn}: {name} has {tensor.numel()} elements, expected {what}")


def flat(tensor: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``tensor`` as a 1-D contiguous tensor (converted to ``dtype`` if given): ``tensor`` itself when it already
    is one, which costs three attribute reads where ``reshape(-1).to(dtype).contiguous()`` costs three calls."""
    if tensor.dim() == 1 and (dtype is None or tensor.dtype == dtype) and tensor.is_contiguous():
        return tensor
    tensor = tensor.reshape(-1)
    return (tensor if dtype is None else tensor.to(dtype)).contiguous()


def as_2d_input(fn: str, x: torch.Tensor, in_features: int) -> torch.Tensor:
    """x (..., K) as a (M, K) tensor with unit stride along K (copied only if needed)."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{fn}: x must be a tensor, got {type(x).__name__}")
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(f"{fn}: x has shape {tuple(x.shape)}, expected (..., {in_features})")
    x2 = x.reshape(-1, in_features)
    if x2.stride(-1) != 1 or (x2.shape[0] > 1 and x2.stride(0) < in_features):
        x2 = x2.contiguous()
    return x2


def check_bias(fn: str, bias: torch.Tensor | None, out_features: int) -> torch.Tensor | None:
    if bias is None:
        return None
    if bias.dim() != 1 or bias.shape[0] != out_features:
        raise ValueError(f"{fn}: bias has shape {tuple(bias.shape)}, expected ({out_features},)")
    check_dtype(fn, "bias", bias, FLOAT_DTYPES)
    return bias.contiguous()


def check_index_range(fn: str, out_features: int, in_features: int, m: int) -> None:
    if out_features * in_features > MAX_INT32 or m * max(in_features, out_features) > MAX_INT32:
        raise ValueError(
            f"{fn}: shape M={m}, N={out_features}, K={in_features} exceeds the int32 offsets these kernels use"
        )


def check_int8_linear(
    fn: str, kernel: Any, x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Checked operands of the int8-weight linears: (x as (M, K), weight int8 (N, K) contiguous,
    weight_scale fp32 (N,) contiguous, bias (N,) contiguous or None)."""
    check_runnable(fn, kernel, x, weight, weight_scale, bias)
    check_dtype(fn, "x", x, FLOAT_DTYPES)
    check_dtype(fn, "weight", weight, (torch.int8,))
    if weight.dim() != 2:
        raise ValueError(f"{fn}: weight has shape {tuple(weight.shape)}, expected (out_features, in_features)")
    n, k = weight.shape
    x2 = as_2d_input(fn, x, k)
    check_index_range(fn, n, k, x2.shape[0])
    weight = weight.contiguous()
    check_dtype(fn, "weight_scale", weight_scale, FLOAT_DTYPES)
    weight_scale = flat(weight_scale, torch.float32)
    check_numel(fn, "weight_scale", weight_scale, n)
    return x2, weight, weight_scale, check_bias(fn, bias, n)


def row_launch(fn: str, k: int) -> tuple[int, int]:
    """(BLOCK_K, num_warps) of a one-program-per-row kernel over rows of k elements held in registers."""
    if k > MAX_ROW:
        raise ValueError(f"{fn}: in_features {k} exceeds {MAX_ROW}, the longest row the quantization kernel holds")
    block_k = next_power_of_2(k)
    return block_k, 1 if interpreting() else min(16, max(1, block_k // 512))


def grouped_grid(m: int, n: int) -> Callable[[dict[str, Any]], tuple[int, ...]]:
    """Launch grid of the kernels using _tl_utils.grouped_tile: one program per output tile."""
    def grid(meta: dict[str, Any]) -> tuple[int, ...]:
        return (-(-m // meta["BLOCK_M"]) * -(-n // meta["BLOCK_N"]),)  # not triton.cdiv: ~2 us each on the host

    return grid


def dot_precision(compute_dtype: torch.dtype, interpret: bool) -> str:
    # fp32 compute uses IEEE dots, not TF32; the interpreter computes IEEE anyway.
    return "ieee" if compute_dtype == torch.float32 or interpret else "tf32"


def next_power_of_2(n: int) -> int:
    n = max(int(n), 1)
    return 1 << (n - 1).bit_length()


def split_k_for(programs: int, k: int, block_k: int, device: torch.device, most: int = 16, per_sm: int = 2) -> int:
    """SPLIT_K (a power of two, at most ``most``) that brings ``programs`` output tiles to about
    ``per_sm`` programs per SM, keeping at least one BLOCK_K step per split."""
    target = per_sm * sm_count(device)
    split = 1
    while programs * split < target and split < most and (split * 2) * block_k <= k:
        split *= 2
    return split


# Up to this M the tiled GEMMs run their split-K variant: M / BLOCK_M x N / BLOCK_N tiles alone are too
# few programs to keep every SM reading the weight (64 for an 8B layer at N=4096, BLOCK_N=64).
SPLIT_K_MAX_M = 64
SPLITS = (1, 2, 4, 8)


def split_k_spaces(spaces: dict[str, list]) -> dict[str, list]:
    """The small-M variant's spaces: the configs of ``spaces`` with BLOCK_M <= SPLIT_K_MAX_M, once per SPLIT_K."""
    from qcompile.codegen.autotune import config

    return {
        mode: [config(num_warps=c.num_warps, num_stages=c.num_stages, **c.kwargs, SPLIT_K=split)
               for c in configs if c.kwargs["BLOCK_M"] <= SPLIT_K_MAX_M for split in SPLITS]
        for mode, configs in spaces.items()
    }


def split_k_heuristic(heuristic: Callable[[dict[str, Any]], Any]) -> Callable[[dict[str, Any]], Any]:
    """``heuristic``'s tile plus the SPLIT_K that brings the tiles to about two programs per SM."""
    import triton

    from qcompile.codegen.autotune import config

    def choose(named: dict[str, Any]) -> Any:
        tile = heuristic(named)
        kw = tile.kwargs
        programs = triton.cdiv(named["M"], kw["BLOCK_M"]) * triton.cdiv(named["N"], kw["BLOCK_N"])
        device = next(v.device for v in named.values() if isinstance(v, torch.Tensor))
        split = split_k_for(programs, named["K"], kw["BLOCK_K"], device, most=SPLITS[-1])
        return config(num_warps=tile.num_warps, num_stages=tile.num_stages, **kw, SPLIT_K=split)

    return choose


def split_k_interpreter_config(named: dict[str, Any]) -> Any:
    # SPLIT_K=2 so CI runs the atomic epilogue.
    from qcompile.codegen.autotune import config

    return config(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, SPLIT_K=2, num_warps=4, num_stages=1)


def split_k_grid(m: int, n: int) -> Callable[[dict[str, Any]], tuple[int, ...]]:
    """Launch grid of a split-K GEMM: grouped output tiles x SPLIT_K."""
    tiles = grouped_grid(m, n)
    return lambda meta: (tiles(meta)[0], meta["SPLIT_K"])


def launch_gemm(tuned: Any, tuned_split: Any, make_args: Callable[[torch.Tensor], tuple], m: int, n: int,
                x: torch.Tensor, config: Any = None, plan_key: tuple | None = None, **constexprs: Any) -> torch.Tensor:
    """Run a tiled GEMM kernel for M rows; returns y [m, n] in x.dtype.

    M <= SPLIT_K_MAX_M: ``tuned_split`` (the same kernel with split-K configs) into a zeroed fp32 y,
    then cast; otherwise ``tuned`` with SPLIT_K=1 straight into y. ``make_args(y)`` builds the
    kernel arguments; a forced ``config`` without SPLIT_K means SPLIT_K=1.

    ``plan_key``: what else, beside M, N, x's dtype and device and the constexprs, determines the launch (K and
    the dtypes of the caller's other operands); with it, and no forced config, the launch is decided once per
    signature and kept in the kernel's ``plans`` (``autotune.py``, step 5).
    """
    split = m <= SPLIT_K_MAX_M
    kernel = tuned_split if split else tuned
    signature = None
    if config is None and plan_key is not None:
        signature = (autotune_mode_setting(), m, n, x.dtype, x.device, *plan_key, *constexprs.items())
        planned = kernel.plans.get(signature)
        if planned is not None:
            y = torch.zeros((m, n), device=x.device, dtype=torch.float32) if split else \
                torch.empty((m, n), device=x.device, dtype=x.dtype)
            planned(make_args(y))
            return y.to(x.dtype) if split else y
    if config is not None and "SPLIT_K" not in config.kwargs:
        constexprs["SPLIT_K"] = 1
    if split:
        y = torch.zeros((m, n), device=x.device, dtype=torch.float32)
        grid = split_k_grid(m, n)
    else:
        if config is not None and config.kwargs.get("SPLIT_K", 1) != 1:
            raise ValueError(f"config: SPLIT_K={config.kwargs['SPLIT_K']} runs only for M <= {SPLIT_K_MAX_M}, "
                             f"got M={m}")
        y = torch.empty((m, n), device=x.device, dtype=x.dtype)
        grid = grouped_grid(m, n)
        constexprs = {"SPLIT_K": 1, **constexprs}
    used = kernel.launch(grid, make_args(y), m, config=config, **constexprs)
    if signature is not None:
        kernel.remember_plan(signature, kernel.decided(used, grid, constexprs))
    return y.to(x.dtype) if split else y


def sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count
