"""int8 weight-only, W8A8 dynamic and LLM.int8() kernels vs plain-torch / bitsandbytes references."""

import codegen_refs as ref
import pytest
import torch
from codegen_refs import requires_cuda, requires_interpreter

N, K = 33, 96
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def _weights(n=N, k=K, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    absmax = w.abs().amax(1)
    q = torch.round(w * 127 / absmax[:, None]).to(torch.int8)
    return q.to(device), absmax.to(device)


def _x(m, dtype, outliers=False, k=K, device="cpu", seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    if outliers:
        x[:, [5, 40, 77]] *= 10  # columns with some |x| >= 6 in most rows
        x[0, k - 6] = -8.0  # an outlier column with a single outlier element
    return x.to(dtype).to(device)


# ---- int8 weight-only ------------------------------------------------------------------------------

@requires_interpreter
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("m", [1, 3, 17, 65])  # 65: past SPLIT_K_MAX_M, the plain tiled GEMM
@pytest.mark.parametrize("dtype", DTYPES)
def test_int8_weight_only(dtype, m, bias):
    from qcompile.codegen.int8_weight_only import int8_weight_only

    q, absmax = _weights()
    scale = absmax / 127
    x = _x(m, dtype)
    b = torch.randn(N).to(dtype) if bias else None
    y = int8_weight_only(x, q, scale, b)
    assert y.dtype == dtype and y.shape == (m, N)
    torch.testing.assert_close(y, ref.int8_weight_only(x, q, scale, b), **ref.tolerance(dtype))


# ---- W8A8 dynamic ----------------------------------------------------------------------------------

@requires_interpreter
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("m", [1, 3, 17, 65])  # 65: past SPLIT_K_MAX_M, the plain tiled GEMM
@pytest.mark.parametrize("dtype", DTYPES)
def test_w8a8_dynamic(dtype, m, bias):
    from qcompile.codegen.w8a8_dynamic import w8a8_dynamic

    q, absmax = _weights()
    scale = absmax / 127
    x = _x(m, dtype)
    b = torch.randn(N).to(dtype) if bias else None
    y = w8a8_dynamic(x, q, scale, b)
    assert y.dtype == dtype and y.shape == (m, N)
    torch.testing.assert_close(y, ref.w8a8_dynamic(x, q, scale, b), **ref.tolerance(dtype))


@requires_interpreter
def test_w8a8_activation_quantization_exact():
    from qcompile.codegen.w8a8_dynamic import quantize_activations

    x = _x(17, torch.float32)
    x[1] = x[1].abs() + 0.5  # all positive: the range is extended down to 0
    x[2] = 0.0  # all zero: scale eps, zero point -128
    x[3] = -x[3].abs()
    q, scale, zp = quantize_activations(x)
    q_ref, scale_ref, zp_ref = ref.w8a8_quantize(x)
    assert torch.equal(q, q_ref) and torch.equal(scale, scale_ref) and torch.equal(zp, zp_ref)
    assert zp.min() >= -128 and zp.max() <= 127


# ---- LLM.int8() ------------------------------------------------------------------------------------

@requires_interpreter
@pytest.mark.parametrize("threshold", [0.0, 6.0])
@pytest.mark.parametrize("outliers", [False, True])
@pytest.mark.parametrize("m", [1, 3, 17, 65])  # 65: past SPLIT_K_MAX_M, the plain tiled GEMM
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_int8_vectorwise_quant_matches_bitsandbytes_exactly(dtype, m, outliers, threshold):
    bnb_functional = pytest.importorskip("bitsandbytes.functional")
    from qcompile.codegen.llm_int8 import int8_vectorwise_quant

    x = _x(m, dtype, outliers)
    q_ref, stats_ref, cols_ref = bnb_functional.int8_vectorwise_quant(x.to(torch.float16), threshold=threshold)
    q, stats, cols = int8_vectorwise_quant(x, threshold)
    assert torch.equal(q, q_ref)
    assert torch.equal(stats, stats_ref)
    if threshold == 0:
        assert cols is None and cols_ref is None
    else:
        assert torch.equal(cols, cols_ref)
        assert (cols.numel() > 0) == outliers


@requires_interpreter
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("threshold", [0.0, 6.0])
@pytest.mark.parametrize("outliers", [False, True])
@pytest.mark.parametrize("m", [1, 3, 17, 65])  # 65: past SPLIT_K_MAX_M, the plain tiled GEMM
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_int8(dtype, m, outliers, threshold, bias):
    pytest.importorskip("bitsandbytes")
    from qcompile.codegen.llm_int8 import linear_int8

    q, scb = _weights()
    x = _x(m, dtype, outliers)
    b = torch.randn(N).to(dtype) if bias else None
    y = linear_int8(x, q, scb, b, threshold)
    assert y.dtype == dtype and y.shape == (m, N)
    torch.testing.assert_close(y, ref.llm_int8(x, q, scb, b, threshold), **ref.tolerance(dtype))


@requires_interpreter
def test_linear_int8_outliers_change_the_result():
    """The decomposition is live: outlier columns go through the 16-bit path, not int8."""
    from qcompile.codegen.llm_int8 import linear_int8

    q, scb = _weights()
    x = _x(3, torch.float32, outliers=True)
    exact = x @ (q.float() * scb[:, None] / 127).T
    err_decomposed = (linear_int8(x, q, scb, None, 6.0) - exact).abs().max()
    err_plain = (linear_int8(x, q, scb, None, 0.0) - exact).abs().max()
    assert err_decomposed < err_plain


@requires_interpreter
def test_int8_validation_errors():
    from qcompile.codegen.int8_weight_only import int8_weight_only
    from qcompile.codegen.llm_int8 import linear_int8
    from qcompile.codegen.w8a8_dynamic import w8a8_dynamic

    q, absmax = _weights()
    x = _x(2, torch.float32)
    with pytest.raises(ValueError, match="weight has dtype"):
        int8_weight_only(x, q.float(), absmax, None)
    with pytest.raises(ValueError, match="weight_scale"):
        w8a8_dynamic(x, q, absmax[:-1], None)
    with pytest.raises(ValueError, match="threshold"):
        linear_int8(x, q, absmax, None, -1.0)
    with pytest.raises(ValueError, match="x has dtype"):
        linear_int8(x.to(torch.int32), q, absmax, None, 6.0)


# ---- GPU -------------------------------------------------------------------------------------------

@requires_cuda
@pytest.mark.parametrize("m", [1, 3, 17, 65])  # 65: past SPLIT_K_MAX_M, the plain tiled GEMM
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_small_int8_family(dtype, m):
    from qcompile.codegen.int8_weight_only import int8_weight_only
    from qcompile.codegen.llm_int8 import int8_vectorwise_quant, linear_int8
    from qcompile.codegen.w8a8_dynamic import w8a8_dynamic

    q, absmax = _weights(device="cuda")
    x = _x(m, dtype, outliers=True, device="cuda")
    b = torch.randn(N, device="cuda").to(dtype)
    tol = ref.tolerance(dtype)
    torch.testing.assert_close(int8_weight_only(x, q, absmax / 127, b),
                               ref.int8_weight_only(x, q, absmax / 127, b), **tol)
    torch.testing.assert_close(w8a8_dynamic(x, q, absmax / 127, b), ref.w8a8_dynamic(x, q, absmax / 127, b), **tol)
    for threshold in (0.0, 6.0):
        torch.testing.assert_close(linear_int8(x, q, absmax, b, threshold),
                                   ref.llm_int8(x, q, absmax, b, threshold), **tol)
    import bitsandbytes.functional as bnb_functional

    q_ref, stats_ref, cols_ref = bnb_functional.int8_vectorwise_quant(x.cpu().to(torch.float16), threshold=6.0)
    q_k, stats_k, cols_k = int8_vectorwise_quant(x, 6.0)
    assert torch.equal(q_k.cpu(), q_ref) and torch.equal(stats_k.cpu(), stats_ref)
    assert torch.equal(cols_k.cpu(), cols_ref)


@requires_cuda
@pytest.mark.parametrize("m", [1, 16, 256, 4096])
def test_cuda_large_int8_family(m):
    from qcompile.codegen.int8_weight_only import int8_weight_only
    from qcompile.codegen.llm_int8 import linear_int8
    from qcompile.codegen.w8a8_dynamic import w8a8_dynamic

    n = k = 4096
    q, absmax = _weights(n, k, device="cuda")
    x = _x(m, torch.float16, outliers=True, k=k, device="cuda")
    for got, want in (
        (int8_weight_only(x, q, absmax / 127, None), ref.int8_weight_only(x, q, absmax / 127, None)),
        (w8a8_dynamic(x, q, absmax / 127, None), ref.w8a8_dynamic(x, q, absmax / 127, None)),
        (linear_int8(x, q, absmax, None, 6.0), ref.llm_int8(x, q, absmax, None, 6.0)),
    ):
        cos = torch.nn.functional.cosine_similarity(got.float().flatten(), want.float().flatten(), dim=0)
        assert cos > 0.9999


@requires_interpreter
def test_activation_quantizers_match_the_ops_reference_when_present():
    common = pytest.importorskip("qcompile.ops.int8_common")
    from qcompile.codegen.w8a8_dynamic import quantize_activations

    x = _x(17, torch.float32, outliers=True)
    x[2] = 0.0
    got = quantize_activations(x)
    want = common.quantize_per_token_asymmetric(x)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


@requires_interpreter
def test_small_m_runs_the_split_k_variant(monkeypatch):
    from qcompile.codegen import autotune
    from qcompile.codegen import int8_weight_only as module
    from qcompile.codegen.int8_weight_only import int8_weight_only

    for split in (False, True):
        module._tuned(split).plans.clear()  # a planned call launches without TunedKernel.launch
    names = []
    real = autotune.TunedKernel.launch
    monkeypatch.setattr(autotune.TunedKernel, "launch",
                        lambda self, *a, **kw: names.append(self.name) or real(self, *a, **kw))
    q, absmax = _weights()
    for m in (64, 65):
        x = _x(m, torch.float32)
        torch.testing.assert_close(int8_weight_only(x, q, absmax / 127, None),
                                   ref.int8_weight_only(x, q, absmax / 127, None), **ref.tolerance(torch.float32))
    assert names == ["int8_weight_only_gemm_split_k", "int8_weight_only_gemm"]
    with pytest.raises(ValueError, match="SPLIT_K=2 runs only for M <= 64"):
        int8_weight_only(_x(65, torch.float32), q, absmax / 127, None,
                         config=dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, SPLIT_K=2))
