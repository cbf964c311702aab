"""Compiled ``.mlmodelc`` folders (what apps ship), read behind the same interface as a package.

A compiled ML program holds ``model.mil`` (the program as text), ``weights/weight.bin`` (the same
blob storage as a package's) when the program has blob values, ``metadata.json`` (a JSON array
of one object describing inputs, outputs, states and metadata), and ``coremldata.bin`` (Apple's
binary description, undocumented, not read). :class:`CompiledModel` parses ``model.mil`` into the
project's proto messages and rebuilds the parts of a ``Model`` spec it can from ``metadata.json``,
so every command that reads a :class:`Package` reads a compiled model too. Writing ``.mlmodelc``
needs Apple's compiler and is not offered.

What cannot be recovered is listed in :attr:`CompiledModel.unrecovered` (and the I/O of a
function that ``metadata.json`` does not describe is rebuilt from its MIL signature): flexible
shape ranges and enumerated shapes, image feature details, descriptions of the functions of a
multifunction model (not seen in a real file yet), and anything only ``coremldata.bin`` holds.

Opening reads ``model.mil`` and ``metadata.json`` whole (each bounded) and the 64-byte blob
records; no weight bytes.
"""

from __future__ import annotations

import json
import os
import re

from ._proto import milsurgery_spec_pb2 as pb
from .errors import FormatError, PackageError, SpecError
from .formats import MANIFEST_NAME, MULTIFUNCTION_SPEC_VERSION, SPEC_FOR_OPSET
from .miltext import read_program
from .package import Package, package_path, read_input
from .spec import default_function, function_descriptions, iter_blob_refs

__all__ = ["CompiledModel", "open_model", "is_compiled", "MIL_NAME", "METADATA_NAME"]

MIL_NAME = "model.mil"
METADATA_NAME = "metadata.json"
#: Largest metadata.json read (real ones are a few KB; a histogram of op types at most).
MAX_METADATA_BYTES = 16 << 20

_ARRAY_DTYPES = {
    "Float16": pb.ArrayFeatureType.FLOAT16,
    "Float32": pb.ArrayFeatureType.FLOAT32,
    "Double": pb.ArrayFeatureType.DOUBLE,
    "Float64": pb.ArrayFeatureType.DOUBLE,
    "Int32": pb.ArrayFeatureType.INT32,
    "Int8": pb.ArrayFeatureType.INT8,
}
#: MIL tensor dtype -> multiarray dtype, for I/O rebuilt from a function's signature
_MIL_TO_ARRAY = {
    pb.FLOAT16: pb.ArrayFeatureType.FLOAT16,
    pb.FLOAT32: pb.ArrayFeatureType.FLOAT32,
    pb.FLOAT64: pb.ArrayFeatureType.DOUBLE,
    pb.INT32: pb.ArrayFeatureType.INT32,
    pb.INT8: pb.ArrayFeatureType.INT8,
}


def is_compiled(path: str | os.PathLike) -> bool:
    """Whether ``path`` is laid out as a compiled model (a directory holding model.mil and no
    Manifest.json)."""
    path = os.fspath(path)
    return (
        os.path.isdir(path)
        and os.path.isfile(os.path.join(path, MIL_NAME))
        and not os.path.exists(os.path.join(path, MANIFEST_NAME))
    )


def open_model(path: str | os.PathLike) -> Package:
    """Open a ``.mlpackage`` or a compiled ``.mlmodelc``, whichever ``path`` is; both answer the
    same queries (:class:`Package`'s attributes and methods). Also takes a coremltools ``MLModel``
    saved as a package (its package path is opened)."""
    path = package_path(path)
    if is_compiled(path) or (
        os.fspath(path).rstrip("/").endswith(".mlmodelc") and not os.path.exists(os.path.join(path, MANIFEST_NAME))
    ):
        return CompiledModel(path)
    return Package(path)


def _read_json(root: str, path: str, limit: int):
    """The JSON value of ``path`` inside the compiled model ``root`` (read as every model file is,
    :func:`milsurgery.package.read_input`), or None when there is no such file."""
    if not os.path.lexists(path):
        return None
    data = read_input(root, path, limit, fault=lambda message: FormatError(path, message))
    try:
        return json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        pos = getattr(exc, "pos", getattr(exc, "start", None))
        what = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise FormatError(path, f"not valid JSON ({what})", pos) from None


def _shape(text, where: str, path: str) -> list[int]:
    if isinstance(text, list):
        items = text
    elif isinstance(text, str) and re.fullmatch(r"\[\s*(\d{1,18}\s*(,\s*\d{1,18}\s*)*)?\]", text):
        items = [int(x) for x in re.findall(r"\d+", text)]
    else:
        raise FormatError(path, f"{where}.shape: {text!r} is not a list of sizes")
    if not all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2**63 for x in items):
        raise FormatError(path, f"{where}.shape: {text!r} is not a list of sizes")
    return items


def _ranges(text, where: str, path: str) -> list[tuple[int, int]]:
    """``shapeRange``: ``"[[1, 4096], [1024, 1024]]"`` (upper bound -1: unbounded)."""
    try:
        items = json.loads(text) if isinstance(text, str) else text
    except (ValueError, RecursionError):
        items = None
    ok = isinstance(items, list) and all(
        isinstance(r, list) and len(r) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in r)
        and 0 <= r[0] < 2**63 and -1 <= r[1] < 2**63
        for r in items
    )
    if not ok:
        raise FormatError(path, f"{where}.shapeRange: {text!r} is not a list of [lower, upper] pairs")
    return [(r[0], r[1]) for r in items]


class CompiledModel(Package):
    """An opened compiled model (``.mlmodelc``), answering the queries of :class:`Package`.

    Extra attributes: ``mil_path`` (model.mil), ``metadata`` (the object of metadata.json, or
    ``{}``) and ``unrecovered`` (what of a package's spec could not be rebuilt, in words).
    ``manifest`` is empty and ``spec_path`` names model.mil, so messages point at the text.
    """

    def _open(self) -> None:
        if not os.path.isdir(self.path):
            what = "does not exist" if not os.path.exists(self.path) else "is not a directory"
            raise PackageError(f"{self.path}: compiled model {what}")
        self._root_real = os.path.realpath(self.path)
        self.manifest, self.manifest_path = {}, None
        self.mil_path = os.path.join(self.path, MIL_NAME)
        if not os.path.lexists(self.mil_path):
            raise PackageError(
                f"{self.mil_path}: missing: not a compiled ML program (a compiled neural network has no model.mil)"
            )
        self.spec_path = self.mil_path
        self.weights_dir = os.path.join(self.path, "weights")
        self.unrecovered: list[str] = []
        program, self.spec_size = read_program(self.mil_path, self.path)
        meta_path = os.path.join(self.path, METADATA_NAME)
        meta = _read_json(self.path, meta_path, MAX_METADATA_BYTES)
        if meta is None:
            self.unrecovered.append(f"{METADATA_NAME} is missing: I/O rebuilt from the MIL signatures, no metadata")
            meta = [{}]
        if not (isinstance(meta, list) and len(meta) >= 1 and isinstance(meta[0], dict)):
            raise FormatError(meta_path, "top level is not a JSON array holding an object")
        self.metadata: dict = meta[0]
        self.model = self._build_model(program, meta_path)
        self.descriptions = function_descriptions(self.model)
        self.functions = list(self.descriptions)
        self.default_function = default_function(self.model)
        self.refs = [self._resolve(ref) for ref in iter_blob_refs(self.model)]

    # -- rebuilding the spec ------------------------------------------------------------------------
    def _build_model(self, program: pb.MILProgram, meta_path: str) -> pb.Model:
        meta = self.metadata
        model = pb.Model()
        model.mlProgram.CopyFrom(program)
        names = [e.key for e in program.functions]
        if not names:
            raise SpecError(self.mil_path, "the program defines no function")
        version = meta.get("specificationVersion")
        if not (isinstance(version, int) and not isinstance(version, bool) and 0 < version < 2**31):
            opsets = {e.value.opset for e in program.functions}
            version = max((SPEC_FOR_OPSET.get(o, 0) for o in opsets), default=0) or MULTIFUNCTION_SPEC_VERSION
            if meta:
                self.unrecovered.append("specificationVersion (not in metadata.json): taken from the opsets")
        model.specificationVersion = version
        desc = model.description
        md = desc.metadata
        for key, field in (("author", "author"), ("license", "license"), ("shortDescription", "shortDescription"),
                           ("version", "versionString")):
            if isinstance(meta.get(key), str):
                setattr(md, field, meta[key])
        user = meta.get("userDefinedMetadata")
        if isinstance(user, dict):
            for k, v in user.items():
                if isinstance(k, str) and isinstance(v, str):
                    md.userDefined.add(key=k, value=v)
        described = meta.get("functions") if isinstance(meta.get("functions"), list) else None
        if len(names) == 1 and names[0] == "main" and described is None:
            fd = self._function_description("main", program.functions[0].value, meta, meta_path, "")
            for name in ("input", "output", "state"):
                getattr(desc, name).extend(getattr(fd, name))
            return model
        if version < MULTIFUNCTION_SPEC_VERSION:
            model.specificationVersion = MULTIFUNCTION_SPEC_VERSION
        by_name = {}
        for i, item in enumerate(described or []):
            if isinstance(item, dict) and isinstance(item.get("name"), str):
                by_name[item["name"]] = (item, f"functions[{i}]")
        # The order of the description when metadata.json gives one (as a package's spec does),
        # then functions it does not describe in program order.
        order = [n for n in by_name if n in names] + [n for n in names if n not in by_name]
        fns = {e.key: e.value for e in program.functions}
        for key in order:
            item, where = by_name.get(key, (None, ""))
            if item is None:
                self.unrecovered.append(f"function {key!r}: I/O not described in metadata.json, rebuilt from its MIL signature")
            desc.functions.append(self._function_description(key, fns[key], item or {}, meta_path, where))
        default = meta.get("defaultFunctionName")
        if not isinstance(default, str) or default not in names:
            default = names[0]
            self.unrecovered.append(f"default function (not in metadata.json): taken as the first, {default!r}")
        desc.defaultFunctionName = default
        return model

    def _function_description(self, name: str, fn: pb.Function, meta: dict, meta_path: str, where: str) -> pb.FunctionDescription:
        fd = pb.FunctionDescription(name=name)
        prefix = f"{where}." if where else ""
        for key, field in (("inputSchema", "input"), ("outputSchema", "output"), ("stateSchema", "state")):
            items = meta.get(key)
            if items is None:
                continue
            if not isinstance(items, list):
                raise FormatError(meta_path, f"{prefix}{key}: not a list")
            for i, item in enumerate(items):
                getattr(fd, field).append(self._feature(item, f"{prefix}{key}[{i}]", meta_path, field == "state"))
        if not any(key in meta for key in ("inputSchema", "outputSchema")):
            self._signature_io(fn, fd)
        return fd

    def _feature(self, item, where: str, meta_path: str, state: bool) -> pb.FeatureDescription:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise FormatError(meta_path, f"{where}: not an object with a name")
        f = pb.FeatureDescription(name=item["name"])
        if isinstance(item.get("shortDescription"), str):
            f.shortDescription = item["shortDescription"]
        kind = item.get("type")
        if kind in ("MultiArray", "State") or state:
            arr = f.type.stateType.arrayType if state else f.type.multiArrayType
            dtype = item.get("dataType")
            if dtype not in _ARRAY_DTYPES:
                raise FormatError(meta_path, f"{where}.dataType: {dtype!r} is not a known array type")
            arr.dataType = _ARRAY_DTYPES[dtype]
            arr.shape.extend(_shape(item.get("shape", "[]"), where, meta_path))
            ranges = item.get("shapeRange")
            if ranges is not None:
                for lo, hi in _ranges(ranges, where, meta_path):
                    arr.shapeRange.sizeRanges.add(lowerBound=lo, upperBound=hi)
            elif str(item.get("hasShapeFlexibility", "0")) not in ("0", ""):
                self.unrecovered.append(f"{item['name']}: flexible shape (enumerated shapes) not recovered")
        elif kind == "Int64":
            f.type.int64Type.SetInParent()
        elif kind == "Double":
            f.type.doubleType.SetInParent()
        elif kind == "String":
            f.type.stringType.SetInParent()
        else:
            self.unrecovered.append(f"{item['name']}: feature type {kind!r} not recovered")
        if str(item.get("isOptional", "0")) == "1":
            f.type.isOptional = True
        return f

    def _signature_io(self, fn: pb.Function, fd: pb.FunctionDescription) -> None:
        """Inputs, states and outputs from a function's MIL signature (tensors with known shapes)."""
        block = fn.block_specializations[0].value if fn.block_specializations else pb.Block()
        types = {nv.name: nv.type for nv in fn.inputs}
        for op in block.operations:
            for o in op.outputs:
                types[o.name] = o.type
        for nv in fn.inputs:
            self._signature_feature(nv.name, nv.type, fd)
        for name in block.outputs:
            self._signature_feature(name, types.get(name, pb.ValueType()), fd, output=True)

    def _signature_feature(self, name: str, vt: pb.ValueType, fd: pb.FunctionDescription, output: bool = False) -> None:
        state = vt.WhichOneof("type") == "stateType"
        tt = vt.stateType.wrappedType.tensorType if state else vt.tensorType
        f = pb.FeatureDescription(name=name)
        arr = f.type.stateType.arrayType if state else f.type.multiArrayType
        if tt.dataType in _MIL_TO_ARRAY:
            arr.dataType = _MIL_TO_ARRAY[tt.dataType]
        else:
            self.unrecovered.append(f"{name}: type not recovered from the MIL signature")
        if all(d.WhichOneof("dimension") == "constant" for d in tt.dimensions):
            arr.shape.extend(d.constant.size for d in tt.dimensions)
        else:
            self.unrecovered.append(f"{name}: flexible shape not recovered from the MIL signature")
        (fd.output if output else fd.state if state else fd.input).append(f)

    def other_items(self) -> list[str]:
        """Files besides model.mil, metadata.json and the weights: not carried into a package."""
        out = []
        for root, dirs, files in os.walk(self.path):
            dirs.sort()
            for name in sorted(files):
                rel = os.path.relpath(os.path.join(root, name), self.path)
                if rel in (MIL_NAME, METADATA_NAME) or rel.split(os.sep)[0] == "weights":
                    continue
                out.append(rel)
        return out

    def __repr__(self) -> str:
        return f"CompiledModel({self.path!r}, functions={self.functions})"
