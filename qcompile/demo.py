"""The demo: compile a small Llama-style model with the bitsandbytes NF4 config.

    python -m qcompile.demo [--config examples/bnb_nf4.json] [--layers 4] [--tokens 8]

The model is built from a local transformers config with random weights (nothing is
downloaded). It prints the plan, the weight memory before and after, the error of the
compiled model against an eager model with the same quantize/dequantize applied to its
weights and against the original one, compile times, and a few greedily generated tokens.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

import qcompile
from qcompile.config import load
from qcompile.pack_cache import cached_packed_weights
from qcompile.reference import dequantized_model

SEED_CONFIG = Path(__file__).resolve().parent.parent / "examples" / "bnb_nf4.json"


def tiny_llama(layers: int = 4, hidden: int = 256, seed: int = 0) -> Any:
    """A Llama-style causal LM with random weights, built locally."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=1024, hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 64 * 64,
        num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 128),
        max_position_embeddings=256, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(SEED_CONFIG))
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--inner", default="inductor", choices=("inductor", "eager"))
    args = parser.parse_args(argv)

    config = load(args.config)
    print(f"config {args.config}:\n  default: {config.default}\n  rules: {[r.to_dict() for r in config.rules]}\n")
    model = tiny_llama(args.layers)
    ids = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1))

    with torch.no_grad():
        plan = qcompile.explain(model, ids, config=config)
        print(plan, "\n")

        eager_logits = model(ids).logits
        plans: list[qcompile.Plan] = []
        compiled = torch.compile(model, backend="qcompile",
                                 options={"config": config, "inner": args.inner, "on_plan": plans.append})
        t0 = time.perf_counter()
        logits = compiled(ids).logits
        qcompile_s = time.perf_counter() - t0

        reference_logits = dequantized_model(model, config)(ids).logits

    packed = {id(p): p for m in model.modules() if isinstance(m, torch.nn.Linear)
              for p in cached_packed_weights(m.weight)}
    quantized_modules = {row.module for row in plan.quantized}
    float_bytes = sum(m.weight.numel() * m.weight.element_size() for name, m in model.named_modules()
                      if name in quantized_modules)
    packed_bytes = sum(p.nbytes for p in packed.values())
    print(f"quantized linear weights: {float_bytes / 2**20:.2f} MiB -> {packed_bytes / 2**20:.2f} MiB "
          f"({8 * packed_bytes / (float_bytes / model.dtype.itemsize):.3f} bits per weight, "
          f"{float_bytes / packed_bytes:.2f}x smaller)")
    print(f"compiled vs eager with the same quantize/dequantize and compute dtype: max abs diff "
          f"{(logits - reference_logits).abs().max().item():.3g}, rel {_rel_err(logits, reference_logits):.2e} "
          f"(float rounding; a bf16 compute dtype rounds at 2^-8 = 3.9e-3)")
    print(f"compiled vs original float model (quantization error): rel {_rel_err(logits, eager_logits):.3f}")
    print(f"first call (capture + compile + run): {qcompile_s:.1f}s, of which qcompile's passes "
          f"{sum(p.pass_seconds for p in plans):.2f}s; python -m benchmarks.compile_time compares with plain inductor")

    model.forward = torch.compile(model.forward, backend="qcompile", options={"config": config, "inner": args.inner})
    with torch.no_grad():
        t0 = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.tokens,
                             do_sample=False, pad_token_id=0)
        gen_s = time.perf_counter() - t0
    print(f"generate(): {args.tokens} new tokens in {gen_s:.1f}s (includes compiles): {out[0, ids.shape[1]:].tolist()}")


if __name__ == "__main__":
    main()
