"""generate() under compile on CPU: graphs compiled for a varied workload, and decode tokens/s, per recipe.

    python -m benchmarks.generate [--calls 20] [--tokens 32] [--out benchmarks/results/cpu]
    python -m benchmarks.generate --smoke --out /tmp/gen      # 3 calls, 2 tokens, eager inner only

Recipes (both with ``model.forward = torch.compile(model.forward, ..., dynamic=True)``):

* ``dynamic_cache``: transformers' default cache;
* ``static_cache``:  ``generate(..., cache_implementation="static")``.

Part 1, graphs: ``--calls`` generate() calls with batch 1 to 8, prompts of 3 to 200 tokens and random left
padding, 4 new tokens each, on the demo model (``qcompile.demo.tiny_llama``, fp32, NF4 + double quant with
fp32 compute so that tokens can be compared exactly). Backends: a do-nothing backend (what dynamo itself
needs), plain inductor, and qcompile with the eager and the inductor inner compiler. For qcompile it also
counts the calls whose tokens equal the eager quantized reference (``qcompile.reference``).

Part 2, decode: batch 1, a 32-token prompt; decode tokens/s = ``--tokens`` / (time of generate() with
``--tokens`` + 1 new tokens - time with 1), the median of 3, after a warm-up call that compiles.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.timing import environment, progress, results_dir

RECIPES = {"dynamic_cache": {}, "static_cache": {"cache_implementation": "static"}}
VOCAB = 1024


class GraphCounter:
    """A backend (or qcompile's inner compiler) that counts graphs and runs each as it is."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: Any) -> Callable[..., Any]:
        self.graphs += 1
        return gm.forward


class CountingInductor(GraphCounter):
    def __call__(self, gm: torch.fx.GraphModule, example_inputs: Any) -> Callable[..., Any]:
        from torch._inductor.compile_fx import compile_fx

        self.graphs += 1
        return compile_fx(gm, example_inputs)


def workload(n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` (input_ids, attention_mask) pairs: batch 1..8, prompt 3..200, random left padding."""
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    calls = []
    for _ in range(n):
        batch, length = rng.randint(1, 8), rng.randint(3, 200)
        ids = torch.randint(1, VOCAB, (batch, length), generator=gen)
        mask = torch.ones(batch, length, dtype=torch.long)
        for row in range(batch):
            pad = rng.randint(0, length - 2)
            mask[row, :pad], ids[row, :pad] = 0, 0
        calls.append((ids, mask))
    return calls


def _model(layers: int) -> torch.nn.Module:
    from qcompile.demo import tiny_llama

    model = tiny_llama(layers)
    model.config.max_position_embeddings = 512
    return model


def _config() -> Any:
    from qcompile import NF4, QuantConfig, Rule

    return QuantConfig(default=NF4(double_quant=True, compute_dtype=torch.float32), rules=(Rule("lm_head", None),))


def _generate(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, new: int, **kwargs: Any) -> torch.Tensor:
    return model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0, **kwargs)


def _seconds(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, new: int, kwargs: dict) -> float:
    start = time.perf_counter()
    _generate(model, ids, mask, new, **kwargs)
    return time.perf_counter() - start


def _compile(model: torch.nn.Module, variant: str) -> GraphCounter:
    """Compile ``model.forward`` for ``variant``; returns the counter of the graphs it gets."""
    counter = CountingInductor() if variant in ("inductor", "qcompile_inductor") else GraphCounter()
    if variant.startswith("qcompile"):
        model.forward = torch.compile(model.forward, backend="qcompile", dynamic=True,
                                      options={"config": _config(), "inner": counter})
    elif variant in ("dynamo", "inductor"):
        model.forward = torch.compile(model.forward, backend=counter, dynamic=True)
    return counter


@torch.no_grad()
def count_graphs(recipe: str, variants: list[str], calls: list, layers: int) -> list[dict[str, Any]]:
    from qcompile.reference import dequantized_model

    kwargs = RECIPES[recipe]
    base = _model(layers)
    reference = dequantized_model(base, _config())
    expected = [_generate(reference, ids, mask, 4, **kwargs) for ids, mask in calls]
    rows = []
    for variant in progress(variants, desc=f"graphs {recipe}"):
        torch._dynamo.reset()
        model = _model(layers)
        counter = _compile(model, variant)
        start = time.perf_counter()
        out = [_generate(model, ids, mask, 4, **kwargs) for ids, mask in calls]
        row = {"recipe": recipe, "variant": variant, "graphs": counter.graphs, "calls": len(calls),
               "seconds": round(time.perf_counter() - start, 2)}
        if variant.startswith("qcompile"):
            row["equal_to_reference"] = sum(torch.equal(a, b) for a, b in zip(out, expected, strict=True))
        rows.append(row)
    torch._dynamo.reset()
    return rows


@torch.no_grad()
def decode_speed(recipe: str, variants: list[str], tokens: int, layers: int) -> list[dict[str, Any]]:
    kwargs = RECIPES[recipe]
    ids = torch.randint(1, VOCAB, (1, 32), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    rows = []
    for variant in progress(variants + ["eager"], desc=f"decode {recipe}"):
        torch._dynamo.reset()
        model = _model(layers)
        if variant != "eager":
            _compile(model, variant)
        _generate(model, ids, mask, tokens + 1, **kwargs)  # compiles prefill and decode

        decode = statistics.median(
            _seconds(model, ids, mask, tokens + 1, kwargs) - _seconds(model, ids, mask, 1, kwargs) for _ in range(3)
        )
        rows.append({"recipe": recipe, "variant": variant, "decode_tokens_per_s": round(tokens / decode, 1)})
    torch._dynamo.reset()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--variants", default="dynamo,inductor,qcompile_eager,qcompile_inductor")
    parser.add_argument("--parts", default="graphs,decode", help="graphs, decode, or both")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--smoke", action="store_true", help="3 calls, 2 tokens, 1 layer, no inductor")
    args = parser.parse_args(argv)
    if args.smoke:
        args.calls, args.tokens, args.layers, args.variants = min(args.calls, 3), 2, 1, "dynamo,qcompile_eager"
    variants = args.variants.split(",")
    calls = workload(args.calls)
    graphs, decode = [], []
    parts = args.parts.split(",")
    for recipe in RECIPES:
        if "graphs" in parts:
            graphs += count_graphs(recipe, variants, calls, args.layers)
        if "decode" in parts:
            decode += decode_speed(recipe, [v for v in variants if v != "dynamo"], args.tokens, args.layers)
    doc = {"environment": environment(torch.device("cpu")), "calls": args.calls, "tokens": args.tokens,
           "layers": args.layers, "graphs": graphs, "decode": decode}
    for row in graphs:
        print(json.dumps(row))
    for row in decode:
        print(json.dumps(row))
    out = results_dir(args.out, args.smoke, cuda=False)
    if out is not None:
        path = out / "generate.json"
        if path.exists():  # a run of one part keeps the other part's rows
            old = json.loads(path.read_text())
            doc["graphs"] = doc["graphs"] or old.get("graphs", [])
            doc["decode"] = doc["decode"] or old.get("decode", [])
        path.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {out / 'generate.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
