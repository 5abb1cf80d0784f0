"""Test-wide setup.

Triton decides at decoration time whether a kernel runs in its interpreter, so
TRITON_INTERPRET must be set before any qcompile.codegen module is imported.
Without CUDA the interpreter is the only way the kernels can run at all.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
