"""The demo runs (eager inner compiler, one layer) and reports what it promises."""

from qcompile.demo import main


def test_demo_prints_plan_memory_error_and_tokens(capsys):
    main(["--inner", "eager", "--layers", "1", "--tokens", "2"])
    out = capsys.readouterr().out
    assert "7 of 8 linear sites quantized" in out
    assert "skip: skipped by rule '*lm_head*'" in out
    assert "bits per weight" in out
    assert "max abs diff 0," in out  # eager inner: the compiled model equals the reference exactly
    assert "generate(): 2 new tokens" in out


def test_explain_works_in_a_fresh_interpreter():
    """explain() is often the first thing called: nothing may rely on qcompile.ops being imported before."""
    import subprocess
    import sys

    code = ("import torch, qcompile; m = torch.nn.Sequential(torch.nn.Linear(64, 64)); "
            "print(len(qcompile.explain(m, torch.randn(2, 64)).quantized))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "1"
