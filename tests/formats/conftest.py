"""Fixtures shared by the format tests: bitsandbytes as the reference implementation."""

import logging

import pytest

bnb = pytest.importorskip("bitsandbytes")
# bitsandbytes logs a warning about an optional CPU kernel package at import; irrelevant here.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


@pytest.fixture
def eager_bnb_dequant(monkeypatch):
    """Make bitsandbytes' CPU dequantize_4bit fallback run eagerly.

    For an odd last dimension (and blocksize >= 2048 on AVX-512) bitsandbytes dequantizes
    with a torch.compile'd function that costs ~20 s to compile per shape on CPU. The
    wrapped eager function is the same code; its result is what we compare against.
    """
    from bitsandbytes.backends.default import ops as default_ops

    compiled = default_ops._dequantize_4bit_compute
    monkeypatch.setattr(default_ops, "_dequantize_4bit_compute", getattr(compiled, "__wrapped__", compiled))

