"""QLoRA parity on CPU: peft LoRA on an NF4 + double-quant base, qcompile against bitsandbytes + peft.

    python -m benchmarks.qlora [--steps 50] [--rank 16] [--gc off,non_reentrant] [--out FILE]
    python -m benchmarks.qlora --smoke --out /tmp/qlora.json      # 2 steps of a tiny model

One small Llama (hidden 512, 4 layers, vocab 4096, intermediate 1536; random weights from a fixed
seed, float32 as QLoRA's ``prepare_model_for_kbit_training`` leaves the unquantized parts), its
q/k/v/o/gate/up/down projections quantized NF4 + double quant with bf16 compute (``lm_head`` float),
peft LoRA (rank ``--rank``, alpha = 2 * rank, no dropout) on the same seven projections, AdamW at a
fixed learning rate, on synthetic tokens (16 fixed random sequences, cycled, so the loss falls),
with gradient checkpointing off and on (transformers' ``gradient_checkpointing_enable``,
non-reentrant). Two sides, each run as bitsandbytes and qcompile users would:

* ``bnb``: every projection a ``bitsandbytes.nn.Linear4bit`` quantized from the same float weight (its
  packed bytes, absmax and nested state are checked equal to ``qcompile.pack``'s), the model marked
  ``is_loaded_in_4bit`` so that peft wraps them with its bitsandbytes LoRA layer; eager.
* ``qcompile``: the model quantized by ``qcompile.quantize`` (packed before peft is added, no float copy
  left, as bitsandbytes' layers hold none), peft LoRA, ``torch.compile(model, backend="qcompile")``
  (inductor behind it). Its plan is checked: every projection's base weight must be quantized, and the
  first step's logits must equal the eager quantized reference's (``qcompile.reference.dequantized_model``),
  not the float model's.

The LoRA weights start equal on both sides (a seeded init by parameter name, B = 0 as peft does).

Measured per configuration, each in a fresh subprocess (so that peak memory is that configuration's):

* the loss of every step; parity = the largest per-step relative difference |qcompile - bnb| / bnb;
* time: the first step (which holds qcompile's compile, forward and backward; inductor's caches are
  disabled, so that is a cold compile) separately; steps/s
  from one more process per checkpointing mode that holds both models and alternates their steps
  (after two warm-up steps each), so that load from other processes on a shared machine slows both
  sides alike (the per-configuration processes' own steps/s are kept too, as ``steps_per_s_alone``);
* peak memory as the process's peak resident set size (``VmHWM`` in ``/proc/self/status``): after
  the model is built ("ready"), during the first step, and during the remaining steps (the peak is
  reset after the first step by writing 5 to ``/proc/self/clear_refs``). RSS counts everything the
  process holds (torch's CPU allocator returns large blocks to the OS, so it follows tensors' lives);
  torch keeps no CPU allocator statistics to use instead.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.pack_throughput import machine_info
from benchmarks.tensor_memory import TensorMemoryTrace
from benchmarks.timing import environment, library_version

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "cpu" / "qlora.json"
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# intermediate 1536, not Llama's 8/3 * 512 = 1365: bitsandbytes' CPU dequantize_4bit (0.50.2) decodes
# a weight whose in_features is not a multiple of the blocksize wrongly (down_proj 512x1376: 0.23
# relative error), which would make it a wrong reference for that layer.
MODEL = {"vocab_size": 4096, "hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 4,
         "num_attention_heads": 8, "num_key_value_heads": 4, "max_position_embeddings": 256}
SMOKE_MODEL = {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}
GC_MODES = ("off", "non_reentrant", "reentrant")
PARITY_LIMIT = 0.01  # largest per-step relative loss difference accepted
SEQUENCES = 16  # distinct synthetic sequences, cycled


def _config():
    from qcompile import QuantConfig, Rule

    # QLoRA's default (NF4, double quant, bf16 compute) with the head kept float by a glob: under peft
    # the head is "base_model.model.lm_head", which the default exact-name rule "lm_head" does not match.
    return QuantConfig(rules=(Rule("*lm_head", None),))


def build_model(smoke: bool) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**(SMOKE_MODEL if smoke else MODEL), tie_word_embeddings=False, use_cache=False)
    return LlamaForCausalLM(config).float().train()


def to_bitsandbytes(model: torch.nn.Module) -> bool:
    """Replace every projection with a ``bnb.nn.Linear4bit`` quantized from its weight; True when every
    one holds exactly the bytes ``qcompile.pack`` makes (packed codes, absmax, nested absmax and offset)."""
    import bitsandbytes as bnb

    import qcompile

    scheme = _config().default
    identical = True
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not torch.nn.Linear or name not in TARGETS:
                continue
            layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4")
            layer.weight = bnb.nn.Params4bit(child.weight.data.clone(), requires_grad=False, blocksize=64,
                                             compress_statistics=True, quant_type="nf4")
            layer = layer.to("cpu")  # quantizes
            ours = qcompile.pack(child.weight.data, scheme)
            state = layer.weight.quant_state
            identical &= (torch.equal(layer.weight.data.view(-1).view(torch.uint8), ours.packed)
                          and torch.equal(state.absmax, ours.absmax)
                          and torch.equal(state.state2.absmax, ours.nested_absmax)
                          and float(state.offset) == ours.nested_offset)
            setattr(parent, name, layer)
    model.is_loaded_in_4bit = True  # what transformers sets on a 4-bit model; peft then uses its bnb LoRA layer
    return bool(identical)


def add_lora(model: torch.nn.Module, rank: int) -> torch.nn.Module:
    import peft

    model = peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                                       target_modules=list(TARGETS)))
    # The same start on both sides whatever each consumed from the global RNG: A seeded by name
    # (peft's kaiming-uniform bound), B zero as peft starts it.
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "lora_A" in name:
                g = torch.Generator().manual_seed(sum(map(ord, name)))
                bound = 1.0 / param.shape[1] ** 0.5
                param.copy_(torch.rand(param.shape, generator=g) * 2 * bound - bound)
            elif "lora_B" in name:
                param.zero_()
    return model


def batches(vocab: int, steps: int, batch: int, seq: int) -> list[torch.Tensor]:
    data = torch.randint(0, vocab, (SEQUENCES, seq), generator=torch.Generator().manual_seed(1))
    return [data[torch.arange(i * batch, (i + 1) * batch) % SEQUENCES] for i in range(steps)]


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _plan_summary(plans: list[Any], layers: int) -> dict[str, Any]:
    rows = [r for p in plans for r in p.rows]
    quantized = sorted({r.module for r in rows if r.quantized})
    base = [m for m in quantized if m.rsplit(".", 1)[-1] in TARGETS or m.endswith(".base_layer")]
    float_base = sorted({r.module for r in rows if not r.quantized and ".lora_" not in r.module
                         and not r.module.endswith("lm_head")})
    return {"graphs": len(plans), "rows": len(rows), "quantized_base_linears": len(base),
            "expected_base_linears": layers * len(TARGETS), "float_base_linears": float_base,
            "all_base_quantized": len(base) == layers * len(TARGETS) and not float_base}


def prepare(side: str, gc: str, rank: int, smoke: bool, quantize: bool = True) -> tuple[torch.nn.Module, bool | None]:
    """The peft model of one side, its base quantized as each library's users do it before adding LoRA
    (``bnb``: ``Linear4bit`` layers; ``qcompile``: ``qcompile.quantize``, which leaves no float copy), and for
    ``bnb`` whether its packed bytes equal qcompile's. ``quantize=False``: qcompile's side stays float."""
    model = build_model(smoke)
    identical = to_bitsandbytes(model) if side == "bnb" else None
    if side == "qcompile" and quantize:
        import qcompile

        qcompile.quantize(model, _config())
    model = add_lora(model, rank)
    if gc != "off":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": gc == "reentrant"})
    return model, identical


# The logits of the first step's first LOGIT_TOKENS positions are kept, to check them against references.
LOGIT_TOKENS = 8
# Steps after the first whose tensor memory is traced.
TRACED_STEPS = 3


def _trainer(model: torch.nn.Module, runner: Any, lr: float, logits: list[torch.Tensor] | None = None):
    """One training step as a function of the batch, returning the loss; appends the first
    LOGIT_TOKENS positions' logits to ``logits`` when given."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)

    def step(ids: torch.Tensor) -> float:
        out = runner(input_ids=ids, labels=ids)
        if logits is not None:
            logits.append(out.logits[:, :LOGIT_TOKENS].detach().clone())
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return out.loss.item()

    return step


def run_timing(gc: str, steps: int, rank: int, smoke: bool, batch: int, seq: int, lr: float,
               inner: str) -> dict[str, Any]:
    """Both sides in this process, their steps alternated: seconds per step of each, under the same load."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    steppers = {}
    for side in ("bnb", "qcompile"):
        model, _ = prepare(side, gc, rank, smoke)
        runner = model if side == "bnb" else torch.compile(
            model, backend="qcompile", options={"config": _config(), "inner": inner, "release_weights": True})
        steppers[side] = _trainer(model, runner, lr)
    data = batches(SMOKE_MODEL["vocab_size"] if smoke else MODEL["vocab_size"], steps + 2, batch, seq)
    times: dict[str, list[float]] = {side: [] for side in steppers}
    for i, ids in enumerate(data):
        for side, step in steppers.items():
            start = time.perf_counter()
            step(ids)
            if i >= 2:  # the first two steps compile / warm up
                times[side].append(time.perf_counter() - start)
    return {side: {"median_step_s": statistics.median(t), "steps_per_s": 1.0 / statistics.median(t),
                   "steps": len(t)} for side, t in times.items() if t}


def run_worker(side: str, gc: str, steps: int, rank: int, smoke: bool, batch: int, seq: int, lr: float,
               inner: str) -> dict[str, Any]:
    """One configuration, in this process: build, quantize, train ``steps`` steps, measure."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    rss_start = _rss_kib("VmRSS")
    out: dict[str, Any] = {"side": side, "gc": gc}
    model, identical = prepare(side, gc, rank, smoke)
    if identical is not None:
        out["packed_bytes_identical_to_qcompile"] = identical
    layers = model.config.num_hidden_layers
    data = batches(model.config.vocab_size, steps, batch, seq)
    plans: list[Any] = []
    # The adapters as they start, to check the first loss against references after the measurements
    # (building a reference copy first would count in this process's memory).
    initial = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    if side == "qcompile":
        runner = torch.compile(model, backend="qcompile",
                               options={"config": _config(), "on_plan": plans.append, "inner": inner,
                                        "release_weights": True})
    else:
        runner = model
    logits: list[torch.Tensor] = []
    step = _trainer(model, runner, lr, logits)
    out["rss_ready_mib"] = _rss_kib("VmRSS") / 1024
    start = time.perf_counter()
    losses = [step(data[0])]
    out["first_step_s"] = time.perf_counter() - start
    first_logits = logits.pop()
    out["peak_rss_first_step_mib"] = _rss_kib("VmHWM") / 1024
    out["peak_reset"] = _reset_peak_rss()
    times = []
    for ids in data[1:]:
        start = time.perf_counter()
        losses.append(step(ids))
        times.append(time.perf_counter() - start)
        logits.clear()
    out["peak_rss_train_mib"] = _rss_kib("VmHWM") / 1024
    out["rss_start_mib"] = rss_start / 1024
    out["losses"] = losses
    if times:
        out["median_step_s_alone"] = statistics.median(times)
        out["steps_per_s_alone"] = len(times) / sum(times)
        # The first step less an ordinary one: compilation (qcompile) or first-call warm-up (bnb).
        out["compile_or_warmup_s"] = out["first_step_s"] - out["median_step_s_alone"]
    if side == "qcompile":
        out["plan"] = _plan_summary(plans, layers)
        # A fresh copy of the model (same seed): the trained one's float base weights were released.
        fresh, _ = prepare(side, "off", rank, smoke, quantize=False)
        reference, float_model = _first_step_references(fresh, initial, data[0])
        out["step0_logits_max_abs_diff_vs_quantized_reference"] = (first_logits - reference).abs().max().item()
        out["step0_logits_max_abs_diff_vs_float_model"] = (first_logits - float_model).abs().max().item()
        out["quantized_reference_vs_float_model"] = (reference - float_model).abs().max().item()
    return out


def run_tensor_memory(side: str, gc: str, steps: int, rank: int, smoke: bool, batch: int, seq: int, lr: float,
                      inner: str) -> dict[str, Any]:
    """Peak bytes held by tensors (benchmarks/tensor_memory.py), traced from before the model is built: when
    ready, during the first step (qcompile's packing and compile) and over the next TRACED_STEPS steps (the
    steady state). A process of its own, since the trace slows every op (nothing here is timed)."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    with TensorMemoryTrace() as trace:
        model, _ = prepare(side, gc, rank, smoke)
        data = batches(model.config.vocab_size, 1 + TRACED_STEPS, batch, seq)
        runner = model if side == "bnb" else torch.compile(
            model, backend="qcompile", options={"config": _config(), "inner": inner, "release_weights": True})
        step = _trainer(model, runner, lr)
        trace.mark("first step")
        step(data[0])
        trace.mark("train")
        for ids in data[1:]:
            step(ids)
    peaks = trace.peaks()
    return {"side": side, "gc": gc, "peak_tensor_ready_mib": peaks["start"] / 2**20,
            "peak_tensor_first_step_mib": peaks["first step"] / 2**20,
            "peak_tensor_train_mib": peaks["train"] / 2**20}


def _first_step_references(model: torch.nn.Module, initial: dict[str, torch.Tensor],
                           ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The first step's logits (first LOGIT_TOKENS positions) as the eager quantized reference computes them
    (what they should be) and as the float model does (what a run that missed the quantization would give),
    from the initial adapters. Logits, not the loss: the loss averages the quantization error away (the
    float and NF4 losses of this model differ by about 2e-4 relative)."""
    from qcompile import QuantConfig, Rule
    from qcompile.reference import dequantized_model

    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, value in initial.items():
            params[name].copy_(value)
        reference_config = QuantConfig(rules=(Rule("*lm_head", None), Rule("*lora_*", None)))
        reference = dequantized_model(model, reference_config)
        return (reference(input_ids=ids).logits[:, :LOGIT_TOKENS], model(input_ids=ids).logits[:, :LOGIT_TOKENS])


def _spawn(side: str, gc: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run ``--worker side`` (``bnb``, ``qcompile`` or ``timing``) in a fresh process; its JSON, or the error."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "worker.json"
        cmd = [sys.executable, "-m", "benchmarks.qlora", "--worker", side, "--gc", gc, "--worker-out", str(path),
               "--steps", str(args.steps), "--rank", str(args.rank), "--batch", str(args.batch),
               "--seq", str(args.seq), "--lr", str(args.lr), "--inner", args.inner]
        if args.smoke:
            cmd.append("--smoke")
        root = Path(__file__).resolve().parents[1]
        # Inductor's caches off: the first step then shows a cold compile, as a user's first run has it.
        env = {**os.environ, "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1"}
        done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            return {"side": side, "gc": gc, "error": done.stderr[-4000:]}
        return json.loads(path.read_text())


def compare(bnb: dict[str, Any], ours: dict[str, Any], timing: dict[str, Any]) -> dict[str, Any]:
    """Per-step relative loss differences, and whether this configuration passes."""
    if "error" in bnb or "error" in ours:
        return {"ok": False, "why": ["a worker failed"]}
    rel = [abs(q - b) / abs(b) for q, b in zip(ours["losses"], bnb["losses"], strict=True)]
    quantized = ours["plan"]["all_base_quantized"]
    # The first logits must be the quantized model's, far closer to them than the float model's are.
    matches_reference = (ours["step0_logits_max_abs_diff_vs_quantized_reference"]
                         < 0.1 * ours["quantized_reference_vs_float_model"])
    ok = max(rel) <= PARITY_LIMIT and quantized and matches_reference and bnb["packed_bytes_identical_to_qcompile"]
    why = [] if ok else [w for w, bad in (
        (f"loss differs by {max(rel):.3%} > {PARITY_LIMIT:.0%}", max(rel) > PARITY_LIMIT),
        (f"qcompile quantized {ours['plan']['quantized_base_linears']} of {ours['plan']['expected_base_linears']} "
         "base linears: the others ran in float", not quantized),
        ("qcompile's first logits are not the quantized reference's", not matches_reference),
        ("bitsandbytes packed other bytes", not bnb["packed_bytes_identical_to_qcompile"])) if bad]
    speed = None
    if "error" not in timing and "bnb" in timing and "qcompile" in timing:
        speed = timing["qcompile"]["steps_per_s"] / timing["bnb"]["steps_per_s"]
    return {"loss_max_rel_diff": max(rel), "loss_rel_diff_per_step": rel, "ok": ok, "why": why,
            "steps_per_s_interleaved": timing, "steps_per_s_ratio_qcompile_over_bnb": speed,
            "peak_rss_train_ratio_qcompile_over_bnb": ours["peak_rss_train_mib"] / bnb["peak_rss_train_mib"],
            "peak_tensor_train_ratio_qcompile_over_bnb": ours["peak_tensor_train_mib"] / bnb["peak_tensor_train_mib"],
            "peak_tensor_first_step_ratio_qcompile_over_bnb": (ours["peak_tensor_first_step_mib"]
                                                               / bnb["peak_tensor_first_step_mib"])}


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 50; 2 with --smoke)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank")
    parser.add_argument("--batch", type=int, default=None, help="sequences per step (default 4; 2 with --smoke)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 128; 16 with --smoke)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--gc", default="off,non_reentrant",
                        help=f"gradient checkpointing modes, comma separated: {', '.join(GC_MODES)}")
    parser.add_argument("--inner", default="inductor", choices=("inductor", "eager"),
                        help="qcompile's inner compiler (eager: no inductor, for quick checks)")
    parser.add_argument("--smoke", action="store_true", help="a tiny model for 2 steps (for the tests)")
    parser.add_argument("--out", type=Path, default=None, help=f"results JSON (default {DEFAULT_OUT})")
    parser.add_argument("--worker", choices=("bnb", "qcompile", "timing", "bnb-memory", "qcompile-memory"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.steps = args.steps or (2 if args.smoke else 50)
    args.batch = args.batch or (2 if args.smoke else 4)
    args.seq = args.seq or (16 if args.smoke else 128)
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    if args.worker:
        if args.worker == "timing":
            run = run_timing
        elif args.worker.endswith("-memory"):
            run = functools.partial(run_tensor_memory, args.worker.removesuffix("-memory"))
        else:
            run = functools.partial(run_worker, args.worker)
        result = run(args.gc, args.steps, args.rank, args.smoke, args.batch, args.seq, args.lr, args.inner)
        args.worker_out.write_text(json.dumps(result))
        return 0
    modes = [m for m in args.gc.split(",") if m]
    bad = [m for m in modes if m not in GC_MODES]
    if bad:
        raise SystemExit(f"--gc: unknown mode(s) {bad}; allowed: {', '.join(GC_MODES)}")
    if args.smoke and args.out is None:
        raise SystemExit("--smoke needs --out FILE (smoke results are not kept in benchmarks/results)")
    out_path = args.out or DEFAULT_OUT
    load_start = os.getloadavg()
    runs, comparisons = [], {}
    for gc in modes:
        pair = {side: _spawn(side, gc, args) for side in ("bnb", "qcompile")}
        for side, run in pair.items():
            traced = _spawn(f"{side}-memory", gc, args)
            run.update({k: v for k, v in traced.items() if k.startswith("peak_tensor")})
            if "error" in traced:
                run["error"] = traced["error"]
        runs += list(pair.values())
        timing = _spawn("timing", gc, args)
        comparisons[gc] = compare(pair["bnb"], pair["qcompile"], timing)
        _print(gc, pair, comparisons[gc])
    env = environment(torch.device("cpu"))
    env["peft"] = library_version("peft")
    doc = {
        "environment": env, "machine": machine_info(),
        "load_average_1_5_15min": {"start": load_start, "end": os.getloadavg()},
        "model": {**(SMOKE_MODEL if args.smoke else MODEL), "dtype": "float32 (quantized projections: nf4)"},
        "settings": {"steps": args.steps, "rank": args.rank, "lora_alpha": 2 * args.rank, "batch": args.batch,
                     "seq": args.seq, "lr": args.lr, "optimizer": "AdamW (weight_decay 0)", "targets": list(TARGETS),
                     "quantization": "nf4, double quant, blocksize 64, compute bfloat16; lm_head float",
                     "qcompile_inner": args.inner, "qcompile_release_weights": True,
                     "smoke": args.smoke, "parity_limit": PARITY_LIMIT},
        "method": {"memory": "peak RSS (VmHWM) of a fresh process per configuration; reset after the first step",
                   "tensor_memory": "peak bytes held by tensors (profiler allocation events, summed in time order), "
                                    "traced in a process of its own from before the model is built: ready, first "
                                    f"step, next {TRACED_STEPS} steps (train)",
                   "time": "first step alone (compile / warm-up); steps/s = 1 / median step time in a process "
                           "alternating the two sides' steps (2 warm-up steps each)",
                   "parity": "max over steps of |loss_qcompile - loss_bnb| / loss_bnb"},
        "comparisons": comparisons, "runs": runs,
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {out_path}")
    return 0 if all("error" not in r for r in runs) else 1


def _print(gc: str, pair: dict[str, dict[str, Any]], cmp: dict[str, Any]) -> None:
    timing = cmp.get("steps_per_s_interleaved") or {}
    for side, r in pair.items():
        if "error" in r:
            print(f"gc={gc:14s} {side:9s} ERROR {r['error'][-300:]}")
            continue
        speed = timing.get(side, {}).get("steps_per_s", float("nan"))
        print(f"gc={gc:14s} {side:9s} steps/s {speed:6.3f}  first step {r['first_step_s']:6.1f} s  "
              f"peak RSS train {r['peak_rss_train_mib']:7.1f} MiB (first step {r['peak_rss_first_step_mib']:7.1f})  "
              f"peak tensors train {r.get('peak_tensor_train_mib', float('nan')):6.1f} MiB "
              f"(first step {r.get('peak_tensor_first_step_mib', float('nan')):6.1f}, "
              f"ready {r.get('peak_tensor_ready_mib', float('nan')):6.1f})")
    if "loss_max_rel_diff" in cmp:
        print(f"gc={gc:14s} loss max rel diff {cmp['loss_max_rel_diff']:.2e}  ok={cmp['ok']} {'; '.join(cmp['why'])}")


if __name__ == "__main__":
    raise SystemExit(main())
