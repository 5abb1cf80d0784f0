"""The timing helpers the benchmarks share (benchmarks/timing.py)."""

from __future__ import annotations

import time

import torch

from benchmarks.timing import cudagraph_seconds, host_seconds


def test_host_seconds_is_the_time_of_one_call():
    calls = []

    def fn():
        calls.append(1)
        time.sleep(0.002)

    seconds = host_seconds(fn, torch.device("cpu"), calls=5)
    assert len(calls) == 6  # one untimed call first, then the timed ones
    assert 0.002 <= seconds < 0.05


def test_cudagraph_seconds_reports_why_a_capture_failed():
    if torch.cuda.is_available():
        assert isinstance(cudagraph_seconds(lambda: torch.ones(8, device="cuda") * 2), float)
        return
    why = cudagraph_seconds(lambda: torch.ones(8) * 2)  # no CUDA: nothing to capture
    assert isinstance(why, str) and why
