"""QLoRA under torch.compile: LoRA adapters trained on an NF4 + double-quant base, compiled with qcompile.

    python examples/qlora.py [--steps 8] [--no-gradient-checkpointing]

A small Llama with random weights (nothing is downloaded) stands in for a checkpoint. The recipe:

1. build (or load) the model; ``qcompile.quantize(model, config)`` packs the base projections NF4 + double
   quant with bf16 compute (QLoRA's settings, qcompile's default config) and frees their float data, as
   bitsandbytes' ``load_in_4bit`` does (``quantize(model, config, checkpoint=dir)`` does it while loading);
2. peft adds trainable LoRA adapters (which stay float); optionally enable gradient checkpointing
   (transformers' non-reentrant checkpoint);
3. ``torch.compile(model, backend="qcompile")`` with the same config runs the packed base weights;
4. train as usual; the backward reaches the adapters through the quantized base layers;
5. check the plan: every base projection must be quantized (a linear qcompile did not see runs in float).
"""

from __future__ import annotations

import argparse
import sys

import peft
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import qcompile

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--no-gradient-checkpointing", dest="gc", action="store_false")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, use_cache=False)
    model = LlamaForCausalLM(config)  # float32; a real run would load a checkpoint here
    # qcompile's default config is QLoRA's (NF4, double quant, bf16 compute) and keeps the head float; the
    # glob "*lm_head" also matches the head's name under peft ("base_model.model.lm_head").
    quant = qcompile.QuantConfig(rules=(qcompile.Rule("*lm_head", None),))
    packed = qcompile.quantize(model, quant)
    print(f"packed {len(packed.packed)} base weights; the model holds {qcompile.memory_footprint(model)}")
    model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS))
    if args.gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()

    plans: list[qcompile.Plan] = []
    compiled = torch.compile(model, backend="qcompile", options={"config": quant, "on_plan": plans.append})

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    data = torch.randint(0, config.vocab_size, (4, 2, 64), generator=torch.Generator().manual_seed(1))
    for step in range(args.steps):
        ids = data[step % len(data)]
        loss = compiled(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        print(f"step {step}: loss {loss.item():.4f}")

    rows = [row for plan in plans for row in plan.rows]
    quantized = [row for row in rows if row.quantized]
    base = sorted({row.module for row in quantized})
    expected = config.num_hidden_layers * len(TARGETS)
    print(f"{len(base)} of {expected} base projections quantized ({quantized[0].scheme if quantized else 'none'}); "
          f"{sum(1 for r in rows if '.lora_' in r.module and not r.quantized)} adapter linears float (trained)")
    if len(base) != expected:
        print(f"error: {expected - len(base)} base projections ran in float", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
