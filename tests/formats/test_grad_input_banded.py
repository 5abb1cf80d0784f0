"""The input gradient reads the weight a band at a time: same result as the whole weight, bounded memory.

``PackedWeight.grad_input`` used to dequantize the whole weight to float on every backward call.
It now reads bands of columns (or of rows, where 4-bit blocks straddle rows); these tests pin the
band readers to ``dequantize()`` bit for bit, the banded gradient to the whole-weight formula, and
watch every tensor the gradient creates to show that none is as large as the weight.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from qcompile.formats import FP4, NF4, Int8, Int8WeightOnly, W8A8Dynamic
from qcompile.formats.scheme import MIN_GRAD_BAND

SCHEMES = {
    "nf4-dq-bf16": NF4(double_quant=True, compute_dtype=torch.bfloat16),
    "nf4-fp32": NF4(compute_dtype=torch.float32),
    "fp4-dq-fp16-bs128": FP4(blocksize=128, double_quant=True, compute_dtype=torch.float16),
    "int8": Int8(),
    "int8-weight-only": Int8WeightOnly(),
    "w8a8": W8A8Dynamic(),
}
# (out_features, in_features): in_features a multiple of the blocksize (column bands), not one
# (4-bit blocks straddle rows: row bands), an odd element count (a pad nibble in the last byte),
# and more than 256 blocks so that double quantization has several nested blocks.
SHAPES = [(300, 256), (37, 100), (5, 33), (130, 96), (260, 200)]


def _weight(shape: tuple[int, int], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g)
    w[0, : min(5, shape[1])] = 0.0  # an all-zero stretch: absmax 0 in some schemes
    return w


@functools.cache
def _packed(name: str, shape: tuple[int, int], seed: int = 0):
    """Packed once per test session: the tests below only read it."""
    return SCHEMES[name].pack(_weight(shape, seed))


def _whole_weight_grad(packed, grad: torch.Tensor, x_dtype: torch.dtype) -> torch.Tensor:
    """The gradient as it was computed before banding (and as bitsandbytes' 4-bit backward computes it)."""
    dtype = getattr(packed.scheme, "compute_dtype", None) or x_dtype
    return (grad.to(dtype) @ packed.dequantize(dtype)).to(x_dtype)


def _bands(size: int, step: int = 1) -> list[tuple[int, int]]:
    cuts = sorted({0, size, *range(0, size, max(step, 1) * 3)})
    spans = list(zip(cuts, cuts[1:], strict=False))
    return spans + [(0, size), (0, 0), (size, size)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name", list(SCHEMES))
def test_dequantize_rows_equals_the_rows_of_dequantize(name, shape):
    packed = _packed(name, shape)
    n = shape[0]
    spans = _bands(n) + [(1, 2), (n - 1, n), (3, min(n, 40))]
    for dtype in (torch.float32, torch.bfloat16):
        whole = packed.dequantize(dtype)
        for start, stop in spans:
            rows = packed.dequantize_rows(start, stop, dtype)
            assert rows.shape == (stop - start, shape[1]) and rows.dtype == dtype
            assert torch.equal(rows, whole[start:stop]), (dtype, start, stop)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name", list(SCHEMES))
def test_dequantize_cols_equals_the_columns_of_dequantize(name, shape):
    packed = _packed(name, shape, 1)
    step = packed.column_band_step()
    blocksize = getattr(packed.scheme, "blocksize", None)
    if blocksize is not None and shape[1] % blocksize:
        assert step is None  # blocks straddle rows: no column reads
        with pytest.raises(ValueError, match="straddle rows"):
            packed.dequantize_cols(0, shape[1])
        return
    assert step is not None
    for dtype in (torch.float32, torch.float16):
        whole = packed.dequantize(dtype)
        for start, stop in _bands(shape[1], step):
            cols = packed.dequantize_cols(start, stop, dtype)
            assert cols.shape == (shape[0], stop - start) and cols.dtype == dtype
            assert torch.equal(cols, whole[:, start:stop]), (dtype, start, stop)


def test_band_readers_refuse_bad_spans():
    packed = NF4().pack(_weight((8, 128)))
    for start, stop in ((-1, 2), (3, 2), (0, 9)):
        with pytest.raises(ValueError, match="not within"):
            packed.dequantize_rows(start, stop)
    with pytest.raises(ValueError, match="multiples of 64"):
        packed.dequantize_cols(0, 32)
    with pytest.raises(ValueError, match="not within"):
        packed.dequantize_cols(0, 192)


def _tolerance(packed, x_dtype: torch.dtype, rows: bool, expected: torch.Tensor) -> dict[str, float]:
    dtype = getattr(packed.scheme, "compute_dtype", None) or x_dtype
    scale = max(float(expected.abs().max()), 1.0) if expected.numel() else 1.0
    # float32 sums in another order: BLAS picks its kernel and blocking by shape (MKL on Intel CPUs does, so a
    # column band is not bit-equal to the whole matmul there), hence an absolute part relative to the largest
    # element (cancellation near zero); a bf16 / fp16 result may then round one unit the other way.
    reorder = {"rtol": 1e-5, "atol": 1e-5 * scale}
    if dtype == torch.float32:
        return reorder if x_dtype == torch.float32 else {"rtol": 2**-7, "atol": 1e-5 * scale}
    if not rows:
        return {"rtol": 2**-7, "atol": 1e-5 * scale}  # the same products per column, only split by columns
    # Row bands round each partial product to the compute dtype before the float32 sum, then the sum
    # once more: a few units in the last place of the largest element of a bf16 / fp16 result (bf16 has
    # 8 mantissa bits: 2 ** -6 is 4 units), absolute, since elements near zero come from cancellation.
    return {"rtol": 2**-6, "atol": 2**-6 * scale}


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name", list(SCHEMES))
def test_banded_grad_input_matches_the_whole_weight(name, shape, x_dtype):
    packed = _packed(name, shape, 2)
    n, k = shape
    rows = packed.column_band_step() is None
    band = MIN_GRAD_BAND  # the smallest band: many bands on every shape here except the smallest
    g = torch.Generator().manual_seed(3)
    for lead in ((0,), (1,), (3,), (17,), (2, 3), (2, 0, 5)):
        grad = torch.randn(*lead, n, generator=g).to(x_dtype)
        out = packed.grad_input(grad, x_dtype, band_elements=band)
        expected = _whole_weight_grad(packed, grad, x_dtype)
        assert out.shape == (*lead, k) and out.dtype == x_dtype
        torch.testing.assert_close(out, expected, **_tolerance(packed, x_dtype, rows, expected))


def test_banded_grad_input_takes_several_bands_of_each_kind():
    """The shapes above do exercise both band kinds with more than one band each."""
    cols = SCHEMES["nf4-dq-bf16"].pack(_weight((300, 256)))  # not cached: its methods are patched below
    rows = SCHEMES["nf4-dq-bf16"].pack(_weight((260, 200)))
    assert cols.column_band_step() == 64 and rows.column_band_step() is None
    calls = []
    for packed, method in ((cols, "dequantize_cols"), (rows, "dequantize_rows")):
        original = getattr(packed, method)
        setattr(packed, method, lambda s, e, d=None, _o=original, _m=method: calls.append((_m, s, e)) or _o(s, e, d))
        packed.grad_input(torch.randn(3, packed.shape[0]), torch.float32, band_elements=MIN_GRAD_BAND)
    assert [c[1:] for c in calls if c[0] == "dequantize_cols"] == [(0, 128), (128, 256)]
    assert [c[1:] for c in calls if c[0] == "dequantize_rows"] == [(0, 128), (128, 256), (256, 260)]


def test_a_cast_gradient_is_made_in_bands_even_when_the_weight_fits_one():
    """bf16 compute with fp32 activations (QLoRA): each band's bf16 product is cast into the fp32 result as it
    is made, so the whole bf16 product never sits beside its fp32 copy; in the compute dtype one band does."""
    packed = SCHEMES["nf4-dq-bf16"].pack(_weight((64, 512)))
    calls = []
    original = packed.dequantize_cols
    packed.dequantize_cols = lambda s, e, d=None: calls.append((s, e)) or original(s, e, d)
    grad = torch.randn(3, 64)
    cast = packed.grad_input(grad, torch.float32)
    assert calls == [(0, 128), (128, 256), (256, 384), (384, 512)]
    calls.clear()
    same = packed.grad_input(grad, torch.bfloat16)
    assert calls == []  # one band: the whole (small) weight
    assert cast.dtype == torch.float32 and torch.equal(cast, same.float())


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor (in elements) any op allocates while active.

    Views and ``out=`` results share an input's storage and allocate nothing: they are not counted.
    """

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        storages = {a.untyped_storage().data_ptr() for a in inputs}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in storages:
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("name,shape", [("nf4-dq-bf16", (256, 4096)), ("nf4-dq-bf16", (4096, 250)),
                                        ("int8", (256, 4096)), ("w8a8", (1024, 1024))])
def test_grad_input_never_holds_the_whole_weight(name, shape):
    packed = SCHEMES[name].pack(_weight(shape))
    n, k = shape
    band_elements = 1 << 16  # 1/16 of these weights
    step = packed.column_band_step()
    if step is not None:
        band = n * max(MIN_GRAD_BAND, band_elements // n) // step * step
    else:
        band = max(MIN_GRAD_BAND, band_elements // k) * k + 2 * packed.scheme.blocksize  # + the straddling blocks
    assert band <= n * k // 8
    grad = torch.randn(4, n)
    spy = _LargestTensor()
    with spy:
        packed.grad_input(grad, torch.float32, band_elements=band_elements)
    assert spy.largest <= max(band, grad.numel(), 4 * k)
    with spy:  # the spy does see a whole weight when one is made
        packed.dequantize(torch.float32)
    assert spy.largest == n * k


def test_the_op_backward_reads_bands():
    """The autograd path (quantized_linear's backward) goes through the banded gradient with the
    default band size: a weight larger than a band is never dequantized whole."""
    from qcompile.formats.scheme import GRAD_BAND_ELEMENTS
    from qcompile.ops.quantized_linear import scheme_key
    from qcompile.pack_cache import cached_packed_weights

    scheme = SCHEMES["nf4-dq-bf16"]
    weight = torch.nn.Parameter(_weight((2048, 2048)), requires_grad=False)
    assert weight.numel() >= 4 * GRAD_BAND_ELEMENTS
    x = torch.randn(2, 3, 2048, requires_grad=True)
    out = torch.ops.qcompile.quantized_linear(x, weight, None, scheme_key(scheme), False, "w", "reference")
    grad = torch.randn_like(out)
    spy = _LargestTensor()
    with spy:
        (grad_x,) = torch.autograd.grad(out, x, grad)
    assert spy.largest <= GRAD_BAND_ELEMENTS < weight.numel()
    (packed,) = cached_packed_weights(weight)  # what the op packed
    torch.testing.assert_close(grad_x, _whole_weight_grad(packed, grad, x.dtype), rtol=0, atol=0)
