"""shrink, extract, remove, rename, append and verify on hand-built packages and crepe-tiny."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import minipkg
from checks import all_records, assert_function_equivalent, ct_load_program, ct_read_referenced_blobs, ct_spec, weights_dir
from conftest import tree_digest
from milsurgery import Package, UsageError, merge
from milsurgery.surgery import append, extract, remove, rename, shrink
from milsurgery.verify import verify

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RNG = np.random.default_rng(3)


def weight_bin(pkg) -> str:
    return os.path.join(weights_dir(str(pkg)), "weight.bin")


def referenced_records_unique(pkg) -> None:
    """No two records referenced by the spec hold the same dtype and bytes (independent check)."""
    from checks import blob_values_in, read_record

    spec = ct_spec(str(pkg))
    seen = {}
    for v in blob_values_in(spec):
        key = (v.blobFileValue.fileName, v.blobFileValue.offset)
        content = read_record(str(pkg), *key)
        assert seen.setdefault(content, key) == key, f"{key} duplicates {seen[content]}"


@pytest.fixture
def dup_pkg(tmp_path):
    """Two functions; the same tensor stored three times, a mask repeated, and a dead blob."""
    emb = RNG.standard_normal((16, 8)).astype(np.float16)
    mask = np.triu(np.ones((4, 4), np.float16))
    return minipkg.make(
        tmp_path / "dup.mlpackage",
        {
            "infer": [("float16", emb), ("float16", mask), ("float16", mask.copy()), ("float16", emb.copy())],
            "prefill": [0, ("float16", mask.copy()), ("float16", RNG.standard_normal(8).astype(np.float16))],
        },
        extra_blobs=[("float32", np.arange(100, dtype=np.float32))],
    )


def test_shrink_recovers_duplicates_and_dead_blobs(dup_pkg, tmp_path):
    before = tree_digest(dup_pkg)
    out = tmp_path / "small.mlpackage"
    report = shrink(dup_pkg, out)
    assert tree_digest(dup_pkg) == before
    records = all_records(weight_bin(out))
    assert len(records) == 3  # emb, mask, the prefill-only vector
    assert report.blobs_coalesced == 3 and report.bytes_coalesced == 256 + 2 * 32
    assert os.path.getsize(weight_bin(dup_pkg)) - os.path.getsize(weight_bin(out)) > 256 + 64 + 400
    referenced_records_unique(out)
    for f in ("infer", "prefill"):
        assert_function_equivalent(str(out), f, dup_pkg, f)
    assert verify(out, [dup_pkg]).equivalent
    ct_read_referenced_blobs(str(out))


def test_shrink_in_place(dup_pkg):
    spec_before = open(os.path.join(dup_pkg, "Data/com.apple.CoreML/model.mlmodel"), "rb").read()
    size_before = os.path.getsize(weight_bin(dup_pkg))
    report = shrink(dup_pkg, in_place=True)
    assert report.output == os.path.abspath(dup_pkg)
    assert os.path.getsize(weight_bin(dup_pkg)) < size_before
    with Package(dup_pkg) as pkg:
        assert pkg.functions == ["infer", "prefill"]
        assert pkg.blob_files["@model_path/weights/weight.bin"].count == 3
    parent = os.path.dirname(dup_pkg)
    assert os.listdir(parent) == ["dup.mlpackage"]
    assert open(os.path.join(dup_pkg, "Data/com.apple.CoreML/model.mlmodel"), "rb").read() != spec_before


def test_shrink_keeps_a_single_function_model_single(crepe, tmp_path):
    out = tmp_path / "c.mlpackage"
    shrink(crepe, out)
    spec = ct_spec(str(out))
    assert spec.specificationVersion == 7 and not spec.description.functions
    assert open(weight_bin(out), "rb").read() == open(weight_bin(crepe), "rb").read()
    assert_function_equivalent(str(out), "main", crepe, "main")
    assert list(ct_load_program(str(out)).functions) == ["main"]


def test_shrink_needs_exactly_one_destination(dup_pkg, tmp_path):
    with pytest.raises(UsageError):
        shrink(dup_pkg)
    with pytest.raises(UsageError):
        shrink(dup_pkg, tmp_path / "x.mlpackage", in_place=True)


@pytest.fixture
def merged_crepe(crepe, tmp_path):
    out = tmp_path / "two.mlpackage"
    merge([f"{crepe}:main=infer", f"{crepe}:main=prefill"], out)
    return str(out)


def test_extract_single_gives_an_ordinary_model(merged_crepe, crepe, tmp_path):
    out = tmp_path / "one.mlpackage"
    extract(merged_crepe, ["prefill"], out, single=True)
    spec = ct_spec(str(out))
    assert not spec.description.functions and spec.specificationVersion == 7  # opset CoreML6
    assert [i.name for i in spec.description.input] == ["frames"]
    assert_function_equivalent(str(out), "main", crepe, "main")
    assert list(ct_load_program(str(out)).functions) == ["main"]
    ct_read_referenced_blobs(str(out))


def test_extract_subset_and_rename(tmp_path, dup_pkg):
    out = tmp_path / "x.mlpackage"
    extract(dup_pkg, ["prefill=decode"], out)
    with Package(out) as pkg:
        assert pkg.functions == ["decode"] and pkg.default_function == "decode"
        assert pkg.blob_files["@model_path/weights/weight.bin"].count == 3  # only prefill's blobs
    assert_function_equivalent(str(out), "decode", dup_pkg, "prefill")
    with pytest.raises(UsageError, match="one function"):
        extract(dup_pkg, ["infer", "prefill"], tmp_path / "y.mlpackage", single=True)


def test_remove_and_rename_follow_the_default(tmp_path, dup_pkg):
    with pytest.raises(UsageError, match="default"):
        remove(dup_pkg, ["infer"], tmp_path / "r.mlpackage")
    assert not os.path.exists(tmp_path / "r.mlpackage")
    remove(dup_pkg, ["infer"], tmp_path / "r.mlpackage", default="prefill")
    with Package(tmp_path / "r.mlpackage") as pkg:
        assert pkg.functions == ["prefill"] and pkg.default_function == "prefill"
    rename(dup_pkg, ["infer=decode"], tmp_path / "n.mlpackage")
    with Package(tmp_path / "n.mlpackage") as pkg:
        assert pkg.functions == ["decode", "prefill"] and pkg.default_function == "decode"
    with pytest.raises(UsageError, match="no function"):
        rename(dup_pkg, ["nope=x"], tmp_path / "m.mlpackage")
    with pytest.raises(UsageError, match="would be named"):
        rename(dup_pkg, ["infer=prefill"], tmp_path / "m.mlpackage")


def test_append_adds_only_new_blobs(crepe_copy, tmp_path, dup_pkg):
    size_before = os.path.getsize(weight_bin(crepe_copy))
    report = append(crepe_copy, [f"{crepe_copy}:main=again"])
    assert report.blobs_written == 0 and os.path.getsize(weight_bin(crepe_copy)) == size_before
    report = append(crepe_copy, [f"{dup_pkg}:prefill"])
    assert report.blobs_written == 3
    with Package(crepe_copy) as pkg:
        assert pkg.functions == ["main", "again", "prefill"] and pkg.default_function == "main"
    assert verify(crepe_copy, [f"{dup_pkg}:prefill", f"{crepe_copy}:main=again"]).equivalent
    assert set(ct_load_program(crepe_copy).functions) == {"main", "again", "prefill"}
    with pytest.raises(UsageError, match="already has a function"):
        append(crepe_copy, [f"{dup_pkg}:prefill"])


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {root!r})
    import milsurgery.surgery as s
    target, source, kill_at = sys.argv[1], sys.argv[2], int(sys.argv[3])
    seen = [0]
    def checkpoint(step):
        seen[0] += 1
        if seen[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    s._checkpoint = checkpoint
    s.append(target, [source])
    print("finished", seen[0])
""")


def test_append_survives_sigkill_after_every_step(crepe, dup_pkg, tmp_path):
    """Kill the append after each durable step; the package is always the old or the new one."""
    import shutil

    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT.format(root=ROOT))
    old = tmp_path / "old.mlpackage"
    shutil.copytree(crepe, old)
    steps = None
    outcomes = set()
    kill_at = 1
    while steps is None or kill_at <= steps + 1:
        target = tmp_path / f"t{kill_at}.mlpackage"
        shutil.copytree(old, target)
        run = subprocess.run([sys.executable, str(script), str(target), f"{dup_pkg}:prefill", str(kill_at)],
                             capture_output=True, text=True)
        if run.returncode == 0:
            steps = int(run.stdout.split()[-1])
        else:
            assert run.returncode == -9, run.stderr
        with Package(target) as pkg:  # opens and validates whatever state it was left in
            functions = tuple(pkg.functions)
        if functions == ("main",):
            assert verify(target, [f"{crepe}:main"]).equivalent
        else:
            assert functions == ("main", "prefill")
            assert verify(target, [f"{crepe}:main", f"{dup_pkg}:prefill"]).equivalent
        outcomes.add(functions)
        kill_at += 1
    assert steps >= 5 and outcomes == {("main",), ("main", "prefill")}


def test_append_survives_sigkill_at_random_moments(tmp_path):
    """20 appends of a 48 MB function killed at varied moments: old or new, never a mix."""
    import shutil
    import time

    big = minipkg.make(tmp_path / "big.mlpackage", {"main": [("float16", RNG.standard_normal(2_000_000).astype(np.float16)) for _ in range(12)]})
    base = minipkg.make(tmp_path / "base.mlpackage", {"main": [("float32", np.arange(10, dtype=np.float32))]})
    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT.format(root=ROOT))
    outcomes = []
    for i in range(20):
        target = tmp_path / f"t{i}.mlpackage"
        shutil.copytree(base, target)
        proc = subprocess.Popen([sys.executable, str(script), str(target), f"{big}:main=big", "0"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.15 + 0.05 * i)
        proc.kill()
        proc.wait()
        with Package(target) as pkg:
            outcomes.append(tuple(pkg.functions))
            if len(pkg.functions) == 2:
                assert verify(target, [f"{base}:main", f"{big}:main=big"]).equivalent
            else:
                assert pkg.functions == ["main"]
        shutil.rmtree(target)
    assert set(outcomes) <= {("main",), ("main", "big")}


def test_verify_reports_a_byte_difference(merged_crepe, crepe, tmp_path):
    import shutil

    bad = tmp_path / "bad.mlpackage"
    shutil.copytree(merged_crepe, bad)
    with open(weight_bin(bad), "r+b") as f:  # flip one byte of the first blob's data
        f.seek(128)
        byte = f.read(1)
        f.seek(128)
        f.write(bytes([byte[0] ^ 1]))
    report = verify(bad, [f"{crepe}:main=infer"])
    assert not report.equivalent
    (diff,) = report.checks[0].differences
    assert "offset 64" in diff and "differs from the source's blob" in diff and "function 'infer'" in diff
    env = dict(os.environ, PYTHONPATH=ROOT)
    run = subprocess.run([sys.executable, "-m", "milsurgery", "verify", str(bad), "--against", f"{crepe}:main=infer"],
                         capture_output=True, text=True, env=env)
    assert run.returncode == 1 and "infer: differs from " in run.stdout
    run = subprocess.run([sys.executable, "-m", "milsurgery", "verify", merged_crepe, "--against", f"{crepe}:main=infer", f"{crepe}:main=prefill"],
                         capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stdout + run.stderr
    run = subprocess.run([sys.executable, "-m", "milsurgery", "verify", str(tmp_path / "nope"), "--against", crepe],
                         capture_output=True, text=True, env=env)
    assert run.returncode == 2


def test_verify_reports_a_graph_difference(tmp_path, dup_pkg):
    from milsurgery.spec import pb

    changed = tmp_path / "changed.mlpackage"
    import shutil

    shutil.copytree(dup_pkg, changed)
    spec_file = os.path.join(changed, "Data/com.apple.CoreML/model.mlmodel")
    model = pb.Model.FromString(open(spec_file, "rb").read())
    op = model.mlProgram.functions[0].value.block_specializations[0].value.operations[1]
    op.attributes.add(key="name").value.docString = "renamed"
    open(spec_file, "wb").write(model.SerializeToString())
    report = verify(changed, [dup_pkg])
    (first, second) = report.checks
    assert not first.equivalent and second.equivalent
    assert "op 'infer_w1' (const): attributes[name] differs" in first.differences[0]


@pytest.fixture(scope="module")
def ct_dup(tmp_path_factory):
    import ct_models

    return ct_models.duplicated_weights(str(tmp_path_factory.mktemp("ctdup") / "dup.mlpackage"))


def test_shrink_coremltools_package_with_duplicates(ct_dup, tmp_path):
    """coremltools with the empty pass pipeline stores a tied embedding and lm_head twice."""
    out = str(tmp_path / "s.mlpackage")
    report = shrink(ct_dup, out)
    assert report.blobs_coalesced >= 1 and report.bytes_coalesced > 0
    assert os.path.getsize(weight_bin(ct_dup)) - os.path.getsize(weight_bin(out)) >= report.bytes_coalesced
    referenced_records_unique(out)
    assert_function_equivalent(out, "main", ct_dup, "main")
    assert set(ct_load_program(out).functions) == {"main"}
    ct_read_referenced_blobs(out)


@pytest.mark.parametrize("command", ["extract", "extract-single", "remove", "rename", "shrink", "append"])
def test_every_command_output_loads_in_coremltools(command, crepe, ct_dup, tmp_path):
    """Outputs of every command on a package mixing crepe-tiny and a coremltools fixture are
    accepted by coremltools' loader and C++ blob reader and verify against their sources."""
    import shutil

    merged = str(tmp_path / "merged.mlpackage")
    merge([f"{crepe}:main=pitch", f"{ct_dup}:main=lm"], merged)
    out = str(tmp_path / "out.mlpackage")
    expect = {"pitch": f"{crepe}:main=pitch", "lm": f"{ct_dup}:main=lm"}
    if command == "extract":
        extract(merged, ["lm=decoder"], out)
        expect = {"decoder": f"{ct_dup}:main=decoder"}
    elif command == "extract-single":
        extract(merged, ["pitch"], out, single=True)
        expect = {"main": f"{crepe}:main"}
    elif command == "remove":
        remove(merged, ["pitch"], out, default="lm")
        expect = {"lm": expect["lm"]}
    elif command == "rename":
        rename(merged, ["pitch=crepe"], out)
        expect = {"crepe": f"{crepe}:main=crepe", "lm": expect["lm"]}
    elif command == "shrink":
        shrink(merged, out)
    else:
        shutil.copytree(merged, out)
        append(out, [f"{crepe}:main=pitch2"])
        expect["pitch2"] = f"{crepe}:main=pitch2"
    assert set(ct_load_program(out).functions) == set(expect)
    ct_read_referenced_blobs(out)
    assert verify(out, list(expect.values())).equivalent
