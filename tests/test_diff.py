"""``diff``: I/O, ops aligned by structure, and weights whose bytes differ.

Fixtures are coremltools conversions of the same network at two sequence lengths (``infer`` and
``prefill``: same weights) and with another seed (different weights), merged with
``save_multifunction``. Which weights differ is checked against coremltools' milproto loader
(numpy values of every const), not against milsurgery's reader.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest

import ct_models
from checks import ct_load_program
from compiled_layout import lay_out_compiled
from milsurgery import diff
from milsurgery.cli import main
from milsurgery.diff import render_diff

SMALL = {"vocab": 64, "hidden": 32, "layers": 2}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("diff")
    infer = ct_models.llm_like(str(d / "infer.mlpackage"), seq_len=1, **SMALL)
    prefill = ct_models.llm_like(str(d / "prefill.mlpackage"), seq_len=8, **SMALL)
    other = ct_models.llm_like(str(d / "other.mlpackage"), seq_len=1, seed=3, **SMALL)
    mf = ct_models.multifunction(str(d / "mf.mlpackage"), {"infer": (infer, "main"), "prefill": (prefill, "main")})
    return {"infer": infer, "prefill": prefill, "other": other, "mf": mf, "dir": str(d)}


def test_infer_and_prefill_differ_only_in_shapes(models, capsys):
    report = diff(f"{models['mf']}:infer", f"{models['mf']}:prefill")
    assert report.io == [
        "-input input_ids: multiArray int32 [1, 1]", "+input input_ids: multiArray int32 [1, 8]",
        "-output logits: multiArray fp32 [1, 1, 64]", "+output logits: multiArray fp32 [1, 8, 64]",
    ]
    assert report.changed and all(c.changes == ["shape"] for c in report.changed)
    assert not report.added and not report.removed and not report.weights
    linears = [c for c in report.changed if c.a.endswith("(linear)")]
    assert len(linears) == 2 * 6 + 1  # every linear's output has the sequence dimension
    assert all("[1, 1, " in c.details[0] and "[1, 8, " in c.details[0] for c in linears)
    besides = diff(f"{models['mf']}:infer", f"{models['mf']}:prefill", shapes=False)
    assert besides.identical and besides.unchanged == report.unchanged + len(report.changed)
    assert main(["diff", f"{models['mf']}:infer", f"{models['mf']}:prefill", "--ignore-shapes"]) == 0
    assert "no differences besides shapes" in capsys.readouterr().out
    assert main(["diff", f"{models['mf']}:infer", f"{models['mf']}:prefill"]) == 1
    text = capsys.readouterr().out
    assert text.startswith(f"--- {models['mf']}:infer\n+++ {models['mf']}:prefill\n")
    assert re.search(r"^-tensor<fp16, \[1, 1, 32\]> l0_q_cast_fp16 = linear\(", text, re.M)
    assert re.search(r"^\+tensor<fp16, \[1, 8, 32\]> l0_q_cast_fp16 = linear\(", text, re.M)


def test_weights_that_differ_are_named_with_sizes(models, capsys):
    report = diff(models["infer"], models["other"])
    ours = {w["op_a"]: (w["bytes_a"], w["bytes_b"]) for w in report.weights}
    # independent: the const values coremltools loads, compared with numpy
    a, b = ct_load_program(models["infer"]), ct_load_program(models["other"])
    va = {op.outputs[0].name: op.outputs[0].val for op in a.functions["main"].operations if op.op_type == "const"}
    vb = {op.outputs[0].name: op.outputs[0].val for op in b.functions["main"].operations if op.op_type == "const"}
    differ = {n for n in va if isinstance(va[n], np.ndarray) and va[n].size > 16 and not np.array_equal(va[n], vb[n])}
    assert set(ours) == differ and differ
    assert all(ours[n] == (va[n].nbytes, vb[n].nbytes) for n in differ)
    assert report.weight_bytes_compared >= sum(x for x, _ in ours.values())
    assert not report.io and not report.added and not report.removed
    assert all(c.changes == ["weights"] for c in report.changed)
    assert main(["diff", models["infer"], models["other"], "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["identical"] is False and {w["op_a"] for w in out["weights"]} == differ
    same = diff(models["infer"], f"{models['mf']}:infer")
    assert same.identical, render_diff(same)


def test_ops_align_by_structure_when_names_differ(models, tmp_path):
    """B is A compiled with every variable renamed and one op added: each op of A pairs with its
    counterpart (a name change only) and the new op is the one addition."""
    compiled = lay_out_compiled(models["infer"], str(tmp_path / "renamed.mlmodelc"))
    mil = os.path.join(compiled, "model.mil")
    text = open(mil, encoding="utf-8").read()
    names = re.findall(r"^\s+\S+(?:, \S+)* (\w+) = ", text, re.M)
    for i, name in enumerate(sorted(set(names), key=len, reverse=True)):
        if name not in ("logits",):
            text = re.sub(rf"\b{name}\b", f"v{i}", text)
    lines = text.splitlines()
    at = next(i for i, line in enumerate(lines) if " = silu(" in line)
    var = re.search(r"(\w+) = silu", lines[at]).group(1)
    lines.insert(at + 1, f'            tensor<fp16, [1, 1, 128]> extra = relu(x = {var})[name = string("extra")];')
    open(mil, "w", encoding="utf-8").write("\n".join(lines) + "\n")
    report = diff(models["infer"], compiled)
    assert report.added == [f'tensor<fp16, [1, 1, 128]> extra = relu(x = {var})[name = string("extra")]']
    assert not report.removed and not report.weights and not report.io
    assert report.changed and all(set(c.changes) == {"name"} for c in report.changed)


def test_diff_errors_are_one_line(models, capsys):
    assert main(["diff", f"{models['mf']}:nope", models["infer"]]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no function 'nope'" in err
    assert main(["diff", f"{models['mf']}:infer=x", models["infer"]]) == 2
    assert "diff takes PATH[:FUNC]" in capsys.readouterr().err
