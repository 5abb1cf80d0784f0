"""Parsing and naming of torch dtypes as they appear in config files."""

from __future__ import annotations

import torch

# Spellings seen in bitsandbytes / transformers configs, mapped to the dtype.
_DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "uint8": torch.uint8,
    "int8": torch.int8,
}

_CANONICAL_NAMES: dict[torch.dtype, str] = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.uint8: "uint8",
    torch.int8: "int8",
}

FLOAT_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)


def parse_dtype(value: object, key: str, allowed: tuple[torch.dtype, ...]) -> torch.dtype:
    """Turn a dtype or its name ("bfloat16", "torch.float16", "fp32") into a torch.dtype.

    Raises ValueError naming ``key`` and the allowed names when the value is not one of ``allowed``.
    """
    allowed_names = ", ".join(dtype_name(d) for d in allowed)
    if isinstance(value, torch.dtype):
        dtype = value
    elif isinstance(value, str):
        name = value.strip().lower().removeprefix("torch.")
        if name not in _DTYPE_NAMES:
            raise ValueError(f"{key}: unknown dtype {value!r}; allowed: {allowed_names}")
        dtype = _DTYPE_NAMES[name]
    else:
        raise ValueError(f"{key}: expected a dtype name (str), got {type(value).__name__} {value!r}")
    if dtype not in allowed:
        raise ValueError(f"{key}: dtype {dtype_name(dtype)} is not supported here; allowed: {allowed_names}")
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    """The canonical config-file name of a dtype ("bfloat16")."""
    return _CANONICAL_NAMES.get(dtype, str(dtype).removeprefix("torch."))
