"""A whole compiled model on the Triton kernels (the interpreter on CPU) equals the reference path."""

import os

import pytest
import torch

from qcompile import NF4, Int8, QuantConfig, Rule
from tests.models import tiny_llama

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs CUDA or the Triton interpreter",
)


def _logits(kernels, config, ids):
    model = tiny_llama(layers=1)
    plans = []
    compiled = torch.compile(model, backend="qcompile",
                             options={"config": config, "inner": "eager", "kernels": kernels, "on_plan": plans.append})
    with torch.no_grad():
        logits = compiled(ids).logits
    assert sum(len(p.quantized) for p in plans) == 7  # q, k, v, o, gate, up, down
    return logits


@pytest.mark.parametrize("scheme", [
    NF4(double_quant=True, compute_dtype=torch.float32),
    NF4(double_quant=True, compute_dtype=torch.bfloat16),
    Int8(threshold=6.0),
], ids=["nf4-fp32", "nf4-bf16", "llm-int8"])
def test_llama_triton_kernels_match_reference(scheme):
    config = QuantConfig(default=scheme, rules=(Rule("lm_head", None),))
    ids = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(0))
    reference = _logits("reference", config, ids)
    torch._dynamo.reset()
    triton = _logits("triton", config, ids)
    # logits are about 0.5 in magnitude; bf16 compute and int8 activation rounding give ~1e-3 differences
    tolerance = 5e-3 if scheme.kind == "int8" or getattr(scheme, "compute_dtype", None) == torch.bfloat16 else 1e-5
    torch.testing.assert_close(triton, reference, rtol=tolerance, atol=tolerance)
