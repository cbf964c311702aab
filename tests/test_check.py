"""``check``: each of Apple's validator rules against a spec that breaks exactly that rule.

Specs are built with coremltools' own generated classes (``Model_pb2``), not milsurgery's, and
each is given to Apple's validator (``coreml-validate``) too: both must refuse it with the same
message. Rules of the MIL program (which Apple's validator does not read) are tested apart.
"""

from __future__ import annotations

import json
import os

import pytest
from checks import coreml_validate, have_coreml_validate

from milsurgery.check import check, spec_violations
from milsurgery.cli import main
from milsurgery.spec import pb

needs_validator = pytest.mark.skipif(
    not have_coreml_validate(), reason="Apple's coreml-validate is not beside the checkout (../shared/tools)"
)

F32 = 65568  # ArrayFeatureType.FLOAT32
F16 = 65552
INT32 = 131104
INT8 = 131080
DOUBLE = 65600


def _array(feature, shape=(1, 4), dtype=F32):
    feature.type.multiArrayType.shape.extend(shape)
    feature.type.multiArrayType.dataType = dtype
    return feature


def _program(model, names=("main",), opset="CoreML8"):
    model.mlProgram.version = 1
    for name in names:
        fn = model.mlProgram.functions[name]
        fn.opset = opset
        block = fn.block_specializations[opset]
        block.outputs.append("y")


def base(version=9):
    """A valid single-function ML program spec: input x, output y (float32 [1, 4])."""
    from coremltools.proto import Model_pb2

    m = Model_pb2.Model(specificationVersion=version)
    _array(m.description.input.add(name="x"))
    _array(m.description.output.add(name="y"))
    _program(m)
    return m


def multi(version=9):
    """A valid two-function spec: functions a and b, default a, no model-level I/O."""
    from coremltools.proto import Model_pb2

    m = Model_pb2.Model(specificationVersion=version)
    for name in ("a", "b"):
        f = m.description.functions.add(name=name)
        _array(f.input.add(name="x"))
        _array(f.output.add(name="y"))
    m.description.defaultFunctionName = "a"
    _program(m, ("a", "b"))
    return m


def _x(m):
    return m.description.input[0]


def _y(m):
    return m.description.output[0]


def _set(obj, **fields):
    for k, v in fields.items():
        setattr(obj, k, v)


def _state(m, name="s", dtype=F16, shape=(1, 4)):
    s = m.description.state.add(name=name)
    s.type.stateType.arrayType.dataType = dtype
    s.type.stateType.arrayType.shape.extend(shape)
    return s


def _image(f, w=8, h=8, cs=20):
    f.ClearField("type")
    _set(f.type.imageType, width=w, height=h, colorSpace=cs)
    return f.type.imageType


def _mutated(make, change):
    def build():
        m = make()
        change(m)
        return m

    return build


# (id, spec builder, validator function mirrored, Apple's message)
CASES = [
    ("version-missing", _mutated(base, lambda m: _set(m, specificationVersion=0)), "validateGeneric",
     "Model specification version field missing or corrupt."),
    ("version-newer", _mutated(base, lambda m: _set(m, specificationVersion=11)), "validateGeneric",
     "The model supplied is of version 11, intended for a newer version of Xcode. This version of Xcode supports model version 10 or earlier."),
    ("updatable", _mutated(base, lambda m: _set(m, isUpdatable=True)), "validateGeneric",
     "This model type is not supported for on-device update."),
    ("updatable-old", _mutated(lambda: base(3), lambda m: _set(m, isUpdatable=True)), "validateGeneric",
     "Model specification version for an updatable model must be '4' or above."),
    # validateModelLevelFeatureDescriptionsAreEmpty, one field each
    ("mf-input", _mutated(multi, lambda m: _array(m.description.input.add(name="x"))),
     "validateModelLevelFeatureDescriptionsAreEmpty", "Multi-function model must not use top level input feature description."),
    ("mf-output", _mutated(multi, lambda m: _array(m.description.output.add(name="y"))),
     "validateModelLevelFeatureDescriptionsAreEmpty", "Multi-function model must not use top level output feature description."),
    ("mf-state", _mutated(multi, lambda m: _state(m)),
     "validateModelLevelFeatureDescriptionsAreEmpty", "Multi-function model must not use top level state feature description."),
    ("mf-predicted", _mutated(multi, lambda m: _set(m.description, predictedFeatureName="y")),
     "validateModelLevelFeatureDescriptionsAreEmpty", "Multi-function model must not use top level predictedFeatureName field."),
    ("mf-probabilities", _mutated(multi, lambda m: _set(m.description, predictedProbabilitiesName="y")),
     "validateModelLevelFeatureDescriptionsAreEmpty", "Multi-function model must not use top level predictedProbabilitiesName field."),
    ("mf-training", _mutated(multi, lambda m: _array(m.description.trainingInput.add(name="x"))),
     "validateModelLevelFeatureDescriptionsAreEmpty", "Multi-function model must not use top level training input feature description."),
    # validateMultiFunctionDescription
    ("mf-version", _mutated(lambda: multi(8), lambda m: None), "validateMultiFunctionDescription",
     "Multi-function syntax is only valid in specification verison >= 9. This model has version 8"),
    ("default-without-functions", _mutated(base, lambda m: (m.description.ClearField("input"), m.description.ClearField("output"),
                                                             _set(m.description, defaultFunctionName="main"))),
     "validateMultiFunctionDescription", "The default function name 'main' is not found in the function name list: "),
    ("mf-default", _mutated(multi, lambda m: _set(m.description, defaultFunctionName="c")), "validateMultiFunctionDescription",
     "The default function name 'c' is not found in the function name list: a,b"),
    ("mf-function-feature", _mutated(multi, lambda m: m.description.functions[1].output[0].type.multiArrayType.shape.append(-2)),
     "validateFeatureDescription", "Description of multiarray feature 'y' has an invalid shape. Element 2 has non-positive value -2."),
    # validateFeatureDescriptions
    ("no-input-old", _mutated(lambda: base(8), lambda m: m.description.ClearField("input")), "validateFeatureDescriptions",
     "Empty input is only valid in specification verison >= 9. This model has version 8"),
    ("no-output", _mutated(base, lambda m: m.description.ClearField("output")), "validateFeatureDescriptions",
     "Models must have one or more outputs."),
    # validateFeatureDescription: names, types, states in the wrong list
    ("empty-name", _mutated(base, lambda m: _set(_y(m), name="")), "validateFeatureDescription",
     "Feature description must have a non-empty name."),
    ("no-type", _mutated(base, lambda m: _y(m).ClearField("type")), "validateFeatureDescription",
     "Feature description y must specify a valid feature type."),
    ("type-not-set", _mutated(base, lambda m: (_y(m).ClearField("type"), _y(m).type.SetInParent())), "validateFeatureDescription",
     "Feature description has an unspecified or invalid type for feature 'y'."),
    ("state-as-output", _mutated(base, lambda m: (_y(m).ClearField("type"), _set(_y(m).type.stateType.arrayType, dataType=F16),
                                                  _y(m).type.stateType.arrayType.shape.append(1))),
     "validateFeatureDescription", "State feature 'y' should only be declared in the state feature description."),
    ("array-as-state", _mutated(base, lambda m: _array(m.description.state.add(name="s"))), "validateFeatureDescription",
     "State feature description can declare only state features, but 's' is not."),
    # multi-array shapes, ranges, enumerated shapes, data types, default values
    ("enum-none", _mutated(base, lambda m: _x(m).type.multiArrayType.enumeratedShapes.SetInParent()), "validateFeatureDescription",
     "Description of multiarray feature 'x' has enumerated zero permitted sizes."),
    ("enum-zero-dims", _mutated(base, lambda m: _x(m).type.multiArrayType.enumeratedShapes.shapes.add()), "validateFeatureDescription",
     "Description of multiarray feature 'x' has enumerated shapes with zero dimensions."),
    ("enum-default", _mutated(base, lambda m: _x(m).type.multiArrayType.enumeratedShapes.shapes.add().shape.extend([1, 8])),
     "validateFeatureDescription",
     "Description of multiarray feature 'x' has a default shape specified  which is not within the allowed enumerated shapes specified."),
    ("range-invalid", _mutated(base, lambda m: [_x(m).type.multiArrayType.shapeRange.sizeRanges.add(lowerBound=lo, upperBound=hi)
                                                for lo, hi in ((1, 1), (5, 3))]),
     "validateFeatureDescription",
     "Description of multiarray feature 'x' has an invalid range for dimension 1. validator error: Size range is invalid (5, 3 )."),
    ("range-rank", _mutated(base, lambda m: _x(m).type.multiArrayType.shapeRange.sizeRanges.add(lowerBound=1, upperBound=-1)),
     "validateFeatureDescription", "Description of multiarray feature 'x' has a default 2-d shape but a 1-d shape range"),
    ("range-default", _mutated(base, lambda m: [_x(m).type.multiArrayType.shapeRange.sizeRanges.add(lowerBound=lo, upperBound=hi)
                                                for lo, hi in ((1, 1), (8, -1))]),
     "validateFeatureDescription", "Description of multiarray feature 'x' has a default shape that is out of the specified shape range"),
    ("no-shape", _mutated(base, lambda m: _x(m).type.multiArrayType.ClearField("shape")), "validateFeatureDescription",
     "Description of multiarray feature 'x' has missing shape constraints."),
    ("negative-dim", _mutated(base, lambda m: _x(m).type.multiArrayType.shape.append(-1)),
     "validateFeatureDescription", "Description of multiarray feature 'x' has an invalid shape. Element 2 has non-positive value -1."),
    ("fp16-old", _mutated(lambda: base(6), lambda m: _set(_y(m).type.multiArrayType, dataType=F16)), "validateFeatureDescription",
     "Description of multiarray feature 'y' has FLOAT16 dataType, which is only valid in specification version >= 7. This model has version 6"),
    ("int8-old", _mutated(base, lambda m: _set(_y(m).type.multiArrayType, dataType=INT8)), "validateFeatureDescription",
     "Description of multiarray feature 'y' has INT8 dataType, which is only valid in specification version >= 10. This model has version 9"),
    ("no-dtype", _mutated(base, lambda m: _set(_y(m).type.multiArrayType, dataType=0)), "validateFeatureDescription",
     "Description of multiarray feature 'y' has an invalid or unspecified dataType. It must be specified as DOUBLE, FLOAT32, FLOAT16 or INT32"),
    ("double-default", _mutated(base, lambda m: _set(_y(m).type.multiArrayType, doubleDefaultValue=1.0)), "validateFeatureDescription",
     "Description of multiarray feature 'y' has mistmatch between dataType and the type of default optional value."),
    ("float-default", _mutated(base, lambda m: _set(_y(m).type.multiArrayType, dataType=INT32, floatDefaultValue=1.0)),
     "validateFeatureDescription", "Description of multiarray feature 'y' has mistmatch between dataType and the type of default optional value."),
    ("int-default", _mutated(base, lambda m: _set(_y(m).type.multiArrayType, intDefaultValue=1)), "validateFeatureDescription",
     "Description of multiarray feature 'y' has mistmatch between dataType and the type of default optional value."),
    ("int8-default", _mutated(lambda: base(10), lambda m: _set(_y(m).type.multiArrayType, dataType=INT8, intDefaultValue=200)),
     "validateFeatureDescription", "The default optional value of multiarray feature 'y' is 200, which is out of range for the data type INT8."),
    # dictionaries, sequences
    ("dict-key", _mutated(base, lambda m: (_y(m).ClearField("type"), _y(m).type.dictionaryType.SetInParent())), "validateFeatureDescription",
     "Description of dictionary feature 'y' must contain a key type of either Int64 or String."),
    ("seq-range", _mutated(base, lambda m: (_y(m).ClearField("type"), _y(m).type.sequenceType.int64Type.SetInParent(),
                                            _set(_y(m).type.sequenceType.sizeRange, lowerBound=4, upperBound=2))),
     "validateFeatureDescription", "Description of sequence feature 'y' has invalid allowed sizes. validator error: Size range is invalid (4, 2 )."),
    ("seq-type", _mutated(base, lambda m: (_y(m).ClearField("type"), _y(m).type.sequenceType.sizeRange.SetInParent())),
     "validateFeatureDescription",
     "Description of sequence feature 'y' has invalid or missing type. Only Int64 and String sequences are currently supported"),
    # images
    ("image-enum-none", _mutated(base, lambda m: _image(_x(m)).enumeratedSizes.SetInParent()), "validateFeatureDescription",
     "Description of image feature 'x' has enumerated zero permitted sizes."),
    ("image-enum-default", _mutated(base, lambda m: _image(_x(m)).enumeratedSizes.sizes.add(width=4, height=4)), "validateFeatureDescription",
     "Description of image feature 'x' has a default size of 8 \u00d7 8 which is not within the allowed enumerated sizes specified."),
    ("image-width-range", _mutated(base, lambda m: _set(_image(_x(m)).imageSizeRange.widthRange, lowerBound=9, upperBound=3)),
     "validateFeatureDescription", "Description of image feature 'x' has an invalid flexible width range. validator error: Size range is invalid (9, 3 )."),
    ("image-height-range", _mutated(base, lambda m: _set(_image(_x(m)).imageSizeRange.heightRange, lowerBound=9, upperBound=3)),
     "validateFeatureDescription", "Description of image feature 'x' has an invalid flexible height range. validator error: Size range is invalid (9, 3 )."),
    ("image-default-width", _mutated(base, lambda m: (_set(_image(_x(m)).imageSizeRange.widthRange, lowerBound=16, upperBound=-1),
                                                      _set(_x(m).type.imageType.imageSizeRange.heightRange, lowerBound=1, upperBound=-1))),
     "validateFeatureDescription", "Description of image feature 'x' default width 8 is not within specified flexible width range"),
    ("image-default-height", _mutated(base, lambda m: (_set(_image(_x(m)).imageSizeRange.widthRange, lowerBound=1, upperBound=-1),
                                                       _set(_x(m).type.imageType.imageSizeRange.heightRange, lowerBound=1, upperBound=4))),
     "validateFeatureDescription", "Description of image feature 'x' default height 8 is not within specified flexible height range"),
    ("image-width", _mutated(base, lambda m: _image(_x(m), w=0)), "validateFeatureDescription",
     "Description of image feature 'x' has missing or non-positive width 0."),
    ("image-height", _mutated(base, lambda m: _image(_x(m), h=-3)), "validateFeatureDescription",
     "Description of image feature 'x' has missing or non-positive height -3."),
    ("image-gray16-old", _mutated(lambda: base(6), lambda m: _image(_x(m), cs=40)), "validateFeatureDescription",
     "Description of image feature 'x' has GRAYSCALE_FLOAT16 colorspace, which is only valid in specification version >= 7. This model has version 6"),
    ("image-colorspace", _mutated(base, lambda m: _image(_x(m), cs=0)), "validateFeatureDescription",
     "Description of image feature 'x' has missing or invalid colorspace. It must be RGB, BGR or GRAYSCALE."),
    # states
    ("state-old", _mutated(lambda: base(8), lambda m: _state(m)), "validateFeatureDescription",
     "State types are only valid in specification verison >= 9. This model has version 8"),
    ("state-optional", _mutated(base, lambda m: _set(_state(m).type, isOptional=True)), "validateFeatureDescription",
     "State feature 's' cannot be optional."),
    ("state-no-shape", _mutated(base, lambda m: _state(m, shape=())), "validateFeatureDescription",
     "Description of State feature 's' has missing shape constraints."),
    ("state-negative", _mutated(base, lambda m: _state(m, shape=(1, -4))), "validateFeatureDescription",
     "Description of State feature 's' has an invalid shape. Element 1 has non-positive value -4."),
    ("state-dtype", _mutated(base, lambda m: _state(m, dtype=F32)), "validateFeatureDescription",
     "Description of State feature 's' has an invalid or unspecified dataType. It must be specified as FLOAT16"),
    ("state-flexible", _mutated(base, lambda m: _state(m).type.stateType.arrayType.enumeratedShapes.shapes.add().shape.extend([1, 4])),
     "validateFeatureDescription", "State feature 's' cannot have flexible shape."),
    ("state-default", _mutated(base, lambda m: _set(_state(m).type.stateType.arrayType, floatDefaultValue=0.0)),
     "validateFeatureDescription", "State feature 's' cannot have default optional value."),
    # validateOptional
    ("all-inputs-optional", _mutated(base, lambda m: _set(_x(m).type, isOptional=True)), "validateOptionalNN",
     "At least one feature for a neural network must NOT be optional."),
    ("optional-output", _mutated(base, lambda m: _set(_y(m).type, isOptional=True)), "validateOptionalOutputs",
     "Outputs cannot be optional."),
    ("default-value-old", _mutated(lambda: base(4), lambda m: _set(_array(m.description.input.add(name="z")).type, isOptional=True)
                                   or _set(m.description.input[1].type.multiArrayType, floatDefaultValue=0.5)),
     "validateDefaultOptionalValues", "Default value for optional inputs is supported from specification 5 (iOS 14) onwards!"),
]


def _write(tmp_path, model) -> str:
    path = str(tmp_path / "model.mlmodel")
    with open(path, "wb") as f:
        f.write(model.SerializeToString())
    return path


def _ours(path):
    """Our view of the spec at ``path`` through milsurgery's schema."""
    m = pb.Model()
    with open(path, "rb") as f:
        m.ParseFromString(f.read())
    return m


def test_base_specs_are_valid(tmp_path):
    for build in (base, multi):
        path = _write(tmp_path, build())
        assert check(path).violations == []
        if have_coreml_validate():
            assert coreml_validate(path) == (0, "valid")


@pytest.mark.parametrize("name,build,rule,message", CASES, ids=[c[0] for c in CASES])
def test_rule(tmp_path, name, build, rule, message):
    path = _write(tmp_path, build())
    apple = spec_violations(_ours(path))
    assert [(v.rule, v.message) for v in apple] == [(rule, message)]
    report = check(path)
    assert not report.valid and report.violations[0].message == message
    if have_coreml_validate():
        assert coreml_validate(path) == (1, message)


def test_check_lists_every_violation(tmp_path):
    """Apple's validator stops at the first; check lists them all, the first being Apple's."""
    m = multi()
    _array(m.description.input.add(name="x"))
    _array(m.description.output.add(name="y"))
    m.description.defaultFunctionName = "c"
    path = _write(tmp_path, m)
    messages = [v.message for v in check(path).violations]
    assert messages == [
        "Multi-function model must not use top level input feature description.",
        "Multi-function model must not use top level output feature description.",
        "The default function name 'c' is not found in the function name list: a,b",
    ]
    if have_coreml_validate():
        assert coreml_validate(path) == (1, messages[0])


# -- the MIL program: rules Apple's validator does not read --------------------------------------

def _rename_function(m, old, new):
    m.mlProgram.functions[new].CopyFrom(m.mlProgram.functions[old])
    del m.mlProgram.functions[old]


def _add_op(m, op_type, inputs):
    from coremltools.proto import MIL_pb2

    op = m.mlProgram.functions["main"].block_specializations["CoreML8"].operations.add(type=op_type)
    for key in inputs:
        op.inputs[key].arguments.add(name="x")
    op.outputs.add(name="y").type.CopyFrom(MIL_pb2.ValueType())


MIL_CASES = [
    ("program-version", lambda m: _set(m.mlProgram, version=2), "ML program version is 2; Core ML reads version 1"),
    ("opset-block", lambda m: _set(m.mlProgram.functions["main"], opset="CoreML7"),
     "opset 'CoreML7' has no block specialization (it has ['CoreML8'])"),
    ("opset-unknown", lambda m: (m.mlProgram.functions["main"].block_specializations["iOS99"].SetInParent()),
     "opset 'iOS99' is not one of ['CoreML5', 'CoreML6', 'CoreML7', 'CoreML8', 'CoreML9']"),
    ("opset-newer", lambda m: _set(m, specificationVersion=8), "opset CoreML8 needs specification version 9 or later; this model has version 8"),
    ("function-missing", lambda m: _rename_function(m, "main", "other"),
     "function 'main' is described but not in the program"),
    ("op-input", lambda m: _add_op(m, "relu", ["x", "alpha"]),
     "op 'y' (relu) binds input 'alpha', which relu does not have in opset CoreML8 (it has x)"),
    ("const-input", lambda m: _add_op(m, "const", ["x"]),
     "op 'y' (const) binds input 'x', which const does not have in opset CoreML8 (it has val)"),
    ("op-required-input", lambda m: _add_op(m, "add", ["x"]), "op 'y' (add) lacks its required input 'y' (opset CoreML8)"),
]


@pytest.mark.parametrize("name,change,message", MIL_CASES, ids=[c[0] for c in MIL_CASES])
def test_program_rule(tmp_path, name, change, message):
    m = base()
    change(m)
    path = _write(tmp_path, m)
    violations = check(path).violations
    assert message in [v.message for v in violations] and all(v.rule == "program" for v in violations)
    if have_coreml_validate():
        assert coreml_validate(path) == (0, "valid")  # not a spec rule: Apple's validator passes it


# -- the command ----------------------------------------------------------------------------------


def test_cli_exit_codes(tmp_path, capsys):
    good = _write(tmp_path, base())
    assert main(["check", good]) == 0
    assert "valid" in capsys.readouterr().out
    m = multi()
    _array(m.description.input.add(name="x"))
    bad = str(tmp_path / "bad.mlmodel")
    with open(bad, "wb") as f:
        f.write(m.SerializeToString())
    assert main(["check", bad]) == 1
    out = capsys.readouterr().out
    assert "Multi-function model must not use top level input feature description." in out
    assert main(["check", "--json", bad]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["valid"] is False and report["violations"][0]["rule"] == "validateModelLevelFeatureDescriptionsAreEmpty"
    junk = str(tmp_path / "junk.mlmodel")
    with open(junk, "wb") as f:
        f.write(b"\xff\xff\xff")
    assert main(["check", junk]) == 2
    assert capsys.readouterr().err.startswith("milsurgery: error: ")
    assert main(["check", str(tmp_path / "missing.mlpackage")]) == 2
    os.makedirs(tmp_path / "empty.mlpackage")
    assert main(["check", str(tmp_path / "empty.mlpackage")]) == 2


def test_op_input_table_matches_coremltools():
    """milsurgery/_mil_ops.py is what tests/mil_ops_table.py makes from the installed coremltools."""
    import mil_ops_table

    with open(mil_ops_table.OUT, encoding="utf-8") as f:
        assert f.read() == mil_ops_table.render(mil_ops_table.build_table()), "regenerate: python tests/mil_ops_table.py"


def test_control_flow_states_and_lists_pass(tmp_path):
    """Ops whose proto form differs most from their Python one (cond, while_loop, write_state,
    lists) as coremltools writes them: no op-input violation."""
    import coremltools as ct
    import numpy as np
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    @mb.program(input_specs=[mb.TensorSpec((1, 4), dtype=types.fp32), mb.StateTensorSpec((1, 4), dtype=types.fp16)],
                opset_version=ct.target.iOS18)
    def prog(x, st):
        p = mb.greater(x=mb.squeeze(x=mb.reduce_sum(x=x, axes=[1], keep_dims=False)), y=0.0)
        y = mb.cond(pred=p, _true_fn=lambda: mb.add(x=x, y=1.0), _false_fn=lambda: mb.sub(x=x, y=1.0))
        _, z = mb.while_loop(_cond=lambda i, v: mb.less(x=i, y=3), _body=lambda i, v: (mb.add(x=i, y=1), mb.mul(x=v, y=2.0)),
                             loop_vars=(mb.const(val=np.int32(0)), y))
        mb.coreml_update_state(state=st, value=mb.cast(x=z, dtype="fp16"))
        ls = mb.list_write(ls=mb.make_list(init_length=2, elem_shape=[1, 4], dtype="fp32"), index=0, value=z)
        return mb.concat(values=[mb.list_read(ls=ls, index=0), z], axis=0)

    path = str(tmp_path / "cf.mlpackage")
    ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18).save(path)
    types_seen = {op.type for op in _ours(os.path.join(path, "Data", "com.apple.CoreML", "model.mlmodel"))
                  .mlProgram.functions[0].value.block_specializations[0].value.operations}
    assert {"cond", "while_loop", "write_state", "make_list", "list_write"} <= types_seen
    assert check(path).violations == []


def test_missing_required_input_is_what_coremltools_refuses(tmp_path):
    """An op without a required input: ``check`` names it, and coremltools' loader refuses the
    same spec (its own rule, applied independently)."""
    import coremltools as ct
    import numpy as np
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.frontend.milproto.load import load

    @mb.program(input_specs=[mb.TensorSpec((2, 3))], opset_version=ct.target.iOS18)
    def prog(x):
        return mb.add(x=x, y=np.ones((2, 3), np.float32), name="out")

    model = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18, skip_model_load=True)
    spec = model.get_spec()
    ops = spec.mlProgram.functions["main"].block_specializations["CoreML8"].operations
    add = next(op for op in ops if op.type == "add")
    del add.inputs["y"]
    path = _write(tmp_path, spec)
    messages = [v.message for v in check(path).violations]
    assert messages == [f"op {add.outputs[0].name!r} (add) lacks its required input 'y' (opset CoreML8)"]
    with pytest.raises(ValueError, match="Required input y is missing"):
        load(spec, specification_version=spec.specificationVersion, file_weights_dir=model.weights_dir)
