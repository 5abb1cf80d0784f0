"""A graph compiled with CUDA graphs refuses to replay weights changed in place after it recorded them.

No CUDA here: ``records_cuda_graphs`` is forced on, which is all the backend asks before wrapping the compiled
graph (``qcompile/cuda_graphs.py`` says why a replay would otherwise run the old packed weights silently).
"""

import gc
import weakref

import pytest
import torch

from qcompile import cuda_graphs
from qcompile.cuda_graphs import StaleCudaGraphError
from tests.backend.test_trust import assert_matches_reference, compile_counting
from tests.models import MLP


@pytest.fixture
def cuda_graphs_on(monkeypatch):
    monkeypatch.setattr("qcompile.backend.records_cuda_graphs", lambda example_inputs, inner, mode: True)


@pytest.mark.parametrize("change", ["load_state_dict", "copy_"])
@torch.no_grad()
def test_weights_changed_in_place_after_recording_raise(cuda_graphs_on, change):
    model, donor = MLP().eval(), MLP().eval()
    x = torch.randn(3, 64)
    compiled, _ = compile_counting(model)
    for _ in range(3):  # unchanged weights: replays go on
        assert_matches_reference(compiled(x), model, x)
    if change == "load_state_dict":
        model.load_state_dict(donor.state_dict())
    else:
        model.fc2.weight.copy_(donor.fc2.weight)
    with pytest.raises(StaleCudaGraphError, match=r"fc[12]\.weight changed in place .* torch\.compiler\.reset"):
        compiled(x)
    torch.compiler.reset()  # what the message asks for: the next call compiles and records again
    compiled, _ = compile_counting(model)
    assert_matches_reference(compiled(x), model, x)


@torch.no_grad()
def test_another_instance_is_not_a_change(cuda_graphs_on):
    """Dynamo runs one graph for both instances; each brings its own weights (other addresses), which CUDA
    graph trees record separately."""
    a, b = MLP().eval(), MLP().eval()
    x = torch.randn(3, 64)
    ca, plans = compile_counting(a)
    cb, _ = compile_counting(b)
    for _ in range(2):
        assert_matches_reference(ca(x), a, x)
        assert_matches_reference(cb(x), b, x)
    assert len(plans) == 1


@torch.no_grad()
def test_the_check_keeps_no_weight_alive(cuda_graphs_on):
    """Weights that reach the graph as inputs are read from each call's inputs: deleting the model frees them."""
    model = MLP().eval()
    compiled, _ = compile_counting(model)
    compiled(torch.randn(3, 64))
    weight = weakref.ref(model.fc1.weight)
    del model, compiled
    gc.collect()
    assert weight() is None


def test_records_cuda_graphs_needs_inductor_the_mode_and_cuda_inputs():
    cpu, meta_cuda = [torch.zeros(2)], [torch.zeros(2, device="meta")]
    assert not cuda_graphs.records_cuda_graphs(cpu, "inductor", "reduce-overhead")  # CPU graphs are not recorded
    assert not cuda_graphs.records_cuda_graphs(meta_cuda, "inductor", "reduce-overhead")
    assert not cuda_graphs.records_cuda_graphs(cpu, "eager", "reduce-overhead")
    assert not cuda_graphs.records_cuda_graphs(cpu, "inductor", None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_records_cuda_graphs_on_cuda():
    inputs = [torch.zeros(2, device="cuda")]
    assert cuda_graphs.records_cuda_graphs(inputs, "inductor", "reduce-overhead")
    assert not cuda_graphs.records_cuda_graphs(inputs, "inductor", "max-autotune-no-cudagraphs")
    assert not cuda_graphs.records_cuda_graphs(inputs, "inductor", None)
