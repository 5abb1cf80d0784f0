"""Autotuning for the qcompile kernels: config spaces, M bucketing, a shared-memory pruner, a
persistent JSON cache of winning configs, and the one place kernels are launched (``run_kernel``).

How a tuned launch works (``TunedKernel.launch``):

1. The tuning key is ``(kernel name, mode, kernel source hash, M bucket, *extra key values, *tensor
   dtypes, the launch's constexprs)``. M is rounded up to the next power of two (``m_bucket``) so a
   new batch size inside the same bucket reuses the winner instead of retuning. The source hash
   (the ``@triton.jit`` function's source and that of the jit helpers it calls, computed on the first
   tuned launch) and the constexprs (the compile-time constants that are not tuned, e.g.
   ``HAS_BIAS``, ``ALIGNED``) keep a changed kernel or another specialization from reusing a winner.
2. ``QCOMPILE_AUTOTUNE`` picks the work: ``off`` launches one heuristic config (no benchmarking),
   ``fast`` tunes over a small space, ``max`` over the full space. Under the Triton interpreter
   (``TRITON_INTERPRET=1``) tuning is always off: there is nothing meaningful to time and CI must
   stay fast.
3. A winner is looked up in memory, then in the JSON cache on disk (loaded lazily on the first tuned
   launch, never at import). On a miss, ``triton.autotune`` (applied as a function to the plain
   ``@triton.jit`` kernel, one Autotuner per M bucket and constexpr set) benchmarks the pruned space
   and its ``best_config`` is written back to the cache.
4. A stored config the kernel cannot take (meta-parameters it does not have or lacks, values that
   contradict the launch's constexprs, or a launch failing with TypeError / ValueError / a Triton
   error) is dropped from memory and disk with a warning, and the launch retunes: a cache written by
   an older kernel version must never crash a run.
5. Choosing costs more host time than launching (building the key, the lookups, the grid, the keyword
   arguments: 5-10 us per call on a 2-core CPU). An entry point that calls the same kernel with the same
   sizes over and over (every linear, every decoded token) keeps a launch plan per call signature in
   ``TunedKernel.plans`` (see ``lowbit._Plan``), made from the config its first call chose; the plans
   are dropped with any winner. The signature includes ``QCOMPILE_AUTOTUNE`` as set, so a changed
   setting is seen on the next call.

Every launch, tuned or not, goes through ``run_kernel``, which makes the tensors' CUDA device the
current one (Triton launches on the current device and its current stream, whatever the tensors'
device is) so a model spread over several GPUs runs each kernel where its data is.

The cache file ``$QCOMPILE_CACHE_DIR/autotune.json`` (default ``~/.cache/qcompile``) maps
``"<device>|<triton version>|<kernel>:<mode>@<source hash>|<json key>"`` to a config. Writes are
read-merge-replace under an advisory lock file, through a temporary file and ``os.replace``, so two
processes tuning at once both keep their entries and a reader never sees half a file. A corrupted or
foreign file is ignored with a warning (and replaced on the next write).
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
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


def mode_setting() -> str | None:
    """``QCOMPILE_AUTOTUNE`` as set (unchecked): part of launch-plan signatures, so a changed setting is seen
    (and checked by :func:`autotune_mode`) on the next call."""
    return os.environ.get(AUTOTUNE_ENV)


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


def write_cache_entries(path: Path, entries: dict[str, dict[str, Any]], remove: Sequence[str] = ()) -> None:
    """Merge ``entries`` into the cache file at ``path`` and delete the keys ``remove``, atomically
    (lock, read, merge, temp file, replace)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(path.with_name(path.name + ".lock")):
        with warnings.catch_warnings():
            # A corrupted file was reported when it was read; overwriting it is the repair.
            warnings.simplefilter("ignore")
            merged = read_cache_file(path)
        merged.update(entries)
        for key in remove:
            merged.pop(key, None)
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

    def remove(self, key: str) -> None:
        """Forget ``key`` here and in the file (other processes' entries are kept)."""
        self._load().pop(key, None)
        assert self._path is not None
        write_cache_entries(self._path, {}, remove=[key])


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


# ---- launching --------------------------------------------------------------------------------

def device_guard(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """Makes ``device`` the current CUDA device for the duration (a no-op for CPU / the interpreter).

    Triton launches on the current device and its current stream, not on the tensors' device.
    """
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def tensor_device(args: Sequence[Any]) -> torch.device:
    """The device of the first tensor in ``args`` (the entry points check that all share one)."""
    return next((a.device for a in args if isinstance(a, torch.Tensor)), torch.device("cpu"))


def run_kernel(kernel: Any, grid: Any, args: Sequence[Any], **kwargs: Any) -> Any:
    """``kernel[grid](*args, **kwargs)`` on the device of its tensor arguments.

    Every qcompile launch, tuned or not, goes through here, so the device guard is in one place.
    """
    with device_guard(tensor_device(args)):
        return kernel[grid](*args, **kwargs)


class DecidedLaunch:
    """A launch whose config and grid are decided: ``run_kernel(kernel, grid, args, **kwargs)`` for any ``args``.

    The per-call part of a launch plan (see ``TunedKernel.plans``): calling it costs a tuple and
    ``run_kernel``, none of the choosing, config checks or grid evaluation of ``TunedKernel.launch``.
    """

    __slots__ = ("kernel", "grid", "kwargs")

    def __init__(self, kernel: Any, grid: tuple[int, ...], kwargs: dict[str, Any]) -> None:
        self.kernel = kernel
        self.grid = grid
        self.kwargs = kwargs

    def __call__(self, args: Sequence[Any]) -> Any:
        return run_kernel(self.kernel, self.grid, args, **self.kwargs)


# ---- what a kernel accepts --------------------------------------------------------------------

def _python_function(kernel: Any) -> Any:
    # JITFunction and the interpreter's InterpretedFunction both keep the decorated function in .fn.
    return getattr(kernel, "fn", kernel)


def kernel_source_hash(kernel: Any) -> str:
    """sha256 (16 hex digits) of ``kernel``'s source and of the ``@triton.jit`` helpers it calls, transitively.

    Source text only (not line numbers, unlike triton's own ``cache_key``): editing a comment
    elsewhere in the module does not throw the winners away, editing the kernel or a helper does.
    """
    from triton.runtime.jit import KernelInterface

    sources: list[str] = []
    seen: set[int] = set()
    pending = [kernel]
    while pending:
        fn = _python_function(pending.pop())
        if id(fn) in seen:
            continue
        seen.add(id(fn))
        sources.append(inspect.getsource(fn))
        globals_ = getattr(fn, "__globals__", {})
        pending.extend(v for name in fn.__code__.co_names
                       if isinstance(v := globals_.get(name), KernelInterface))
    return hashlib.sha256("\0".join(sources).encode("utf-8")).hexdigest()[:16]


def constexpr_parameters(kernel: Any) -> tuple[frozenset[str], frozenset[str]]:
    """(names of ``kernel``'s ``tl.constexpr`` parameters, those of them without a default)."""
    names, required = set(), set()
    for param in inspect.signature(_python_function(kernel)).parameters.values():
        annotation = param.annotation
        # `from __future__ import annotations` leaves the annotation as the string "tl.constexpr".
        spelled = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
        if spelled.rsplit(".", 1)[-1] == "constexpr":
            names.add(param.name)
            if param.default is inspect.Parameter.empty:
                required.add(param.name)
    return frozenset(names), frozenset(required)


def _jsonable(value: Any) -> Any:
    # Constexprs are bools, ints, strings and tl.dtypes (COMPUTE_DTYPE); the latter go in by name.
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


def constexpr_key(constexprs: dict[str, Any]) -> dict[str, Any]:
    """The launch's constexprs as sorted JSON data: part of every tuning key."""
    return {name: _jsonable(constexprs[name]) for name in sorted(constexprs)}


# ---- the tuned launcher -----------------------------------------------------------------------

def _config_errors() -> tuple[type[Exception], ...]:
    """What a launch raises when a stored config does not fit the kernel: renamed or missing
    meta-parameters (TypeError), values the kernel rejects (ValueError), a block shape the compiler
    rejects or more shared memory than this device has (triton's errors)."""
    from triton.errors import TritonError

    return (TypeError, ValueError, TritonError)


MAX_PLANS = 1024  # launch plans kept per tuned kernel (TunedKernel.remember_plan)


class TunedKernel:
    """One plain ``@triton.jit`` kernel plus its config spaces, heuristic and cache glue.

    spaces: ``{"fast": [...], "max": [...]}`` lists of triton.Config.
    heuristic: ``(named_args) -> triton.Config`` used for ``off`` (and for the interpreter).
    interpreter_config: the single small config used under ``TRITON_INTERPRET=1``.
    key_names: kernel arguments (sizes) that, with the M bucket and the tensor dtypes, key a winner.
    reset_to_zero: output arguments a benchmark run accumulates into (split-K atomics).

    A cached winner is checked against the kernel's constexpr parameters before it runs, and dropped
    (with a warning) if it does not fit or its launch fails; a forced config that does not fit is a
    ValueError.
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
        self._tuners: dict[tuple[str, int, str], Any] = {}
        self._winners: dict[str, Any] = {}
        self._keys: dict[tuple[Any, ...], str] = {}  # call signature -> cache key text (see _choose)
        self._disk = AutotuneCache()
        self._source_hash: str | None = None  # on the first tuned launch: reading source is not import work
        self._constexprs: tuple[frozenset[str], frozenset[str]] | None = None
        # Launch plans the entry points build from a launch's config, under a call signature of theirs that
        # determines everything ``_choose`` and the grid depend on (sizes, dtypes, device, constexprs, mode).
        # Valid while the winners stand: emptied whenever a winner is dropped or tuned.
        self.plans: dict[Any, Any] = {}

    @property
    def source_hash(self) -> str:
        if self._source_hash is None:
            self._source_hash = kernel_source_hash(self.kernel)
        return self._source_hash

    def config_problem(self, config: Any, constexprs: dict[str, Any]) -> str | None:
        """Why ``config`` cannot be launched with ``constexprs``, or None if its meta-parameters fit the kernel."""
        if self._constexprs is None:
            self._constexprs = constexpr_parameters(self.kernel)
        names, required = self._constexprs
        meta = dict(config.kwargs)
        unknown = sorted(set(meta) - names)
        if unknown:
            return f"the kernel has no meta-parameter {', '.join(unknown)}"
        missing = sorted(required - set(meta) - set(constexprs))
        if missing:
            return f"it lacks the meta-parameter {', '.join(missing)}"
        clash = sorted(k for k in set(meta) & set(constexprs) if meta[k] != constexprs[k])
        if clash:
            return "it contradicts the launch's " + ", ".join(f"{k}={constexprs[k]!r}" for k in clash)
        if not (config.num_warps >= 1 and config.num_warps & (config.num_warps - 1) == 0 and config.num_stages >= 1):
            return f"num_warps={config.num_warps}, num_stages={config.num_stages} are not launchable"
        return None

    def _tuner(self, mode: str, bucket: int, constexprs: str) -> Any:
        # One Autotuner per (mode, M bucket, constexprs): its own in-memory cache is keyed by the
        # other key values (key_names, plus the dtypes triton appends) only, so M never enters it
        # and a new M in the same bucket does not retune, and another specialization (HAS_BIAS,
        # ALIGNED, ...) does not reuse a winner timed for this one.
        if (mode, bucket, constexprs) not in self._tuners:
            import triton

            self._tuners[(mode, bucket, constexprs)] = triton.autotune(
                configs=self.spaces[mode],
                key=self.key_names,
                prune_configs_by={"early_config_prune": self.pruner},
                reset_to_zero=self.reset_to_zero or None,
            )(self.kernel)
        return self._tuners[(mode, bucket, constexprs)]

    def _drop(self, key: str, config: Any, why: str) -> None:
        self._winners.pop(key, None)
        self.plans.clear()
        try:
            self._disk.remove(key)
        except OSError as exc:
            warnings.warn(f"qcompile autotune cache could not be written ({exc})", stacklevel=3)
        warnings.warn(
            f"qcompile autotune: dropped the cached {self.name} config {config_to_dict(config)} ({why}); retuning",
            stacklevel=3,
        )

    def _choose(self, args: Sequence[Any], m: int, config: Any, constexprs: dict[str, Any]) -> tuple[str, Any, Any]:
        """(mode, config or None = "tune now", cache key or None when the config does not come from the cache)."""
        named = dict(zip(self.arg_names, args, strict=True))
        if config is not None:
            return "forced", config, None
        mode = autotune_mode()  # also validates the variable under the interpreter, where it is "off"
        if mode == "off":
            return mode, (self.interpreter_config(named) if interpreting() else self.heuristic(named)), None
        # The cache key's text (device name, Triton version, JSON) costs more host time than the launch
        # itself; it is built once per distinct call signature and remembered under a cheap tuple.
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        signature = (mode, m_bucket(m), *(named[k] for k in self.key_names), *(t.dtype for t in tensors),
                     tensors[0].device if tensors else None, *sorted(constexprs.items()))
        key = self._keys.get(signature)
        if key is None:
            dtypes = [str(t.dtype).removeprefix("torch.") for t in tensors]
            key = cache_key(
                device_name(tensor_device(args)), f"{self.name}:{mode}@{self.source_hash}",
                [m_bucket(m), *(named[k] for k in self.key_names), *dtypes, constexpr_key(constexprs)],
            )
            self._keys[signature] = key
        if key in self._winners:
            return mode, self._winners[key], key
        stored = self._disk.get(key)
        if stored is not None:
            winner = config_from_dict(stored)
            problem = self.config_problem(winner, constexprs)
            if problem is not None:
                self._drop(key, winner, problem)
                return mode, None, key
            self._winners[key] = winner
            return mode, winner, key
        return mode, None, key

    def choose(self, args: Sequence[Any], m: int, config: Any = None, **constexprs: Any) -> tuple[str, Any]:
        """(mode, config) or (mode, (None, cache key)) meaning "tune now in ``mode``"."""
        mode, chosen, key = self._choose(args, m, config, constexprs)
        return (mode, (None, key)) if chosen is None else (mode, chosen)

    def remember_plan(self, signature: Any, plan: Any) -> None:
        """Keep ``plan`` under ``signature``. Prefill makes a signature per prompt length: past MAX_PLANS the plans
        start over, so a server seeing every length keeps a bounded number (decode's few come back at once)."""
        if len(self.plans) >= MAX_PLANS:
            self.plans.clear()
        self.plans[signature] = plan

    def decided(self, config: Any, grid: Callable[[dict[str, Any]], tuple[int, ...]],
                constexprs: dict[str, Any]) -> DecidedLaunch:
        """The launch of ``config`` with ``constexprs``: its grid evaluated, its keyword arguments assembled."""
        meta = {**constexprs, **config.kwargs}
        return DecidedLaunch(self.kernel, tuple(grid(meta)),
                             {**meta, "num_warps": config.num_warps, "num_stages": config.num_stages})

    def launch(
        self,
        grid: Callable[[dict[str, Any]], tuple[int, ...]],
        args: Sequence[Any],
        m: int,
        config: Any = None,
        **constexprs: Any,
    ) -> Any:
        """Run the kernel on ``args`` with a chosen, cached or freshly tuned config; returns that config."""
        mode, chosen, key = self._choose(args, m, config, constexprs)
        if mode == "forced":
            problem = self.config_problem(chosen, constexprs)
            if problem is not None:
                raise ValueError(f"config: {config_to_dict(chosen)} cannot launch {self.name}: {problem}")
        if chosen is not None:
            try:
                self.decided(chosen, grid, constexprs)(args)
                return chosen
            except _config_errors() as exc:
                if key is None:  # not a cached config: a real error
                    raise
                self._drop(key, chosen, f"its launch failed: {type(exc).__name__}: {exc}")
                # A launch that died part-way (the interpreter runs programs one by one) may have
                # added into the zeroed split-K output already.
                named = dict(zip(self.arg_names, args, strict=True))
                for name in self.reset_to_zero:
                    named[name].zero_()
        tuner = self._tuner(mode, m_bucket(m), json.dumps(constexpr_key(constexprs)))
        run_kernel(tuner, grid, args, **constexprs)
        winner = tuner.best_config
        self._winners[key] = winner
        self.plans.clear()
        try:
            self._disk.put(key, config_to_dict(winner))
        except OSError as exc:
            warnings.warn(f"qcompile autotune cache could not be written ({exc})", stacklevel=2)
        return winner


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
