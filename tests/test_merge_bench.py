"""bench/merge_bench.py runs end to end on its smallest pair and reports what it measured.

The figures themselves are not checked (timings belong to the benchmark, not to unit tests); what
is checked is that every tool ran, the outputs are the sizes they must be, and the ratios are
computed from the medians reported.
"""

from __future__ import annotations

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

pytest.importorskip("coremltools")


def test_bench_runs_every_tool_and_reports_consistent_ratios(tmp_path, capsys):
    import merge_bench

    out = tmp_path / "r.json"
    assert merge_bench.main(["--sizes", "64", "--no-reference", "--repeat", "2", "--workdir", str(tmp_path), "--json", str(out)]) == 0
    [r] = json.loads(out.read_text())
    tools = ["milsurgery", "milsurgery --no-sync", "cp", "cp+sync"]
    for tool in tools:
        t = r[tool]
        assert len(t["runs_seconds"]) == 2 and all(s > 0 for s in t["runs_seconds"])
        assert t["seconds"] in t["runs_seconds"]
        assert t["peak_rss_mib"] > 0
    # The pair shares every weight: the merged weight.bin holds one copy, cp copies it.
    sizes = {r[tool]["output_bytes"] for tool in tools}
    assert len(sizes) == 1
    assert r["inputs_bytes"] > 1.9 * sizes.pop()
    assert r["time_vs_cp_sync"] == round(r["milsurgery"]["seconds"] / r["cp+sync"]["seconds"], 2)
    assert r["no_sync_time_vs_cp"] == round(r["milsurgery --no-sync"]["seconds"] / r["cp"]["seconds"], 2)
    printed = capsys.readouterr().out
    assert "| 64 | milsurgery --no-sync |" in printed and "with --no-sync" in printed
    # Only the cached inputs are left in the work directory.
    assert sorted(p for p in os.listdir(tmp_path) if p != "r.json") == [
        "llm-64m-h512-l1-infer.mlpackage",
        "llm-64m-h512-l1-prefill.mlpackage",
    ]
