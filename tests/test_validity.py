"""Every package milsurgery writes passes Core ML's validation (issue: multi-function packages
used to keep model-level I/O, which Apple's validator refuses).

Each output is given to Apple's validator (``coreml-validate``, skipped when absent) and to
``check``; the conftest fixture also compares the two on every package any test writes.
"""

from __future__ import annotations

import os
import shutil

import ct_models
import pytest
from checks import coreml_validate, ct_spec, have_coreml_validate, spec_path
from conftest import tree_digest

from milsurgery import InvalidModelError, append, check, extract, inspect_package, merge, remove, rename, shrink, verify
from milsurgery.cli import main
from milsurgery.synth import build_llm_like

MODEL_LEVEL = ("input", "output", "state", "trainingInput")
TOP_LEVEL_INPUT = "Multi-function model must not use top level input feature description."


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    d = tmp_path_factory.mktemp("validity-src")
    p = lambda name: str(d / f"{name}.mlpackage")  # noqa: E731
    small = dict(vocab=32, hidden=16, layers=1)
    out = {
        "infer": ct_models.llm_like(p("infer"), seq_len=1, seed=0, **small),
        "prefill": ct_models.llm_like(p("prefill"), seq_len=4, seed=0, **small),
        "stateful": ct_models.stateful(p("stateful"), seed=0, hidden=16),
    }
    out["smf"] = ct_models.multifunction(p("smf"), {"infer": (out["infer"], "main"), "prefill": (out["prefill"], "main")})
    return out


def assert_valid(pkg: str, *, multi: bool | None = None) -> None:
    report = check(pkg)
    assert report.valid, report.violations
    if have_coreml_validate():
        assert coreml_validate(pkg) == (0, "valid")
    if multi is not None:
        d = ct_spec(pkg).description
        assert bool(d.functions) == multi
        if multi:
            assert not any(len(getattr(d, f)) for f in MODEL_LEVEL)
            assert not d.predictedFeatureName and not d.predictedProbabilitiesName
        else:
            assert d.input and d.output


def with_model_level_io(pkg: str) -> str:
    """Make ``pkg`` (multi-function) look written by an earlier milsurgery: the default
    function's I/O also at model level. Edited with coremltools' classes."""
    spec = ct_spec(pkg)
    default = next(f for f in spec.description.functions if f.name == spec.description.defaultFunctionName)
    spec.description.input.extend(default.input)
    spec.description.output.extend(default.output)
    spec.description.state.extend(default.state)
    with open(spec_path(pkg), "wb") as f:
        f.write(spec.SerializeToString())
    return pkg


def test_every_writer_writes_valid_packages(src, tmp_path):
    o = lambda name: str(tmp_path / f"{name}.mlpackage")  # noqa: E731
    merged = o("merged")
    merge([f"{src['infer']}:main=infer", f"{src['prefill']}:main=prefill", f"{src['stateful']}:main=step"], merged)
    assert_valid(merged, multi=True)
    extract(merged, ["prefill"], o("one"))
    assert_valid(o("one"), multi=True)
    extract(merged, ["step"], o("single"), single=True)
    assert_valid(o("single"), multi=False)
    assert list(ct_spec(o("single")).description.state) == list(ct_spec(src["stateful"]).description.state)
    extract(merged, ["infer", "step=decode"], o("two"), default="decode")
    assert_valid(o("two"), multi=True)
    remove(merged, ["infer"], o("removed"), default="prefill")
    assert_valid(o("removed"), multi=True)
    rename(merged, ["infer=decode"], o("renamed"))
    assert_valid(o("renamed"), multi=True)
    shrink(merged, o("shrunk"))
    assert_valid(o("shrunk"), multi=True)
    shrink(src["infer"], o("shrunk-single"))
    assert_valid(o("shrunk-single"), multi=False)
    shutil.copytree(src["infer"], o("grown"))
    append(o("grown"), [f"{src['prefill']}:main=prefill"])  # single-function becomes multi-function
    assert_valid(o("grown"), multi=True)
    append(o("grown"), [f"{src['stateful']}:main=step"])
    assert_valid(o("grown"), multi=True)
    build_llm_like(o("synth-single"), seq_lens=2, hidden=16, layers=1)
    assert_valid(o("synth-single"), multi=False)
    build_llm_like(o("synth-multi"), seq_lens={"a": 1, "b": 2}, hidden=16, layers=1)
    assert_valid(o("synth-multi"), multi=True)


def test_demo_output_is_valid(tmp_path, capsys):
    from milsurgery.demo import main as demo

    assert demo(["--keep", str(tmp_path)]) == 0
    assert_valid(str(tmp_path / "llm.mlpackage"), multi=True)


def test_real_converter_outputs_pass(src, crepe, capsys):
    for pkg in (crepe, src["smf"], src["stateful"]):
        assert main(["check", pkg]) == 0, capsys.readouterr()
        if have_coreml_validate():
            assert coreml_validate(pkg) == (0, "valid")


def test_package_with_model_level_io_fails_check_and_shrink_repairs_it(src, tmp_path, capsys):
    old = str(tmp_path / "old.mlpackage")
    merge([f"{src['infer']}:main=infer", f"{src['prefill']}:main=prefill"], old)
    with_model_level_io(old)
    assert main(["check", old]) == 1
    assert TOP_LEVEL_INPUT in capsys.readouterr().out
    if have_coreml_validate():
        assert coreml_validate(old) == (1, TOP_LEVEL_INPUT)
    info = inspect_package(old, duplicates=False)
    assert [v["message"] for v in info["violations"]][:2] == [
        TOP_LEVEL_INPUT, "Multi-function model must not use top level output feature description."
    ]
    assert main(["inspect", "--no-duplicates", old]) == 0
    assert "NOT VALID for Core ML" in capsys.readouterr().out
    fixed = str(tmp_path / "fixed.mlpackage")
    before = tree_digest(old)
    assert main(["shrink", old, "-o", fixed, "--quiet"]) == 0
    assert tree_digest(old) == before  # the source is not touched
    assert_valid(fixed, multi=True)
    assert inspect_package(fixed, duplicates=False)["violations"] == []
    assert verify(fixed, [f"{src['infer']}:main=infer", f"{src['prefill']}:main=prefill"]).equivalent
    shrink(old, in_place=True)
    assert_valid(old, multi=True)


def test_append_repairs_model_level_io(src, tmp_path):
    pkg = str(tmp_path / "old.mlpackage")
    merge([f"{src['infer']}:main=infer"], pkg)
    with_model_level_io(pkg)
    append(pkg, [f"{src['prefill']}:main=prefill"])
    assert_valid(pkg, multi=True)


def _updatable(src_pkg: str, dst: str) -> str:
    """A copy of ``src_pkg`` marked isUpdatable (Core ML refuses that for ML programs)."""
    shutil.copytree(src_pkg, dst)
    spec = ct_spec(dst)
    spec.isUpdatable = True
    with open(spec_path(dst), "wb") as f:
        f.write(spec.SerializeToString())
    return dst


def test_writers_refuse_to_publish_invalid_packages(src, tmp_path, capsys):
    bad = _updatable(src["infer"], str(tmp_path / "bad.mlpackage"))
    out = str(tmp_path / "out.mlpackage")
    with pytest.raises(InvalidModelError, match="This model type is not supported for on-device update"):
        merge([f"{bad}:main=a", f"{src['prefill']}:main=b"], out)
    assert not os.path.exists(out)
    assert os.listdir(tmp_path) == ["bad.mlpackage"] or sorted(os.listdir(tmp_path)) == ["bad.mlpackage"]
    # --force: the package that would have been replaced survives
    shutil.copytree(src["smf"], out)
    before = tree_digest(out)
    assert main(["merge", "--force", "-o", out, f"{bad}:main=a", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("milsurgery: error: ") and "isUpdatable" in err[0]
    assert tree_digest(out) == before
    # append checks the new spec before it replaces the old one; the package stays as it was
    target = _updatable(src["prefill"], str(tmp_path / "target.mlpackage"))
    before = tree_digest(target)
    with pytest.raises(InvalidModelError):
        append(target, [f"{src['infer']}:main=infer"])
    assert tree_digest(target) == before


# -- verify: everything outside the graphs that changes what Core ML loads -------------------------


@pytest.fixture(scope="module")
def merged(src, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("validity-merged") / "merged.mlpackage")
    merge([f"{src['infer']}:main=infer", f"{src['prefill']}:main=prefill"], out)
    return out


def _resaved(pkg: str, change, *, deterministic: bool = False) -> bytes:
    """Apply ``change`` to ``pkg``'s spec parsed with coremltools' classes and save it back
    (``deterministic``: maps written sorted by key, whatever order they had)."""
    spec = ct_spec(pkg)
    change(spec)
    data = spec.SerializeToString(deterministic=deterministic)
    with open(spec_path(pkg), "wb") as f:
        f.write(data)
    return data


def _into_subdirectory(pkg: str, spec) -> None:
    from checks import blob_values_in, weights_dir

    os.makedirs(os.path.join(weights_dir(pkg), "sub"))
    os.rename(os.path.join(weights_dir(pkg), "weight.bin"), os.path.join(weights_dir(pkg), "sub", "weight.bin"))
    for v in blob_values_in(spec):
        v.blobFileValue.fileName = "@model_path/weights/sub/weight.bin"


def _attribute_with_blob(spec) -> None:
    from checks import blob_values_in

    spec.mlProgram.attributes["extra"].CopyFrom(blob_values_in(spec.mlProgram.functions["infer"])[0])


MUTATIONS = [
    ("model-level-input", lambda pkg, s: s.description.input.extend(s.description.functions[0].input), "model-level description input"),
    ("model-level-output", lambda pkg, s: s.description.output.extend(s.description.functions[0].output), "model-level description output"),
    ("spec-version", lambda pkg, s: setattr(s, "specificationVersion", 10), "specification version is 10, expected 9"),
    ("updatable", lambda pkg, s: setattr(s, "isUpdatable", True), "isUpdatable is True"),
    ("program-version", lambda pkg, s: setattr(s.mlProgram, "version", 2), "program version is 2"),
    ("default-function", lambda pkg, s: setattr(s.description, "defaultFunctionName", "prefill"), "default function is 'prefill', expected 'infer'"),
    ("attribute-blob", lambda pkg, s: _attribute_with_blob(s), "program attribute 'extra' holds blobs but no source has"),
    ("weights-subdirectory", _into_subdirectory, "is in a subdirectory of weights/"),
]


@pytest.mark.parametrize("name,change,message", MUTATIONS, ids=[m[0] for m in MUTATIONS])
def test_verify_names_each_mutated_field(src, merged, tmp_path, capsys, name, change, message):
    pkg = str(tmp_path / "m.mlpackage")
    shutil.copytree(merged, pkg)
    _resaved(pkg, lambda spec: change(pkg, spec))
    assert main(["verify", pkg, "--against", f"{src['infer']}:main=infer", f"{src['prefill']}:main=prefill"]) == 1
    out = capsys.readouterr().out
    assert message in out, out


def test_verify_default_is_checked_only_for_the_whole_package(src, merged, capsys):
    against = [f"{src['infer']}:main=infer", f"{src['prefill']}:main=prefill"]
    assert main(["verify", merged, "--against", *against, "--default", "prefill"]) == 1
    assert "default function is 'infer', expected 'prefill'" in capsys.readouterr().out
    assert main(["verify", merged, "--against", f"{src['prefill']}:main=prefill"]) == 0


def test_verify_accepts_a_no_op_resave_by_coremltools(src, merged, tmp_path, capsys):
    """Protobuf maps are unordered: coremltools writes them back in its own order."""
    pkg = str(tmp_path / "m.mlpackage")
    shutil.copytree(merged, pkg)
    with open(spec_path(pkg), "rb") as f:
        before = f.read()
    # Sorted maps: the order the protobuf runtime writes maps in otherwise may happen to match.
    after = _resaved(pkg, lambda spec: None, deterministic=True)
    assert after != before  # the re-save did reorder something, so this test shows map order is ignored
    assert main(["verify", pkg, "--against", f"{src['infer']}:main=infer", f"{src['prefill']}:main=prefill"]) == 0, capsys.readouterr()
    assert main(["merge", "-o", str(tmp_path / "again.mlpackage"), f"{pkg}:infer", "--verify", "--quiet"]) == 0


def test_padding_bits_past_the_last_element_are_a_note_not_a_difference(tmp_path, capsys):
    import minipkg
    from checks import blob_values_in, read_record, weights_dir

    a = minipkg.make(tmp_path / "a.mlpackage", {"main": [("uint4", [1, 2, 3])]})  # 3 x 4 bits: 4 padding bits
    out = str(tmp_path / "m.mlpackage")
    merge([f"{a}:main=f"], out)
    (value,) = blob_values_in(ct_spec(out))
    dtype, size, padding, data = read_record(out, value.blobFileValue.fileName, value.blobFileValue.offset)
    assert (dtype, size, padding, data) == (11, 2, 4, bytes([0x21, 0x03]))
    path = os.path.join(weights_dir(out), "weight.bin")
    last = value.blobFileValue.offset + 64 + size - 1

    def poke(byte: int) -> None:
        with open(path, "r+b") as f:
            f.seek(last)
            f.write(bytes([byte]))

    poke(0x53)  # high nibble: padding only, element 2 still 3
    assert main(["verify", out, "--against", f"{a}:main=f"]) == 0
    text = capsys.readouterr().out
    assert "only in 2 padding bit(s) past its last element; the values are equal" in text
    poke(0x04)  # element 2 now 4: a real difference
    assert main(["verify", out, "--against", f"{a}:main=f"]) == 1
    assert "differs from the source's blob" in capsys.readouterr().out
