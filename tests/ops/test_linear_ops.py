"""The qcompile ops: opcheck, agreement with bitsandbytes modules, kernels dispatch.

Tolerances (stated per test):
* linear_4bit vs bitsandbytes Linear4bit (training-mode forward = dequantize to the compute
  dtype + F.linear, the path CUDA and fine-tuning use): identical math, so EXACT in float32;
  rtol=atol=1e-2 relative to the output scale in bf16/fp16, for BLAS reduction order.
  Shapes keep in_features a multiple of the blocksize: bitsandbytes 0.50's CPU dequantize
  kernel is wrong when blocks straddle rows (see tests/formats/test_fourbit_bnb.py).
* linear_int8 vs Linear8bitLt(threshold=6.0, has_fp16_weights=False) in eval mode: the
  same int8 values, exact int32 sums and the same float ops; asserted within 1e-3 relative
  to the output scale (fp16 output), and shown to differ from the threshold-0 result.
"""

import logging

import pytest
import torch
from torch.library import opcheck

import qcompile
from qcompile.formats import FP4, NF4, Int8, Int8WeightOnly, W8A8Dynamic
from qcompile.ops import binding, check_kernels, linear, op_arguments, use_triton
from qcompile.ops.linear_4bit import linear_4bit_reference

bnb = pytest.importorskip("bitsandbytes")
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

SCHEMES = [NF4(), NF4(double_quant=True, compute_dtype=torch.bfloat16), FP4(double_quant=True, blocksize=128),
           Int8(), Int8(threshold=0.0), Int8WeightOnly(), W8A8Dynamic()]


def weight(shape, dtype=torch.float32, seed=0, scale=0.05):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * scale).to(dtype)


def activations(shape, dtype=torch.float32, seed=1, outlier_cols=(3, 17)):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen)
    for col in outlier_cols:
        x[..., col] *= 12.0  # |x| well above the LLM.int8() threshold of 6
    return x.to(dtype)


def call(packed, x, bias=None, kernels="reference"):
    return linear(packed, x, bias, kernels)


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: f"{s.kind}")
@pytest.mark.parametrize("x_shape,with_bias", [((5, 256), False), ((2, 3, 256), True)], ids=["2d", "3d-bias"])
def test_opcheck(scheme, x_shape, with_bias):
    packed = qcompile.pack(weight((48, 256)), scheme)
    x = activations(x_shape).requires_grad_()
    bias = torch.randn(48, requires_grad=True) if with_bias else None
    opcheck(binding(scheme).op, op_arguments(packed, x, bias, "reference"))


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: f"{s.kind}")
def test_grad_flows_to_x_and_bias_only(scheme):
    w = weight((24, 128))
    packed = qcompile.pack(w, scheme)
    x = activations((4, 128), outlier_cols=()).requires_grad_()
    bias = torch.randn(24, requires_grad=True)
    call(packed, x, bias).sum().backward()
    dequantized = packed.dequantize(torch.float32)
    torch.testing.assert_close(x.grad, torch.ones(4, 24) @ dequantized, rtol=1e-2, atol=1e-2)
    assert torch.equal(bias.grad, torch.full((24,), 4.0))
    assert all(not t.requires_grad for t in packed.tensors().values() if t is not None)


@pytest.mark.parametrize("kind", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_linear_4bit_matches_bitsandbytes_linear4bit(kind, double_quant, dtype):
    w = weight((96, 256), dtype, seed=3)
    module = bnb.nn.Linear4bit(256, 96, bias=True, compute_dtype=dtype, compress_statistics=double_quant,
                               quant_type=kind)
    module.weight.data = w.clone()
    module.bias.data = torch.randn(96).to(dtype)
    module = module.to("cpu")  # quantizes; stays in training mode (dequantize + F.linear)
    scheme = (NF4 if kind == "nf4" else FP4)(double_quant=double_quant, compute_dtype=dtype)
    packed = qcompile.pack(w, scheme)
    x = activations((2, 5, 256), dtype)
    with torch.no_grad():
        expected = module(x)
        got = call(packed, x, module.bias.detach())
    assert got.dtype == expected.dtype == dtype and got.shape == (2, 5, 96)
    if dtype == torch.float32:
        assert torch.equal(got, expected)
    else:
        scale = expected.float().abs().max()
        torch.testing.assert_close(got.float(), expected.float(), rtol=1e-2, atol=1e-2 * scale.item())


@pytest.mark.parametrize("x_dtype", [torch.float16, torch.float32, torch.bfloat16], ids=str)
def test_linear_int8_matches_bitsandbytes_linear8bitlt(x_dtype):
    w = weight((64, 128), torch.float16, seed=5)
    module = bnb.nn.Linear8bitLt(128, 64, bias=True, has_fp16_weights=False, threshold=6.0)
    module.weight.data = w.clone()
    module.bias.data = torch.randn(64).to(torch.float16)
    module = module.to("cpu").eval()  # eval: bitsandbytes' LLM.int8() inference path
    packed = qcompile.pack(w, Int8(threshold=6.0))
    x = activations((3, 7, 128), x_dtype)
    with torch.no_grad():
        expected = module(x)
        got = call(packed, x, module.bias.detach())
        plain = call(qcompile.pack(w, Int8(threshold=0.0)), x, module.bias.detach())
    assert got.dtype == x_dtype and got.shape == expected.shape == (3, 7, 64)
    scale = expected.float().abs().max().item()
    torch.testing.assert_close(got.float(), expected.float(), rtol=1e-3, atol=1e-3 * scale)
    # The outlier path matters here: without it the error against fp is over twice as large.
    reference = torch.nn.functional.linear(x.float(), w.float(), module.bias.float())
    assert not torch.equal(plain, got)
    if x_dtype == torch.float32:  # in 16-bit outputs the final rounding dominates both errors
        assert (plain - reference).norm() > 2 * (got - reference).norm()


def test_linear_int8_without_outliers_is_vectorwise_int8():
    w = weight((32, 64), torch.float16, seed=6)
    packed = qcompile.pack(w, Int8(threshold=6.0))
    x = activations((4, 64), torch.float16, outlier_cols=())
    assert torch.equal(call(packed, x), call(qcompile.pack(w, Int8(threshold=0.0)), x))


def test_w8a8_dynamic_accuracy_and_zero_point():
    w = weight((64, 256), seed=8)
    x = activations((6, 256), outlier_cols=()) + 3.0  # strongly asymmetric: the zero point matters
    x[0] = 0  # an all-zero token
    out = call(qcompile.pack(w, W8A8Dynamic()), x)
    reference = torch.nn.functional.linear(x, w)
    assert torch.equal(out[0], torch.zeros(64))
    cosine = torch.nn.functional.cosine_similarity(out[1:].flatten(), reference[1:].flatten(), dim=0)
    assert cosine > 0.9995
    rel = (out - reference).norm() / reference.norm()
    assert rel < 0.02


def test_int8_weight_only_matches_dequantized_linear():
    w = weight((40, 96), seed=9)
    packed = qcompile.pack(w, Int8WeightOnly())
    x = activations((3, 96), torch.bfloat16, outlier_cols=())
    bias = torch.randn(40)
    expected = torch.nn.functional.linear(x, packed.dequantize(torch.bfloat16), bias.to(torch.bfloat16))
    assert torch.equal(call(packed, x, bias), expected)


def test_linear_4bit_reference_is_dequantize_then_linear():
    w = weight((32, 128), torch.bfloat16)
    packed = qcompile.pack(w, NF4(double_quant=True, compute_dtype=torch.float32))
    x = activations((3, 128), torch.bfloat16)
    out = linear_4bit_reference(*op_arguments(packed, x, None, "reference")[:-1])
    expected = torch.nn.functional.linear(x.float(), packed.dequantize(torch.float32)).to(torch.bfloat16)
    assert out.dtype == torch.bfloat16 and torch.equal(out, expected)



@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize(("x_dtype", "compute_dtype"), [(torch.float32, torch.float32),
                                                         (torch.float32, torch.bfloat16),
                                                         (torch.bfloat16, torch.bfloat16)], ids=str)
def test_linear_4bit_reference_in_row_bands_equals_whole_weight(monkeypatch, double_quant, x_dtype, compute_dtype):
    import qcompile.ops.linear_4bit as linear_4bit_module

    w = weight((300, 128), seed=4)  # bands of MIN_BAND_ROWS=128 rows: 128, 128 and a ragged 44
    packed = qcompile.pack(w, NF4(double_quant=double_quant, compute_dtype=compute_dtype))
    x = activations((2, 3, 128), x_dtype)
    bias = torch.randn(300)
    bands = []
    real_linear = linear_4bit_module.F.linear
    monkeypatch.setattr(linear_4bit_module.F, "linear",
                        lambda x, w, b=None: bands.append(w.shape) or real_linear(x, w, b))
    out = linear_4bit_reference(*op_arguments(packed, x, bias, "reference")[:-1], chunk_weights=1)
    assert bands == [(128, 128), (128, 128), (44, 128)]
    expected = torch.nn.functional.linear(x.to(compute_dtype), packed.dequantize(compute_dtype),
                                          bias.to(compute_dtype)).to(x_dtype)
    assert out.dtype == x_dtype and out.shape == (2, 3, 300)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


def test_linear_4bit_reference_blocks_straddling_rows_decode_whole_weight():
    w = weight((200, 96), seed=6)  # 96 % 64 != 0: a block spans two rows, no row bands
    packed = qcompile.pack(w, NF4(double_quant=True))
    x = activations((4, 96))
    out = linear_4bit_reference(*op_arguments(packed, x, None, "reference")[:-1], chunk_weights=1)
    assert torch.equal(out, torch.nn.functional.linear(x, packed.dequantize(torch.float32)))


# ---- kernels argument ------------------------------------------------------------

@pytest.mark.parametrize("scheme", SCHEMES[:1] + SCHEMES[3:4] + SCHEMES[5:], ids=lambda s: s.kind)
def test_bad_kernels_value_names_kernels(scheme):
    packed = qcompile.pack(weight((8, 64)), scheme)
    with pytest.raises(ValueError, match="kernels.*'cuda'.*auto, reference, triton"):
        call(packed, torch.randn(2, 64), kernels="cuda")


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    packed = qcompile.pack(weight((8, 64)), NF4())
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="kernels.*TRITON_INTERPRET=1"):
        call(packed, torch.randn(2, 64), kernels="triton")
    x = torch.randn(2, 64)
    assert use_triton("auto", x) is False and use_triton("reference", x) is False
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert use_triton("triton", x) is True
    assert check_kernels("auto") == "auto"


def test_triton_dispatch_calls_codegen_function(monkeypatch):
    # The op hands exactly its arguments, minus `kernels`, to qcompile.codegen.<module>.<op>.
    import qcompile.ops.linear_int8 as op_module

    seen = {}

    def fake_kernel(*args):
        seen["args"] = args
        return torch.zeros(args[0].shape[0], args[1].shape[0])

    monkeypatch.setattr(op_module, "codegen_function", lambda module, fn: seen.update(name=(module, fn)) or fake_kernel)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    packed = qcompile.pack(weight((8, 64)), Int8())
    call(packed, torch.randn(2, 64), kernels="triton")
    assert seen["name"] == ("llm_int8", "linear_int8")
    assert len(seen["args"]) == 5 and seen["args"][4] == 6.0


def test_in_features_mismatch_is_a_value_error():
    packed = qcompile.pack(weight((8, 64)), NF4())
    with pytest.raises(ValueError, match="in_features"):
        call(packed, torch.randn(2, 32))


def test_each_scheme_is_bound_to_its_op():
    assert binding(NF4()).op is torch.ops.qcompile.linear_4bit.default
    assert binding(FP4()).op is torch.ops.qcompile.linear_4bit.default
    assert binding(Int8()).op is torch.ops.qcompile.linear_int8.default
    assert binding(Int8WeightOnly()).op is torch.ops.qcompile.linear_int8_weight_only.default
    assert binding(W8A8Dynamic()).op is torch.ops.qcompile.linear_w8a8_dynamic.default


def test_a_scheme_without_an_op_is_a_clear_error():
    import dataclasses

    from qcompile.formats.scheme import Scheme

    @dataclasses.dataclass(frozen=True)
    class Unbound(Scheme):
        kind = "unbound"

    with pytest.raises(ValueError, match="'unbound': no qcompile op runs it"):
        binding(Unbound())


def test_formats_do_not_import_ops():
    """Dependencies point one way: formats <- ops <- passes/backend (DESIGN.md)."""
    import ast
    import pathlib

    formats = pathlib.Path(qcompile.__file__).parent / "formats"
    for path in formats.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert not name.startswith(("qcompile.ops", "qcompile.passes", "qcompile.backend")), (path, name)
            if isinstance(node, ast.Attribute) and node.attr == "qcompile":
                assert not (isinstance(node.value, ast.Attribute) and node.value.attr == "ops"), path


@pytest.mark.parametrize(("m", "k", "n"), [(3, 33, 7), (1, 4096, 5), (0, 16, 8)])
def test_int8_matmul_is_exact(m, k, n):
    from qcompile.ops.int8_common import int8_matmul

    torch.manual_seed(m + k + n)
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8)
    b = torch.randint(-128, 128, (n, k), dtype=torch.int8)
    a[:, :1] = -128  # the extreme products
    b[:, :1] = -128
    expected = (a.long() @ b.long().t()).to(torch.int32)
    got = int8_matmul(a, b)
    assert got.dtype == torch.int32 and torch.equal(got, expected)


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: f"{s.kind}")
@pytest.mark.parametrize("transposed", [False, True], ids=["linear-layout", "in-out-layout"])
def test_quantized_linear_opcheck_and_equals_the_format_op(scheme, transposed):
    """The op the rewrite emits: the float parameter in, its packed form found per call."""
    from qcompile.ops.quantized_linear import scheme_key

    w = torch.nn.Parameter(weight((48, 256)), requires_grad=False)
    param = torch.nn.Parameter(w.detach().t().contiguous(), requires_grad=False) if transposed else w
    x = activations((2, 3, 256)).requires_grad_()
    bias = torch.randn(48, requires_grad=True)
    args = (x, param, bias, scheme_key(scheme), transposed, "w", "reference")
    opcheck(torch.ops.qcompile.quantized_linear.default, args)
    out = torch.ops.qcompile.quantized_linear.default(*args)
    torch.testing.assert_close(out, call(qcompile.pack(w.detach(), scheme), x, bias), rtol=0, atol=0)
    grad_args = (torch.randn(2, 3, 48), param, scheme_key(scheme), transposed, "w", x.dtype)
    opcheck(torch.ops.qcompile.quantized_linear_grad_input.default, grad_args)
