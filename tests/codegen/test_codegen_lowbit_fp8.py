"""The low-bit family's float8 (e4m3) decode in GEMV, split-K and GEMM, against the torch reference."""

import codegen_refs as ref
import pytest
import torch
from codegen_refs import requires_interpreter

import qcompile
from qcompile.formats import Float8
from qcompile.ops import linear


@requires_interpreter
def test_decode_of_every_e4m3_byte_is_torchs():
    from qcompile.codegen.lowbit import linear_float8

    codes = torch.arange(256, dtype=torch.uint8).view(16, 16)
    codes[codes == 0x7F] = 0  # NaN (0x7F, 0xFF) is never stored: packing clamps to +-448
    codes[codes == 0xFF] = 0
    eye = torch.eye(16)
    # y = I @ W.T = W.T: each weight byte decoded (scale 1)
    y = linear_float8(eye, codes, torch.ones(16), None, torch.float32, variant="gemm")
    assert torch.equal(y.t(), codes.view(torch.float8_e4m3fn).float())


@requires_interpreter
@pytest.mark.parametrize("variant", ["gemv", "gemm_split_k", "gemm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_every_variant_matches_the_reference(variant, dtype):
    packed = qcompile.pack((torch.randn(40, 72) * 0.05).to(dtype), Float8())
    m = {"gemv": 2, "gemm_split_k": 17, "gemm": 65}[variant]
    x = torch.randn(m, 72, dtype=dtype)
    bias = torch.randn(40, dtype=dtype)
    from qcompile.codegen.lowbit import linear_float8

    y = linear_float8(x, packed.weight, packed.scale, bias, dtype, variant=variant)
    torch.testing.assert_close(y, linear(packed, x, bias, kernels="reference"), **ref.tolerance(dtype))


@requires_interpreter
def test_bad_variant_or_compute_dtype_is_named():
    from qcompile.codegen.lowbit import linear_float8

    packed = qcompile.pack(torch.randn(8, 16), Float8())
    with pytest.raises(ValueError, match="linear_float8: variant 'gemmm' is not allowed"):
        linear_float8(torch.randn(1, 16), packed.weight, packed.scale, None, torch.float32, variant="gemmm")
    with pytest.raises(ValueError, match="linear_float8: compute_dtype torch.int8 is not allowed"):
        linear_float8(torch.randn(1, 16), packed.weight, packed.scale, None, torch.int8)
