"""Fuzzing the model.mil parser: hostile text never escapes as anything but the one-line error.

Inputs are mutations of a valid printed program (holding every immediate dtype, containers,
nested blocks and blob references), random sequences of MIL tokens, and pinned extremes: absurd
nesting, huge numbers, unterminated strings, NUL bytes. Each must parse or raise
:class:`MilTextError` whose message is one line naming the file, line and column. Text that
parses must print and parse back to the same program. Runs are deterministic and write no
Hypothesis database; ``MILSURGERY_FUZZ_EXAMPLES=N`` runs N examples per test.
"""

from __future__ import annotations

import os
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from milsurgery.errors import MilSurgeryError, MilTextError
from milsurgery.miltext import MAX_DEPTH, parse_program, print_program
from test_miltext import _containers, _every_dtype_values, _program_holding

PATH = "fuzz/model.mil"
_EXAMPLES = int(os.environ.get("MILSURGERY_FUZZ_EXAMPLES") or 0)
_SEED = print_program(_program_holding({**_every_dtype_values(), **_containers()}))
_MESSAGE = re.compile(r"fuzz/model\.mil: line \d+, column \d+: [^\n]+\Z")


def fuzz_settings(examples: int):
    return settings(max_examples=_EXAMPLES or examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


def check(text: str) -> None:
    try:
        program = parse_program(text, PATH)
    except MilTextError as exc:
        assert _MESSAGE.match(str(exc)), str(exc)
        return
    except MilSurgeryError as exc:  # pragma: no cover - a failure, shown with its class
        raise AssertionError(f"{type(exc).__name__} instead of MilTextError: {exc}")
    assert parse_program(print_program(program), PATH) == program


_MUTATION = st.tuples(
    st.sampled_from(["delete", "insert", "replace", "duplicate"]),
    st.integers(0, len(_SEED)),
    st.integers(1, 40),
    st.sampled_from(list('()[]{}<>,;=?*"\\-+.x0123456789 \n') + ["tensor<", "BLOBFILE(", "nan(", "0x", "1e999", "func", "->",
                                                                "\x00", "é", "99999999999999999999999"]),
)


def mutate(text: str, ops) -> str:
    for kind, at, n, piece in ops:
        at = min(at, len(text))
        if kind == "delete":
            text = text[:at] + text[at + n :]
        elif kind == "insert":
            text = text[:at] + piece + text[at:]
        elif kind == "replace":
            text = text[:at] + piece + text[at + len(piece) :]
        else:
            text = text[:at] + text[at : at + n] + text[at:]
    return text


@fuzz_settings(200)
@given(st.lists(_MUTATION, min_size=1, max_size=4))
def test_mutated_text_parses_or_fails_with_one_line(ops):
    check(mutate(_SEED, ops))


_TOKENS = ["program", "(", "1.3", ")", "[", "]", "{", "}", "<", ">", ",", "=", ";", "->", "func", "main", "ios18",
           "tensor", "fp16", "int32", "string", "bool", "uint64", "list", "tuple", "dict", "state", "x", '"s"', "1", "-1",
           "0x1p+0", "nan", "inf", "true", "BLOBFILE", "path", "offset", "?", "*", "const", "name", "val", "[1, 2]"]


@fuzz_settings(200)
@given(st.lists(st.sampled_from(_TOKENS), max_size=60))
def test_token_soup_parses_or_fails_with_one_line(tokens):
    check(" ".join(tokens))


_FUNC = 'program(1.3)\n{{\n    func main<ios18>() {{\n{body}\n        }} -> ();\n}}\n'


@pytest.mark.parametrize(
    "text",
    [
        "program(1.3)\n{\n" + "tensor<" * 100_000,
        _FUNC.format(body="int32 c = const()[val = " + "tuple<" * 5000 + "int32" + ">" * 5000 + "(1)];"),
        _FUNC.format(body="int32 c = const()[val = tensor<int32, [1]>(" + "[" * 100_000 + "1" + "]" * 100_000 + ")];"),
        _FUNC.format(body="x = cond(p = q) " + "{ x = cond(p = q) " * 2000 + "} -> ();" * 2000 + "} -> ();"),
        _FUNC.format(body='int32 c = const()[val = int32(' + "9" * 100_000 + ")];"),
        _FUNC.format(body="int32 c = const()[val = int32(99999999999999999999)];"),
        _FUNC.format(body="fp32 c = const()[val = fp32(0x1p99999999999)];"),
        _FUNC.format(body="fp32 c = const()[val = fp32(1e99999)];"),
        _FUNC.format(body="fp16 c = const()[val = fp16(0x1.0000001p+0)];"),
        _FUNC.format(body="uint4 c = const()[val = uint4(16)];"),
        _FUNC.format(body="tensor<fp32, [99999999999999999999999]> c = const()[];"),
        _FUNC.format(body='string c = const()[name = string("unterminated)];'),
        _FUNC.format(body='string c = const()[name = string("bad \\q escape")];'),
        'program(1.3)\n{\n    func main<ios18>() {\n string c = const()[name = string("' + "a" * 100_000,
        _FUNC.format(body="fp32 c = const()[val = fp32(nan(0x1))];"),
        _FUNC.format(body="int32 c = const()[val = BLOBFILE(path = string(\"x\"), offset = uint64(1))];"),
        _FUNC.format(body='fp16 c = const()[val = fp16(BLOBFILE(path = int32(1), offset = uint64(1)))];'),
        _FUNC.format(body="\x00"),
        "program(1.3)\n{\n    func main<ios18>() {} -> ();\n    func main<ios18>() {} -> ();\n}\n",
        "program(1.3) { } trailing",
        "program(99999999999999999999.3) { }",
        "",
        "\ufeffprogram(1.0) { }",
    ],
    ids=lambda t: re.sub(r"\W+", "_", t[:12] + "_" + t[-40:])[:60],
)
def test_extremes_fail_with_one_line(text):
    with pytest.raises(MilTextError) as info:
        parse_program(text, PATH)
    assert _MESSAGE.match(str(info.value)), str(info.value)


def test_nesting_limit_is_named():
    text = _FUNC.format(body="int32 c = const()[val = " + "tuple<" * (MAX_DEPTH + 5) + "int32" + ">" * (MAX_DEPTH + 5) + "(1)];")
    with pytest.raises(MilTextError, match=rf"line 4, column \d+: nested more than {MAX_DEPTH} levels deep"):
        parse_program(text, PATH)


# -- compiled model folders ------------------------------------------------------------------------

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.text(max_size=6) | st.sampled_from(
        ["MultiArray", "State", "Float16", "Int32", "[1, 4]", "[[1, 4]]", "1", "Image", "main", "f"]),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(
        st.sampled_from(["name", "type", "dataType", "shape", "shapeRange", "isOptional", "hasShapeFlexibility",
                         "inputSchema", "outputSchema", "stateSchema", "functions", "defaultFunctionName",
                         "specificationVersion", "userDefinedMetadata", "author"]), children, max_size=4),
    max_leaves=12,
)


@pytest.fixture(scope="module")
def compiled_seed(tmp_path_factory) -> str:
    import numpy as np

    import minipkg
    from compiled_layout import lay_out_compiled

    d = tmp_path_factory.mktemp("fuzz-compiled")
    pkg = minipkg.make(str(d / "seed.mlpackage"), {
        "f": [("float16", np.arange(16, dtype=np.float16).reshape(4, 4))],
        "g": [("uint4", np.array([1, 2, 3, 4, 5])), 0],
    })
    return lay_out_compiled(pkg, str(d / "seed.mlmodelc"))


@fuzz_settings(50)
@given(meta=_JSON, ops=st.lists(_MUTATION, max_size=2), where=st.sampled_from(["top", "item", "function"]))
def test_compiled_folders_fail_only_with_milsurgery_errors(compiled_seed, tmp_path_factory, meta, ops, where):
    import json
    import shutil

    from milsurgery import inspect_package, open_model, show

    d = str(tmp_path_factory.mktemp("case") / "m.mlmodelc")
    shutil.copytree(compiled_seed, d)
    with open(os.path.join(d, "metadata.json")) as f:
        original = json.load(f)
    if where == "top":
        doc = meta
    elif where == "item":
        doc = [meta] if isinstance(meta, dict) else [{"functions": meta}]
    else:
        original[0]["functions"][0]["inputSchema"] = [meta]
        doc = original
    with open(os.path.join(d, "metadata.json"), "w") as f:
        json.dump(doc, f)
    mil = os.path.join(d, "model.mil")
    with open(mil, encoding="utf-8") as f:
        text = f.read()
    with open(mil, "w", encoding="utf-8") as f:
        f.write(mutate(text, ops))
    for call in (lambda: open_model(d).close(), lambda: inspect_package(d), lambda: show(d)):
        try:
            call()
        except MilSurgeryError as exc:
            assert "\n" not in str(exc) and d in str(exc), str(exc)
