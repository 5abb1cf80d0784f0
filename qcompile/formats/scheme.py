"""The Scheme base class, the scheme registry and the PackedWeight interface.

A scheme is a frozen dataclass naming one quantization format and its settings
(``NF4(blocksize=64, double_quant=True)``). Each format lives in its own file,
subclasses :class:`Scheme`, and registers itself with :func:`register_scheme`
under its config-file name; that registry is the only place a config ``"type"``
is turned into a class, so adding a format is adding one file.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from qcompile.dtypes import dtype_name, parse_dtype

_SCHEMES: dict[str, type[Scheme]] = {}

# The input gradient ``grad @ W`` (:meth:`PackedWeight.grad_input`) reads W one band at a time, so a
# backward never holds the whole floating-point weight (bitsandbytes' 4-bit backward dequantizes all
# of it: 448 MiB in bf16 for a 70B model's 28672x8192 MLP weight, per call). A band holds about
# GRAD_BAND_ELEMENTS elements (2 MiB in bf16, 4 MiB in fp32: the size of the decode's cache-friendly
# chunk, blockwise.CHUNK_ELEMENTS), but at least MIN_GRAD_BAND columns (or rows), since the matmul of
# a narrower band runs below the GEMM's speed; so a band holds at most
# max(GRAD_BAND_ELEMENTS, MIN_GRAD_BAND * out_features) elements (7 MiB in bf16 for out_features 28672).
# Measured on a 2-core AVX-512 CPU (NF4 + double quant, bf16, 4096x4096 / 11008x4096 / 4096x11008,
# M = 16, 512, 2048 rows of grad): column bands take 0.7-1.05x the time of the whole-weight version.
GRAD_BAND_ELEMENTS = 1 << 20
MIN_GRAD_BAND = 128


def register_scheme(cls: type[Scheme]) -> type[Scheme]:
    """Class decorator: make ``cls`` loadable from configs under ``cls.kind``."""
    if cls.kind in _SCHEMES and _SCHEMES[cls.kind] is not cls:
        raise ValueError(f"scheme kind {cls.kind!r} is registered twice")
    _SCHEMES[cls.kind] = cls
    return cls


def scheme_kinds() -> tuple[str, ...]:
    """The config names of all registered schemes."""
    _import_formats()
    return tuple(sorted(_SCHEMES))


def scheme_class(kind: str, key: str = "type") -> type[Scheme]:
    """The scheme class registered under ``kind``; ValueError naming ``key`` if there is none."""
    _import_formats()
    if not isinstance(kind, str) or kind not in _SCHEMES:
        raise ValueError(f"{key}: unknown quantization type {kind!r}; allowed: {', '.join(sorted(_SCHEMES))}")
    return _SCHEMES[kind]


def scheme_from_dict(data: Mapping[str, Any], key: str = "scheme") -> Scheme:
    """Build a scheme from ``{"type": "nf4", ...settings}``."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{key}: expected an object with a 'type' key, got {type(data).__name__} {data!r}")
    if "type" not in data:
        raise ValueError(f"{key}.type: missing; allowed: {', '.join(scheme_kinds())}")
    cls = scheme_class(data["type"], key=f"{key}.type")
    settings = {k: v for k, v in data.items() if k != "type"}
    return cls.from_settings(settings, key=key)


def _import_formats() -> None:
    # The format modules register themselves on import; importing the package
    # here (not at qcompile import time) keeps `import qcompile` cheap.
    import qcompile.formats  # noqa: F401


@dataclasses.dataclass(frozen=True)
class Scheme:
    """Base of all quantization schemes. Subclasses are frozen dataclasses."""

    kind: ClassVar[str] = ""
    # What a scheme needs recorded from calibration data before it can pack (``formats/observations.py``:
    # ``"hessian"`` for GPTQ, ``"activations"`` for AWQ); None: it packs from the weight alone.
    calibration: ClassVar[str | None] = None
    # Fields holding a torch.dtype; they are written to configs by name.
    dtype_fields: ClassVar[Mapping[str, tuple[torch.dtype, ...]]] = {}

    # ---- config round trip -------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """``{"type": kind, **settings}`` with dtypes as names; ``scheme_from_dict`` inverts it."""
        out: dict[str, Any] = {"type": self.kind}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            out[field.name] = dtype_name(value) if isinstance(value, torch.dtype) else value
        return out

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any], key: str = "scheme") -> Scheme:
        """Build from a settings mapping (no ``type``), rejecting unknown keys by name."""
        names = {f.name for f in dataclasses.fields(cls)}
        for name in settings:
            if name not in names:
                allowed = ", ".join(sorted(names)) or "(none)"
                raise ValueError(f"{key}.{name}: unknown setting for {cls.kind!r}; allowed: {allowed}")
        kwargs = dict(settings)
        for name, allowed in cls.dtype_fields.items():
            if name in kwargs and kwargs[name] is not None:
                kwargs[name] = parse_dtype(kwargs[name], f"{key}.{name}", allowed)
        return cls(**kwargs)

    # ---- what a format provides (the op that runs it is bound in qcompile/ops) ----
    def unsupported_reason(self, shape: tuple[int, ...], dtype: torch.dtype) -> str | None:
        """Why a weight of this shape and dtype cannot use this scheme, or None if it can."""
        if len(shape) != 2:
            return f"weight is {len(shape)}-D, expected 2-D (out_features, in_features)"
        if 0 in shape:
            return f"weight has an empty dimension {tuple(shape)}"
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            return f"weight dtype {dtype_name(dtype)} is not a float dtype"
        return None

    def pack(self, weight: torch.Tensor, name: str = "weight") -> PackedWeight:
        """Quantize ``weight`` (out_features, in_features). ``name`` appears in errors."""
        raise NotImplementedError

    def bits_per_weight(self, shape: tuple[int, int]) -> float:
        """Storage bits per weight element for a weight of this shape (without packing it)."""
        raise NotImplementedError

    def packed_nbytes(self, shape: tuple[int, int]) -> int:
        """Bytes the packed form of a weight of this shape takes."""
        return math.ceil(self.bits_per_weight(shape) * shape[0] * shape[1] / 8)


# ---- validation helpers for subclasses' __post_init__ ----------------------

def check_type(scheme: Scheme, name: str, types: type | tuple[type, ...]) -> None:
    """ValueError naming the field when its value is not of ``types`` (bool is not an int here)."""
    value = getattr(scheme, name)
    wanted = types if isinstance(types, tuple) else (types,)
    ok = isinstance(value, wanted) and not (isinstance(value, bool) and bool not in wanted)
    if not ok:
        names = " or ".join(t.__name__ for t in wanted)
        raise ValueError(f"{scheme.kind}.{name}: expected {names}, got {type(value).__name__} {value!r}")


def check_finite(tensor: torch.Tensor, name: str, hint: str = "") -> None:
    """ValueError naming the weight ``name`` when ``tensor`` (the weight, or a statistic of it) has NaN or Inf."""
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{name}: weight contains NaN or Inf values{hint}; refusing to quantize it")


def check_dtype(scheme: Scheme, name: str) -> None:
    """Accept a dtype or dtype name for field ``name`` and store the torch.dtype."""
    value = getattr(scheme, name)
    dtype = parse_dtype(value, f"{scheme.kind}.{name}", scheme.dtype_fields[name])
    object.__setattr__(scheme, name, dtype)


class PackedWeight:
    """A quantized weight: the tensors a quantized op consumes, plus its scheme.

    Subclasses (one per format family) implement the methods below. Which op runs a packed weight,
    and in what order it takes these tensors, is declared in ``qcompile/ops`` (``bindings.py``):
    formats know nothing of ops.
    """

    scheme: Scheme
    shape: tuple[int, int]  # (out_features, in_features)
    dtype: torch.dtype  # dtype of the original weight

    # Subclasses that can load a bitsandbytes state dict, in definition order; filled by
    # __init_subclass__ so that adding a format does not mean editing from_bitsandbytes.
    _bnb_formats: ClassVar[list[type[PackedWeight]]] = []

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "_bnb_matches" in cls.__dict__:
            PackedWeight._bnb_formats.append(cls)

    @classmethod
    def _bnb_matches(cls, state: Mapping[str, torch.Tensor]) -> bool:
        """Whether ``state`` (keys relative to the module) is this class's bitsandbytes format."""
        return False

    @classmethod
    def _from_bnb(cls, state: Mapping[str, torch.Tensor], compute_dtype: torch.dtype | None) -> PackedWeight:
        raise NotImplementedError

    @staticmethod
    def from_bitsandbytes(state: Mapping[str, torch.Tensor], compute_dtype: torch.dtype | None = None) -> PackedWeight:
        """Load what a bitsandbytes module writes into its state dict (keys relative to the module).

        The format is recognized from the keys: ``weight.quant_state.bitsandbytes__nf4`` /
        ``__fp4`` -> 4-bit (``Linear4bit``), ``SCB`` -> LLM.int8() (``Linear8bitLt``).
        A ``bias`` key is ignored. ``compute_dtype`` (not stored by bitsandbytes) sets the
        4-bit scheme's compute dtype; default float32.
        """
        _import_formats()
        if not isinstance(state, Mapping):
            raise ValueError(f"state: expected a mapping of tensors, got {type(state).__name__}")
        for cls in PackedWeight._bnb_formats:
            if cls._bnb_matches(state):
                return cls._from_bnb(state, compute_dtype)
        raise ValueError(
            f"state: not a bitsandbytes Linear4bit / Linear8bitLt state dict (keys: {sorted(state)}); "
            "expected 'weight.quant_state.bitsandbytes__nf4' / '__fp4' or 'SCB' next to 'weight'"
        )

    def tensors(self) -> dict[str, torch.Tensor | None]:
        """The packed tensors by name (None: absent in this configuration), all on one device."""
        raise NotImplementedError

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        raise NotImplementedError

    def dequantize_rows(self, start: int, stop: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Rows ``[start, stop)`` (output features) of the weight, ``[stop - start, in_features]``:
        equal, bit for bit, to ``dequantize(dtype)[start:stop]``, without decoding the other rows."""
        raise NotImplementedError

    def column_band_step(self) -> int | None:
        """Column bands (:meth:`dequantize_cols`) must start and stop on multiples of this (or at
        in_features); None when this weight cannot be read by columns without decoding whole rows."""
        return None

    def dequantize_cols(self, start: int, stop: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Columns ``[start, stop)`` (input features) of the weight, ``[out_features, stop - start]``:
        equal, bit for bit, to ``dequantize(dtype)[:, start:stop]``. Only where :meth:`column_band_step`
        is not None, with ``start`` and ``stop`` on its multiples."""
        raise NotImplementedError

    def _check_band(self, start: int, stop: int, axis: int, step: int = 1) -> None:
        size = self.shape[axis]
        what = "rows" if axis == 0 else "columns"
        if not (isinstance(start, int) and isinstance(stop, int) and 0 <= start <= stop <= size):
            raise ValueError(f"{what} [{start}, {stop}) are not within the weight's {size} {what}")
        if start % step or (stop % step and stop != size):
            raise ValueError(f"{what} [{start}, {stop}) do not start and stop on multiples of {step}")

    def grad_input(self, grad: torch.Tensor, x_dtype: torch.dtype,
                   band_elements: int = GRAD_BAND_ELEMENTS) -> torch.Tensor:
        """``grad @ W`` for the gradient of ``x``: in the scheme's compute dtype if it has one
        (as bitsandbytes' 4-bit backward), else in ``x_dtype``; returned in ``x_dtype``.

        W is read a band at a time (about ``band_elements`` elements, at least MIN_GRAD_BAND columns
        or rows), never whole. Bands of columns when the format can read them (every weight whose
        in_features is a multiple of the 4-bit blocksize, every int8 weight): each band of the result
        is one matmul over all of ``grad``, the same products and sums as one whole-weight matmul, so
        the result equals it up to the matmul's own summation order. Otherwise bands of rows, whose
        partial products (each in the compute dtype, as the one matmul would be) are summed in float32.
        Columns first because row bands split the matmul's reduction: every band reads and writes a
        float32 accumulator the size of the result (plus a partial product), which on a 2-core CPU
        (4096x4000 NF4, bf16, M = 512 / 2048) made the gradient 1.5-1.7x slower than one matmul; on a
        GPU that traffic would dominate. Column bands write each element of the result once.
        """
        dtype = getattr(self.scheme, "compute_dtype", None) or x_dtype
        n, k = self.shape
        out_shape = (*grad.shape[:-1], k)
        g = grad.reshape(-1, n).to(dtype)
        if g.shape[0] == 0:
            return grad.new_zeros(out_shape, dtype=x_dtype)
        step = self.column_band_step()
        if step is not None:
            cols = max(step, max(MIN_GRAD_BAND, band_elements // n) // step * step)
            if x_dtype != dtype:
                # Each band's product is cast into the x_dtype result as it is made: the whole product in
                # the compute dtype never exists beside its cast (QLoRA: bf16 compute, fp32 activations).
                cols = min(cols, max(step, max(MIN_GRAD_BAND, k // 4) // step * step))
            if cols >= k:  # one band: the whole weight is no larger than a band
                return (g @ self.dequantize(dtype)).to(x_dtype).view(out_shape)
            out = torch.empty((g.shape[0], k), dtype=x_dtype, device=g.device)
            for start in range(0, k, cols):
                stop = min(start + cols, k)
                out[:, start:stop] = g @ self.dequantize_cols(start, stop, dtype)
            return out.view(out_shape)
        rows = max(MIN_GRAD_BAND, band_elements // k)
        if rows >= n:
            return (g @ self.dequantize(dtype)).to(x_dtype).view(out_shape)
        acc = torch.zeros((g.shape[0], k), dtype=torch.float32, device=g.device)
        for start in range(0, n, rows):
            stop = min(start + rows, n)
            band = self.dequantize_rows(start, stop, dtype)
            if dtype == torch.float32:
                acc.addmm_(g[:, start:stop], band)
            else:
                acc += g[:, start:stop] @ band
        # Rounded to the compute dtype first, as the one whole-weight matmul's result would be.
        return acc.to(dtype).to(x_dtype).view(out_shape)

    @property
    def nbytes(self) -> int:
        """Bytes held by the packed tensors (codes, scales, nested state, tables)."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values() if t is not None)

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes / (self.shape[0] * self.shape[1])

    def to_bitsandbytes(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError
