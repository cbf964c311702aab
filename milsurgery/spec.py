"""The model spec (``model.mlmodel``): parsing, the function view, and finding blob references.

milsurgery's schema (``proto/milsurgery_spec.proto``) declares protobuf maps as repeated entries,
so an unchanged spec serializes back to the bytes it was parsed from. The helpers here give
map-like access to those entries.

A single-function model has no ``description.functions``: its one function is ``main`` and its
I/O lives at model level. :func:`function_descriptions` hides that difference.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

from google.protobuf.message import DecodeError

from ._proto import milsurgery_spec_pb2 as pb
from .errors import SpecError
from .formats import (
    BLOB_DTYPE_BY_PROTO,
    MAIN_FUNCTION,
    MAX_SPEC_BYTES,
    MIN_MLPROGRAM_SPEC_VERSION,
    MULTIFUNCTION_SPEC_VERSION,
)

__all__ = [
    "pb",
    "decode_model",
    "parse_spec",
    "entries",
    "entry",
    "function_descriptions",
    "program_functions",
    "BlobRef",
    "iter_blob_refs",
    "blanked_value",
    "values_in_value",
    "op_type_histogram",
    "tensor_element_count",
]


def decode_model(data: bytes, path: str, why: str) -> pb.Model:
    """Decode spec bytes into a Model that holds an ML program, judging nothing else; ``why``
    ends the message when it is not an ML program."""
    if len(data) > MAX_SPEC_BYTES:
        raise SpecError(path, f"spec is {len(data)} bytes, more than the {MAX_SPEC_BYTES}-byte limit")
    if not data:
        raise SpecError(path, "spec is empty")
    model = pb.Model()
    try:
        model.ParseFromString(data)
    except (DecodeError, RecursionError, ValueError) as exc:
        raise SpecError(path, f"not a valid Model protobuf ({exc})") from None
    if model.WhichOneof("Type") != "mlProgram":
        raise SpecError(path, f"field mlProgram (502): not an ML program ({why})")
    return model


def parse_spec(data: bytes, path: str) -> pb.Model:
    """Parse and check a spec: an ML program whose description and program agree on functions."""
    model = decode_model(
        data, path, "milsurgery handles ML programs only; neural networks and pipelines are not supported"
    )
    version = model.specificationVersion
    if version < MIN_MLPROGRAM_SPEC_VERSION:
        raise SpecError(
            path,
            f"field specificationVersion (1): {version} is below {MIN_MLPROGRAM_SPEC_VERSION}, "
            "the first version with ML programs",
        )
    names = [e.key for e in model.mlProgram.functions]
    if "" in names or any(not f.name for f in model.description.functions):
        raise SpecError(path, "a function has an empty name")
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise SpecError(path, f"program defines function {dup[0]!r} more than once")
    described = [f.name for f in model.description.functions]
    if described:
        if version < MULTIFUNCTION_SPEC_VERSION:
            raise SpecError(
                path,
                f"description lists functions but specificationVersion is {version}; "
                f"multifunction models need {MULTIFUNCTION_SPEC_VERSION} or later",
            )
        if len(set(described)) != len(described):
            dup = sorted({n for n in described if described.count(n) > 1})
            raise SpecError(path, f"description lists function {dup[0]!r} more than once")
        for name in described:
            if name not in names:
                raise SpecError(
                    path, f"function {name!r} is listed in description.functions but missing from the program"
                )
        for name in names:
            if name not in described:
                raise SpecError(
                    path, f"function {name!r} is in the program but not listed in description.functions"
                )
        default = model.description.defaultFunctionName
        if default not in described:
            raise SpecError(
                path,
                f"field description.defaultFunctionName (21): {default!r} is not one of the "
                f"functions {described}",
            )
    elif names != [MAIN_FUNCTION]:
        raise SpecError(
            path,
            f"single-function model must define exactly one function {MAIN_FUNCTION!r}, "
            f"found {names}",
        )
    return model


def entries(repeated_entries) -> dict:
    """A map field (declared as repeated entries) as a ``dict`` of key -> value message."""
    return {e.key: e.value for e in repeated_entries}


def entry(repeated_entries, key: str):
    """The value of ``key`` in a map field, or ``None``."""
    for e in repeated_entries:
        if e.key == key:
            return e.value
    return None


def program_functions(model: pb.Model) -> dict[str, pb.Function]:
    """Function name -> Function message, in program order."""
    return entries(model.mlProgram.functions)


def function_descriptions(model: pb.Model) -> dict[str, pb.FunctionDescription]:
    """Function name -> FunctionDescription, in description order.

    A single-function model's description is built from its model-level input, output, state,
    predictedFeatureName and predictedProbabilitiesName, under the name ``main``.
    """
    desc = model.description
    if desc.functions:
        return {f.name: f for f in desc.functions}
    main = pb.FunctionDescription(
        name=MAIN_FUNCTION,
        predictedFeatureName=desc.predictedFeatureName,
        predictedProbabilitiesName=desc.predictedProbabilitiesName,
    )
    main.input.extend(desc.input)
    main.output.extend(desc.output)
    main.state.extend(desc.state)
    return {MAIN_FUNCTION: main}


def default_function(model: pb.Model) -> str:
    return model.description.defaultFunctionName if model.description.functions else MAIN_FUNCTION


def tensor_element_count(tensor_type: pb.TensorType) -> int | None:
    """Elements of a tensor type with constant dimensions, else ``None``."""
    dims = []
    for d in tensor_type.dimensions:
        if d.WhichOneof("dimension") != "constant":
            return None
        dims.append(d.constant.size)
    return math.prod(dims)


@dataclass
class BlobRef:
    """One reference from a spec to a blob: which function and op, and where in the op."""

    function: str
    op_type: str  # "" for references outside operations (function or program attributes)
    op_name: str  # first output name of the op, or ""
    location: str  # e.g. "attributes[val]", "inputs[weight][0]", "function.attributes[x]"
    value: pb.Value  # the Value message itself (mutable: rewriting it rewrites the spec)

    @property
    def file_name(self) -> str:
        return self.value.blobFileValue.fileName

    @property
    def offset(self) -> int:
        return self.value.blobFileValue.offset

    def describe(self) -> str:
        where = f"op {self.op_name!r} ({self.op_type}) " if self.op_type else ""
        return f"function {self.function!r} {where}{self.location}"


def values_in_value(value: pb.Value, where: str) -> Iterator[tuple[str, pb.Value]]:
    """A Value and every Value nested in it (tuples, lists, dictionaries, type attributes)."""
    yield where, value
    yield from _values_in_type(value.type, where + ".type")
    if value.WhichOneof("value") == "immediateValue":
        imm = value.immediateValue
        kind = imm.WhichOneof("value")
        if kind in ("tuple", "list"):
            for i, v in enumerate(getattr(imm, kind).values):
                yield from values_in_value(v, f"{where}.{kind}[{i}]")
        elif kind == "dictionary":
            for i, kv in enumerate(imm.dictionary.values):
                yield from values_in_value(kv.key, f"{where}.dictionary[{i}].key")
                yield from values_in_value(kv.value, f"{where}.dictionary[{i}].value")


def blanked_value(value: pb.Value) -> bytes:
    """``value`` serialized with every nested blob reference's file name and offset cleared: two
    values with equal results differ at most in where their blobs are stored."""
    copy = pb.Value()
    copy.CopyFrom(value)
    for _, v in values_in_value(copy, ""):
        if v.WhichOneof("value") == "blobFileValue":
            v.blobFileValue.fileName = ""
            v.blobFileValue.offset = 0
    return copy.SerializeToString(deterministic=True)


def _values_in_type(vtype: pb.ValueType, where: str) -> Iterator[tuple[str, pb.Value]]:
    kind = vtype.WhichOneof("type")
    if kind == "tensorType":
        for e in vtype.tensorType.attributes:
            yield from values_in_value(e.value, f"{where}.attributes[{e.key}]")
    elif kind == "listType":
        yield from _values_in_type(vtype.listType.type, where + ".list")
    elif kind == "tupleType":
        for i, t in enumerate(vtype.tupleType.types):
            yield from _values_in_type(t, f"{where}.tuple[{i}]")
    elif kind == "dictionaryType":
        yield from _values_in_type(vtype.dictionaryType.keyType, where + ".key")
        yield from _values_in_type(vtype.dictionaryType.valueType, where + ".value")
    elif kind == "stateType":
        yield from _values_in_type(vtype.stateType.wrappedType, where + ".state")


def _values_in_attributes(attrs, where: str) -> Iterator[tuple[str, pb.Value]]:
    for e in attrs:
        yield from values_in_value(e.value, f"{where}attributes[{e.key}]")


def _values_in_named_types(named, where: str) -> Iterator[tuple[str, pb.Value]]:
    for nv in named:
        yield from _values_in_type(nv.type, f"{where}[{nv.name}].type")


def _iter_block(function: str, block: pb.Block, prefix: str) -> Iterator[BlobRef]:
    for where, v in _values_in_attributes(block.attributes, prefix + "block."):
        yield BlobRef(function, "", "", where, v)
    for where, v in _values_in_named_types(block.inputs, prefix + "block.inputs"):
        yield BlobRef(function, "", "", where, v)
    for op in block.operations:
        op_name = op.outputs[0].name if op.outputs else ""
        found: list[tuple[str, pb.Value]] = []
        for where, v in _values_in_attributes(op.attributes, ""):
            found.append((where, v))
        for e in op.inputs:
            for i, binding in enumerate(e.value.arguments):
                if binding.WhichOneof("binding") == "value":
                    found.extend(values_in_value(binding.value, f"inputs[{e.key}][{i}]"))
        found.extend(_values_in_named_types(op.outputs, "outputs"))
        for where, v in found:
            yield BlobRef(function, op.type, op_name, prefix + where, v)
        for i, nested in enumerate(op.blocks):
            yield from _iter_block(function, nested, f"{prefix}{op.type}:{op_name}.blocks[{i}].")


def iter_function_values(name: str, function: pb.Function) -> Iterator[BlobRef]:
    """Every Value reachable from a function (attributes, input types, all blocks and ops)."""
    for where, v in _values_in_attributes(function.attributes, "function."):
        yield BlobRef(name, "", "", where, v)
    for where, v in _values_in_named_types(function.inputs, "function.inputs"):
        yield BlobRef(name, "", "", where, v)
    for e in function.block_specializations:
        yield from _iter_block(name, e.value, f"[{e.key}]" if len(function.block_specializations) > 1 else "")


def iter_blob_refs(model: pb.Model, functions: list[str] | None = None) -> Iterator[BlobRef]:
    """Every blob reference of the program, as :class:`BlobRef`, in program order.

    ``functions`` limits the walk to those functions. Program-level attributes are reported
    under function ``""`` (they belong to no function) and only when ``functions`` is None.
    """
    if functions is None:
        for where, v in _values_in_attributes(model.mlProgram.attributes, "program."):
            if v.WhichOneof("value") == "blobFileValue":
                yield BlobRef("", "", "", where, v)
    for e in model.mlProgram.functions:
        if functions is not None and e.key not in functions:
            continue
        for ref in iter_function_values(e.key, e.value):
            if ref.value.WhichOneof("value") == "blobFileValue":
                yield ref


def op_type_histogram(function: pb.Function) -> dict[str, int]:
    """Operation type -> count over every block of a function, nested blocks included."""
    counts: dict[str, int] = {}

    def visit(block: pb.Block) -> None:
        for op in block.operations:
            counts[op.type] = counts.get(op.type, 0) + 1
            for nested in op.blocks:
                visit(nested)

    for e in function.block_specializations:
        visit(e.value)
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def blob_dtype_for(value: pb.Value):
    """The blob dtype a Value's tensor type calls for, or ``None`` if it has none."""
    if value.type.WhichOneof("type") != "tensorType":
        return None
    return BLOB_DTYPE_BY_PROTO.get(value.type.tensorType.dataType)
