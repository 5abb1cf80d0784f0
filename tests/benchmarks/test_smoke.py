"""The benchmarks run end to end on CPU (--smoke) and write the documented JSON and PNG files.

Kept small (one tiny shape, M=1, a 1-layer model with the eager inner compiler) so the file runs
in well under a minute on two cores; the Triton kernels run in the interpreter (conftest sets
TRITON_INTERPRET=1 without CUDA).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("matplotlib")
pytest.importorskip("transformers")


def test_kernels_smoke_writes_json_and_plots(tmp_path):
    from benchmarks import kernels

    # Two commands into one folder: the second run's rows merge into the first run's file.
    for scheme in ("nf4_dq", "llm_int8", "hqq_int4_g64"):
        assert kernels.main(["--smoke", "--out", str(tmp_path), "--shapes", "smoke_a", "--m", "1",
                             "--schemes", scheme]) == 0
    doc = json.loads((tmp_path / "kernels.json").read_text())
    for key in ("environment", "peaks", "results", "goals", "plots", "shapes", "ms", "schemes", "runs"):
        assert key in doc
    assert doc["schemes"] == ["nf4_dq", "llm_int8", "hqq_int4_g64"] and len(doc["runs"]) == 3
    for key in ("device", "torch", "triton", "bitsandbytes"):
        assert key in doc["environment"]
    assert doc["peaks"]["copy_gbps"] > 0 and doc["peaks"]["bf16_tflops"] > 0
    rows = doc["results"]
    assert not [r for r in rows if "error" in r], [r["error"] for r in rows if "error" in r]
    impls = {(r["scheme"], r["impl"]) for r in rows}
    expected = {("bf16", "torch"), ("nf4_dq", "reference"), ("nf4_dq", "triton"), ("llm_int8", "reference"),
                ("llm_int8", "triton"), ("hqq_int4_g64", "reference"), ("hqq_int4_g64", "triton")}
    assert expected <= impls
    for r in rows:
        for key in ("median_s", "tflops", "gbps", "pct_roofline", "speedup_vs_bf16", "roofline_s"):
            assert key in r and r[key] > 0, (key, r)
    triton_rows = [r for r in rows if r["impl"] == "triton"]
    # The autotune record names the kernel and the config that ran (the interpreter's, untuned).
    assert all(r["autotune"] and r["autotune"][0]["config"]["kwargs"] for r in triton_rows)
    assert all(r["rel_err_vs_bf16"] < 0.2 for r in rows if "rel_err_vs_bf16" in r)
    assert all(g["met"] is None for g in doc["goals"])  # smoke runs are not judged
    for name in ("kernels_speedup.png", "kernels_roofline.png"):
        assert (tmp_path / name).stat().st_size > 0 and name in doc["plots"]


def test_e2e_smoke_writes_json_and_plot(tmp_path):
    from benchmarks import e2e

    args = ["--smoke", "--out", str(tmp_path), "--layers", "1", "--inner", "eager", "--batches", "1,2",
            "--prefill", "16", "--steps", "2", "--warmup", "1", "--reps", "1", "--strict"]
    assert e2e.main(args) == 0
    doc = json.loads((tmp_path / "e2e.json").read_text())
    for key in ("environment", "model", "settings", "results", "goals", "plots"):
        assert key in doc
    variants = {r["variant"]: r for r in doc["results"]}
    assert set(variants) == set(e2e.VARIANTS)
    for name, row in variants.items():
        if "skipped" in row:  # bitsandbytes missing
            assert name == "bnb_nf4"
            continue
        assert row["prefill"]["tokens_per_s"] > 0 and row["prefill"]["next_token_valid"]
        assert [d["batch"] for d in row["decode"]] == [1, 2]
        assert all(d["tokens_per_s"] > 0 for d in row["decode"])
    assert "speedup_vs_inductor_bf16" in variants["qcompile_nf4_dq"]["decode"][0]
    assert (tmp_path / "e2e.png").stat().st_size > 0



def _device_run(tmp_path, *args):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "RESULTS": str(tmp_path / "results"),
           "WHEELS": str(tmp_path / "no-wheels"), "PYTHON": sys.executable}
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "device_run.sh"
    return subprocess.run(["bash", str(script), *args], cwd=script.parents[1], env=env, capture_output=True,
                          text=True, timeout=600)


def test_device_run_script_leaves_the_step_results_in_out(tmp_path):
    done = _device_run(tmp_path, "e2e", "--smoke", "--layers", "1", "--inner", "eager", "--batches", "1",
                       "--prefill", "16", "--steps", "2", "--warmup", "1", "--reps", "1", "--variants",
                       "eager_bf16,qcompile_nf4_dq", "--strict")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["e2e.json", "e2e.log", "e2e.png"]
    assert "qcompile_nf4_dq" in (tmp_path / "out" / "e2e.log").read_text()


def test_device_run_script_reports_failures(tmp_path):
    assert _device_run(tmp_path, "nope").returncode == 2
    failed = _device_run(tmp_path, "e2e", "--smoke", "--variants", "no_such_variant", "--strict")
    assert failed.returncode != 0 and (tmp_path / "out" / "e2e.log").exists()


def test_cli_bench_finds_the_checkout_and_fails_clearly_without_it(tmp_path, monkeypatch, capsys):
    from qcompile import cli

    assert cli.find_source_checkout() is not None
    assert cli.main([]) == 0 and "bench" in capsys.readouterr().out
    assert cli.main(["nope"]) == 2
    monkeypatch.setattr(cli, "__file__", str(tmp_path / "site-packages" / "qcompile" / "cli.py"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(cli.SOURCE_ENV, raising=False)
    assert cli.find_source_checkout() is None
    with pytest.raises(SystemExit, match="source checkout"):
        cli.main(["bench", "--smoke"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_kernels_gpu_one_case(tmp_path):
    from benchmarks import kernels

    assert kernels.main(["--out", str(tmp_path), "--shapes", "qo_proj", "--m", "1", "--schemes", "nf4_dq",
                         "--strict"]) == 0
    doc = json.loads((tmp_path / "kernels.json").read_text())
    row = next(r for r in doc["results"] if r["scheme"] == "nf4_dq")
    assert row["autotune"] and row["rel_err_vs_bf16"] < 0.2


def test_cpu_compare_small_run_writes_both_schemes(tmp_path):
    pytest.importorskip("bitsandbytes")
    from benchmarks import cpu_compare

    out = tmp_path / "cpu_compare.json"
    assert cpu_compare.main(["--out", str(out), "--parts", "pack,forward", "--shapes", "128x256", "--m", "1",
                             "--dtypes", "float32", "--reps", "1", "--pack-repeats", "1", "--no-bnb-compile"]) == 0
    doc = json.loads(out.read_text())
    rows = {r["scheme_name"]: r for r in doc["forward"]["results"]}
    assert set(rows) == {"nf4_dq", "llm_int8"}
    for row in rows.values():
        assert {"qcompile_compiled", "qcompile_op", "qcompile_reference", "bnb_eager", "bnb_eager_train_mode",
                "dense_f_linear"} <= set(row["timings"])
    # The reference has bitsandbytes' numerics (dequantize + F.linear for NF4, LLM.int8()'s inference path);
    # the C++ NF4 kernel sums in another order.
    assert rows["nf4_dq"]["rel_diff_reference_vs_bnb_train"] == 0.0
    assert rows["nf4_dq"]["rel_diff_qcompile_vs_reference"] < 1e-5
    assert rows["llm_int8"]["rel_diff_qcompile_vs_bnb_eval"] == 0.0


def test_cpu_decode_smoke_runs_every_variant_quantized():
    pytest.importorskip("bitsandbytes")
    from benchmarks import cpu_decode

    rows = {r["variant"]: r for r in cpu_decode.run(["demo"], list(cpu_decode.VARIANTS), tokens=2, repeats=1)}
    assert set(rows) == set(cpu_decode.VARIANTS)
    assert all(r["decode_tokens_per_s"] > 0 for r in rows.values())
    assert rows["qcompile_nf4"]["quantized_linears"] == 28  # 4 layers x 7 projections; lm_head float
    assert rows["bnb_nf4"]["bnb_layers"] == 28


def test_generate_smoke_counts_graphs_and_decode_speed(tmp_path):
    from benchmarks import generate

    assert generate.main(["--smoke", "--calls", "2", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "generate.json").read_text())
    graphs = {(r["recipe"], r["variant"]): r for r in doc["graphs"]}
    for recipe in generate.RECIPES:
        qc, dynamo = graphs[(recipe, "qcompile_eager")], graphs[(recipe, "dynamo")]
        assert 0 < qc["graphs"] <= dynamo["graphs"]
        assert qc["equal_to_reference"] == qc["calls"] == 2
    assert {r["variant"] for r in doc["decode"]} == {"qcompile_eager", "eager"}
    assert all(r["decode_tokens_per_s"] > 0 for r in doc["decode"])


def test_qlora_smoke_compares_with_bitsandbytes(tmp_path):
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("peft")
    from benchmarks import qlora

    out = tmp_path / "qlora.json"
    assert qlora.main(["--smoke", "--out", str(out), "--inner", "eager", "--gc", "non_reentrant"]) == 0
    doc = json.loads(out.read_text())
    comparison = doc["comparisons"]["non_reentrant"]
    assert comparison["ok"], comparison["why"]
    assert len(comparison["loss_rel_diff_per_step"]) == 2
    runs = {run["side"]: run for run in doc["runs"]}
    assert runs["bnb"]["packed_bytes_identical_to_qcompile"]
    assert runs["qcompile"]["plan"]["all_base_quantized"]  # checkpointed layers are quantized too
    for key in ("torch", "bitsandbytes"):
        assert key in doc["machine"]
    assert all(run["peak_tensor_train_mib"] > 0 for run in doc["runs"])


def test_load_smoke_quantizes_while_loading_and_compares_with_bitsandbytes(tmp_path):
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("safetensors")
    from benchmarks import load

    out = tmp_path / "load.json"
    assert load.main(["--sizes", "smoke", "--out", str(out), "--workdir", str(tmp_path / "ckpt")]) == 0
    doc = json.loads(out.read_text())
    result = doc["results"]["smoke"]
    assert set(result["runs"]) == {"qcompile", "bnb"}
    ours = result["runs"]["qcompile"]
    assert ours["packed_weights"] == 2 * 7  # every projection of the 2 layers
    assert 0 < ours["footprint"]["packed_bytes"] < result["checkpoint"]["total_bytes"]
    assert result["goals"]["packed_model_bytes"] == ours["footprint"]["total_bytes"]


def test_host_overhead_measures_the_cuda_host_path_with_launches_stubbed(tmp_path):
    from benchmarks import host_overhead
    from qcompile.codegen import autotune

    real_run_kernel = autotune.run_kernel
    host_overhead.main(["--reps", "20", "--out", str(tmp_path)])
    assert autotune.run_kernel is real_run_kernel  # the stubs are undone
    rows = json.loads((tmp_path / "host_overhead.json").read_text())["per_call_us"]
    assert rows["launches"] == 2  # the GEMV and its split-K sum
    assert all(rows[name] > 0 for name in ("codegen", "format_op", "quantized_linear"))
