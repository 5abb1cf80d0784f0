"""The packed form of an NF4 / FP4 weight and its bitsandbytes state-dict round trip."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import torch

from qcompile.dtypes import dtype_name, parse_dtype
from qcompile.formats import blockwise
from qcompile.formats.codes import fourbit_code
from qcompile.formats.fourbit import NESTED_BLOCKSIZE, QUANT_STORAGE_DTYPES, FourBitScheme
from qcompile.formats.scheme import PackedWeight

_QUANT_STATE_PREFIX = "weight.quant_state.bitsandbytes__"


class Packed4bit(PackedWeight):
    """An NF4 / FP4 weight (``qcompile::linear_4bit`` runs it).

    packed: uint8 [ceil(N*K / 2)], two codes per byte, high nibble first, over the flattened
        row-major [N, K] weight. ``scheme.quant_storage`` only matters in :meth:`to_bitsandbytes`.
    absmax: float32 [blocks], or uint8 [blocks] with double quant.
    code: float32 [16], the value of each nibble.
    nested_absmax: float32 [ceil(blocks / 256)] with double quant, else None.
    nested_code: float32 [256] (bitsandbytes' dynamic 8-bit code) with double quant, else None.
    nested_offset: the mean subtracted from absmax before nesting (0.0 without double quant).
    """

    scheme: FourBitScheme

    def __init__(self, scheme: FourBitScheme, shape: tuple[int, int], dtype: torch.dtype, packed: torch.Tensor,
                 absmax: torch.Tensor, code: torch.Tensor, nested_absmax: torch.Tensor | None = None,
                 nested_code: torch.Tensor | None = None, nested_offset: float = 0.0) -> None:
        self.scheme = scheme
        self.shape = (int(shape[0]), int(shape[1]))
        self.dtype = dtype
        self.packed = packed
        self.absmax = absmax
        self.code = code
        self.nested_absmax = nested_absmax
        self.nested_code = nested_code
        self.nested_offset = float(nested_offset)

    @classmethod
    def quantize(cls, weight: torch.Tensor, scheme: FourBitScheme, name: str = "weight",
                 rule: str | None = None) -> Packed4bit:
        """Pack ``weight`` with ``scheme``; bytes equal bitsandbytes' ``quantize_4bit`` on the weight's device
        (``rule``: "cpu" or "cuda" to force bitsandbytes' CPU or CUDA rounding, see ``blockwise.resolve_rule``)."""
        with torch.no_grad():
            packed, absmax = blockwise.quantize_4bit(weight, scheme.blocksize, scheme.kind, name, rule=rule)
            code = fourbit_code(scheme.kind, weight.device).clone()
            if not scheme.double_quant:
                return cls(scheme, tuple(weight.shape), weight.dtype, packed, absmax, code)
            qabsmax, nested_absmax, nested_code, offset = blockwise.quantize_nested(absmax, rule=rule)
        return cls(scheme, tuple(weight.shape), weight.dtype, packed, qabsmax, code, nested_absmax, nested_code,
                   offset)

    # ---- op interface ------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor | None]:
        return {
            "packed": self.packed,
            "absmax": self.absmax,
            "code": self.code,
            "nested_absmax": self.nested_absmax,
            "nested_code": self.nested_code,
        }

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The [N, K] weight in ``dtype`` (default: the original weight's dtype).

        Bit-identical to ``bitsandbytes.functional.dequantize_4bit`` on CPU.
        """
        return blockwise.dequantize_4bit(
            self.packed, self.absmax, self.code, self.scheme.blocksize, self.shape, dtype or self.dtype,
            self.nested_absmax, self.nested_code, self.nested_offset,
        )

    def dequantize_rows(self, start: int, stop: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Rows ``[start, stop)`` as ``dequantize(dtype)[start:stop]``, bit for bit; decodes only their blocks
        (plus the two blocks a band shares with its neighbours when in_features is not a multiple of blocksize)."""
        self._check_band(start, stop, axis=0)
        n, k = self.shape
        flat = blockwise.dequantize_4bit_span(
            self.packed, self.absmax, self.code, self.scheme.blocksize, n * k, start * k, stop * k,
            dtype or self.dtype, self.nested_absmax, self.nested_code, self.nested_offset,
        )
        return flat.view(stop - start, k)

    def column_band_step(self) -> int | None:
        """The blocksize when every row holds whole blocks (in_features a multiple of it), else None:
        a column band is then a set of whole blocks per row; otherwise blocks straddle rows."""
        blocksize = self.scheme.blocksize
        return blocksize if self.shape[1] % blocksize == 0 else None

    def dequantize_cols(self, start: int, stop: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Columns ``[start, stop)`` as ``dequantize(dtype)[:, start:stop]``, bit for bit; they must start and
        stop on multiples of the blocksize, in a weight whose in_features is one (:meth:`column_band_step`)."""
        step = self.column_band_step()
        if step is None:
            raise ValueError(f"in_features {self.shape[1]} is not a multiple of blocksize {self.scheme.blocksize}: "
                             "blocks straddle rows, read the weight by rows (dequantize_rows)")
        self._check_band(start, stop, axis=1, step=step)
        n, k = self.shape
        out = torch.empty((n, stop - start), dtype=dtype or self.dtype, device=self.packed.device)
        if start == stop:
            return out
        blocks_per_row = k // step
        first, last = start // step, stop // step
        device = self.packed.device
        index = (torch.arange(n, device=device)[:, None] * blocks_per_row
                 + torch.arange(first, last, device=device)[None, :]).reshape(-1)
        scales = blockwise.absmax_of_blocks(self.absmax, self.nested_absmax, self.nested_code, self.nested_offset,
                                            index)
        band = self.packed.view(n, k // 2)[:, start // 2:stop // 2]
        return blockwise.decode_blocks(band, scales, blockwise.byte_pair_table(self.code), out)

    # ---- bitsandbytes ------------------------------------------------------
    def _quant_state_json(self) -> dict[str, Any]:
        # Same keys, order and values as QuantState.as_dict()'s non-tensor part.
        state: dict[str, Any] = {
            "quant_type": self.scheme.kind,
            "blocksize": self.scheme.blocksize,
            "dtype": dtype_name(self.dtype),
            "shape": list(self.shape),
        }
        if self.scheme.double_quant:
            state.update(nested_blocksize=NESTED_BLOCKSIZE, nested_dtype="float32", nested_offset=self.nested_offset)
        return state

    def to_bitsandbytes(self) -> dict[str, torch.Tensor]:
        """What ``bitsandbytes.nn.Linear4bit`` writes into its state dict, keys relative to the module.

        ``weight`` is the packed bytes viewed as ``quant_storage``, shape ((N*K+1)//2 // itemsize, 1).
        Tensors share storage with this object (like a state dict), except the JSON quant state.
        """
        storage = self.scheme.quant_storage
        weight = self.packed if storage == torch.uint8 else self.packed.view(storage)
        out = {
            "weight": weight.unsqueeze(1),
            "weight.absmax": self.absmax,
            "weight.quant_map": self.code,
        }
        if self.scheme.double_quant:
            out["weight.nested_absmax"] = self.nested_absmax
            out["weight.nested_quant_map"] = self.nested_code
        blob = json.dumps(self._quant_state_json()).encode("utf-8")
        out[_QUANT_STATE_PREFIX + self.scheme.kind] = torch.tensor(list(blob), dtype=torch.uint8)
        return out

    @classmethod
    def _bnb_matches(cls, state: Mapping[str, torch.Tensor]) -> bool:
        return any(key.startswith(_QUANT_STATE_PREFIX) for key in state)

    @classmethod
    def _from_bnb(cls, state: Mapping[str, torch.Tensor], compute_dtype: torch.dtype | None) -> Packed4bit:
        from qcompile.formats.scheme import scheme_class

        keys = [k for k in state if k.startswith(_QUANT_STATE_PREFIX)]
        if len(keys) != 1:
            raise ValueError(f"state: expected one '{_QUANT_STATE_PREFIX}nf4' or '...fp4' entry, found {keys}")
        kind = keys[0][len(_QUANT_STATE_PREFIX):]
        if kind not in ("nf4", "fp4"):
            raise ValueError(f"{keys[0]}: unknown 4-bit quant type {kind!r}; allowed: nf4, fp4")
        meta = json.loads(bytes(state[keys[0]].cpu().tolist()).decode("utf-8"))
        for key in ("weight", "weight.absmax", "weight.quant_map"):
            if key not in state:
                raise ValueError(f"{key}: missing from the bitsandbytes 4-bit state dict")
        shape = meta.get("shape")
        if not isinstance(shape, list) or len(shape) != 2:
            raise ValueError(f"{keys[0]}.shape: expected a 2-D weight shape, got {shape!r}")
        weight = state["weight"]
        quant_storage = parse_dtype(weight.dtype, "weight.dtype", QUANT_STORAGE_DTYPES)
        nested = "nested_absmax" in meta or "weight.nested_absmax" in state
        scheme = scheme_class(kind)(
            blocksize=int(meta["blocksize"]),
            double_quant=nested,
            compute_dtype=compute_dtype or torch.float32,
            quant_storage=quant_storage,
        )
        dtype = parse_dtype(meta["dtype"], f"{keys[0]}.dtype", (torch.float32, torch.float16, torch.bfloat16))
        packed = weight.contiguous().view(-1).view(torch.uint8)
        if nested:
            for key in ("weight.nested_absmax", "weight.nested_quant_map"):
                if key not in state:
                    raise ValueError(f"{key}: missing from a double-quantized bitsandbytes state dict")
            return cls(scheme, tuple(shape), dtype, packed, state["weight.absmax"], state["weight.quant_map"],
                       state["weight.nested_absmax"], state["weight.nested_quant_map"],
                       float(meta["nested_offset"]))
        return cls(scheme, tuple(shape), dtype, packed, state["weight.absmax"], state["weight.quant_map"])
