"""``check``: the rules Core ML applies to a spec before it compiles or loads it, applied offline.

Core ML refuses a model whose spec breaks the rules of its model validator. That validator is
open source (coremltools repository, ``mlmodel/src``); coremltools' Python loader does not apply
it, so a package can load in coremltools and still fail on a device. This module restates, for
ML programs, every rule that validator applies (``Model::validate`` runs ``validateGeneric`` and
nothing more for an ML program), each function below naming the C++ function it mirrors and
returning Apple's message word for word:

- ``Model.cpp`` ``validateGeneric``: specification version bounds, ``isUpdatable``, then
- ``InterfaceValidators.cpp`` ``validateModelDescription``: a multi-function model (functions
  listed, or a default function name set) has no model-level I/O
  (``validateModelLevelFeatureDescriptionsAreEmpty``), needs spec version 9 and names a listed
  default function (``validateMultiFunctionDescription``); every input, output and state of the
  model or of each function (``validateFeatureDescriptions`` in ``Validators.hpp``,
  ``validateFeatureDescription``: names, types, shapes, shape ranges, enumerated shapes, default
  values, states);
- ``validateOptional``: optional inputs and outputs of the model-level description.

Apple's validator stops at the first violation; :func:`check_model` lists every one, in the order
the validator meets them, so the first is what Core ML reports.

The MIL program itself is compiled by Apple's closed compiler; of its requirements, the ones
coremltools' loader also enforces are checked here (``mil_violations``): program version 1, each
function's opset naming one of its block specializations and known for the spec version,
description and program naming the same functions, and every op binding only inputs its
definition declares and every input it requires (the table in ``_mil_ops``, taken from
coremltools' op definitions for opsets CoreML5 to CoreML8; ops and opsets it does not define are
not judged).

Cost: reads Manifest.json and the spec, and to confirm that a package found valid opens, its blob
records; no weight bytes.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field

from ._mil_ops import OP_INPUTS, OPSETS
from ._proto import milsurgery_spec_pb2 as pb
from .errors import InvalidModelError, SpecError
from .formats import MAIN_FUNCTION, MAX_SPEC_BYTES, SPEC_FOR_OPSET
from .package import Package, locate_spec, read_input
from .spec import decode_model

__all__ = [
    "MODEL_LEVEL_IO",
    "NEWEST_SPEC_VERSION",
    "Violation",
    "CheckReport",
    "check",
    "check_model",
    "check_staged",
    "feature_problem",
    "mil_violations",
    "read_spec",
    "spec_violations",
]

#: Fields of ModelDescription that a multi-function model must leave empty.
MODEL_LEVEL_IO = ("input", "output", "state", "predictedFeatureName", "predictedProbabilitiesName", "trainingInput")

# Specification versions by release (Globals.hpp, MLMODEL_SPECIFICATION_VERSION_*).
_IOS12, _IOS13, _IOS14, _IOS16, _IOS18, _IOS26 = 3, 4, 5, 7, 9, 10
#: The newest specification version Apple's validator accepts (MLMODEL_SPECIFICATION_VERSION_NEWEST).
NEWEST_SPEC_VERSION = _IOS26

_INPUT, _OUTPUT, _STATE = "input", "output", "state"  # FeatureIOType
_A = pb.ArrayFeatureType
_INT8_MIN, _INT8_MAX = -128, 127


@dataclass(frozen=True)
class Violation:
    """One broken rule: ``rule`` names the validator function it mirrors (``program`` for the MIL
    program's rules, which Apple's validator does not apply), ``message`` is the validator's own
    text without the ``validator error:`` prefix it puts on every message, ``where`` the part of
    the spec (``description``, ``function 'f' input 'x'``...)."""

    rule: str
    message: str
    where: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message} [{self.rule}]"


@dataclass
class CheckReport:
    """What ``check`` found: every violation of a package or spec file (valid when none)."""

    path: str  # what was checked (package or spec file)
    spec_path: str
    violations: list[Violation] = field(default_factory=list)

    @property
    def valid(self) -> bool:
        return not self.violations

    def summary(self) -> str:
        if self.valid:
            return f"{self.path}: valid"
        more = f" (and {len(self.violations) - 1} more)" if len(self.violations) > 1 else ""
        return f"{self.path}: {self.violations[0]}{more}"

    def to_dict(self) -> dict:
        return {
            "path": self.path,
            "spec": self.spec_path,
            "valid": self.valid,
            "violations": [{"rule": v.rule, "message": v.message, "where": v.where} for v in self.violations],
        }


# -- feature descriptions (InterfaceValidators.cpp) -----------------------------------------------


def _size_range_problem(r: pb.SizeRange) -> str | None:
    """``validateSizeRange``. Its message is nested in others whole, with the ``validator error:``
    prefix every message of Apple's validator carries (and :class:`Violation` leaves off)."""
    if r.upperBound > 0 and r.lowerBound > r.upperBound:
        return f"validator error: Size range is invalid ({r.lowerBound}, {r.upperBound} )."
    return None


def _c_int(n: int) -> int:
    """``(int)n`` for an unsigned 64-bit value, as the C++ casts do."""
    n &= 0xFFFFFFFF
    return n - (1 << 32) if n >= 1 << 31 else n


def _multi_array_problem(name: str, a: pb.ArrayFeatureType, version: int, io: str) -> str | None:
    default = list(a.shape)
    explicit = bool(default)
    implicit = False
    if version >= _IOS12:
        flex = a.WhichOneof("ShapeFlexibility")
        if flex == "enumeratedShapes":
            implicit = True
            shapes = [list(s.shape) for s in a.enumeratedShapes.shapes]
            if not shapes:
                return f"Description of multiarray feature '{name}' has enumerated zero permitted sizes."
            if any(not s for s in shapes):
                return f"Description of multiarray feature '{name}' has enumerated shapes with zero dimensions."
            if explicit and default not in shapes:
                return (
                    f"Description of multiarray feature '{name}' has a default shape specified "
                    " which is not within the allowed enumerated shapes specified."
                )
        elif flex == "shapeRange":
            implicit = True
            ranges = list(a.shapeRange.sizeRanges)
            for i, r in enumerate(ranges):
                problem = _size_range_problem(r)
                if problem:
                    return f"Description of multiarray feature '{name}' has an invalid range for dimension {i}. {problem}"
            if explicit:
                if len(default) != len(ranges):
                    return (
                        f"Description of multiarray feature '{name}' has a default {len(default)}-d shape "
                        f"but a {len(ranges)}-d shape range"
                    )
                for d, r in zip(default, ranges):
                    if d < _c_int(r.lowerBound) or (r.upperBound >= 0 and d > r.upperBound):
                        return (
                            f"Description of multiarray feature '{name}' has a default shape that is out "
                            "of the specified shape range"
                        )
    if io == _INPUT and not explicit and not implicit:
        return f"Description of multiarray feature '{name}' has missing shape constraints."
    if explicit:
        for i, d in enumerate(default):
            if d < 0:
                return (
                    f"Description of multiarray feature '{name}' has an invalid shape. "
                    f"Element {i} has non-positive value {d}."
                )
    dtype = a.dataType
    if dtype == _A.FLOAT16 and version < _IOS16:
        return (
            f"Description of multiarray feature '{name}' has FLOAT16 dataType, which is only valid in "
            f"specification version >= {_IOS16}. This model has version {version}"
        )
    if dtype == _A.INT8 and version < _IOS26:
        return (
            f"Description of multiarray feature '{name}' has INT8 dataType, which is only valid in "
            f"specification version >= {_IOS26}. This model has version {version}"
        )
    if dtype not in (_A.DOUBLE, _A.FLOAT32, _A.INT32, _A.FLOAT16, _A.INT8):
        return (
            f"Description of multiarray feature '{name}' has an invalid or unspecified dataType. "
            "It must be specified as DOUBLE, FLOAT32, FLOAT16 or INT32"
        )
    mismatch = f"Description of multiarray feature '{name}' has mistmatch between dataType and the type of default optional value."
    kind = a.WhichOneof("defaultOptionalValue")
    if kind == "doubleDefaultValue" and dtype != _A.DOUBLE:
        return mismatch
    if kind == "floatDefaultValue" and dtype not in (_A.FLOAT32, _A.FLOAT16):
        return mismatch
    if kind == "intDefaultValue":
        if dtype == _A.INT8 and not _INT8_MIN <= a.intDefaultValue <= _INT8_MAX:
            return (
                f"The default optional value of multiarray feature '{name}' is {a.intDefaultValue}, "
                "which is out of range for the data type INT8."
            )
        if dtype not in (_A.INT32, _A.INT8):
            return mismatch
    return None


def _image_problem(name: str, im: pb.ImageFeatureType, version: int) -> str | None:
    width, height = im.width, im.height
    has_default = width > 0 and height > 0
    if version >= _IOS12:
        flex = im.WhichOneof("SizeFlexibility")
        if flex == "enumeratedSizes":
            sizes = list(im.enumeratedSizes.sizes)
            if not sizes:
                return f"Description of image feature '{name}' has enumerated zero permitted sizes."
            if not has_default:
                width, height = _c_int64(sizes[0].width), _c_int64(sizes[0].height)
            elif not any(width == _c_int64(s.width) and height == _c_int64(s.height) for s in sizes):
                return (
                    f"Description of image feature '{name}' has a default size of {width} \u00d7 {height} "
                    "which is not within the allowed enumerated sizes specified."
                )
        elif flex == "imageSizeRange":
            wr, hr = im.imageSizeRange.widthRange, im.imageSizeRange.heightRange
            problem = _size_range_problem(wr)
            if problem:
                return f"Description of image feature '{name}' has an invalid flexible width range. {problem}"
            problem = _size_range_problem(hr)
            if problem:
                return f"Description of image feature '{name}' has an invalid flexible height range. {problem}"
            if not has_default:
                width, height = _c_int64(wr.lowerBound), _c_int64(hr.lowerBound)
            else:
                if width < _c_int64(wr.lowerBound) or (wr.upperBound >= 0 and width > wr.upperBound):
                    return f"Description of image feature '{name}' default width {width} is not within specified flexible width range"
                if height < _c_int64(hr.lowerBound) or (hr.upperBound >= 0 and height > hr.upperBound):
                    return f"Description of image feature '{name}' default height {height} is not within specified flexible height range"
    if width <= 0:
        return f"Description of image feature '{name}' has missing or non-positive width {im.width}."
    if height <= 0:
        return f"Description of image feature '{name}' has missing or non-positive height {im.height}."
    cs = pb.ImageFeatureType.ColorSpace
    if im.colorSpace == cs.GRAYSCALE_FLOAT16:
        if version < _IOS16:
            return (
                f"Description of image feature '{name}' has GRAYSCALE_FLOAT16 colorspace, which is only "
                f"valid in specification version >= {_IOS16}. This model has version {version}"
            )
    elif im.colorSpace not in (cs.GRAYSCALE, cs.RGB, cs.BGR):
        return f"Description of image feature '{name}' has missing or invalid colorspace. It must be RGB, BGR or GRAYSCALE."
    return None


def _c_int64(n: int) -> int:
    """``(int64_t)n`` for an unsigned 64-bit value."""
    return n - (1 << 64) if n >= 1 << 63 else n


def _state_problem(name: str, t: pb.FeatureType, version: int) -> str | None:
    if version < _IOS18:
        return f"State types are only valid in specification verison >= {_IOS18}. This model has version {version}"
    if t.isOptional:
        return f"State feature '{name}' cannot be optional."
    a = t.stateType.arrayType
    if not a.shape:
        return f"Description of State feature '{name}' has missing shape constraints."
    for i, d in enumerate(a.shape):
        if d < 0:
            return f"Description of State feature '{name}' has an invalid shape. Element {i} has non-positive value {d}."
    if a.dataType not in (_A.FLOAT16, _A.INT8):
        return f"Description of State feature '{name}' has an invalid or unspecified dataType. It must be specified as FLOAT16"
    if a.WhichOneof("ShapeFlexibility") is not None:
        return f"State feature '{name}' cannot have flexible shape."
    if a.WhichOneof("defaultOptionalValue") is not None:
        return f"State feature '{name}' cannot have default optional value."
    return None


def feature_problem(desc: pb.FeatureDescription, version: int, io: str) -> str | None:
    """``validateFeatureDescription``: Apple's message for the first rule ``desc`` breaks, or None.
    ``io`` is ``"input"``, ``"output"`` or ``"state"`` (which list holds the feature)."""
    name = desc.name
    if not name:
        return "Feature description must have a non-empty name."
    if not desc.HasField("type"):
        return f"Feature description {name} must specify a valid feature type."
    t = desc.type
    kind = t.WhichOneof("Type")
    if kind == "stateType":
        if io not in (_STATE, _INPUT):
            return f"State feature '{name}' should only be declared in the state feature description."
    elif io == _STATE:
        return f"State feature description can declare only state features, but '{name}' is not."
    if kind in ("doubleType", "int64Type", "stringType"):
        return None
    if kind == "multiArrayType":
        return _multi_array_problem(name, t.multiArrayType, version, io)
    if kind == "dictionaryType":
        if t.dictionaryType.WhichOneof("KeyType") is None:
            return f"Description of dictionary feature '{name}' must contain a key type of either Int64 or String."
        return None
    if kind == "imageType":
        return _image_problem(name, t.imageType, version)
    if kind == "sequenceType":
        if version < _IOS12:
            return f"Sequence types are only valid in specification verison >= {_IOS12}. This model has version {version}"
        problem = _size_range_problem(t.sequenceType.sizeRange)
        if problem:
            return f"Description of sequence feature '{name}' has invalid allowed sizes. {problem}"
        if t.sequenceType.WhichOneof("Type") is None:
            return (
                f"Description of sequence feature '{name}' has invalid or missing type. "
                "Only Int64 and String sequences are currently supported"
            )
        return None
    if kind == "stateType":
        return _state_problem(name, t, version)
    return f"Feature description has an unspecified or invalid type for feature '{name}'."


def _feature_descriptions(d, version: int, where: str) -> list[Violation]:
    """``validateFeatureDescriptions`` (Validators.hpp) for a ModelDescription or a
    FunctionDescription, under the ML program policy (empty input allowed from version 9)."""
    rule = "validateFeatureDescriptions"
    out = []
    if not d.input and version < _IOS18:
        out.append(Violation(rule, f"Empty input is only valid in specification verison >= {_IOS18}. This model has version {version}", where))
    if not d.output:
        out.append(Violation(rule, "Models must have one or more outputs.", where))
    for io in (_INPUT, _OUTPUT, _STATE):
        for f in getattr(d, io):
            problem = feature_problem(f, version, io)
            if problem:
                out.append(Violation("validateFeatureDescription", problem, f"{where} {io} {f.name!r}"))
    return out


def _model_level_io_empty(d: pb.ModelDescription) -> list[Violation]:
    """``validateModelLevelFeatureDescriptionsAreEmpty``."""
    words = {
        "input": "input feature description",
        "output": "output feature description",
        "state": "state feature description",
        "predictedFeatureName": "predictedFeatureName field",
        "predictedProbabilitiesName": "predictedProbabilitiesName field",
        "trainingInput": "training input feature description",
    }
    return [
        Violation(
            "validateModelLevelFeatureDescriptionsAreEmpty",
            f"Multi-function model must not use top level {words[name]}.",
            f"description.{name}",
        )
        for name in MODEL_LEVEL_IO
        if (len(getattr(d, name)) if name in ("input", "output", "state", "trainingInput") else getattr(d, name))
    ]


def _multi_function(d: pb.ModelDescription, version: int) -> list[Violation]:
    """``validateMultiFunctionDescription``."""
    out = []
    if version < _IOS18:
        out.append(Violation(
            "validateMultiFunctionDescription",
            f"Multi-function syntax is only valid in specification verison >= {_IOS18}. This model has version {version}",
            "specificationVersion",
        ))
    names = []
    for f in d.functions:
        out += _feature_descriptions(f, version, f"function {f.name!r}")
        names.append(f.name)
    if d.defaultFunctionName not in names:
        out.append(Violation(
            "validateMultiFunctionDescription",
            f"The default function name '{d.defaultFunctionName}' is not found in the function name list: {','.join(names)}",
            "description.defaultFunctionName",
        ))
    return out


def _optional(model: pb.Model) -> list[Violation]:
    """``validateOptional`` for an ML program: default values, then ``validateOptionalNN``,
    then ``validateOptionalOutputs``, all on the model-level description."""
    d = model.description
    out = []
    for f in d.input:
        if f.type.isOptional and f.type.multiArrayType.WhichOneof("defaultOptionalValue") is not None:
            if model.specificationVersion < _IOS14:
                out.append(Violation(
                    "validateDefaultOptionalValues",
                    "Default value for optional inputs is supported from specification 5 (iOS 14) onwards!",
                    f"description input {f.name!r}",
                ))
                break
    required = any(f.type.WhichOneof("Type") == "stateType" or not f.type.isOptional for f in d.input)
    if d.input and not required:
        out.append(Violation("validateOptionalNN", "At least one feature for a neural network must NOT be optional.", "description.input"))
    for f in d.output:
        if f.type.isOptional:
            out.append(Violation("validateOptionalOutputs", "Outputs cannot be optional.", f"description output {f.name!r}"))
            break
    return out


def spec_violations(model: pb.Model) -> list[Violation]:
    """Apple's validator (``Model::validateGeneric``) on an ML program's spec, every violation."""
    version = model.specificationVersion
    if version == 0:
        return [Violation("validateGeneric", "Model specification version field missing or corrupt.", "specificationVersion")]
    if version > NEWEST_SPEC_VERSION:
        return [Violation(
            "validateGeneric",
            f"The model supplied is of version {version}, intended for a newer version of Xcode. "
            f"This version of Xcode supports model version {NEWEST_SPEC_VERSION} or earlier.",
            "specificationVersion",
        )]
    d = model.description
    out: list[Violation] = []
    # validateModelDescription
    if d.functions or d.defaultFunctionName:
        out += _model_level_io_empty(d)
        out += _multi_function(d, version)
    else:
        out += _feature_descriptions(d, version, "description")
    if model.isUpdatable:
        if version < _IOS13:
            message = f"Model specification version for an updatable model must be '{_IOS13}' or above."
        else:
            message = "This model type is not supported for on-device update."
        out.append(Violation("validateGeneric", message, "isUpdatable"))
    out += _optional(model)
    return out


def mil_violations(model: pb.Model) -> list[Violation]:
    """What the MIL program needs that can be checked without Apple's compiler (coremltools'
    ``milproto`` loader refuses the same): program version 1; each function's opset one of its
    block specializations and known for the spec version; the description and the program
    naming the same functions (a single-function model's one function is ``main``); op inputs
    declared by the op's definition, and the ones it requires present."""
    out = []
    prog = model.mlProgram
    if prog.version != 1:
        out.append(Violation("program", f"ML program version is {prog.version}; Core ML reads version 1", "mlProgram.version"))
    names = [e.key for e in prog.functions]
    for e in prog.functions:
        where = f"function {e.key!r}"
        keys = [b.key for b in e.value.block_specializations]
        opset = e.value.opset
        if opset not in keys:
            out.append(Violation("program", f"opset {opset!r} has no block specialization (it has {keys})", where))
        for key in keys:
            needed = SPEC_FOR_OPSET.get(key)
            if needed is None:
                out.append(Violation("program", f"opset {key!r} is not one of {sorted(SPEC_FOR_OPSET)}", where))
            elif needed > model.specificationVersion:
                out.append(Violation(
                    "program",
                    f"opset {key} needs specification version {needed} or later; this model has version "
                    f"{model.specificationVersion}",
                    where,
                ))
        for key in keys:
            block = e.value.block_specializations[keys.index(key)].value
            out += _op_input_violations(block, key, where)
    described = [f.name for f in model.description.functions] or [MAIN_FUNCTION]
    for name in described:
        if name not in names:
            out.append(Violation("program", f"function {name!r} is described but not in the program", "mlProgram.functions"))
    for name in names:
        if name not in described:
            out.append(Violation("program", f"function {name!r} is in the program but not described", "description.functions"))
    return out


@functools.lru_cache(maxsize=None)
def _op_inputs(op_type: str, opset: str) -> tuple[frozenset[str], frozenset[str]] | None:
    """The input names coremltools' definition of ``op_type`` declares in ``opset`` and the
    required ones among them, or None when it has none for them (an op or opset it does not
    define). Names starting with ``_`` are set by coremltools from nested blocks, not bound."""
    changes = OP_INPUTS.get(op_type)
    if changes is None or opset not in OPSETS:
        return None
    found = None
    for first, names, required in changes:
        if OPSETS.index(first) <= OPSETS.index(opset):
            found = (frozenset(names), frozenset(n for n in required if not n.startswith("_")))
    return found


def _op_input_violations(block: pb.Block, opset: str, where: str) -> list[Violation]:
    """Inputs an op binds that its definition in ``opset`` does not declare, and required inputs
    it binds neither as an input nor as an attribute (the form of ``const`` and the iOS16
    constexpr ops), in ``block`` and the blocks nested in it. Ops or opsets coremltools does not
    define are not judged."""
    out = []
    for op in block.operations:
        known = _op_inputs(op.type, opset)
        if known is not None:
            names, required = known
            label = f"op {op.outputs[0].name!r}" if op.outputs else "op"
            for e in op.inputs:
                if e.key not in names:
                    out.append(Violation(
                        "program",
                        f"{label} ({op.type}) binds input {e.key!r}, which {op.type} does not have in "
                        f"opset {opset} (it has {', '.join(sorted(n for n in names if not n.startswith('_'))) or 'none'})",
                        where,
                    ))
            given = {e.key for e in op.inputs} | {e.key for e in op.attributes}
            for name in sorted(required - given):
                out.append(Violation("program", f"{label} ({op.type}) lacks its required input {name!r} (opset {opset})", where))
        for nested in op.blocks:
            out += _op_input_violations(nested, opset, where)
    return out


def check_model(model: pb.Model) -> list[Violation]:
    """Every rule ``model`` breaks: Apple's validator's (:func:`spec_violations`) first, then the
    MIL program's (:func:`mil_violations`). Raises :class:`SpecError` if it is not an ML program."""
    if model.WhichOneof("Type") != "mlProgram":
        raise SpecError("<spec>", "not an ML program (check applies the rules for ML programs only)")
    return spec_violations(model) + mil_violations(model)


def read_spec(path: str, root: str | None = None) -> pb.Model:
    """Parse the spec file at ``path`` without judging it (that is :func:`check_model`'s job).

    The file is read as every package file is (:func:`milsurgery.package.read_input`): inside
    ``root`` (default: its own directory), a regular file opened without blocking, at most
    :data:`MAX_SPEC_BYTES` read."""
    data = read_input(
        root if root is not None else os.path.dirname(path), path, MAX_SPEC_BYTES,
        fault=lambda message: SpecError(path, f"spec file {message}"),
    )
    return decode_model(data, path, "check applies the rules for ML programs only")


def check(path: str | os.PathLike, *, weights: bool = True) -> CheckReport:
    """Check a package (a ``.mlpackage`` directory) or a spec file (``model.mlmodel``).

    Returns a report listing every violation (empty: valid). Raises a :class:`MilSurgeryError`
    subclass when the input cannot be read (no manifest, not a Model protobuf, not an ML program)
    and, for a package whose spec breaks no rule, when opening it fails (``weights``: every blob
    record and reference is validated as :class:`milsurgery.Package` does), so a package reported
    valid also opens. Reads Manifest.json, the spec and (with ``weights``) the 64-byte blob
    records; no weight bytes.
    """
    path = os.path.abspath(os.fspath(path))
    is_package = os.path.isdir(path)
    spec_path = locate_spec(path) if is_package else path
    model = read_spec(spec_path, path if is_package else None)
    report = CheckReport(path, spec_path, check_model(model))
    if report.valid and is_package and weights:
        Package(path).close()
    return report


def check_staged(staged: str, dest: str) -> None:
    """Check the spec of a package staged in ``staged`` that is to become ``dest``; raise
    :class:`InvalidModelError` naming ``dest`` and every violation if Core ML would refuse it.
    Reads Manifest.json and the spec."""
    report = check(staged, weights=False)
    if not report.valid:
        raise InvalidModelError(dest, report.violations)
