"""bench/show_bench.py, bench/compress_bench.py and bench/adopt_bench.py run end to end on small inputs.

Timings are not checked (they belong to the benchmarks); what is checked is that each tool ran,
and that what the benchmark reports follows from what it measured.
"""

from __future__ import annotations

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

pytest.importorskip("coremltools")


def test_show_bench_runs_both_tools(tmp_path, capsys):
    import show_bench

    out = tmp_path / "r.json"
    assert show_bench.main(["--sizes", "8", "--repeat", "1", "--workdir", str(tmp_path / "w"), "--json", str(out)]) == 0
    [r] = json.loads(out.read_text())
    ct, ms = r["coremltools"], r["milsurgery show"]
    for tool in (ct, ms):
        assert tool["runs_seconds"] == [tool["seconds"]] and tool["seconds"] > 0 and tool["peak_rss_mib"] > 0
    assert r["speedup"] == round(ct["seconds"] / ms["seconds"], 1)
    weights = os.path.join(tmp_path, "w", os.listdir(tmp_path / "w")[0], "Data", "com.apple.CoreML", "weights", "weight.bin")
    assert r["weight_bytes"] == os.path.getsize(weights)
    assert "milsurgery show" in capsys.readouterr().out


def test_compress_bench_runs_merge_then_compress(tmp_path):
    import compress_bench

    out = tmp_path / "r.json"
    argv = ["--size", "8", "--mode", "uniform", "--no-reference", "--workdir", str(tmp_path / "w"), "--json", str(out)]
    assert compress_bench.main(argv) == 0
    r = json.loads(out.read_text())
    steps = r["steps"]["milsurgery"]
    assert set(steps) == {"merge", "compress"} and all(s["seconds"] > 0 for s in steps.values())
    assert r["milsurgery"]["peak_rss_mib"] == max(s["peak_rss_mib"] for s in steps.values())
    # 4-bit indices and small LUTs: the compressed package is far smaller than its fp16 input
    assert 0 < r["output_bytes"]["milsurgery"] < r["input_weight_bytes"] / 2


def test_adopt_bench_adopts_what_its_independent_check_expects(tmp_path):
    import adopt_bench

    out = tmp_path / "r.json"
    argv = ["--sizes", "4", "--kinds", "int8", "--no-reference", "--workdir", str(tmp_path / "w"), "--json", str(out)]
    assert adopt_bench.main(argv) == 0
    [r] = json.loads(out.read_text())
    assert r["adopted_as_expected"] is True and r["expected"]["pass"] > 0
    # every passing pair adopted: the output is the single function's size
    assert r["merge --adopt"]["output_bytes"] == r["infer_bytes"] < r["merge"]["output_bytes"]
    assert r["merge --adopt --workers 1"]["output_bytes"] == r["infer_bytes"]
    assert r["merge --adopt --workers 1"]["helpers"] == 0 and r["merge"]["helpers"] == 0
    assert r["time_vs_plain_merge"] == round(r["merge --adopt"]["seconds"] / r["merge"]["seconds"], 2)
