"""`milsurgery inspect`, checked against numbers computed independently from the same files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from itertools import combinations

import numpy as np
import pytest

import minipkg
from checks import blob_values_in, ct_functions, ct_spec, read_record
from milsurgery import inspect_package

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def independent_numbers(pkg: str) -> dict:
    """Per function: distinct referenced (file, offset) -> bytes; decoded with coremltools' classes."""
    spec = ct_spec(pkg)
    per_function = {}
    for name in ct_functions(spec):
        refs = {(v.blobFileValue.fileName, v.blobFileValue.offset) for v in blob_values_in(spec.mlProgram.functions[name])}
        per_function[name] = {k: read_record(pkg, *k)[1] for k in refs}
    return per_function


def check_against_independent(pkg: str) -> dict:
    info = inspect_package(pkg)
    expected = independent_numbers(pkg)
    assert [f["name"] for f in info["functions"]] == list(expected)
    for f in info["functions"]:
        assert f["blobs"] == len(expected[f["name"]])
        assert f["bytes"] == sum(expected[f["name"]].values())
    # Only pairs that share something are listed, in function order.
    want = []
    for a, b in combinations(expected, 2):
        common = expected[a].keys() & expected[b].keys()
        if common:
            want.append({"functions": [a, b], "blobs": len(common), "bytes": sum(expected[a][k] for k in common)})
    assert info["shared"] == want
    return info


def test_inspect_crepe(crepe):
    info = check_against_independent(crepe)
    assert info["spec_version"] == 7
    (fn,) = info["functions"]
    assert fn["name"] == "main" and fn["opset"] == ["CoreML6"] and fn["default"]
    assert fn["inputs"][0]["name"] == "frames" and fn["inputs"][0]["dtype"] == "fp32"
    assert fn["op_types"]["const"] == 123 and fn["ops"] == 161
    assert fn["blobs"] == 38
    assert info["weight_files"][0]["by_dtype"] == {"float16": {"blobs": 38, "bytes": fn["bytes"]}}
    assert info["duplicates"] == [] and info["unreferenced"] == []
    assert info["metadata"]["userDefined"]["com.github.apple.coremltools.version"] == "9.0"


@pytest.fixture(scope="module")
def save_multifunction_pair(tmp_path_factory, ):
    """Two functions made by coremltools' save_multifunction from crepe-tiny."""
    import coremltools as ct

    from conftest import CREPE_MISSING, find_crepe

    crepe_path = find_crepe()
    if crepe_path is None:
        pytest.skip(CREPE_MISSING)
    out = str(tmp_path_factory.mktemp("smf") / "pair.mlpackage")
    desc = ct.utils.MultiFunctionDescriptor()
    desc.add_function(crepe_path, "main", "first")
    desc.add_function(crepe_path, "main", "second")
    desc.default_function_name = "second"
    ct.utils.save_multifunction(desc, out)
    return out


def test_inspect_save_multifunction_output(save_multifunction_pair):
    info = check_against_independent(save_multifunction_pair)
    assert info["spec_version"] >= 9
    assert [f["name"] for f in info["functions"]] == ["first", "second"]
    assert info["default_function"] == "second"
    (pair,) = info["shared"]
    assert pair["bytes"] == info["functions"][0]["bytes"] > 0  # the same weights, fully shared


def test_duplicates_and_unreferenced(tmp_path):
    w = np.arange(12, dtype=np.float16)
    path = minipkg.make(
        tmp_path / "p.mlpackage",
        {"a": [("float16", w), ("float16", -np.zeros(4, np.float16))], "b": [("float16", w.copy()), ("float16", np.zeros(4, np.float16))]},
        extra_blobs=[("float32", [1.0, 2.0, 3.0])],
    )
    info = check_against_independent(path)
    # Same bytes at two offsets: one duplicate group. -0.0 and 0.0 differ in bits: not duplicates.
    assert len(info["duplicates"]) == 1
    (group,) = info["duplicates"]
    assert group["dtype"] == "float16" and group["bytes"] == 24 and len(group["copies"]) == 2
    assert info["duplicate_bytes"] == 24
    assert info["shared"] == []  # a and b reference no common record
    assert [(u["dtype"], u["bytes"]) for u in info["unreferenced"]] == [("float32", 12)]
    assert inspect_package(path, duplicates=False)["duplicates"] is None


def test_cli_json_and_text(crepe):
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-m", "milsurgery", "inspect", crepe, "--json"], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["schema"] == 2 and info["functions"][0]["name"] == "main"
    text = subprocess.run([sys.executable, "-m", "milsurgery", "inspect", crepe], capture_output=True, text=True, env=env)
    assert "function 'main' (default): opset CoreML6, 161 ops, 38 blobs" in text.stdout


def test_cli_error_is_one_line(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-m", "milsurgery", "inspect", str(tmp_path / "missing.mlpackage")], capture_output=True, text=True, env=env)
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("milsurgery: error: ")
    assert "missing.mlpackage" in out.stderr and "Traceback" not in out.stderr
