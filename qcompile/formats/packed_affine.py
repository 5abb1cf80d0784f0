"""The packed form of an affine group-wise integer weight, in the GPTQ checkpoint layout.

    qweight  int32 [in_features * bits / 32, out_features]   integers packed along in_features
    qzeros   int32 [groups, out_features * bits / 32]         ``zero - 1`` packed along out_features
    scales   float16 [groups, out_features]
    g_idx    int32 [in_features]                              the group of each input feature

(word layout: ``int32_words.py``). ``W[n, k] = (q[k, n] - zero[g, n]) * scale[g, n]`` with
``g = g_idx[k]``, computed in float32. Schemes with float zero points (HQQ) keep ``zeros`` float16
[groups, out_features] instead of ``qzeros``. AWQ quantizes ``W * s`` (s per input feature) and keeps
``input_scale = 1 / s`` float32 [in_features]: ``W[n, k]`` is then the above times ``input_scale[k]``
(``x / s`` against the quantized ``W * s``).
"""

from __future__ import annotations

import torch

from qcompile.formats.affine import AffineScheme
from qcompile.formats.int32_words import pack_int32, run_length, unpack_int32
from qcompile.formats.scheme import PackedWeight


def decode_affine(qweight: torch.Tensor, qzeros: torch.Tensor | None, zeros: torch.Tensor | None,
                  scales: torch.Tensor, g_idx: torch.Tensor, bits: int, out_features: int,
                  rows: slice = slice(None), dtype: torch.dtype = torch.float32,
                  input_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Output features ``rows`` of the weight, ``[len(rows), in_features]`` in ``dtype`` (float32 math).

    ``qweight`` may be a slice of whole int32 runs along in_features (with ``g_idx`` and ``input_scale``
    sliced to match): the result then holds those input features only.
    """
    q = unpack_int32(qweight[:, rows], bits, 0, g_idx.numel()).float()  # [k, n]
    if qzeros is not None:
        zero = (unpack_int32(qzeros, bits, 1, out_features)[:, rows] + 1).float()
    else:
        zero = zeros[:, rows].float()
    index = g_idx.long()
    weight_t = (q - zero[index]) * scales[:, rows].float()[index]
    if input_scale is not None:
        weight_t = weight_t * input_scale.float()[:, None]
    return weight_t.t().to(dtype)


class PackedAffine(PackedWeight):
    """An affine group-wise integer weight (``affine``, ``hqq``; GPTQ's checkpoint tensors)."""

    scheme: AffineScheme

    def __init__(self, scheme: AffineScheme, shape: tuple[int, int], dtype: torch.dtype, qweight: torch.Tensor,
                 qzeros: torch.Tensor | None, zeros: torch.Tensor | None, scales: torch.Tensor,
                 g_idx: torch.Tensor, input_scale: torch.Tensor | None = None) -> None:
        if (qzeros is None) == (zeros is None):
            raise ValueError("exactly one of qzeros (integer zero points) and zeros (float16) is expected")
        self.scheme = scheme
        self.shape = (int(shape[0]), int(shape[1]))
        self.dtype = dtype
        self.qweight = qweight
        self.qzeros = qzeros
        self.zeros = zeros
        self.scales = scales
        self.g_idx = g_idx
        self.input_scale = input_scale

    @classmethod
    def quantize(cls, weight: torch.Tensor, scheme: AffineScheme, scale: torch.Tensor, zero: torch.Tensor,
                 input_scale: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> PackedAffine:
        """Quantize ``weight`` [N, K] with per-group ``scale`` and ``zero`` ([N, groups], float32): the
        integers are computed with the float16 scale (and zero) that is stored, so they agree. ``input_scale``
        (AWQ) is kept as given; ``dtype`` is the original weight's (default ``weight.dtype``)."""
        out_features, in_features = weight.shape
        maxq = 2**scheme.bits - 1
        with torch.no_grad():
            scales = scale.t().contiguous().to(torch.float16)  # [groups, N]
            g_idx = (torch.arange(in_features, device=weight.device) // (in_features // scales.shape[0]))
            s = scales.float().t()[:, g_idx]  # [N, K]
            if scheme.integer_zeros:
                z = zero.round()  # [N, groups]
                q = torch.clamp(torch.round(weight.float() / s) + z[:, g_idx], 0, maxq)
                return cls.from_integers(scheme, q, scale, z, g_idx, dtype or weight.dtype, input_scale)
            zeros = zero.t().contiguous().to(torch.float16)
            q = torch.clamp(torch.round(weight.float() / s + zeros.float().t()[:, g_idx]), 0, maxq)
            qweight = pack_int32(q.to(torch.int64).t(), scheme.bits, 0)
        return cls(scheme, (out_features, in_features), dtype or weight.dtype, qweight, None, zeros, scales,
                   g_idx.to(torch.int32), input_scale)

    @classmethod
    def from_integers(cls, scheme: AffineScheme, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                      g_idx: torch.Tensor, dtype: torch.dtype, input_scale: torch.Tensor | None = None) -> PackedAffine:
        """Pack integers ``q`` [N, K] in ``[0, 2**bits)`` with their groups' ``scale`` (stored float16) and
        integer ``zero`` ([N, groups]) and each input feature's group ``g_idx`` [K] (GPTQ's act-order
        permutes it)."""
        out_features, in_features = q.shape
        qweight = pack_int32(q.to(torch.int64).t(), scheme.bits, 0)
        qzeros = pack_int32((zero.t().round() - 1).to(torch.int64), scheme.bits, 1)
        return cls(scheme, (out_features, in_features), dtype, qweight, qzeros, None,
                   scale.t().contiguous().to(torch.float16), g_idx.to(torch.int32), input_scale)

    @classmethod
    def from_gptq(cls, scheme: AffineScheme, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                  g_idx: torch.Tensor | None = None, dtype: torch.dtype = torch.float16) -> PackedAffine:
        """A GPTQ checkpoint's tensors (format v1: ``qzeros`` holds ``zero - 1``), checked against ``scheme``."""
        per_run, words = run_length(scheme.bits)
        out_features = scales.shape[1]
        in_features = qweight.shape[0] * per_run // words
        expected = {"qweight": (in_features * words // per_run, out_features),
                    "qzeros": (scales.shape[0], out_features * words // per_run),
                    "scales": (scheme.groups(in_features), out_features)}
        for name, tensor in (("qweight", qweight), ("qzeros", qzeros), ("scales", scales)):
            if tuple(tensor.shape) != expected[name]:
                raise ValueError(f"{name}: shape {tuple(tensor.shape)}, expected {expected[name]} for {scheme}")
        if g_idx is None:
            g_idx = torch.arange(in_features, device=qweight.device) // (in_features // scales.shape[0])
        return cls(scheme, (out_features, in_features), dtype, qweight.to(torch.int32), qzeros.to(torch.int32),
                   None, scales.to(torch.float16), g_idx.to(torch.int32))

    @classmethod
    def from_awq(cls, scheme: AffineScheme, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                 dtype: torch.dtype = torch.float16) -> PackedAffine:
        """An AutoAWQ GEMM checkpoint's tensors (4-bit): ``qweight`` int32 [K, N / 8] and ``qzeros`` int32
        [groups, N / 8], packed along out_features with AWQ's interleave (nibble ``i`` of a word holds column
        ``AWQ_ORDER[i]`` of its 8), ``scales`` float16 [groups, N]; zero points as they are (no ``- 1``).
        Repacked into GPTQ's layout, the zero points as float16 (exact: a zero of 0, which GPTQ's layout
        cannot hold, is common in AWQ checkpoints)."""
        if scheme.bits != 4:
            raise ValueError(f"awq checkpoints hold 4-bit weights; the scheme has bits={scheme.bits}")
        in_features, out_features = qweight.shape[0], qweight.shape[1] * 8
        groups = scheme.groups(in_features)
        expected = {"qzeros": (groups, out_features // 8), "scales": (groups, out_features)}
        for name, tensor in (("qzeros", qzeros), ("scales", scales)):
            if tuple(tensor.shape) != expected[name]:
                raise ValueError(f"{name}: shape {tuple(tensor.shape)}, expected {expected[name]} for {scheme}")
        q = _unpack_awq(qweight)  # [K, N]
        zeros = _unpack_awq(qzeros).to(torch.float16)  # [groups, N]
        g_idx = torch.arange(in_features, device=qweight.device) // (in_features // groups)
        return cls(scheme, (out_features, in_features), dtype, pack_int32(q.to(torch.int64), 4, 0), None, zeros,
                   scales.to(torch.float16), g_idx.to(torch.int32))

    def gptq_reason(self) -> str | None:
        """Why GPTQ's checkpoint layout cannot hold this weight (float zero points, an input scale), or None."""
        if self.qzeros is None:
            return "its zero points are float16 (hqq, quanto, an AWQ checkpoint), which GPTQ's qzeros cannot hold"
        if self.input_scale is not None:
            return "it has AWQ's per-input-feature scale, which GPTQ's layout cannot hold"
        return None

    def to_gptq(self) -> dict[str, torch.Tensor]:
        """The module's entries in a GPTQ (v1) checkpoint: ``qweight``, ``qzeros``, ``scales``, ``g_idx``."""
        reason = self.gptq_reason()
        if reason is not None:
            raise ValueError(f"no GPTQ layout: {reason}")
        return {"qweight": self.qweight, "qzeros": self.qzeros, "scales": self.scales, "g_idx": self.g_idx}

    def tensors(self) -> dict[str, torch.Tensor | None]:
        return {"qweight": self.qweight, "qzeros": self.qzeros, "zeros": self.zeros, "scales": self.scales,
                "g_idx": self.g_idx, "input_scale": self.input_scale}

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The [N, K] weight in ``dtype`` (default: the original weight's dtype)."""
        return decode_affine(self.qweight, self.qzeros, self.zeros, self.scales, self.g_idx, self.scheme.bits,
                             self.shape[0], dtype=dtype or self.dtype, input_scale=self.input_scale)

    def dequantize_rows(self, start: int, stop: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``dequantize(dtype)[start:stop]``, bit for bit (the arithmetic is per element)."""
        self._check_band(start, stop, axis=0)
        return decode_affine(self.qweight, self.qzeros, self.zeros, self.scales, self.g_idx, self.scheme.bits,
                             self.shape[0], slice(start, stop), dtype or self.dtype, self.input_scale)

    def column_band_step(self) -> int | None:
        return run_length(self.scheme.bits)[0]

    def dequantize_cols(self, start: int, stop: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``dequantize(dtype)[:, start:stop]`` with ``start``, ``stop`` on whole int32 runs."""
        per_run, words = run_length(self.scheme.bits)
        self._check_band(start, stop, axis=1, step=per_run)
        qweight = self.qweight[start // per_run * words : -(-stop // per_run) * words]
        input_scale = None if self.input_scale is None else self.input_scale[start:stop]
        return decode_affine(qweight, self.qzeros, self.zeros, self.scales, self.g_idx[start:stop],
                             self.scheme.bits, self.shape[0], dtype=dtype or self.dtype, input_scale=input_scale)


# AutoAWQ's GEMM interleave: nibble i of a word holds column AWQ_ORDER[i] of the word's 8 columns.
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def _unpack_awq(words: torch.Tensor) -> torch.Tensor:
    """int32 [rows, cols / 8] in AWQ's interleaved 4-bit layout -> int32 [rows, cols]."""
    nibbles = torch.stack([(words.to(torch.int64) >> (4 * i)) & 0xF for i in range(8)], -1)  # [rows, words, 8]
    columns = torch.empty_like(nibbles)
    columns[..., list(AWQ_ORDER)] = nibbles
    return columns.reshape(words.shape[0], -1).to(torch.int32)
