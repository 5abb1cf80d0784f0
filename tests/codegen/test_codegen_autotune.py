"""Autotune settings, M bucketing, the shared-memory pruner and the persistent winner cache."""

import json
import multiprocessing
import warnings

import pytest
import torch
import triton
import triton.language as tl

from qcompile.codegen import autotune


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("QCOMPILE_CACHE_DIR", str(tmp_path / "qc"))
    return tmp_path / "qc"


def _entry(block=32, warps=4):
    return {"kwargs": {"BLOCK_N": block}, "num_warps": warps, "num_stages": 2}


@pytest.mark.parametrize("m, bucket", [(0, 1), (1, 1), (2, 2), (3, 4), (17, 32), (4096, 4096), (4097, 8192)])
def test_m_bucket(m, bucket):
    assert autotune.m_bucket(m) == bucket


def test_env_var_overrides_cache_location(cache_dir, monkeypatch):
    assert autotune.cache_path() == cache_dir / "autotune.json"
    monkeypatch.delenv("QCOMPILE_CACHE_DIR")
    assert autotune.cache_dir().name == "qcompile" and autotune.cache_dir().parent.name == ".cache"


def test_autotune_mode(monkeypatch):
    monkeypatch.setenv("QCOMPILE_AUTOTUNE", "bogus")
    with pytest.raises(ValueError, match="QCOMPILE_AUTOTUNE"):
        autotune.autotune_mode()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    for mode in ("off", "fast", "max", " MAX "):
        monkeypatch.setenv("QCOMPILE_AUTOTUNE", mode)
        assert autotune.autotune_mode() == mode.strip().lower()
    monkeypatch.delenv("QCOMPILE_AUTOTUNE")
    assert autotune.autotune_mode() == "fast"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("QCOMPILE_AUTOTUNE", "max")
    assert autotune.autotune_mode() == "off"  # no tuning in the interpreter


def test_round_trip(cache_dir):
    key = autotune.cache_key("NVIDIA H100", "linear_4bit_gemm:fast", [16, 4096, 4096, "float16"])
    cache = autotune.AutotuneCache()
    assert cache.get(key) is None
    cache.put(key, _entry())
    assert json.loads((cache_dir / "autotune.json").read_text())["format"] == autotune.CACHE_FORMAT
    fresh = autotune.AutotuneCache()
    assert fresh.get(key) == _entry()
    config = autotune.config_from_dict(fresh.get(key))
    assert config.kwargs == {"BLOCK_N": 32} and config.num_warps == 4 and config.num_stages == 2
    assert autotune.config_to_dict(config) == _entry()
    # No temporary files are left behind.
    assert sorted(p.name for p in cache_dir.iterdir()) == ["autotune.json", "autotune.json.lock"]


def test_key_has_device_triton_version_and_key():
    key = autotune.cache_key("dev", "kern", [4, 8, "int8"], version="3.9.0")
    assert key == 'dev|3.9.0|kern|[4,8,"int8"]'


@pytest.mark.parametrize("content", ["{not json", "", "\x00\x01garbage"])
def test_corrupted_file_is_ignored_with_a_warning(cache_dir, content):
    cache_dir.mkdir(parents=True)
    (cache_dir / "autotune.json").write_text(content)
    cache = autotune.AutotuneCache()
    with pytest.warns(UserWarning, match="corrupted"):
        assert cache.get("anything") is None
    cache.put("k", _entry())  # the next write repairs the file
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert autotune.read_cache_file(cache_dir / "autotune.json") == {"k": _entry()}


@pytest.mark.parametrize(
    "payload", [{"foo": 1}, [1, 2], {"format": "other", "version": 1, "entries": {}},
                {"format": autotune.CACHE_FORMAT, "version": 99, "entries": {}}]
)
def test_foreign_file_is_ignored_with_a_warning(cache_dir, payload):
    cache_dir.mkdir(parents=True)
    (cache_dir / "autotune.json").write_text(json.dumps(payload))
    with pytest.warns(UserWarning, match="not a qcompile-autotune"):
        assert autotune.read_cache_file(cache_dir / "autotune.json") == {}


def test_malformed_entries_are_dropped(cache_dir):
    cache_dir.mkdir(parents=True)
    entries = {"good": _entry(), "bad": {"kwargs": 3}, "worse": 7}
    payload = {"format": autotune.CACHE_FORMAT, "version": autotune.CACHE_VERSION, "entries": entries}
    (cache_dir / "autotune.json").write_text(json.dumps(payload))
    assert autotune.read_cache_file(cache_dir / "autotune.json") == {"good": _entry()}


def _writer(path, prefix, count):
    from pathlib import Path

    from qcompile.codegen import autotune as at

    for i in range(count):
        at.write_cache_entries(Path(path), {f"{prefix}-{i}": _entry(block=16 + i)})


def test_two_processes_writing_at_once_keep_both_entries(tmp_path):
    path = tmp_path / "autotune.json"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(path), name, 25)) for name in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    entries = autotune.read_cache_file(path)
    assert set(entries) == {f"{p}-{i}" for p in "ab" for i in range(25)}


def test_cache_is_not_touched_at_import(cache_dir):
    import importlib

    import qcompile.codegen.lowbit as mod

    importlib.reload(mod)
    assert not cache_dir.exists()


# ---- the launcher's choice and the pruner -----------------------------------------------------------

@triton.jit
def _fill_kernel(y_ptr, N, VALUE: tl.constexpr, BLOCK_N: tl.constexpr):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    tl.store(y_ptr + rn, tl.full((BLOCK_N,), VALUE, tl.float32), mask=rn < N)


@triton.jit
def _other_fill_kernel(y_ptr, N, VALUE: tl.constexpr, BLOCK_N: tl.constexpr):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    tl.store(y_ptr + rn, tl.full((BLOCK_N,), VALUE + 1, tl.float32), mask=rn < N)


def _fill_grid(n):
    return lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)


def _tuned(kernel=_fill_kernel):
    def heuristic(named):
        return autotune.config(BLOCK_N=64, num_warps=8, num_stages=3)

    def interp(named):
        return autotune.config(BLOCK_N=16, num_warps=1, num_stages=1)

    spaces = {"fast": [autotune.config(BLOCK_N=b) for b in (16, 32)], "max": []}
    return autotune.TunedKernel("fake", kernel=kernel, arg_names=["y_ptr", "N"], spaces=spaces, heuristic=heuristic,
                                interpreter_config=interp, smem_bytes=lambda meta, stages, named: 0,
                                key_names=["N"])


def test_choice_uses_persisted_winner_and_buckets_m(cache_dir, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("QCOMPILE_AUTOTUNE", "fast")
    tuned = _tuned()
    args = (torch.zeros(4, dtype=torch.float16), 256)
    mode, pending = tuned.choose(args, m=3, VALUE=1.5)
    assert mode == "fast" and isinstance(pending, tuple) and pending[0] is None
    key = pending[1]
    source = autotune.kernel_source_hash(_fill_kernel)
    assert key.endswith(f'|fake:fast@{source}|[4,256,"float16",{{"VALUE":1.5}}]')
    autotune.write_cache_entries(autotune.cache_path(), {key: _entry(block=32)})
    fresh = _tuned()
    for m in (3, 4):  # same bucket: same winner, no retune
        mode, config = fresh.choose(args, m=m, VALUE=1.5)
        assert config.kwargs == {"BLOCK_N": 32}
    _, other = fresh.choose(args, m=5, VALUE=1.5)  # next bucket: not tuned yet
    assert isinstance(other, tuple)


def test_key_has_kernel_source_hash_and_constexprs(cache_dir, monkeypatch):
    """A changed kernel (or a helper it calls) or another constexpr specialization gets its own key."""
    monkeypatch.setenv("QCOMPILE_AUTOTUNE", "fast")
    monkeypatch.setattr(autotune, "interpreting", lambda: False)
    calls = []
    real_hash = autotune.kernel_source_hash
    monkeypatch.setattr(autotune, "kernel_source_hash", lambda kernel: calls.append(kernel) or real_hash(kernel))
    args = (torch.zeros(4), 256)
    tuned = _tuned()
    assert calls == []  # nothing is read at construction
    key = tuned.choose(args, m=1, VALUE=1.0)[1][1]
    assert tuned.choose(args, m=1, VALUE=1.0)[1][1] == key
    assert calls == [_fill_kernel]  # computed once, then memoized
    assert tuned.choose(args, m=1, VALUE=2.0)[1][1] != key
    assert _tuned(_other_fill_kernel).choose(args, m=1, VALUE=1.0)[1][1] != key
    autotune.write_cache_entries(autotune.cache_path(), {key: _entry(block=32)})
    assert _tuned(_other_fill_kernel).choose(args, m=1, VALUE=1.0)[1][0] is None  # the winner is not reused
    assert _tuned().choose(args, m=1, VALUE=1.0)[1].kwargs == {"BLOCK_N": 32}


@triton.jit
def _helper(x):
    return x + 1


@triton.jit
def _other_helper(x):
    return x + 2


@triton.jit
def _kernel_with_helper(y_ptr, BLOCK_N: tl.constexpr):
    rn = tl.arange(0, BLOCK_N)
    tl.store(y_ptr + rn, _helper(rn))


def test_source_hash_covers_the_jit_helpers_a_kernel_calls(monkeypatch):
    before = autotune.kernel_source_hash(_kernel_with_helper)
    assert len(before) == 16 and before == autotune.kernel_source_hash(_kernel_with_helper)
    monkeypatch.setitem(_kernel_with_helper.fn.__globals__, "_helper", _other_helper)
    assert autotune.kernel_source_hash(_kernel_with_helper) != before


def test_constexpr_parameters_read_postponed_annotations():
    names, required = autotune.constexpr_parameters(_fill_kernel)
    assert names == required == {"VALUE", "BLOCK_N"}
    from qcompile.codegen.lowbit import lowbit_gemv_kernel

    names, _ = autotune.constexpr_parameters(lowbit_gemv_kernel)  # `from __future__ import annotations`
    assert {"STAGES", "SPLIT_K", "BLOCK_K", "ALIGNED"} <= names and "K" not in names


@pytest.mark.parametrize("stored, why", [
    ({"kwargs": {}, "num_warps": 4, "num_stages": 2}, "lacks the meta-parameter BLOCK_N"),
    ({"kwargs": {"BLOCK_N": 32, "STAGES": 2}, "num_warps": 4, "num_stages": 2}, "no meta-parameter STAGES"),
    ({"kwargs": {"BLOCK_N": 32, "VALUE": 9.0}, "num_warps": 4, "num_stages": 2}, "contradicts"),
    ({"kwargs": {"BLOCK_N": 24}, "num_warps": 4, "num_stages": 2}, "launch failed"),  # not a power of two
    ({"kwargs": {"BLOCK_N": 32}, "num_warps": 3, "num_stages": 2}, "num_warps=3"),
], ids=["missing", "unknown", "contradicting", "failing", "warps"])
def test_stored_config_the_kernel_cannot_take_is_dropped_and_retuned(cache_dir, monkeypatch, stored, why):
    # The cache lookup runs with tuning on; the kernel still runs in the interpreter (CPU tensors).
    monkeypatch.setattr(autotune, "autotune_mode", lambda: "fast")
    y = torch.zeros(40)
    args = (y, 40)
    key = _tuned().choose(args, m=1, VALUE=1.5)[1][1]
    good_key = key.replace("[1,", "[2,")  # another bucket's entry must survive the repair
    autotune.write_cache_entries(autotune.cache_path(), {key: stored, good_key: _entry(block=32)})
    tuned = _tuned()
    with pytest.warns(UserWarning, match=f"dropped the cached fake config.*{why}"):
        used = tuned.launch(_fill_grid(40), args, 1, VALUE=1.5)
    assert used.kwargs == {"BLOCK_N": 16}  # retuned: the first config of the space (the interpreter prunes to one)
    assert torch.equal(y, torch.full((40,), 1.5))
    on_disk = autotune.read_cache_file(autotune.cache_path())
    assert on_disk == {key: _entry(block=16), good_key: _entry(block=32)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # repaired: no second warning, in this process or a new one
        assert tuned.launch(_fill_grid(40), args, 1, VALUE=1.5).kwargs == {"BLOCK_N": 16}
        assert _tuned().launch(_fill_grid(40), args, 1, VALUE=1.5).kwargs == {"BLOCK_N": 16}


def test_forced_config_the_kernel_cannot_take_is_a_value_error():
    y = torch.zeros(8)
    tuned = _tuned()
    with pytest.raises(ValueError, match="config.*lacks the meta-parameter BLOCK_N"):
        tuned.launch(_fill_grid(8), (y, 8), 1, config=autotune.config(), VALUE=1.0)
    with pytest.raises(ValueError, match="config.*contradicts the launch's VALUE=1.0"):
        tuned.launch(_fill_grid(8), (y, 8), 1, config=autotune.config(BLOCK_N=8, VALUE=2.0), VALUE=1.0)
    assert tuned.launch(_fill_grid(8), (y, 8), 1, config=autotune.config(BLOCK_N=8, VALUE=1.0), VALUE=1.0)
    assert torch.equal(y, torch.ones(8))


def test_choice_off_and_interpreter_and_forced(monkeypatch):
    tuned = _tuned()
    args = (torch.zeros(4), 256)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("QCOMPILE_AUTOTUNE", "off")
    assert tuned.choose(args, m=1)[1].kwargs == {"BLOCK_N": 64}
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert tuned.choose(args, m=1)[1].kwargs == {"BLOCK_N": 16}
    forced = autotune.as_config({"BLOCK_N": 128, "num_warps": 2})
    assert tuned.choose(args, m=1, config=forced) == ("forced", forced)
    with pytest.raises(ValueError, match="config"):
        autotune.as_config([1, 2])


def test_pruner_drops_configs_over_shared_memory(monkeypatch):
    configs = [autotune.config(BLOCK=b, num_stages=s) for b in (32, 64, 128) for s in (2, 4)]
    prune = autotune.make_pruner(lambda meta, stages, named: meta["BLOCK"] * 1024 * stages)
    x = torch.zeros(1)
    # The interpreter (no shared memory to speak of) keeps one config.
    assert prune(configs, {"x_ptr": x}) == configs[:1]
    monkeypatch.setattr(autotune, "max_shared_memory", lambda device: 228 * 1024)
    kept = prune(configs, {"x_ptr": x})
    assert [(c.kwargs["BLOCK"], c.num_stages) for c in kept] == [(32, 2), (32, 4), (64, 2)]
    monkeypatch.setattr(autotune, "max_shared_memory", lambda device: 1024)
    assert [(c.kwargs["BLOCK"], c.num_stages) for c in prune(configs, {"x_ptr": x})] == [(32, 2)]


def test_gemm_pruner_drops_tiles_taller_than_needed(monkeypatch):
    monkeypatch.setattr(autotune, "max_shared_memory", lambda device: 10**9)
    prune = autotune.make_pruner(lambda meta, stages, named: 0, autotune.gemm_useful)
    kept = prune(autotune.gemm_spaces()["fast"], {"x_ptr": torch.zeros(1), "M": 3})
    assert kept and all(c.kwargs["BLOCK_M"] == 16 for c in kept)
    assert len(autotune.gemm_spaces()["max"]) > len(autotune.gemm_spaces()["fast"])


# ---- stale entries against a real kernel (the 4-bit GEMV, in the interpreter) ---------------------------

def _gemv_operands(n=33, k=96, blocksize=64):
    gen = torch.Generator().manual_seed(7)
    packed = torch.randint(0, 256, (n * k // 2,), generator=gen, dtype=torch.uint8)
    absmax = torch.rand(-(-n * k // blocksize), generator=gen) + 0.5
    code = torch.linspace(-1, 1, 16)
    x = torch.randn(1, k, generator=gen)
    return x, packed, absmax, code, n, k, blocksize


def _gemv(x, packed, absmax, code, n, k, blocksize):
    from qcompile.codegen.lowbit import linear_4bit

    return linear_4bit(x, packed, absmax, code, None, None, None, 0.0, blocksize, n, k, torch.float32)


@pytest.fixture
def tuned_in_interpreter(cache_dir, monkeypatch):
    """Tuning on (and the cache consulted) while the kernels still run in the interpreter; fresh launchers."""
    from qcompile.codegen import lowbit

    monkeypatch.setattr(autotune, "interpreting", lambda: False)  # INTERPRET=False: fp32 compute only
    monkeypatch.setenv("QCOMPILE_AUTOTUNE", "fast")
    lowbit._tuned.cache_clear()
    yield lowbit
    lowbit._tuned.cache_clear()


def _gemv_entries():
    return {k: v for k, v in autotune.read_cache_file(autotune.cache_path()).items() if "lowbit_gemv" in k}


@pytest.mark.parametrize("stale", [{"drop": "STAGES"}, {"set": ("BLOCK_K", 48)}], ids=["no-STAGES", "BLOCK_K=48"])
def test_stale_gemv_entry_is_dropped_not_a_crash(tuned_in_interpreter, stale):
    """A winner stored by an older GEMV (no STAGES meta-parameter) crashed with "missing 1 required
    positional argument: 'STAGES'"; a block size the kernel rejects failed the same way."""
    import codegen_refs as ref

    x, packed, absmax, code, n, k, bs = _gemv_operands()
    expected = ref.linear_4bit(x, ref.dequantize_4bit(packed, absmax, code, None, None, 0.0, bs, n, k), None,
                               torch.float32)
    torch.testing.assert_close(_gemv(x, packed, absmax, code, n, k, bs), expected)  # tunes, writes the cache
    [(key, good)] = _gemv_entries().items()
    bad = json.loads(json.dumps(good))
    if "drop" in stale:
        del bad["kwargs"][stale["drop"]]
    else:
        bad["kwargs"][stale["set"][0]] = stale["set"][1]
    autotune.write_cache_entries(autotune.cache_path(), {key: bad})
    tuned_in_interpreter._tuned.cache_clear()  # a new process: only the disk remembers
    with pytest.warns(UserWarning, match="dropped the cached lowbit_gemv config"):
        torch.testing.assert_close(_gemv(x, packed, absmax, code, n, k, bs), expected)
    assert _gemv_entries() == {key: good}


def test_entries_of_another_kernel_source_or_key_format_are_not_used(tuned_in_interpreter):
    """Winners stored by another version of the kernel source, or under the old key (no source hash,
    no constexprs), are never looked up: a run neither crashes on them nor warns."""
    import re

    import codegen_refs as ref

    x, packed, absmax, code, n, k, bs = _gemv_operands()
    expected = ref.linear_4bit(x, ref.dequantize_4bit(packed, absmax, code, None, None, 0.0, bs, n, k), None,
                               torch.float32)
    torch.testing.assert_close(_gemv(x, packed, absmax, code, n, k, bs), expected)
    [(key, good)] = _gemv_entries().items()
    other_source = re.sub(r"@[0-9a-f]{16}\|", "@" + "0" * 16 + "|", key)
    old_format = re.sub(r",\{[^{}]*\}\]$", "]", other_source.replace("@" + "0" * 16, ""))
    assert key != other_source and '"ALIGNED"' not in old_format and "@" not in old_format
    stale = {"kwargs": {k_: v for k_, v in good["kwargs"].items() if k_ != "STAGES"}, "num_warps": 4,
             "num_stages": 1}
    autotune.cache_path().unlink()
    autotune.write_cache_entries(autotune.cache_path(), {other_source: stale, old_format: stale})
    tuned_in_interpreter._tuned.cache_clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(_gemv(x, packed, absmax, code, n, k, bs), expected)
    assert _gemv_entries() == {other_source: stale, old_format: stale, key: good}


def test_cache_key_text_is_built_once_per_call_signature(cache_dir, monkeypatch):
    monkeypatch.setattr(autotune, "autotune_mode", lambda: "fast")
    tuned = _tuned()
    args = (torch.zeros(4), 256)
    key = tuned.choose(args, m=1, VALUE=1.5)[1][1]
    assert tuned.choose(args, m=3, VALUE=1.5)[1][1] != key  # another M bucket
    assert tuned.choose(args, m=1, VALUE=2.5)[1][1] != key  # another constexpr
    assert tuned.choose((torch.zeros(4, dtype=torch.float16), 256), m=1, VALUE=1.5)[1][1] != key  # another dtype
    built = []
    monkeypatch.setattr(autotune, "cache_key", lambda *a, **kw: built.append(a) or "rebuilt")
    assert tuned.choose(args, m=1, VALUE=1.5)[1][1] == key and built == []  # remembered, not rebuilt
    assert tuned.choose(args, m=8, VALUE=1.5)[1][1] == "rebuilt"  # M=8: a new bucket, its text is built
