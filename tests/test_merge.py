"""milsurgery merge on coremltools-built fixtures and crepe-tiny, checked independently.

For each merge: coremltools' milproto loader builds every function of the output, its C++ blob
reader reads every referenced blob, every output function equals its source except blob offsets
(compared with coremltools' own protobuf classes and hand-decoded records), no two referenced
records hold the same bytes, and the output weight.bin is no larger than save_multifunction's.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest

import ct_models
from checks import (
    assert_function_equivalent,
    blob_values_in,
    ct_load_program,
    ct_read_referenced_blobs,
    ct_spec,
    read_record,
    weights_dir,
)
from conftest import CREPE_MISSING, find_crepe, tree_digest
from milsurgery import Package, UsageError, merge
from milsurgery.merge import parse_source

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def fx(tmp_path_factory):
    """Every source package, built once."""
    d = tmp_path_factory.mktemp("fixtures")
    p = lambda name: str(d / f"{name}.mlpackage")  # noqa: E731
    out = {
        "infer": ct_models.llm_like(p("infer"), seq_len=1, seed=0),
        "prefill": ct_models.llm_like(p("prefill"), seq_len=64, seed=0),
        "other": ct_models.llm_like(p("other"), seq_len=1, seed=1),
        "stateful": ct_models.stateful(p("stateful"), seed=0),
        "pal_infer": ct_models.palettized(p("pal_infer"), seed=0),
        "pal_prefill": ct_models.palettized(p("pal_prefill"), seed=0, seq_len=64),
    }
    out["multi"] = ct_models.multifunction(p("multi"), {"a": (out["infer"], "main"), "b": (out["other"], "main")})
    if find_crepe() is not None:
        out["crepe"] = find_crepe()
    return out


def weight_bin(pkg: str) -> str:
    return os.path.join(weights_dir(pkg), "weight.bin")


def save_multifunction(out: str, picks: list[tuple[str, str, str]]) -> str:
    import coremltools as ct

    desc = ct.utils.MultiFunctionDescriptor()
    for path, fn, new in picks:
        desc.add_function(path, fn, new)
    desc.default_function_name = picks[0][2]
    ct.utils.save_multifunction(desc, out)
    return out


def assert_no_duplicate_records(pkg: str) -> None:
    spec = ct_spec(pkg)
    seen = {}
    for v in blob_values_in(spec):
        key = (v.blobFileValue.fileName, v.blobFileValue.offset)
        content = read_record(pkg, *key)
        assert seen.setdefault(content, key) == key, f"records {key} and {seen[content]} hold the same bytes"


CASES = {
    "llm infer+prefill": [("infer", "main", "infer"), ("prefill", "main", "prefill")],
    "stateful + llm": [("stateful", "main", "step"), ("infer", "main", "infer")],
    "palettized infer+prefill": [("pal_infer", "main", "infer"), ("pal_prefill", "main", "prefill")],
    "multifunction source + llm": [("multi", "a", "a"), ("multi", "b", "b"), ("prefill", "main", "prefill")],
    "crepe twice": [("crepe", "main", "first"), ("crepe", "main", "second")],
    "crepe + llm": [("crepe", "main", "pitch"), ("infer", "main", "infer")],
}


@pytest.mark.parametrize("case", list(CASES))
def test_merge_matches_sources_and_beats_reference(fx, tmp_path, case):
    picks = CASES[case]
    if any(src not in fx for src, _, _ in picks):
        pytest.skip(CREPE_MISSING)
    sources = [(fx[src], fn, new) for src, fn, new in picks]
    before = {path: tree_digest(path) for path, _, _ in sources}
    out = str(tmp_path / "merged.mlpackage")
    report = merge([f"{path}:{fn}={new}" for path, fn, new in sources], out)
    assert report.functions == [new for _, _, new in sources]
    for path, digest in before.items():
        assert tree_digest(path) == digest, "a source was modified"

    spec = ct_spec(out)
    assert spec.specificationVersion >= 9
    assert [f.name for f in spec.description.functions] == report.functions
    assert spec.description.defaultFunctionName == sources[0][2]
    assert set(ct_load_program(out).functions) == set(report.functions)
    assert ct_read_referenced_blobs(out) == report.blobs_written
    for path, fn, new in sources:
        assert_function_equivalent(out, new, path, fn)
    assert_no_duplicate_records(out)

    reference = save_multifunction(str(tmp_path / "reference.mlpackage"), sources)
    assert os.path.getsize(weight_bin(out)) <= os.path.getsize(weight_bin(reference))


def test_llm_pair_shares_every_weight(fx, tmp_path):
    from milsurgery import inspect_package

    out = str(tmp_path / "m.mlpackage")
    merge([f"{fx['infer']}:main=infer", f"{fx['prefill']}:main=prefill"], out)
    info = inspect_package(out)
    infer, prefill = info["functions"]
    assert info["shared"][0]["bytes"] == infer["bytes"] == prefill["bytes"]
    assert os.path.getsize(weight_bin(out)) == os.path.getsize(weight_bin(fx["infer"]))


def test_descriptions_and_states_move_into_function_descriptions(fx, tmp_path):
    out = str(tmp_path / "m.mlpackage")
    merge([f"{fx['stateful']}:main=step", fx["infer"]], out)
    spec, src = ct_spec(out), ct_spec(fx["stateful"])
    step = spec.description.functions[0]
    assert step.name == "step" and len(step.state) == len(src.description.state) > 0
    assert list(step.input) == list(src.description.input)
    assert list(step.output) == list(src.description.output)
    # A multi-function model has no model-level I/O (Apple's validator refuses it).
    d = spec.description
    assert not d.input and not d.output and not d.state and not d.trainingInput
    assert not d.predictedFeatureName and not d.predictedProbabilitiesName


def test_metadata_and_build_info_are_kept(tmp_path):
    a = ct_models.llm_like(str(tmp_path / "a.mlpackage"), seq_len=1, seed=0,
                           metadata={"author": "A", "license": "MIT", "user_defined": {"k": "first", "only_a": "1"}})
    b = ct_models.llm_like(str(tmp_path / "b.mlpackage"), seq_len=64, seed=0,
                           metadata={"author": "B", "user_defined": {"k": "second", "only_b": "2"}})
    out = str(tmp_path / "m.mlpackage")
    report = merge([f"{a}:main=infer", f"{b}:main=prefill"], out)
    meta = ct_spec(out).description.metadata
    assert meta.author == "A" and meta.license == "MIT"
    assert dict(meta.userDefined) | {} == {**dict(ct_spec(b).description.metadata.userDefined), **dict(ct_spec(a).description.metadata.userDefined)}
    assert meta.userDefined["k"] == "first" and meta.userDefined["only_b"] == "2"
    assert any("userDefined['k']" in w and "second" in w for w in report.warnings)
    assert any(w.startswith("metadata author: kept 'A'") and "'B'" in w and b in w for w in report.warnings)
    assert not any("license" in w for w in report.warnings)  # only a has one: nothing dropped
    assert not any("buildInfo" in w for w in report.warnings)  # same converter: same value
    assert ct_spec(out).mlProgram.attributes["buildInfo"] == ct_spec(a).mlProgram.attributes["buildInfo"]


def test_name_clash_names_both_sources(fx, tmp_path):
    with pytest.raises(UsageError, match=r"two functions would be named 'main'.*infer.*prefill"):
        merge([fx["infer"], fx["prefill"]], tmp_path / "m.mlpackage")
    assert os.listdir(tmp_path) == []


def test_same_source_opened_once(fx, tmp_path, monkeypatch):
    import importlib

    m = importlib.import_module("milsurgery.sources")  # where merge's sources are opened
    opened = []
    real = m.open_model

    def counting(path):
        opened.append(path)
        return real(path)

    monkeypatch.setattr(m, "open_model", counting)
    merge([f"{fx['multi']}:a", f"{fx['multi']}:b=bee", f"{fx['multi']}:a=again"], tmp_path / "m.mlpackage", default="bee")
    assert len(opened) == 1
    with Package(tmp_path / "m.mlpackage") as pkg:
        assert pkg.functions == ["a", "bee", "again"] and pkg.default_function == "bee"


def test_bad_default_and_existing_destination(fx, tmp_path):
    with pytest.raises(UsageError, match="default function 'nope'"):
        merge([fx["infer"]], tmp_path / "m.mlpackage", default="nope")
    merge([fx["infer"]], tmp_path / "m.mlpackage")
    from milsurgery import DestinationExistsError

    with pytest.raises(DestinationExistsError):
        merge([fx["prefill"]], tmp_path / "m.mlpackage")
    merge([fx["prefill"]], tmp_path / "m.mlpackage", force=True)
    assert ct_spec(str(tmp_path / "m.mlpackage")).description.functions[0].input[0].type.multiArrayType.shape[-1] == 64


def test_parse_source():
    assert parse_source("a.mlpackage") .function is None
    s = parse_source("a.mlpackage:main=infer")
    assert (s.path, s.function, s.new_name) == ("a.mlpackage", "main", "infer")
    with pytest.raises(UsageError):
        parse_source("a.mlpackage:main=")


def test_cli_merge_and_verify(fx, tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = str(tmp_path / "m.mlpackage")
    run = subprocess.run([sys.executable, "-m", "milsurgery", "merge", f"{fx['infer']}:main=infer",
                          f"{fx['prefill']}:main=prefill", "-o", out, "--verify"], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    assert "functions infer, prefill" in run.stdout and run.stderr == ""  # no progress bar off a TTY
    run = subprocess.run([sys.executable, "-m", "milsurgery", "merge", fx["infer"], fx["prefill"], "-o", str(tmp_path / "x.mlpackage")],
                         capture_output=True, text=True, env=env)
    assert run.returncode == 2 and run.stderr.startswith("milsurgery: error: two functions") and run.stderr.count("\n") == 1


def test_progress_bar_only_on_a_tty(monkeypatch):
    from milsurgery.cli import ProgressBar

    class Tty(io.StringIO):
        def isatty(self):
            return True

    for tty, expect in ((True, True), (False, False)):
        stream = Tty() if tty else io.StringIO()
        monkeypatch.setattr(sys, "stderr", stream)
        bar = ProgressBar(enabled=True)
        bar("copying", 50, 100)
        assert ("50.0%" in stream.getvalue()) is expect
    stream = Tty()
    monkeypatch.setattr(sys, "stderr", stream)
    quiet = ProgressBar(enabled=False)
    quiet("copying", 50, 100)
    assert stream.getvalue() == ""


def test_fixture_specs_roundtrip_byte_identical(fx, tmp_path):
    """Specs written by coremltools (every fixture, save_multifunction's too) and by milsurgery
    parse and serialize back to the same bytes with milsurgery's schema."""
    from checks import spec_path
    from milsurgery.spec import pb

    out = str(tmp_path / "m.mlpackage")
    merge([f"{fx['stateful']}:main=step", f"{fx['pal_infer']}:main=pal", fx["multi"]], out)
    paths = [*fx.values(), out]
    for path in paths:
        data = open(spec_path(path), "rb").read()
        assert pb.Model.FromString(data).SerializeToString() == data, path
    assert len(paths) >= 8


def test_manifest_items_not_carried_over_are_reported(tmp_path):
    """An item of a source's Manifest.json besides the spec and the weights (here a notes file)
    is not written to the output, and the report says so, naming the source and the item."""
    import json

    import numpy as np

    import minipkg

    w = np.arange(16, dtype=np.float16).reshape(4, 4)
    a = minipkg.make(tmp_path / "a.mlpackage", {"main": [("float16", w)]})
    b = minipkg.make(tmp_path / "b.mlpackage", {"main": [("float16", w + 1)]})
    with open(os.path.join(b, "Data", "com.apple.CoreML", "notes.txt"), "w") as f:
        f.write("calibration notes")
    manifest_path = os.path.join(b, "Manifest.json")
    manifest = json.load(open(manifest_path))
    manifest["itemInfoEntries"]["NOTES"] = {"author": "someone", "description": "notes", "name": "notes.txt",
                                            "path": "com.apple.CoreML/notes.txt"}
    with open(manifest_path, "w") as f:
        json.dump(manifest, f)
    assert Package(a).other_items() == [] and Package(b).other_items() == ["com.apple.CoreML/notes.txt"]
    out = str(tmp_path / "m.mlpackage")
    report = merge([f"{a}:main=x", f"{b}:main=y"], out)
    assert report.warnings == [
        f"{b}: manifest item 'com.apple.CoreML/notes.txt' is not carried over (the output holds the spec and the weights only)"
    ]
    assert not os.path.exists(os.path.join(out, "Data", "com.apple.CoreML", "notes.txt"))
