"""Autotune settings, M bucketing, the shared-memory pruner and the persistent winner cache."""

import json
import multiprocessing
import warnings

import pytest
import torch

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

    import qcompile.codegen.linear_4bit as mod

    importlib.reload(mod)
    assert not cache_dir.exists()


# ---- the launcher's choice and the pruner -----------------------------------------------------------

def _tuned():
    def heuristic(named):
        return autotune.config(BLOCK_N=64, num_warps=8, num_stages=3)

    def interp(named):
        return autotune.config(BLOCK_N=16, num_warps=1, num_stages=1)

    spaces = {"fast": [autotune.config(BLOCK_N=b) for b in (16, 32)], "max": []}
    return autotune.TunedKernel("fake", kernel=None, arg_names=["x_ptr", "N"], spaces=spaces, heuristic=heuristic,
                                interpreter_config=interp, smem_bytes=lambda meta, stages, named: 0,
                                key_names=["N"])


def test_choice_uses_persisted_winner_and_buckets_m(cache_dir, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("QCOMPILE_AUTOTUNE", "fast")
    tuned = _tuned()
    args = (torch.zeros(4, dtype=torch.float16), 256)
    mode, pending = tuned.choose(args, m=3)
    assert mode == "fast" and isinstance(pending, tuple) and pending[0] is None
    key = pending[1]
    assert key.endswith('|fake:fast|[4,256,"float16"]')
    autotune.write_cache_entries(autotune.cache_path(), {key: _entry(block=32)})
    fresh = _tuned()
    for m in (3, 4):  # same bucket: same winner, no retune
        mode, config = fresh.choose(args, m=m)
        assert config.kwargs == {"BLOCK_N": 32}
    _, other = fresh.choose(args, m=5)  # next bucket: not tuned yet
    assert isinstance(other, tuple)


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
