"""The measured residency (bench/residency.py) agrees with the memory model within 5%."""

from __future__ import annotations

import mmap
import os
import subprocess
import sys

import pytest

from milsurgery.synth import build_llm_like

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

pytestmark = pytest.mark.skipif(
    not (sys.platform.startswith("linux") and hasattr(os, "posix_fadvise") and hasattr(mmap, "MADV_RANDOM")),
    reason="residency measurement needs Linux mincore/posix_fadvise/madvise",
)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Two functions of ~32 MiB each; 12 of 16 layers shared (same records)."""
    path = str(tmp_path_factory.mktemp("res") / "pair.mlpackage")
    build_llm_like(path, seq_lens={"infer": 1, "prefill": 64}, hidden=1024, layers=16, shared_fraction=0.75)
    return path


def test_second_function_adds_only_its_unshared_bytes(pair):
    import residency

    result = residency.measure(pair)
    first, second = result["functions"]
    layer = 1024 * 1024 * 2
    assert first["resident_bytes"] >= 16 * layer
    # the 4 unshared layers (plus their page-rounded biases), not the whole function again
    assert 4 * layer <= second["resident_added_bytes"] <= 4 * layer + 16 * 4096
    for row in result["functions"]:
        assert row["relative_error"] <= 0.05, row
    assert second["per_function_copy_bytes"] > 1.5 * second["resident_bytes"]


def test_cli_reports_agreement(pair, tmp_path):
    out = tmp_path / "r.json"
    run = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "residency.py"), pair, "--order", "prefill,infer",
                          "--json", str(out)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "| prefill |" in run.stdout and "largest model-vs-measurement error" in run.stdout
    assert out.exists()
