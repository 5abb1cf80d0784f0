"""Small models built locally for tests (random weights, nothing downloaded)."""

from __future__ import annotations

import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self, d_in: int = 64, hidden: int = 128, d_out: int = 32):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, hidden, bias=False)
        self.lm_head = nn.Linear(hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class BrokenMLP(MLP):
    """The same MLP with a graph break in the middle: dynamo captures two graphs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x))
        torch._dynamo.graph_break()
        return self.lm_head(torch.relu(self.fc2(h)))


def tiny_llama(layers: int = 2, seed: int = 0, max_positions: int = 64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def dequantized_reference(model: nn.Module, scheme, skip: tuple[str, ...] = ("lm_head",)) -> nn.Module:
    """``model`` with its linears (except ``skip``) quantized/dequantized with ``scheme``, computing eagerly."""
    from qcompile import QuantConfig, Rule
    from qcompile.reference import dequantized_model

    return dequantized_model(model, QuantConfig(default=scheme, rules=tuple(Rule(f"*{s}*", None) for s in skip)))
