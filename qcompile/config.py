"""QuantConfig: which modules are quantized, and how.

Three input forms are accepted, recognised by their keys:

* qcompile's own format: a default scheme plus ordered rules, each a glob on
  the module's qualified name mapped to a scheme or ``"skip"``; the first
  matching rule wins, otherwise the default applies::

      {"default": {"type": "nf4", "double_quant": true, "compute_dtype": "bfloat16"},
       "rules": [{"match": "lm_head", "scheme": "skip"},
                 {"match": "*.mlp.down_proj", "scheme": {"type": "int8", "threshold": 6.0}}]}

* a ``BitsAndBytesConfig`` JSON as transformers writes it (``load_in_4bit`` ...);
* transformers' ``quantization_config`` for GPTQ, AWQ, HQQ or quanto (``config_transformers.py``);
* a whole transformers ``config.json`` holding one of these as ``quantization_config``.

``to_dict`` always writes qcompile's format; ``from_dict(to_dict(c)) == c``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from qcompile.config_transformers import METHODS, from_transformers
from qcompile.dtypes import FLOAT_DTYPES, parse_dtype
from qcompile.formats import FP4, NF4, Int8, Scheme, scheme_from_dict
from qcompile.formats.fourbit import QUANT_STORAGE_DTYPES

if TYPE_CHECKING:
    from qcompile.passes.plan import SitePlan
    from qcompile.passes.sites import LinearSite

log = logging.getLogger("qcompile")

SKIP = "skip"

# transformers' BitsAndBytesConfig keys and their defaults (transformers 4.x/5.x).
_BNB_DEFAULTS: dict[str, Any] = {
    "load_in_8bit": False,
    "load_in_4bit": False,
    "llm_int8_threshold": 6.0,
    "llm_int8_skip_modules": None,
    "llm_int8_enable_fp32_cpu_offload": False,
    "llm_int8_has_fp16_weight": False,
    "bnb_4bit_compute_dtype": "float32",
    "bnb_4bit_quant_type": "fp4",
    "bnb_4bit_use_double_quant": False,
    "bnb_4bit_quant_storage": "uint8",
    "quant_method": "bitsandbytes",
    "_load_in_4bit": False,
    "_load_in_8bit": False,
}
# Modules a causal LM keeps in their original dtype when llm_int8_skip_modules is null,
# as transformers does for the output head.
DEFAULT_SKIP_MODULES: tuple[str, ...] = ("lm_head",)
_QCOMPILE_KEYS = ("format", "version", "default", "rules")
_FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Rule:
    """Modules whose qualified name matches the glob ``match`` get ``scheme`` (None means skip).

    ``match`` is an ``fnmatch`` pattern on the full name, e.g. ``lm_head`` or ``model.layers.*.mlp.*``.
    """

    match: str
    scheme: Scheme | None

    def __post_init__(self) -> None:
        if not isinstance(self.match, str) or not self.match:
            raise ValueError(f"rules[].match: expected a non-empty glob string, got {self.match!r}")
        if self.scheme is not None and not isinstance(self.scheme, Scheme):
            raise ValueError(f"rules[].scheme: expected a Scheme or None (skip), got {self.scheme!r}")

    def matches(self, module_name: str) -> bool:
        return fnmatch.fnmatchcase(module_name, self.match)

    def to_dict(self) -> dict[str, Any]:
        return {"match": self.match, "scheme": SKIP if self.scheme is None else self.scheme.to_dict()}


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """The quantization plan's inputs: a default scheme and ordered per-module rules.

    The default config is QLoRA's: NF4 with double quantization and bf16 compute,
    with ``lm_head`` kept in its original dtype.
    """

    default: Scheme | None = dataclasses.field(
        default_factory=lambda: NF4(double_quant=True, compute_dtype=torch.bfloat16)
    )
    rules: tuple[Rule, ...] = tuple(Rule(name, None) for name in DEFAULT_SKIP_MODULES)

    def __post_init__(self) -> None:
        if self.default is not None and not isinstance(self.default, Scheme):
            raise ValueError(f"default: expected a Scheme or None (skip), got {self.default!r}")
        if isinstance(self.rules, list):
            object.__setattr__(self, "rules", tuple(self.rules))
        if not isinstance(self.rules, tuple) or not all(isinstance(r, Rule) for r in self.rules):
            raise ValueError(f"rules: expected a sequence of Rule, got {self.rules!r}")

    # ---- deciding ----------------------------------------------------------
    def scheme_for(self, module_name: str) -> tuple[Scheme | None, str]:
        """The scheme for a module (None: keep it as is) and why, as a short text."""
        _, scheme, decided_by = self._decide(module_name)
        return scheme, decided_by

    def _decide(self, module_name: str) -> tuple[int, Scheme | None, str]:
        for index, rule in enumerate(self.rules):
            if rule.matches(module_name):
                return index, rule.scheme, f"rule {rule.match!r}"
        return len(self.rules), self.default, "default"

    def scheme_for_names(self, module_names: Sequence[str]) -> tuple[Scheme | None, str]:
        """The scheme for a weight reachable under several module names (a tied head), and why.

        Skipped if any name is skipped (a tied ``lm_head`` stays float under the default
        ``lm_head`` skip, as in transformers); otherwise the earliest rule matching any name
        wins over the default. With one name this is :meth:`scheme_for`.
        """
        if not module_names:
            raise ValueError("module_names: expected at least one module name")
        names = list(module_names)
        names += [alias for name in module_names for alias in _peft_aliases(name) if alias not in names]
        decisions = [(*self._decide(name), name) for name in names]
        skipped = [d for d in decisions if d[1] is None]
        index, scheme, decided_by, name = min(skipped or decisions, key=lambda d: d[0])
        if len(module_names) > 1 and name != module_names[0]:
            decided_by = f"{decided_by} on {name}"
        return scheme, decided_by

    def plan(self, sites: Sequence[LinearSite], quantize_trainable: bool = False) -> list[SitePlan]:
        """A scheme or a skip reason for every linear site of a graph (see ``passes.plan.plan_sites``)."""
        from qcompile.passes.plan import plan_sites

        return plan_sites(sites, self, quantize_trainable)

    # ---- loading and saving ------------------------------------------------
    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> QuantConfig:
        """Load a ``.json`` or ``.toml`` file in any of the accepted forms."""
        path = os.fspath(path)
        suffix = os.path.splitext(path)[1].lower()
        if suffix not in (".json", ".toml", ""):
            raise ValueError(f"config: unknown file type {suffix!r} for {path!r}; allowed: .json, .toml")
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except OSError as e:
            raise ValueError(f"config: cannot read {path!r}: {e.strerror}") from e
        if suffix == ".toml":
            try:
                import tomllib
            except ImportError as e:  # Python 3.10
                raise ValueError("config: TOML configs need Python 3.11 or later (tomllib)") from e
            try:
                data = tomllib.loads(raw.decode())
            except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"config: {path!r} is not valid TOML: {e}") from e
        else:
            try:
                data = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"config: {path!r} is not valid JSON: {e}") from e
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QuantConfig:
        """Build from a qcompile, BitsAndBytesConfig or transformers ``config.json`` dict."""
        if not isinstance(data, Mapping):
            raise ValueError(f"config: expected an object at the top level, got {type(data).__name__}")
        if "quantization_config" in data:
            inner = data["quantization_config"]
            if isinstance(inner, Mapping) and inner.get("quant_method") in METHODS:
                return from_transformers(inner, key="quantization_config")
            return _from_bitsandbytes(inner, key="quantization_config")
        if data.get("quant_method") in METHODS:  # before qcompile's keys: AWQ's config has a "version" too
            return from_transformers(data, key="")
        if any(k in data for k in _QCOMPILE_KEYS):
            return _from_qcompile(data)
        if any(k in _BNB_DEFAULTS for k in data):
            return _from_bitsandbytes(data, key="")
        raise ValueError(
            "config: not a recognised config; expected qcompile keys (default, rules), "
            "BitsAndBytesConfig keys (load_in_4bit, ...), a transformers quantization_config (quant_method gptq, "
            "awq, hqq, quanto) or a config.json with quantization_config"
        )

    def to_dict(self) -> dict[str, Any]:
        """qcompile's own format, JSON-serialisable."""
        return {
            "format": "qcompile",
            "version": _FORMAT_VERSION,
            "default": SKIP if self.default is None else self.default.to_dict(),
            "rules": [r.to_dict() for r in self.rules],
        }


def load(config: str | os.PathLike[str] | Mapping[str, Any] | QuantConfig | None) -> QuantConfig:
    """The backend's ``config`` option: a path, a dict, a QuantConfig, or None for the default."""
    if config is None:
        return QuantConfig()
    if isinstance(config, QuantConfig):
        return config
    if isinstance(config, (str, os.PathLike)):
        return QuantConfig.from_file(config)
    if isinstance(config, Mapping):
        return QuantConfig.from_dict(config)
    raise ValueError(f"config: expected a path, dict or QuantConfig, got {type(config).__name__}")


# ---- qcompile's format -------------------------------------------------------

def _scheme_or_skip(value: Any, key: str) -> Scheme | None:
    if value == SKIP:
        return None
    if isinstance(value, str):
        raise ValueError(f"{key}: unknown value {value!r}; allowed: 'skip' or a scheme object with 'type'")
    return scheme_from_dict(value, key=key)


def _from_qcompile(data: Mapping[str, Any]) -> QuantConfig:
    for k in data:
        if k not in _QCOMPILE_KEYS:
            raise ValueError(f"{k}: unknown key; allowed: {', '.join(_QCOMPILE_KEYS)}")
    if data.get("format", "qcompile") != "qcompile":
        raise ValueError(f"format: {data['format']!r} is not allowed; allowed: 'qcompile'")
    version = data.get("version", _FORMAT_VERSION)
    if version != _FORMAT_VERSION or isinstance(version, bool):
        raise ValueError(f"version: {version!r} is not supported; allowed: {_FORMAT_VERSION}")
    if "default" not in data:
        raise ValueError("default: missing; give a scheme object (e.g. {\"type\": \"nf4\"}) or 'skip'")
    default = _scheme_or_skip(data["default"], "default")
    raw_rules = data.get("rules", [])
    if not isinstance(raw_rules, list):
        raise ValueError(f"rules: expected a list of {{match, scheme}} objects, got {type(raw_rules).__name__}")
    rules = []
    for i, raw in enumerate(raw_rules):
        key = f"rules[{i}]"
        if not isinstance(raw, Mapping):
            raise ValueError(f"{key}: expected an object with 'match' and 'scheme', got {raw!r}")
        for k in raw:
            if k not in ("match", "scheme"):
                raise ValueError(f"{key}.{k}: unknown key; allowed: match, scheme")
        for k in ("match", "scheme"):
            if k not in raw:
                raise ValueError(f"{key}.{k}: missing")
        if not isinstance(raw["match"], str) or not raw["match"]:
            raise ValueError(f"{key}.match: expected a non-empty glob string, got {raw['match']!r}")
        rules.append(Rule(raw["match"], _scheme_or_skip(raw["scheme"], f"{key}.scheme")))
    return QuantConfig(default=default, rules=tuple(rules))


# ---- BitsAndBytesConfig --------------------------------------------------------

def _bnb_bool(bnb: Mapping[str, Any], key: str, prefix: str) -> bool:
    value = bnb[key]
    if not isinstance(value, bool):
        raise ValueError(f"{prefix}{key}: expected true or false, got {value!r}")
    return value


def _from_bitsandbytes(raw: Any, key: str) -> QuantConfig:
    prefix = f"{key}." if key else ""
    if not isinstance(raw, Mapping):
        raise ValueError(f"{key or 'config'}: expected a BitsAndBytesConfig object, got {raw!r}")
    for k in raw:
        if k not in _BNB_DEFAULTS:
            raise ValueError(f"{prefix}{k}: unknown BitsAndBytesConfig key; allowed: {', '.join(_BNB_DEFAULTS)}")
    bnb = {**_BNB_DEFAULTS, **raw}
    if bnb["quant_method"] != "bitsandbytes":
        raise ValueError(f"{prefix}quant_method: {bnb['quant_method']!r} is not supported; allowed: 'bitsandbytes'")
    flags = {k: _bnb_bool(bnb, k, prefix) for k in _BNB_DEFAULTS if k.startswith(("load_in", "_load_in"))}
    flags.update({k: _bnb_bool(bnb, k, prefix) for k in ("llm_int8_enable_fp32_cpu_offload",
                                                          "llm_int8_has_fp16_weight",
                                                          "bnb_4bit_use_double_quant")})
    # transformers writes both the property (load_in_4bit) and its private field (_load_in_4bit).
    for bits in ("4bit", "8bit"):
        public, private = f"load_in_{bits}", f"_load_in_{bits}"
        if public in raw and private in raw and flags[public] != flags[private]:
            raise ValueError(f"{prefix}{public}: {flags[public]} disagrees with {private}: {flags[private]}")
    in_4bit = flags["load_in_4bit"] or flags["_load_in_4bit"]
    in_8bit = flags["load_in_8bit"] or flags["_load_in_8bit"]
    if in_4bit and in_8bit:
        raise ValueError(f"{prefix}load_in_4bit/load_in_8bit: both are true; allowed: exactly one of them")
    if not (in_4bit or in_8bit):
        raise ValueError(f"{prefix}load_in_4bit/load_in_8bit: both are false; allowed: exactly one of them true")

    threshold = bnb["llm_int8_threshold"]
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise ValueError(f"{prefix}llm_int8_threshold: expected a number, got {threshold!r}")
    if not math.isfinite(threshold) or threshold < 0:
        raise ValueError(f"{prefix}llm_int8_threshold: {threshold} is not allowed; allowed: a finite number >= 0")

    skip = bnb["llm_int8_skip_modules"]
    if skip is None:
        skip = list(DEFAULT_SKIP_MODULES)
    if not isinstance(skip, list) or not all(isinstance(s, str) and s for s in skip):
        raise ValueError(f"{prefix}llm_int8_skip_modules: expected null or a list of module names, got {skip!r}")
    if flags["llm_int8_enable_fp32_cpu_offload"]:
        log.info("qcompile: llm_int8_enable_fp32_cpu_offload has no effect; modules stay on their device")

    compute = parse_dtype(bnb["bnb_4bit_compute_dtype"], f"{prefix}bnb_4bit_compute_dtype", FLOAT_DTYPES)
    storage = parse_dtype(bnb["bnb_4bit_quant_storage"], f"{prefix}bnb_4bit_quant_storage", QUANT_STORAGE_DTYPES)
    quant_type = bnb["bnb_4bit_quant_type"]
    four_bit = {"nf4": NF4, "fp4": FP4}
    if quant_type not in four_bit:
        raise ValueError(f"{prefix}bnb_4bit_quant_type: {quant_type!r} is not allowed; allowed: nf4, fp4")

    scheme: Scheme
    if in_4bit:
        scheme = four_bit[quant_type](
            double_quant=flags["bnb_4bit_use_double_quant"], compute_dtype=compute, quant_storage=storage
        )
    else:
        scheme = Int8(threshold=float(threshold), has_fp16_weight=flags["llm_int8_has_fp16_weight"])
    # transformers skips a module when any skip name is a substring of its qualified name.
    rules = tuple(Rule(f"*{name}*", None) for name in skip)
    return QuantConfig(default=scheme, rules=rules)


_PEFT_PREFIX = "base_model.model."
_PEFT_BASE_LAYER = ".base_layer"


def _peft_aliases(name: str) -> list[str]:
    """The name a module has in the model peft wraps: rules written for the model (``lm_head``,
    ``model.layers.0.self_attn.q_proj``) then match under ``get_peft_model`` too, where the head is
    ``base_model.model.lm_head`` and a LoRA layer's frozen linear is ``...q_proj.base_layer``."""
    stripped = name.removeprefix(_PEFT_PREFIX).removesuffix(_PEFT_BASE_LAYER)
    return [stripped] if stripped != name else []
