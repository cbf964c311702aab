"""Compiled ``.mlmodelc`` models as inputs: inspect, show, verify, merge and extract sources.

The real compiled model ``add_model.mlmodelc`` (Apple's compiler) is read as it is. Other
compiled models are folders laid out from packages (``compiled_layout.py``): the printed program
as ``model.mil``, the package's weight file, a ``metadata.json`` in the compiler's form. Outputs
written from compiled sources are checked with coremltools' generated classes, its milproto
loader and its C++ blob reader.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import textwrap

import pytest

import ct_models
from checks import assert_function_equivalent, ct_load_program, ct_read_referenced_blobs, ct_spec
from compiled_layout import lay_out_compiled
from milsurgery import CompiledModel, Package, append, extract, inspect_package, merge, open_model, show, verify
from milsurgery.cli import main
from milsurgery.errors import FormatError, MilTextError, PackageError
from milsurgery.memory import memory_model

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
ADD_MODEL = os.path.join(HERE, "..", "..", "shared", "models", "add_model.mlmodelc")


@pytest.fixture(scope="module")
def add_model() -> str:
    if not os.path.isdir(ADD_MODEL):
        pytest.skip("add_model.mlmodelc not found beside the checkout")
    return os.path.abspath(ADD_MODEL)


@pytest.fixture(scope="module")
def built(tmp_path_factory, crepe) -> dict[str, str]:
    d = tmp_path_factory.mktemp("compiled")
    small = {"vocab": 64, "hidden": 32, "layers": 1}
    infer = ct_models.llm_like(str(d / "infer.mlpackage"), seq_len=1, **small)
    prefill = ct_models.llm_like(str(d / "prefill.mlpackage"), seq_len=4, **small)
    mf = ct_models.multifunction(str(d / "mf.mlpackage"), {"infer": (infer, "main"), "prefill": (prefill, "main")})
    stateful = ct_models.stateful(str(d / "state.mlpackage"), hidden=16)
    return {
        "crepe": crepe,
        "crepe_c": lay_out_compiled(crepe, str(d / "crepe.mlmodelc")),
        "infer": infer,
        "prefill": prefill,
        "mf": mf,
        "mf_c": lay_out_compiled(mf, str(d / "mf.mlmodelc")),
        "mf_bare_c": lay_out_compiled(mf, str(d / "mf-bare.mlmodelc"), functions_in_metadata=False),
        "stateful": stateful,
        "stateful_c": lay_out_compiled(stateful, str(d / "state.mlmodelc")),
    }


def _fresh(src: str, tmp_path) -> str:
    dst = str(tmp_path / os.path.basename(src))
    shutil.copytree(src, dst)
    return dst


# -- Apple's compiled model -----------------------------------------------------------------------


def test_inspect_real_compiled_model(add_model, capsys):
    meta = json.load(open(os.path.join(add_model, "metadata.json")))[0]
    info = inspect_package(add_model)
    assert info["container"] == "mlmodelc" and info["unrecovered"] == []
    assert info["spec_version"] == meta["specificationVersion"] == 7
    (fn,) = info["functions"]
    assert fn["name"] == "main" and fn["opset"] == ["CoreML6"] and fn["op_types"] == {"mul": 1}
    assert [(f["name"], f["dtype"], f["shape"]) for f in fn["inputs"]] == [
        (s["name"], "fp16", s["shape"]) for s in meta["inputSchema"]
    ]
    assert [f["name"] for f in fn["outputs"]] == [s["name"] for s in meta["outputSchema"]] == ["var_3"]
    assert info["metadata"]["userDefined"] == meta["userDefinedMetadata"]
    assert info["weight_files"] == [] and info["spec_bytes"] == os.path.getsize(os.path.join(add_model, "model.mil"))
    assert main(["inspect", add_model, "--json", "--memory"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["memory"]["functions"][0]["referenced_bytes"] == 0


def test_show_real_compiled_model_prints_its_model_mil(add_model, capsys):
    assert main(["show", add_model]) == 0
    printed = capsys.readouterr().out
    original = open(os.path.join(add_model, "model.mil"), encoding="utf-8").read()
    assert re.sub(r"\s+", "", printed) == re.sub(r"\s+", "", original)


# -- compiled layouts of packages -----------------------------------------------------------------


def test_inspect_compiled_equals_inspect_of_its_package(built):
    for pkg, compiled in (("crepe", "crepe_c"), ("mf", "mf_c"), ("stateful", "stateful_c")):
        a, b = inspect_package(built[pkg]), inspect_package(built[compiled])
        assert b["container"] == "mlmodelc" and a["container"] == "mlpackage"
        for key in ("functions", "shared", "duplicates", "unreferenced", "default_function", "mixed_opsets"):
            assert a[key] == b[key], key
        assert [w["by_dtype"] for w in a["weight_files"]] == [w["by_dtype"] for w in b["weight_files"]]
        ma, mb = memory_model(built[pkg]), memory_model(built[compiled])
        assert ma["functions"] == mb["functions"]
    states = inspect_package(built["stateful_c"])["functions"][0]["states"]
    assert [(s["name"], s["type"], s["shape"]) for s in states] == [("cache", "stateType", "[1, 16]")]


def test_multifunction_without_descriptions_is_rebuilt_from_signatures(built):
    with open_model(built["mf_bare_c"]) as m:
        assert isinstance(m, CompiledModel) and sorted(m.functions) == ["infer", "prefill"]
        for name in m.functions:
            assert f"function {name!r}: I/O not described in metadata.json, rebuilt from its MIL signature" in m.unrecovered
        with Package(built["mf"]) as p:
            for name in m.functions:
                assert [f.name for f in m.descriptions[name].input] == [f.name for f in p.descriptions[name].input]
                assert list(m.descriptions[name].input[0].type.multiArrayType.shape) == list(
                    p.descriptions[name].input[0].type.multiArrayType.shape)
    assert verify(built["mf_bare_c"], [built["mf"]]).equivalent


def test_verify_compiled_against_its_package(built, capsys):
    for compiled, pkg in (("crepe_c", "crepe"), ("mf_c", "mf"), ("stateful_c", "stateful")):
        report = verify(built[compiled], [built[pkg]])
        assert report.equivalent, report.summary()
        with Package(built[pkg]) as p:
            per_function = [{(r.ref.file_name, r.ref.offset) for r in p.function_refs(f)} for f in p.functions]
            assert sum(c.blobs_compared for c in report.checks) == sum(map(len, per_function)) > 0
    assert verify(built["mf"], [built["mf_c"]]).equivalent  # a compiled model as the source
    assert main(["verify", built["mf_c"], "--against", f"{built['infer']}:main=infer", f"{built['prefill']}:main=prefill"]) == 0
    assert "infer: equivalent" in capsys.readouterr().out


def test_verify_compiled_finds_a_changed_byte_naming_the_op(built, tmp_path, capsys):
    compiled = _fresh(built["crepe_c"], tmp_path)
    with Package(built["crepe"]) as p:
        ref = p.refs[5]
        data_offset, op = ref.blob.data_offset, ref.ref.op_name
    path = os.path.join(compiled, "weights", "weight.bin")
    with open(path, "r+b") as f:
        f.seek(data_offset + 3)
        byte = f.read(1)
        f.seek(data_offset + 3)
        f.write(bytes([byte[0] ^ 1]))
    assert main(["verify", compiled, "--against", built["crepe"]]) == 1
    out = capsys.readouterr().out
    assert "DIFFERS" in out and f"op {op!r} (const)" in out and "blob at offset" in out


def test_verify_compiled_finds_a_changed_op_naming_it(built, tmp_path, capsys):
    compiled = _fresh(built["crepe_c"], tmp_path)
    mil = os.path.join(compiled, "model.mil")
    text = open(mil, encoding="utf-8").read()
    m = re.search(r"(\S+) = relu\(", text)
    assert m, "crepe has relu ops"
    open(mil, "w", encoding="utf-8").write(text[: m.start()] + m.group(1) + " = sigmoid(" + text[m.end():])
    assert main(["verify", compiled, "--against", built["crepe"]]) == 1
    out = capsys.readouterr().out
    assert f"op {m.group(1)!r} (sigmoid): type differ" in out


def test_merge_and_extract_take_compiled_sources(built, tmp_path):
    out = str(tmp_path / "merged.mlpackage")
    report = merge([f"{built['mf_c']}:infer", f"{built['stateful_c']}:main=stateful"], out)
    assert any("coremldata.bin" in w for w in report.warnings)
    assert assert_function_equivalent(out, "infer", built["mf"], "infer") > 0
    assert assert_function_equivalent(out, "stateful", built["stateful"], "main") > 0
    spec = ct_spec(out)
    assert [f.name for f in spec.description.functions] == ["infer", "stateful"]
    assert spec.description.functions[1].state[0].name == "cache"
    assert ct_read_referenced_blobs(out) > 0
    assert verify(out, [f"{built['mf']}:infer", f"{built['stateful']}:main=stateful"]).equivalent
    append(out, [f"{built['crepe_c']}:main=crepe"])
    assert assert_function_equivalent(out, "crepe", built["crepe"], "main") > 0
    assert ct_read_referenced_blobs(out) > 0
    single = str(tmp_path / "prefill.mlpackage")
    extract(built["mf_c"], ["prefill"], single, single=True)
    assert assert_function_equivalent(single, "main", built["prefill"], "main") > 0
    prog = ct_load_program(single)
    assert "main" in prog.functions


def test_show_of_compiled_filters_functions_and_ops(built):
    text = show(built["mf_c"], ["prefill"], ops=["linear"])
    assert "func prefill<ios18>" in text and "func infer" not in text
    assert set(re.findall(r"^\s+[^=\n]* = (\w+)\(", text, re.M)) == {"linear"}
    elided = show(built["mf_c"], values=False)
    assert "values..." in elided or "BLOBFILE" in elided


# -- faults ----------------------------------------------------------------------------------------


def test_compiled_faults_are_one_precise_error(built, tmp_path, capsys):
    compiled = _fresh(built["stateful_c"], tmp_path)
    mil = os.path.join(compiled, "model.mil")
    text = open(mil, encoding="utf-8").read()
    lines = text.splitlines(keepends=True)
    lines[4] = lines[4].replace("(", "((", 1)
    open(mil, "w", encoding="utf-8").write("".join(lines))
    with pytest.raises(MilTextError, match=r"model\.mil: line 5, column \d+: "):
        open_model(compiled)
    for argv in (["inspect", compiled], ["show", compiled], ["verify", compiled, "--against", built["stateful"]]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("milsurgery: error: ") and "line 5, column" in err
    open(mil, "w", encoding="utf-8").write(text)
    open(os.path.join(compiled, "metadata.json"), "w").write("[{")
    with pytest.raises(FormatError, match=r"metadata\.json at offset 2: not valid JSON"):
        open_model(compiled)
    open(os.path.join(compiled, "metadata.json"), "w").write('[{"inputSchema": [{"name": "x", "type": "MultiArray", "dataType": "Float16", "shape": "[1, x]"}]}]')
    with pytest.raises(FormatError, match=r"inputSchema\[0\]\.shape: '\[1, x\]' is not a list of sizes"):
        open_model(compiled)
    os.remove(mil)
    with pytest.raises(PackageError, match="model.mil: missing: not a compiled ML program"):
        open_model(compiled)
    with open(mil, "wb") as f:
        f.write(b"program(1.3)\n\xff")
    with pytest.raises(MilTextError, match=r"line 2, column 1: not valid UTF-8"):
        open_model(compiled)


def test_compiled_blob_reference_outside_weights_is_refused(built, tmp_path):
    compiled = _fresh(built["stateful_c"], tmp_path)
    mil = os.path.join(compiled, "model.mil")
    text = open(mil, encoding="utf-8").read().replace("@model_path/weights/weight.bin", "@model_path/weights/../../x.bin", 1)
    open(mil, "w", encoding="utf-8").write(text)
    with pytest.raises(PackageError, match="leaves the package's weights directory"):
        open_model(compiled)


# -- flat memory -----------------------------------------------------------------------------------


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmHWM from /proc")
def test_show_of_weights_larger_than_memory_stays_flat(tmp_path):
    """A package whose weight.bin holds a 64 GiB fp16 blob (a sparse file) shows in flat memory."""
    from milsurgery.blobfile import BlobWriter
    from milsurgery.package import StagedPackage
    from minipkg import blob_value, const_op

    elements = 32 << 30  # fp16: 64 GiB
    pkg = str(tmp_path / "huge.mlpackage")
    model = ct_models_free_model(elements, blob_value, const_op)
    with StagedPackage(pkg, sync=False) as staged:
        path = staged.weight_path("weight.bin")
        with BlobWriter(path, sync=False) as w:
            w.add_array("float16", [0.0])
        with open(path, "r+b") as f:  # make the one record claim 64 GiB of data, left sparse
            f.seek(64)
            f.write(struct.pack("<IIQQQ", 0xDEADBEEF, 1, 2 * elements, 128, 0) + bytes(32))
            try:
                f.truncate(128 + 2 * elements)
            except OSError:
                pytest.skip("this file system cannot hold a sparse 64 GiB file")
        staged.commit(model)
    assert os.path.getsize(os.path.join(pkg, "Data", "com.apple.CoreML", "weights", "weight.bin")) > 64 << 30
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {ROOT!r})
        import io, contextlib
        from milsurgery.cli import main
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            assert main(["show", {pkg!r}]) == 0
        assert "tensor<fp16, [{elements}]>(BLOBFILE(path = string(\\"@model_path/weights/weight.bin\\"), offset = uint64(64)))" in buf.getvalue()
        print([int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')][0])
    """)
    peak_kib = int(subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True).stdout)
    assert peak_kib < 150 * 1024, f"peak RSS {peak_kib} KiB"


def ct_models_free_model(elements, blob_value, const_op):
    from milsurgery._proto import milsurgery_spec_pb2 as pb

    model = pb.Model(specificationVersion=9)
    model.mlProgram.version = 1
    fn = model.mlProgram.functions.add(key="main").value
    fn.opset = "CoreML8"
    block = fn.block_specializations.add(key="CoreML8").value
    block.operations.append(const_op("w", blob_value("float16", [elements], 64)))
    block.outputs.append("w")
    out = model.description.output.add(name="w")
    out.type.multiArrayType.shape.append(elements)
    out.type.multiArrayType.dataType = pb.ArrayFeatureType.FLOAT16
    return model
