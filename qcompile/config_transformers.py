"""transformers' ``quantization_config`` for GPTQ, AWQ, HQQ and quanto, read verbatim into a QuantConfig.

The keys that say how weights are quantized map to a qcompile scheme (below); the list of modules
left alone (``modules_to_not_convert``, HQQ's ``skip_modules``; null: ``lm_head``) becomes skip rules
matched as transformers matches them, by substring. Keys about how another library runs or
calibrates (``dataset``, ``use_exllama``, ``backend``, ...) are accepted and ignored: qcompile runs its
own kernels and calibrates with :func:`qcompile.calibrate`. A setting qcompile cannot honour
(another checkpoint format, HQQ along axis 0, quantized activations) is an error
naming the key.

    gptq     bits, group_size, sym, desc_act, damp_percent, static_groups  -> gptq
    awq      bits, group_size, zero_point, version "gemm"                  -> awq
    hqq      quant_config.weight_quant_params {nbits, group_size, axis 1, optimize}, or the same flat
             (HqqConfig's arguments)                                       -> hqq
    quanto   weights "int8"                                                -> int8_weight_only
             weights "int4" / "int2" (group 128, float shift)              -> quanto
             weights "float8" (e4m3, a scale per row)                      -> float8
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from qcompile.formats import scheme_from_dict

if TYPE_CHECKING:
    from qcompile.config import QuantConfig

log = logging.getLogger("qcompile")

METHODS = ("gptq", "awq", "hqq", "quanto")

# Keys other libraries write that do not change the weights' numbers, per method.
_IGNORED = {
    "gptq": {"quant_method", "tokenizer", "dataset", "true_sequential", "use_cuda_fp16", "model_seqlen",
             "block_name_to_quantize", "module_name_preceding_first_block", "batch_size", "pad_token_id",
             "use_exllama", "disable_exllama", "exllama_config", "max_input_length", "cache_block_outputs",
             "modules_in_block_to_quantize", "backend", "act_group_aware", "meta", "pack_dtype",
             "model_name_or_path", "model_file_base_name", "is_marlin_format", "checkpoint_format",
             "modules_to_not_convert"},
    "awq": {"quant_method", "backend", "modules_to_not_convert", "exllama_config", "do_fuse", "fuse_max_seq_len",
            "modules_to_fuse", "version", "zero_point"},
    "hqq": {"quant_method", "skip_modules", "quant_config", "view_as_float", "round_zero", "channel_wise",
            "offload_meta", "scale_quant_params", "zero_quant_params", "dynamic_config", "axis", "optimize"},
    "quanto": {"quant_method", "modules_to_not_convert", "weights", "activations"},
}
_SCHEME_KEYS = {
    "gptq": ("bits", "group_size", "sym", "desc_act", "damp_percent", "static_groups"),
    "awq": ("bits", "group_size"),
    "hqq": ("nbits", "group_size"),
    "quanto": (),
}


def from_transformers(raw: Mapping[str, Any], key: str) -> QuantConfig:
    """The QuantConfig of a transformers ``quantization_config`` whose ``quant_method`` is one of METHODS."""
    from qcompile.config import DEFAULT_SKIP_MODULES, QuantConfig, Rule

    prefix = f"{key}." if key else ""
    method = raw.get("quant_method")
    if method not in METHODS:
        raise ValueError(f"{prefix}quant_method: {method!r} is not supported; allowed: bitsandbytes, "
                         f"{', '.join(METHODS)}")
    bnb_keys = [k for k in raw if k.startswith(("load_in", "_load_in", "bnb_4bit", "llm_int8"))]
    if bnb_keys:
        raise ValueError(f"{prefix}quant_method: {method!r} with BitsAndBytesConfig keys ({', '.join(bnb_keys)}); "
                         "allowed: 'bitsandbytes' with those keys, or a GPTQ / AWQ / HQQ / quanto config without them")
    if method == "hqq" and isinstance(raw.get("quant_config"), Mapping):
        raw = _hqq_flat(raw, prefix)
    unknown = [k for k in raw if k not in _IGNORED[method] and k not in _SCHEME_KEYS[method]]
    if unknown:
        log.warning("qcompile: %s%s: keys qcompile does not know for quant_method %r, ignored: %s",
                    prefix, unknown[0], method, ", ".join(unknown))
    scheme = _SCHEMES[method](raw, prefix)
    skip = raw.get("skip_modules" if method == "hqq" else "modules_to_not_convert")
    if skip is None:
        skip = list(DEFAULT_SKIP_MODULES)
    if not isinstance(skip, list) or not all(isinstance(s, str) and s for s in skip):
        name = "skip_modules" if method == "hqq" else "modules_to_not_convert"
        raise ValueError(f"{prefix}{name}: expected null or a list of module names, got {skip!r}")
    return QuantConfig(default=scheme, rules=tuple(Rule(f"*{name}*", None) for name in skip))


def _settings(raw: Mapping[str, Any], names: tuple[str, ...], renames: Mapping[str, str] | None = None) -> dict:
    renames = renames or {}
    return {renames.get(k, k): raw[k] for k in names if k in raw}


def _gptq(raw: Mapping[str, Any], prefix: str):
    if "bits" not in raw:
        raise ValueError(f"{prefix}bits: missing; allowed: 2, 3, 4, 8")
    if raw.get("checkpoint_format", "gptq") not in ("gptq", None):
        raise ValueError(f"{prefix}checkpoint_format: {raw['checkpoint_format']!r} is not supported; allowed: 'gptq' "
                         "(format v1, the one transformers saves)")
    if raw.get("is_marlin_format"):
        raise ValueError(f"{prefix}is_marlin_format: true is not supported; allowed: false")
    return scheme_from_dict({"type": "gptq", **_settings(raw, _SCHEME_KEYS["gptq"])}, key=prefix.rstrip(".") or "gptq")


def _awq(raw: Mapping[str, Any], prefix: str):
    if raw.get("version", "gemm") != "gemm":
        raise ValueError(f"{prefix}version: {raw['version']!r} is not supported; allowed: 'gemm'")
    if raw.get("zero_point", True) is not True:
        raise ValueError(f"{prefix}zero_point: {raw['zero_point']!r} is not supported; allowed: true")
    return scheme_from_dict({"type": "awq", **_settings(raw, _SCHEME_KEYS["awq"])}, key=prefix.rstrip(".") or "awq")


def _hqq_flat(raw: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """HqqConfig.to_dict's nested form as HqqConfig's own arguments."""
    quant_config = raw["quant_config"]
    for k in ("scale_quant_params", "zero_quant_params"):
        if quant_config.get(k) is not None:
            raise ValueError(f"{prefix}quant_config.{k}: quantized scales / zeros are not supported; allowed: null")
    weight = quant_config.get("weight_quant_params")
    if not isinstance(weight, Mapping):
        raise ValueError(f"{prefix}quant_config.weight_quant_params: expected an object, got {weight!r}")
    if weight.get("channel_wise", True) is not True:
        raise ValueError(f"{prefix}quant_config.weight_quant_params.channel_wise: only true is supported")
    flat = {k: v for k, v in raw.items() if k != "quant_config"}
    flat.update(weight)
    return flat


def _hqq(raw: Mapping[str, Any], prefix: str):
    if raw.get("axis", 1) not in (1, None):
        raise ValueError(f"{prefix}axis: {raw['axis']!r} is not supported; allowed: 1 (groups along in_features)")
    if raw.get("dynamic_config"):
        raise ValueError(f"{prefix}dynamic_config: per-layer HQQ settings are not supported; write qcompile rules")
    settings = _settings(raw, _SCHEME_KEYS["hqq"], {"nbits": "bits"})
    if raw.get("optimize", True) is False:
        settings["iters"] = 0
    return scheme_from_dict({"type": "hqq", **settings}, key=prefix.rstrip(".") or "hqq")


def _quanto(raw: Mapping[str, Any], prefix: str):
    if raw.get("activations") is not None:
        raise ValueError(f"{prefix}activations: {raw['activations']!r} is not supported; allowed: null "
                         "(weight-only)")
    weights = raw.get("weights", "int8")
    if weights == "int8":
        return scheme_from_dict({"type": "int8_weight_only"})
    if weights in ("int4", "int2"):
        return scheme_from_dict({"type": "quanto", "bits": int(weights[3])})
    if weights == "float8":
        return scheme_from_dict({"type": "float8"})
    raise ValueError(f"{prefix}weights: {weights!r} is not supported; allowed: int8, int4, int2, float8")


_SCHEMES = {"gptq": _gptq, "awq": _awq, "hqq": _hqq, "quanto": _quanto}
