"""Training graphs with activation checkpointing get qcompile's inductor options (qcompile/backend.py
``CHECKPOINT_PATCHES``: no buffer reuse, which lowers the backward's peak memory); other graphs do not."""

from __future__ import annotations

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from qcompile import NF4, QuantConfig
from qcompile.backend import CHECKPOINT_PATCHES, has_activation_checkpoint
from tests.models import MLP


class CheckpointedMLP(MLP):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = checkpoint(lambda t: torch.relu(self.fc2(torch.relu(self.fc1(t)))), x, use_reentrant=False)
        return self.lm_head(h)


def _patches_seen(monkeypatch, model: torch.nn.Module, x: torch.Tensor, grad: bool) -> list:
    import torch._inductor.compile_fx as compile_fx_module

    seen = []
    real = compile_fx_module.compile_fx

    depth = []

    def spy(gm, example_inputs, config_patches=None, **kwargs):
        if not depth:  # compile_fx calls itself (through this name) to apply config_patches
            seen.append((has_activation_checkpoint(gm), config_patches))
        depth.append(1)
        try:
            return real(gm, example_inputs, config_patches=config_patches, **kwargs)
        finally:
            depth.pop()

    monkeypatch.setattr(compile_fx_module, "compile_fx", spy)
    torch._dynamo.reset()
    config = QuantConfig(default=NF4(compute_dtype=torch.float32))
    compiled = torch.compile(model, backend="qcompile", options={"config": config})
    with torch.set_grad_enabled(grad):
        out = compiled(x)
        if grad:
            out.sum().backward()
    return seen


@pytest.mark.parametrize("model_cls, grad, patched", [
    (CheckpointedMLP, True, True),    # training with checkpointing: patched
    (CheckpointedMLP, False, False),  # inference: the checkpoint does nothing, no patch
    (MLP, True, False),               # training without checkpointing: inductor's defaults
])
def test_checkpoint_patches_apply_to_checkpointed_training_graphs_only(monkeypatch, model_cls, grad, patched):
    torch.manual_seed(0)
    model = model_cls()
    for p in model.parameters():
        p.requires_grad_(False)  # frozen base, so that its linears are quantized
    x = torch.randn(4, 64, requires_grad=grad)
    seen = _patches_seen(monkeypatch, model, x, grad)
    assert seen, "inductor was not called"
    applied = [p is not None and all(p.get(k) == v for k, v in CHECKPOINT_PATCHES.items()) for _, p in seen]
    if patched:
        assert any(checkpointed for checkpointed, _ in seen)
    assert applied == [patched and checkpointed for checkpointed, _ in seen]
    if grad:
        assert x.grad is not None and torch.isfinite(x.grad).all()
