"""Folders laid out as compiled models (``.mlmodelc``) from packages, for tests.

Apple's compiler cannot run here, so a test "compiles" a package by writing what a compiled model
holds and milsurgery reads: ``model.mil`` (the program printed as text), ``weights/weight.bin``
(the package's weight file, copied), ``metadata.json`` (inputs, outputs and states in the form the
compiler writes, as in ``add_model.mlmodelc/metadata.json``) and a placeholder ``coremldata.bin``.
"""

from __future__ import annotations

import json
import os
import shutil

from milsurgery import Package
from milsurgery._proto import milsurgery_spec_pb2 as pb
from milsurgery.miltext import print_program

_DTYPES = {
    pb.ArrayFeatureType.FLOAT16: "Float16",
    pb.ArrayFeatureType.FLOAT32: "Float32",
    pb.ArrayFeatureType.DOUBLE: "Double",
    pb.ArrayFeatureType.INT32: "Int32",
}


def _schema(features, kind: str) -> list[dict]:
    out = []
    for f in features:
        arr = f.type.stateType.arrayType if kind == "State" else f.type.multiArrayType
        shape = "[" + ", ".join(str(d) for d in arr.shape) + "]"
        ranges = [[r.lowerBound, r.upperBound] for r in arr.shapeRange.sizeRanges]
        out.append({
            **({"shapeRange": str(ranges)} if ranges else {}),
            "hasShapeFlexibility": "1" if ranges else "0",
            "isOptional": "1" if f.type.isOptional else "0",
            "dataType": _DTYPES[arr.dataType],
            "formattedType": f"{kind} ({_DTYPES[arr.dataType]} {' × '.join(str(d) for d in arr.shape)})",
            "shortDescription": f.shortDescription,
            "shape": shape,
            "name": f.name,
            "type": kind,
        })
    return out


def lay_out_compiled(package: str, dest: str, *, functions_in_metadata: bool = True) -> str:
    """Write ``dest`` (a ``.mlmodelc`` folder) from ``package``; returns ``dest``.

    A multifunction package's descriptions go to a ``functions`` list in metadata.json unless
    ``functions_in_metadata`` is false (then only the program text describes them).
    """
    os.makedirs(dest)
    with Package(package) as pkg:
        with open(os.path.join(dest, "model.mil"), "w", encoding="utf-8") as f:
            f.write(print_program(pkg.model))
        if pkg.blob_files:
            os.makedirs(os.path.join(dest, "weights"))
            for name, bf in pkg.blob_files.items():
                shutil.copyfile(bf.path, os.path.join(dest, "weights", name.rsplit("/", 1)[1]))
        meta = {
            "metadataOutputVersion": "3.0",
            "specificationVersion": pkg.model.specificationVersion,
            "userDefinedMetadata": {e.key: e.value for e in pkg.model.description.metadata.userDefined},
            "modelType": {"name": "MLModelType_mlProgram"},
        }
        if pkg.model.description.functions:
            meta["defaultFunctionName"] = pkg.default_function
            if functions_in_metadata:
                meta["functions"] = [
                    {"name": n, "inputSchema": _schema(d.input, "MultiArray"), "outputSchema": _schema(d.output, "MultiArray"),
                     "stateSchema": _schema(d.state, "State")}
                    for n, d in pkg.descriptions.items()
                ]
        else:
            d = pkg.descriptions["main"]
            meta.update(inputSchema=_schema(d.input, "MultiArray"), outputSchema=_schema(d.output, "MultiArray"),
                        stateSchema=_schema(d.state, "State"))
    with open(os.path.join(dest, "metadata.json"), "w", encoding="utf-8") as f:
        json.dump([meta], f, indent=2)
    with open(os.path.join(dest, "coremldata.bin"), "wb") as f:
        f.write(b"\0" * 16)
    return dest
