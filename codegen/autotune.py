"""Autotuning for the qcompile kernels: config spaces, M bucketing, a shared-memory pruner and a
persistent JSON cache of winning configs.

How a tuned launch works (``TunedKernel.launch``):

1. The tuning key is ``(kernel name, M bucket, *extra key values, *tensor dtypes)``. M is rounded up
   to the next power of two (``m_bucket``) so a new batch size inside the same bucket reuses the
   winner instead of retuning.
2. ``QCOMPILE_AUTOTUNE`` picks the work: ``off`` launches one heuristic config (no benchmarking),
   ``fast`` tunes over a small space, ``max`` over the full space. Under the Triton interpreter
   (``TRITON_INTERPRET=1``) tuning is always off: there is nothing meaningful to time and CI must
   stay fast.
3. A winner is looked up in memory, then in the JSON cache on disk (loaded lazily on the first tuned
   launch, never at import). On a miss, ``triton.autotune`` (applied as a function to the plain
   ``@triton.jit`` kernel, one Autotuner per M bucket) benchmarks the pruned space and its
   ``best_config`` is written back to the cache.

The cache file ``$QCOMPILE_CACHE_DIR/autotune.json`` (default ``~/.cache/qcompile``) maps
``"<device>|<triton version>|<kernel>|<json key>"`` to a config. Writes are read-merge-replace under
an advisory lock file, through a temporary file and ``os.replace``, so two processes tuning at once
both keep their entries and a reader never sees half a file. A corrupted or foreign file is ignored
with a warning (and replaced on the next write).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

CACHE_FORMAT = "qcompile-autotune"
CACHE_VERSION = 1
CACHE_FILE = "autotune.json"
AUTOTUNE_ENV = "QCOMPILE_AUTOTUNE"
CACHE_DIR_ENV = "QCOMPILE_CACHE_DIR"
AUTOTUNE_MODES = ("off", "fast", "max")


# ---- settings from the environment (read at call time, never cached) ---------------------------

def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def autotune_mode() -> str:
    """``off``, ``fast`` or ``max`` from ``QCOMPILE_AUTOTUNE`` (default ``fast``); ``off`` under the interpreter."""
    raw = os.environ.get(AUTOTUNE_ENV, "fast")
    mode = raw.strip().lower()
    if mode not in AUTOTUNE_MODES:
        raise ValueError(f"{AUTOTUNE_ENV}: {raw!r} is not allowed; allowed: {', '.join(AUTOTUNE_MODES)}")
    return "off" if interpreting() else mode


def cache_dir() -> Path:
    """Where the autotune cache lives: ``$QCOMPILE_CACHE_DIR`` or ``~/.cache/qcompile``."""
    override = os.environ.get(CACHE_DIR_ENV)
    if override:
        return Path(override).expanduser()
    return Path.home() / ".cache" / "qcompile"


def cache_path() -> Path:
    return cache_dir() / CACHE_FILE


def m_bucket(m: int) -> int:
    """M rounded up to the next power of two (at least 1): the M part of every tuning key."""
    m = max(int(m), 1)
    return 1 << (m - 1).bit_length()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type}-interpreter"


def triton_version() -> str:
    import triton

    return triton.__version__


# ---- the persistent cache ---------------------------------------------------------------------

def config_to_dict(config: Any) -> dict[str, Any]:
    """A triton.Config as plain JSON data."""
    return {"kwargs": dict(config.kwargs), "num_warps": config.num_warps, "num_stages": config.num_stages}


def config_from_dict(data: dict[str, Any]) -> Any:
    import triton

    return triton.Config(dict(data["kwargs"]), num_warps=int(data["num_warps"]), num_stages=int(data["num_stages"]))


def _valid_entry(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and isinstance(value.get("kwargs"), dict)
        and isinstance(value.get("num_warps"), int)
        and isinstance(value.get("num_stages"), int)
    )


def read_cache_file(path: Path) -> dict[str, dict[str, Any]]:
    """The entries of the cache file at ``path``; {} (with a warning) if it is corrupted or foreign."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as exc:
        warnings.warn(f"qcompile autotune cache {path} cannot be read ({exc}); ignoring it", stacklevel=2)
        return {}
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        warnings.warn(f"qcompile autotune cache {path} is corrupted ({exc}); ignoring it", stacklevel=2)
        return {}
    if (
        not isinstance(data, dict)
        or data.get("format") != CACHE_FORMAT
        or data.get("version") != CACHE_VERSION
        or not isinstance(data.get("entries"), dict)
    ):
        warnings.warn(
            f"qcompile autotune cache {path} is not a {CACHE_FORMAT} v{CACHE_VERSION} file; ignoring it",
            stacklevel=2,
        )
        return {}
    return {k: v for k, v in data["entries"].items() if isinstance(k, str) and _valid_entry(v)}


@contextlib.contextmanager
def _file_lock(lock_path: Path) -> Iterator[None]:
    """An exclusive advisory lock (fcntl); on platforms without fcntl the replace is still atomic."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    with open(lock_path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def write_cache_entries(path: Path, entries: dict[str, dict[str, Any]]) -> None:
    """Merge ``entries`` into the cache file at ``path`` atomically (lock, read, merge, temp file, replace)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(path.with_name(path.name + ".lock")):
        with warnings.catch_warnings():
            # A corrupted file was reported when it was read; overwriting it is the repair.
            warnings.simplefilter("ignore")
            merged = read_cache_file(path)
        merged.update(entries)
        payload = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "entries": merged}
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(payload, handle, indent=1, sort_keys=True)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


def cache_key(device: str, kernel: str, key: Sequence[Any], version: str | None = None) -> str:
    """The string a winner is stored under: device, triton version, kernel and the tuning key."""
    version = triton_version() if version is None else version
    return f"{device}|{version}|{kernel}|{json.dumps(list(key), separators=(',', ':'))}"


class AutotuneCache:
    """The on-disk winners for one cache file, loaded on first use and reloaded if the path changes."""

    def __init__(self) -> None:
        self._path: Path | None = None
        self._entries: dict[str, dict[str, Any]] = {}

    def _load(self) -> dict[str, dict[str, Any]]:
        path = cache_path()
        if path != self._path:
            self._entries = read_cache_file(path)
            self._path = path
        return self._entries

    def get(self, key: str) -> dict[str, Any] | None:
        return self._load().get(key)

    def put(self, key: str, config: dict[str, Any]) -> None:
        entries = self._load()
        entries[key] = config
        assert self._path is not None
        write_cache_entries(self._path, {key: config})


# ---- shared-memory pruning --------------------------------------------------------------------

def max_shared_memory(device: torch.device) -> int:
    """Shared memory one program may use (opt-in maximum) on ``device``; 0 under the interpreter."""
    if device.type != "cuda":
        return 0
    props = torch.cuda.get_device_properties(device)
    for name in ("shared_memory_per_block_optin", "shared_memory_per_multiprocessor"):
        value = getattr(props, name, 0)
        if value:
            return int(value)
    import triton

    return int(triton.runtime.driver.active.utils.get_device_properties(device.index or 0)["max_shared_mem"])


def make_pruner(
    smem_bytes: Callable[[dict[str, Any], int, dict[str, Any]], int],
    useful: Callable[[dict[str, Any], dict[str, Any]], bool] | None = None,
) -> Callable[..., list]:
    """An ``early_config_prune`` dropping configs whose estimated shared memory exceeds the device's.

    ``smem_bytes(config.kwargs, num_stages, named_args)`` estimates one config's need; ``useful(kwargs,
    named_args)`` may drop configs that cannot pay off for these sizes (a 128-row tile for M=2).
    If nothing is left, the config needing the least shared memory is kept so there is one to run.
    """

    def prune(configs: list, named_args: dict[str, Any], **kwargs: Any) -> list:
        device = next((v.device for v in named_args.values() if isinstance(v, torch.Tensor)), torch.device("cpu"))
        limit = max_shared_memory(device)
        if limit == 0:
            return configs[:1]
        sized = [(smem_bytes({**c.kwargs, **kwargs}, c.num_stages, named_args), c) for c in configs]
        kept = [
            c for need, c in sized
            if need <= limit and (useful is None or useful({**c.kwargs, **kwargs}, named_args))
        ]
        return kept or [min(sized, key=lambda item: item[0])[1]]

    return prune


# ---- the tuned launcher -----------------------------------------------------------------------

class TunedKernel:
    """One plain ``@triton.jit`` kernel plus its config spaces, heuristic and cache glue.

    spaces: ``{"fast": [...], "max": [...]}`` lists of triton.Config.
    heuristic: ``(named_args) -> triton.Config`` used for ``off`` (and for the interpreter).
    interpreter_config: the single small config used under ``TRITON_INTERPRET=1``.
    key_names: kernel arguments (sizes) that, with the M bucket and the tensor dtypes, key a winner.
    reset_to_zero: output arguments a benchmark run accumulates into (split-K atomics).
    """

    def __init__(
        self,
        name: str,
        kernel: Any,
        arg_names: Sequence[str],
        spaces: dict[str, list],
        heuristic: Callable[[dict[str, Any]], Any],
        interpreter_config: Callable[[dict[str, Any]], Any],
        smem_bytes: Callable[[dict[str, Any], int, dict[str, Any]], int],
        useful: Callable[[dict[str, Any], dict[str, Any]], bool] | None = None,
        key_names: Sequence[str] = (),
        reset_to_zero: Sequence[str] = (),
    ) -> None:
        self.name = name
        self.kernel = kernel
        self.arg_names = list(arg_names)
        self.spaces = spaces
        self.heuristic = heuristic
        self.interpreter_config = interpreter_config
        self.smem_bytes = smem_bytes
        self.pruner = make_pruner(smem_bytes, useful)
        self.key_names = list(key_names)
        self.reset_to_zero = list(reset_to_zero)
        self._tuners: dict[tuple[str, int], Any] = {}
        self._winners: dict[str, Any] = {}
        self._disk = AutotuneCache()

    def _tuner(self, mode: str, bucket: int) -> Any:
        # One Autotuner per (mode, M bucket): its own in-memory cache is keyed by the other key
        # values (key_names, plus the dtypes triton appends), so M never enters it and a new M in
        # the same bucket does not retune.
        if (mode, bucket) not in self._tuners:
            import triton

            self._tuners[(mode, bucket)] = triton.autotune(
                configs=self.spaces[mode],
                key=self.key_names,
                prune_configs_by={"early_config_prune": self.pruner},
                reset_to_zero=self.reset_to_zero or None,
            )(self.kernel)
        return self._tuners[(mode, bucket)]

    def choose(self, args: Sequence[Any], m: int, config: Any = None) -> tuple[str, Any]:
        """(mode, config) or (mode, (None, cache key)) meaning "tune now in ``mode``"."""
        named = dict(zip(self.arg_names, args, strict=True))
        key_extra = [named[k] for k in self.key_names]
        if config is not None:
            return "forced", config
        if interpreting():
            autotune_mode()  # still validate the variable
            return "off", self.interpreter_config(named)
        mode = autotune_mode()
        if mode == "off":
            return mode, self.heuristic(named)
        dtypes = [str(a.dtype).removeprefix("torch.") for a in args if isinstance(a, torch.Tensor)]
        device = next(a.device for a in args if isinstance(a, torch.Tensor))
        key = cache_key(device_name(device), f"{self.name}:{mode}", [m_bucket(m), *key_extra, *dtypes])
        if key in self._winners:
            return mode, self._winners[key]
        stored = self._disk.get(key)
        if stored is not None:
            self._winners[key] = config_from_dict(stored)
            return mode, self._winners[key]
        return mode, (None, key)

    def launch(
        self,
        grid: Callable[[dict[str, Any]], tuple[int, ...]],
        args: Sequence[Any],
        m: int,
        config: Any = None,
        **constexprs: Any,
    ) -> Any:
        """Run the kernel on ``args`` with a chosen, cached or freshly tuned config."""
        mode, chosen = self.choose(args, m, config)
        if isinstance(chosen, tuple):
            _, key = chosen
            tuner = self._tuner(mode, m_bucket(m))
            tuner[grid](*args, **constexprs)
            winner = tuner.best_config
            self._winners[key] = winner
            try:
                self._disk.put(key, config_to_dict(winner))
            except OSError as exc:
                warnings.warn(f"qcompile autotune cache could not be written ({exc})", stacklevel=2)
            return winner
        meta = dict(chosen.kwargs)
        launch_kwargs = {**constexprs, **meta, "num_warps": chosen.num_warps, "num_stages": chosen.num_stages}
        self.kernel[lambda m_: grid({**constexprs, **meta})](*args, **launch_kwargs)
        return chosen


def config(num_warps: int = 4, num_stages: int = 2, **kwargs: Any) -> Any:
    """Shorthand for ``triton.Config(kwargs, num_warps=..., num_stages=...)``."""
    import triton

    return triton.Config(kwargs, num_warps=num_warps, num_stages=num_stages)


def as_config(value: Any) -> Any:
    """Accept a triton.Config or a dict (``{"BLOCK_N": 32, ..., "num_warps": 4}``) as a forced config."""
    if value is None or hasattr(value, "kwargs"):
        return value
    if not isinstance(value, dict):
        raise ValueError(f"config: expected a triton.Config or a dict, got {type(value).__name__}")
    data = dict(value)
    num_warps = int(data.pop("num_warps", 4))
    num_stages = int(data.pop("num_stages", 2))
    return config(num_warps=num_warps, num_stages=num_stages, **data)


# ---- GEMM config spaces shared by the tiled kernels -------------------------------------------

def tile_spaces(fast_tiles: Sequence[tuple[int, int, int, int, int]], block_ks: Sequence[int]) -> dict[str, list]:
    """GROUP_M=8 tile spaces. fast: the given (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
    tiles; max: BLOCK_M in 16..128 x BLOCK_N in 32..256 x ``block_ks`` x 2..4 stages."""
    fast = [
        config(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in fast_tiles
    ]
    full = [
        config(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=8 if bm * bn >= 128 * 128 else 4,
               num_stages=s)
        for bm in (16, 32, 64, 128)
        for bn in (32, 64, 128, 256)
        for bk in block_ks
        for s in (2, 3, 4)
    ]
    return {"fast": fast, "max": full}


def gemm_spaces() -> dict[str, list]:
    """(Shared with the int8 GEMMs.) fast: 7 classic tiles; max: a 4 x 4 x 3 x 3 grid."""
    return tile_spaces(
        ((16, 64, 128, 4, 4), (32, 64, 64, 4, 4), (64, 64, 64, 4, 3), (64, 128, 64, 4, 3),
         (128, 64, 64, 4, 3), (128, 128, 64, 8, 3), (128, 256, 32, 8, 3)),
        (32, 64, 128),
    )


def gemm_useful(meta: dict[str, Any], named: dict[str, Any]) -> bool:
    """No point in row tiles more than twice as tall as M's bucket."""
    return meta["BLOCK_M"] <= max(16, 2 * m_bucket(named["M"]))


def gemm_heuristic(named: dict[str, Any]) -> Any:
    m = named["M"]
    fp32 = named["x_ptr"].element_size() == 4
    bk = 32 if fp32 else 64
    if m <= 16:
        return config(BLOCK_M=16, BLOCK_N=64, BLOCK_K=bk * 2, GROUP_M=8, num_warps=4, num_stages=4)
    if m <= 64:
        return config(BLOCK_M=64, BLOCK_N=64, BLOCK_K=bk, GROUP_M=8, num_warps=4, num_stages=3)
    return config(BLOCK_M=128, BLOCK_N=128, BLOCK_K=bk, GROUP_M=8, num_warps=8, num_stages=3)


def gemm_interpreter_config(named: dict[str, Any]) -> Any:
    # Few, fat programs: the interpreter's cost is per program and per op, not per element.
    return config(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, num_warps=4, num_stages=1)
