"""Tiny hand-built packages for tests of milsurgery's own parsing and surgery.

Functions hold only `const` ops whose values live in weight.bin, optionally plus references in
the other places a Value can sit (inline input bindings, nested blocks, attributes). They are not
meant to run; coremltools-built fixtures (ct_models.py) cover real graphs.
"""

from __future__ import annotations

import os

import numpy as np

from milsurgery.blobfile import BlobWriter
from milsurgery.formats import BLOB_DTYPE_BY_NAME, DEFAULT_WEIGHT_REF
from milsurgery.package import StagedPackage
from milsurgery.spec import pb


def tensor_type(dtype: str, shape) -> pb.ValueType:
    t = pb.ValueType()
    t.tensorType.dataType = BLOB_DTYPE_BY_NAME[dtype].proto
    t.tensorType.rank = len(shape)
    for d in shape:
        t.tensorType.dimensions.add().constant.size = d
    return t


def blob_value(dtype: str, shape, offset: int) -> pb.Value:
    v = pb.Value(type=tensor_type(dtype, shape))
    v.blobFileValue.fileName = DEFAULT_WEIGHT_REF
    v.blobFileValue.offset = offset
    return v


def const_op(name: str, value: pb.Value) -> pb.Operation:
    op = pb.Operation(type="const")
    op.outputs.add(name=name).type.CopyFrom(value.type)
    op.attributes.add(key="val").value.CopyFrom(value)
    return op


def feature(name: str, shape) -> pb.FeatureDescription:
    f = pb.FeatureDescription(name=name)
    f.type.multiArrayType.shape.extend(shape)
    f.type.multiArrayType.dataType = pb.ArrayFeatureType.FLOAT16
    return f


def make(path, functions: dict[str, list], *, extra_blobs=(), single: bool | None = None, version: int = 9,
         metadata: dict | None = None) -> str:
    """Write a package whose functions are const ops over the given arrays.

    ``functions`` maps a function name to a list of entries, each ``(dtype, array)`` (a new blob)
    or an int (the index of an earlier blob in creation order, to share a record). ``extra_blobs``
    are written but referenced by nothing. Returns the path.
    """
    path = os.fspath(path)
    single = len(functions) == 1 and "main" in functions if single is None else single
    model = pb.Model(specificationVersion=version)
    model.mlProgram.version = 1
    with StagedPackage(path) as staged:
        offsets, shapes = [], []
        with BlobWriter(staged.weight_path("weight.bin")) as w:
            for name, entries in functions.items():
                fn = model.mlProgram.functions.add(key=name).value
                fn.opset = "CoreML8"
                block = fn.block_specializations.add(key="CoreML8").value
                for i, entry in enumerate(entries):
                    if isinstance(entry, int):
                        offset, (dtype, shape) = offsets[entry], shapes[entry]
                    else:
                        dtype, arr = entry
                        arr = np.asarray(arr)
                        offset = w.add_array(dtype, arr)
                        shape = arr.shape or (1,)
                        offsets.append(offset)
                        shapes.append((dtype, shape))
                    block.operations.append(const_op(f"{name}_w{i}", blob_value(dtype, shape, offset)))
                block.outputs.append(f"{name}_w{len(entries) - 1}")
                desc = pb.FunctionDescription(name=name)
                desc.output.append(feature(block.outputs[0], list(shapes[-1][1])))
                if single:
                    model.description.output.extend(desc.output)
                else:
                    model.description.functions.append(desc)
            for dtype, arr in extra_blobs:
                w.add_array(dtype, np.asarray(arr))
        if not single:
            model.description.defaultFunctionName = next(iter(functions))
        for k, v in (metadata or {}).items():
            model.description.metadata.userDefined.add(key=k, value=v)
        staged.commit(model)
    return path
