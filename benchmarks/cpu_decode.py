"""End-to-end CPU decode speed: qcompile NF4 against bitsandbytes NF4 and inductor bf16, with ``generate()``.

    python -m benchmarks.cpu_decode [--models demo,llama_1b] [--tokens 32]

Each model is built locally with random bf16 weights (nothing is downloaded), batch 1, a 32-token prompt,
greedy decoding with transformers' default (dynamic) cache. Variants, one model in memory at a time:

* ``inductor_bf16``: ``model.forward = torch.compile(model.forward, dynamic=True)``, the float model.
* ``qcompile_nf4``: the same with ``backend="qcompile"``: NF4 + double quant, blocksize 64, bf16 compute,
  ``lm_head`` float (as bitsandbytes through transformers keeps it).
* ``bnb_nf4``: every linear but ``lm_head`` replaced by ``bnb.nn.Linear4bit`` (same settings, eval mode,
  eager), as transformers' ``load_in_4bit`` builds it.
* ``eager_bf16``: the float model as is, for scale.

Decode tokens/s = tokens / (time of generate(tokens + 1) - time of generate(1)), median of ``--repeats``,
so the prompt's prefill and the compile are left out.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from typing import Any

import torch

MODELS = {
    # The demo's model (qcompile.demo.tiny_llama), in bf16.
    "demo": {"vocab_size": 1024, "hidden_size": 256, "intermediate_size": 640, "num_hidden_layers": 4,
             "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": False},
    # Llama 3.2 1B's shapes.
    "llama_1b": {"vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                 "num_attention_heads": 32, "num_key_value_heads": 8, "tie_word_embeddings": True},
}
VARIANTS = ("inductor_bf16", "qcompile_nf4", "bnb_nf4", "eager_bf16")


def build(name: str) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(max_position_embeddings=512, **MODELS[name])
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    return model.eval().requires_grad_(False)


def _to_bnb(model: torch.nn.Module) -> int:
    import bitsandbytes as bnb

    swapped = 0
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Linear) and child is not model.lm_head:
                layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                          compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4")
                layer.load_state_dict(child.state_dict())
                setattr(parent, child_name, layer.to("cpu").eval())
                swapped += 1
    return swapped


def prepare(model: torch.nn.Module, variant: str) -> dict[str, Any]:
    import qcompile

    info: dict[str, Any] = {}
    if variant == "inductor_bf16":
        model.forward = torch.compile(model.forward, dynamic=True)
    elif variant == "qcompile_nf4":
        config = qcompile.QuantConfig(default=qcompile.NF4(blocksize=64, double_quant=True,
                                                           compute_dtype=torch.bfloat16),
                                      rules=(qcompile.Rule("lm_head", None),))
        plans: list = []
        model.forward = torch.compile(model.forward, backend="qcompile", dynamic=True,
                                      options={"config": config, "on_plan": plans.append})
        info["plans"] = plans
    elif variant == "bnb_nf4":
        info["bnb_layers"] = _to_bnb(model)
    elif variant != "eager_bf16":
        raise ValueError(f"variant: {variant!r}; allowed: {', '.join(VARIANTS)}")
    return info


def _seconds(model: torch.nn.Module, ids: torch.Tensor, new: int) -> float:
    start = time.perf_counter()
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                   do_sample=False, pad_token_id=0)
    return time.perf_counter() - start


def decode_case(name: str, variant: str, tokens: int, repeats: int) -> dict[str, Any]:
    torch._dynamo.reset()
    model = build(name)
    info = prepare(model, variant)
    ids = torch.randint(1, MODELS[name]["vocab_size"], (1, 32), generator=torch.Generator().manual_seed(1))
    warm = _seconds(model, ids, tokens + 1)  # compiles prefill and decode
    decode = statistics.median(_seconds(model, ids, tokens + 1) - _seconds(model, ids, 1) for _ in range(repeats))
    row: dict[str, Any] = {"model": name, "variant": variant, "tokens": tokens,
                           "decode_tokens_per_s": tokens / decode, "first_generate_s": warm}
    if "plans" in info:
        row["quantized_linears"] = len({r.module for plan in info["plans"] for r in plan.quantized})
    if "bnb_layers" in info:
        row["bnb_layers"] = info["bnb_layers"]
    del model
    gc.collect()
    torch._dynamo.reset()
    return row


def run(models: list[str], variants: list[str], tokens: int, repeats: int) -> list[dict[str, Any]]:
    rows = []
    for name in models:
        for variant in variants:
            row = decode_case(name, variant, tokens, repeats)
            print(f"decode {name:9s} {variant:14s} {row['decode_tokens_per_s']:8.1f} tokens/s "
                  f"(first generate {row['first_generate_s']:.1f} s)", flush=True)
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="demo,llama_1b")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    run(args.models.split(","), args.variants.split(","), args.tokens, args.repeats)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
