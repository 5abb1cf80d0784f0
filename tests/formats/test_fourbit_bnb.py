"""NF4 / FP4 packing against bitsandbytes: bytes, absmax and nested state must be identical.

The reference is ``bitsandbytes.functional.quantize_4bit`` / ``dequantize_4bit`` on CPU.
Dequantization is compared for EXACT equality (torch.equal, bit for bit), not within an ulp:
both compute ``code[nibble] * absmax`` with one float32 multiply and one cast.

bitsandbytes 0.50's CPU C kernel for ``dequantize_4bit`` gives wrong values for some shapes
whose absmax blocks straddle rows (e.g. [64, 96] at blocksize 64: errors of ~2x absmax),
while its own pure-torch implementation (the default backend, used on other devices)
agrees with the packed bytes. So dequantization is compared exactly with the torch
implementation for every shape, and with the public ``dequantize_4bit`` where the C kernel
is right (in_features a multiple of the blocksize, or an odd in_features, which falls back
to the torch implementation).
"""

import json

import pytest
import torch

import qcompile
from qcompile.formats import FP4, NF4, Packed4bit, PackedWeight
from qcompile.formats.blockwise import quantize_4bit
from qcompile.formats.codes import dynamic_code, fourbit_bounds, fourbit_code
from qcompile.formats.fourbit import fourbit_bits_formula, fourbit_storage_bytes

bnbf = pytest.importorskip("bitsandbytes.functional")

SCHEMES = {"nf4": NF4, "fp4": FP4}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# numel a multiple of the blocksize, not a multiple (odd numel, partial last block), 1xN, Nx1.
SHAPES = [(64, 128), (33, 95), (1, 777), (777, 1), (300, 517)]
BLOCKSIZES = [32, 64, 256, 4096]


def weight(shape, dtype, seed=0, scale=0.02):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * scale).to(dtype)


def bnb_quantize(w, kind, blocksize, double_quant, quant_storage=torch.uint8):
    return bnbf.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant, quant_type=kind,
                              quant_storage=quant_storage)


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (torch.equal would call packed bytes that read as NaN unequal)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.contiguous().view(torch.uint8),
                                                                     b.contiguous().view(torch.uint8))


def bnb_dequantize_torch(q, state):
    """bitsandbytes' default-backend (pure torch, eager) dequantize_4bit."""
    from bitsandbytes.backends.default import ops as default_ops

    compute = default_ops._dequantize_4bit_compute
    compute = getattr(compute, "__wrapped__", compute)
    absmax = state.absmax
    if state.nested:
        absmax = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset
    return compute(q.view(torch.uint8).view(-1), absmax, state.code, state.blocksize, state.shape, state.dtype)


def assert_same_dequantize(packed: Packed4bit, q, state) -> None:
    ours = packed.dequantize()
    assert torch.equal(ours, bnb_dequantize_torch(q, state))
    in_features = state.shape[1]
    if in_features % state.blocksize == 0 or in_features % 2:
        assert torch.equal(ours, bnbf.dequantize_4bit(q, state))


def assert_same_state(packed: Packed4bit, q: torch.Tensor, state) -> None:
    assert torch.equal(packed.packed, q.view(torch.uint8).view(-1))
    assert torch.equal(packed.absmax, state.absmax)
    assert same_bytes(packed.code, state.code)
    if state.nested:
        assert torch.equal(packed.nested_absmax, state.state2.absmax)
        assert same_bytes(packed.nested_code, state.state2.code)
        assert packed.nested_offset == state.offset.item()
    else:
        assert packed.nested_absmax is None and packed.nested_code is None


def test_code_tables_equal_bitsandbytes():
    from bitsandbytes.backends.default.ops import _get_4bit_quantize_bounds

    for kind in SCHEMES:
        assert same_bytes(fourbit_code(kind), bnbf.get_4bit_type(kind, device="cpu"))  # +0.0 vs -0.0 matters
        bounds, nibble_of_rank = fourbit_bounds(kind)
        bnb_bounds, bnb_order = _get_4bit_quantize_bounds(kind, torch.device("cpu"))
        assert torch.equal(bounds, bnb_bounds)
        if nibble_of_rank is not None:
            assert torch.equal(nibble_of_rank.long(), bnb_order)
    assert same_bytes(dynamic_code(), bnbf.create_dynamic_map())


@pytest.mark.parametrize("kind", SCHEMES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("double_quant", [False, True], ids=["single", "double"])
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_pack_equals_bitsandbytes(kind, dtype, double_quant, blocksize, eager_bnb_dequant):
    for i, shape in enumerate(SHAPES):
        w = weight(shape, dtype, seed=i)
        q, state = bnb_quantize(w, kind, blocksize, double_quant)
        packed = SCHEMES[kind](blocksize=blocksize, double_quant=double_quant).pack(w)
        assert_same_state(packed, q, state)
        assert_same_dequantize(packed, q, state)


@pytest.mark.parametrize("kind", SCHEMES)
def test_large_weight_equals_bitsandbytes(kind):
    w = weight((4096, 4096), torch.bfloat16, seed=7)
    q, state = bnb_quantize(w, kind, 64, True)
    packed = SCHEMES[kind](double_quant=True).pack(w)
    assert_same_state(packed, q, state)
    assert_same_dequantize(packed, q, state)


def test_chunking_does_not_change_bytes():
    # A chunk boundary in the middle of the weight must give the same bytes as one chunk.
    w = weight((129, 100), torch.float32, seed=3)
    one = quantize_4bit(w, 64, "nf4", chunk_elements=1 << 30)
    many = quantize_4bit(w, 64, "nf4", chunk_elements=64 * 3)
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])


@pytest.mark.parametrize("kind", SCHEMES)
def test_values_on_decision_boundaries(kind, eager_bnb_dequant):
    # Each block holds +-1 (so absmax = 1 and the scaled value is the value itself) and the
    # code midpoints and their float neighbours: the nibble a tie gets must match.
    bounds, _ = fourbit_bounds(kind)
    probes = torch.cat([bounds, torch.nextafter(bounds, torch.tensor(2.0)), torch.nextafter(bounds, torch.tensor(-2.0)),
                        fourbit_code(kind), torch.tensor([0.0, -0.0])])
    blocks = [torch.cat([torch.tensor([1.0 if i % 2 else -1.0]), probes[i:i + 31]])
              for i in range(0, probes.numel(), 31)]
    w = torch.cat([torch.nn.functional.pad(b, (0, 32 - b.numel())) for b in blocks]).view(-1, 32)
    q, state = bnb_quantize(w, kind, 32, True)
    packed = SCHEMES[kind](blocksize=32, double_quant=True).pack(w)
    assert_same_state(packed, q, state)


def test_nested_absmax_on_lut_boundaries():
    # Nested quantization goes through bitsandbytes' 65536-entry LUT; probe values that land
    # exactly on LUT slots and code midpoints so that rounding of the slot index matters.
    code = dynamic_code()
    mids = (code[:-1] + code[1:]) / 2
    probes = torch.cat([code, mids, torch.nextafter(mids, torch.tensor(2.0)), torch.nextafter(mids, torch.tensor(-2.0)),
                        torch.linspace(-1, 1, 4097)])
    # absmax values are >= 0, so build a weight whose block absmaxes are 2 + probe (mean ~2).
    absmax = 2.0 + probes
    w = torch.zeros(absmax.numel(), 64)
    w[:, 0] = absmax
    q, state = bnb_quantize(w, "nf4", 64, True)
    packed = NF4(double_quant=True).pack(w)
    assert_same_state(packed, q, state)


@pytest.mark.parametrize("storage", [torch.uint8, torch.int8, torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_quant_storage_matches_bitsandbytes(storage):
    w = weight((64, 96), torch.float16, seed=5)
    q, state = bnb_quantize(w, "nf4", 64, True, quant_storage=storage)
    packed = NF4(double_quant=True, quant_storage=storage).pack(w)
    assert packed.packed.dtype == torch.uint8 and packed.packed.dim() == 1  # stored as the op consumes it
    assert_same_state(packed, q, state)
    bnb_weight = packed.to_bitsandbytes()["weight"]
    assert bnb_weight.dtype == q.dtype == storage
    assert bnb_weight.shape == q.shape == ((64 * 96 // 2) // bnb_weight.element_size(), 1)
    assert torch.equal(bnb_weight.view(torch.uint8), q.view(torch.uint8))


def test_quant_storage_that_does_not_divide_is_unsupported():
    assert NF4(quant_storage=torch.float32).unsupported_reason((3, 3), torch.float32) is not None  # 5 bytes
    assert NF4(quant_storage=torch.float32).unsupported_reason((4, 2), torch.float32) is None  # 4 bytes
    with pytest.raises(ValueError, match="proj.weight.*quant_storage"):
        qcompile.pack(torch.ones(3, 3), NF4(quant_storage=torch.float32), name="proj.weight")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("scheme", [NF4(), FP4(double_quant=True)], ids=["nf4", "fp4-dq"])
def test_nan_or_inf_names_the_parameter(bad, scheme):
    w = weight((16, 70), torch.float32)
    w[15, 69] = bad  # in the partial last block
    with pytest.raises(ValueError, match=r"layers\.3\.mlp\.up_proj\.weight.*NaN or Inf"):
        qcompile.pack(w, scheme, name="layers.3.mlp.up_proj.weight")
    w = weight((16, 70), torch.bfloat16)
    w[2, 3] = bad  # in a full block
    with pytest.raises(ValueError, match=r"lm_head\.weight"):
        qcompile.pack(w, scheme, name="lm_head.weight")


@pytest.mark.parametrize("kind", SCHEMES)
@pytest.mark.parametrize("double_quant", [False, True])
def test_all_zero_blocks_dequantize_to_zero(kind, double_quant):
    w = weight((8, 100), torch.float32)
    w[:2] = 0  # full zero blocks
    w[-1, 36:] = 0  # zero partial last block (800 = 12 * 64 + 32)
    packed = SCHEMES[kind](double_quant=double_quant).pack(w)
    out = packed.dequantize()
    assert torch.isfinite(out).all()
    assert torch.equal(out[:2], torch.zeros(2, 100))
    assert torch.equal(out[-1, 36:], torch.zeros(64))
    zeros = SCHEMES[kind](double_quant=double_quant).pack(torch.zeros(64, 64)).dequantize()
    assert torch.equal(zeros, torch.zeros(64, 64))


def test_bits_per_weight_nf4_double_quant():
    text, value = fourbit_bits_formula(64, True)
    assert text == "4 + 8/64 + 32/(64*256)"
    assert value == pytest.approx(4.127, abs=5e-4)
    assert fourbit_bits_formula(64, False)[1] == 4.5
    shape = (4096, 4096)
    scheme = NF4(double_quant=True)
    tables = 8 * (16 * 4 + 256 * 4) / (4096 * 4096)
    assert scheme.bits_per_weight(shape) == pytest.approx(value + tables, rel=1e-12)
    packed = scheme.pack(weight((256, 512), torch.float16))
    assert packed.bits_per_weight == scheme.bits_per_weight((256, 512))
    assert packed.nbytes == fourbit_storage_bytes(256 * 512, 64, True) == scheme.packed_nbytes((256, 512))
    assert NF4().bits_per_weight((256, 512)) == 8 * (256 * 512 // 2 + 4 * 2048 + 64) / (256 * 512)


# ---- state dicts -------------------------------------------------------------

def _bnb_linear4bit(w, kind, double_quant, storage=torch.uint8):
    import bitsandbytes as bnb

    module = bnb.nn.Linear4bit(w.shape[1], w.shape[0], bias=True, compute_dtype=torch.float32,
                               compress_statistics=double_quant, quant_type=kind, quant_storage=storage)
    module.weight.data = w.clone()
    return module.to("cpu")  # quantizes


@pytest.mark.parametrize("kind", SCHEMES)
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16], ids=str)
def test_state_dict_round_trip(kind, double_quant, storage):
    w = weight((48, 80), torch.bfloat16, seed=11)
    module = _bnb_linear4bit(w, kind, double_quant, storage)
    state = {k: v for k, v in module.state_dict().items() if k != "bias"}

    loaded = PackedWeight.from_bitsandbytes(state)
    assert isinstance(loaded, Packed4bit) and loaded.scheme == SCHEMES[kind](double_quant=double_quant,
                                                                             quant_storage=storage)
    assert loaded.shape == (48, 80) and loaded.dtype == torch.bfloat16
    ours = qcompile.pack(w, loaded.scheme)
    for produced in (loaded.to_bitsandbytes(), ours.to_bitsandbytes()):
        assert list(produced) == list(state)  # same keys, same order
        for key, value in state.items():
            assert same_bytes(produced[key], value), key
    assert torch.equal(loaded.dequantize(), ours.dequantize())
    meta = json.loads(bytes(state[f"weight.quant_state.bitsandbytes__{kind}"].tolist()))
    assert meta["shape"] == [48, 80]


def test_our_state_dict_loads_into_bitsandbytes():
    from bitsandbytes.nn import Params4bit

    w = weight((40, 256), torch.float16, seed=2)
    ours = qcompile.pack(w, FP4(double_quant=True, blocksize=128)).to_bitsandbytes()
    stats = {k.removeprefix("weight."): v for k, v in ours.items() if k != "weight"}
    param = Params4bit.from_prequantized(ours["weight"], stats, device="cpu")
    assert param.quant_state.shape == (40, 256) and param.quant_state.blocksize == 128
    assert torch.equal(bnbf.dequantize_4bit(param.data, param.quant_state),  # 256 % 128 == 0: C kernel is right
                       qcompile.pack(w, FP4(double_quant=True, blocksize=128)).dequantize())


def test_from_bitsandbytes_rejects_unknown_dicts():
    with pytest.raises(ValueError, match="state"):
        PackedWeight.from_bitsandbytes({"weight": torch.zeros(4, 4)})
    with pytest.raises(ValueError, match="weight.absmax"):
        PackedWeight.from_bitsandbytes({"weight": torch.zeros(8, 1, dtype=torch.uint8),
                                        "weight.quant_state.bitsandbytes__nf4": torch.tensor(
                                            list(b'{"quant_type": "nf4", "blocksize": 64, "dtype": "float16", '
                                                 b'"shape": [4, 4]}'), dtype=torch.uint8)})
