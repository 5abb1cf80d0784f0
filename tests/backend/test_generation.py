"""generate() under a compiled forward: within dynamo's graph budget, quantized on every call, never float unannounced.

The budget is what dynamo needs anyway: a do-nothing backend on the same calls. qcompile must not add
graphs (its rewrite must not specialize on the batch or sequence length), and every call must give the
tokens of the eager quantized reference.
"""

import random

import pytest
import torch

from qcompile import NF4, QuantConfig, Rule
from qcompile.reference import dequantized_model
from tests.models import tiny_llama

CONFIG = QuantConfig(default=NF4(double_quant=True, compute_dtype=torch.float32), rules=(Rule("lm_head", None),))
VOCAB = 128


def generate_calls(n: int, seed: int = 0, max_batch: int = 8, max_prompt: int = 200):
    """``n`` (input_ids, attention_mask) pairs: batch 1..max_batch, prompt 3..max_prompt, random left padding."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    calls = []
    for _ in range(n):
        batch, length = rng.randint(1, max_batch), rng.randint(3, max_prompt)
        ids = torch.randint(1, VOCAB, (batch, length), generator=gen)
        mask = torch.ones(batch, length, dtype=torch.long)
        for row in range(batch):
            pad = rng.randint(0, length - 2)
            mask[row, :pad] = 0
            ids[row, :pad] = 0
        calls.append((ids, mask))
    return calls


class GraphCounter:
    """An inner compiler (or a whole backend) that counts the graphs it is given and runs them as they are."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return gm.forward


def run_generate(model, calls, **kwargs):
    kwargs = {"max_new_tokens": 3, "do_sample": False, "pad_token_id": 0, **kwargs}
    return [model.generate(ids, attention_mask=mask, **kwargs) for ids, mask in calls]


def graphs_needed_by_dynamo(calls, dynamic, **kwargs) -> int:
    """Graphs a do-nothing backend compiles for the same calls on an identical model."""
    torch._dynamo.reset()
    model = tiny_llama(max_positions=256)
    counter = GraphCounter()
    model.forward = torch.compile(model.forward, backend=counter, dynamic=dynamic)
    run_generate(model, calls, **kwargs)
    torch._dynamo.reset()
    return len(counter.graphs)


def quantized_ops(graphs) -> int:
    return sum(n.target is torch.ops.qcompile.quantized_linear.default for gm in graphs for n in gm.graph.nodes)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@torch.no_grad()
def test_generate_stays_within_dynamos_graph_budget_and_equals_the_reference(cache):
    calls = generate_calls(20 if cache == "dynamic" else 8)
    kwargs = {"cache_implementation": "static"} if cache == "static" else {}
    budget = graphs_needed_by_dynamo(calls, dynamic=True, **kwargs)

    model = tiny_llama(max_positions=256)
    expected = run_generate(dequantized_model(model, CONFIG), calls, **kwargs)
    float_tokens = run_generate(model, calls, **kwargs)
    counter = GraphCounter()
    model.forward = torch.compile(model.forward, backend="qcompile", dynamic=True,
                                  options={"config": CONFIG, "inner": counter})
    out = run_generate(model, calls, **kwargs)

    assert len(counter.graphs) <= budget, f"qcompile compiled {len(counter.graphs)} graphs, dynamo needs {budget}"
    assert quantized_ops(counter.graphs) >= len(counter.graphs) * 14  # 2 layers x 7 linears, lm_head skipped
    assert any(not torch.equal(f, e) for f, e in zip(float_tokens, expected, strict=True))  # tells quantized from float
    for i, (got, want) in enumerate(zip(out, expected, strict=True)):
        assert torch.equal(got, want), f"call {i} (batch {got.shape[0]}) differs from the quantized reference"


@torch.no_grad()
def test_generate_past_the_recompile_limit_raises_instead_of_running_float():
    """Without dynamic shapes every new prompt length recompiles; at the limit dynamo would run the float model."""
    model = tiny_llama(max_positions=256)
    model.forward = torch.compile(model.forward, backend="qcompile", dynamic=False,
                                  options={"config": CONFIG, "inner": GraphCounter()})
    calls = [(torch.randint(1, VOCAB, (1, length)), torch.ones(1, length, dtype=torch.long)) for length in (5, 9, 13)]
    with torch._dynamo.config.patch(recompile_limit=2, automatic_dynamic_shapes=False):
        with pytest.raises(RuntimeError, match=r"ran in float although qcompile quantized its weight model\.layers"):
            run_generate(model, calls)


@pytest.mark.parametrize("auto_backend", ["counter", "qcompile"])
@torch.no_grad()
def test_transformers_auto_compile_leaves_the_qcompile_forward_in_charge(auto_backend):
    """generate() with a static cache compiles ``__call__`` itself (on accelerators) with its CompileConfig.

    ``Module.__call__`` is a frame dynamo skips, so the forward compiled with qcompile still compiles its own
    frames: the auto-compile backend gets no graph, and every call is quantized. (Were the outer compile ever
    to trace the forward itself, the fallback guard would raise: tests/backend/test_fallback.py.)
    """
    from transformers import CompileConfig

    model = tiny_llama(max_positions=256)
    calls = generate_calls(3, seed=4)
    expected = run_generate(dequantized_model(model, CONFIG), calls, cache_implementation="static")
    counter, outer = GraphCounter(), GraphCounter()
    options = {"config": CONFIG, "inner": counter}
    model.forward = torch.compile(model.forward, backend="qcompile", dynamic=True, options=options)
    if auto_backend == "qcompile":
        auto = CompileConfig(backend="qcompile", mode=None, dynamic=True, options=options)
    else:
        auto = CompileConfig(backend=outer, mode=None)
    auto._compile_all_devices = True  # transformers auto-compiles on accelerators only; force it on CPU
    out = run_generate(model, calls, cache_implementation="static", compile_config=auto)
    assert getattr(model, "_compiled_call", None) is not None  # transformers did compile __call__
    assert outer.graphs == []
    assert quantized_ops(counter.graphs) > 0
    for got, want in zip(out, expected, strict=True):
        assert torch.equal(got, want)
