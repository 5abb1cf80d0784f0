"""Names and constants of bitsandbytes' checkpoint layout, shared by saving and loading (see the package docstring)."""

from __future__ import annotations

import re

from qcompile.formats import Scheme

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
DEFAULT_MAX_SHARD_SIZE = "50GB"  # transformers 5's save_pretrained default
# bitsandbytes' 4-bit blocksize; a BitsAndBytesConfig has no blocksize key, so transformers quantizes with it.
BNB_BLOCKSIZE = 64

QUANT_STATE = "weight.quant_state.bitsandbytes__"
# Keys of a bitsandbytes module's state dict, relative to the module (longest first: "weight" last).
BNB_SUFFIXES = ("weight.nested_quant_map", "weight.nested_absmax", "weight.quant_map", "weight.absmax",
                "weight_format", "SCB", "weight")
# Keys of a GPTQ (v1) or AutoAWQ GEMM linear, relative to the module; the module has no "weight" entry.
AFFINE_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")
SHARD_PATTERN = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def scheme_text(scheme: Scheme) -> str:
    """A scheme with all its settings, for messages: ``nf4(blocksize=64, double_quant=True, ...)``."""
    settings = ", ".join(f"{k}={v}" for k, v in scheme.to_dict().items() if k != "type")
    return f"{scheme.kind}({settings})"

