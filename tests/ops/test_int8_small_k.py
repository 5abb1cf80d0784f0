"""The int8 linears at tiny in_features (K = 1, 2, 3, ...) and with all-zero rows and columns.

Every result is checked against a float64 computation written here: the dequantized weight
(``weight * scale``) times x, plus the bias. The activation quantization of LLM.int8() and W8A8 is
bounded, not replayed: per element at most half a quantization step of its row (row absmax / 127
for LLM.int8(), whose activations are the float16 copy of x; (max - min) / 255 for W8A8), plus a
few roundings of the output dtype. Where the math is exact (an all-zero row of x, an all-zero row
of the weight) the result must be exactly the bias (or 0).

The first version of this test caught CPU ``torch._int_mm`` returning uninitialised memory for
K == 1 (-108023 where 0.87 was due, different on every call).
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import qcompile.ops  # noqa: F401  (registers torch.ops.qcompile.*)

OPS = ("int8_t0", "int8_t6", "int8_weight_only", "w8a8_dynamic")
KERNELS = [
    "reference",
    pytest.param("triton", marks=pytest.mark.skipif(
        not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
        reason="Triton kernels need CUDA or TRITON_INTERPRET=1")),
]
THRESHOLD = {"int8_t0": 0.0, "int8_t6": 6.0}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclasses.dataclass(frozen=True)
class Case:
    m: int
    k: int
    n: int
    dtype: torch.dtype = torch.float32
    seed: int = 0
    zero_x_rows: frozenset[int] = frozenset()
    zero_x_cols: frozenset[int] = frozenset()
    zero_w_rows: frozenset[int] = frozenset()
    zero_w_cols: frozenset[int] = frozenset()
    outlier_cols: frozenset[int] = frozenset()
    bias: bool = False

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(x [m, k] in dtype, weight int8 [n, k], scale fp32 [n] (W = weight * scale), bias or None)."""
        gen = torch.Generator().manual_seed(self.seed)
        x = torch.randn(self.m, self.k, generator=gen)
        for col in self.outlier_cols:
            x[:, col] *= 12.0  # mostly beyond LLM.int8()'s threshold of 6
        weight = torch.randint(-127, 128, (self.n, self.k), generator=gen, dtype=torch.int8)
        scale = torch.rand(self.n, generator=gen) * 0.02 + 0.001
        bias = torch.randn(self.n, generator=gen).to(self.dtype) if self.bias else None
        for rows, cols, t in ((self.zero_x_rows, self.zero_x_cols, x), (self.zero_w_rows, self.zero_w_cols, weight)):
            t[sorted(rows), :] = 0
            t[:, sorted(cols)] = 0
        return x.to(self.dtype), weight, scale, bias


@st.composite
def cases(draw: st.DrawFn) -> Case:
    m, k, n = draw(st.integers(1, 5)), draw(st.integers(1, 9)), draw(st.integers(1, 9))

    def subset(size: int) -> frozenset[int]:
        return frozenset(draw(st.sets(st.integers(0, size - 1), max_size=size)))

    return Case(m, k, n, draw(st.sampled_from(DTYPES)), draw(st.integers(0, 2**31 - 1)),
                subset(m), subset(k), subset(n), subset(k), subset(k), draw(st.booleans()))


def run_op(op: str, kernels: str, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
           bias: torch.Tensor | None) -> torch.Tensor:
    """The op on CPU tensors (the Triton kernels on CUDA when there is a GPU); the result on CPU."""
    device = "cuda" if kernels == "triton" and torch.cuda.is_available() else "cpu"
    x, weight, scale = x.to(device), weight.to(device), scale.to(device)
    bias = None if bias is None else bias.to(device)
    ops = torch.ops.qcompile
    if op in THRESHOLD:
        # LLM.int8()'s weight_scale is bitsandbytes' SCB, the row absmax: W = weight * SCB / 127.
        return ops.linear_int8(x, weight, scale * 127.0, bias, THRESHOLD[op], kernels).cpu()
    return getattr(ops, f"linear_{op}")(x, weight, scale, bias, kernels).cpu()


def activation_error(op: str, x: torch.Tensor) -> torch.Tensor:
    """Per-element bound (float64 [m, k]) on |x - the activation the op multiplies with|."""
    x64 = x.double()
    if op == "int8_weight_only":
        return torch.zeros_like(x64)
    if op == "w8a8_dynamic":
        xf = x.float()
        lo = xf.amin(dim=1).clamp(max=0)
        hi = xf.amax(dim=1).clamp(min=0)
        step = ((hi - lo) / 255).clamp(min=torch.finfo(torch.float32).eps).double()
        return (step * (0.5 + 1e-4))[:, None].expand_as(x64)
    # LLM.int8(): x goes to float16 first; outliers (|x16| >= threshold) take whole columns to the
    # 16-bit path, out of the int8 part; the row absmax is over the other elements.
    x16 = x.to(torch.float16)
    threshold = THRESHOLD[op]
    outlier = x16.abs() >= threshold if threshold > 0 else torch.zeros_like(x16, dtype=torch.bool)
    row_absmax = x16.double().abs().masked_fill(outlier, 0).amax(dim=1)
    quantized = (row_absmax / 127 * (0.5 + 1e-4))[:, None] + (x64 - x16.double()).abs()
    return torch.where(outlier.any(dim=0)[None, :], 0.0, quantized)


def check(op: str, y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
          bias: torch.Tensor | None) -> None:
    m, n = x.shape[0], weight.shape[0]
    assert y.shape == (m, n) and y.dtype == x.dtype
    w64 = weight.double() * scale.double()[:, None]
    b64 = torch.zeros(n, dtype=torch.float64) if bias is None else bias.double()
    expected = x.double() @ w64.T + b64
    # Output roundings: the int8 part, the 16-bit outlier part (in x.dtype for the reference), the
    # dequantized weight in x.dtype, the bias add, the cast: a few units of roundoff of x.dtype per
    # term of the sum, plus the smallest normal for results near 0 in float16.
    unit = torch.finfo(x.dtype).eps / 2
    magnitude = x.double().abs() @ w64.abs().T + b64.abs()
    bound = activation_error(op, x) @ w64.abs().T + (x.shape[1] + 4) * unit * magnitude + torch.finfo(x.dtype).tiny
    err = (y.double() - expected).abs()
    worst = (err - bound).argmax()
    assert (err <= bound).all(), (
        f"{op}: |y - expected| = {err.flatten()[worst]:.3g} > bound {bound.flatten()[worst]:.3g} at "
        f"{divmod(int(worst), n)}; y={y.flatten()[worst].item()}, expected={expected.flatten()[worst].item()}"
    )
    # Exact: an all-zero row of x, or of the weight, contributes exactly nothing.
    exact = b64.to(x.dtype).expand(m, n)
    zero_x = (x == 0).all(dim=1)
    zero_w = (weight == 0).all(dim=1)
    assert torch.equal(y[zero_x], exact[zero_x]), f"{op}: all-zero rows of x do not give exactly the bias"
    assert torch.equal(y[:, zero_w], exact[:, zero_w]), f"{op}: all-zero weight rows do not give exactly the bias"


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("op", OPS)
@settings(max_examples=50, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(case=cases())
@example(case=Case(m=3, k=1, n=4, seed=1))  # the _int_mm K == 1 case
@example(case=Case(m=1, k=1, n=9, seed=2, bias=True))
@example(case=Case(m=2, k=2, n=3, seed=3, dtype=torch.float16, outlier_cols=frozenset({1})))
@example(case=Case(m=5, k=3, n=2, seed=4, dtype=torch.bfloat16, zero_x_rows=frozenset({0, 4}),
                   zero_w_rows=frozenset({1}), zero_x_cols=frozenset({2}), bias=True))
@example(case=Case(m=4, k=1, n=5, seed=5, zero_w_cols=frozenset({0})))  # an all-zero weight
def test_small_shapes_match_float64(op, kernels, case):
    x, weight, scale, bias = case.tensors()
    y = run_op(op, kernels, x, weight, scale, bias)
    check(op, y, x, weight, scale, bias)


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("k", [1, 2, 3])
def test_tiny_k_is_stable_across_calls_and_row_counts(op, kernels, k):
    """K = 1..3 at M = 65, past the split-K GEMM of the Triton path: the same rows give the same
    results on every call, and alone (M = 1) as within the batch."""
    case = Case(m=65, k=k, n=7, seed=10 + k, zero_x_rows=frozenset({3}), zero_w_rows=frozenset({5}), bias=True,
                outlier_cols=frozenset({0}))
    x, weight, scale, bias = case.tensors()
    first = run_op(op, kernels, x, weight, scale, bias)
    check(op, first, x, weight, scale, bias)
    assert torch.equal(run_op(op, kernels, x, weight, scale, bias), first)
    if op != "int8_t6":  # LLM.int8()'s outlier columns depend on the other rows
        for row in (0, 3, 64):
            alone = run_op(op, kernels, x[row : row + 1], weight, scale, bias)
            torch.testing.assert_close(alone, first[row : row + 1], rtol=1e-6, atol=1e-6)
