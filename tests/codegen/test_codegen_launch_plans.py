"""Launch plans: a low-bit call whose signature was seen before launches exactly what the first call did,
without choosing again; a dropped winner or a changed autotune setting is seen by the next call."""

import codegen_refs as ref
import pytest
import torch
from codegen_refs import requires_interpreter

N, K = 40, 128  # K % 64 == 0: the aligned path


def _operands(seed=0, n=N, k=K, blocksize=64):
    """NF4 + double quant operands in bitsandbytes' layout (random bytes: the kernels do not care how they
    were made), as the 4-bit entry point takes them after x."""
    gen = torch.Generator().manual_seed(seed)
    blocks = n * k // blocksize
    packed = torch.randint(0, 256, (n * k // 2,), generator=gen, dtype=torch.uint8)
    absmax = torch.randint(0, 256, (blocks,), generator=gen, dtype=torch.uint8)
    code = torch.linspace(-1, 1, 16)
    nested_absmax = torch.rand(-(-blocks // 256), generator=gen) + 0.5
    nested_code = torch.linspace(-1, 1, 256)
    return packed, absmax, code, nested_absmax, nested_code, 0.01, blocksize


def _run(x, operands, bias=None, compute_dtype=torch.float32, **kw):
    from qcompile.codegen.lowbit import linear_4bit

    packed, absmax, code, nested_absmax, nested_code, offset, blocksize = operands
    return linear_4bit(x, packed, absmax, code, nested_absmax, nested_code, bias, offset, blocksize, N, K,
                       compute_dtype, **kw)


def _expected(x, operands, bias, compute_dtype=torch.float32):
    packed, absmax, code, nested_absmax, nested_code, offset, blocksize = operands
    w = ref.dequantize_4bit(packed, absmax, code, nested_absmax, nested_code, offset, blocksize, N, K)
    return ref.linear_4bit(x, w, bias, compute_dtype)


@pytest.fixture
def spied(monkeypatch):
    """(launches, choices): every kernel launch as (kernel, grid, keyword arguments), and every config choice."""
    from qcompile.codegen import autotune, lowbit

    for variant in ("gemv", "gemm_split_k", "gemm"):
        lowbit._tuned(variant).plans.clear()
    launches, choices = [], []
    real_run, real_choose = autotune.run_kernel, autotune.TunedKernel._choose

    def run_kernel(kernel, grid, args, **kwargs):
        launches.append((kernel, grid, kwargs))
        return real_run(kernel, grid, args, **kwargs)

    def choose(self, *args, **kwargs):
        choices.append(self.name)
        return real_choose(self, *args, **kwargs)

    monkeypatch.setattr(autotune, "run_kernel", run_kernel)
    monkeypatch.setattr(autotune.TunedKernel, "_choose", choose)
    return launches, choices


@requires_interpreter
@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize(("m", "kernel"), [(1, "lowbit_gemv"), (3, "lowbit_gemv"), (17, "lowbit_gemm_split_k"),
                                           (65, "lowbit_gemm")])
def test_a_planned_call_launches_what_the_first_call_launched(spied, m, kernel, with_bias):
    launches, choices = spied
    operands = _operands(m)
    x = torch.randn(m, K, generator=torch.Generator().manual_seed(m))
    bias = torch.randn(N) if with_bias else None
    first = _run(x, operands, bias)
    first_launches = list(launches)
    assert choices == [kernel]
    launches.clear()
    second = _run(x.clone(), operands, bias)
    assert choices == [kernel]  # the second call chose nothing
    assert launches == first_launches  # same kernels, grids, constexprs and configs
    assert torch.equal(first, second)
    torch.testing.assert_close(second, _expected(x, operands, bias), **ref.tolerance(torch.float32))


@requires_interpreter
def test_each_signature_gets_its_own_plan(spied):
    """Another M, dtype, bias or leading shape is not served by a plan made for something else."""
    from qcompile.codegen import lowbit

    launches, choices = spied
    operands = _operands()
    plans = lowbit._tuned("gemv").plans
    cases = [(torch.randn(1, K), None), (torch.randn(2, K), None), (torch.randn(1, K), torch.randn(N)),
             (torch.randn(1, K, dtype=torch.bfloat16), None), (torch.randn(1, K, dtype=torch.bfloat16), None),
             (torch.randn(2, 1, K), None)]
    for x, bias in cases:
        y = _run(x, operands, bias)
        assert y.shape == (*x.shape[:-1], N) and y.dtype == x.dtype
        torch.testing.assert_close(y, _expected(x.reshape(-1, K), operands, bias).reshape(y.shape),
                                   **ref.tolerance(x.dtype))
    # The fifth case repeats the fourth; the sixth has the second's M (2 rows) and signature.
    assert len(choices) == 4 and len(plans) == 4


@requires_interpreter
def test_checks_on_x_still_run_on_a_planned_call(spied):
    operands = _operands()
    _run(torch.randn(1, K), operands)
    with pytest.raises(ValueError, match="x has dtype int32"):
        _run(torch.ones(1, K, dtype=torch.int32), operands)
    with pytest.raises(ValueError, match=r"x has shape \(1, 64\)"):
        _run(torch.randn(1, 64), operands)


@requires_interpreter
def test_a_changed_autotune_setting_reaches_a_planned_call(spied, monkeypatch):
    operands = _operands()
    _run(torch.randn(1, K), operands)
    monkeypatch.setenv("QCOMPILE_AUTOTUNE", "bogus")
    with pytest.raises(ValueError, match="QCOMPILE_AUTOTUNE"):
        _run(torch.randn(1, K), operands)


def test_dropping_a_winner_empties_the_plans(tmp_path, monkeypatch):
    from qcompile.codegen import autotune

    monkeypatch.setenv("QCOMPILE_CACHE_DIR", str(tmp_path))
    tuned = autotune.TunedKernel("fake", kernel=None, arg_names=["N"], spaces={"fast": [], "max": []},
                                 heuristic=None, interpreter_config=None, smem_bytes=lambda meta, stages, named: 0)
    tuned.plans["signature"] = "plan"
    with pytest.warns(UserWarning, match="dropped the cached fake config"):
        tuned._drop("key", autotune.config(BLOCK_N=8), "a test")
    assert tuned.plans == {}


@requires_interpreter
@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("m", [1, 65], ids=["split-k", "gemm"])
@pytest.mark.parametrize("entry", ["int8_weight_only", "llm_int8", "w8a8_dynamic"])
def test_int8_gemms_plan_too(spied, monkeypatch, entry, m, with_bias):
    """The int8 GEMMs (``common.launch_gemm``): a planned call launches what the first did, same result."""
    import importlib

    module = importlib.import_module(f"qcompile.codegen.{entry}")
    for split in (False, True):
        module._tuned(split).plans.clear()
    launches, choices = spied
    gen = torch.Generator().manual_seed(m)
    weight = torch.randint(-127, 128, (N, K), generator=gen, dtype=torch.int8)
    scale = torch.rand(N, generator=gen) / 127 + 1e-3
    bias = torch.randn(N, generator=gen) if with_bias else None
    x = torch.randn(m, K, generator=gen)
    x[:, 3] *= 20  # an outlier column for LLM.int8()

    def run():
        if entry == "llm_int8":
            return module.linear_int8(x, weight, scale * 127, bias, 6.0)
        return getattr(module, entry)(x, weight, scale, bias)

    first = run()
    first_launches, first_choices = list(launches), list(choices)
    launches.clear()
    second = run()
    assert len(first_choices) == 1 and choices == first_choices  # the second call chose nothing
    assert launches == first_launches
    assert torch.equal(first, second)
    if entry == "int8_weight_only":
        torch.testing.assert_close(second, ref.int8_weight_only(x, weight, scale, bias), **ref.tolerance(torch.float32))


def test_plans_are_bounded(monkeypatch):
    """A signature per prompt length must not grow the plans without end."""
    from qcompile.codegen import autotune

    monkeypatch.setattr(autotune, "MAX_PLANS", 3)
    tuned = autotune.TunedKernel("fake", kernel=None, arg_names=["N"], spaces={"fast": [], "max": []},
                                 heuristic=None, interpreter_config=None, smem_bytes=lambda meta, stages, named: 0)
    for m in range(7):
        tuned.remember_plan(("signature", m), m)
        assert 1 <= len(tuned.plans) <= 3 and tuned.plans[("signature", m)] == m
