"""Smoke test of benchmarks/pack_throughput.py on a tiny shape (the real run is manual)."""

import json

import pytest

pytest.importorskip("bitsandbytes")


def test_pack_throughput_smoke(tmp_path):
    from benchmarks import pack_throughput

    out = tmp_path / "bench.json"
    assert pack_throughput.main(["--out", str(out), "--shapes", "64x128", "--dtypes", "float32", "--repeats", "1"]) == 0
    doc = json.loads(out.read_text())
    assert doc["machine"]["torch"] and doc["machine"]["bitsandbytes"]
    formats = {row["format"] for row in doc["results"]}
    assert formats == {"nf4", "nf4_double_quant", "int8"}
    for row in doc["results"]:
        assert row["qcompile_gbps"] > 0 and row["bnb_gbps"] > 0 and row["speedup"] > 0
