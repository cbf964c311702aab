"""bench/load_memory.py: everything that runs without macOS (arguments, plan, inputs, the
task_vm_info layout, the child protocol, the report)."""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from milsurgery.package import Package
from milsurgery.spec import function_descriptions, pb
from milsurgery.surgery import extract
from milsurgery.synth import build_llm_like

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "load_memory.py")
sys.path.insert(0, os.path.join(ROOT, "bench"))

import load_memory as lm  # noqa: E402

MIB = 1 << 20
DEFAULT_UNITS = ["CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE"]


@pytest.fixture(scope="module")
def pkgs(tmp_path_factory):
    """A 2-function package (infer: seq 1, prefill: seq 64), a single-function one, and the two
    functions of the first extracted as separate single-function packages in their own directory."""
    d = tmp_path_factory.mktemp("lm")
    pair = str(d / "m.mlpackage")
    build_llm_like(pair, seq_lens={"infer": 1, "prefill": 64}, hidden=64, layers=2)
    single = str(d / "s.mlpackage")
    build_llm_like(single, seq_lens=8, hidden=64, layers=2)
    sep_dir = d / "sep"
    sep_dir.mkdir()
    separate = {}
    for f in ("infer", "prefill"):
        separate[f] = str(sep_dir / f"{f}.mlpackage")
        extract(pair, [f], separate[f], single=True)
    return {"pair": pair, "single": single, "separate": separate, "sep_dir": str(sep_dir), "dir": d}


def descriptions(path: str) -> dict:
    with Package(path) as pkg:
        return function_descriptions(pkg.model)


def plan_for(argv: list[str]) -> list[dict]:
    return lm.build_plan(lm.parse_args(argv))


# -- arguments ------------------------------------------------------------------------------------


def test_parse_args_defaults():
    args = lm.parse_args(["a.mlpackage"])
    assert args.packages == ["a.mlpackage"]
    assert args.compute_units == DEFAULT_UNITS
    assert args.functions is None and args.separate is None
    assert args.repeats == 1 and not args.no_predict and not args.plan_only
    assert args.json is None and args.markdown is None


def test_parse_args_lists_keep_order():
    args = lm.parse_args(["a.mlpackage", "--compute-units", "CPU_AND_NE,CPU_ONLY", "--functions", "prefill,infer",
                          "--repeats", "3", "--no-predict"])
    assert args.compute_units == ["CPU_AND_NE", "CPU_ONLY"]
    assert args.functions == ["prefill", "infer"]
    assert args.repeats == 3 and args.no_predict


@pytest.mark.parametrize("argv, message", [
    (["a.mlpackage", "--compute-units", "CPU_ONLY,NPU"], "unknown compute unit 'NPU'"),
    (["a.mlpackage", "--compute-units", "cpu_only"], "unknown compute unit 'cpu_only'"),
    (["a.mlpackage", "--functions", "infer,infer"], "named twice"),
    (["a.mlpackage", "--repeats", "0"], "--repeats"),
    (["a.mlpackage", "b.mlpackage", "--separate", "sep"], "exactly one PKG"),
    (["plan.json", "--separate", "sep"], "exactly one PKG"),
    ([], "PKG"),
])
def test_parse_args_rejects(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        lm.parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_unmet_requirement_names_what_is_missing():
    assert lm.unmet_requirement("darwin", "arm64", "15.0", True) is None
    assert lm.unmet_requirement("darwin", "arm64", "26.1", True) is None
    old = lm.unmet_requirement("darwin", "arm64", "14.7", True)
    assert "macOS 15+" in old and "macOS 14.7" in old
    rosetta = lm.unmet_requirement("darwin", "x86_64", "15.2", True)
    assert "x86_64, not arm64" in rosetta
    linux = lm.unmet_requirement("linux", "x86_64", "", False)
    assert "Apple silicon" in linux and "coremltools is not installed" in linux
    assert "\n" not in linux


# -- the plan -------------------------------------------------------------------------------------


def test_plan_one_config_per_package_and_compute_unit(pkgs):
    plan = plan_for([pkgs["pair"], pkgs["single"], "--compute-units", "CPU_ONLY,CPU_AND_NE"])
    assert [(os.path.basename(c["package"]), c["compute_unit"], c["mode"]) for c in plan] == [
        ("m.mlpackage", "CPU_ONLY", "merged"), ("m.mlpackage", "CPU_AND_NE", "merged"),
        ("s.mlpackage", "CPU_ONLY", "merged"), ("s.mlpackage", "CPU_AND_NE", "merged"),
    ]
    pair, single = plan[0], plan[2]
    assert pair["functions"] == ["infer", "prefill"]
    assert [(ld["path"], ld["function_name"]) for ld in pair["loads"]] == [(pkgs["pair"], "infer"), (pkgs["pair"], "prefill")]
    assert single["functions"] == ["main"] and single["loads"][0]["function_name"] == "main"
    assert all(c["predict"] and c["repeat"] == 0 for c in plan)
    assert plan_for([pkgs["pair"], "--no-predict"])[0]["predict"] is False


def test_plan_separate_follows_merged_in_the_same_order(pkgs):
    sep = pkgs["separate"]
    plan = plan_for([pkgs["pair"], "--functions", "prefill,infer", "--compute-units", "CPU_ONLY,CPU_AND_NE",
                     "--separate", sep["prefill"], sep["infer"]])
    assert [(c["compute_unit"], c["mode"]) for c in plan] == [
        ("CPU_ONLY", "merged"), ("CPU_ONLY", "separate"), ("CPU_AND_NE", "merged"), ("CPU_AND_NE", "separate"),
    ]
    merged, separate = plan[0], plan[1]
    assert merged["functions"] == separate["functions"] == ["prefill", "infer"]
    assert [ld["function_name"] for ld in merged["loads"]] == ["prefill", "infer"]
    assert [(ld["function"], ld["path"], ld["function_name"]) for ld in separate["loads"]] == [
        ("prefill", sep["prefill"], "main"), ("infer", sep["infer"], "main"),
    ]
    assert separate["package"] == merged["package"] == pkgs["pair"]


def test_plan_separate_directory_and_repeats(pkgs):
    plan = plan_for([pkgs["pair"], "--compute-units", "CPU_AND_NE", "--repeats", "2", "--separate", pkgs["sep_dir"]])
    assert [(c["mode"], c["repeat"]) for c in plan] == [("merged", 0), ("separate", 0), ("merged", 1), ("separate", 1)]
    assert [ld["path"] for ld in plan[1]["loads"]] == [pkgs["separate"]["infer"], pkgs["separate"]["prefill"]]
    # each run is its own child: no two configurations are the same
    assert len({json.dumps(c, sort_keys=True) for c in plan}) == len(plan)


def test_plan_errors(pkgs):
    with pytest.raises(lm.PlanError, match="no function 'decode'"):
        plan_for([pkgs["pair"], "--functions", "infer,decode"])
    with pytest.raises(lm.PlanError, match="gives 1 packages for 2 functions"):
        plan_for([pkgs["pair"], "--separate", pkgs["separate"]["infer"]])
    with pytest.raises(lm.PlanError, match="separate package for function 'infer' does not exist"):
        plan_for([pkgs["pair"], "--separate", str(pkgs["dir"])])


def test_plan_from_experiment_plan_file(pkgs, tmp_path):
    rel = lambda p: os.path.relpath(p, pkgs["dir"]).replace(os.sep, "/")  # noqa: E731
    plan_file = pkgs["dir"] / "plan.json"
    plan_file.write_text(json.dumps({"packages": [
        {"path": rel(pkgs["pair"]), "separate": {f: rel(p) for f, p in pkgs["separate"].items()}},
        {"path": rel(pkgs["single"])},
    ]}))
    plan = plan_for([str(plan_file), "--compute-units", "CPU_AND_NE"])
    assert [(os.path.basename(c["package"]), c["mode"]) for c in plan] == [
        ("m.mlpackage", "merged"), ("m.mlpackage", "separate"), ("s.mlpackage", "merged")]
    assert [ld["path"] for ld in plan[1]["loads"]] == [pkgs["separate"]["infer"], pkgs["separate"]["prefill"]]
    bad = tmp_path / "bad.json"
    bad.write_text("[]")
    with pytest.raises(lm.PlanError, match="not an experiment plan"):
        plan_for([str(bad)])


# -- inputs ---------------------------------------------------------------------------------------


def test_synthesize_inputs_from_real_packages(pkgs):
    descs = descriptions(pkgs["pair"])
    infer, prefill = lm.synthesize_inputs(descs["infer"]), lm.synthesize_inputs(descs["prefill"])
    assert set(infer) == set(prefill) == {"x"}
    assert infer["x"].shape == (1, 1, 64) and infer["x"].dtype == np.float16
    assert prefill["x"].shape == (1, 64, 64) and prefill["x"].dtype == np.float16
    assert np.isfinite(prefill["x"]).all() and prefill["x"].std() > 0.5
    again = lm.synthesize_inputs(descriptions(pkgs["pair"])["prefill"])
    assert np.array_equal(again["x"], prefill["x"])  # deterministic
    main = lm.synthesize_inputs(descriptions(pkgs["single"])["main"])
    assert main["x"].shape == (1, 8, 64) and main["x"].dtype == np.float16


def _array_feature(desc, name, data_type, shape):
    f = desc.input.add(name=name)
    f.type.multiArrayType.dataType = data_type
    f.type.multiArrayType.shape.extend(shape)
    return f


def test_synthesize_inputs_shapes_dtypes_and_states():
    A = pb.ArrayFeatureType
    desc = pb.FunctionDescription(name="f")
    _array_feature(desc, "ids", A.INT32, (1, 16))
    ranged = _array_feature(desc, "ranged", A.FLOAT32, (1, 32, 8))  # default shape 32 ...
    for lo, hi in ((1, 1), (4, 128), (8, 8)):
        ranged.type.multiArrayType.shapeRange.sizeRanges.add(lowerBound=lo, upperBound=hi)  # ... lower bound 4
    enum = _array_feature(desc, "enum", A.DOUBLE, (2, 3))
    for shape in ((5, 3), (2, 3)):
        enum.type.multiArrayType.enumeratedShapes.shapes.add().shape.extend(shape)
    desc.state.add(name="kv").type.stateType.arrayType.shape.extend((1, 4))
    out = lm.synthesize_inputs(desc)
    assert list(out) == ["ids", "ranged", "enum"]  # the state is not an input
    assert out["ids"].dtype == np.int32 and out["ids"].shape == (1, 16) and not out["ids"].any()
    assert out["ranged"].dtype == np.float32 and out["ranged"].shape == (1, 4, 8)
    assert out["enum"].dtype == np.float64 and out["enum"].shape == (5, 3)


def test_synthesize_inputs_rejects_unsupported_types(monkeypatch):
    desc = pb.FunctionDescription(name="f")
    desc.input.add(name="text").type.stringType.SetInParent()
    with pytest.raises(lm.UnsupportedInput, match="input 'text': stringType inputs are not supported"):
        lm.synthesize_inputs(desc)

    desc = pb.FunctionDescription(name="f")
    opt = desc.input.add(name="hint")
    opt.type.stringType.SetInParent()
    opt.type.isOptional = True
    _array_feature(desc, "x", pb.ArrayFeatureType.FLOAT16, (2,))
    assert list(lm.synthesize_inputs(desc)) == ["x"]  # optional and unsupported: left out

    desc = pb.FunctionDescription(name="f")
    _array_feature(desc, "bad", pb.ArrayFeatureType.INVALID_ARRAY_DATA_TYPE, (2,))
    with pytest.raises(lm.UnsupportedInput, match="input 'bad': multi-array data type INVALID_ARRAY_DATA_TYPE"):
        lm.synthesize_inputs(desc)

    desc = pb.FunctionDescription(name="f")
    _array_feature(desc, "shapeless", pb.ArrayFeatureType.FLOAT32, ())
    with pytest.raises(lm.UnsupportedInput, match="input 'shapeless': multi-array has no usable shape"):
        lm.synthesize_inputs(desc)

    desc = pb.FunctionDescription(name="f")
    img = desc.input.add(name="photo").type.imageType
    img.width, img.height, img.colorSpace = 32, 24, pb.ImageFeatureType.RGB
    monkeypatch.setitem(sys.modules, "PIL", None)  # as if Pillow were not installed
    with pytest.raises(lm.UnsupportedInput, match="input 'photo' is an image: .*needs Pillow"):
        lm.synthesize_inputs(desc)


def test_synthesize_image_input_with_pillow():
    pytest.importorskip("PIL")
    desc = pb.FunctionDescription(name="f")
    img = desc.input.add(name="photo").type.imageType
    img.width, img.height, img.colorSpace = 32, 24, pb.ImageFeatureType.GRAYSCALE
    photo = lm.synthesize_inputs(desc)["photo"]
    assert photo.size == (32, 24) and photo.mode == "L"


# -- task_vm_info ---------------------------------------------------------------------------------

#: Offsets in task_vm_info_data_t, macOS 15 SDK <mach/task_info.h> (#pragma pack(push, 4)).
HEADER_OFFSETS = {
    "virtual_size": 0, "region_count": 8, "page_size": 12, "resident_size": 16, "resident_size_peak": 24,
    "device": 32, "internal": 48, "external": 64, "reusable": 80, "purgeable_volatile_pmap": 96,
    "compressed": 120, "compressed_lifetime": 136, "phys_footprint": 144, "min_address": 152,
    "max_address": 160, "ledger_phys_footprint_peak": 168, "ledger_tag_graphics_footprint": 272,
    "ledger_tag_neural_footprint": 304, "ledger_tag_neural_nofootprint_compressed": 328,
    "limit_bytes_remaining": 336, "decompressions": 344, "ledger_swapins": 348,
    "ledger_tag_neural_nofootprint_total": 356, "ledger_tag_neural_nofootprint_peak": 364,
}


def test_task_vm_info_layout_matches_the_header():
    T = lm.TaskVMInfo
    assert {name: getattr(T, name).offset for name in HEADER_OFFSETS} == HEADER_OFFSETS
    assert ctypes.sizeof(T) == 372
    assert lm.TASK_VM_INFO_COUNT == 93  # sizeof / sizeof(natural_t)
    assert lm.TASK_VM_INFO == 22
    # The header's revision counts: REV0 ends before phys_footprint, REV1 before min_address,
    # REV2 before the ledgers, REV3 before limit_bytes_remaining, REV4 before decompressions,
    # REV5 before ledger_swapins, REV6 before the rev7 neural totals.
    revs = [36, 38, 42, 84, 86, 87, 89]
    firsts = ["phys_footprint", "min_address", "ledger_phys_footprint_peak", "limit_bytes_remaining",
              "decompressions", "ledger_swapins", "ledger_tag_neural_nofootprint_total"]
    assert [getattr(T, name).offset // 4 for name in firsts] == revs


def test_filled_fields_follow_the_returned_count():
    info = lm.TaskVMInfo(phys_footprint=123 * MIB, resident_size=456 * MIB, min_address=7, ledger_swapins=9)
    rev1 = lm.filled_fields(info, 38)
    assert rev1["phys_footprint"] == 123 * MIB and rev1["resident_size"] == 456 * MIB
    assert "min_address" not in rev1
    full = lm.filled_fields(info, lm.TASK_VM_INFO_COUNT)
    assert len(full) == len(lm.TaskVMInfo._fields_) and full["ledger_swapins"] == 9
    assert "phys_footprint" not in lm.filled_fields(info, 36)


# -- running children -----------------------------------------------------------------------------


def test_each_configuration_runs_in_a_fresh_child(pkgs, monkeypatch):
    plan = plan_for([pkgs["pair"], "--compute-units", "CPU_ONLY,CPU_AND_NE", "--separate", pkgs["sep_dir"]])
    calls = []

    def fake_run(command, **kwargs):
        calls.append((command, kwargs))
        config = json.loads(command[3])
        if config["mode"] == "separate" and config["compute_unit"] == "CPU_AND_NE":
            return subprocess.CompletedProcess(command, -11, "", "warming up\nSegmentation fault\n")
        sample = {"step": "baseline", "kind": "baseline", "function": None, "seconds": None,
                  "memory": {"phys_footprint": MIB, "resident_size": 2 * MIB}}
        line = json.dumps({"config": config, "samples": [sample], "error": None})
        return subprocess.CompletedProcess(command, 0, "noise from a library\n" + line + "\n", "")

    monkeypatch.setattr(lm.subprocess, "run", fake_run)
    monkeypatch.setattr(lm, "environment", lambda: {"machine": "test"})
    results = lm.run_plan(plan, timeout=12.5)
    assert len(calls) == len(plan) == 4
    for (command, kwargs), config in zip(calls, plan):
        assert command[:3] == [sys.executable, SCRIPT, "--child"]
        assert json.loads(command[3]) == config
        assert kwargs["timeout"] == 12.5
    runs = results["runs"]
    assert [r["config"] for r in runs] == plan
    assert [bool(r["error"]) for r in runs] == [False, False, False, True]
    assert runs[3]["error"] == "child exited with status -11: Segmentation fault"
    preds = {p["mode"]: p["functions"] for p in results["predictions"]}
    assert [p["function"] for p in preds["merged"]] == [p["function"] for p in preds["separate"]] == ["infer", "prefill"]
    # build_llm_like shares every layer by default: on one mapping prefill adds nothing, as a copy
    # (or from its own package) it costs all its bytes
    merged, separate = preds["merged"][1], preds["separate"][1]
    assert merged["shared_mapping_added_bytes"] == 0
    assert merged["per_function_copy_added_bytes"] == merged["referenced_bytes"] == 2 * (64 * 64 * 2 + 64 * 2)
    # extraction keeps exactly the function's blobs (synth's layers hold no identical blobs)
    assert separate["per_function_copy_added_bytes"] == separate["referenced_bytes"] == merged["referenced_bytes"]
    assert separate["shared_mapping_added_bytes"] >= separate["referenced_bytes"]


NOISY_CHILD = """
import os, sys
sys.path.insert(0, sys.argv[1])
import load_memory as lm
def noisy_measure(config):
    print("python noise")
    sys.stdout.flush()
    os.write(1, b"native noise\\n")
    return {"config": config, "samples": [], "error": None}
lm.measure = noisy_measure
sys.exit(lm.child_main(sys.argv[2]))
"""


def test_child_stdout_carries_only_the_result_line():
    config = {"package": "p", "mode": "merged"}
    run = subprocess.run([sys.executable, "-c", NOISY_CHILD, os.path.dirname(SCRIPT), json.dumps(config)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == [json.dumps({"config": config, "samples": [], "error": None})]
    assert run.stderr.splitlines() == ["python noise", "native noise"]


@pytest.mark.skipif(sys.platform == "darwin", reason="on a Mac the child really measures")
def test_child_prints_one_json_line_even_when_it_fails(pkgs):
    config = plan_for([pkgs["single"], "--compute-units", "CPU_ONLY"])[0]
    run = subprocess.run([sys.executable, SCRIPT, "--child", json.dumps(config)], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert result["config"] == config and result["samples"] == []
    assert result["error"] == "baseline: OSError: task_info(TASK_VM_INFO) needs macOS"


# -- the report -----------------------------------------------------------------------------------


def _sample(step, phys_mib, rss_mib, seconds=None):
    kind, _, function = step.partition(" ")
    return {"step": step, "kind": kind, "function": function or None, "seconds": seconds,
            "memory": {"phys_footprint": round(phys_mib * MIB), "resident_size": round(rss_mib * MIB)}}


def _run(mode, unit, samples, error=None, repeat=0):
    config = {"package": "/x/n2.mlpackage", "mode": mode, "compute_unit": unit, "functions": ["f0", "f1"],
              "loads": [], "predict": True, "repeat": repeat}
    return {"config": config, "samples": samples, "error": error}


def _prediction(mode, shared_f1):
    return {"package": "/x/n2.mlpackage", "mode": mode, "functions": [
        {"function": "f0", "referenced_bytes": 64 * MIB, "shared_mapping_added_bytes": 64 * MIB,
         "per_function_copy_added_bytes": 64 * MIB},
        {"function": "f1", "referenced_bytes": 64 * MIB, "shared_mapping_added_bytes": shared_f1 * MIB,
         "per_function_copy_added_bytes": 64 * MIB}]}


RESULTS = {
    "schema": 1,
    "environment": {"macos": "15.1", "machine": "arm64", "chip": "Apple M4", "coremltools": "8.3", "python": "3.11.9"},
    "predictions": [_prediction("merged", 32), _prediction("separate", 64)],
    "runs": [
        _run("merged", "CPU_AND_NE", [_sample("baseline", 100, 150), _sample("load f0", 170, 230, 1.5),
                                      _sample("predict f0", 172, 232, 0.01), _sample("load f1", 240, 300, 1.25),
                                      _sample("predict f1", 241, 301, 0.02)]),
        _run("separate", "CPU_AND_NE", [_sample("baseline", 100, 150), _sample("load f0", 170, 230, 1.5),
                                        _sample("predict f0", 172, 232), _sample("load f1", 238, 298),
                                        _sample("predict f1", 239, 299)]),
        _run("merged", "CPU_ONLY", [_sample("baseline", 100, 150), _sample("load f0", 110, 215),
                                    _sample("predict f0", 111, 216), _sample("load f1", 112, 250),
                                    _sample("predict f1", 113, 251)]),
        _run("separate", "CPU_ONLY", [_sample("baseline", 100, 150)], error="load f0: RuntimeError: no ANE"),
    ],
}


def test_render_markdown_tables():
    md = lm.render_markdown(RESULTS)
    lines = md.splitlines()
    assert lines[0] == "# Core ML load memory per function"
    assert "macOS 15.1, arm64, Apple M4, coremltools 8.3, Python 3.11.9" in md
    assert "## n2.mlpackage" in lines
    # steps: value, change from the previous step, RSS, seconds
    assert "| merged | CPU_AND_NE | baseline | 100.00 |  | 150.00 |  |  |" in lines
    assert "| merged | CPU_AND_NE | load f0 | 170.00 | +70.00 | 230.00 | +80.00 | 1.50 |" in lines
    assert "| merged | CPU_AND_NE | load f1 | 240.00 | +68.00 | 300.00 | +68.00 | 1.25 |" in lines
    assert "| merged | CPU_ONLY | load f1 | 112.00 | +1.00 | 250.00 | +34.00 |  |" in lines
    # growth per function: last step of f1 against last step of f0, next to the predictions
    assert ("| merged | CPU_AND_NE | f1 | +69.00 | +69.00 | 32.00 | 64.00 | per-function copy |") in lines
    assert ("| merged | CPU_ONLY | f1 | +2.00 | +35.00 | 32.00 | 64.00 | shared mapping |") in lines
    assert ("| separate | CPU_AND_NE | f1 | +67.00 | +67.00 | 64.00 | 64.00 | either (nothing shared) |") in lines
    assert ("| merged | CPU_AND_NE | f0 | +72.00 | +82.00 | 64.00 | 64.00 | "
            "first function (includes runtime setup) |") in lines
    # the failed run has no rows but is reported
    assert not any(line.startswith("| separate | CPU_ONLY |") for line in lines)
    assert "- n2.mlpackage separate CPU_ONLY (repeat 1): load f0: RuntimeError: no ANE" in lines
    assert "medians" not in md


def test_render_markdown_takes_medians_over_repeats():
    runs = [_run("merged", "CPU_AND_NE", [_sample("baseline", 100, 150), _sample("load f0", 100 + g, 150 + g)],
                 repeat=i) for i, g in enumerate((10, 30, 11))]
    md = lm.render_markdown({"runs": runs, "predictions": [], "environment": {}})
    assert "| merged | CPU_AND_NE | load f0 | 111.00 | +11.00 | 161.00 | +11.00 |  |" in md.splitlines()
    assert "medians of up to 3 runs per configuration" in md


def test_render_markdown_when_nothing_completed():
    md = lm.render_markdown({"runs": [RESULTS["runs"][3]], "predictions": []})
    assert "No run of this package completed." in md and "RuntimeError: no ANE" in md


# -- the script -----------------------------------------------------------------------------------


@pytest.mark.skipif(sys.platform == "darwin", reason="checks the refusal off macOS")
def test_script_off_macos_exits_2_with_one_line(pkgs):
    run = subprocess.run([sys.executable, SCRIPT, pkgs["pair"]], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert run.stdout == ""
    lines = run.stderr.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("load_memory.py: needs macOS 15+ on Apple silicon (arm64) with coremltools installed")


def test_script_plan_only_works_here(pkgs):
    run = subprocess.run([sys.executable, SCRIPT, pkgs["pair"], "--plan-only", "--separate", pkgs["sep_dir"]],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    plan = json.loads(run.stdout)
    assert len(plan) == 6  # 3 default compute units x (merged, separate)
    assert [c["compute_unit"] for c in plan] == [u for u in DEFAULT_UNITS for _ in range(2)]
    assert {c["mode"] for c in plan} == {"merged", "separate"}


def test_script_plan_only_reports_a_bad_package(tmp_path):
    run = subprocess.run([sys.executable, SCRIPT, str(tmp_path / "none.mlpackage"), "--plan-only"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert run.stderr.startswith("load_memory.py: error:") and "does not exist" in run.stderr
