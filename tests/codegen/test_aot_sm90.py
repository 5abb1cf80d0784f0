"""Every Triton kernel compiles for sm_90 (H100/H200) and fits its shared memory; no GPU needed.

The check runs in a subprocess because it needs the real compiler (TRITON_INTERPRET unset), while
this test session's kernels were built for the interpreter. See ``aot_sm90.py``.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_every_kernel_compiles_for_sm90_within_shared_memory():
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "tests.codegen.aot_sm90"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    report = done.stdout + done.stderr
    assert done.returncode == 0, report[-6000:]
    assert "0 failures" in report and "lowbit_gemm_kernel" in report and "w8a8_gemm_kernel" in report
