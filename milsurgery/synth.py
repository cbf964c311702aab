"""Synthetic LLM-like packages written with milsurgery's own writer (no coremltools needed).

Used by the demo, by tests, and to generate Neural Engine weight-sharing experiments of any size:
weights are generated one tensor at a time and written straight to weight.bin, so memory stays
flat however large the package. The graphs mirror what coremltools writes for iOS 18 (opset
CoreML8): ``const`` ops holding blob values, ``linear`` layers with ``relu`` and residual
``add``; for 4-bit palettized weights, ``constexpr_lut_to_dense`` ops binding a uint4 index blob
and a float16 LUT blob inline.

The network per function: input ``x`` (1, seq, hidden) fp16 -> ``layers`` x [linear(hidden,
hidden) -> relu -> add residual] -> output ``y``. Functions of one package differ in sequence
length; ``shared_fraction`` of the layers use the same blobs (same offsets) in every function,
the others get their own, different, weights per function.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ._proto import milsurgery_spec_pb2 as pb
from .blobfile import BlobWriter
from .check import check_staged
from .formats import DEFAULT_WEIGHT_REF, WEIGHT_FILE_NAME
from .package import StagedPackage

__all__ = ["build_llm_like", "layers_for_bytes", "shared_layer_count", "SynthLayout"]

OPSET = "CoreML8"
SPEC_VERSION = 9
F16 = pb.FLOAT16


def _tensor_type(dtype: int, shape) -> pb.ValueType:
    t = pb.ValueType()
    t.tensorType.dataType = dtype
    t.tensorType.rank = len(shape)
    for d in shape:
        t.tensorType.dimensions.add().constant.size = d
    return t


def _name_attr(op: pb.Operation, name: str) -> None:
    v = op.attributes.add(key="name").value
    v.type.tensorType.dataType = pb.STRING
    v.immediateValue.tensor.strings.values.append(name)


def _blob_value(dtype: int, shape, offset: int) -> pb.Value:
    v = pb.Value(type=_tensor_type(dtype, shape))
    v.blobFileValue.fileName = DEFAULT_WEIGHT_REF
    v.blobFileValue.offset = offset
    return v


def _op(block: pb.Block, op_type: str, name: str, out_shape, inputs: dict) -> str:
    op = block.operations.add(type=op_type)
    for key, arg in inputs.items():
        binding = op.inputs.add(key=key).value.arguments.add()
        if isinstance(arg, str):
            binding.name = arg
        else:
            binding.value.CopyFrom(arg)
    op.outputs.add(name=name).type.CopyFrom(_tensor_type(F16, out_shape))
    _name_attr(op, name)
    return name


def _const(block: pb.Block, name: str, value: pb.Value) -> str:
    op = block.operations.add(type="const")
    op.outputs.add(name=name).type.CopyFrom(value.type)
    op.attributes.add(key="val").value.CopyFrom(value)
    _name_attr(op, name)
    return name


def _feature(name: str, shape) -> pb.FeatureDescription:
    f = pb.FeatureDescription(name=name)
    f.type.multiArrayType.shape.extend(shape)
    f.type.multiArrayType.dataType = pb.ArrayFeatureType.FLOAT16
    return f


@dataclass
class SynthLayout:
    """What was written: per function, the record offsets of its layers' weight blobs."""

    path: str
    functions: dict[str, list[int]]
    shared_layers: int
    weight_bytes: int


def _bias(rng: np.random.Generator, hidden: int) -> np.ndarray:
    # Random, not zeros: layers meant to share nothing must not hold byte-identical biases.
    return (rng.standard_normal(hidden, dtype=np.float32) * 0.01).astype(np.float16)


def _write_layer(writer: BlobWriter, rng_seed, hidden: int, dtype: str) -> dict:
    """Write one layer's blobs; return their offsets."""
    rng = np.random.default_rng(rng_seed)
    if dtype == "fp16":
        w = (rng.standard_normal((hidden, hidden), dtype=np.float32) * 0.02).astype(np.float16)
        return {"weight": writer.add_array("float16", w), "bias": writer.add_array("float16", _bias(rng, hidden))}
    if dtype == "palettized4":
        lut = np.sort(rng.standard_normal(16, dtype=np.float32) * 0.02).astype(np.float16)
        indices = rng.integers(0, 16, hidden * hidden, dtype=np.uint8)
        return {
            "indices": writer.add_array("uint4", indices),
            "lut": writer.add_array("float16", lut),
            "bias": writer.add_array("float16", _bias(rng, hidden)),
        }
    raise ValueError(f"dtype must be 'fp16' or 'palettized4', not {dtype!r}")


def _function(offsets: list[dict], seq: int, hidden: int) -> pb.Function:
    fn = pb.Function(opset=OPSET)
    fn.inputs.add(name="x").type.CopyFrom(_tensor_type(F16, (1, seq, hidden)))
    block = fn.block_specializations.add(key=OPSET).value
    x = "x"
    shape = (1, seq, hidden)
    for i, blobs in enumerate(offsets):
        if "indices" in blobs:
            weight = _op(block, "constexpr_lut_to_dense", f"layer{i}_weight", (hidden, hidden), {
                "indices": _blob_value(pb.UINT4, (hidden, hidden), blobs["indices"]),
                "lut": _blob_value(F16, (1, 1, 16, 1), blobs["lut"]),
            })
        else:
            weight = _const(block, f"layer{i}_weight", _blob_value(F16, (hidden, hidden), blobs["weight"]))
        bias = _const(block, f"layer{i}_bias", _blob_value(F16, (hidden,), blobs["bias"]))
        h = _op(block, "linear", f"layer{i}_linear", shape, {"x": x, "weight": weight, "bias": bias})
        h = _op(block, "relu", f"layer{i}_relu", shape, {"x": h})
        x = _op(block, "add", f"layer{i}_residual" if i < len(offsets) - 1 else "y", shape, {"x": x, "y": h})
    if not offsets:
        x = _op(block, "relu", "y", shape, {"x": x})
    block.outputs.append(x)
    return fn


def layers_for_bytes(target_bytes: int, hidden: int, dtype: str = "fp16") -> int:
    """Layers giving about ``target_bytes`` of weights per function."""
    record = 64  # each blob's metadata record (data then padded to 64-byte alignment)
    if dtype == "fp16":
        per_layer = hidden * hidden * 2 + 2 * hidden + 2 * record
    else:
        per_layer = hidden * hidden // 2 + 32 + 2 * hidden + 3 * record
    return max(1, round(target_bytes / per_layer))


def shared_layer_count(layers: int, shared_fraction: float) -> int:
    """Layers :func:`build_llm_like` shares for a fraction: the nearest whole number, half up."""
    return int(layers * shared_fraction + 0.5)


def build_llm_like(
    path: str | os.PathLike,
    *,
    seq_lens: dict[str, int] | int,
    hidden: int = 64,
    layers: int = 2,
    seed: int = 0,
    dtype: str = "fp16",
    shared_fraction: float = 1.0,
    force: bool = False,
    metadata: dict[str, str] | None = None,
) -> SynthLayout:
    """Write a synthetic package; see the module docstring.

    ``seq_lens`` as an int gives a single-function model (``main``, I/O at model level); as a
    dict ``{function: seq_len}`` a multi-function package whose default is the first function.
    """
    if not 0.0 <= shared_fraction <= 1.0:
        raise ValueError("shared_fraction must be within [0, 1]")
    single = isinstance(seq_lens, int)
    functions = {"main": seq_lens} if single else dict(seq_lens)
    n_shared = shared_layer_count(layers, shared_fraction)
    model = pb.Model(specificationVersion=SPEC_VERSION)
    model.mlProgram.version = 1
    for k, v in (metadata or {}).items():
        model.description.metadata.userDefined.add(key=k, value=v)
    layout = SynthLayout(os.fspath(path), {}, n_shared, 0)
    with StagedPackage(path, force=force) as staged:
        with BlobWriter(staged.weight_path(WEIGHT_FILE_NAME)) as writer:
            shared = [_write_layer(writer, (seed, i), hidden, dtype) for i in range(n_shared)]
            for f_index, (name, seq) in enumerate(functions.items()):
                own = [_write_layer(writer, (seed, i, f_index + 1), hidden, dtype) for i in range(n_shared, layers)]
                offsets = shared + own
                layout.functions[name] = [o for blobs in offsets for o in blobs.values()]
                model.mlProgram.functions.add(key=name).value.CopyFrom(_function(offsets, seq, hidden))
                desc = pb.FunctionDescription(name=name)
                desc.input.append(_feature("x", (1, seq, hidden)))
                desc.output.append(_feature("y", (1, seq, hidden)))
                if single:
                    model.description.input.extend(desc.input)
                    model.description.output.extend(desc.output)
                else:
                    model.description.functions.append(desc)
            layout.weight_bytes = writer.size
        if not single:
            # A multi-function model keeps its I/O in the FunctionDescriptions only: Apple's
            # validator refuses model-level I/O there (see milsurgery.check).
            model.description.defaultFunctionName = model.description.functions[0].name
        staged.commit(model, check=lambda tmp: check_staged(tmp, layout.path))
    return layout
