"""Synthetic packages (milsurgery's own writer) are valid for coremltools, and the demo runs."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from checks import ct_load_program, ct_read_referenced_blobs
from milsurgery import Package
from milsurgery.synth import build_llm_like, layers_for_bytes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("dtype", ["fp16", "palettized4"])
@pytest.mark.parametrize("seq", [8, {"infer": 1, "prefill": 16, "extra": 4}])
def test_synthetic_packages_load_in_coremltools(tmp_path, dtype, seq):
    path = str(tmp_path / "s.mlpackage")
    layout = build_llm_like(path, seq_lens=seq, hidden=32, layers=4, dtype=dtype, shared_fraction=0.5)
    names = ["main"] if isinstance(seq, int) else list(seq)
    with Package(path) as pkg:
        assert pkg.functions == names
        dtypes = {r.blob.dtype.name for r in pkg.refs}
    assert dtypes == ({"float16"} if dtype == "fp16" else {"float16", "uint4"})
    assert set(ct_load_program(path).functions) == set(names)
    assert ct_read_referenced_blobs(path) == len({o for offs in layout.functions.values() for o in offs})


@pytest.mark.parametrize("fraction,shared_layers", [(0.0, 0), (0.5, 2), (1.0, 4)])
def test_shared_fraction_controls_shared_offsets(tmp_path, fraction, shared_layers):
    path = str(tmp_path / "s.mlpackage")
    build_llm_like(path, seq_lens={"a": 1, "b": 2}, hidden=16, layers=4, shared_fraction=fraction)
    with Package(path) as pkg:
        weights = {f: [r.blob.record_offset for r in pkg.function_refs(f) if r.ref.op_name.endswith("_weight")] for f in ("a", "b")}
    same = sum(x == y for x, y in zip(weights["a"], weights["b"]))
    assert same == shared_layers


def test_demo_runs(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    run = subprocess.run([sys.executable, "-m", "milsurgery.demo", "--keep", str(tmp_path)], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    assert "2 functions equivalent to their sources" in run.stdout
    assert "shared by 'infer' and 'prefill': 16 blobs" in run.stdout
    assert os.path.isdir(tmp_path / "llm.mlpackage")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmHWM from /proc")
def test_building_large_packages_keeps_memory_flat(tmp_path):
    """~200 MB of weights are written a tensor at a time: peak RSS stays far below the size."""
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {ROOT!r})
        from milsurgery.synth import build_llm_like, layers_for_bytes
        layers = layers_for_bytes(200 << 20, 2048)
        layout = build_llm_like({str(tmp_path / 'big.mlpackage')!r}, seq_lens=1, hidden=2048, layers=layers)
        print(layout.weight_bytes, [int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')][0])
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    weight_bytes, peak_kib = int(out[0]), int(out[1])
    assert weight_bytes > 190 << 20
    assert peak_kib < 150 * 1024


def test_layers_for_bytes():
    assert layers_for_bytes(2048 * 2048 * 2 * 10, 2048) == 10
    assert layers_for_bytes(1, 64) == 1
