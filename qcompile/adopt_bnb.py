"""Adopt a model's bitsandbytes layers: run a model loaded with ``BitsAndBytesConfig`` on qcompile's ops.

    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=BitsAndBytesConfig(load_in_4bit=True))
    adopt_bitsandbytes(model)              # each Linear4bit / Linear8bitLt -> a plain nn.Linear, packed
    compiled = torch.compile(model, backend="qcompile", options={"config": bitsandbytes_config(model)})

Each ``bitsandbytes.nn.Linear4bit`` and ``Linear8bitLt`` (and subclasses) is replaced, under the same name,
by an ``nn.Linear`` of the same in/out features on the same device, whose bias is the bnb layer's bias
parameter itself and whose weight is a released placeholder (a NaN broadcast to its shape,
:func:`qcompile.pack_cache.adopt_packed`) with bitsandbytes' own packed tensors installed as its packed form:
nothing is dequantized to float and nothing is quantized again (the tensors are shared, not copied).
The backend finds that packed form when the config gives the module the same scheme, which
:func:`bitsandbytes_config` does. Calling an adopted linear without the backend raises, naming it.

bitsandbytes 0.50 quirk: on a CPU with AVX512-BF16 the first eager forward of a ``Linear4bit`` in eval mode
without grad repacks its weight into a CPU-only layout (``quant_state.packing_format_for_cpu``): the nibbles
are permuted in tiles of 32 rows, the absmax values are dequantized (the double-quant state is dropped),
transposed and rounded to bfloat16. The permutation is undone here exactly (the bytes are those
``quantize_4bit`` gave); the bfloat16 absmax cannot be undone: it is taken as is (without double quant) or,
for a double-quantized layer, nested again as ``quantize_4bit`` nests (bitsandbytes' own ``state_dict()``
also nests it again; without double quant it writes the transposed bfloat16 absmax as is). Adopt before
running the bnb model eagerly to keep its exact bytes.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from qcompile import config as config_module
from qcompile.config import QuantConfig, Rule
from qcompile.fallback import FallbackPolicy, guard
from qcompile.formats import Int8, PackedWeight, Scheme, blockwise
from qcompile.formats.packed4bit import Packed4bit
from qcompile.formats.packed_int8 import PackedInt8
from qcompile.formats.scheme import scheme_class
from qcompile.pack_cache import adopt_packed, is_released
from qcompile.passes.plan import decide_weight, linear_decisions
from qcompile.report import describe_scheme

log = logging.getLogger("qcompile")

_BNB_PACKAGE = "bitsandbytes"
# The scheme a weight was adopted with, set on the placeholder parameter (read by bitsandbytes_config).
_ADOPTED_ATTR = "_qcompile_bnb_scheme"
# bitsandbytes' CPU repack works on tiles of this many output rows (_convert_weight_packed_for_cpu's block_n).
_CPU_REPACK_ROWS = 32


@dataclasses.dataclass
class _Layer:
    """One bitsandbytes linear: its names (a module may sit under several), the module, and its kind."""

    names: list[str]
    module: nn.Module
    four_bit: bool


def adopt_bitsandbytes(model: nn.Module) -> list[str]:
    """Replace every bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` in ``model`` by an adopted ``nn.Linear``
    (see the module docstring); returns the names of the adopted weights (``"...q_proj.weight"``).

    Returns [] for a model without bitsandbytes layers (a second call, say) without importing bitsandbytes.
    Every layer is read before any is replaced, so a ValueError (a layer not quantized yet, on the meta
    device, with a float16 training weight) leaves the model as it was.
    """
    layers = _bnb_layers(model)
    float_dtype = _float_dtype(model)
    adopted = [(layer, *_packed(layer, float_dtype)) for layer in layers]
    policy = FallbackPolicy("error")
    names = []
    for layer, scheme, packed in adopted:
        module = layer.module
        weight_name = f"{layer.names[0]}.weight"
        linear = nn.Linear(module.in_features, module.out_features, bias=False, device="meta", dtype=packed.dtype)
        # The placeholder adopt_packed makes, built directly: .data cannot move a parameter off the meta device.
        device = next(t for t in packed.tensors().values() if t is not None).device
        nan = torch.full((1,), float("nan"), dtype=packed.dtype, device=device)
        linear.weight = nn.Parameter(nan.expand(packed.shape), requires_grad=False)
        linear.bias = module.bias
        linear.train(module.training)
        adopt_packed(linear.weight, scheme, False, packed)
        setattr(linear.weight, _ADOPTED_ATTR, scheme)
        for name in layer.names:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, linear)
        guard(linear, weight_name, linear.weight, policy, released=True)
        names.append(weight_name)
    if names:
        log.info("qcompile: adopted %d bitsandbytes layers (e.g. %s)", len(names), names[0])
    repacked = [layer.names[0] for layer in layers if _cpu_repacked(layer)]
    if repacked:
        log.warning("qcompile: %d bitsandbytes layers (e.g. %s) had been repacked for bitsandbytes' CPU kernel by "
                    "an eager forward, which rounded their absmax to bfloat16 (and dropped their double "
                    "quantization: nested again here); adopt before running the bitsandbytes model to keep its "
                    "exact bytes", len(repacked), repacked[0])
    return names


def bitsandbytes_config(model: nn.Module) -> QuantConfig | None:
    """The QuantConfig under which ``model``'s bitsandbytes layers (adopted or not yet) keep their schemes,
    or None when it has none.

    From ``model.config.quantization_config`` when it is a BitsAndBytesConfig (as
    ``qcompile.config.load({"quantization_config": ...})`` reads it), else from the layers' own settings.
    Linears that bitsandbytes left in float (transformers' kept modules, a head not named ``lm_head``) get a
    skip rule each, so the backend keeps them float too. ValueError naming two modules when layers differ
    and there is no quantization_config, or naming one whose scheme the quantization_config does not give.
    """
    float_dtype = _float_dtype(model)
    layers = [(layer.names[0], _scheme(layer, float_dtype)[0]) for layer in _bnb_layers(model)]
    decisions = linear_decisions(model, QuantConfig(default=None, rules=()), include_meta=True)
    adopted = {id(weight) for _, _, weight, _ in decisions if hasattr(weight, _ADOPTED_ATTR)}
    layers += [(name.rpartition(".")[0], getattr(weight, _ADOPTED_ATTR))
               for _, name, weight, _ in decisions if id(weight) in adopted]
    quantization_config = _bnb_quantization_config(model)
    if quantization_config is not None:
        base = config_module.load({"quantization_config": quantization_config})
        source = "the model's quantization_config"
    elif not layers:
        return None
    else:
        first_name, first = layers[0]
        for name, scheme in layers[1:]:
            if scheme != first:
                raise ValueError(f"{first_name} is {_describe(first)} but {name} is {_describe(scheme)}: one "
                                 "config cannot give both (the model has no quantization_config naming its rules)")
        base = QuantConfig(default=first, rules=())
        source = "the config of its bitsandbytes layers"
    for name, scheme in layers:
        given, _, _ = decide_weight(base, [name], None)
        if given != scheme:
            raise ValueError(f"{name}: its bitsandbytes layer is {_describe(scheme)} but {source} gives it "
                             f"{_describe(given)}; pass a config that gives it {_describe(scheme)}")
    kept_float = [name.rpartition(".")[0] for _, name, weight, scheme in linear_decisions(model, base, True)
                  if scheme is not None and id(weight) not in adopted and not is_released(weight)]
    return QuantConfig(default=base.default, rules=(*(Rule(name, None) for name in kept_float), *base.rules))


# ---- finding the layers -------------------------------------------------------

def _from_bnb(cls: type) -> bool:
    return any(c.__module__.split(".")[0] == _BNB_PACKAGE for c in cls.__mro__)


def _bnb_layers(model: nn.Module) -> list[_Layer]:
    """The bitsandbytes linears of ``model`` (bitsandbytes is imported only when some module comes from it)."""
    named = list(model.named_modules(remove_duplicate=False))
    first = next(((name, m) for name, m in named if _from_bnb(type(m))), None)
    if first is None:
        return []
    try:
        from bitsandbytes.nn import Linear4bit, Linear8bitLt
    except ImportError as e:
        raise ImportError(f"{first[0] or 'model'}: a bitsandbytes module ({type(first[1]).__name__}) but "
                          f"bitsandbytes cannot be imported: {e}") from e
    layers: dict[int, _Layer] = {}
    for name, module in named:
        if isinstance(module, (Linear4bit, Linear8bitLt)):
            if not name:
                raise ValueError(f"model: is itself a bitsandbytes {type(module).__name__}; adopting replaces a "
                                 "layer in its parent module, so wrap it in one")
            layer = layers.setdefault(id(module), _Layer([], module, isinstance(module, Linear4bit)))
            layer.names.append(name)
    return list(layers.values())


def _float_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's float parameters that bitsandbytes did not quantize (its activations' dtype)."""
    for param in model.parameters():
        if param.is_floating_point() and not _from_bnb(type(param)):
            return param.dtype
    return torch.float16


def _bnb_quantization_config(model: nn.Module) -> Mapping[str, Any] | None:
    """``model.config.quantization_config`` as a dict, when it is a BitsAndBytesConfig."""
    raw = getattr(getattr(model, "config", None), "quantization_config", None)
    if raw is None:
        return None
    data = raw if isinstance(raw, Mapping) else raw.to_dict() if hasattr(raw, "to_dict") else None
    if data is None or data.get("quant_method", "bitsandbytes") != "bitsandbytes":
        return None
    return data


def _describe(scheme: Scheme | None) -> str:
    return "skipped (float)" if scheme is None else describe_scheme(scheme)


# ---- reading a layer ------------------------------------------------------------

def _scheme(layer: _Layer, float_dtype: torch.dtype) -> tuple[Scheme, torch.dtype]:
    """The scheme of ``layer`` and the dtype of its weight (the placeholder's), without touching its tensors."""
    name, module = layer.names[0], layer.module
    weight = module.weight
    if weight.device.type == "meta":
        raise ValueError(f"{name}: a bitsandbytes {type(module).__name__} on the meta device (offloaded); load "
                         "the model onto one device to adopt it")
    if layer.four_bit:
        state = _quant_state(module)
        if state is None or not getattr(weight, "bnb_quantized", True):
            raise ValueError(f"{name}: a bitsandbytes Linear4bit whose weight is not quantized yet (bitsandbytes "
                             "quantizes it when it is moved to a device); quantize it with qcompile.quantize instead")
        if state.quant_type not in ("nf4", "fp4"):
            raise ValueError(f"{name}: unknown 4-bit quant type {state.quant_type!r}; allowed: nf4, fp4")
        if _cpu_repacked(layer):
            dtype, nested = state.original_dtype, state.original_nested
            storage = getattr(state, "original_storage_type", None) or torch.uint8
        else:
            dtype, nested, storage = state.dtype, state.nested, weight.dtype
        # A Linear4bit built with compute_dtype=None computes in its input's dtype: the weight's, in practice.
        compute = module.compute_dtype or dtype
        scheme = scheme_class(state.quant_type)(blocksize=int(state.blocksize), double_quant=bool(nested),
                                                compute_dtype=compute, quant_storage=storage)
        return scheme, dtype
    if module.state.has_fp16_weights:
        raise ValueError(f"{name}: a bitsandbytes Linear8bitLt holding a float16 weight (has_fp16_weights=True, "
                         "for training); only frozen int8 layers (has_fp16_weights=False) can be adopted")
    if weight.dtype != torch.int8:
        raise ValueError(f"{name}: a bitsandbytes Linear8bitLt whose weight is not quantized yet ({weight.dtype}; "
                         "bitsandbytes quantizes it when it is moved to a device)")
    # bitsandbytes keeps no dtype for an int8 weight; its output has the input's dtype, so does the bias.
    dtype = module.bias.dtype if module.bias is not None else float_dtype
    return Int8(threshold=float(module.state.threshold), has_fp16_weight=False), dtype


def _packed(layer: _Layer, float_dtype: torch.dtype) -> tuple[Scheme, PackedWeight]:
    """The scheme of ``layer`` and its packed weight, holding bitsandbytes' tensors."""
    scheme, dtype = _scheme(layer, float_dtype)
    name, module = layer.names[0], layer.module
    shape = (module.out_features, module.in_features)
    if not layer.four_bit:
        weight = module.weight.data
        scb = getattr(module.weight, "SCB", None)
        scb = module.state.SCB if scb is None else scb  # moved to the state by the first forward
        if tuple(weight.shape) != shape or scb is None or tuple(scb.shape) != (shape[0],):
            raise ValueError(f"{name}: expected an int8 weight {shape} and a float32 SCB [{shape[0]}], got "
                             f"{tuple(weight.shape)} and {None if scb is None else tuple(scb.shape)}")
        return scheme, PackedInt8(scheme, weight, scb.float(), dtype)
    state = _quant_state(module)
    if tuple(state.shape) != shape:
        raise ValueError(f"{name}: quant_state.shape {tuple(state.shape)} is not the layer's {shape}")
    if _cpu_repacked(layer):
        packed, absmax = _undo_cpu_repack(name, module.weight.data, state)
        if not scheme.double_quant:
            return scheme, Packed4bit(scheme, shape, dtype, packed, absmax, state.code)
        qabsmax, nested_absmax, nested_code, offset = blockwise.quantize_nested(absmax)
        return scheme, Packed4bit(scheme, shape, dtype, packed, qabsmax, state.code, nested_absmax, nested_code,
                                  offset)
    packed = module.weight.data.contiguous().view(-1).view(torch.uint8)
    if packed.numel() != (shape[0] * shape[1] + 1) // 2:
        raise ValueError(f"{name}: {packed.numel()} packed bytes, expected {(shape[0] * shape[1] + 1) // 2} for "
                         f"a {shape} weight")
    if not state.nested:
        return scheme, Packed4bit(scheme, shape, dtype, packed, state.absmax, state.code)
    return scheme, Packed4bit(scheme, shape, dtype, packed, state.absmax, state.code, state.state2.absmax,
                              state.state2.code, float(state.offset))


def _cpu_repacked(layer: _Layer) -> bool:
    return layer.four_bit and bool(getattr(_quant_state(layer.module), "packing_format_for_cpu", False))


def _quant_state(module: nn.Module) -> Any:
    """A Linear4bit's QuantState: its weight's, or the module's copy when the weight lost it (FSDP)."""
    state = getattr(module.weight, "quant_state", None)
    return state if state is not None else getattr(module, "quant_state", None)


def _undo_cpu_repack(name: str, data: torch.Tensor, state: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The standard packed bytes (``quantize_4bit``'s) and the float32 absmax of a weight that bitsandbytes
    repacked for its CPU kernel (``bitsandbytes.functional._convert_weight_packed_for_cpu``, 0.50).

    The repack unpacks the codes of the [N, K] weight, groups them by tiles of 32 rows and pairs of columns
    ([N/32, K/2, 32, 2]), and packs each group of 64 codes as 32 bytes: the first 32 codes in the low
    nibbles, the last 32 in the high ones. Here that is undone, then codes are packed two per byte, high
    nibble first, over the row-major weight. The absmax it left is bfloat16 [K/blocksize, N] (transposed).
    """
    n, k = (int(s) for s in state.shape)
    if data.dtype != torch.uint8 or tuple(data.shape) != (n, k // 2) or k % 2 or n % _CPU_REPACK_ROWS:
        raise ValueError(f"{name}: a CPU-repacked bitsandbytes weight of {(n, k)} should be uint8 {(n, k // 2)}, "
                         f"got {data.dtype} {tuple(data.shape)}")
    half = _CPU_REPACK_ROWS
    groups = data.reshape(-1, half)
    codes = torch.cat([groups & 0xF, groups >> 4], dim=1)  # 64 codes a group: 32 rows x one column pair
    codes = codes.reshape(n // half, k // 2, half, 2).transpose(1, 2).reshape(-1)  # row-major [N, K]
    packed = (codes[0::2] << 4) | codes[1::2]
    blocks_per_row = k // state.blocksize
    if tuple(state.absmax.shape) != (blocks_per_row, n):
        raise ValueError(f"{name}: a CPU-repacked absmax should be {(blocks_per_row, n)}, got "
                         f"{tuple(state.absmax.shape)}")
    absmax = state.absmax.t().reshape(-1).float()
    return packed, absmax
