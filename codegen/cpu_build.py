"""Build and load qcompile's C++ CPU kernels (``cpu_*.cpp`` beside this file) at first use.

Each source is compiled once per machine with the system C++ compiler (``$CXX``, else ``c++``, ``g++``,
``clang++``) for the CPU it runs on (``-march=native``: the instruction set is chosen at compile time,
AVX-512 / AVX2 / plain C++, see the source), into ``$QCOMPILE_CACHE_DIR/cpu`` (default
``~/.cache/qcompile/cpu``) under a name that hashes the source, the compiler, the flags and the CPU's
feature flags, so a cache shared between machines never hands one machine another's instructions.
No torch headers are involved, so a build takes about a second, and the library is loaded with
``ctypes``.

When there is no compiler, or the build fails, :func:`cpu_library` returns None after logging why
once, and the ops run their torch reference instead: slower, never wrong.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

from qcompile.codegen.autotune import cache_dir

log = logging.getLogger(__name__)

SOURCE_DIR = Path(__file__).resolve().parent
BUILD_TIMEOUT_S = 300
# -ffp-contract=off: the decode must round a multiply and an add separately, as the torch reference does.
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-std=c++17", "-shared", "-fPIC")
OPENMP = ("-fopenmp",)


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_features() -> str:
    """The CPU's feature flags (Linux), or what platform knows elsewhere: part of the build's cache key."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _version(compiler: str) -> str:
    try:
        return subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _build(source: Path, compiler: str, flags: tuple[str, ...], target: Path) -> str | None:
    """Compile ``source`` into ``target`` (atomically); None on success, else the compiler's complaint."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        partial = Path(tmp) / target.name
        try:
            result = subprocess.run([compiler, *flags, str(source), "-o", str(partial)], capture_output=True,
                                    text=True, timeout=BUILD_TIMEOUT_S)
        except (OSError, subprocess.SubprocessError) as error:
            return str(error)
        if result.returncode != 0:
            return (result.stderr or result.stdout).strip()[-2000:]
        os.replace(partial, target)
    return None


def build_library(name: str, extra_flags: tuple[str, ...] = ()) -> ctypes.CDLL | None:
    """Compile (or find in the cache) and load ``cpu_<name>.cpp``; None, with the reason logged, if impossible.

    ``extra_flags`` (e.g. ``("-mno-avx512f",)``) build a variant: the tests use them to run the AVX2 and
    plain C++ paths on a machine that has AVX-512.
    """
    source = SOURCE_DIR / f"cpu_{name}.cpp"
    compiler = _compiler()
    if compiler is None:
        log.warning("qcompile: no C++ compiler found (set CXX); CPU ops run the slower torch reference")
        return None
    machine = b"\0".join([source.read_bytes(), _version(compiler).encode(), _cpu_features().encode(),
                           platform.machine().encode()])
    errors = []
    for flags in ((*FLAGS, *OPENMP, *extra_flags), (*FLAGS, *extra_flags)):  # without OpenMP: one thread
        key = hashlib.sha256(machine + b"\0" + " ".join(flags).encode()).hexdigest()[:20]
        target = cache_dir() / "cpu" / f"{name}-{key}.so"
        if not target.exists():
            error = _build(source, compiler, flags, target)
            if error is not None:
                errors.append(error)
                continue
        try:
            return ctypes.CDLL(str(target))
        except OSError as error:
            errors.append(str(error))
    log.warning("qcompile: could not build the CPU kernels %s with %s; CPU ops run the slower torch reference:\n%s",
                source.name, compiler, "\n".join(errors))
    return None


@functools.cache
def cpu_library(name: str) -> ctypes.CDLL | None:
    """``build_library(name)``, once per process."""
    return build_library(name)
