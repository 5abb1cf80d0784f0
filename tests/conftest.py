"""Test-wide setup.

Triton decides at decoration time whether a kernel runs in its interpreter, so
TRITON_INTERPRET must be set before any qcompile.codegen module is imported.
Without CUDA the interpreter is the only way the kernels can run at all.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test starts with empty dynamo caches.

    Test models share forward code objects, and dynamo's per-code recompile limit (8)
    would otherwise make later tests fall back to eager.
    """
    torch._dynamo.reset()
    yield
