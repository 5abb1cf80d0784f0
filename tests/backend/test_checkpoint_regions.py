"""Training graphs with activation checkpointing (qcompile/checkpoint_regions.py): each checkpointed region
is compiled on its own and run under an eager checkpoint; selective checkpointing and inference compile
the whole graph (with ``CHECKPOINT_PATCHES`` when training)."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from qcompile import NF4, QuantConfig
from qcompile.backend import CHECKPOINT_PATCHES
from qcompile.checkpoint_regions import CPU_REGION_PATCHES, has_activation_checkpoint
from tests.models import MLP

CONFIG = QuantConfig(default=NF4(compute_dtype=torch.float32))


class CheckpointedMLP(MLP):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = checkpoint(lambda t: torch.relu(self.fc2(torch.relu(self.fc1(t)))), x, use_reentrant=False)
        return self.lm_head(h)


def _save_matmuls(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op is torch.ops.aten.mm.default else CheckpointPolicy.PREFER_RECOMPUTE


class SelectiveCheckpointMLP(MLP):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = checkpoint(lambda t: torch.relu(self.fc2(torch.relu(self.fc1(t)))), x, use_reentrant=False,
                       context_fn=functools.partial(create_selective_checkpoint_contexts, _save_matmuls))
        return self.lm_head(h)


def _frozen(model: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(0)
    model = model()
    for p in model.parameters():
        p.requires_grad_(False)  # a frozen base, so that its linears are quantized
    return model


def _compile_fx_calls(monkeypatch, codes: list[str] | None = None) -> list[tuple[bool, dict | None]]:
    """(whether the graph holds a checkpointed region, its config patches) of every compile_fx call; each graph's
    code is appended to ``codes`` when given."""
    import torch._inductor.compile_fx as compile_fx_module

    seen: list[tuple[bool, dict | None]] = []
    real = compile_fx_module.compile_fx
    depth = []

    def spy(gm, example_inputs, config_patches=None, **kwargs):
        if not depth:  # compile_fx calls itself (through this name) to apply config_patches
            seen.append((has_activation_checkpoint(gm), config_patches))
            if codes is not None:
                codes.append(gm.code)
        depth.append(1)
        try:
            return real(gm, example_inputs, config_patches=config_patches, **kwargs)
        finally:
            depth.pop()

    monkeypatch.setattr(compile_fx_module, "compile_fx", spy)
    return seen


def _run(model: torch.nn.Module, x: torch.Tensor, grad: bool, plans: list | None = None):
    options = {"config": CONFIG} if plans is None else {"config": CONFIG, "on_plan": plans.append}
    compiled = torch.compile(model, backend="qcompile", options=options)
    x = x.clone().requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        out = compiled(x)
        if grad:
            (out * torch.arange(out.numel()).view(out.shape).sin()).sum().backward()
    return out.detach(), x.grad


def test_checkpointed_regions_compile_on_their_own_and_match_the_whole_model(monkeypatch):
    torch._dynamo.reset()
    plain = _frozen(MLP)
    checkpointed = _frozen(CheckpointedMLP)
    for batch in (4, 6, 9):  # new shapes recompile the region, as they do the model
        x = torch.randn(batch, 64)
        want_out, want_grad = _run(plain, x, grad=True)
        seen = _compile_fx_calls(monkeypatch)
        plans: list = []
        out, grad = _run(checkpointed, x, grad=True, plans=plans)
        monkeypatch.undo()
        if batch == 4:
            quantized = sorted(r.module for p in plans for r in p.rows if r.quantized)
            assert quantized == ["fc1", "fc2"], quantized  # the head stays float by default
            # Only the region body reached inductor, with the CPU region options; the outer graph runs eagerly.
            assert seen and all(not has_hop for has_hop, _ in seen)
            assert all(p is not None and all(p.get(k) == v for k, v in CPU_REGION_PATCHES.items()) for _, p in seen)
        torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-5)
    float_out = _frozen(CheckpointedMLP)(x)  # the same weights in float differ: the region was quantized
    assert (float_out - out).abs().max() > 100 * (out - want_out).abs().max() + 1e-4


@pytest.mark.parametrize("model_cls, grad, whole_graph_patches", [
    (SelectiveCheckpointMLP, True, True),  # selective checkpointing: whole graph, patched
    (CheckpointedMLP, False, False),       # inference: the checkpoint does nothing, whole graph, no patch
    (MLP, True, False),                    # training without checkpointing: inductor's defaults
])
def test_whole_graph_compiles(monkeypatch, model_cls, grad, whole_graph_patches):
    torch._dynamo.reset()
    seen = _compile_fx_calls(monkeypatch)
    out, x_grad = _run(_frozen(model_cls), torch.randn(4, 64), grad)
    assert len(seen) == 1, seen
    _, patches = seen[0]
    assert (patches is not None and all(patches.get(k) == v for k, v in CHECKPOINT_PATCHES.items())) \
        == whole_graph_patches
    assert torch.isfinite(out).all()
    if grad:
        assert x_grad is not None and torch.isfinite(x_grad).all()


class DropoutRegion(torch.nn.Module):
    """A checkpointed region that draws random numbers, then a quantized linear."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.full((64,), 1.5))
        self.fc = torch.nn.Linear(64, 32).requires_grad_(False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = checkpoint(lambda t: F.dropout(t, 0.5, training=True) * self.scale, x, use_reentrant=False)
        return h, self.fc(h)


def test_recomputed_region_draws_the_same_random_numbers():
    # h = dropout(x) * scale, so d(sum h)/d(scale) = sum over rows of dropout(x) = sum(h / scale): it holds
    # only when the backward's recomputation drew the forward's dropout mask.
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = DropoutRegion()
    compiled = torch.compile(model, backend="qcompile", options={"config": CONFIG})
    x = torch.randn(16, 64) + 3.0  # no zeros, so that a dropped element shows as 0 in h
    for _ in range(3):
        model.scale.grad = None
        h, y = compiled(x)
        (h.sum() + 0 * y.sum()).backward()
        assert 0.3 < (h == 0).float().mean() < 0.7  # dropout really ran
        torch.testing.assert_close(model.scale.grad, (h / model.scale).detach().sum(0), rtol=1e-6, atol=1e-5)


def _no_dropout(model: torch.nn.Module) -> torch.nn.Module:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0  # the compiled model and the eager reference draw random numbers differently
    return model


@pytest.mark.parametrize("family, reentrant", [("gpt2", False), ("bert", False), ("qwen2", False), ("llama", True)])
def test_real_models_train_with_gradient_checkpointing_as_the_quantized_reference(monkeypatch, family, reentrant):
    """transformers' gradient checkpointing, frozen quantized linears, a trainable input embedding, batches
    whose length changes (so the regions recompile): every step's loss and embedding gradient equal the eager
    quantized reference's (same checkpointing), and every linear but the head was quantized. Reentrant
    checkpointing (transformers' old default) is not a region dynamo captures; it must train quantized too."""
    pytest.importorskip("transformers")
    from qcompile import Rule
    from qcompile.reference import dequantized_model
    from tests.backend import test_real_models as real

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _no_dropout(getattr(real, family)(False).train())
    model.requires_grad_(False)
    embedding = model.get_input_embeddings().weight.requires_grad_(True)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    heads = (Rule("*lm_head*", None), Rule("*cls.*", None))
    config = QuantConfig(default=NF4(compute_dtype=torch.float32), rules=heads)
    reference = dequantized_model(model, config)
    plans: list = []
    codes: list[str] = []
    seen = _compile_fx_calls(monkeypatch, codes)
    compiled = torch.compile(model, backend="qcompile", options={"config": config, "on_plan": plans.append})
    for seq in (12, 9):
        ids = torch.randint(0, 128, (2, seq), generator=torch.Generator().manual_seed(seq))
        got = compiled(input_ids=ids, labels=ids).loss
        got.backward()
        want = reference(input_ids=ids, labels=ids).loss
        want.backward()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        want_grad = reference.get_input_embeddings().weight.grad
        torch.testing.assert_close(embedding.grad, want_grad, rtol=1e-4, atol=1e-6)
        embedding.grad = reference.get_input_embeddings().weight.grad = None
    assert seen and not any(has_hop for has_hop, _ in seen)  # compiled region by region
    if not reentrant:
        # The two layers' regions trace to the same graph (no layer names in it): inductor compiles it once and
        # finds it in its cache for the other layer.
        layer_graphs = [c for c in codes if "quantized_linear" in c]
        assert len(layer_graphs) >= 2 and layer_graphs[0] == layer_graphs[1]
    linears = {r.module for p in plans for r in p.rows}
    quantized = {r.module for p in plans for r in p.rows if r.quantized}
    assert quantized and quantized == {m for m in linears if "lm_head" not in m and not m.startswith("cls.")}


def test_a_region_without_names_still_names_the_weight_in_errors():
    # Region bodies call quantized_linear with name "": messages take the name the backend recorded.
    from qcompile.pack_cache import name_of, packed_weight, remember_name

    weight = torch.nn.Parameter(torch.randn(32, 64), requires_grad=False)
    assert name_of(weight) == "weight"
    remember_name(weight, "model.layers.3.mlp.down_proj.weight")
    assert name_of(weight) == "model.layers.3.mlp.down_proj.weight"
    weight._qcompile_released = "released"  # as release_weights leaves it: it cannot be packed again
    with pytest.raises(ValueError, match=r"model\.layers\.3\.mlp\.down_proj\.weight: its floating-point data"):
        packed_weight(weight, NF4(), False, "")
