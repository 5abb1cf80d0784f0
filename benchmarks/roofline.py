"""The roofline of the device this run is on, measured in the same run (one job: peaks and bounds).

* copy bandwidth: ``dst.copy_(src)`` of a large buffer, bytes read + bytes written per second;
* bf16 matmul throughput: a large square ``torch.mm`` in bfloat16;
* int8 matmul throughput: a large square ``torch._int_mm`` (int8 x int8 -> int32), when available.

A linear layer's roofline time is ``max(bytes moved / copy bandwidth, FLOPs / matmul peak)``; a
kernel's "% of roofline" is that time divided by its measured time. Measured peaks (not datasheet
numbers) are what a kernel can be held to on this machine, clocks and drivers included.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from benchmarks.timing import median_seconds


@dataclass(frozen=True)
class Peaks:
    copy_gbps: float
    bf16_tflops: float
    int8_tops: float | None
    sizes: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def measure_peaks(device: torch.device, smoke: bool = False) -> Peaks:
    """Peak copy bandwidth and bf16 / int8 matmul throughput on ``device``, measured now."""
    if smoke:
        copy_bytes, mm = 16 * 2**20, 256
    elif device.type == "cuda":
        # 1 GiB per buffer: far beyond L2, so the copy runs from and to HBM.
        copy_bytes, mm = 2**30, 8192
    else:
        copy_bytes, mm = 256 * 2**20, 2048
    copy_s = _copy_seconds(copy_bytes, device)
    bf16_s = _mm_seconds(mm, torch.bfloat16, device)
    int8_tops = None
    try:
        int8_tops = 2 * mm**3 / _mm_seconds(mm, torch.int8, device) / 1e12
    except (RuntimeError, NotImplementedError, AttributeError):
        pass  # no int8 matmul on this device/build: int8 cases fall back to the bf16 peak
    return Peaks(copy_gbps=2 * copy_bytes / copy_s / 1e9, bf16_tflops=2 * mm**3 / bf16_s / 1e12,
                 int8_tops=int8_tops, sizes={"copy_bytes": copy_bytes, "matmul_n": mm})


def _copy_seconds(nbytes: int, device: torch.device) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    return median_seconds(lambda: dst.copy_(src), device, cpu_reps=5)


def _mm_seconds(n: int, dtype: torch.dtype, device: torch.device) -> float:
    if dtype == torch.int8:
        a = torch.randint(-127, 127, (n, n), device=device, dtype=dtype)
        b = torch.randint(-127, 127, (n, n), device=device, dtype=dtype)
        return median_seconds(lambda: torch._int_mm(a, b), device, cpu_reps=5)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return median_seconds(lambda: torch.mm(a, b), device, cpu_reps=5)


def linear_flops(m: int, n: int, k: int) -> int:
    return 2 * m * n * k


def roofline_seconds(bytes_moved: int, flops: int, peaks: Peaks, int8_compute: bool = False) -> dict[str, float]:
    """The memory bound, the compute bound and the roofline (their max) of one kernel call, in seconds."""
    memory_s = bytes_moved / (peaks.copy_gbps * 1e9)
    tops = peaks.int8_tops if int8_compute and peaks.int8_tops else peaks.bf16_tflops
    compute_s = flops / (tops * 1e12)
    return {"memory_s": memory_s, "compute_s": compute_s, "roofline_s": max(memory_s, compute_s),
            "bound": "memory" if memory_s >= compute_s else "compute"}
