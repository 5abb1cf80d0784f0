"""GPTQ: affine group-wise integers chosen column by column with second-order error compensation.

Settings as transformers' ``GPTQConfig`` names them: ``bits``, ``group_size``, ``sym``, ``desc_act``
(act-order: quantize columns in order of decreasing Hessian diagonal), ``damp_percent`` (added to the
Hessian's diagonal, times its mean), ``static_groups`` (with act-order: each group's scale and zero
from the original column order, fixed before any update). Stored in GPTQ's checkpoint layout
(``packed_affine.py``), so the result loads wherever GPTQ checkpoints do.

GPTQ needs calibration data: the Hessian ``H = X^T X`` of each linear's inputs, which
:func:`qcompile.calibrate` records; :meth:`GPTQ.pack` alone refuses. The solver (AutoGPTQ's
``fasterquant``), for W [N, K] and H [K, K]:

    dead columns (H[k, k] == 0): W[:, k] = 0, H[k, k] = 1; act-order: permute W's columns and H
    H += damp_percent * mean(diag(H)) * I;  U = upper Cholesky factor of H^-1
    for each block of columns, for each column k in it:
        at a group's first column: (scale, zero) of the group's columns as they are now
        q = clamp(round(w_k / scale) + zero, 0, 2**bits - 1);  e = (w_k - (q - zero) * scale) / U[k, k]
        the block's later columns -= e * U[k, later]          (then the rest of W, once per block)
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from qcompile.formats.affine import AffineScheme, round_to_nearest_params
from qcompile.formats.observations import Observations
from qcompile.formats.scheme import check_finite, check_type, register_scheme

# Columns solved before the rest of W is updated (AutoGPTQ's blocksize); a multiple of the group size.
BLOCK_COLUMNS = 128
# Damping added on a failed Cholesky factorization, as GPTQModel retries (up to a damping of 1).
DAMP_STEP = 0.01


@register_scheme
@dataclasses.dataclass(frozen=True)
class GPTQ(AffineScheme):
    """GPTQ (see the module docstring). Defaults as transformers' GPTQConfig: 4 bits, group 128, symmetric, no
    act-order, damping 0.1 (on all-MiniLM-L6-v2 at int4 group 128, mean cosine vs fp32: 0.9504 symmetric,
    0.9797 with sym=False, 0.9821 with sym=False and desc_act=True, where damping 0.01 gave 0.9766).
    """

    kind = "gptq"
    sym: bool = True
    desc_act: bool = False
    damp_percent: float = 0.1
    static_groups: bool = False

    calibration: ClassVar[str | None] = "hessian"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_type(self, "desc_act", bool)
        check_type(self, "static_groups", bool)
        if isinstance(self.damp_percent, int) and not isinstance(self.damp_percent, bool):
            object.__setattr__(self, "damp_percent", float(self.damp_percent))
        check_type(self, "damp_percent", float)
        if not 0 < self.damp_percent < 1:
            raise ValueError(f"gptq.damp_percent: {self.damp_percent} is not allowed; allowed: 0 < damp_percent < 1")

    def pack(self, weight: torch.Tensor, name: str = "weight"):
        raise ValueError(f"{name}: gptq needs calibration data (the Hessian of the layer's inputs): quantize with "
                         "qcompile.calibrate(model, batches, config) before compiling")

    def pack_calibrated(self, weight: torch.Tensor, observations: Observations, name: str = "weight"):
        """Quantize ``weight`` [N, K] given the recorded ``observations.hessian`` [K, K] (X^T X)."""
        from qcompile.formats.packed_affine import PackedAffine

        reason = self.unsupported_reason(tuple(weight.shape), weight.dtype)
        if reason is not None:
            raise ValueError(f"{name}: cannot pack with gptq: {reason}")
        if observations.hessian is None:
            raise ValueError(f"{name}: no inputs were recorded for it; gptq needs the Hessian of its inputs")
        q, scale, zero, g_idx = solve(weight.detach().float(), observations.hessian.float(), self, name)
        return PackedAffine.from_integers(self, q, scale, zero, g_idx, weight.dtype)


def _group_params(columns: torch.Tensor, scheme: GPTQ, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, zero)`` [N] of one group's columns [N, G], the scale rounded to the float16 that is stored."""
    per_channel = dataclasses.replace(scheme, group_size=-1)
    scale, zero = round_to_nearest_params(columns, per_channel, name)
    return scale[:, 0].half().float(), zero[:, 0]


def _inverse_factor(hessian: torch.Tensor, damp_percent: float, name: str) -> torch.Tensor:
    """Upper Cholesky factor of the damped Hessian's inverse, raising the damping until it factors."""
    mean_diag = float(torch.diagonal(hessian).mean())
    damp = damp_percent
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    while True:
        lower, info = torch.linalg.cholesky_ex(hessian + damp * mean_diag * eye)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0:
                return upper
        if damp + DAMP_STEP >= 1:
            raise ValueError(f"{name}: the Hessian of its inputs is not positive definite even with damping {damp:.2f} "
                             "(too few or degenerate calibration inputs?)")
        damp += DAMP_STEP


def solve(weight: torch.Tensor, hessian: torch.Tensor, scheme: GPTQ,
          name: str = "weight") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ on float32 ``weight`` [N, K] and ``hessian`` [K, K]: ``(q [N, K], scale [N, G], zero [N, G],
    g_idx [K])`` with ``q`` and ``g_idx`` in the original column order."""
    check_finite(weight, name)
    check_finite(hessian, name, " (in the Hessian of its inputs)")
    out_features, in_features = weight.shape
    maxq = 2**scheme.bits - 1
    group = in_features if scheme.group_size == -1 else scheme.group_size
    w = weight.clone()
    h = hessian.clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    # Per channel, or static groups: every group's parameters from the weight before any update.
    fixed = None
    if scheme.static_groups or group == in_features:
        fixed = [_group_params(w[:, g : g + group], scheme, name) for g in range(0, in_features, group)]
    perm = torch.argsort(torch.diagonal(h), descending=True) if scheme.desc_act else torch.arange(in_features)
    w, h = w[:, perm], h[perm][:, perm]
    upper = _inverse_factor(h, scheme.damp_percent, name)
    q = torch.empty_like(w)
    scales: list[torch.Tensor] = []
    zeros: list[torch.Tensor] = []
    block = group * max(1, BLOCK_COLUMNS // group) if group < in_features else BLOCK_COLUMNS
    scale = zero = None
    for start in range(0, in_features, block):
        stop = min(start + block, in_features)
        w1 = w[:, start:stop].clone()
        errors = torch.empty_like(w1)
        inv = upper[start:stop, start:stop]
        for i in range(stop - start):
            col = start + i
            if fixed is not None:
                scale, zero = fixed[int(perm[col]) // group]
            elif col % group == 0:
                # The group's columns as they are now (this block's updates so far included; a group never
                # straddles blocks, since the block is a multiple of the group size).
                scale, zero = _group_params(w1[:, i : i + group], scheme, name)
                scales.append(scale)
                zeros.append(zero)
            column = w1[:, i]
            q_col = torch.clamp(torch.round(column / scale) + zero, 0, maxq)
            q[:, col] = q_col
            error = (column - (q_col - zero) * scale) / inv[i, i]
            w1[:, i:] -= error[:, None] * inv[i, i:][None, :]
            errors[:, i] = error
        w[:, stop:] -= errors @ upper[start:stop, stop:]
    inverse_perm = torch.argsort(perm)
    q = q[:, inverse_perm]
    groups_in_order = torch.arange(in_features) // group
    if fixed is not None:  # groups of the original column order
        scale_table, zero_table = torch.stack([s for s, _ in fixed], 1), torch.stack([z for _, z in fixed], 1)
        return q.to(torch.int64), scale_table, zero_table, groups_in_order
    # Groups were runs of the (possibly permuted) solving order: column k is in the group of its position.
    g_idx = groups_in_order[inverse_perm] if scheme.desc_act else groups_in_order
    return q.to(torch.int64), torch.stack(scales, 1), torch.stack(zeros, 1), g_idx
