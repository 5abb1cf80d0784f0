"""Blockwise absmax quantization: NF4/FP4 codes and the nested (double) quantization of absmax.

These are the numerics of bitsandbytes, reproduced in plain torch so that they run on any
device and give the same bytes as ``bitsandbytes.functional.quantize_4bit``. bitsandbytes
itself has two implementations that disagree on a small fraction of the bytes, so there are
two rules here, and a checkpoint should match the one the user compares with: packing a CUDA
tensor uses the "cuda" rule, any other tensor the "cpu" rule; ``rule=`` forces one (e.g. to
emulate the CUDA kernels on CPU). See :func:`resolve_rule`.

The "cpu" rule (bitsandbytes' CPU backend):

* 4-bit (bitsandbytes' torch ``quantize_4bit`` kernel): per block of ``blocksize``
  elements of the flattened weight, ``absmax = max |w|``; ``v = clamp(w * (1 / max(absmax,
  1e-38)), -1, 1)`` (the last, partial block divides instead: ``w / max(absmax, 1e-38)``,
  and stores the clamped absmax); nibble = nearest code value, ties to the lower one.
  Two nibbles per byte, the even element in the high nibble; an odd element count pads
  with a 0.0 element.
* nested absmax (bitsandbytes' C ``quantize_cpu``): ``offset = mean(absmax)``; blocks of
  256 of ``absmax - offset`` get their own absmax ``a``; ``v = clamp(x * (1 / a), -1, 1)``;
  the LUT slot ``trunc(((v + 1) * 0.5) * 65535 + 0.5)`` names the 8-bit code index. An
  all-zero block codes to index 0 with absmax 0.

The "cuda" rule (csrc/kernels.cu ``kQuantizeBlockwise`` / ``kQuantizeBlockwiseSmall``, built
with ``--use_fast_math``, so every float op flushes subnormals to zero):

* ``absmax = max |w|`` (subnormal ``w`` count as 0, nothing is floored, the partial last
  block is treated like the others, its missing elements read as 0.0); ``inv = 1 / absmax``
  (``MUFU.RCP``: inf for an all-zero block); ``v = w * inv``, not clamped. An all-zero block
  gives ``0 * inf = NaN``, and NaN fails every comparison, so it codes to nibble / index 0.
* NF4 (``dQuantizeNF4``): a comparison tree against float32 literals that are not the float32
  midpoints the CPU rule uses (4 of 15 differ by one ulp). FP4 (``dQuantizeFP4``): sign bit
  from ``v < 0``, magnitude from a tree on ``|v|`` with literals off by up to 14 ulps (so a tie
  on a negative boundary goes to the smaller magnitude, and a tiny nonzero ``v`` gives nibble
  8 when negative and 0 when positive, the reverse of the CPU rule).
* nested absmax (``dQuantize<0>``): a binary search over the sorted 256-entry dynamic code
  and a final comparison against the float32 midpoint ``(lo + hi) * 0.5f``: the nearest code
  value, a tie going to the even index. The CPU rule's 65536-slot LUT rounds ~0.2% of the
  codes of a typical weight differently. ``offset`` is torch's ``mean`` on the tensor's own
  device, as in bitsandbytes.

The kernel's reciprocal is the approximate ``MUFU.RCP`` (up to one ulp from the correctly
rounded ``1 / absmax``); the "cuda" rule here takes the correctly rounded one on every device (a
kernel of its own would not belong in this pure-numerics module), so a product within an ulp of a
decision boundary can rarely come out differently from bitsandbytes' CUDA bytes. Not yet measured on
a GPU: ``tests/formats/test_cuda_rule.py::test_cuda_tensor_packs_like_bitsandbytes_cuda`` will tell.

Packing streams over the flattened weight in chunks of whole blocks, so the only float32
copy of the weight is one chunk-sized working buffer.
"""

from __future__ import annotations

import torch

from qcompile.formats.codes import DYNAMIC_LUT_SIZE, dynamic_code, dynamic_lut, fourbit_bounds, fourbit_code
from qcompile.formats.fourbit import NESTED_BLOCKSIZE
from qcompile.formats.scheme import check_finite

# Elements per streaming chunk: a 4 MiB float32 working buffer. Measured on a 2-core AVX-512
# CPU (4096x4096, bf16 and fp32): 2**20 was fastest; 2**16 is ~1.5x slower (per-call
# overhead of the ~20 small ops per chunk), 2**22 ~1.2x slower (falls out of cache).
CHUNK_ELEMENTS = 1 << 20
# bitsandbytes clamps absmax to this before taking the reciprocal, so all-zero blocks
# scale to 0 instead of NaN.
_ABSMAX_FLOOR = 1e-38

RULES = ("cpu", "cuda")


def resolve_rule(rule: str | None, device: torch.device) -> str:
    """The rounding rule to pack with: ``rule`` itself, or by device when None.

    "cuda" for a CUDA tensor (what bitsandbytes' CUDA kernels write; ROCm builds share their
    source), "cpu" for any other (bitsandbytes' CPU backend).
    """
    if rule is None:
        return "cuda" if device.type == "cuda" else "cpu"
    if rule not in RULES:
        raise ValueError(f"rule: {rule!r} is not allowed; allowed: 'cpu', 'cuda', or None (by device)")
    return rule


def _ranks(scaled: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
    """Index of the nearest sorted code value (ties to the lower one), as uint8.

    Counting the boundaries below each value with 15 vectorized comparisons is several
    times faster on CPU than ``torch.bucketize``'s per-element binary search, and equal to it.
    """
    ranks = torch.zeros(scaled.shape, dtype=torch.uint8, device=scaled.device)
    for bound in bounds.tolist():
        ranks += scaled > bound
    return ranks


def _pack_nibbles(nibbles: torch.Tensor) -> torch.Tensor:
    """uint8 codes (even length) -> bytes with the even element in the high nibble."""
    pairs = nibbles.view(-1, 2)
    return (pairs[:, 0] << 4) | pairs[:, 1]


def _quantize_chunk(x: torch.Tensor, absmax_floor: torch.Tensor, bounds: torch.Tensor,
                    nibble_of_rank: torch.Tensor | None, divide: bool) -> torch.Tensor:
    """Nibbles of a [blocks, blocksize] float32 chunk, given each block's floored absmax."""
    if divide:
        scaled = x / absmax_floor[:, None]
    else:
        scaled = x * (1.0 / absmax_floor)[:, None]
    scaled.clamp_(-1, 1)
    ranks = _ranks(scaled, bounds)
    return ranks if nibble_of_rank is None else nibble_of_rank[ranks.long()]


def quantize_4bit(weight: torch.Tensor, blocksize: int, kind: str, name: str = "weight",
                  chunk_elements: int = CHUNK_ELEMENTS, rule: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise NF4/FP4 quantization of the flattened ``weight``.

    Returns ``(packed, absmax)``: packed uint8 [ceil(numel / 2)] (two codes per byte, high
    nibble first) and float32 absmax [ceil(numel / blocksize)], byte-identical to
    ``bitsandbytes.functional.quantize_4bit(weight, blocksize, quant_type=kind)`` on the device
    ``rule`` names ("cpu" or "cuda"; None: the weight's device, see :func:`resolve_rule`).
    Raises ValueError naming ``name`` if the weight holds NaN or Inf.
    """
    flat = weight.detach().contiguous().view(-1)
    device = flat.device
    if resolve_rule(rule, device) == "cuda":
        from qcompile.formats.blockwise_cuda import quantize_4bit_cuda

        return quantize_4bit_cuda(flat, blocksize, kind, name, chunk_elements)
    n = flat.numel()
    bounds, nibble_of_rank = fourbit_bounds(kind, device)
    full_blocks, rem = divmod(n, blocksize)
    absmax = torch.empty(full_blocks + (1 if rem else 0), dtype=torch.float32, device=device)
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=device)
    chunk_blocks = max(1, chunk_elements // blocksize)
    half = blocksize // 2  # blocksize is even, so every full block starts on a byte boundary

    for b0 in range(0, full_blocks, chunk_blocks):
        b1 = min(b0 + chunk_blocks, full_blocks)
        x = flat[b0 * blocksize:b1 * blocksize].view(b1 - b0, blocksize).float()
        block_absmax = x.abs().amax(dim=1)
        absmax[b0:b1] = block_absmax
        nibbles = _quantize_chunk(x, block_absmax.clamp(min=_ABSMAX_FLOOR), bounds, nibble_of_rank, divide=False)
        packed[b0 * half:b1 * half] = _pack_nibbles(nibbles.view(-1))

    if rem:
        # bitsandbytes treats the partial last block separately: it divides rather than
        # multiplying by the reciprocal, and stores the floored absmax.
        x = flat[full_blocks * blocksize:].float().view(1, rem)
        tail_absmax = x.abs().amax(dim=1).clamp(min=_ABSMAX_FLOOR)
        absmax[full_blocks:] = tail_absmax
        nibbles = _quantize_chunk(x, tail_absmax, bounds, nibble_of_rank, divide=True).view(-1)
        if rem % 2:
            # The pad element is a 0.0 quantized like any other value.
            zero = _quantize_chunk(torch.zeros(1, 1, device=device), torch.ones(1, device=device),
                                   bounds, nibble_of_rank, divide=True).view(-1)
            nibbles = torch.cat([nibbles, zero])
        packed[full_blocks * half:] = _pack_nibbles(nibbles)
    # NaN/Inf survive amax and clamp, so one look at the absmax vector after the loop
    # (a single device sync) catches a bad element anywhere in the weight.
    check_finite(absmax, name)
    return packed, absmax


def quantize_nested(absmax: torch.Tensor, rule: str | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Double quantization of float32 absmax values, as bitsandbytes' ``compress_statistics``.

    Returns ``(qabsmax uint8 [blocks], nested_absmax float32 [ceil(blocks / 256)],
    nested_code float32 [256], nested_offset)`` where ``offset = absmax.mean()`` and
    ``absmax ~= nested_code[qabsmax] * nested_absmax[i // 256] + offset``. ``rule`` as in
    :func:`quantize_4bit`; the two rules differ only in the codes (and, for subnormal centered
    values, the nested absmax).
    """
    device = absmax.device
    cuda_rule = resolve_rule(rule, device) == "cuda"
    offset = absmax.mean()  # same torch reduction as bitsandbytes, so the same float32 bits
    centered = absmax - offset
    n = centered.numel()
    blocks = -(-n // NESTED_BLOCKSIZE)
    padded = torch.zeros(blocks * NESTED_BLOCKSIZE, dtype=torch.float32, device=device)
    padded[:n] = centered
    padded = padded.view(blocks, NESTED_BLOCKSIZE)
    if cuda_rule:
        from qcompile.formats.blockwise_cuda import nested_codes_cuda

        codes, nested_absmax = nested_codes_cuda(padded)
        qabsmax = codes.view(-1)[:n].clone()
        return qabsmax, nested_absmax, dynamic_code(device).clone(), float(offset.item())
    # Zero padding cannot raise a block's absmax, so the partial block needs no special case.
    nested_absmax = padded.abs().amax(dim=1)
    inv = torch.where(nested_absmax == 0, torch.zeros_like(nested_absmax), 1.0 / nested_absmax)
    normed = (padded * inv[:, None]).clamp_(-1, 1)
    slots = (((normed + 1.0) * 0.5) * (DYNAMIC_LUT_SIZE - 1) + 0.5).to(torch.int32)
    codes = dynamic_lut(device)[slots.long()]
    codes[nested_absmax == 0] = 0
    qabsmax = codes.view(-1)[:n].clone()  # not a view: the padded tail would stay allocated
    return qabsmax, nested_absmax, dynamic_code(device).clone(), float(offset.item())


def dequantize_absmax(qabsmax: torch.Tensor, nested_absmax: torch.Tensor, nested_code: torch.Tensor,
                      nested_offset: float) -> torch.Tensor:
    """float32 absmax from its nested form: ``nested_code[q] * nested_absmax[i // 256] + offset``."""
    n = qabsmax.numel()
    scale = nested_absmax.repeat_interleave(NESTED_BLOCKSIZE)[:n]
    # Two separate float32 roundings (multiply, then add the offset), as bitsandbytes does.
    values = nested_code[qabsmax.long()] * scale
    return values + torch.tensor(nested_offset, dtype=torch.float32, device=values.device)


def byte_pair_table(code: torch.Tensor) -> torch.Tensor:
    """int64 [256]: entry ``b`` is the float32 pair ``(code[b >> 4], code[b & 0xF])`` viewed as one int64.

    A byte holds two codes, so looking a byte up in this table yields both values in one
    8-byte gather: the fastest gather torch has on CPU.
    """
    byte = torch.arange(256, device=code.device)
    pairs = torch.stack([code[byte >> 4], code[byte & 0xF]], dim=-1).float().contiguous()
    return pairs.view(torch.int64).view(-1)


def decode_workspace(max_bytes: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Buffers that :func:`decode_blocks` reuses across calls of up to ``max_bytes`` packed bytes.

    An int32 index, and off float32 an int64 scratch for the float32 products. Reusing them
    matters on CPU: a fresh multi-MiB buffer per call may come from the OS as new pages, and the
    page faults were seen to double a 4096x4096 decode's time in some processes and not others.
    """
    index = torch.empty(max_bytes, dtype=torch.int32, device=device)
    if dtype == torch.float32:
        return (index,)
    return index, torch.empty(max_bytes, dtype=torch.int64, device=device)


def decode_blocks(packed: torch.Tensor, absmax: torch.Tensor, pair_table: torch.Tensor, out: torch.Tensor,
                  workspace: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
    """Fill ``out`` with ``code[nibble] * absmax[block]`` for whole blocks of packed codes; returns ``out``.

    packed: uint8, the bytes of ``absmax.numel()`` whole blocks; absmax: their float32 absmax;
    pair_table: :func:`byte_pair_table` of the code; out: ``2 * packed.numel()`` contiguous elements
    of any float dtype; workspace: from :func:`decode_workspace` (allocated when not given).
    The products are float32, rounded once into ``out``'s dtype, as bitsandbytes does.
    """
    pairs = packed.numel()
    if workspace is None:
        workspace = decode_workspace(pairs, out.dtype, out.device)
    index = workspace[0][:pairs]
    index.copy_(packed.reshape(-1))
    target = out.view(torch.int64).view(-1) if out.dtype == torch.float32 else workspace[1][:pairs]
    # index_select with an int32 index is ~3.5x faster on CPU than `table[packed.long()]`
    # (1M bytes: 0.33 vs 1.2 ms): no int64 index, no advanced-indexing machinery. Same values.
    torch.index_select(pair_table, 0, index, out=target)
    values = target.view(torch.float32).view(absmax.numel(), -1)
    values.mul_(absmax.view(-1, 1))
    if out.dtype != torch.float32:
        out.view(values.shape).copy_(values)
    return out


def float_absmax(absmax: torch.Tensor, nested_absmax: torch.Tensor | None, nested_code: torch.Tensor | None,
                 nested_offset: float) -> torch.Tensor:
    """float32 absmax: ``absmax`` itself, or decoded from its nested (double-quantized) form."""
    if nested_absmax is None:
        return absmax.float()
    if nested_code is None:
        raise ValueError("nested_code: required when nested_absmax is given")
    return dequantize_absmax(absmax, nested_absmax, nested_code, nested_offset)


def absmax_of_blocks(absmax: torch.Tensor, nested_absmax: torch.Tensor | None, nested_code: torch.Tensor | None,
                     nested_offset: float, index: torch.Tensor) -> torch.Tensor:
    """float32 absmax of the blocks ``index`` (int64, any shape): ``float_absmax(...)[index]``, bit for bit.

    Decodes only the requested blocks, so reading a band of a weight costs in proportion to the band.
    """
    if nested_absmax is None:
        return absmax[index].float()
    if nested_code is None:
        raise ValueError("nested_code: required when nested_absmax is given")
    # The same two float32 roundings per element as dequantize_absmax (multiply, then add the offset).
    values = nested_code[absmax[index].long()] * nested_absmax[index // NESTED_BLOCKSIZE]
    return values + torch.tensor(nested_offset, dtype=torch.float32, device=values.device)


def dequantize_4bit_span(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, numel: int,
                         start: int, stop: int, dtype: torch.dtype, nested_absmax: torch.Tensor | None = None,
                         nested_code: torch.Tensor | None = None, nested_offset: float = 0.0,
                         chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """Elements ``[start, stop)`` of the flattened 4-bit weight of ``numel`` elements, in ``dtype``.

    Equal, bit for bit, to ``dequantize_4bit(...).view(-1)[start:stop]``, but decodes only the blocks the
    span overlaps: a span need not start or end on a block boundary (a band of rows of a weight whose
    in_features is not a multiple of ``blocksize`` straddles blocks), so the first and last blocks are
    decoded whole and trimmed. The result is a view of a buffer at most two blocks longer than the span.
    """
    if not 0 <= start <= stop <= numel:
        raise ValueError(f"span [{start}, {stop}) is not within the weight's {numel} elements")
    device = packed.device
    if start == stop:
        return torch.empty(0, dtype=dtype, device=device)
    flat = packed.reshape(-1)
    full = numel // blocksize  # whole blocks; a partial last block follows when numel % blocksize
    b0, b1 = start // blocksize, -(-stop // blocksize)  # the blocks the span overlaps
    scales = absmax_of_blocks(absmax, nested_absmax, nested_code, nested_offset,
                              torch.arange(b0, b1, device=device))
    table = byte_pair_table(code)
    half = blocksize // 2  # blocksize is even: every whole block starts on a byte boundary
    whole_end = min(b1, full)
    n_whole = max(0, whole_end - b0) * blocksize
    tail = numel - full * blocksize if b1 > full else 0
    buf = torch.empty(n_whole + tail, dtype=dtype, device=device)
    chunk_blocks = max(1, chunk_elements // blocksize)
    if whole_end > b0:
        workspace = decode_workspace(min(whole_end - b0, chunk_blocks) * half, dtype, device)
        for c0 in range(b0, whole_end, chunk_blocks):
            c1 = min(c0 + chunk_blocks, whole_end)
            decode_blocks(flat[c0 * half:c1 * half], scales[c0 - b0:c1 - b0], table,
                          buf[(c0 - b0) * blocksize:(c1 - b0) * blocksize], workspace)
    if tail:
        # The partial last block, as dequantize_4bit decodes it: float32 (its last byte may carry a pad
        # code), then one rounding into ``dtype``.
        values = torch.empty(2 * (flat.numel() - full * half), dtype=torch.float32, device=device)
        decode_blocks(flat[full * half:], scales[full - b0:], table, values)
        buf[n_whole:] = values[:tail]
    offset = b0 * blocksize
    return buf[start - offset:stop - offset]


def dequantize_4bit(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
                    shape: tuple[int, ...], dtype: torch.dtype,
                    nested_absmax: torch.Tensor | None = None, nested_code: torch.Tensor | None = None,
                    nested_offset: float = 0.0, chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """The weight from its packed 4-bit form: ``code[nibble] * absmax[block]`` in float32, cast to ``dtype``.

    ``absmax`` is float32, or uint8 codes when ``nested_absmax`` / ``nested_code`` are given.
    Equal, bit for bit, to ``bitsandbytes.functional.dequantize_4bit`` on CPU.
    Decodes ``chunk_elements`` at a time straight into the result, so the result is the only
    large allocation (fresh pages cost more than the decoding on CPU).
    """
    absmax = float_absmax(absmax, nested_absmax, nested_code, nested_offset)
    n = 1
    for size in shape:
        n *= size
    table = byte_pair_table(code)
    out = torch.empty(n, dtype=dtype, device=packed.device)
    flat = packed.reshape(-1)
    blocks = n // blocksize
    chunk_blocks = max(1, chunk_elements // blocksize)
    workspace = decode_workspace(min(blocks, chunk_blocks) * blocksize // 2, dtype, packed.device)
    half = blocksize // 2  # blocksize is even: every whole block starts on a byte boundary
    for b0 in range(0, blocks, chunk_blocks):
        b1 = min(b0 + chunk_blocks, blocks)
        decode_blocks(flat[b0 * half:b1 * half], absmax[b0:b1], table, out[b0 * blocksize:b1 * blocksize], workspace)
    full = blocks * blocksize
    if full < n:
        # The partial last block; with an odd count its last byte carries one pad code.
        tail = torch.empty(2 * (flat.numel() - full // 2), dtype=torch.float32, device=packed.device)
        decode_blocks(flat[full // 2:], absmax[blocks:], table, tail)
        out[full:] = tail[: n - full]
    return out.view(shape)


def dequantize_error_bound(kind: str) -> float:
    """Largest |w / absmax - code[nibble(w)]| over [-1, 1]: half the widest gap of the sorted code.

    ``|w - dequantize(w)| <= absmax_of_block * dequantize_error_bound(kind)`` (plus float
    rounding) for every element; used by the property tests.
    """
    code = fourbit_code(kind).sort().values
    return float(((code[1:] - code[:-1]) / 2).max())
