"""The reference ops' row-band linear: decode a band of output features, multiply, move on.

No float copy of the whole weight is made: a band holds about ``chunk_weights`` weights but at least
MIN_BAND_ROWS rows, since the matmul of a narrow band is inefficient for large M (K=14336, M=256:
73-row bands 1.4x slower than 292-row ones, measured for the 4-bit reference).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from qcompile.formats.blockwise import CHUNK_ELEMENTS

MIN_BAND_ROWS = 128


def band_rows(in_features: int, chunk_weights: int = CHUNK_ELEMENTS) -> int:
    """Rows (output features) per band for a weight with ``in_features`` columns."""
    return max(MIN_BAND_ROWS, chunk_weights // in_features)


def banded_linear(x: torch.Tensor, bias: torch.Tensor | None, out_features: int, in_features: int,
                  compute_dtype: torch.dtype, decode_rows: Callable[[int, int], torch.Tensor],
                  chunk_weights: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """``F.linear(x, W, bias)`` in ``compute_dtype`` (x and bias cast to it), cast back to x's dtype, where
    ``decode_rows(start, stop)`` gives rows ``[start, stop)`` of W in ``compute_dtype``."""
    x_c = x.to(compute_dtype)
    bias_c = None if bias is None else bias.to(compute_dtype)
    rows = band_rows(in_features, chunk_weights)
    out = x_c.new_empty((*x.shape[:-1], out_features))
    for start in range(0, out_features, rows):
        stop = min(start + rows, out_features)
        out[..., start:stop] = F.linear(x_c, decode_rows(start, stop), None if bias_c is None else bias_c[start:stop])
    return out.to(x.dtype)
