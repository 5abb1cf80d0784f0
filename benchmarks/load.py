"""Quantize while loading: peak memory and load time of ``qcompile.quantize(checkpoint=...)`` against
bitsandbytes' ``load_in_4bit``, on the same safetensors files.

    python -m benchmarks.load [--sizes 1b,8b] [--workdir DIR] [--out FILE]
    python -m benchmarks.load --sizes smoke --out /tmp/load.json      # a tiny model (for the tests)

For each size the benchmark writes a Llama checkpoint of random bf16 weights (``config.json``, shards of
at most ``--shard-gib`` GiB, ``model.safetensors.index.json``) into ``--workdir`` (kept for the next run:
writing 16 GB takes minutes), then loads it in fresh processes, one per side:

* ``qcompile``: the model built on the meta device (``accelerate.init_empty_weights``, bf16), then
  ``qcompile.quantize(model, QuantConfig(), checkpoint=dir)``: NF4 + double quant, bf16 compute,
  ``lm_head`` float; every tensor is read from the memory-mapped shards one at a time.
* ``bnb``: ``AutoModelForCausalLM.from_pretrained(dir, quantization_config=BitsAndBytesConfig(load_in_4bit=True,
  nf4, double quant, bf16 compute), dtype=bf16, device_map="cpu")``: the same format (transformers keeps
  ``lm_head`` float too).

Measured per side: load seconds (wall clock, from before the model is built to the end of loading);
peak resident set (``VmHWM``), less the resident set of the same process just before loading
(interpreter, torch, transformers imported): the memory loading added; the peak of the anonymous part
of the resident set (``RssAnon``: heap, tensors; not the memory-mapped shards' pages), sampled every
millisecond by a thread, less its value before loading: the analogue of a GPU's peak allocation; and
the bytes the loaded model holds (``qcompile.memory_footprint``: storages really held plus packed forms;
and transformers' ``get_memory_footprint`` for bitsandbytes). The profiler's allocation trace
(``benchmarks/tensor_memory.py``) is not used here: it misses the frees of tensors safetensors creates.

The issue's goals, checked in the output: added anonymous memory <= 1.1 x (packed model + the largest
linear weight in float); added RSS <= 1.2 x (largest shard + packed model) (the shards are
memory-mapped: pages read stay resident until the shard is closed). Page cache is dropped before each
load when the process may (``/proc/sys/vm/drop_caches``); otherwise the side that runs second may read
from cache, noted in ``page_cache_dropped``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.pack_throughput import machine_info
from benchmarks.timing import environment

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "cpu" / "load.json"
SIZES: dict[str, dict[str, Any]] = {
    # Llama 3.2 1B and Llama 3.1 8B shapes.
    "1b": {"vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
           "num_attention_heads": 32, "num_key_value_heads": 8, "tie_word_embeddings": True},
    "8b": {"vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
           "num_attention_heads": 32, "num_key_value_heads": 8, "tie_word_embeddings": False},
    "smoke": {"vocab_size": 256, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": False},
}
ANON_BOUND = 1.1
RSS_BOUND = 1.2


def _llama_config(size: str):
    from transformers import LlamaConfig

    return LlamaConfig(**SIZES[size], max_position_embeddings=2048, dtype="bfloat16")


def write_checkpoint(size: str, directory: Path, shard_gib: float) -> dict[str, Any]:
    """Random bf16 weights for every parameter of the model, in shards; returns the shard sizes."""
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    marker = directory / "complete.json"
    if marker.exists():
        return json.loads(marker.read_text())
    directory.mkdir(parents=True, exist_ok=True)
    config = _llama_config(size)
    with init_empty_weights():
        model = LlamaForCausalLM(config)
    model.tie_weights()  # a tied head is written once, under the embedding's name, as transformers saves it
    generator = torch.Generator().manual_seed(0)
    limit = int(shard_gib * 2**30)
    shards: list[dict[str, torch.Tensor]] = [{}]
    sizes = [0]
    seen: set[int] = set()
    for name, param in model.named_parameters():  # tied weights once, under their first name
        if id(param) in seen:
            continue
        seen.add(id(param))
        nbytes = param.numel() * 2
        if sizes[-1] and sizes[-1] + nbytes > limit:
            save_file(shards[-1], str(directory / f"part-{len(shards):05d}.safetensors"), metadata={"format": "pt"})
            shards.append({})
            sizes.append(0)
        value = torch.randn(param.shape, generator=generator, dtype=torch.float32).mul_(0.02)
        if name.endswith("norm.weight"):
            value = torch.ones(param.shape)
        shards[-1][name] = value.to(torch.bfloat16)
        sizes[-1] += nbytes
    save_file(shards[-1], str(directory / f"part-{len(shards):05d}.safetensors"), metadata={"format": "pt"})
    total = len(shards)
    weight_map = {}
    for i in range(total):
        old = directory / f"part-{i + 1:05d}.safetensors"
        new = directory / f"model-{i + 1:05d}-of-{total:05d}.safetensors"
        old.rename(new)
    for i, shard in enumerate(shards):
        weight_map.update({key: f"model-{i + 1:05d}-of-{total:05d}.safetensors" for key in shard})
    index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    config.save_pretrained(directory)
    info = {"shard_bytes": sizes, "total_bytes": sum(sizes), "tensors": len(weight_map)}
    marker.write_text(json.dumps(info))
    return info


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


class _PeakSampler:
    """A thread sampling one ``/proc/self/status`` field (kiB) every ``interval`` seconds; ``peak`` is its maximum."""

    def __init__(self, field: str, interval: float = 0.001) -> None:
        self.field, self.interval, self.peak = field, interval, _rss_kib(field)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_kib(self.field))
            time.sleep(self.interval)

    def __enter__(self) -> _PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_kib(self.field))


def run_worker(side: str, size: str, directory: Path) -> dict[str, Any]:
    """Load the checkpoint in this process (see the module docstring)."""
    import transformers

    import qcompile

    transformers.logging.set_verbosity_error()
    config = qcompile.QuantConfig()
    out: dict[str, Any] = {"side": side, "size": size}
    # Imported before the clock and the RSS baseline start: what loading adds, not what importing does.
    _ = transformers.LlamaForCausalLM, transformers.AutoModelForCausalLM
    if side == "bnb":
        import bitsandbytes  # noqa: F401
    else:
        import accelerate  # noqa: F401
        import safetensors.torch  # noqa: F401

        import qcompile.quantize_model  # noqa: F401
    out["page_cache_dropped"] = _drop_page_cache()
    rss_before, anon_before = _rss_kib("VmRSS"), _rss_kib("RssAnon")
    start = time.perf_counter()
    with _PeakSampler("RssAnon") as anon:
        if side == "qcompile":
            from accelerate import init_empty_weights

            with init_empty_weights():
                model = transformers.AutoModelForCausalLM.from_config(_llama_config(size), dtype=torch.bfloat16)
            result = qcompile.quantize(model, config, checkpoint=directory)
            out["packed_weights"] = len(result.packed)
        else:
            bnb = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                  bnb_4bit_use_double_quant=True,
                                                  bnb_4bit_compute_dtype=torch.bfloat16)
            model = transformers.AutoModelForCausalLM.from_pretrained(directory, quantization_config=bnb,
                                                                      dtype=torch.bfloat16, device_map="cpu")
            out["transformers_memory_footprint_bytes"] = model.get_memory_footprint()
    out["load_s"] = time.perf_counter() - start
    out["rss_before_mib"] = rss_before / 1024
    out["peak_rss_mib"] = _rss_kib("VmHWM") / 1024
    out["added_peak_rss_mib"] = out["peak_rss_mib"] - out["rss_before_mib"]
    out["added_peak_anon_mib"] = (anon.peak - anon_before) / 1024
    shapes = _llama_config(size)
    out["largest_linear_bytes"] = 2 * max(shapes.hidden_size, shapes.intermediate_size) * shapes.hidden_size
    footprint = qcompile.memory_footprint(model)
    out["footprint"] = {"float_bytes": footprint.float_bytes, "packed_bytes": footprint.packed_bytes,
                        "total_bytes": footprint.total_bytes}
    return out


def _drop_page_cache() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")
        return True
    except OSError:
        return False


def _spawn(side: str, size: str, directory: Path) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "worker.json"
        cmd = [sys.executable, "-m", "benchmarks.load", "--worker", side, "--sizes", size, "--workdir", str(directory),
               "--worker-out", str(path)]
        done = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True)
        if done.returncode != 0:
            return {"side": side, "size": size, "error": done.stderr[-4000:]}
        return json.loads(path.read_text())


def check(size: str, checkpoint: dict[str, Any], runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The goals for one size, from its runs."""
    ours = runs.get("qcompile", {})
    if any("error" in r for r in runs.values()):
        return {"ok": False, "why": ["a worker failed"]}
    packed_model = ours["footprint"]["total_bytes"]
    largest_shard = max(checkpoint["shard_bytes"])
    anon_bound = ANON_BOUND * (packed_model + ours["largest_linear_bytes"])
    rss_bound = RSS_BOUND * (largest_shard + packed_model)
    added_rss, added_anon = ours["added_peak_rss_mib"] * 2**20, ours["added_peak_anon_mib"] * 2**20
    out = {
        "packed_model_bytes": packed_model, "largest_shard_bytes": largest_shard,
        "added_peak_anon_bytes": added_anon, "anon_bound_bytes": anon_bound, "anon_ok": added_anon <= anon_bound,
        "added_peak_rss_bytes": added_rss, "rss_bound_bytes": rss_bound, "rss_ok": added_rss <= rss_bound,
    }
    if "bnb" in runs:
        out["load_s_ratio_qcompile_over_bnb"] = ours["load_s"] / runs["bnb"]["load_s"]
        out["added_peak_rss_ratio_qcompile_over_bnb"] = ours["added_peak_rss_mib"] / runs["bnb"]["added_peak_rss_mib"]
    out["ok"] = out["anon_ok"] and out["rss_ok"]
    return out


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--sizes", default="1b,8b", help=f"comma separated: {', '.join(SIZES)}")
    parser.add_argument("--sides", default="qcompile,bnb", help="comma separated: qcompile, bnb")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "qcompile-load-bench")
    parser.add_argument("--shard-gib", type=float, default=2.0, help="largest shard of the written checkpoints")
    parser.add_argument("--out", type=Path, default=None, help=f"results JSON (default {DEFAULT_OUT})")
    parser.add_argument("--worker", choices=("qcompile", "bnb"), help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    sizes = [s for s in args.sizes.split(",") if s]
    bad = [s for s in sizes if s not in SIZES]
    if bad:
        raise SystemExit(f"--sizes: unknown {bad}; allowed: {', '.join(SIZES)}")
    if args.worker:
        result = run_worker(args.worker, sizes[0], args.workdir / sizes[0])
        args.worker_out.write_text(json.dumps(result))
        return 0
    if "smoke" in sizes and args.out is None:
        raise SystemExit("--sizes smoke needs --out FILE (smoke results are not kept in benchmarks/results)")
    sides = [s for s in args.sides.split(",") if s]
    results = {}
    for size in sizes:
        start = time.perf_counter()
        checkpoint = write_checkpoint(size, args.workdir / size, args.shard_gib)
        checkpoint["write_s"] = time.perf_counter() - start
        runs = {side: _spawn(side, size, args.workdir) for side in sides}
        results[size] = {"checkpoint": checkpoint, "runs": runs, "goals": check(size, checkpoint, runs)}
        _print(size, results[size])
    doc = {"environment": environment(torch.device("cpu")), "machine": machine_info(),
           "method": __doc__.split("\n\n", 3)[3].strip(), "sizes": {s: SIZES[s] for s in sizes}, "results": results}
    out_path = args.out or DEFAULT_OUT
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {out_path}")
    return 0 if all("error" not in r for res in results.values() for r in res["runs"].values()) else 1


def _print(size: str, result: dict[str, Any]) -> None:
    gib = 2**30
    for side, r in result["runs"].items():
        if "error" in r:
            print(f"{size:5s} {side:15s} ERROR {r['error'][-400:]}")
            continue
        line = (f"{size:5s} {side:15s} load {r['load_s']:7.1f} s  "
                f"added peak RSS {r['added_peak_rss_mib'] / 1024:6.2f} GiB  "
                f"model holds {r['footprint']['total_bytes'] / gib:6.2f} GiB")
        line += f"  added peak anon {r['added_peak_anon_mib'] / 1024:6.2f} GiB"
        print(line)
    goals = result["goals"]
    if "anon_bound_bytes" in goals:
        print(f"{size:5s} goals: added anon {goals['added_peak_anon_bytes'] / gib:.2f} <= "
              f"{goals['anon_bound_bytes'] / gib:.2f} GiB {goals['anon_ok']}; "
              f"added RSS {goals['added_peak_rss_bytes'] / gib:.2f} <= {goals['rss_bound_bytes'] / gib:.2f} GiB "
              f"{goals['rss_ok']}")


if __name__ == "__main__":
    raise SystemExit(main())
