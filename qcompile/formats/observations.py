"""What calibration recorded of one linear's inputs, for the schemes that learn from data.

A scheme says what it needs with its ``calibration`` class attribute; :func:`qcompile.calibrate`
fills the matching fields:

* ``"hessian"`` (GPTQ): ``hessian`` = X^T X over every input row, float32 [K, K];
* ``"activations"`` (AWQ): ``abs_mean`` = mean |x| per input feature over every row, float32 [K], and
  ``sample``, the first SAMPLE_ROWS input rows seen, float32 [rows, K], to measure the output error of
  candidate scalings.
"""

from __future__ import annotations

import dataclasses

import torch

# Input rows AWQ keeps to score its scale candidates (AutoAWQ keeps 128 sequences of up to 512 tokens for a
# whole block; one linear's output error is measured well by a few thousand rows).
SAMPLE_ROWS = 4096


@dataclasses.dataclass
class Observations:
    """One linear's recorded inputs (see the module docstring); fields a scheme does not need stay None."""

    kind: str
    rows: int = 0
    hessian: torch.Tensor | None = None
    abs_sum: torch.Tensor | None = None
    sample: list[torch.Tensor] = dataclasses.field(default_factory=list)

    def add(self, x: torch.Tensor) -> None:
        """Record a batch of inputs ``x`` [..., K]."""
        rows = x.detach().reshape(-1, x.shape[-1]).float()
        self.rows += rows.shape[0]
        if self.kind == "hessian":
            if self.hessian is None:
                self.hessian = rows.t() @ rows
            else:
                self.hessian.addmm_(rows.t(), rows)
            return
        if self.kind != "activations":
            raise ValueError(f"calibration kind {self.kind!r} is not known; allowed: hessian, activations")
        total = rows.abs().sum(0)
        self.abs_sum = total if self.abs_sum is None else self.abs_sum + total
        kept = sum(s.shape[0] for s in self.sample)
        if kept < SAMPLE_ROWS:
            self.sample.append(rows[: SAMPLE_ROWS - kept].clone())

    @property
    def abs_mean(self) -> torch.Tensor:
        if self.abs_sum is None or self.rows == 0:
            raise ValueError("no inputs were recorded")
        return self.abs_sum / self.rows

    @property
    def sample_rows(self) -> torch.Tensor:
        if not self.sample:
            raise ValueError("no inputs were recorded")
        return torch.cat(self.sample)
