"""Every Triton launch runs with the tensors' device current (a model spread over two GPUs).

Triton launches on the current CUDA device and its stream, not on the tensors' device, so each
launch must be wrapped in a device guard. There is no GPU here: the guard is replaced by a recorder
and every interpreter launch checks that it runs inside it, entered with the tensors' device.
"""

import contextlib

import pytest
import torch
from codegen_refs import requires_interpreter

from qcompile.codegen import _common as common
from qcompile.codegen import autotune


@pytest.fixture
def launches(monkeypatch):
    """[(kernel name, devices of the guards active during its launch)] for every kernel launch."""
    from triton.runtime.interpreter import InterpretedFunction

    active: list[torch.device] = []
    seen: list[tuple[str, list[torch.device]]] = []

    @contextlib.contextmanager
    def guard(device):
        active.append(device)
        try:
            yield
        finally:
            active.pop()

    real_run = InterpretedFunction.run

    def run(self, *args, **kwargs):
        seen.append((self.fn.__name__, list(active)))
        return real_run(self, *args, **kwargs)

    monkeypatch.setattr(autotune, "device_guard", guard)
    monkeypatch.setattr(InterpretedFunction, "run", run)
    return seen


def _int8_weight(n=24, k=40):
    gen = torch.Generator().manual_seed(3)
    return torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8), torch.rand(n, generator=gen) + 0.1


def _call_linear_4bit(m, variant):
    from qcompile.codegen.lowbit import linear_4bit

    n, k, blocksize = 24, 64, 64
    gen = torch.Generator().manual_seed(4)
    packed = torch.randint(0, 256, (n * k // 2,), generator=gen, dtype=torch.uint8)
    absmax = torch.rand(n * k // blocksize, generator=gen) + 0.5
    x = torch.randn(m, k, generator=gen)
    return linear_4bit(x, packed, absmax, torch.linspace(-1, 1, 16), None, None, torch.randn(n), 0.0, blocksize,
                       n, k, torch.float32, variant=variant)


def _call_llm_int8(m):
    from qcompile.codegen.llm_int8 import linear_int8

    w, scb = _int8_weight()
    x = torch.randn(m, 40)
    x[:, 5] = 20.0  # an outlier column: the compaction kernel and the outlier loop run too
    return linear_int8(x, w, scb * 127, None, 6.0)


def _call_int8_weight_only(m):
    from qcompile.codegen.int8_weight_only import int8_weight_only

    w, scale = _int8_weight()
    return int8_weight_only(torch.randn(m, 40), w, scale, None)


def _call_w8a8(m):
    from qcompile.codegen.w8a8_dynamic import w8a8_dynamic

    w, scale = _int8_weight()
    return w8a8_dynamic(torch.randn(m, 40), w, scale, None)


def _call_int8_vectorwise_quant(m):
    from qcompile.codegen.llm_int8 import int8_vectorwise_quant

    x = torch.randn(m, 40)
    x[0, 3] = 30.0
    return int8_vectorwise_quant(x, 6.0)


@requires_interpreter
@pytest.mark.parametrize("call, m, kernels", [
    (lambda m: _call_linear_4bit(m, "gemv"), 2, {"lowbit_gemv_kernel", "split_k_sum_kernel"}),
    (lambda m: _call_linear_4bit(m, "gemm_split_k"), 5, {"lowbit_gemm_kernel"}),
    (lambda m: _call_linear_4bit(m, "gemm"), 70, {"lowbit_gemm_kernel"}),
    (_call_llm_int8, 3, {"llm_int8_quant_kernel", "llm_int8_compact_kernel", "llm_int8_gemm_kernel"}),
    (_call_llm_int8, 70, {"llm_int8_quant_kernel", "llm_int8_compact_kernel", "llm_int8_gemm_kernel"}),
    (_call_int8_vectorwise_quant, 3, {"llm_int8_quant_kernel", "llm_int8_compact_kernel"}),
    (_call_int8_weight_only, 3, {"int8_weight_only_kernel"}),
    (_call_int8_weight_only, 70, {"int8_weight_only_kernel"}),
    (_call_w8a8, 3, {"w8a8_quant_kernel", "w8a8_gemm_kernel"}),
    (_call_w8a8, 70, {"w8a8_quant_kernel", "w8a8_gemm_kernel"}),
], ids=["4bit-gemv", "4bit-gemm-split-k", "4bit-gemm", "llm-int8-split-k", "llm-int8-gemm", "int8-vectorwise-quant",
        "int8-weight-only-split-k", "int8-weight-only-gemm", "w8a8-split-k", "w8a8-gemm"])
def test_every_launch_runs_under_the_tensors_device_guard(launches, call, m, kernels):
    call(m)
    assert {name for name, _ in launches} == kernels
    unguarded = [(name, devices) for name, devices in launches if devices != [torch.device("cpu")]]
    assert not unguarded, f"launched without exactly one guard for the tensors' device: {unguarded}"


def test_device_guard_is_cuda_device_of_the_tensors_and_a_no_op_elsewhere():
    guard = autotune.device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1  # constructed, not entered: no GPU here
    with autotune.device_guard(torch.device("cpu")):
        pass


def test_run_kernel_guards_with_the_device_of_its_tensor_arguments(monkeypatch):
    entered = []
    monkeypatch.setattr(autotune, "device_guard", lambda device: entered.append(device) or contextlib.nullcontext())

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: (grid, args, kwargs)

    x = torch.empty(4, device="meta")
    assert autotune.run_kernel(Kernel(), (3,), (7, x), BLOCK=16) == ((3,), (7, x), {"BLOCK": 16})
    assert entered == [torch.device("meta")]


def test_device_dependent_helpers_use_the_given_device(monkeypatch):
    asked = []

    class Props:
        multi_processor_count = 132

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: asked.append(device) or "GPU")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: asked.append(device) or Props())
    assert autotune.device_name(torch.device("cuda", 1)) == "GPU"
    assert common.sm_count(torch.device("cuda", 1)) == 132
    assert asked == [torch.device("cuda", 1)] * 2


def test_tuning_key_and_split_k_heuristic_use_the_tensors_device(monkeypatch):
    devices = []
    monkeypatch.setattr(autotune, "autotune_mode", lambda: "fast")
    monkeypatch.setattr(autotune, "device_name", lambda device: devices.append(device) or "dev")
    monkeypatch.setattr(common, "sm_count", lambda device: devices.append(device) or 132)
    x = torch.empty(2, 8, device="meta")
    from qcompile.codegen import int8_weight_only

    tuned = int8_weight_only._tuned(True)
    args = (x, x, x, x, x, 2, 24, 8, 8, 8, 24)
    assert tuned.choose(args, 2, HAS_BIAS=False)[1][1].startswith("dev|")
    common.split_k_heuristic(autotune.gemm_heuristic)(dict(zip(tuned.arg_names, args, strict=True)))
    assert devices == [torch.device("meta")] * 2
