"""MIL text: the printer and the parser, checked against Apple's compiler output and coremltools.

The property: for every program the tests can make, ``parse(print(p)) == p``, proto for proto.
The programs are coremltools conversions (many op types, states, palettized and quantized
constexpr ops in both the iOS 16 and the iOS 18 forms, nested blocks, a multifunction program),
a real converter output (crepe), hand-built programs holding every immediate dtype, and random
programs from Hypothesis. The real compiled model ``add_model.mlmodelc`` (written by Apple's
compiler) must parse and print back equal modulo whitespace.
"""

from __future__ import annotations

import math
import os
import re
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ct_models
from checks import ct_load_program
from milsurgery import Package
from milsurgery._proto import milsurgery_spec_pb2 as pb
from milsurgery.errors import MilTextError
from milsurgery.miltext import DTYPE_NAMES, parse_program, print_program, read_program

HERE = os.path.dirname(os.path.abspath(__file__))
ADD_MODEL = os.path.join(HERE, "..", "..", "shared", "models", "add_model.mlmodelc")
D = pb.DataType


def _squash(text: str) -> str:
    return re.sub(r"\s+", "", text)


def assert_round_trip(program: pb.MILProgram) -> str:
    text = print_program(program)
    back = parse_program(text, "printed.mil")
    assert back == program, "parse(print(p)) differs from p"
    assert back.SerializeToString(deterministic=True) == program.SerializeToString(deterministic=True)
    assert print_program(back) == text
    return text


# -- the real compiled model ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def add_model() -> str:
    if not os.path.isdir(ADD_MODEL):
        pytest.skip("add_model.mlmodelc not found beside the checkout")
    return ADD_MODEL


def test_apple_compiler_text_parses_and_prints_back(add_model):
    path = os.path.join(add_model, "model.mil")
    original = open(path, encoding="utf-8").read()
    program, size = read_program(path)
    assert size == len(original.encode())
    fn = program.functions[0]
    assert fn.key == "main" and fn.value.opset == "CoreML6"
    ops = fn.value.block_specializations[0].value.operations
    assert [op.type for op in ops] == ["mul"] and ops[0].outputs[0].name == "var_3"
    assert [e.key for e in program.attributes] == ["buildInfo"]
    printed = print_program(program)
    assert _squash(printed) == _squash(original)
    assert printed.startswith("program(1.0)\n")
    assert parse_program(printed) == program


# -- coremltools conversions ------------------------------------------------------------------------


def _control_flow(path: str) -> str:
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    @mb.program(input_specs=[mb.TensorSpec((1, 4), dtype=types.fp32)], opset_version=ct.target.iOS17)
    def prog(x):
        pred = mb.greater(x=mb.reduce_sum(x=x), y=0.0)
        y = mb.cond(pred=pred, _true_fn=lambda: mb.add(x=x, y=1.0), _false_fn=lambda: mb.sub(x=x, y=1.0))

        def cond(i, v):
            return mb.less(x=i, y=np.int32(3))

        def body(i, v):
            return mb.add(x=i, y=np.int32(1)), mb.mul(x=v, y=2.0)

        _, v = mb.while_loop(_cond=cond, _body=body, loop_vars=(np.int32(0), y))
        parts = mb.split(x=v, num_splits=2, axis=1)
        return mb.concat(values=parts, axis=1, name="out")

    model = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS17)
    model.save(path)
    return path


def _quantized(path: str, target: str) -> str:
    import coremltools as ct
    from coremltools.optimize.coreml import OpLinearQuantizerConfig, OptimizationConfig, linear_quantize_weights

    dense = path[: -len(".mlpackage")] + "-dense.mlpackage"
    ct_models.llm_like(dense, seq_len=2, vocab=64, hidden=32, layers=1, target=target)
    model = ct.models.MLModel(dense, skip_model_load=True)
    kwargs = {"granularity": "per_block", "block_size": 16} if target == "iOS18" else {}
    config = OptimizationConfig(global_config=OpLinearQuantizerConfig(weight_threshold=256, **kwargs))
    linear_quantize_weights(model, config).save(path)
    return path


@pytest.fixture(scope="module")
def ct_programs(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("miltext")
    small = {"vocab": 64, "hidden": 32, "layers": 1}
    out = {
        "llm_ios18": ct_models.llm_like(str(d / "a.mlpackage"), seq_len=1, **small),
        "stateful": ct_models.stateful(str(d / "s.mlpackage"), hidden=16),
        "palettized_ios18": ct_models.palettized(str(d / "p.mlpackage"), nbits=4, **small),
        "palettized_ios16": ct_models.palettized(str(d / "p16.mlpackage"), nbits=2, target="iOS16", **small),
        "quantized_ios18": _quantized(str(d / "q.mlpackage"), "iOS18"),
        "quantized_ios16": _quantized(str(d / "q16.mlpackage"), "iOS16"),
        "control_flow": _control_flow(str(d / "cf.mlpackage")),
    }
    out["multifunction"] = ct_models.multifunction(
        str(d / "mf.mlpackage"), {"infer": (out["llm_ios18"], "main"), "prefill": (out["palettized_ios18"], "main")}
    )
    return out


@pytest.mark.parametrize(
    "name",
    ["llm_ios18", "stateful", "palettized_ios18", "palettized_ios16", "quantized_ios18",
     "quantized_ios16", "control_flow", "multifunction"],
)
def test_round_trip_coremltools_programs(ct_programs, name):
    with Package(ct_programs[name]) as pkg:
        text = assert_round_trip(pkg.model.mlProgram)
        ops = {op for f in pkg.functions for op in _op_types(pkg.function(f))}
    expected = {
        "llm_ios18": {"gather", "linear", "silu"},
        "stateful": {"read_state", "write_state"},
        "palettized_ios18": {"constexpr_lut_to_dense"},
        "palettized_ios16": {"constexpr_lut_to_dense"},
        "quantized_ios18": {"constexpr_blockwise_shift_scale"},
        "quantized_ios16": {"constexpr_affine_dequantize"},
        "control_flow": {"cond", "while_loop", "split", "concat"},
        "multifunction": {"constexpr_lut_to_dense", "linear"},
    }[name]
    assert expected <= ops, f"fixture lacks the ops it is meant to cover: {expected - ops}"
    if name in ("llm_ios18", "stateful", "palettized_ios18", "quantized_ios18", "multifunction"):
        assert text.startswith("program(1.3)\n") and 'name = string("' in text
    else:
        assert text.startswith("program(1.0)\n") and 'name = tensor<string, []>("' in text
    if name == "stateful":
        assert re.search(r"func main<ios18>\(tensor<fp16, \[1, 16\]> x, state<tensor<fp16, \[1, 16\]>> cache\)", text)
    if name == "multifunction":
        assert "func infer<ios18>(" in text and "func prefill<ios18>(" in text


def _op_types(fn: pb.Function) -> list[str]:
    out = []

    def visit(block):
        for op in block.operations:
            out.append(op.type)
            for b in op.blocks:
                visit(b)

    for e in fn.block_specializations:
        visit(e.value)
    return out


def test_printed_ops_match_coremltools_loader(crepe):
    """Independent check of the printer: coremltools' own loader sees the same ops, in the same
    order, with the same output names and the same blob offsets as the printed text shows."""
    prog = ct_load_program(crepe)
    theirs = [(op.op_type, [o.name for o in op.outputs]) for op in prog.functions["main"].operations]
    with Package(crepe) as pkg:
        text = print_program(pkg.model)
    ours = []
    for line in text.splitlines():
        m = re.match(r"\s+(.*?) = (\w+)\(", line)
        if m and not line.lstrip().startswith("func"):
            names = [part.rsplit(" ", 1)[1] for part in re.split(r", (?=tensor<|fp|int|bool|string)", m.group(1))]
            ours.append((m.group(2), names))
    assert ours == theirs
    offsets = [int(x) for x in re.findall(r"offset = tensor<uint64, \[\]>\((\d+)\)", text)]
    with Package(crepe) as pkg:
        assert offsets == [r.ref.offset for r in pkg.refs]


# -- every immediate dtype, by hand -----------------------------------------------------------------


def _tensor_type(dtype: int, shape, rank: int | None = None) -> pb.ValueType:
    vt = pb.ValueType()
    vt.tensorType.dataType = dtype
    vt.tensorType.rank = len(shape) if rank is None else rank
    for d in shape:
        dim = vt.tensorType.dimensions.add()
        if d is None:
            dim.unknown.variadic = False
        elif d == "*":
            dim.unknown.variadic = True
        else:
            dim.constant.size = d
    return vt


def _tensor(dtype: int, shape, field: str, values) -> pb.Value:
    v = pb.Value(type=_tensor_type(dtype, shape))
    target = getattr(v.immediateValue.tensor, field)
    if field == "bytes":
        target.values = values
    else:
        target.SetInParent()
        target.values.extend(values)
    return v


def _f16(*xs) -> bytes:
    return struct.pack(f"<{len(xs)}e", *xs)


def _every_dtype_values() -> dict[str, pb.Value]:
    return {
        "b": _tensor(D.BOOL, [3], "bools", [True, False, True]),
        "b0": _tensor(D.BOOL, [], "bools", [False]),
        "s": _tensor(D.STRING, [4], "strings", ['quote " back \\ nl \n tab \t', "\x00\x1f\x7f", "ünï©ødé ✓", ""]),
        "f16": _tensor(D.FLOAT16, [8], "bytes", _f16(0.1, -0.0, 65504.0, 2**-24, float("inf"), float("-inf"), 1.5, -3.0)),
        "f16nan": _tensor(D.FLOAT16, [3], "bytes", struct.pack("<3H", 0x7E00, 0x7C01, 0xFE00)),
        "f32": _tensor(D.FLOAT32, [5], "floats", [0.1, -1e-45, 3.4028234663852886e38, float("nan"), -0.0]),
        "f64": _tensor(D.FLOAT64, [4], "doubles", [0.1, 5e-324, -1.7976931348623157e308, float("-inf")]),
        "bf16": _tensor(D.BFLOAT16, [3], "bytes", struct.pack("<3H", 0x3F80, 0xC049, 0x7FC1)),
        "fp8a": _tensor(D.FLOAT8E4M3FN, [5], "bytes", bytes([0x00, 0x7E, 0xFE, 0x7F, 0x01])),
        "fp8b": _tensor(D.FLOAT8E5M2, [5], "bytes", bytes([0x3C, 0x7B, 0x7C, 0xFE, 0x01])),
        "i4": _tensor(D.INT4, [5], "bytes", bytes([0x87, 0x0F, 0x01])),
        "u1": _tensor(D.UINT1, [9], "bytes", bytes([0b10110001, 0x01])),
        "u2": _tensor(D.UINT2, [3], "bytes", bytes([0b00111001])),
        "u3": _tensor(D.UINT3, [5], "bytes", bytes([0b11010001, 0b01011100])),
        "u4": _tensor(D.UINT4, [5], "bytes", bytes([0x21, 0xF3, 0x00])),
        "u6": _tensor(D.UINT6, [3], "bytes", bytes([0xFF, 0x0F, 0x03])),
        "i8": _tensor(D.INT8, [3], "bytes", bytes([0x80, 0x7F, 0xFF])),
        "u8": _tensor(D.UINT8, [2, 2], "bytes", bytes([0, 1, 254, 255])),
        "u32": _tensor(D.UINT32, [2], "bytes", struct.pack("<2I", 0, 2**32 - 1)),
        "i16": _tensor(D.INT16, [2], "ints", [-32768, 32767]),
        "u16": _tensor(D.UINT16, [2], "ints", [0, 65535]),
        "i32": _tensor(D.INT32, [3], "ints", [-(2**31), 0, 2**31 - 1]),
        "i32s": _tensor(D.INT32, [], "ints", [-1]),
        "i64": _tensor(D.INT64, [2], "longInts", [-(2**63), 2**63 - 1]),
        "u64": _tensor(D.UINT64, [2], "longInts", [-1, 64]),
        "empty": _tensor(D.FLOAT32, [0, 3], "floats", []),
        "dyn": _tensor(D.INT32, [None, "*"], "ints", [1, 2]),
    }


def _containers() -> dict[str, pb.Value]:
    s = lambda text: _tensor(D.STRING, [], "strings", [text])  # noqa: E731
    i = lambda n: _tensor(D.INT32, [], "ints", [n])  # noqa: E731
    out = {}
    d = pb.Value()
    d.type.dictionaryType.keyType.CopyFrom(_tensor_type(D.STRING, []))
    d.type.dictionaryType.valueType.CopyFrom(_tensor_type(D.INT32, []))
    for k, n in (("a", 1), ("b", -2)):
        kv = d.immediateValue.dictionary.values.add()
        kv.key.CopyFrom(s(k))
        kv.value.CopyFrom(i(n))
    out["dict"] = d
    t = pb.Value()
    t.type.tupleType.types.add().CopyFrom(_tensor_type(D.STRING, []))
    t.type.tupleType.types.add().CopyFrom(_tensor_type(D.INT32, [2]))
    t.immediateValue.tuple.values.add().CopyFrom(s("x"))
    t.immediateValue.tuple.values.add().CopyFrom(_tensor(D.INT32, [2], "ints", [1, 2]))
    t.immediateValue.tuple.values.add().CopyFrom(_tensor(D.FLOAT16, [1], "bytes", _f16(2.0)))  # beyond the type
    out["tuple"] = t
    lst = pb.Value()
    lst.type.listType.type.CopyFrom(_tensor_type(D.INT32, []))
    lst.type.listType.length.constant.size = 2
    lst.immediateValue.list.values.add().CopyFrom(i(7))
    lst.immediateValue.list.values.add().CopyFrom(_tensor(D.INT64, [], "longInts", [8]))  # typed element
    out["list"] = lst
    out["empty_dict"] = pb.Value(type=d.type)
    out["empty_dict"].immediateValue.dictionary.SetInParent()
    out["no_value"] = pb.Value(type=_tensor_type(D.FLOAT32, [2]))
    out["rank"] = _tensor(D.FLOAT32, [], "floats", [])
    out["rank"].type.tensorType.rank = -1
    return out


def _program_holding(values: dict[str, pb.Value], opset: str = "CoreML8") -> pb.MILProgram:
    prog = pb.MILProgram(version=1)
    fn = prog.functions.add(key="weird name!").value
    fn.opset = opset
    fn.inputs.add(name="x").type.CopyFrom(_tensor_type(D.FLOAT32, [None, 4]))
    fn.attributes.add(key="note").value.CopyFrom(_tensor(D.STRING, [], "strings", ["f"]))
    block = fn.block_specializations.add(key=opset).value
    for name, value in values.items():
        op = block.operations.add(type="const")
        op.outputs.add(name=name).type.CopyFrom(value.type)
        op.attributes.add(key="val").value.CopyFrom(value)
        op.attributes.add(key="name").value.CopyFrom(_tensor(D.STRING, [], "strings", [name]))
    op = block.operations.add(type="custom.op")  # an input bound to an inline value and a list
    op.outputs.add(name="y.0").type.CopyFrom(_tensor_type(D.FLOAT32, [2]))
    op.outputs.add(name="y_1").type.CopyFrom(_tensor_type(D.FLOAT32, [2]))
    op.inputs.add(key="x").value.arguments.add(name="x")
    arg = op.inputs.add(key="values").value
    arg.arguments.add(name="x")
    arg.arguments.add().value.CopyFrom(_tensor(D.INT32, [], "ints", [3]))
    op.inputs.add(key="none").value.SetInParent()
    block.operations.add(type="no_outputs").inputs.add(key="a").value.arguments.add(name="y_1")
    block.outputs.extend(["y.0", "y_1"])
    second = fn.block_specializations.add(key="CoreML7").value  # a second specialization
    second.outputs.append("x")
    prog.functions.add(key="empty").value.opset = "future_opset"
    return prog


@pytest.mark.parametrize("opset", ["CoreML8", "CoreML6"])
def test_round_trip_every_immediate_dtype(opset):
    values = {**_every_dtype_values(), **_containers()}
    text = assert_round_trip(_program_holding(values, opset))
    assert set(DTYPE_NAMES.values()) - {"fp8e4m3fn", "fp8e5m2"} <= set(re.findall(r"[a-z0-9]+", text)) | {"fp8e4m3fn"}
    if opset == "CoreML8":
        assert "val = bool(false)" in text and "val = int32(-1)" in text
        assert "tensor<fp16, [8]>([0x1.998p-4, -0x0p+0, 0x1.ffcp+15, 0x1p-24, inf, -inf, 0x1.8p+0, -0x1.8p+1])" in text
        assert "[nan, nan(0x7c01), nan(0xfe00)]" in text
        assert "tensor<int4, [5]>([7, -8, -1, 0, 1])" in text and "tensor<uint4, [5]>([1, 2, 3, 15, 0])" in text
        assert "tensor<uint64, [2]>([18446744073709551615, 64])" in text
        assert '"weird name!"<ios18>' in text and '"y.0"' in text
    else:
        assert "val = tensor<bool, []>(false)" in text and '"weird name!"<ios16>' in text


def test_both_spellings_parse_to_the_same_program():
    old = 'program(1.0)\n{\n func main<ios16>(tensor<fp32, []> x) {\n tensor<int32, []> c = const()[val = tensor<int32, []>(3), name = tensor<string, []>("c")];\n } -> (c);\n}\n'
    new = 'program(1.3)\n{\n func main<ios16>(fp32 x) {\n int32 c = const()[val = int32(3), name = string("c")];\n } -> (c);\n}\n'
    assert parse_program(old) == parse_program(new)
    ten = parse_program(new).functions[0].value.block_specializations[0].value.operations[0]
    assert ten.attributes[0].value.immediateValue.tensor.ints.values == [3]


def test_decimal_literals_are_accepted_and_rounded_to_the_dtype():
    text = 'program(1.3)\n{\n func main<ios18>() {\n tensor<fp16, [3]> c = const()[val = tensor<fp16, [3]>([0.1, 1e10, -2.5e-8])];\n } -> (c);\n}\n'
    with pytest.raises(MilTextError, match=r"line 4, column \d+: .*1e10 is not representable in fp16"):
        parse_program(text)
    prog = parse_program(text.replace("1e10", "7"))
    raw = prog.functions[0].value.block_specializations[0].value.operations[0].attributes[0].value.immediateValue.tensor.bytes.values
    assert raw == np.array([0.1, 7, -2.5e-8], dtype=np.float16).tobytes()


# -- random programs ----------------------------------------------------------------------------


_SCALAR_DTYPES = [d for d in DTYPE_NAMES]


@st.composite
def _tensor_values(draw):
    dtype = draw(st.sampled_from(_SCALAR_DTYPES))
    shape = draw(st.lists(st.integers(0, 3), max_size=3))
    n = math.prod(shape)
    if dtype == D.BOOL:
        return _tensor(dtype, shape, "bools", draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    if dtype == D.STRING:
        return _tensor(dtype, shape, "strings", draw(st.lists(st.text(max_size=8), min_size=n, max_size=n)))
    if dtype == D.FLOAT32:
        return _tensor(dtype, shape, "floats", draw(st.lists(st.floats(width=32, allow_nan=False), min_size=n, max_size=n)))
    if dtype == D.FLOAT64:
        return _tensor(dtype, shape, "doubles", draw(st.lists(st.floats(allow_nan=False), min_size=n, max_size=n)))
    widths = {D.FLOAT16: 16, D.BFLOAT16: 16, D.FLOAT8E4M3FN: 8, D.FLOAT8E5M2: 8}
    if dtype in widths:
        w = widths[dtype] // 8
        return _tensor(dtype, shape, "bytes", draw(st.binary(min_size=n * w, max_size=n * w)))
    from milsurgery.miltext import _INTS, _INTS_IN_BYTES, _pack_bits

    bits, signed = _INTS[dtype]
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    ints = draw(st.lists(st.integers(lo, hi), min_size=n, max_size=n))
    if dtype in _INTS_IN_BYTES:
        raw = _pack_bits(ints, bits) if bits < 8 else b"".join((v & ((1 << bits) - 1)).to_bytes(bits // 8, "little") for v in ints)
        return _tensor(dtype, shape, "bytes", raw)
    if dtype in (D.INT64, D.UINT64):
        return _tensor(dtype, shape, "longInts", [v - (1 << 64) if v >= 1 << 63 else v for v in ints])
    return _tensor(dtype, shape, "ints", ints)


_names = st.text(min_size=1, max_size=6)


@st.composite
def _programs(draw):
    prog = pb.MILProgram(version=1)
    for fname in draw(st.lists(_names, min_size=1, max_size=2, unique=True)):
        fn = prog.functions.add(key=fname).value
        fn.opset = draw(st.sampled_from(["CoreML6", "CoreML8", "CoreML9"]))
        block = fn.block_specializations.add(key=fn.opset).value
        for k in range(draw(st.integers(0, 4))):
            op = block.operations.add(type=draw(st.sampled_from(["const", "add", "weird.op"])))
            value = draw(_tensor_values())
            op.outputs.add(name=draw(_names)).type.CopyFrom(value.type)
            op.attributes.add(key=draw(_names)).value.CopyFrom(value)
            if draw(st.booleans()):
                arg = op.inputs.add(key=draw(_names)).value
                arg.SetInParent()
                for _ in range(draw(st.integers(0, 2))):
                    b = arg.arguments.add()
                    if draw(st.booleans()):
                        b.name = draw(_names)
                    else:
                        b.value.CopyFrom(draw(_tensor_values()))
            if draw(st.integers(0, 4)) == 0:
                nested = op.blocks.add()
                nested.inputs.add(name=draw(_names)).type.CopyFrom(draw(_tensor_values()).type)
                nested.outputs.append(draw(_names))
        block.outputs.extend(draw(st.lists(_names, max_size=2)))
    return prog


@settings(max_examples=int(os.environ.get("MILSURGERY_FUZZ_EXAMPLES") or 0) or 100, deadline=None,
          derandomize=True, database=None, suppress_health_check=list(HealthCheck))
@given(_programs())
def test_round_trip_random_programs(program):
    assert_round_trip(program)


def test_show_filters_keep_nested_blocks(ct_programs, capsys):
    from milsurgery.cli import main

    assert main(["show", ct_programs["control_flow"], "main", "--ops", "add,mul"]) == 0
    text = capsys.readouterr().out
    ops = re.findall(r"^\s+[^=\n]* = (\w+)\(", text, re.M)
    assert set(ops) == {"cond", "while_loop", "add", "mul"}
    assert re.search(r"= cond\(.*\{$", text, re.M) and re.search(r"^\s+\} -> \(\w+\) \{$", text, re.M)


def test_model_mil_reads_are_bounded(tmp_path, monkeypatch):
    import milsurgery.miltext as miltext

    path = tmp_path / "model.mil"
    path.write_text("program(1.3)\n{\n}\n")
    assert read_program(path)[1] == 17
    monkeypatch.setattr(miltext, "MAX_MILTEXT_BYTES", 8)
    with pytest.raises(MilTextError, match=r"model\.mil: is too large: larger than 8 bytes"):
        read_program(path)


def test_program_1_3_text_with_function_attributes_prints_back():
    """Hand-written program(1.3) text with the short scalar spelling and a function attribute
    holding nested tuples, dictionaries and lists (as flexible-shape information is attached)."""
    text = (
        'program(1.3)\n[buildInfo = dict<string, string>({{"coremlc-component-MIL", "1.0"}})]\n{\n'
        "    func main<ios18>(tensor<int32, [1, ?]> x) [FlexibleShapeInformation = tuple<tuple<string, "
        "dict<string, tensor<int32, [?]>>>, tuple<string, dict<string, list<tensor<int32, [2]>, ?>>>>(("
        '("DefaultShapes", {{"x", [1, 1]}}), ("RangeDims", {{"x", [[1, 1], [1, 2048]]}})))] {\n'
        '            int32 var_6 = const()[name = string("op_6"), val = int32(-1)];\n'
        '            fp16 var_7 = const()[name = string("op_7"), val = fp16(0x1p-1)];\n'
        "        } -> (var_6);\n}\n"
    )
    program = parse_program(text)
    assert print_program(program) == text
    attr = program.functions[0].value.attributes[0]
    ranges = attr.value.immediateValue.tuple.values[1].immediateValue.tuple.values[1]
    dims = ranges.immediateValue.dictionary.values[0].value.immediateValue.list.values[1]
    assert list(dims.immediateValue.tensor.ints.values) == [1, 2048]
