"""``milsurgery.coreml``: the drop-in for ``coremltools.utils.save_multifunction``, and
coremltools ``MLModel`` objects accepted wherever a package path is.

The drop-in is tested by running the example of coremltools' multifunction guide (two adapter
models over a shared base, combined into one package) with its one saving line changed; the
adapters are built with coremltools' MIL builder instead of torch. Results are checked with
coremltools' spec classes, its milproto loader and C++ blob reader (tests/checks.py), and with
Apple's validator when it is present.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("coremltools")

import checks  # noqa: E402
import milsurgery  # noqa: E402
from milsurgery.errors import UsageError  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VALIDATOR = os.path.join(ROOT, "..", "shared", "tools", "coreml-validate")

# The guide's code, as it is published but for the marked line.
GUIDE = """\
import coremltools as ct
import milsurgery.coreml

desc = ct.utils.MultiFunctionDescriptor()

desc.add_function(
    "adapter_1.mlpackage",
    src_function_name="main",
    target_function_name="adapter_1"
)
desc.add_function(
    "adapter_2.mlpackage",
    src_function_name="main",
    target_function_name="adapter_2"
)

desc.default_function_name = "adapter_1"
milsurgery.coreml.save_multifunction(desc, "combined_adapters.mlpackage")  # was: ct.utils.save_multifunction
"""


def _adapter(path: str, adapter_seed: int) -> str:
    """The guide's model: a shared base linear layer followed by an adapter of its own."""
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    base_rng, rng = np.random.default_rng(0), np.random.default_rng(adapter_seed)
    base_w = base_rng.standard_normal((128, 500)).astype(np.float32) * 0.02
    base_b = base_rng.standard_normal(128).astype(np.float32) * 0.02
    ad_w = rng.standard_normal((128, 128)).astype(np.float32) * 0.02

    @mb.program(input_specs=[mb.TensorSpec((1, 500), dtype=types.fp32)], opset_version=ct.target.iOS18)
    def prog(input_adapter):
        x = mb.linear(x=input_adapter, weight=base_w, bias=base_b, name="base")
        return mb.linear(x=mb.relu(x=x), weight=ad_w, name="out_adapter")

    model = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18)
    model.save(path)
    return path


@pytest.fixture(scope="module")
def guide(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("guide")
    _adapter(str(d / "adapter_1.mlpackage"), 1)
    _adapter(str(d / "adapter_2.mlpackage"), 2)
    return str(d)


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _record_contents(pkg: str) -> set:
    return {(dtype, data) for _offset, dtype, _size, data in checks.all_records(checks.weights_dir(pkg) + "/weight.bin")}


def _check_combined(out: str, d: str) -> None:
    """The package holds both adapters, each equal to its source, base weights stored once."""
    spec = checks.ct_spec(out)
    assert checks.ct_functions(spec) == ["adapter_1", "adapter_2"]
    assert spec.description.defaultFunctionName == "adapter_1"
    for name in ("adapter_1", "adapter_2"):
        assert checks.assert_function_equivalent(out, name, os.path.join(d, f"{name}.mlpackage"), "main") > 0
    prog = checks.ct_load_program(out)
    assert set(prog.functions) == {"adapter_1", "adapter_2"}
    assert checks.ct_read_referenced_blobs(out) > 0
    # Every distinct blob content of the sources, once: the base layer's are shared.
    sources = _record_contents(os.path.join(d, "adapter_1.mlpackage")) | _record_contents(os.path.join(d, "adapter_2.mlpackage"))
    records = checks.all_records(checks.weights_dir(out) + "/weight.bin")
    assert len(records) == len(sources) and {(t, data) for _, t, _, data in records} == sources


def test_guide_example_with_one_line_changed(guide, monkeypatch):
    script = os.path.join(guide, "guide_example.py")
    with open(script, "w") as f:
        f.write(GUIDE)
    run = subprocess.run([sys.executable, script], cwd=guide, capture_output=True, text=True, env=_env())
    assert run.returncode == 0, run.stderr
    _check_combined(os.path.join(guide, "combined_adapters.mlpackage"), guide)
    # Run again, as scripts are: like coremltools, the drop-in replaces the package it wrote.
    import runpy

    monkeypatch.chdir(guide)
    runpy.run_path(script)
    _check_combined(os.path.join(guide, "combined_adapters.mlpackage"), guide)


@pytest.mark.skipif(not os.access(VALIDATOR, os.X_OK), reason="coreml-validate not found in ../shared/tools/")
def test_guide_output_passes_apples_validator(guide, tmp_path):
    out = str(tmp_path / "combined.mlpackage")
    desc = milsurgery.coreml.MultiFunctionDescriptor()
    desc.add_function(os.path.join(guide, "adapter_1.mlpackage"), "main", "adapter_1")
    desc.add_function(os.path.join(guide, "adapter_2.mlpackage"), "main", "adapter_2")
    desc.default_function_name = "adapter_1"
    milsurgery.coreml.save_multifunction(desc, out)
    run = subprocess.run([VALIDATOR, checks.spec_path(out)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert not checks.ct_spec(out).description.input  # multi-function: I/O only per function


def test_descriptor_without_coremltools(guide, tmp_path):
    """milsurgery's own descriptor, in a process where coremltools cannot be imported."""
    code = (
        "import sys\n"
        "sys.modules['coremltools'] = None  # importing it now raises ImportError\n"
        "from milsurgery.coreml import MultiFunctionDescriptor, save_multifunction\n"
        "desc = MultiFunctionDescriptor()\n"
        "desc.add_function('adapter_1.mlpackage', src_function_name='main', target_function_name='adapter_1')\n"
        "desc.add_function('adapter_2.mlpackage', src_function_name='main', target_function_name='adapter_2')\n"
        "desc.default_function_name = 'adapter_1'\n"
        f"save_multifunction(desc, {str(tmp_path / 'combined.mlpackage')!r})\n"
        "assert 'coremltools' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=guide, capture_output=True, text=True, env=_env())
    assert run.returncode == 0, run.stderr
    _check_combined(str(tmp_path / "combined.mlpackage"), guide)


def test_descriptor_mistakes_are_usage_errors(guide, tmp_path):
    import coremltools as ct

    a1 = os.path.join(guide, "adapter_1.mlpackage")
    desc = ct.utils.MultiFunctionDescriptor()
    desc.add_function(a1, "main", "adapter_1")
    with pytest.raises(UsageError, match="default_function_name must be set"):
        milsurgery.coreml.save_multifunction(desc, str(tmp_path / "x.mlpackage"))
    desc.default_function_name = "nope"
    with pytest.raises(UsageError, match="'nope' is not one of the functions"):
        milsurgery.coreml.save_multifunction(desc, str(tmp_path / "x.mlpackage"))
    with pytest.raises(UsageError, match="not a MultiFunctionDescriptor"):
        milsurgery.coreml.save_multifunction(object(), str(tmp_path / "x.mlpackage"))
    ours = milsurgery.coreml.MultiFunctionDescriptor(a1)  # add_model: every function, same names
    assert ours._functions() == {"main": (a1, "main")}
    with pytest.raises(UsageError, match="no function 'nope'"):
        ours.add_function(a1, "nope", "x")
    with pytest.raises(UsageError, match="not a MIL identifier"):
        ours.add_function(a1, "main", "bad name")
    with pytest.raises(UsageError, match="already added"):
        ours.add_function(a1, "main", "main")
    assert not os.path.exists(tmp_path / "x.mlpackage")


def test_mlmodel_objects_are_accepted_as_packages(guide, tmp_path):
    """MLModel objects (loaded from a package, or converted and saved) wherever a path goes."""
    import coremltools as ct

    a1 = ct.models.MLModel(os.path.join(guide, "adapter_1.mlpackage"), skip_model_load=True)
    a2_path = os.path.join(guide, "adapter_2.mlpackage")
    a2 = ct.models.MLModel(a2_path, skip_model_load=True)
    out = str(tmp_path / "m.mlpackage")
    report = milsurgery.merge([(a1, "main", "adapter_1"), (a2, "main", "adapter_2")], out)
    assert report.functions == ["adapter_1", "adapter_2"]
    _check_combined(out, guide)
    assert milsurgery.inspect(a1)["functions"][0]["name"] == "main"
    assert milsurgery.verify(out, [(a1, "main", "adapter_1"), (a2, "main", "adapter_2")]).equivalent
    assert milsurgery.memory_model(a2)["order"] == ["main"]
    shrunk = str(tmp_path / "s.mlpackage")
    milsurgery.shrink(a2, shrunk)
    assert checks.assert_function_equivalent(shrunk, "main", a2_path, "main") > 0
    # A model converted in this process and saved: its package path is the converted package.
    converted = ct.models.MLModel(a2_path, skip_model_load=True)
    converted.save(str(tmp_path / "saved.mlpackage"))
    assert milsurgery.inspect(converted)["functions"][0]["bytes"] == milsurgery.inspect(a2_path)["functions"][0]["bytes"]
    with pytest.raises(UsageError, match="expected a package path or a coremltools MLModel"):
        milsurgery.inspect(42)
