"""Independent checkers: what tests compare milsurgery's output against.

Nothing here uses milsurgery's reader, walker or comparison code. Specs are parsed with
coremltools' own generated protobuf classes, blob records are decoded with ``struct`` straight
from the bytes, programs are built with coremltools' milproto loader and blob values are read
with coremltools' C++ blob reader.
"""

from __future__ import annotations

import os
import struct

import numpy as np

CT_READ = {
    1: "read_fp16_data",
    2: "read_float_data",
    3: "read_uint8_data",
    4: "read_int8_data",
    6: "read_int16_data",
    7: "read_uint16_data",
    8: "read_int4_data",
    9: "read_uint1_data",
    10: "read_uint2_data",
    11: "read_uint4_data",
    12: "read_uint3_data",
    13: "read_uint6_data",
    14: "read_int32_data",
    15: "read_uint32_data",
}


def spec_path(pkg: str) -> str:
    return os.path.join(pkg, "Data", "com.apple.CoreML", "model.mlmodel")


def weights_dir(pkg: str) -> str:
    return os.path.join(pkg, "Data", "com.apple.CoreML", "weights")


def ct_spec(pkg: str):
    """The spec parsed by coremltools' generated classes."""
    from coremltools.proto import Model_pb2

    m = Model_pb2.Model()
    with open(spec_path(pkg), "rb") as f:
        m.ParseFromString(f.read())
    return m


def ct_functions(spec) -> list[str]:
    return [f.name for f in spec.description.functions] or ["main"]


def blob_values_in(message, found=None):
    """Every MIL Value message carrying a blobFileValue, found by a generic protobuf walk."""
    found = [] if found is None else found
    if message.DESCRIPTOR.full_name == "CoreML.Specification.MILSpec.Value" and message.HasField("blobFileValue"):
        found.append(message)
    for fd, value in message.ListFields():
        if fd.message_type is None:
            continue
        if fd.message_type.GetOptions().map_entry:
            items = value.values() if fd.message_type.fields_by_name["value"].message_type else []
            for v in items:
                blob_values_in(v, found)
        elif fd.is_repeated:
            for v in value:
                blob_values_in(v, found)
        else:
            blob_values_in(value, found)
    return found


def read_record(pkg: str, file_name: str, offset: int) -> tuple[int, int, int, bytes]:
    """(dtype, size, padding bits, data bytes) of the blob record at ``offset``, decoded by hand."""
    assert file_name.startswith("@model_path/weights/"), file_name
    path = os.path.join(weights_dir(pkg), file_name[len("@model_path/weights/") :])
    with open(path, "rb") as f:
        f.seek(offset)
        rec = f.read(64)
        sentinel, dtype, size, data_offset, padding = struct.unpack_from("<IIQQQ", rec)
        assert sentinel == 0xDEADBEEF and data_offset == offset + 64, (path, offset)
        f.seek(data_offset)
        data = f.read(size)
    return dtype, size, padding if dtype in (8, 9, 10, 11, 12, 13) else 0, data


def all_records(path: str) -> list[tuple[int, int, int, bytes]]:
    """Every (record offset, dtype, size, data) of a blob file, walked by hand."""
    with open(path, "rb") as f:
        data = f.read()
    count, version = struct.unpack_from("<II", data)
    assert version == 2
    out, off = [], 64
    for _ in range(count):
        sentinel, dtype, size, data_offset, _pad = struct.unpack_from("<IIQQQ", data, off)
        assert sentinel == 0xDEADBEEF
        out.append((off, dtype, size, bytes(data[data_offset : data_offset + size])))
        off = (data_offset + size + 63) // 64 * 64
    return out


def function_proto(spec, name: str):
    return spec.mlProgram.functions[name]


def assert_function_equivalent(out_pkg: str, out_name: str, src_pkg: str, src_name: str) -> int:
    """Assert out_pkg's function equals src_pkg's except blob offsets, with equal referenced bytes.

    Returns the number of blob references compared.
    """
    from coremltools.proto import MIL_pb2

    a_spec, b_spec = ct_spec(out_pkg), ct_spec(src_pkg)
    a = MIL_pb2.Function()
    a.CopyFrom(function_proto(a_spec, out_name))
    b = MIL_pb2.Function()
    b.CopyFrom(function_proto(b_spec, src_name))
    va, vb = blob_values_in(a), blob_values_in(b)
    assert len(va) == len(vb), f"{out_name}: {len(va)} blob references vs {len(vb)} in source"
    for x, y in zip(va, vb):
        rx = read_record(out_pkg, x.blobFileValue.fileName, x.blobFileValue.offset)
        ry = read_record(src_pkg, y.blobFileValue.fileName, y.blobFileValue.offset)
        assert rx == ry, f"{out_name}: blob at {x.blobFileValue.offset} differs from source's at {y.blobFileValue.offset}"
        x.ClearField("blobFileValue")
        y.ClearField("blobFileValue")
    # Message equality compares maps as maps (order-insensitive) and everything else exactly.
    assert a == b, f"{out_name}: graph differs from {src_pkg}:{src_name} beyond blob offsets"
    return len(va)


def ct_load_program(pkg: str):
    """Build the pymil Program of every function with coremltools' milproto loader."""
    from coremltools.converters.mil.frontend.milproto.load import load

    spec = ct_spec(pkg)
    return load(spec, spec.specificationVersion, weights_dir(pkg))


def ct_read_referenced_blobs(pkg: str) -> int:
    """Read every referenced blob with coremltools' C++ reader; check it against the raw bytes."""
    from coremltools.libmilstoragepython import _BlobStorageReader

    spec = ct_spec(pkg)
    readers: dict[str, object] = {}
    seen = set()
    for v in blob_values_in(spec):
        key = (v.blobFileValue.fileName, v.blobFileValue.offset)
        if key in seen:
            continue
        seen.add(key)
        dtype, size, padding, data = read_record(pkg, *key)
        reader = readers.get(key[0])
        if reader is None:
            path = os.path.join(weights_dir(pkg), key[0][len("@model_path/weights/") :])
            reader = readers[key[0]] = _BlobStorageReader(path)
        method = CT_READ.get(dtype)
        if method is None:  # bfloat16 / float8: the Python binding has no reader for them
            continue
        values = np.asarray(getattr(reader, method)(key[1]))
        if dtype in (8, 9, 10, 11, 12, 13):
            bits = {8: 4, 9: 1, 10: 2, 11: 4, 12: 3, 13: 6}[dtype]
            assert values.size == (size * 8 - padding) // bits
        else:
            assert values.tobytes() == data, f"C++ reader disagrees at offset {key[1]}"
    return len(seen)


#: Apple's model validator built for this machine (see the shared tools' README), beside the checkout.
COREML_VALIDATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "tools", "coreml-validate")
VALIDATOR_PREFIX = "validator error: "


def have_coreml_validate() -> bool:
    return os.path.isfile(COREML_VALIDATE) and os.access(COREML_VALIDATE, os.X_OK)


def coreml_validate(spec: str) -> tuple[int, str]:
    """Run Apple's validator on a spec file (or a package's spec): (exit status, message).

    Exit 0 valid, 1 invalid with the validator's message (its "validator error: " prefix removed),
    2 unreadable. Callers skip when :func:`have_coreml_validate` is false.
    """
    import subprocess

    if os.path.isdir(spec):
        spec = spec_path(spec)
    run = subprocess.run([COREML_VALIDATE, spec], capture_output=True, encoding="utf-8", timeout=60)
    out = run.stdout.rstrip("\n")
    if run.returncode == 1:
        assert out.startswith(VALIDATOR_PREFIX), out
        out = out[len(VALIDATOR_PREFIX) :]
    return run.returncode, out
