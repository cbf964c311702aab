"""bench/make_experiments.py: tiny experiment packages, their plan, and the Mac command."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shlex
import sys

import pytest

import checks
from milsurgery.memory import memory_model
from milsurgery.package import Package

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import load_memory  # noqa: E402
import make_experiments as mx  # noqa: E402

MIB = 1 << 20
HIDDEN = 64
ARGS = ["--functions", "2,3", "--shared", "0,0.5,1", "--dtype", "fp16,palettized4", "--size-mib", "1",
        "--hidden", str(HIDDEN)]
NAMES = {f"n{n}-s{s}-{d}-1mib-h64" for n in (2, 3) for s in ("000", "050", "100") for d in ("fp16", "palettized4")}


def run_main(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = mx.main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    out = tmp_path_factory.mktemp("experiments") / "exp"
    code, stdout, stderr = run_main(ARGS + ["--out", str(out)])
    assert code == 0, stderr
    with open(out / "plan.json", encoding="utf-8") as f:
        plan_text = f.read()
    return {"out": str(out), "stdout": stdout, "plan": json.loads(plan_text), "plan_text": plan_text}


def entries(made) -> list[dict]:
    return made["plan"]["packages"]


def at(made, rel: str) -> str:
    return os.path.join(made["out"], *rel.split("/"))


def blob_keys(pkg: Package, function: str) -> dict[tuple[str, int], int]:
    """(file, record offset) -> data bytes, of every blob a function references."""
    return {(r.ref.file_name, r.blob.record_offset): r.blob.size for r in pkg.function_refs(function)}


def test_every_combination_is_a_package_with_its_functions(made):
    assert {e["name"] for e in entries(made)} == NAMES
    for e in entries(made):
        with Package(at(made, e["path"])) as pkg:
            assert pkg.functions == [f"f{i}" for i in range(e["n_functions"])] == e["functions"]
            assert pkg.default_function == "f0"
            for i, f in enumerate(pkg.functions):  # f0 takes --seq positions, fI --seq << I
                assert list(pkg.descriptions[f].input[0].type.multiArrayType.shape) == [1, 8 << i, HIDDEN]
            assert e["seq_lens"] == {f"f{i}": 8 << i for i in range(e["n_functions"])}


def test_shared_fraction_is_what_the_memory_model_sees(made):
    for e in entries(made):
        path = at(made, e["path"])
        with Package(path) as pkg:
            keys = [blob_keys(pkg, f) for f in e["functions"]]
        total = sum(keys[0].values())
        common = set(keys[0]).intersection(*keys[1:])
        shared = sum(keys[0][k] for k in common)
        layers, shared_layers = e["layers"], e["shared_layers"]
        assert shared_layers == int(layers * e["shared_fraction"] + 0.5)
        assert shared * layers == total * shared_layers  # exactly the fraction of layers shared
        assert all(sum(k.values()) == total for k in keys)
        # about --size-mib per function, counting each blob's 64-byte record
        assert abs(total + 64 * len(keys[0]) - MIB) < 0.01 * MIB
        model = memory_model(path, duplicates=False)
        for f in model["functions"][1:]:
            assert f["referenced_bytes"] == total
            assert f["added_bytes"] == total - shared  # only the unshared layers come in
        if e["shared_fraction"] == 0:
            assert shared == 0
        if e["shared_fraction"] == 1:
            assert shared == total and model["functions"][-1]["shared_mapping_bytes"] == total
        n = e["n_functions"]
        predicted = e["predicted"]
        assert predicted["page_size"] == 16384
        assert predicted["per_function_copy_bytes"] == n * total
        assert predicted["shared_mapping_bytes"] == total + (n - 1) * (total - shared)
        assert predicted["functions"][-1]["shared_mapping_page_bytes"] == predicted["shared_mapping_page_bytes"]


def test_plan_json_describes_every_package_relative_to_out(made):
    plan = made["plan"]
    assert plan["schema"] == 1 and plan["generator"] == "bench/make_experiments.py"
    assert plan["settings"] == {"functions": [2, 3], "shared": [0.0, 0.5, 1.0], "dtype": ["fp16", "palettized4"],
                                "size_mib": [1.0], "hidden": HIDDEN, "seq": 8, "seed": 0}
    assert made["out"] not in made["plan_text"]  # nothing absolute: the directory can be moved to a Mac
    for e in entries(made):
        n, frac, dtype = e["n_functions"], e["shared_fraction"], e["dtype"]
        assert e["name"] == f"n{n}-s{round(frac * 100):03d}-{dtype}-1mib-h64"
        assert e["path"] == e["name"] + ".mlpackage" and e["size_mib"] == 1.0 and e["hidden"] == HIDDEN
        assert e["separate"] == {f"f{i}": f"{e['name']}.separate/f{i}.mlpackage" for i in range(n)}
        for rel in [e["path"], *e["separate"].values()]:
            assert not os.path.isabs(rel) and ".." not in rel.split("/")
            assert os.path.isdir(at(made, rel))
    layers = {e["dtype"]: e["layers"] for e in entries(made)}
    # each layer: its blobs' data plus a 64-byte record per blob
    assert layers == {"fp16": round(MIB / (HIDDEN * HIDDEN * 2 + 2 * HIDDEN + 2 * 64)),
                      "palettized4": round(MIB / (HIDDEN * HIDDEN // 2 + 32 + 2 * HIDDEN + 3 * 64))}


def test_separate_packages_are_single_function_with_the_same_bytes(made):
    for e in entries(made):
        with Package(at(made, e["path"])) as merged:
            separate_total = 0
            for f, rel in e["separate"].items():
                with Package(at(made, rel)) as sep:
                    assert sep.functions == ["main"] and not sep.model.description.functions
                    assert list(sep.descriptions["main"].input) == list(merged.descriptions[f].input)
                    assert list(sep.descriptions["main"].output) == list(merged.descriptions[f].output)
                    ours, theirs = merged.function_refs(f), sep.function_refs("main")
                    assert [r.ref.location for r in theirs] == [r.ref.location for r in ours]
                    for a, b in zip(ours, theirs):
                        assert bytes(a.file.view(a.blob)) == bytes(b.file.view(b.blob)), a.ref.describe()
                    # one record per distinct content: the function's bytes, identical blobs once
                    distinct = {bytes(r.file.view(r.blob)) for r in ours}
                    referenced = sum(blob_keys(sep, "main").values())
                    assert referenced == sum(len(d) for d in distinct)
                    separate_total += referenced
            assert e["predicted"]["separate_bytes"] == separate_total


def test_printed_mac_command_measures_the_whole_plan(made):
    lines = [line for line in made["stdout"].splitlines() if "load_memory.py" in line]
    assert len(lines) == 1 and "plan.json" in lines[0]
    words = shlex.split(lines[0])
    assert words[:2] == ["python3", "bench/load_memory.py"]
    assert words[2] == os.path.join(made["out"], "plan.json")
    assert "macOS 15+" in made["stdout"]
    args = load_memory.parse_args(words[2:] + ["--plan-only"])
    plan = load_memory.build_plan(args)
    assert len(plan) == len(NAMES) * 3 * 2 * 2  # packages x default compute units x (merged, separate) x (cold, warm)
    first = plan[:4]
    assert [(c["mode"], c["phase"]) for c in first] == [
        ("merged", "cold"), ("merged", "warm"), ("separate", "cold"), ("separate", "warm")]
    first = [first[0], first[2]]
    assert [ld["path"] for ld in first[1]["loads"]] == [
        at(made, f"{os.path.basename(first[0]['package'])[:-len('.mlpackage')]}.separate/f{i}.mlpackage")
        for i in range(len(first[0]["functions"]))]


def test_dry_run_prints_the_plan_and_writes_nothing(made, tmp_path):
    out = tmp_path / "dry"
    code, stdout, _ = run_main(ARGS + ["--out", str(out), "--dry-run"])
    assert code == 0
    assert not out.exists()
    plan = json.loads(stdout)
    assert all(e["predicted"] is None for e in plan["packages"])
    strip = lambda es: [{k: v for k, v in e.items() if k != "predicted"} for e in es]  # noqa: E731
    assert strip(plan["packages"]) == strip(entries(made))  # same packages, same layer counts


@pytest.mark.parametrize("bad", [["--shared", "1.5"], ["--dtype", "int8"], ["--functions", "0"], ["--size-mib", "-1"]])
def test_bad_arguments_exit_2(bad, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        mx.parse_args(["--out", str(tmp_path)] + bad)
    assert exc.value.code == 2
    assert bad[1] in capsys.readouterr().err


def test_existing_packages_need_force(tmp_path):
    argv = ["--functions", "2", "--shared", "0.5", "--size-mib", "0.05", "--hidden", "32", "--out", str(tmp_path)]
    assert run_main(argv)[0] == 0
    before = (tmp_path / "plan.json").read_text()
    code, _, stderr = run_main(argv)
    assert code == 2 and "already exists" in stderr
    assert (tmp_path / "plan.json").read_text() == before
    assert run_main(argv + ["--force"])[0] == 0
    assert json.loads((tmp_path / "plan.json").read_text())["packages"][0]["name"] == "n2-s050-fp16-0.05mib-h32"


def test_separate_packages_are_different_programs_even_when_everything_is_shared(made):
    """At --shared 1 every function uses the same weights; only the sequence lengths tell the
    functions apart, so that a content-keyed cache cannot serve one separate package for another."""
    from checks import ct_spec

    for e in entries(made):
        if e["shared_fraction"] != 1:
            continue
        specs = [ct_spec(at(made, rel)) for rel in e["separate"].values()]
        shapes = [list(s.description.input[0].type.multiArrayType.shape) for s in specs]  # coremltools' reader
        assert shapes == [[1, 8 << i, HIDDEN] for i in range(e["n_functions"])]
        programs = [s.mlProgram.SerializeToString(deterministic=True) for s in specs]
        assert len(set(programs)) == len(programs)


@pytest.mark.parametrize("bad, message", [
    (["--shared", "0.501,0.504"], "--shared 0.501 and 0.504 give the same package name n2-s050-fp16-64mib-h1024"),
    (["--size-mib", "64,64.0000001"], "--size-mib 64.0 and 64.0000001 give the same package name"),
    (["--functions", "20"], "exceeds 65536"),
])
def test_values_giving_one_name_are_a_usage_error(bad, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        mx.parse_args(["--out", str(tmp_path)] + bad)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(not checks.have_coreml_validate(),
                    reason="Apple's validator is not at ../shared/tools/coreml-validate (see its README)")
def test_every_package_written_passes_apples_validator(made):
    for e in entries(made):
        for rel in [e["path"], *e["separate"].values()]:
            status, message = checks.coreml_validate(at(made, rel))
            assert (status, message) == (0, "valid"), f"{rel}: {message}"
