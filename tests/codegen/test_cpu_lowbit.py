"""The C++ CPU kernels for 4-bit weights (codegen/cpu_lowbit.cpp): exact decode, fused linear within bounds.

Every instruction-set path is built and run here: this machine's own build, and variants built with the
wider instruction sets switched off (AVX2 + FMA; plain C++), so a machine with AVX-512 tests all three.
"""

from __future__ import annotations

import logging

import pytest
import torch

from qcompile.codegen import cpu_build, cpu_lowbit
from qcompile.formats import scheme_from_dict
from qcompile.ops.linear_4bit import linear_4bit_reference

if not cpu_lowbit.available():
    pytest.skip("no C++ compiler: the CPU kernels cannot be built here", allow_module_level=True)

VARIANT_FLAGS = {
    "native": (),
    "avx2": ("-mno-avx512f",),
    "generic": ("-mno-avx512f", "-mno-avx2", "-mno-fma", "-mno-f16c"),
}


@pytest.fixture(scope="module", params=list(VARIANT_FLAGS))
def library(request):
    lib = cpu_build.build_library("lowbit", VARIANT_FLAGS[request.param])
    assert lib is not None, f"the {request.param} variant did not build"
    lib = cpu_lowbit.declare(lib)
    isa = cpu_lowbit.isa(lib)
    if request.param == "avx2":
        if not torch.backends.cpu.get_cpu_capability().startswith(("AVX2", "AVX512")):
            pytest.skip("this CPU has no AVX2")
        assert isa == "avx2"
    elif request.param == "generic":
        assert isa == "generic"
    return lib


def _packed(n: int, k: int, kind: str = "nf4", blocksize: int = 64, double_quant: bool = True,
            compute_dtype: torch.dtype = torch.bfloat16, seed: int = 0):
    torch.manual_seed(seed)
    weight = torch.randn(n, k) * 0.05
    scheme = scheme_from_dict({"type": kind, "blocksize": blocksize, "double_quant": double_quant,
                               "compute_dtype": str(compute_dtype).removeprefix("torch.")})
    packed = scheme.pack(weight)
    t = packed.tensors()
    return packed, (t["packed"], t["absmax"], t["code"], t["nested_absmax"], t["nested_code"])


DECODE_CASES = [
    # n, k, kind, blocksize, double_quant
    (64, 256, "nf4", 64, True),
    (48, 100, "nf4", 64, True),     # blocks straddle rows
    (17, 33, "fp4", 32, False),     # odd in_features: rows start mid-byte
    (40, 384, "fp4", 128, True),
    (8, 1024, "nf4", 256, False),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: f"{c[0]}x{c[1]}-{c[2]}-b{c[3]}-dq{int(c[4])}")
def test_decode_is_bit_exact(library, case, dtype):
    n, k, kind, blocksize, double_quant = case
    packed, args = _packed(n, k, kind, blocksize, double_quant)
    full = packed.dequantize(dtype)
    out = torch.full((n, k), float("nan"), dtype=dtype)
    assert cpu_lowbit.decode_4bit(*args, packed.nested_offset, blocksize, (n, k), (0, n), (0, k), out,
                                  library) is out
    assert torch.equal(out.view(torch.int16 if dtype != torch.float32 else torch.int32),
                       full.view(torch.int16 if dtype != torch.float32 else torch.int32))
    # A window of rows and columns into a wider buffer (the row stride is the buffer's).
    r0, r1, c0, c1 = 3, n - 2, 1 if k % 2 else 64, k - 1
    buffer = torch.zeros((r1 - r0, k + 5), dtype=dtype)
    window = buffer[:, : c1 - c0]
    assert cpu_lowbit.decode_4bit(*args, packed.nested_offset, blocksize, (n, k), (r0, r1), (c0, c1), window,
                                  library) is window
    assert torch.equal(window, full[r0:r1, c0:c1])
    assert torch.count_nonzero(buffer[:, c1 - c0:]) == 0


LINEAR_CASES = [
    # n, k, leading shape of x, blocksize. M = 0, 1, 3, 17: up to FUSED_MAX_ROWS (8) the fused kernel, above
    # it decode + matmul; odd shapes.
    (96, 256, (1,), 64),
    (130, 192, (3,), 64),      # n not a multiple of the kernel's 4-row step
    (64, 100, (5,), 64),       # in_features not a multiple of the blocksize: the generic fused loop
    (32, 128, (0,), 64),
    (72, 512, (17,), 128),
    (33, 64, (2, 3), 64),      # 3-D x: the op flattens the leading dimensions
    (40, 256, (2,), 32),       # blocksize 32: chunks of 64 straddle blocks
    (24, 64, (8,), 64),
    (24, 64, (9,), 64),
]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("compute_dtype,x_dtype", [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
                                                   (torch.float32, torch.float32), (torch.float16, torch.float16)])
@pytest.mark.parametrize("case", LINEAR_CASES, ids=lambda c: f"{c[0]}x{c[1]}-m{c[2]}-b{c[3]}")
def test_linear_matches_reference(library, case, compute_dtype, x_dtype, bias):
    n, k, lead, blocksize = case
    packed, args = _packed(n, k, blocksize=blocksize, compute_dtype=compute_dtype)
    torch.manual_seed(1)
    x = torch.randn(*lead, k).to(x_dtype)
    b = torch.randn(n) if bias else None
    ref = linear_4bit_reference(x, *args, b, packed.nested_offset, blocksize, n, k, compute_dtype)
    got = cpu_lowbit.linear_4bit(x, *args, b, packed.nested_offset, blocksize, n, k, compute_dtype, library)
    assert got is not None and got.dtype == x_dtype and got.shape == ref.shape
    if x.numel() == 0:
        return
    assert ((got.float() - ref.float()).abs() <= _tolerance(x, packed, ref, compute_dtype)).all()
    assert torch.nn.functional.cosine_similarity(got.float().flatten(), ref.float().flatten(), dim=0) > 0.9999


def _tolerance(x: torch.Tensor, packed, ref: torch.Tensor, compute_dtype: torch.dtype) -> torch.Tensor:
    """What the kernel may differ from the reference by: each weight rounded to the compute dtype at another
    point (the bf16 path rounds the code, not code * absmax: half a unit of each, relative, so one unit of
    sum |x| |w|), one rounding of the result (a unit of |ref|), and float32 sums in another order."""
    eps = torch.finfo(compute_dtype).eps
    magnitude = x.to(compute_dtype).float().abs() @ packed.dequantize(torch.float32).abs().t()
    return eps * magnitude + eps * ref.float().abs() + 1e-5 * magnitude + 1e-6


@pytest.mark.parametrize("bias_dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("kernel", ["4bit", "affine"])
def test_fused_epilogue_rounds_once_to_the_compute_dtype(library, kernel, bias_dtype):
    """The fused kernels' epilogue is torch's: bias rounded to the compute dtype and added in float32, the sum
    rounded once to the compute dtype, then stored in x's dtype (exact comparisons, not bounds)."""
    n, k = 48, 256
    if kernel == "4bit":
        packed, args = _packed(n, k, compute_dtype=torch.bfloat16)

        def run(x, b, compute_dtype):
            return cpu_lowbit.linear_4bit(x, *args, b, packed.nested_offset, 64, n, k, compute_dtype, library)
    else:
        scheme, args = _affine(AFFINE_SPECS[0], n, k, torch.bfloat16)

        def run(x, b, compute_dtype):
            return cpu_lowbit.linear_affine(x, *args, b, scheme.bits, n, k, compute_dtype, library)

    torch.manual_seed(2)
    x16 = torch.randn(3, k, dtype=torch.bfloat16)
    bias = torch.randn(n, dtype=torch.float64).to(bias_dtype) * 4
    y16, y32 = run(x16, bias, torch.bfloat16), run(x16.float(), bias, torch.bfloat16)
    assert y16.dtype == torch.bfloat16 and y32.dtype == torch.float32
    assert torch.equal(y32, y16.float())  # rounded to bfloat16 once, whatever x's dtype
    no_bias = run(x16.float(), None, torch.float32)
    with_bias = run(x16.float(), bias, torch.float32)
    assert torch.equal(with_bias, no_bias + bias.float())  # float32 compute: one float32 addition
    assert not torch.equal(with_bias, no_bias)


def test_a_bias_the_kernels_cannot_read_goes_to_the_reference(library):
    """A bias on another device or not contiguous is not handed to the C++ kernels by pointer (None: the caller
    runs the torch reference, which raises torch's own error for a device mismatch)."""
    n, k = 48, 256
    packed, args = _packed(n, k)
    x = torch.randn(1, k, dtype=torch.bfloat16)
    strided = torch.randn(2 * n, dtype=torch.bfloat16)[::2]
    meta = torch.empty(n, dtype=torch.bfloat16, device="meta")
    for bias in (strided, meta):
        assert cpu_lowbit.linear_4bit(x, *args, bias, packed.nested_offset, 64, n, k, torch.bfloat16, library) is None
    scheme, affine_args = _affine(AFFINE_SPECS[0], n, k, torch.bfloat16)
    assert cpu_lowbit.linear_affine(x, *affine_args, meta, scheme.bits, n, k, torch.bfloat16, library) is None


def test_linear_bound_catches_a_wrong_weight(library):
    """The bound above is tight enough to see 16 wrong codes in a row of 256."""
    n, k = 64, 256
    packed, args = _packed(n, k)
    x = torch.randn(1, k, dtype=torch.bfloat16)
    ref = linear_4bit_reference(x, *args, None, packed.nested_offset, 64, n, k, torch.bfloat16)
    corrupted = args[0].clone()
    corrupted.view(n, k // 2)[:, 40:48] ^= 0x88  # the sign bit of both codes of 8 bytes
    got = cpu_lowbit.linear_4bit(x, corrupted, *args[1:], None, packed.nested_offset, 64, n, k, torch.bfloat16,
                                 library)
    assert not ((got.float() - ref.float()).abs() <= _tolerance(x, packed, ref, torch.bfloat16)).all()


def test_op_auto_runs_the_cpu_kernel(monkeypatch):
    calls = []
    original = cpu_lowbit.linear_4bit

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(cpu_lowbit, "linear_4bit", counted)
    n, k = 64, 128
    packed, args = _packed(n, k)
    x = torch.randn(3, k, dtype=torch.bfloat16)
    op_args = (x, *args, None, packed.nested_offset, 64, n, k, torch.bfloat16)
    auto = torch.ops.qcompile.linear_4bit(*op_args, "auto")
    assert calls == [x.shape]
    reference = torch.ops.qcompile.linear_4bit(*op_args, "reference")
    assert calls == [x.shape]  # "reference" does not reach it
    assert ((auto.float() - reference.float()).abs() <= _tolerance(x, packed, reference, torch.bfloat16)).all()


def test_op_falls_back_to_the_reference_without_the_library(monkeypatch):
    monkeypatch.setattr(cpu_lowbit, "_library", lambda: None)
    n, k = 64, 128
    packed, args = _packed(n, k, compute_dtype=torch.float32)
    x = torch.randn(3, k)
    op_args = (x, *args, None, packed.nested_offset, 64, n, k, torch.float32)
    assert torch.equal(torch.ops.qcompile.linear_4bit(*op_args, "auto"),
                       torch.ops.qcompile.linear_4bit(*op_args, "reference"))


def test_no_compiler_is_logged_not_raised(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("CXX", "")
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("QCOMPILE_CACHE_DIR", str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="qcompile.codegen.cpu_build"):
        assert cpu_build.build_library("lowbit") is None
    assert "no C++ compiler" in caplog.text


def test_a_failing_build_is_logged_not_raised(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("QCOMPILE_CACHE_DIR", str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="qcompile.codegen.cpu_build"):
        assert cpu_build.build_library("lowbit", ("-DQC_NO_SUCH_FLAG", "-fno-such-option-exists")) is None
    assert "could not build" in caplog.text


AFFINE_SPECS = [
    {"type": "affine", "bits": 4, "group_size": 128},
    {"type": "affine", "bits": 3, "group_size": 64},
    {"type": "affine", "bits": 2, "group_size": 32, "sym": True},
    {"type": "affine", "bits": 8, "group_size": -1},
    {"type": "hqq", "bits": 4, "group_size": 64},  # float16 zeros
]


def _affine(spec: dict, n: int, k: int, compute_dtype: torch.dtype, act_order: bool = False, awq: bool = False):
    torch.manual_seed(0)
    scheme = scheme_from_dict({**spec, "compute_dtype": str(compute_dtype).removeprefix("torch.")})
    packed = scheme.pack(torch.randn(n, k) * 0.05)
    t = dict(packed.tensors())
    if act_order:  # GPTQ's desc_act: input features visit the groups in any order
        t["g_idx"] = t["g_idx"][torch.randperm(k)].contiguous()
    if awq:
        t["input_scale"] = (torch.rand(k) + 0.5).contiguous()
    return scheme, (t["qweight"], t["qzeros"], t["zeros"], t["scales"], t["g_idx"], t["input_scale"])


@pytest.mark.parametrize("variant", ["plain", "act_order", "awq"])
@pytest.mark.parametrize("compute_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("spec", AFFINE_SPECS, ids=lambda s: f"{s['type']}{s['bits']}g{s['group_size']}")
def test_affine_linear_matches_reference(library, spec, compute_dtype, variant):
    from qcompile.formats.packed_affine import decode_affine
    from qcompile.ops.linear_affine import linear_affine_reference

    # 80: a last tile of 16 output features that is partly empty (3 bits pack zeros in runs of 32 features)
    n, k = (96 if spec["bits"] == 3 else 80), 256
    scheme, args = _affine(spec, n, k, compute_dtype, variant == "act_order", variant == "awq")
    weight = decode_affine(*args[:5], scheme.bits, n, dtype=torch.float32, input_scale=args[5])
    for lead in ((0,), (1,), (3,), (2, 5), (17,), (40,)):  # 17, 40: above the fused rows, decode + matmul
        x = torch.randn(*lead, k).to(compute_dtype)
        bias = torch.randn(n)
        ref = linear_affine_reference(x, *args, bias, scheme.bits, n, k, compute_dtype)
        got = cpu_lowbit.linear_affine(x, *args, bias, scheme.bits, n, k, compute_dtype, library)
        assert got is not None and got.shape == ref.shape and got.dtype == x.dtype
        eps = torch.finfo(compute_dtype).eps
        magnitude = x.float().abs() @ weight.abs().t()
        tolerance = eps * magnitude + eps * ref.float().abs() + 1e-5 * magnitude + 1e-6
        assert ((got.float() - ref.float()).abs() <= tolerance).all()


@pytest.mark.parametrize("variant", ["plain", "act_order", "awq"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("spec", AFFINE_SPECS, ids=lambda s: f"{s['type']}{s['bits']}g{s['group_size']}")
def test_affine_decode_is_bit_exact(library, spec, dtype, variant):
    from qcompile.formats.packed_affine import decode_affine

    n, k = (96 if spec["bits"] == 3 else 80), 256
    scheme, args = _affine(spec, n, k, dtype, variant == "act_order", variant == "awq")
    expected = decode_affine(*args[:5], scheme.bits, n, dtype=dtype, input_scale=args[5]).t()  # [k, n]
    qweight, qzeros, zeros, scales, g_idx, input_scale = args
    lib = cpu_lowbit.declare(library)
    buffer = torch.zeros((k, 40), dtype=dtype)  # a window of 24 features into a wider buffer
    window = buffer[:, :24]
    status = lib.qc_affine_decode(qweight.data_ptr(), cpu_lowbit._ptr(qzeros), cpu_lowbit._ptr(zeros),
                                  scales.data_ptr(), g_idx.data_ptr(),
                                  cpu_lowbit._ptr(None if input_scale is None else input_scale.float()),
                                  scheme.bits, scales.shape[0], n, k, 16, 40, window.data_ptr(), buffer.stride(0),
                                  cpu_lowbit._DTYPE_CODES[dtype], 2)
    assert status == 0
    assert torch.equal(window, expected[:, 16:40])
    assert torch.count_nonzero(buffer[:, 24:]) == 0


def test_affine_op_auto_runs_the_cpu_kernel(monkeypatch):
    calls = []
    original = cpu_lowbit.linear_affine
    monkeypatch.setattr(cpu_lowbit, "linear_affine", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    scheme, args = _affine(AFFINE_SPECS[0], 32, 128, torch.float32)
    x = torch.randn(2, 128)
    auto = torch.ops.qcompile.linear_affine(x, *args, None, scheme.bits, 32, 128, torch.float32, "auto")
    reference = torch.ops.qcompile.linear_affine(x, *args, None, scheme.bits, 32, 128, torch.float32, "reference")
    assert calls == [1]
    assert torch.allclose(auto, reference, rtol=1e-5, atol=1e-5)
