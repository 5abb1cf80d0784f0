"""End-to-end benchmark: decode and prefill of a Llama-style model, bf16 against qcompile and bitsandbytes.

    python -m benchmarks.e2e [--model 8b] [--layers 32] [--out benchmarks/results/gpu]
    python -m benchmarks.e2e --smoke --out /tmp/e2e      # a tiny model on CPU

The model is a transformers ``LlamaForCausalLM`` with random weights at Llama-3.2-1B or Llama-3-8B
layer shapes (nothing is downloaded; ``--layers`` changes the depth). For each variant

* ``eager_bf16``       the model as is;
* ``inductor_bf16``    ``torch.compile(model.forward)``, inductor;
* ``qcompile_nf4_dq``  ``torch.compile(model.forward, backend="qcompile")``, NF4 + double quant, bf16 compute;
* ``qcompile_llm_int8`` the same with LLM.int8() (threshold 6.0);
* ``bnb_nf4``          every ``nn.Linear`` but ``lm_head`` swapped for ``bnb.nn.Linear4bit`` (NF4 + double
  quant), run eagerly as users run it (when bitsandbytes imports);

it measures, with a transformers ``StaticCache`` and a manual decode loop (greedy, one token per
step, ``logits_to_keep=1``): decode tokens/s at batch 1 and 16 (each row of the batch is a token),
prefill tokens/s of one 2048-token prompt, and peak GPU memory. ``lm_head`` stays bf16 in every
variant. qcompile runs with ``release_weights=True`` so its memory is that of the packed model.

``--mode reduce-overhead`` (CUDA graphs) applies to inductor and qcompile alike; it is the default
on CUDA because decode at batch 1 is otherwise bound by kernel launch overhead for every variant.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from benchmarks.timing import environment, progress, results_dir, sync

MODELS: dict[str, dict[str, Any]] = {
    # Llama-3.2-1B and Llama-3-8B layer shapes.
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, head_dim=64, vocab_size=128256),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, head_dim=128, vocab_size=128256),
    "smoke": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32, vocab_size=256),
}
VARIANTS = ("eager_bf16", "inductor_bf16", "qcompile_nf4_dq", "qcompile_llm_int8", "bnb_nf4")


# ---- model -------------------------------------------------------------------------------------

@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_model(size: str, layers: int | None, device: torch.device, seed: int = 0) -> Any:
    """A Llama-style causal LM with random weights, built directly on ``device`` in bf16."""
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = dict(MODELS[size])
    if layers is not None:
        shape["num_hidden_layers"] = layers
    config = LlamaConfig(**shape, max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False)
    torch.manual_seed(seed)
    with _default_dtype(torch.bfloat16), torch.device(device):
        model = LlamaForCausalLM(config)
    return model.eval().requires_grad_(False)


def _swap_bnb_nf4(model: torch.nn.Module, device: torch.device) -> None:
    """Replace every nn.Linear except lm_head with bnb.nn.Linear4bit (NF4 + double quant, bf16 compute)."""
    import bitsandbytes as bnb

    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if not isinstance(child, torch.nn.Linear) or full == "lm_head":
                continue
            layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4",
                                      device="cpu" if device.type == "cuda" else device)
            state = {"weight": child.weight.detach().cpu()}
            if child.bias is not None:
                state["bias"] = child.bias.detach().cpu()
            layer.load_state_dict(state)
            setattr(module, child_name, layer.to(device))  # .to quantizes, as for users
            del child


def prepare(variant: str, model: Any, device: torch.device, mode: str, inner: str) -> Callable[..., Any]:
    """The forward function a variant runs (compiling or module-swapping ``model`` as needed)."""
    import qcompile

    compile_kwargs: dict[str, Any] = {"dynamic": False}
    if variant == "eager_bf16":
        return model.forward
    if variant == "inductor_bf16":
        if inner == "eager":  # --inner eager: plumbing checks without inductor's compile time
            return torch.compile(model.forward, backend="aot_eager", **compile_kwargs)
        return torch.compile(model.forward, backend="inductor", mode=None if mode == "default" else mode,
                             **compile_kwargs)
    if variant.startswith("qcompile_"):
        scheme = (qcompile.NF4(blocksize=64, double_quant=True, compute_dtype=torch.bfloat16)
                  if variant == "qcompile_nf4_dq" else qcompile.Int8(threshold=6.0))
        config = qcompile.QuantConfig(default=scheme, rules=(qcompile.Rule("lm_head", None),))
        options = {"config": config, "inner": inner, "release_weights": True}
        if mode != "default" and inner == "inductor":
            options["mode"] = mode  # torch.compile takes mode or options, not both
        return torch.compile(model.forward, backend="qcompile", options=options, **compile_kwargs)
    if variant == "bnb_nf4":
        _swap_bnb_nf4(model, device)
        return model.forward
    raise ValueError(f"variant {variant!r} is unknown; allowed: {', '.join(VARIANTS)}")


# ---- measurements ------------------------------------------------------------------------------

def _new_cache(fwd: Callable[..., Any], model: Any, batch: int, max_len: int, device: torch.device) -> Any:
    """A StaticCache for ``batch`` rows, initialized by one 1-token call of ``fwd`` and then zeroed.

    The static layers allocate on their first update; doing that first means every timed call
    sees an initialized cache (one graph per input shape, no recompile on the second prefill).
    It goes through ``fwd``, not the eager model: qcompile's release_weights makes the eager model
    refuse to run.
    """
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=max_len)
    ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
    with torch.no_grad():
        fwd(input_ids=ids, past_key_values=cache, cache_position=torch.zeros(1, dtype=torch.long, device=device),
            use_cache=True, logits_to_keep=1)
    cache.reset()
    return cache


def _step(fwd: Callable[..., Any], ids: torch.Tensor, cache: Any, start: int) -> torch.Tensor:
    """One forward of ``ids`` [B, T] at positions start..start+T-1; returns the next token [B, 1]."""
    positions = torch.arange(start, start + ids.shape[1], device=ids.device)
    out = fwd(input_ids=ids, past_key_values=cache, cache_position=positions,
              position_ids=positions.unsqueeze(0).expand(ids.shape[0], -1), use_cache=True, logits_to_keep=1)
    return out.logits[:, -1:].argmax(-1)


def measure_prefill(fwd: Callable[..., Any], model: Any, device: torch.device, tokens: int, reps: int,
                    warmup: int) -> dict[str, Any]:
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), device=device,
                        generator=torch.Generator(device=device).manual_seed(1))
    cache = _new_cache(fwd, model, 1, tokens, device)
    times = []
    setup_peak = None
    with torch.no_grad():
        for i in range(warmup + reps):
            if i == warmup and device.type == "cuda":
                # Building, packing and compiling are behind us: from here on the peak is inference's.
                setup_peak = torch.cuda.max_memory_allocated(device) / 2**30
                torch.cuda.reset_peak_memory_stats(device)
            cache.reset()
            sync(device)
            start = time.perf_counter()
            tok = _step(fwd, ids, cache, 0)
            sync(device)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    return {"tokens": tokens, "median_s": seconds, "tokens_per_s": tokens / seconds, "setup_peak_gib": setup_peak,
            "next_token_valid": bool(0 <= int(tok.min()) and int(tok.max()) < model.config.vocab_size)}


def measure_decode(fwd: Callable[..., Any], model: Any, device: torch.device, batch: int, prompt: int, steps: int,
                   warmup: int) -> dict[str, Any]:
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt), device=device,
                        generator=torch.Generator(device=device).manual_seed(2))
    cache = _new_cache(fwd, model, batch, prompt + warmup + steps, device)
    with torch.no_grad():
        tok = _step(fwd, ids, cache, 0)
        pos = prompt
        for _ in range(warmup):  # compiles the decode graph (and records CUDA graphs)
            tok = _step(fwd, tok, cache, pos)
            pos += 1
        sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            tok = _step(fwd, tok, cache, pos)
            pos += 1
        sync(device)
        seconds = time.perf_counter() - start
    return {"batch": batch, "prompt": prompt, "steps": steps, "seconds": seconds,
            "ms_per_step": 1e3 * seconds / steps, "tokens_per_s": batch * steps / seconds}


def _memory(device: torch.device) -> dict[str, float | None]:
    if device.type != "cuda":
        return {"allocated_gib": None, "peak_gib": None}
    return {"allocated_gib": torch.cuda.memory_allocated(device) / 2**30,
            "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30}


def run_variant(variant: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    torch._dynamo.reset()  # every variant compiles the same forward code object afresh
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    row: dict[str, Any] = {"variant": variant}
    setup_start = time.perf_counter()
    model = build_model(args.model, args.layers, device)
    fwd = prepare(variant, model, device, args.mode, args.inner)
    row["setup_s"] = time.perf_counter() - setup_start
    row["linear_weight_bytes"] = _linear_bytes(model)
    start = time.perf_counter()
    row["prefill"] = measure_prefill(fwd, model, device, args.prefill, args.reps, args.warmup)
    row["prefill"]["first_calls_s"] = time.perf_counter() - start  # includes compile
    row["memory_after_prefill"] = _memory(device)  # peak_gib: the timed prefill calls only
    row["decode"] = []
    for batch in args.batches:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        result = measure_decode(fwd, model, device, batch, args.prompt, args.steps, args.warmup)
        result["memory"] = _memory(device)
        row["decode"].append(result)
    peaks = [d["memory"]["peak_gib"] for d in row["decode"]] + [row["memory_after_prefill"]["peak_gib"]]
    row["peak_gib"] = max(peaks) if all(p is not None for p in peaks) else None
    del fwd, model
    return row


def _linear_bytes(model: Any) -> int:
    """Bytes of the linear layers' weights as held after setup (bnb: packed; qcompile: before release)."""
    total = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, torch.nn.Linear) and isinstance(weight, torch.Tensor):
            total += weight.numel() * weight.element_size()
    return total


def run(args: argparse.Namespace, device: torch.device, log: Callable[[str], None] = print) -> dict[str, Any]:
    variants = list(args.variants)
    rows = []
    try:
        import bitsandbytes  # noqa: F401
        bnb_error = None
    except Exception as exc:  # noqa: BLE001 - any import failure means "no bitsandbytes variant"
        bnb_error = f"{type(exc).__name__}: {exc}"
    for variant in progress(variants, total=len(variants), desc="e2e"):
        if variant == "bnb_nf4" and bnb_error:
            rows.append({"variant": variant, "skipped": f"bitsandbytes not importable ({bnb_error})"})
            continue
        try:
            rows.append(run_variant(variant, args, device))
        except Exception as exc:  # noqa: BLE001 - keep the other variants' results
            if args.strict:
                raise
            rows.append({"variant": variant, "error": f"{type(exc).__name__}: {exc}"})
            log(f"{variant}: error {exc}")
        gc.collect()
    _relative(rows)
    shape = dict(MODELS[args.model])
    if args.layers is not None:
        shape["num_hidden_layers"] = args.layers
    return {
        "benchmark": "e2e",
        "smoke": args.smoke,
        "environment": environment(device),
        "model": {"size": args.model, **shape},
        "settings": {"prefill_tokens": args.prefill, "decode_batches": list(args.batches), "prompt": args.prompt,
                     "decode_steps": args.steps, "warmup": args.warmup, "reps": args.reps, "mode": args.mode,
                     "inner": args.inner, "cache": "transformers StaticCache, manual greedy decode loop"},
        "results": rows,
        "goals": _goals(rows, judged=not args.smoke),
    }


def _relative(rows: list[dict[str, Any]]) -> None:
    """Decode/prefill speedup of every variant over inductor_bf16 (the goal's baseline)."""
    base = next((r for r in rows if r["variant"] == "inductor_bf16" and "decode" in r), None)
    if base is None:
        return
    for r in rows:
        if "decode" not in r:
            continue
        r["prefill"]["speedup_vs_inductor_bf16"] = r["prefill"]["tokens_per_s"] / base["prefill"]["tokens_per_s"]
        for d, b in zip(r["decode"], base["decode"], strict=True):
            d["speedup_vs_inductor_bf16"] = d["tokens_per_s"] / b["tokens_per_s"]


def _goals(rows: list[dict[str, Any]], judged: bool) -> list[dict[str, Any]]:
    row = next((r for r in rows if r["variant"] == "qcompile_nf4_dq" and "decode" in r), None)
    out = []
    for d in (row or {}).get("decode", []):
        value = d.get("speedup_vs_inductor_bf16")
        out.append({"goal": f"NF4+DQ decode tokens/s >= 2.5x inductor bf16 (batch {d['batch']})",
                    "value": value, "threshold": 2.5,
                    "met": (value >= 2.5) if (judged and value is not None) else None})
    return out


# ---- plots / command line ----------------------------------------------------------------------

def plot(doc: dict[str, Any], out_dir: Path, model: str) -> Path:
    """e2e.png: decode tokens/s per batch and prefill tokens/s, one bar per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in doc["results"] if "decode" in r]
    panels = [(f"decode tokens/s, batch {b}", [next(d["tokens_per_s"] for d in r["decode"] if d["batch"] == b)
                                               for r in rows]) for b in doc["settings"]["decode_batches"]]
    panels.append((f"prefill tokens/s ({doc['settings']['prefill_tokens']} tokens)",
                   [r["prefill"]["tokens_per_s"] for r in rows]))
    if rows and all(r.get("peak_gib") is not None for r in rows):
        panels.append(("peak GPU memory (GiB)", [r["peak_gib"] for r in rows]))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4), squeeze=False)
    names = [r["variant"] for r in rows]
    for ax, (title, values) in zip(axes.flat, panels, strict=True):
        bars = ax.bar(range(len(values)), values, color=[plt.get_cmap("tab10")(i) for i in range(len(values))])
        ax.bar_label(bars, fmt="%.3g", fontsize=7)
        ax.set_xticks(range(len(values)), names, rotation=35, ha="right", fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.grid(True, axis="y", alpha=0.3)
    m = doc["model"]
    fig.suptitle(f"{m['size']} shapes, {m['num_hidden_layers']} layers on {doc['environment']['device']} "
                 f"(mode {doc['settings']['mode']})", fontsize=10)
    fig.tight_layout()
    path = out_dir / ("e2e.png" if doc["smoke"] else f"e2e_{model}.png")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=tuple(MODELS), default=None, help="layer shapes (default 8b; smoke: smoke)")
    p.add_argument("--layers", type=int, default=None, help="number of decoder layers (default: the model's)")
    p.add_argument("--variants", type=lambda s: tuple(v.strip() for v in s.split(",") if v.strip()),
                   default=VARIANTS, help=",".join(VARIANTS))
    p.add_argument("--batches", type=_ints, default=None, help="decode batch sizes (default 1,16)")
    p.add_argument("--prefill", type=int, default=None, help="prefill tokens (default 2048)")
    p.add_argument("--prompt", type=int, default=None, help="prompt length before decoding (default 128)")
    p.add_argument("--steps", type=int, default=None, help="timed decode steps (default 128)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed calls per measurement (default 5: compile, recompile after release_weights, "
                   "CUDA graph warm-up and recording)")
    p.add_argument("--reps", type=int, default=None, help="timed prefill calls (default 5)")
    p.add_argument("--mode", choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
                   default=None, help="torch.compile mode for inductor and qcompile (default: reduce-overhead on "
                   "CUDA, default on CPU)")
    p.add_argument("--inner", choices=("inductor", "eager"), default="inductor",
                   help="compiler behind qcompile; 'eager' also makes inductor_bf16 use aot_eager (fast checks)")
    p.add_argument("--smoke", action="store_true", help="tiny model on CPU, few tokens")
    p.add_argument("--strict", action="store_true", help="stop at the first failing variant")
    p.add_argument("--fresh", action="store_true",
                   help="overwrite the JSON instead of merging this run's variants into it")
    p.add_argument("--out", type=Path, default=None, help="output folder (default benchmarks/results/<device>)")
    return p


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda" if cuda else "cpu")
    smoke_defaults = dict(model="smoke", batches=(1, 2), prefill=32, prompt=8, steps=4, warmup=2, reps=2)
    full_defaults = dict(model="8b", batches=(1, 16), prefill=2048, prompt=128, steps=128, warmup=5, reps=5)
    for key, value in (smoke_defaults if args.smoke else full_defaults).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.mode is None:
        args.mode = "reduce-overhead" if cuda else "default"
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        print(f"--variants: {unknown} unknown; allowed: {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    args.out = results_dir(args.out, args.smoke, cuda)
    if args.out is None:
        return 2
    # Prefill, decode at each batch size: a few static shapes per variant, beyond dynamo's default of 8
    # when a variant recompiles after releasing its weights.
    with torch._dynamo.config.patch(cache_size_limit=max(torch._dynamo.config.cache_size_limit, 32)):
        doc = run(args, device)
    name = "e2e.json" if args.smoke else f"e2e_{args.model}.json"
    path = args.out / name
    if not args.fresh:
        doc = merge(path, doc)
    doc["plots"] = [plot(doc, args.out, args.model).name]
    path.write_text(json.dumps(doc, indent=1) + "\n")
    _summary(doc)
    print(f"wrote {path} and {', '.join(doc['plots'])}")
    return 0


def merge(path: Path, doc: dict[str, Any]) -> dict[str, Any]:
    """``doc`` plus the variants of an earlier file at ``path`` that this run did not measure.

    Variants compile for minutes each at 8B shapes, so a session with a per-command time limit runs
    them one ``--variants`` at a time. Only a file with the same device, versions, model and settings
    is merged.
    """
    try:
        old = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return doc
    env_keys = ("device", "torch", "triton", "bitsandbytes", "transformers")
    if (not isinstance(old, dict) or old.get("benchmark") != "e2e" or old.get("model") != doc["model"]
            or old.get("settings") != doc["settings"]
            or any(old.get("environment", {}).get(k) != doc["environment"][k] for k in env_keys)):
        return doc
    done = {r["variant"] for r in doc["results"]}
    rows = [r for r in old.get("results", []) if r["variant"] not in done] + doc["results"]
    rows.sort(key=lambda r: VARIANTS.index(r["variant"]) if r["variant"] in VARIANTS else 99)
    _relative(rows)
    return {**doc, "results": rows, "goals": _goals(rows, judged=not doc["smoke"])}


def _summary(doc: dict[str, Any]) -> None:
    for r in doc["results"]:
        if "decode" not in r:
            print(f"{r['variant']:18s} {r.get('error') or r.get('skipped')}")
            continue
        dec = "  ".join(f"decode b{d['batch']} {d['tokens_per_s']:9.1f} tok/s" for d in r["decode"])
        mem = f"  peak {r['peak_gib']:.2f} GiB" if r.get("peak_gib") is not None else ""
        print(f"{r['variant']:18s} prefill {r['prefill']['tokens_per_s']:9.1f} tok/s  {dec}{mem}")
    for g in doc["goals"]:
        if g["value"] is not None:
            print(f"goal: {g['goal']}: {g['value']:.2f}x -> "
                  f"{'not judged (smoke)' if g['met'] is None else 'met' if g['met'] else 'NOT met'}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
