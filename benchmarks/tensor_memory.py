"""Peak bytes held by CPU tensors over a stretch of a run: the CPU analogue of ``torch.cuda.max_memory_allocated``.

torch keeps no statistics for its CPU allocator, and a process's resident set also counts the
interpreter, imported libraries and a compiler's own working memory. The profiler, with
``profile_memory=True``, records every allocation and free of the CPU allocator (inductor's
generated code allocates through it too) with a wall-clock timestamp; summing them in time order
gives the bytes live at each moment, from the moment tracing started. Start the trace before the
model is built and the sums are absolute.

    with TensorMemoryTrace() as trace:
        model = build()
        trace.mark("first step")
        step()
        trace.mark("train")
        step(); step()
    trace.peaks()  # {"start": ..., "first step": ..., "train": ...} in bytes

Each window's peak is the largest live total from its mark to the next one. Tracing slows every op
call, so time nothing inside a trace. Tensors created by safetensors' loader are recorded when allocated
but not when freed (seen with safetensors 0.8): do not trace loading from safetensors files.
"""

from __future__ import annotations

import time
from typing import Any

import torch


class TensorMemoryTrace:
    """Context manager recording CPU tensor allocations; :meth:`peaks` gives each marked window's peak bytes."""

    def __init__(self) -> None:
        self._marks: list[tuple[int, str]] = []
        self._profile: Any = None
        self._events: list[tuple[int, int]] = []

    def __enter__(self) -> TensorMemoryTrace:
        self._profile = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
        self._profile.__enter__()
        self.mark("start")
        return self

    def mark(self, label: str) -> None:
        """Begin a window called ``label`` (the previous one ends here)."""
        self._marks.append((time.time_ns(), label))

    def __exit__(self, *exc: Any) -> None:
        self._profile.__exit__(*exc)
        results = self._profile.profiler.kineto_results
        self._events = sorted((e.start_ns(), e.nbytes()) for e in results.events() if e.name() == "[memory]")
        self._profile = None

    def peaks(self) -> dict[str, int]:
        """Peak live tensor bytes per window (bytes live before tracing started are not counted)."""
        peaks = {label: 0 for _, label in self._marks}
        live, window = 0, 0
        for stamp, nbytes in self._events:
            while window + 1 < len(self._marks) and stamp >= self._marks[window + 1][0]:
                window += 1
                label = self._marks[window][1]
                peaks[label] = max(peaks[label], live)  # what is live when a window opens counts in it
            live += nbytes
            label = self._marks[window][1]
            peaks[label] = max(peaks[label], live)
        for _, label in self._marks[window + 1:]:  # windows in which nothing was allocated or freed
            peaks[label] = max(peaks[label], live)
        return peaks
