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
    assert lm.unmet_requirement("darwin", "arm64", "15.0", "8.3") is None
    assert lm.unmet_requirement("darwin", "arm64", "26.1", "9.0") is None
    old = lm.unmet_requirement("darwin", "arm64", "14.7", "8.3")
    assert "macOS 15+" in old and "macOS 14.7" in old
    rosetta = lm.unmet_requirement("darwin", "x86_64", "15.2", "8.3")
    assert "x86_64, not arm64" in rosetta
    old_ct = lm.unmet_requirement("darwin", "arm64", "15.2", "7.2")
    assert "coremltools 7.2 is older than 8" in old_ct
    linux = lm.unmet_requirement("linux", "x86_64", "", None)
    assert "Apple silicon" in linux and "coremltools is not installed" in linux
    assert "\n" not in linux


def test_coremltools_problem_checks_version_and_native_module(monkeypatch):
    import types

    assert "older than 8" in lm.coremltools_problem(types.SimpleNamespace(__version__="7.2"))
    monkeypatch.setitem(sys.modules, "coremltools.libcoremlpython", None)  # as on Linux or a bad wheel
    problem = lm.coremltools_problem(types.SimpleNamespace(__version__="8.3"))
    assert "coremltools 8.3: its native module coremltools.libcoremlpython does not import" in problem
    assert "ModuleNotFoundError" in problem


@pytest.mark.skipif(sys.platform == "darwin", reason="checks a coremltools without its macOS-only native module")
def test_coremltools_problem_with_the_installed_coremltools():
    ct = pytest.importorskip("coremltools")
    problem = lm.coremltools_problem(ct)
    assert problem is not None and "libcoremlpython does not import" in problem


def test_check_destination(tmp_path):
    assert lm.check_destination(str(tmp_path / "out.json"), "--json") is None
    assert not list(tmp_path.iterdir())  # the probe file is gone
    missing = lm.check_destination(str(tmp_path / "no" / "out.json"), "--json")
    assert missing == f"--json {tmp_path / 'no' / 'out.json'}: directory {tmp_path / 'no'} does not exist"
    assert lm.check_destination(str(tmp_path), "--markdown") == f"--markdown {tmp_path}: is a directory"
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        try:
            assert "cannot write in" in lm.check_destination(str(locked / "r.json"), "--json")
        finally:
            locked.chmod(0o700)


# -- the plan -------------------------------------------------------------------------------------


def _shape(plan):
    return [(os.path.basename(c["package"]), c["compute_unit"], c["mode"], c["phase"], c["repeat"]) for c in plan]


def test_plan_one_cold_then_warm_runs_per_package_and_compute_unit(pkgs, tmp_path):
    plan = plan_for([pkgs["pair"], pkgs["single"], "--compute-units", "CPU_ONLY,CPU_AND_NE",
                     "--compiled-dir", str(tmp_path / "c")])
    assert _shape(plan) == [
        ("m.mlpackage", "CPU_ONLY", "merged", "cold", 0), ("m.mlpackage", "CPU_ONLY", "merged", "warm", 0),
        ("m.mlpackage", "CPU_AND_NE", "merged", "cold", 0), ("m.mlpackage", "CPU_AND_NE", "merged", "warm", 0),
        ("s.mlpackage", "CPU_ONLY", "merged", "cold", 0), ("s.mlpackage", "CPU_ONLY", "merged", "warm", 0),
        ("s.mlpackage", "CPU_AND_NE", "merged", "cold", 0), ("s.mlpackage", "CPU_AND_NE", "merged", "warm", 0),
    ]
    pair, single = plan[0], plan[4]
    assert pair["functions"] == ["infer", "prefill"]
    assert [(ld["path"], ld["function_name"]) for ld in pair["loads"]] == [(pkgs["pair"], "infer"), (pkgs["pair"], "prefill")]
    # every function of a package is loaded from its one compiled model, at a fixed path
    compiled = lm.compiled_path(pkgs["pair"], str(tmp_path / "c"))
    assert {ld["compiled"] for c in plan[:4] for ld in c["loads"]} == {compiled}
    assert compiled == str(tmp_path / "c" / os.path.basename(compiled)) and compiled.endswith(".mlmodelc")
    assert os.path.basename(compiled).startswith("m-")
    assert single["functions"] == ["main"] and single["loads"][0]["function_name"] == "main"
    assert single["loads"][0]["compiled"] != compiled
    # a multi-function package's function is selected by name; a single-function one loads its default
    assert [ld["select"] for ld in pair["loads"]] == ["infer", "prefill"] and single["loads"][0]["select"] is None
    assert all(c["predict"] for c in plan)
    assert plan_for([pkgs["pair"], "--no-predict"])[0]["predict"] is False
    assert lm.compile_jobs(plan) == [{"source": pkgs["pair"], "compiled": compiled},
                                     {"source": pkgs["single"], "compiled": single["loads"][0]["compiled"]}]


def test_compiled_path_differs_for_packages_of_the_same_name(tmp_path):
    a = lm.compiled_path(str(tmp_path / "a" / "m.mlpackage"), str(tmp_path))
    b = lm.compiled_path(str(tmp_path / "b" / "m.mlpackage"), str(tmp_path))
    assert a != b and os.path.dirname(a) == os.path.dirname(b) == str(tmp_path)


def test_plan_separate_follows_merged_in_the_same_order(pkgs):
    sep = pkgs["separate"]
    plan = plan_for([pkgs["pair"], "--functions", "prefill,infer", "--compute-units", "CPU_ONLY,CPU_AND_NE",
                     "--separate", sep["prefill"], sep["infer"]])
    assert [(c["compute_unit"], c["mode"], c["phase"]) for c in plan] == [
        (u, m, p) for u in ("CPU_ONLY", "CPU_AND_NE") for m in ("merged", "separate") for p in ("cold", "warm")]
    merged, separate = plan[0], plan[2]
    assert merged["functions"] == separate["functions"] == ["prefill", "infer"]
    assert [ld["function_name"] for ld in merged["loads"]] == ["prefill", "infer"]
    assert [(ld["function"], ld["path"], ld["function_name"]) for ld in separate["loads"]] == [
        ("prefill", sep["prefill"], "main"), ("infer", sep["infer"], "main"),
    ]
    # each separate package has its own compiled model
    assert len({ld["compiled"] for ld in separate["loads"]} | {merged["loads"][0]["compiled"]}) == 3
    assert separate["package"] == merged["package"] == pkgs["pair"]
    assert len(lm.compile_jobs(plan)) == 3


def test_plan_separate_directory_and_repeats(pkgs):
    plan = plan_for([pkgs["pair"], "--compute-units", "CPU_AND_NE", "--repeats", "2", "--separate", pkgs["sep_dir"]])
    assert [(c["mode"], c["phase"], c["repeat"]) for c in plan] == [
        ("merged", "cold", 0), ("merged", "warm", 0), ("merged", "warm", 1),
        ("separate", "cold", 0), ("separate", "warm", 0), ("separate", "warm", 1)]
    assert [ld["path"] for ld in plan[3]["loads"]] == [pkgs["separate"]["infer"], pkgs["separate"]["prefill"]]
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
    plan = [c for c in plan_for([str(plan_file), "--compute-units", "CPU_AND_NE"]) if c["phase"] == "warm"]
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
    ranged = _array_feature(desc, "ranged", A.FLOAT32, (1, 32, 8))  # default shape, inside the range
    for lo, hi in ((1, 1), (4, 128), (8, 8)):
        ranged.type.multiArrayType.shapeRange.sizeRanges.add(lowerBound=lo, upperBound=hi)
    open_ended = _array_feature(desc, "open", A.FLOAT16, (1, 512))  # upper bound -1: unbounded
    for lo, hi in ((1, 1), (2, -1)):
        open_ended.type.multiArrayType.shapeRange.sizeRanges.add(lowerBound=lo, upperBound=hi)
    outside = _array_feature(desc, "outside", A.FLOAT32, (1, 2))  # default outside the range: lower bounds
    for lo, hi in ((1, 1), (4, 64)):
        outside.type.multiArrayType.shapeRange.sizeRanges.add(lowerBound=lo, upperBound=hi)
    enum = _array_feature(desc, "enum", A.DOUBLE, (2, 3))  # default among the enumerated shapes
    for shape in ((5, 3), (2, 3)):
        enum.type.multiArrayType.enumeratedShapes.shapes.add().shape.extend(shape)
    other = _array_feature(desc, "other", A.DOUBLE, (9, 9))  # default not enumerated: the first shape
    other.type.multiArrayType.enumeratedShapes.shapes.add().shape.extend((5, 3))
    desc.state.add(name="kv").type.stateType.arrayType.shape.extend((1, 4))
    out = lm.synthesize_inputs(desc)
    assert list(out) == ["ids", "ranged", "open", "outside", "enum", "other"]  # the state is not an input
    assert out["ids"].dtype == np.int32 and out["ids"].shape == (1, 16) and not out["ids"].any()
    assert out["ranged"].dtype == np.float32 and out["ranged"].shape == (1, 32, 8)
    assert out["open"].dtype == np.float16 and out["open"].shape == (1, 512)
    assert out["outside"].shape == (1, 4)
    assert out["enum"].dtype == np.float64 and out["enum"].shape == (2, 3)
    assert out["other"].shape == (5, 3)


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


# -- rusage_info_v6 and mincore -----------------------------------------------------------------

#: Offsets in struct rusage_info_v6, in the field order of <sys/resource.h> (XNU bsd/sys/resource.h), natural alignment.
RUSAGE_OFFSETS = {
    "ri_uuid": 0, "ri_user_time": 16, "ri_resident_size": 64, "ri_phys_footprint": 72, "ri_child_user_time": 96,
    "ri_diskio_bytesread": 144, "ri_cpu_time_qos_default": 160, "ri_logical_writes": 232,
    "ri_lifetime_max_phys_footprint": 240, "ri_runnable_time": 288, "ri_flags": 296, "ri_user_ptime": 304,
    "ri_penergy_nj": 344, "ri_secure_time_in_system": 352, "ri_neural_footprint": 368,
    "ri_lifetime_max_neural_footprint": 376, "ri_interval_max_neural_footprint": 384, "ri_reserved": 392,
}


def test_rusage_info_v6_layout_matches_the_header():
    R = lm.RusageInfoV6
    assert {name: getattr(R, name).offset for name in RUSAGE_OFFSETS} == RUSAGE_OFFSETS
    assert ctypes.sizeof(R) == 464  # 16 + 56 x 8, unchanged since the first v6 header
    assert lm.RUSAGE_INFO_V6 == 6
    assert all(name in dict(R._fields_) for name in lm.RUSAGE_FIELDS)


def test_weight_residency_sees_pages_whoever_touches_them(tmp_path):
    page = lm.mmap.PAGESIZE
    path = tmp_path / "weight.bin"
    with open(path, "wb") as f:  # 64 pages, on disk: clean pages can be evicted
        f.write(bytes(range(256)) * (64 * page // 256))
        os.fsync(f.fileno())
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    probe = lm.WeightResidency([str(path), str(empty), str(path)])
    try:
        assert probe.evict() == "posix_fadvise(DONTNEED)"
        assert probe.resident()[str(empty)] == 0
        before = probe.resident()[str(path)]
        assert before <= 4 * page  # evicted (a page or two may come back)
        with open(path, "rb") as f:  # another reader, not the probe's mapping, brings 16 pages in
            f.seek(16 * page)
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_RANDOM)
            f.read(16 * page)
        after = probe.resident()[str(path)]
        assert 16 * page <= after - before <= 20 * page
    finally:
        probe.close()


def test_compiled_weight_files(tmp_path):
    compiled = tmp_path / "m.mlmodelc"
    (compiled / "weights").mkdir(parents=True)
    for name in ("weight.bin", "extra.bin", "notes.txt"):
        (compiled / "weights" / name).write_bytes(b"x")
    assert lm.compiled_weight_files(str(compiled)) == [str(compiled / "weights" / n) for n in ("extra.bin", "weight.bin")]
    assert lm.compiled_weight_files(str(tmp_path / "none.mlmodelc")) == []


# -- dense sizes ----------------------------------------------------------------------------------


def _ct_dense_bytes(path: str, function: str) -> int:
    """Dense weight bytes as coremltools' own program sees them: every constexpr op's output
    (shape x dtype) plus every const op's value, read by coremltools' milproto loader."""
    from coremltools.converters.mil.mil import types

    from checks import ct_load_program

    prog = ct_load_program(path)
    total = 0
    for op in prog.functions[function].operations:
        if op.op_type.startswith("constexpr_"):
            out = op.outputs[0]
            total += int(np.prod(out.shape)) * np.dtype(types.nptype_from_builtin(out.dtype)).itemsize
        elif op.op_type == "const" and np.ndim(op.val.val) > 0:
            users = op.outputs[0].child_ops
            if not users or not all(u.op_type.startswith("constexpr_") for u in users):  # not a constexpr's input
                total += np.asarray(op.val.val).nbytes
    return total


@pytest.mark.parametrize("dtype", ["fp16", "palettized4"])
def test_dense_weight_bytes_match_coremltools(dtype, tmp_path):
    path = str(tmp_path / "m.mlpackage")
    build_llm_like(path, seq_lens={"a": 2, "b": 4}, hidden=32, layers=3, dtype=dtype, shared_fraction=0.5)
    with Package(path) as pkg:
        dense = {f: lm.dense_weight_bytes(pkg, f) for f in ("a", "b")}
        stored = {f["name"]: f["referenced_bytes"] for f in lm.memory_model(pkg)["functions"]}
    for f in ("a", "b"):
        assert dense[f] == _ct_dense_bytes(path, f)
    if dtype == "fp16":
        assert dense == stored
    else:  # 4-bit indices expand to fp16: 4x, less the LUTs
        assert all(3 * stored[f] < dense[f] < 4 * stored[f] for f in ("a", "b"))


# -- the verdict ----------------------------------------------------------------------------------

P = {"referenced_bytes": 64 * MIB, "per_function_copy_added_bytes": 64 * MIB, "dense_copy_added_bytes": 64 * MIB,
     "shared_mapping_added_bytes": 32 * MIB}
PAL = {**P, "dense_copy_added_bytes": 250 * MIB}


@pytest.mark.parametrize("mode, index, growth, predicted, expected", [
    ("merged", 1, 0.5 * MIB, P, "shared mapping"),
    ("merged", 1, 66 * MIB, P, "per-function copy"),
    ("merged", 1, 240 * MIB, PAL, "dense copy"),
    ("merged", 1, 64 * MIB, PAL, "per-function copy"),
    ("merged", 1, 30 * MIB, P, "neither (off every prediction by more than the tolerance)"),
    ("merged", 0, 70 * MIB, P, "first function (includes runtime setup)"),
    ("separate", 1, 0, P, "either (nothing shared)"),
    ("separate", 1, 64 * MIB, P, "either (nothing shared)"),
    ("merged", 1, 0, {**P, "referenced_bytes": 0}, "either (no weights)"),
])
def test_verdict(mode, index, growth, predicted, expected):
    tol = lm.tolerance_bytes(predicted["referenced_bytes"], 0.2, 2)
    assert lm.verdict(mode, index, growth, predicted, tol) == expected


def test_verdict_tolerance_and_no_predict():
    assert lm.tolerance_bytes(64 * MIB, 0.2, 2) == pytest.approx(12.8 * MIB)
    assert lm.tolerance_bytes(MIB, 0.2, 2) == 2 * MIB
    small = {**P, "referenced_bytes": MIB, "per_function_copy_added_bytes": MIB, "dense_copy_added_bytes": MIB}
    # 1 MiB of weights: 0 and 1 MiB are both within 2 MiB of a 0.5 MiB growth
    assert lm.verdict("merged", 1, 0.5 * MIB, small, 2 * MIB) == (
        "either (shared mapping or per-function copy: within the tolerance of each)")
    assert lm.verdict("merged", 1, 0, P, 2 * MIB, predicted_run=False) == (
        "shared mapping; --no-predict: weights may never have been touched")


def test_check_loaded_refuses_a_model_without_proxy():
    import types

    ok = types.SimpleNamespace(_proxy=object())
    assert lm.check_loaded(ok, "f") is ok
    legacy_ok = types.SimpleNamespace(__proxy__=object())  # coremltools' MLModel keeps it here
    assert lm.check_loaded(legacy_ok, "f") is legacy_ok
    # MLModel after Core ML failed: a warning, __proxy__ None and the error kept aside
    failed = types.SimpleNamespace(__proxy__=None, _framework_error=RuntimeError("Error compiling model"))
    with pytest.raises(lm.LoadFailed, match="Core ML did not load function 'f1' of x.mlmodelc: Error compiling model"):
        lm.check_loaded(failed, "function 'f1' of x.mlmodelc")
    with pytest.raises(lm.LoadFailed, match=r"\(no model proxy\)"):
        lm.check_loaded(types.SimpleNamespace(_proxy=None), "f")


# -- running children -----------------------------------------------------------------------------


def _events(*events) -> str:
    return "noise from a library\n" + "".join(json.dumps(e) + "\n" for e in events)


def _mem(phys_mib, rss_mib=None, **extra):
    return {"phys_footprint": round(phys_mib * MIB), "resident_size": round((rss_mib or phys_mib) * MIB), **extra}


def test_each_configuration_runs_in_a_fresh_child_and_streams(pkgs, monkeypatch):
    plan = plan_for([pkgs["pair"], "--compute-units", "CPU_ONLY,CPU_AND_NE", "--separate", pkgs["sep_dir"]])
    calls = []

    def fake_run(command, **kwargs):
        calls.append((command, kwargs))
        if command[2] == "--compile":
            jobs = json.loads(command[3])
            out = _events(*({"event": "compiled", **j, "seconds": 0.5, "error": None} for j in jobs))
            return subprocess.CompletedProcess(command, 0, out, "")
        config = json.loads(command[3])
        sample = {"event": "sample", "step": "baseline", "kind": "baseline", "function": None, "seconds": None,
                  "memory": _mem(1, 2)}
        load = {**sample, "step": "load infer", "kind": "load", "function": "infer", "seconds": 0.1, "memory": _mem(3, 4)}
        if config["mode"] == "separate" and config["compute_unit"] == "CPU_AND_NE" and config["phase"] == "warm":
            # a crash after two samples: both are kept, with the child's stderr
            return subprocess.CompletedProcess(command, -11, _events(sample, load), "warming up\nSegmentation fault\n")
        if config["mode"] == "merged" and config["compute_unit"] == "CPU_ONLY" and config["phase"] == "warm":
            raise subprocess.TimeoutExpired(command, kwargs["timeout"], output=_events(sample).encode(),
                                            stderr=b"stuck\n")
        return subprocess.CompletedProcess(command, 0, _events({"event": "start", "environment": {"pid": 7}},
                                                               sample, {"event": "end", "error": None}), "a warning\n")

    monkeypatch.setattr(lm.subprocess, "run", fake_run)
    monkeypatch.setattr(lm, "environment", lambda: {"machine": "test"})
    results = lm.run_plan(plan, timeout=12.5)
    assert len(calls) == len(plan) + 1 == 9
    compile_call = calls[0][0]
    assert compile_call[:3] == [sys.executable, SCRIPT, "--compile"]
    assert json.loads(compile_call[3]) == lm.compile_jobs(plan)
    for (command, kwargs), config in zip(calls[1:], plan):
        assert command[:3] == [sys.executable, SCRIPT, "--child"]
        assert json.loads(command[3]) == config
        assert kwargs["timeout"] == 12.5
    runs = results["runs"]
    assert [r["config"] for r in runs] == plan
    assert [r["compiled"] for r in results["compiled"]] == [j["compiled"] for j in lm.compile_jobs(plan)]
    errors = {(r["config"]["mode"], r["config"]["compute_unit"], r["config"]["phase"]): r["error"] for r in runs}
    assert errors[("separate", "CPU_AND_NE", "warm")] == "child exited with status -11 after 2 samples: Segmentation fault"
    assert errors[("merged", "CPU_ONLY", "warm")] == "child timed out after 12.5 s after 1 samples: stuck"
    assert sum(e is not None for e in errors.values()) == 2
    crashed = next(r for r in runs if r["error"] and "-11" in r["error"])
    assert [s["step"] for s in crashed["samples"]] == ["baseline", "load infer"]
    assert crashed["stderr"] == ["warming up", "Segmentation fault"]
    fine = runs[0]
    assert fine["stderr"] == ["a warning"] and fine["environment"] == {"pid": 7}  # stderr kept when all went well
    assert results["settings"]["tolerance"] == lm.DEFAULT_TOLERANCE
    preds = {p["mode"]: p["functions"] for p in results["predictions"]}
    assert [p["function"] for p in preds["merged"]] == [p["function"] for p in preds["separate"]] == ["infer", "prefill"]
    # build_llm_like shares every layer by default: on one mapping prefill adds no pages, as a copy
    # (or from its own package) it costs all its bytes
    merged, separate = preds["merged"][1], preds["separate"][1]
    assert merged["shared_mapping_added_bytes"] == 0
    assert merged["per_function_copy_added_bytes"] == merged["referenced_bytes"] == 2 * (64 * 64 * 2 + 64 * 2)
    assert merged["dense_copy_added_bytes"] == merged["referenced_bytes"]  # fp16: nothing to expand
    assert separate["per_function_copy_added_bytes"] == separate["referenced_bytes"] == merged["referenced_bytes"]
    assert separate["shared_mapping_added_bytes"] >= separate["referenced_bytes"]


def test_a_failed_compilation_fails_its_runs_only(pkgs, monkeypatch):
    plan = plan_for([pkgs["pair"], pkgs["single"], "--compute-units", "CPU_ONLY"])
    bad = plan[0]["loads"][0]["compiled"]

    def fake_run(command, **kwargs):
        if command[2] == "--compile":
            jobs = json.loads(command[3])
            done = [{"event": "compiled", **j, "seconds": 0.1, "error": "RuntimeError: bad spec" if j["compiled"] == bad
                     else None} for j in jobs]
            return subprocess.CompletedProcess(command, 0, _events(*done), "")
        return subprocess.CompletedProcess(command, 0, _events({"event": "end", "error": None}), "")

    monkeypatch.setattr(lm.subprocess, "run", fake_run)
    results = lm.run_plan(plan, timeout=5)
    errors = [r["error"] for r in results["runs"]]
    assert errors[:2] == [f"compiling {pkgs['pair']}: RuntimeError: bad spec"] * 2
    assert errors[2:] == [None, None]


def test_run_plan_stops_when_coremltools_cannot_run(pkgs, monkeypatch):
    plan = plan_for([pkgs["single"], "--compute-units", "CPU_ONLY"])
    problem = {"event": "problem", "error": "coremltools 8.3: its native module ... does not import"}
    monkeypatch.setattr(lm.subprocess, "run",
                        lambda command, **kw: subprocess.CompletedProcess(command, 0, _events(problem), ""))
    with pytest.raises(RuntimeError, match="native module"):
        lm.run_plan(plan, timeout=5)


NOISY_CHILD = """
import os, sys
sys.path.insert(0, sys.argv[1])
import load_memory as lm
def noisy_measure(config, emit):
    print("python noise")
    sys.stdout.flush()
    emit({"event": "sample", "step": "baseline"})
    os.write(1, b"native noise\\n")
    emit({"event": "end", "error": None})
lm.measure = noisy_measure
sys.exit(lm.child_main("--child", sys.argv[2]))
"""


def test_child_stdout_carries_only_event_lines():
    config = {"package": "p", "mode": "merged"}
    run = subprocess.run([sys.executable, "-c", NOISY_CHILD, os.path.dirname(SCRIPT), json.dumps(config)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == [json.dumps({"event": "sample", "step": "baseline"}),
                                       json.dumps({"event": "end", "error": None})]
    assert run.stderr.splitlines() == ["python noise", "native noise"]


# -- end to end, with a stand-in for coremltools and Core ML --------------------------------------
#
# Core ML cannot run here. A stand-in coremltools package reproduces what the harness must cope
# with: MLModel compiles a private copy on every call; CompiledMLModel maps the compiled
# weight.bin once per process and touches the pages of the function's blobs (FAKE_CT_MODE=map),
# copies them into private memory (copy), copies them expanding 4-bit indices to fp16 (dense),
# or leaves no proxy, as coremltools' MLModel does when Core ML fails to load (none). The
# footprint is the process's RssAnon: like phys_footprint, it ignores clean file-backed pages.

FAKE_CT = {
    "coremltools/__init__.py": '''
import enum, os
__version__ = os.environ.get("FAKE_CT_VERSION", "8.3")
class ComputeUnit(enum.Enum):
    ALL = 1
    CPU_ONLY = 2
    CPU_AND_GPU = 3
    CPU_AND_NE = 4
from . import models
''',
    "coremltools/libcoremlpython.py": '''
import os
if os.environ.get("FAKE_CT_NATIVE") == "missing":
    raise ImportError("libcoremlpython: cannot open shared object file")
''',
    "coremltools/models/__init__.py": '''
import json, mmap, os, tempfile

def log(**entry):
    with open(os.environ["FAKE_CT_LOG"], "a") as f:
        f.write(json.dumps(entry) + "\\n")

MAPS = {}  # one mapping per compiled weight file per process

class CompiledMLModel:
    def __init__(self, path, compute_units=None, function_name=None):
        mode = os.environ["FAKE_CT_MODE"]
        log(call="CompiledMLModel", path=path, function_name=function_name, unit=compute_units.name, pid=os.getpid())
        self.held = []
        if mode == "none":
            self._proxy = None
            return
        self._proxy = object()
        weights = os.path.join(path, "weights", "weight.bin")
        with open(os.path.join(path, "blobs.json")) as f:  # not the records: that would read weight.bin
            blobs = json.load(f)
        blobs = blobs[function_name] if function_name else next(iter(blobs.values()))  # None: the default
        if mode == "map":
            if weights not in MAPS:
                with open(weights, "rb") as f:
                    MAPS[weights] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                MAPS[weights].madvise(mmap.MADV_RANDOM)
            m = MAPS[weights]
            for offset, size, _ in blobs:
                for at in range(offset, offset + size, mmap.PAGESIZE):
                    m[at]
                m[offset + size - 1]
            return
        fd = os.open(weights, os.O_RDONLY)
        try:
            for offset, size, dtype in blobs:
                if mode == "dense" and dtype == "uint4":
                    self.held.append(bytearray(b"\\x01") * (size * 4))
                elif not (mode == "dense" and size <= 32):  # dense: the 16-entry LUTs are folded in
                    self.held.append(os.pread(fd, size, offset))
        finally:
            os.close(fd)

    def make_state(self):
        return object()

    def predict(self, data, state=None):
        log(call="predict", inputs=sorted(data), shapes=[list(v.shape) for v in data.values()])
        return {}

class MLModel:
    """Compiles a private copy on every call, as coremltools' MLModel does for an .mlpackage."""
    def __init__(self, path, compute_units=None, function_name=None, **kwargs):
        log(call="MLModel", path=path)
        from .utils import compile_model
        compiled = compile_model(path, os.path.join(tempfile.mkdtemp(dir=os.environ["FAKE_CT_TMP"]), "m.mlmodelc"))
        self.inner = CompiledMLModel(compiled, compute_units, function_name)
        self.__proxy__ = self.inner._proxy
''',
    "coremltools/models/utils.py": '''
import json, os
from milsurgery.package import Package
from . import log

def compile_model(model, destination_path=None):
    """The compiled weight.bin is the source's, hard-linked (same pages, nothing to write);
    blobs.json lists each function's blobs (data offset, size, dtype) for the loader."""
    log(call="compile_model", source=model, dest=destination_path)
    os.makedirs(os.path.join(destination_path, "weights"))
    with Package(model) as pkg:
        blobs = {f: [(r.blob.data_offset, r.blob.size, r.blob.dtype.name) for r in pkg.function_refs(f)]
                 for f in pkg.functions}
    with open(os.path.join(destination_path, "blobs.json"), "w") as f:
        json.dump(blobs, f)
    os.symlink(os.path.abspath(model), os.path.join(destination_path, "source.mlpackage"))
    os.link(os.path.join(model, "Data", "com.apple.CoreML", "weights", "weight.bin"),
            os.path.join(destination_path, "weights", "weight.bin"))
    return destination_path
''',
    "coremltools/models/compute_plan.py": '''
import os
from types import SimpleNamespace
from milsurgery.package import Package

class MLNeuralEngineComputeDevice: pass
class MLCPUComputeDevice: pass

class MLComputePlan:
    """Plans linear on the Neural Engine, relu on the CPU, and has no usage for add."""
    @classmethod
    def load_from_path(cls, path, compute_units=None):
        plan = cls()
        with Package(os.path.join(path, "source.mlpackage")) as pkg:
            functions = {}
            for name in pkg.functions:
                block = pkg.function(name).block_specializations[0].value
                ops = [SimpleNamespace(operator_name=op.type, blocks=[]) for op in block.operations]
                functions[name] = SimpleNamespace(block=SimpleNamespace(operations=ops))
        plan.model_structure = SimpleNamespace(program=SimpleNamespace(functions=functions))
        return plan

    def get_compute_device_usage_for_mlprogram_operation(self, op):
        device = {"linear": MLNeuralEngineComputeDevice, "relu": MLCPUComputeDevice}.get(op.operator_name)
        return None if device is None else SimpleNamespace(preferred_compute_device=device())
''',
}

LINUX_CHILD = """
import os, sys
sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[1])))
import load_memory as lm

def linux_self_memory():
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("RssAnon", "VmRSS"):
                fields[key] = int(value.split()[0]) * 1024
    # like phys_footprint: anonymous memory only, clean file-backed pages do not count
    return {"phys_footprint": fields["RssAnon"], "resident_size": fields["VmRSS"], "neural_footprint": None}

lm.self_memory = linux_self_memory
sys.exit(lm.main(sys.argv[2:]))
"""

E2E_MIB = 8  # weight MiB per function: far above the few hundred KiB a run's own allocations move


@pytest.fixture(scope="module")
def fake_ct(tmp_path_factory):
    root = tmp_path_factory.mktemp("fake_ct")
    for rel, text in FAKE_CT.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text.lstrip())
    child = root / "child.py"
    child.write_text(LINUX_CHILD)
    return {"path": str(root), "child": str(child)}


@pytest.fixture(scope="module")
def e2e_pkgs(tmp_path_factory):
    """Three functions of different shapes, half of their layers shared, fp16 and palettized,
    each function also as its own package."""
    d = tmp_path_factory.mktemp("e2e")
    out = {}
    for dtype, layers in (("fp16", E2E_MIB * 2), ("palettized4", 16)):  # 8 MiB; 2 MiB, 8 MiB dense
        path = str(d / f"{dtype}.mlpackage")
        build_llm_like(path, seq_lens={"f0": 2, "f1": 4, "f2": 8}, hidden=512, layers=layers, dtype=dtype,
                       shared_fraction=0.5)
        out[dtype] = {"path": path}
    sep = d / "fp16.separate"
    sep.mkdir()
    for f in ("f0", "f1", "f2"):
        extract(out["fp16"]["path"], [f], str(sep / f"{f}.mlpackage"), single=True)
    out["fp16"]["sep"] = str(sep)
    for weights in d.glob("**/weight.bin"):  # on disk: runs can evict the pages and watch them come back
        with open(weights, "rb") as f:
            os.fsync(f.fileno())
    return out


@pytest.fixture
def fake_env(fake_ct, tmp_path, monkeypatch):
    """Run children under the stand-in; returns a reader of its call log."""
    log = tmp_path / "ct.log"
    log.write_text("")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([fake_ct["path"], ROOT]))
    monkeypatch.setenv("FAKE_CT_LOG", str(log))
    monkeypatch.setenv("FAKE_CT_TMP", str(tmp_path))
    monkeypatch.setattr(lm, "CHILD_COMMAND", [sys.executable, fake_ct["child"], SCRIPT])
    monkeypatch.setattr(lm, "environment", lambda: {"machine": "test"})
    return lambda: [json.loads(line) for line in log.read_text().splitlines()]


def _e2e(pkg, tmp_path, monkeypatch, mode, *extra):
    monkeypatch.setenv("FAKE_CT_MODE", mode)
    args = lm.parse_args([pkg["path"], "--compute-units", "CPU_ONLY", "--compiled-dir", str(tmp_path / "compiled"),
                          *extra])
    plan = lm.build_plan(args)
    results = lm.run_plan(plan, timeout=120, tolerance=args.tolerance, tolerance_mib=args.tolerance_mib)
    return plan, results


def _verdicts(md: str, mode: str) -> dict[str, str]:
    rows = [line.split(" | ") for line in md.splitlines() if line.startswith(f"| {mode} | CPU_ONLY | f")]
    return {r[2]: r[-1].rstrip(" |") for r in rows if len(r) == 11}


def _growth(results, mode="merged") -> dict[str, dict]:
    run = next(r for r in results["runs"] if r["config"]["mode"] == mode and r["config"]["phase"] == "warm")
    steps = lm._median_steps([run])
    return {g["function"]: g for g in lm._growth(steps, run["config"]["functions"])}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the stand-in measures with /proc and fadvise")
def test_end_to_end_shared_mapping(e2e_pkgs, fake_env, tmp_path, monkeypatch):
    plan, results = _e2e(e2e_pkgs["fp16"], tmp_path, monkeypatch, "map", "--separate", e2e_pkgs["fp16"]["sep"])
    assert not [r["error"] for r in results["runs"] if r["error"]]
    calls = fake_env()
    # compiled once per package, in the parent's single compile child; never MLModel
    compiles = [c for c in calls if c["call"] == "compile_model"]
    assert [c["source"] for c in compiles] == [j["source"] for j in lm.compile_jobs(plan)]
    assert len(compiles) == 4 and not [c for c in calls if c["call"] == "MLModel"]
    loads = [c for c in calls if c["call"] == "CompiledMLModel"]
    merged_compiled = plan[0]["loads"][0]["compiled"]
    by_pid: dict[int, list] = {}
    for c in loads:
        by_pid.setdefault(c["pid"], []).append(c)
    assert len(by_pid) == 4  # a fresh process per run: cold + warm, merged + separate
    merged_runs = [cs for cs in by_pid.values() if cs[0]["path"] == merged_compiled]
    assert len(merged_runs) == 2
    for cs in merged_runs:  # every function from the one compiled model
        assert [(c["path"], c["function_name"]) for c in cs] == [(merged_compiled, f) for f in ("f0", "f1", "f2")]
    # a separate package is single-function: loaded without a function name (its default)
    assert [c["function_name"] for c in loads if c["path"] != merged_compiled] == [None] * 6
    # predictions use each function's own input shape (functions differ in sequence length)
    shapes = [c["shapes"] for c in calls if c["call"] == "predict"][:3]
    assert shapes == [[[1, 2, 512]], [[1, 4, 512]], [[1, 8, 512]]]
    predicted = {p["function"]: p for p in results["predictions"][0]["functions"]}
    growth = _growth(results)
    for f in ("f1", "f2"):
        # file side: exactly the unshared pages come in; private side: nothing
        assert growth[f]["weights"] == predicted[f]["shared_mapping_added_bytes"]
        assert abs(predicted[f]["shared_mapping_added_bytes"] - E2E_MIB * MIB // 2) < 0.01 * E2E_MIB * MIB
        assert abs(growth[f]["private"]) < MIB
    md = lm.render_markdown(results)
    assert _verdicts(md, "merged") == {"f0": "first function (includes runtime setup)", "f1": "shared mapping",
                                       "f2": "shared mapping"}
    assert set(_verdicts(md, "separate").values()) == {"either (nothing shared)"}
    # the cold run's compute plan: 16 linear ops on the Neural Engine, 16 relu on the CPU, 16 add unknown
    cold = next(r for r in results["runs"] if r["config"]["phase"] == "cold" and r["config"]["mode"] == "merged")
    assert cold["compute_plan"]["f1"] == {"neural_engine": 16, "cpu": 16, "unknown": 16}
    sep_cold = next(r for r in results["runs"] if r["config"]["phase"] == "cold" and r["config"]["mode"] == "separate")
    assert sep_cold["compute_plan"] == {f: {"neural_engine": 16, "cpu": 16, "unknown": 16} for f in ("f0", "f1", "f2")}
    assert "| merged | CPU_ONLY | f1 | 16 | 0 | 16 | 16 |  |" in md.splitlines()
    warm = next(r for r in results["runs"] if r["config"]["phase"] == "warm")
    assert warm["compute_plan"] is None
    assert warm["environment"]["weights_evicted_with"] == "posix_fadvise(DONTNEED)"
    timing = [line for line in md.splitlines() if line.startswith("| merged | CPU_ONLY | f1 | ") and line.count("|") == 8]
    assert len(timing) == 1 and all(cell.strip() for cell in timing[0].split("|")[4:8])  # cold and warm seconds


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the stand-in measures with /proc and fadvise")
def test_end_to_end_per_function_copy(e2e_pkgs, fake_env, tmp_path, monkeypatch):
    _, results = _e2e(e2e_pkgs["fp16"], tmp_path, monkeypatch, "copy")
    growth = _growth(results)
    for f in ("f1", "f2"):
        assert abs(growth[f]["private"] - E2E_MIB * MIB) < MIB
    md = lm.render_markdown(results)
    assert _verdicts(md, "merged") == {"f0": "first function (includes runtime setup)", "f1": "per-function copy",
                                       "f2": "per-function copy"}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the stand-in measures with /proc and fadvise")
def test_end_to_end_palettized_expanded_at_load(e2e_pkgs, fake_env, tmp_path, monkeypatch):
    _, results = _e2e(e2e_pkgs["palettized4"], tmp_path, monkeypatch, "dense")
    predicted = {p["function"]: p for p in results["predictions"][0]["functions"]}
    assert predicted["f1"]["dense_copy_added_bytes"] > 3.5 * predicted["f1"]["per_function_copy_added_bytes"]
    md = lm.render_markdown(results)
    assert _verdicts(md, "merged") == {"f0": "first function (includes runtime setup)", "f1": "dense copy",
                                       "f2": "dense copy"}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the stand-in measures with /proc and fadvise")
def test_end_to_end_no_predict_says_weights_may_be_untouched(e2e_pkgs, fake_env, tmp_path, monkeypatch):
    _, results = _e2e(e2e_pkgs["fp16"], tmp_path, monkeypatch, "map", "--no-predict")
    assert not [c for c in fake_env() if c["call"] == "predict"]
    verdicts = _verdicts(lm.render_markdown(results), "merged")
    assert verdicts["f1"] == "shared mapping; --no-predict: weights may never have been touched"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the stand-in measures with /proc and fadvise")
def test_end_to_end_a_missing_proxy_is_a_failed_load(e2e_pkgs, fake_env, tmp_path, monkeypatch):
    _, results = _e2e(e2e_pkgs["fp16"], tmp_path, monkeypatch, "none")
    for run in results["runs"]:
        compiled = run["config"]["loads"][0]["compiled"]
        assert run["error"] == f"load f0: LoadFailed: Core ML did not load function 'f0' of {compiled} (no model proxy)"
        assert [s["step"] for s in run["samples"]] == ["baseline"]  # no load sample recorded
    md = lm.render_markdown(results)
    assert "No warm run of this package completed." in md and "LoadFailed" in md


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="runs the stand-in")
def test_end_to_end_a_coremltools_without_native_module_stops_the_run(e2e_pkgs, fake_env, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_CT_NATIVE", "missing")
    with pytest.raises(RuntimeError, match="libcoremlpython does not import"):
        _e2e(e2e_pkgs["fp16"], tmp_path, monkeypatch, "map")
    assert fake_env() == []  # nothing compiled, nothing loaded


# -- the report -----------------------------------------------------------------------------------


def _sample(step, phys_mib, rss_mib, seconds=None, neural_mib=0, weights_mib=0, aned_mib=None):
    kind, _, function = step.partition(" ")
    memory = {"phys_footprint": round(phys_mib * MIB), "resident_size": round(rss_mib * MIB),
              "neural_footprint": round(neural_mib * MIB), "weights_resident_bytes": round(weights_mib * MIB)}
    if aned_mib is not None:
        memory["aned"] = {"phys_footprint": round(aned_mib * MIB), "neural_footprint": 0}
    return {"step": step, "kind": kind, "function": function or None, "seconds": seconds, "memory": memory}


def _run(mode, unit, samples, error=None, repeat=0, phase="warm", compute_plan=None):
    config = {"package": "/x/n2.mlpackage", "mode": mode, "compute_unit": unit, "phase": phase,
              "functions": ["f0", "f1"], "loads": [], "predict": True, "repeat": repeat}
    return {"config": config, "samples": samples, "error": error, "compute_plan": compute_plan}


def _prediction(mode, shared_f1):
    return {"package": "/x/n2.mlpackage", "mode": mode, "functions": [
        {"function": "f0", "referenced_bytes": 64 * MIB, "shared_mapping_added_bytes": 64 * MIB,
         "per_function_copy_added_bytes": 64 * MIB, "dense_copy_added_bytes": 64 * MIB},
        {"function": "f1", "referenced_bytes": 64 * MIB, "shared_mapping_added_bytes": shared_f1 * MIB,
         "per_function_copy_added_bytes": 64 * MIB, "dense_copy_added_bytes": 64 * MIB}]}


RESULTS = {
    "schema": 2,
    "environment": {"macos": "15.1", "machine": "arm64", "chip": "Apple M4", "coremltools": "8.3", "python": "3.11.9"},
    "settings": {"tolerance": 0.2, "tolerance_mib": 2.0},
    "predictions": [_prediction("merged", 32), _prediction("separate", 64)],
    "runs": [
        _run("merged", "CPU_AND_NE", [_sample("baseline", 100, 150), _sample("load f0", 110, 160, 9.5)], phase="cold",
             compute_plan={"f0": {"neural_engine": 30, "cpu": 2}, "f1": {"error": "ValueError: no plan"}}),
        # the Neural Engine copies: phys_footprint barely moves, the neural ledger takes the weights
        _run("merged", "CPU_AND_NE", [_sample("baseline", 100, 150), _sample("load f0", 110, 160, 1.5, 64, 1),
                                      _sample("predict f0", 111, 161, 0.01, 64, 1),
                                      _sample("load f1", 112, 162, 1.25, 128, 1),
                                      _sample("predict f1", 112, 162, 0.02, 128, 1)]),
        _run("separate", "CPU_AND_NE", [_sample("baseline", 100, 150), _sample("load f0", 170, 230, 1.5),
                                        _sample("predict f0", 172, 232), _sample("load f1", 238, 298),
                                        _sample("predict f1", 239, 299)]),
        # the CPU maps: RSS and weight.bin residency grow, phys_footprint does not
        _run("merged", "CPU_ONLY", [_sample("baseline", 100, 150), _sample("load f0", 101, 215, weights_mib=64),
                                    _sample("predict f0", 101, 216, weights_mib=64),
                                    _sample("load f1", 102, 250, weights_mib=96),
                                    _sample("predict f1", 102, 251, weights_mib=96)]),
        _run("separate", "CPU_ONLY", [_sample("baseline", 100, 150)], error="load f0: LoadFailed: Core ML did not load"),
    ],
}


def test_render_markdown_tables():
    md = lm.render_markdown(RESULTS)
    lines = md.splitlines()
    assert lines[0] == "# Core ML load memory per function"
    assert "macOS 15.1, arm64, Apple M4, coremltools 8.3, Python 3.11.9" in md
    assert "the larger of 2 MiB and 20% of the function's referenced weight bytes" in md
    assert "## n2.mlpackage" in lines
    # steps (warm runs only): phys_footprint, change, neural, aned, change of private, RSS, change,
    # weight.bin resident, change, seconds
    assert "| merged | CPU_AND_NE | baseline | 100.00 |  | 0.00 |  |  | 150.00 |  | 0.00 |  |  |" in lines
    assert ("| merged | CPU_AND_NE | load f0 | 110.00 | +10.00 | 64.00 |  | +74.00 | 160.00 | +10.00 | 1.00 | "
            "+1.00 | 1.50 |") in lines
    assert ("| merged | CPU_ONLY | load f1 | 102.00 | +1.00 | 0.00 |  | +1.00 | 250.00 | +34.00 | 96.00 | +32.00 |  |"
            ) in lines
    # growth per function: private (phys + neural) decides, weight.bin residency shows the file side
    assert ("| merged | CPU_AND_NE | f1 | +65.00 | +0.00 | +1.00 | 32.00 | 64.00 | 64.00 | ±12.80 | "
            "per-function copy; aned not readable: what it holds is not counted (run as root to count it) |") in lines
    assert ("| merged | CPU_ONLY | f1 | +1.00 | +32.00 | +35.00 | 32.00 | 64.00 | 64.00 | ±12.80 | "
            "shared mapping |") in lines
    assert ("| separate | CPU_AND_NE | f1 | +67.00 | +0.00 | +67.00 | 64.00 | 64.00 | 64.00 | ±12.80 | "
            "either (nothing shared) |") in lines
    assert ("| merged | CPU_AND_NE | f0 | +75.00 | +1.00 | +11.00 | 64.00 | 64.00 | 64.00 | ±12.80 | "
            "first function (includes runtime setup) |") in lines
    # cold against warm, and where the cold run's plan puts each op
    assert "| merged | CPU_AND_NE | f0 | 9.50 | 1.50 |  | 0.01 |" in lines
    assert "| merged | CPU_AND_NE | f0 | 30 | 0 | 2 | 0 |  |" in lines
    assert "| merged | CPU_AND_NE | f1 |  |  |  |  | ValueError: no plan |" in lines
    # the failed run has no rows but is reported
    assert not any(line.startswith("| separate | CPU_ONLY |") for line in lines)
    assert ("- n2.mlpackage separate CPU_ONLY warm (repeat 1): load f0: LoadFailed: Core ML did not load "
            "(1 samples kept)") in lines
    assert "medians" not in md


def test_render_markdown_counts_aned_when_readable():
    runs = [_run("merged", "CPU_AND_NE", [_sample("baseline", 100, 150, aned_mib=20),
                                          _sample("load f0", 101, 151, aned_mib=30),
                                          _sample("load f1", 102, 152, aned_mib=94)])]
    md = lm.render_markdown({"runs": runs, "predictions": [_prediction("merged", 32)], "environment": {}})
    assert "| merged | CPU_AND_NE | load f1 | 102.00 | +1.00 | 0.00 | 94.00 | +65.00 |" in md
    assert "| merged | CPU_AND_NE | f1 | +65.00 |" in md and "per-function copy |" in md and "not readable" not in md


def test_render_markdown_takes_medians_over_warm_repeats():
    runs = [_run("merged", "CPU_AND_NE", [_sample("baseline", 100, 150), _sample("load f0", 100 + g, 150 + g)],
                 repeat=i) for i, g in enumerate((10, 30, 11))]
    runs.append(_run("merged", "CPU_AND_NE", [_sample("baseline", 100, 150), _sample("load f0", 900, 950)],
                     phase="cold"))
    md = lm.render_markdown({"runs": runs, "predictions": [], "environment": {}})
    assert "| merged | CPU_AND_NE | load f0 | 111.00 | +11.00 |" in md
    assert "medians of up to 3 warm runs per configuration" in md


def test_render_markdown_when_nothing_completed():
    md = lm.render_markdown({"runs": [RESULTS["runs"][4]], "predictions": []})
    assert "No warm run of this package completed." in md and "LoadFailed" in md


# -- the script -----------------------------------------------------------------------------------


@pytest.mark.skipif(sys.platform == "darwin", reason="checks the refusal off macOS")
def test_script_off_macos_exits_2_with_one_line(pkgs):
    run = subprocess.run([sys.executable, SCRIPT, pkgs["pair"]], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert run.stdout == ""
    lines = run.stderr.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("load_memory.py: needs macOS 15+ on Apple silicon (arm64) with coremltools 8+ installed")


def test_script_plan_only_works_here(pkgs, tmp_path):
    run = subprocess.run([sys.executable, SCRIPT, pkgs["pair"], "--plan-only", "--separate", pkgs["sep_dir"],
                          "--compiled-dir", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    plan = json.loads(run.stdout)
    assert len(plan) == 12  # 3 default compute units x (merged, separate) x (cold, warm)
    assert [c["compute_unit"] for c in plan] == [u for u in DEFAULT_UNITS for _ in range(4)]
    assert {c["mode"] for c in plan} == {"merged", "separate"}
    assert not list(tmp_path.iterdir())  # planning compiles nothing


def test_script_plan_only_reports_a_bad_package(tmp_path):
    run = subprocess.run([sys.executable, SCRIPT, str(tmp_path / "none.mlpackage"), "--plan-only"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert run.stderr.startswith("load_memory.py: error:") and "does not exist" in run.stderr


def test_script_checks_the_json_destination_before_running(pkgs, tmp_path, monkeypatch):
    monkeypatch.setattr(lm, "unmet_requirement", lambda: None)  # as on a Mac
    monkeypatch.setattr(lm, "run_plan", lambda *a, **k: pytest.fail("ran before checking --json"))
    target = tmp_path / "missing" / "r.json"
    assert lm.main([pkgs["pair"], "--json", str(target)]) == 2
    assert lm.main([pkgs["pair"], "--markdown", str(tmp_path)]) == 2
