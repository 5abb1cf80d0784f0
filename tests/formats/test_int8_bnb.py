"""Row-wise int8 weights against bitsandbytes: LLM.int8() values, SCB and outlier columns.

The reference is ``bitsandbytes.functional.int8_vectorwise_quant`` (what ``Int8Params`` and
``MatMul8bitLt`` call) and the ``Linear8bitLt`` state dict. All comparisons are exact.
"""

import pytest
import torch

import qcompile
from qcompile.formats import Int8, Int8WeightOnly, PackedInt8, PackedInt8PerChannel, PackedWeight, W8A8Dynamic
from qcompile.ops.int8_common import int8_vectorwise_quant

bnb = pytest.importorskip("bitsandbytes")
bnbf = bnb.functional


def weight(shape, dtype, seed=0, scale=0.05):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * scale).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(64, 128), (33, 95), (1, 777), (777, 1), (256, 1000)])
def test_int8_weight_equals_bitsandbytes(dtype, shape):
    w = weight(shape, dtype, seed=shape[0])
    packed = qcompile.pack(w, Int8())
    cb, scb, outliers = bnbf.int8_vectorwise_quant(w.to(torch.float16))
    assert outliers is None
    assert packed.weight.dtype == torch.int8 and torch.equal(packed.weight, cb)
    assert torch.equal(packed.weight_scale, scb)
    assert torch.equal(packed.dequantize(torch.float32), bnbf.int8_vectorwise_dequant(cb, scb))


def test_int8_chunking_does_not_change_values(monkeypatch):
    import qcompile.formats.packed_int8 as packed_int8

    w = weight((100, 300), torch.float32, seed=4)
    one = qcompile.pack(w, Int8())
    monkeypatch.setattr(packed_int8, "CHUNK_ELEMENTS", 700)  # 2 rows per chunk
    many = qcompile.pack(w, Int8())
    assert torch.equal(one.weight, many.weight) and torch.equal(one.weight_scale, many.weight_scale)


@pytest.mark.parametrize("rows", [1, 7])
def test_activation_quant_and_outlier_columns_equal_bitsandbytes(rows):
    gen = torch.Generator().manual_seed(rows)
    a = torch.randn(rows, 64, generator=gen).to(torch.float16)
    a[:, 5] *= 10  # outlier column
    a[rows - 1, 40] = -7.5  # a single outlier element
    a[0, 41] = 6.0  # exactly the threshold: bitsandbytes counts |a| >= threshold
    expected = bnbf.int8_vectorwise_quant(a.clone(), threshold=6.0)
    got = int8_vectorwise_quant(a, threshold=6.0)
    assert torch.equal(got[0], expected[0])
    assert torch.equal(got[1], expected[1])
    assert torch.equal(got[2], expected[2].to(torch.int64))
    assert {5, 40, 41} <= set(got[2].tolist())
    for threshold in (0.0,):
        expected = bnbf.int8_vectorwise_quant(a.clone(), threshold=threshold)
        got = int8_vectorwise_quant(a, threshold=threshold)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1]) and got[2].numel() == 0


def _bnb_linear8bit(w, threshold=6.0):
    module = bnb.nn.Linear8bitLt(w.shape[1], w.shape[0], bias=True, has_fp16_weights=False, threshold=threshold)
    module.weight.data = w.clone()
    return module.to("cpu")  # quantizes


def test_state_dict_round_trip():
    w = weight((48, 80), torch.float16, seed=9)
    module = _bnb_linear8bit(w)
    state = {k: v for k, v in module.state_dict().items() if k != "bias"}
    assert set(state) == {"weight", "SCB", "weight_format"}

    loaded = PackedWeight.from_bitsandbytes(state)
    assert isinstance(loaded, PackedInt8) and loaded.shape == (48, 80)
    ours = qcompile.pack(w, Int8())
    for produced in (loaded.to_bitsandbytes(), ours.to_bitsandbytes()):
        assert list(produced) == list(state)
        for key, value in state.items():
            assert produced[key].dtype == value.dtype and torch.equal(produced[key], value), key
    # And the other way: a fresh bitsandbytes module loads our dict and holds the same int8 weight.
    fresh = _bnb_linear8bit(torch.zeros(48, 80, dtype=torch.float16))
    fresh.load_state_dict({**ours.to_bitsandbytes(), "bias": module.bias.detach()})
    assert torch.equal(fresh.weight.data, ours.weight) and torch.equal(fresh.weight.SCB, ours.weight_scale)


def test_has_fp16_weight_keeps_a_master_copy():
    w = weight((16, 32), torch.bfloat16)
    packed = qcompile.pack(w, Int8(has_fp16_weight=True))
    assert packed.master.dtype == torch.float16 and torch.equal(packed.master, w.to(torch.float16))
    assert set(packed.to_bitsandbytes()) == {"weight"}
    assert packed.nbytes == 16 * 32 + 16 * 4 + 16 * 32 * 2
    assert Int8(has_fp16_weight=True).bits_per_weight((16, 32)) == 8 + 32 / 32 + 16


def test_from_bitsandbytes_checks_int8_tensors():
    with pytest.raises(ValueError, match="weight"):
        PackedWeight.from_bitsandbytes({"weight": torch.zeros(4, 4), "SCB": torch.zeros(4)})
    with pytest.raises(ValueError, match="SCB"):
        PackedWeight.from_bitsandbytes({"weight": torch.zeros(4, 4, dtype=torch.int8), "SCB": torch.zeros(3)})


@pytest.mark.parametrize("scheme", [Int8(), Int8WeightOnly(), W8A8Dynamic()], ids=lambda s: s.kind)
def test_int8_nan_inf_and_zero_rows(scheme):
    w = weight((8, 16), torch.float32)
    w[3, 7] = float("nan")
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.qkv\.weight.*NaN or Inf"):
        qcompile.pack(w, scheme, name="blocks.0.attn.qkv.weight")
    w = weight((8, 16), torch.float32)
    w[2] = 0
    packed = qcompile.pack(w, scheme)
    assert torch.equal(packed.weight[2], torch.zeros(16, dtype=torch.int8))
    assert torch.equal(packed.dequantize()[2], torch.zeros(16))
    assert torch.isfinite(packed.dequantize()).all()


def test_llm_int8_rejects_weights_beyond_float16():
    w = torch.ones(4, 4)
    w[1, 1] = 1e6  # bitsandbytes casts to float16 first: this would become inf
    with pytest.raises(ValueError, match="w_big.*float16"):
        qcompile.pack(w, Int8(), name="w_big")


@pytest.mark.parametrize("scheme_cls", [Int8WeightOnly, W8A8Dynamic])
def test_per_channel_int8_error_bound(scheme_cls):
    w = weight((64, 200), torch.float32, seed=1)
    packed = qcompile.pack(w, scheme_cls())
    assert isinstance(packed, PackedInt8PerChannel)
    scale = w.abs().amax(dim=1) / 127
    assert torch.equal(packed.weight_scale, scale)
    # Round to nearest: at most half a step per element (plus float rounding).
    assert ((packed.dequantize() - w).abs() <= scale[:, None] * (0.5 + 1e-5)).all()
    assert packed.weight.abs().max() == 127
    assert scheme_cls().bits_per_weight((64, 200)) == 8 + 32 / 200 == packed.bits_per_weight
    with pytest.raises(NotImplementedError, match="bitsandbytes"):
        packed.to_bitsandbytes()
