"""NF4/FP4 dequant+matmul kernels vs a plain-torch reference (interpreter on CPU, compiled on CUDA)."""

import zlib

import codegen_refs as ref
import pytest
import torch
from codegen_refs import requires_cuda, requires_interpreter

bnb_functional = pytest.importorskip("bitsandbytes.functional")


def _quantize(w, quant_type, nested, blocksize):
    packed, state = bnb_functional.quantize_4bit(
        w.cpu().float(), blocksize=blocksize, compress_statistics=nested, quant_type=quant_type
    )
    tensors = dict(
        packed=packed,
        absmax=state.absmax,
        code=state.code,
        nested_absmax=state.state2.absmax if nested else None,
        nested_code=state.state2.code if nested else None,
        nested_offset=float(state.offset) if nested else 0.0,
    )
    return tensors


def _run(x, q, bias, blocksize, n, k, compute_dtype, **kw):
    from qcompile.codegen.lowbit import linear_4bit

    dev = x.device
    move = {key: (v.to(dev) if isinstance(v, torch.Tensor) else v) for key, v in q.items()}
    return linear_4bit(
        x, move["packed"], move["absmax"], move["code"], move["nested_absmax"], move["nested_code"], bias,
        move["nested_offset"], blocksize, n, k, compute_dtype, **kw,
    )


def _reference(x, q, bias, blocksize, n, k, compute_dtype):
    w = ref.dequantize_4bit(q["packed"], q["absmax"], q["code"], q["nested_absmax"], q["nested_code"],
                            q["nested_offset"], blocksize, n, k)
    return ref.linear_4bit(x.cpu(), w, None if bias is None else bias.cpu(), compute_dtype)


N, K = 33, 96  # K % 64 != 0: absmax blocks straddle rows; K is not a multiple of the 32-wide tile


@requires_interpreter
@pytest.mark.parametrize("variant", ["gemv", "gemm_split_k", "gemm"])
@pytest.mark.parametrize("m", [1, 3, 17])
@pytest.mark.parametrize("compute_dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_matches_reference(quant_type, nested, compute_dtype, m, variant):
    # crc32, not hash(): str hashes are salted per process, so hash() drew different data every run.
    torch.manual_seed(zlib.crc32(f"{quant_type}-{nested}-{m}".encode()))
    w = torch.randn(N, K)
    q = _quantize(w, quant_type, nested, 64)
    x = torch.randn(m, K, dtype=compute_dtype)
    bias = torch.randn(N, dtype=compute_dtype) if m != 3 else None
    y = _run(x, q, bias, 64, N, K, compute_dtype, variant=variant)
    expected = _reference(x, q, bias, 64, N, K, compute_dtype)
    assert y.dtype == x.dtype and y.shape == (m, N)
    torch.testing.assert_close(y, expected, **ref.tolerance(compute_dtype))


@requires_interpreter
@pytest.mark.parametrize("split_k", [1, 2, 3])
def test_gemv_split_k(split_k):
    torch.manual_seed(split_k)
    w = torch.randn(N, K)
    q = _quantize(w, "nf4", True, 32)
    x = torch.randn(2, K)
    bias = torch.randn(N)
    config = dict(BLOCK_N=16, BLOCK_K=32, SPLIT_K=split_k, num_warps=4)
    y = _run(x, q, bias, 32, N, K, torch.float32, variant="gemv", config=config)
    torch.testing.assert_close(y, _reference(x, q, bias, 32, N, K, torch.float32), **ref.tolerance(torch.float32))



@pytest.fixture
def launched(monkeypatch):
    """The constexprs of every tuned 4-bit launch: which path (ALIGNED or not) really ran."""
    from qcompile.codegen import autotune, lowbit

    for variant in ("gemv", "gemm_split_k", "gemm"):
        lowbit._tuned(variant).plans.clear()  # a planned call launches without TunedKernel.launch
    seen = []
    real = autotune.TunedKernel.launch

    def launch(self, grid, args, m, config=None, **constexprs):
        seen.append({**constexprs, "kernel": self.name})
        return real(self, grid, args, m, config=config, **constexprs)

    monkeypatch.setattr(autotune.TunedKernel, "launch", launch)
    return seen


@requires_interpreter
@pytest.mark.parametrize("variant", ["gemv", "gemm_split_k", "gemm"])
@pytest.mark.parametrize(("quant_type", "nested", "compute_dtype"), [("nf4", True, torch.bfloat16),
                                                                     ("fp4", False, torch.float32),
                                                                     ("nf4", False, torch.float16)], ids=str)
@pytest.mark.parametrize(("blocksize", "block_k", "split_k"), [
    (64, 32, 1),    # two steps per absmax block
    (32, 64, 2),    # two blocks per step (two SUB-steps), split K
    (64, 128, 3),   # K = 192: the second step's upper half lies past K; three splits
    (32, 128, 1),   # four blocks per step, the last two SUB-steps past K
    (64, 512, 2),   # one step covers all of K (8 SUB-steps, 5 past K); the second split is empty
], ids=str)
def test_aligned_path_matches_reference(launched, variant, quant_type, nested, compute_dtype, blocksize, block_k,
                                        split_k):
    n, k, m = 33, 192, 3 if variant == "gemv" else 17  # K % blocksize == 0: whole blocks per row
    torch.manual_seed(blocksize + block_k)
    q = _quantize(torch.randn(n, k), quant_type, nested, blocksize)
    x = torch.randn(m, k, dtype=compute_dtype)
    bias = torch.randn(n, dtype=compute_dtype)
    if variant == "gemv":
        config = dict(BLOCK_N=16, BLOCK_K=block_k, SPLIT_K=split_k, num_warps=4)
    else:
        config = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=block_k, GROUP_M=2, num_warps=4)
        if variant == "gemm_split_k":
            config["SPLIT_K"] = split_k
    y = _run(x, q, bias, blocksize, n, k, compute_dtype, variant=variant, config=config)
    assert [c["ALIGNED"] for c in launched] == [True]
    torch.testing.assert_close(y, _reference(x, q, bias, blocksize, n, k, compute_dtype),
                               **ref.tolerance(compute_dtype))



@requires_interpreter
def test_auto_dispatch_by_m(launched):
    q = _quantize(torch.randn(N, K), "nf4", True, 64)
    for m in (4, 5, 64, 65):
        x = torch.randn(m, K)
        torch.testing.assert_close(_run(x, q, None, 64, N, K, torch.float32),
                                   _reference(x, q, None, 64, N, K, torch.float32), **ref.tolerance(torch.float32))
    assert [c["kernel"] for c in launched] == ["lowbit_gemv", "lowbit_gemm_split_k",
                                                "lowbit_gemm_split_k", "lowbit_gemm"]

@requires_interpreter
def test_rows_that_split_blocks_take_the_general_path(launched):
    q = _quantize(torch.randn(N, K), "nf4", True, 64)
    x = torch.randn(1, K)
    y = _run(x, q, None, 64, N, K, torch.float32)
    assert [c["ALIGNED"] for c in launched] == [False]  # K = 96 is not a multiple of 64
    torch.testing.assert_close(y, _reference(x, q, None, 64, N, K, torch.float32), **ref.tolerance(torch.float32))

@requires_interpreter
def test_input_dtype_differs_from_compute_dtype_and_3d_input():
    torch.manual_seed(0)
    n, k = 17, 40  # N*K even, K % 32 == 8: blocks of 32 straddle rows, odd row count
    w = torch.randn(n, k)
    q = _quantize(w, "fp4", False, 32)
    x = torch.randn(2, 3, k, dtype=torch.float32)
    y = _run(x, q, None, 32, n, k, torch.bfloat16)
    expected = _reference(x.reshape(6, k), q, None, 32, n, k, torch.bfloat16).reshape(2, 3, n)
    assert y.shape == (2, 3, n) and y.dtype == torch.float32
    torch.testing.assert_close(y, expected, **ref.tolerance(torch.bfloat16))


@requires_interpreter
def test_odd_element_count_and_noncontiguous_x():
    torch.manual_seed(1)
    n, k = 7, 33  # N*K odd: the last byte holds one code
    w = torch.randn(n, k)
    q = _quantize(w, "nf4", True, 64)
    x = torch.randn(k, 5).T  # non-contiguous rows
    y = _run(x, q, None, 64, n, k, torch.float32, variant="gemm")
    torch.testing.assert_close(y, _reference(x, q, None, 64, n, k, torch.float32), **ref.tolerance(torch.float32))


@requires_interpreter
def test_quant_storage_view_is_accepted():
    torch.manual_seed(2)
    w = torch.randn(8, 64)
    q = _quantize(w, "nf4", False, 64)
    expected = _reference(torch.ones(1, 64), q, None, 64, 8, 64, torch.float32)
    q["packed"] = q["packed"].reshape(-1).view(torch.float16)
    y = _run(torch.ones(1, 64), q, None, 64, 8, 64, torch.float32)
    torch.testing.assert_close(y, expected)


@requires_interpreter
def test_validation_errors():
    w = torch.randn(8, 64)
    q = _quantize(w, "nf4", False, 64)
    with pytest.raises(ValueError, match="x has shape"):
        _run(torch.randn(2, 63), q, None, 64, 8, 64, torch.float32)
    with pytest.raises(ValueError, match="variant"):
        _run(torch.randn(2, 64), q, None, 64, 8, 64, torch.float32, variant="fast")
    with pytest.raises(ValueError, match="compute_dtype"):
        _run(torch.randn(2, 64), q, None, 64, 8, 64, torch.int8)
    with pytest.raises(ValueError, match="absmax"):
        _run(torch.randn(2, 64), dict(q, absmax=q["absmax"][:0]), None, 64, 8, 64, torch.float32)
    with pytest.raises(ValueError, match="bias"):
        _run(torch.randn(2, 64), q, torch.randn(7), 64, 8, 64, torch.float32)
    with pytest.raises(ValueError, match="together"):
        _run(torch.randn(2, 64), dict(q, nested_code=torch.zeros(256)), None, 64, 8, 64, torch.float32)


# ---- GPU -------------------------------------------------------------------------------------------

@requires_cuda
@pytest.mark.parametrize("variant", ["auto", "gemv", "gemm_split_k", "gemm"])
@pytest.mark.parametrize("m", [1, 3, 17])
@pytest.mark.parametrize("compute_dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_cuda_small(quant_type, nested, compute_dtype, m, variant):
    torch.manual_seed(0)
    w = torch.randn(N, K)
    q = _quantize(w, quant_type, nested, 64)
    x = torch.randn(m, K, dtype=compute_dtype, device="cuda")
    bias = torch.randn(N, dtype=compute_dtype, device="cuda")
    y = _run(x, q, bias, 64, N, K, compute_dtype, variant=variant)
    torch.testing.assert_close(y.cpu(), _reference(x, q, bias, 64, N, K, compute_dtype), **ref.tolerance(compute_dtype))


@requires_cuda
@pytest.mark.parametrize("m", [1, 4, 16, 128, 4096])
@pytest.mark.parametrize("compute_dtype", [torch.float16, torch.bfloat16])
def test_cuda_large(m, compute_dtype):
    torch.manual_seed(0)
    n = k = 4096
    w = torch.randn(n, k) * 0.02
    q = _quantize(w, "nf4", True, 64)
    x = torch.randn(m, k, dtype=compute_dtype, device="cuda")
    y = _run(x, q, None, 64, n, k, compute_dtype)
    wd = ref.dequantize_4bit(q["packed"], q["absmax"], q["code"], q["nested_absmax"], q["nested_code"],
                             q["nested_offset"], 64, n, k).cuda()
    expected = (x.float() @ wd.to(compute_dtype).float().T).to(compute_dtype)
    cos = torch.nn.functional.cosine_similarity(y.float().flatten(), expected.float().flatten(), dim=0)
    assert cos > 0.9999
    torch.testing.assert_close(y, expected, atol=5e-2, rtol=2e-2)
