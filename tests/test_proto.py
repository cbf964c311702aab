"""The project's own schema: up to date with proto/, and specs round-trip byte for byte."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from checks import spec_path
from milsurgery._proto import milsurgery_spec_pb2 as pb

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_generated_module_matches_schema(tmp_path):
    """Regenerate the descriptor from proto/ with protoc and compare with the committed module."""
    pytest.importorskip("grpc_tools")
    from google.protobuf import descriptor_pb2

    out = tmp_path / "schema.pb"
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I", os.path.join(ROOT, "proto"),
         f"--descriptor_set_out={out}", "milsurgery_spec.proto"],
        check=True,
    )
    fresh = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]
    committed = descriptor_pb2.FileDescriptorProto.FromString(pb.DESCRIPTOR.serialized_pb)
    # --descriptor_set_out adds json_name to every field; the Python gencode leaves it out.
    stack = list(fresh.message_type)
    while stack:
        msg = stack.pop()
        for field in msg.field:
            field.ClearField("json_name")
        stack.extend(msg.nested_type)
    assert fresh == committed, "milsurgery/_proto is stale: regenerate it (see proto/milsurgery_spec.proto)"


def test_package_name_does_not_clash_with_coremltools():
    from coremltools.proto import Model_pb2

    assert pb.Model.DESCRIPTOR.full_name == "milsurgery.spec.Model"
    assert Model_pb2.Model.DESCRIPTOR.full_name == "CoreML.Specification.Model"


def test_field_numbers_match_coremltools():
    """Every field we declare has Apple's number and a compatible type."""
    from coremltools.proto import FeatureTypes_pb2, MIL_pb2, Model_pb2

    theirs = {}
    for module in (Model_pb2, MIL_pb2, FeatureTypes_pb2):
        pool_file = module.DESCRIPTOR
        stack = list(pool_file.message_types_by_name.values())
        while stack:
            d = stack.pop()
            theirs[d.name] = d
            stack.extend(d.nested_types)
    renamed = {"MILProgram": "Program"}
    entries = {"StringEntry", "FunctionEntry", "ValueEntry", "BlockEntry", "ArgumentEntry"}
    checked = 0
    for d in pb.DESCRIPTOR.message_types_by_name.values():
        if d.name in entries:  # map entries: coremltools declares these as map<K, V>
            continue
        other = theirs.get(renamed.get(d.name, d.name))
        assert other is not None, d.name
        for f in d.fields:
            of = other.fields_by_name[f.name]
            assert of.number == f.number, f"{d.name}.{f.name}"
            assert of.type == f.type, f"{d.name}.{f.name}"
            checked += 1
    assert checked >= 70


def _roundtrip(path: str) -> None:
    data = open(path, "rb").read()
    m = pb.Model()
    m.ParseFromString(data)
    assert m.SerializeToString() == data


def test_crepe_roundtrips_byte_identical(crepe):
    _roundtrip(spec_path(crepe))


def test_spec_with_unknown_fields_roundtrips():
    """Fields the schema leaves out (another model type, future fields) are kept and written back."""
    from coremltools.proto import Model_pb2

    m = Model_pb2.Model(specificationVersion=9)
    m.description.input.add(name="x").type.multiArrayType.shape.extend([1, 2])
    m.mlProgram.version = 1
    data = m.SerializeToString() + b"\xa2\x06\x03abc"  # field 100 (unknown to us): length-delimited
    ours = pb.Model()
    ours.ParseFromString(data)
    assert ours.SerializeToString() == data


def test_map_order_is_preserved():
    """Maps are repeated entries in our schema, so entry order survives (protobuf maps do not)."""
    m = pb.Model(specificationVersion=9)
    for key in ["zeta", "alpha", "mid"]:
        m.description.metadata.userDefined.add(key=key, value=key.upper())
    data = m.SerializeToString()
    again = pb.Model.FromString(data)
    assert [e.key for e in again.description.metadata.userDefined] == ["zeta", "alpha", "mid"]
    assert again.SerializeToString() == data
