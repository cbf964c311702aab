"""Opening packages, walking every blob reference, and writing packages atomically."""

from __future__ import annotations

import os

import numpy as np
import pytest

import minipkg
from checks import ct_spec, spec_path
from milsurgery import DestinationExistsError, Package, UsageError
from milsurgery.package import PARTIAL_MARKER, StagedPackage, manifest_for
from milsurgery.spec import iter_blob_refs, pb

F16 = np.arange(6, dtype=np.float16).reshape(2, 3)


def test_crepe_opens_and_every_reference_resolves(crepe):
    with Package(crepe) as pkg:
        assert pkg.functions == ["main"] and pkg.default_function == "main"
        assert pkg.model.specificationVersion == 7
        bf = pkg.blob_files["@model_path/weights/weight.bin"]
        assert len(bf) == 38 and len(pkg.refs) == 38
        # Independently: the offsets coremltools' own classes see in the spec.
        from checks import blob_values_in

        theirs = sorted(v.blobFileValue.offset for v in blob_values_in(ct_spec(crepe)))
        assert sorted(r.blob.record_offset for r in pkg.refs) == theirs
        assert all(r.ref.op_type == "const" and r.ref.location == "attributes[val]" for r in pkg.refs)


def _pkg_with_hidden_references(tmp_path) -> str:
    """A function with blob values in an inline input binding, a nested block, an op attribute
    other than `val`, a function attribute, and a program attribute."""
    path = minipkg.make(tmp_path / "p.mlpackage", {"main": [("float16", F16)] * 1}, version=9)
    with Package(path) as pkg:
        model = pkg.model
        offset = pkg.refs[0].blob.record_offset
    fn = model.mlProgram.functions[0].value
    block = fn.block_specializations[0].value
    val = lambda: minipkg.blob_value("float16", (2, 3), offset)  # noqa: E731
    op = pb.Operation(type="linear")
    op.outputs.add(name="y").type.CopyFrom(minipkg.tensor_type("float16", (2, 3)))
    op.inputs.add(key="x").value.arguments.add(name="main_w0")
    op.inputs.add(key="weight").value.arguments.add().value.CopyFrom(val())
    cond = pb.Operation(type="cond")
    cond.outputs.add(name="z").type.CopyFrom(minipkg.tensor_type("float16", (2, 3)))
    cond.inputs.add(key="pred").value.arguments.add(name="main_w0")
    nested = cond.blocks.add()
    nested.operations.append(minipkg.const_op("inner", val()))
    nested.outputs.append("inner")
    block.operations.extend([op, cond])
    block.operations[0].attributes.add(key="extra").value.CopyFrom(val())
    fn.attributes.add(key="fattr").value.CopyFrom(val())
    model.mlProgram.attributes.add(key="pattr").value.CopyFrom(val())
    with open(spec_path(path), "wb") as f:
        f.write(model.SerializeToString())
    return path


def test_walker_finds_references_wherever_a_value_sits(tmp_path):
    path = _pkg_with_hidden_references(tmp_path)
    with Package(path) as pkg:
        where = sorted((r.ref.function, r.ref.op_type, r.ref.location) for r in pkg.refs)
    assert where == sorted([
        ("", "", "program.attributes[pattr]"),
        ("main", "", "function.attributes[fattr]"),
        ("main", "const", "attributes[val]"),
        ("main", "const", "attributes[extra]"),
        ("main", "linear", "inputs[weight][0]"),
        ("main", "const", "cond:z.blocks[0].attributes[val]"),
    ])
    # coremltools' classes see the same number of blob values (generic walk, independent code).
    from checks import blob_values_in

    assert len(blob_values_in(ct_spec(path))) == 6


def test_merge_keeps_hidden_references_valid(tmp_path):
    """Every hidden reference is rewritten by a merge and verifies against its source."""
    from milsurgery import merge
    from milsurgery.verify import verify

    path = _pkg_with_hidden_references(tmp_path)
    out = tmp_path / "m.mlpackage"
    merge([f"{path}:main=a", f"{path}:main=b"], out)
    with Package(out) as pkg:
        assert len(pkg.refs) == 11  # 5 per function + the program attribute
        assert {r.ref.file_name for r in pkg.refs} == {"@model_path/weights/weight.bin"}
    assert verify(out, [f"{path}:main=a", f"{path}:main=b"]).equivalent


def test_staged_package_leaves_nothing_on_failure(tmp_path):
    dest = tmp_path / "out.mlpackage"
    with pytest.raises(RuntimeError):
        with StagedPackage(dest) as staged:
            open(staged.weight_path("weight.bin"), "wb").write(b"partial")
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_staged_package_refuses_existing_destination_unless_forced(tmp_path):
    dest = tmp_path / "out.mlpackage"
    minipkg.make(dest, {"main": [("float16", F16)]})
    before = open(spec_path(dest), "rb").read()
    with pytest.raises(DestinationExistsError, match="out.mlpackage"):
        minipkg.make(dest, {"main": [("float32", [1.0])]})
    assert open(spec_path(dest), "rb").read() == before
    with StagedPackage(dest, force=True) as staged:
        from milsurgery.blobfile import BlobWriter

        with BlobWriter(staged.weight_path("weight.bin")):
            pass
        model = pb.Model(specificationVersion=9)
        model.mlProgram.functions.add(key="main")
        staged.commit(model)
    assert open(spec_path(dest), "rb").read() != before
    assert [n for n in os.listdir(tmp_path) if PARTIAL_MARKER in n or "milsurgery-old" in n] == []


def test_written_package_is_readable_by_others(tmp_path):
    """Directories made with mkdtemp are private; a finished package must not be."""
    dest = minipkg.make(tmp_path / "p.mlpackage", {"main": [("float16", F16)]})
    for root, dirs, files in os.walk(dest):
        for name in dirs:
            assert os.stat(os.path.join(root, name)).st_mode & 0o055 == 0o055, name
        for name in files:
            assert os.stat(os.path.join(root, name)).st_mode & 0o044 == 0o044, name
    assert os.stat(dest).st_mode & 0o055 == 0o055


def test_manifest_layout():
    m = manifest_for("A", "B")
    assert m["rootModelIdentifier"] == "A"
    assert m["itemInfoEntries"]["A"]["path"] == "com.apple.CoreML/model.mlmodel"
    assert m["itemInfoEntries"]["B"]["path"] == "com.apple.CoreML/weights"


def test_iter_blob_refs_limits_to_functions(tmp_path):
    path = minipkg.make(tmp_path / "p.mlpackage", {"a": [("float16", F16)], "b": [("float32", [1.0, 2.0]), 0]})
    with Package(path) as pkg:
        assert len(list(iter_blob_refs(pkg.model, functions=["b"]))) == 2
        assert [r.ref.function for r in pkg.refs] == ["a", "b", "b"]
        shared = {r.blob.record_offset for r in pkg.function_refs("a")} & {r.blob.record_offset for r in pkg.function_refs("b")}
        assert len(shared) == 1


def test_unknown_function_is_a_usage_error(tmp_path, crepe):
    from milsurgery import merge

    with pytest.raises(UsageError, match="no function 'nope'"):
        merge([f"{crepe}:nope"], tmp_path / "o.mlpackage")
    assert os.listdir(tmp_path) == []


def test_identity_is_byte_exact_across_alignments(tmp_path):
    """Equal bytes at data offsets with different page phases compare equal; one flipped bit,
    -0.0 vs 0.0, and NaN payloads are decided by the bit pattern."""
    from milsurgery.blobfile import BlobFile, BlobWriter
    from milsurgery.coalesce import BlobSource, blobs_equal, group_identical
    import milsurgery.coalesce as coalesce

    payload = np.random.default_rng(1).integers(0, 255, 3 * 4096 + 17, dtype=np.uint8)
    flipped = payload.copy()
    flipped[-1] ^= 1
    nan = np.array([np.nan, 1.0], np.float32)
    path = tmp_path / "w.bin"
    with BlobWriter(path) as w:
        w.add_array("uint8", payload)
        w.add_array("uint8", payload[:100])  # shifts the next blob's page phase
        w.add_array("uint8", payload)
        w.add_array("uint8", flipped)
        w.add_array("float32", [0.0])
        w.add_array("float32", [-0.0])
        w.add_array("float32", nan)
        w.add_array("float32", nan.copy())
    for window in (coalesce.WINDOW, 4096):  # also with windows smaller than the blobs
        coalesce.WINDOW = window
        try:
            with BlobFile(path) as bf:
                src = [BlobSource(bf, b) for b in bf]
                assert group_identical(src) == [0, 1, 0, 3, 4, 5, 6, 6]
                assert blobs_equal(src[0], src[2]) and not blobs_equal(src[0], src[3])
        finally:
            coalesce.WINDOW = 32 << 20


def test_hash_only_picks_candidates_bytes_decide(tmp_path, monkeypatch):
    """With every hash colliding, three same-size blobs are still told apart by their bytes; a
    pair of same-size blobs is compared directly, without hashing."""
    from milsurgery.blobfile import BlobFile, BlobWriter
    import milsurgery.coalesce as coalesce

    a = np.arange(64, dtype=np.uint8)
    b = a.copy()
    b[10] ^= 0x80
    path = tmp_path / "w.bin"
    with BlobWriter(path) as w:
        for arr in (a, b, a, a[:32], b[:32]):
            w.add_array("uint8", arr)
    monkeypatch.setattr(coalesce, "blob_digest", lambda src, stats=None, stop=None: b"same")
    monkeypatch.setattr(coalesce, "sample_digest", lambda src, stats=None: b"same")
    with BlobFile(path) as bf:
        src = [coalesce.BlobSource(bf, blob) for blob in bf]
        stats = coalesce.Stats()
        assert coalesce.group_identical(src, stats) == [0, 1, 0, 3, 4]
        assert stats.bytes_hashed == 0  # the patched digest counts nothing; the pair is compared
        assert stats.bytes_compared >= 2 * 32


def test_blobs_differing_outside_the_samples_are_told_apart(tmp_path):
    """Same-size blobs whose sampled slices agree go on to a full hash and a byte comparison."""
    from milsurgery.blobfile import BlobFile, BlobWriter
    import milsurgery.coalesce as coalesce

    a = np.zeros(16 * coalesce.SAMPLE, np.uint8)
    b = a.copy()
    b[coalesce.SAMPLE + 7] = 1  # between the start and middle samples
    path = tmp_path / "w.bin"
    with BlobWriter(path) as w:
        for arr in (a, b, a, b, a):
            w.add_array("uint8", arr)
    with BlobFile(path) as bf:
        src = [coalesce.BlobSource(bf, blob) for blob in bf]
        assert len({coalesce.sample_digest(x) for x in src}) == 1
        stats = coalesce.Stats()
        assert coalesce.group_identical(src, stats) == [0, 1, 0, 1, 0]
        assert stats.bytes_hashed >= 5 * a.size  # the full hash was needed
