"""``merge --verify`` checks the package it wrote before moving it into place.

A fault is injected into the writer (a flipped byte in a copied blob, a weight file cut short),
so the output really differs from its sources; the verification must catch it, nothing may
appear at the destination, and a destination that ``--force`` would have replaced must be left
byte for byte as it was.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

import minipkg
from conftest import tree_digest
from milsurgery import BlobFileError, merge
from milsurgery.assemble import BlobWriter
from milsurgery.cli import main
from milsurgery.package import StagedPackage
from milsurgery.verify import VerificationFailed


@pytest.fixture
def pair(tmp_path):
    w = np.arange(64, dtype=np.float16).reshape(8, 8)
    a = minipkg.make(tmp_path / "a.mlpackage", {"main": [("float16", w), ("float16", w + 1)]})
    b = minipkg.make(tmp_path / "b.mlpackage", {"main": [("float16", w), ("float16", w + 2)]})
    return [f"{a}:main=infer", f"{b}:main=prefill"], [a, b]


@pytest.fixture
def existing(tmp_path):
    """A package already at the destination, different from what the merge would write."""
    v = np.full((4, 4), 7, dtype=np.float16)
    return minipkg.make(tmp_path / "out.mlpackage", {"main": [("float16", v)]})


def flip_last_copied_byte(monkeypatch):
    """Make the writer corrupt the last byte of every blob it copies."""
    original = BlobWriter.copy_from

    def copy_from(self, source, blob):
        record = original(self, source, blob)
        end = record + 64 + blob.size - 1  # data follows the 64-byte record header
        (byte,) = os.pread(self._fd, 1, end)
        os.pwrite(self._fd, bytes([byte ^ 0x01]), end)
        return record

    monkeypatch.setattr(BlobWriter, "copy_from", copy_from)


def cut_weight_file(monkeypatch):
    """Make the staged package's weight.bin end inside its first blob."""
    original = StagedPackage.commit

    def commit(self, model, manifest=None, check=None):
        os.truncate(self.weight_path("weight.bin"), 100)
        return original(self, model, manifest, check)

    monkeypatch.setattr(StagedPackage, "commit", commit)


def leftovers(directory) -> list[str]:
    return sorted(e for e in os.listdir(directory) if "milsurgery" in e)


def test_verification_failure_writes_nothing(pair, tmp_path, monkeypatch):
    specs, sources = pair
    before = [tree_digest(s) for s in sources]
    flip_last_copied_byte(monkeypatch)
    out = str(tmp_path / "out.mlpackage")
    with pytest.raises(VerificationFailed) as info:
        merge(specs, out, verify=True)
    report = info.value.report
    assert report.package == out and not report.equivalent
    text = "\n".join(d for c in report.checks for d in c.differences)
    assert "differs from the source's blob" in text
    assert os.path.join(out, "Data") in text and ".milsurgery-partial-" not in text, text
    assert not os.path.lexists(out) and leftovers(tmp_path) == []
    assert [tree_digest(s) for s in sources] == before


def test_verification_failure_keeps_the_destination_force_would_replace(pair, existing, tmp_path, monkeypatch):
    specs, _ = pair
    before = tree_digest(existing)
    flip_last_copied_byte(monkeypatch)
    with pytest.raises(VerificationFailed):
        merge(specs, existing, verify=True, force=True)
    assert tree_digest(existing) == before
    assert leftovers(tmp_path) == []


def test_output_that_does_not_open_keeps_the_destination(pair, existing, tmp_path, monkeypatch):
    specs, _ = pair
    before = tree_digest(existing)
    cut_weight_file(monkeypatch)
    with pytest.raises(BlobFileError) as info:
        merge(specs, existing, verify=True, force=True)
    message = str(info.value)
    assert message.startswith(f"{existing}: the package written does not open"), message
    assert info.value.path.startswith(existing) and ".milsurgery-partial-" not in message
    assert tree_digest(existing) == before
    assert leftovers(tmp_path) == []


def test_cli_verify_failure_exit_1_destination_kept(pair, existing, tmp_path, monkeypatch, capsys):
    specs, _ = pair
    before = tree_digest(existing)
    flip_last_copied_byte(monkeypatch)
    code = main(["merge", "--verify", "--force", "--quiet", "-o", existing, *specs])
    out, err = capsys.readouterr()
    assert code == 1 and out == ""
    assert err.startswith(f"milsurgery: verification failed: {existing}: function 'infer' differs")
    assert err.count("\n") == 1
    assert tree_digest(existing) == before


def test_verified_merge_replaces_the_destination(pair, existing, tmp_path):
    specs, sources = pair
    report = merge(specs, existing, verify=True, force=True)
    assert report.functions == ["infer", "prefill"]
    from milsurgery.verify import verify

    assert verify(existing, specs).equivalent
    assert leftovers(tmp_path) == []


def test_without_verify_the_fault_goes_unnoticed(pair, tmp_path, monkeypatch):
    """The injected fault is real: without --verify the corrupted output is written, and a
    separate verify run finds it."""
    specs, _ = pair
    flip_last_copied_byte(monkeypatch)
    out = str(tmp_path / "out.mlpackage")
    merge(specs, out)
    from milsurgery.verify import verify

    report = verify(out, specs)
    assert not report.equivalent


# -- program attributes holding blobs --------------------------------------------------------

SPEC = os.path.join("Data", "com.apple.CoreML", "model.mlmodel")
LUT = np.arange(16, dtype=np.float16)  # a size no function blob has (8x8 float16 = 128 bytes)


def add_attribute_blobs(pkg: str, attrs: dict[str, int]) -> None:
    """Give ``pkg``'s program attributes referencing its blobs: key -> index in file order."""
    from milsurgery import BlobFile
    from milsurgery._proto import milsurgery_spec_pb2 as pb

    path = os.path.join(pkg, SPEC)
    model = pb.Model.FromString(open(path, "rb").read())
    with BlobFile(os.path.join(pkg, "Data", "com.apple.CoreML", "weights", "weight.bin")) as bf:
        blobs = [bf.blobs[o] for o in sorted(bf.blobs)]
    for key, index in attrs.items():
        blob = blobs[index]
        value = model.mlProgram.attributes.add(key=key).value
        value.CopyFrom(minipkg.blob_value("float16", [blob.element_count], blob.record_offset))
    with open(path, "wb") as f:
        f.write(model.SerializeToString())


@pytest.fixture
def attr_pair(tmp_path):
    """a and b both have attribute "lut" (different bytes: the merge keeps a's); only b has "extra"."""
    w = np.arange(64, dtype=np.float16).reshape(8, 8)
    a = minipkg.make(tmp_path / "a.mlpackage", {"main": [("float16", w)]}, extra_blobs=[("float16", LUT)])
    b = minipkg.make(tmp_path / "b.mlpackage", {"main": [("float16", w + 1)]},
                     extra_blobs=[("float16", LUT + 1), ("float16", LUT + 2)])
    add_attribute_blobs(a, {"lut": 1})
    add_attribute_blobs(b, {"lut": 1, "extra": 2})
    return [f"{a}:main=infer", f"{b}:main=prefill"], [a, b]


def test_verify_checks_program_attribute_blobs(attr_pair, tmp_path):
    from milsurgery.verify import verify

    specs, (a, b) = attr_pair
    out = str(tmp_path / "out.mlpackage")
    merged = merge(specs, out, verify=True)
    assert [w for w in merged.warnings if "program attribute" in w] == [
        f"program attribute 'lut': kept the value of {a}, dropped the different value of {b}"
    ]
    report = verify(out, specs)
    assert report.equivalent
    found = {c.key: c for c in report.attributes}
    assert sorted(found) == ["extra", "lut"]
    assert found["lut"].matched == a and found["lut"].sources == sorted([a, b])
    assert found["extra"].matched == b and found["extra"].bytes_compared == LUT.nbytes
    assert "2 program attributes holding blobs" in report.summary()


def test_verify_finds_a_changed_program_attribute_blob(attr_pair, tmp_path, capsys):
    from milsurgery._proto import milsurgery_spec_pb2 as pb
    from milsurgery.verify import verify

    specs, _ = attr_pair
    out = str(tmp_path / "out.mlpackage")
    merge(specs, out)
    model = pb.Model.FromString(open(os.path.join(out, SPEC), "rb").read())
    offset = next(e.value.blobFileValue.offset for e in model.mlProgram.attributes if e.key == "extra")
    weights = os.path.join(out, "Data", "com.apple.CoreML", "weights", "weight.bin")
    with open(weights, "r+b") as f:  # last byte of the blob's data
        f.seek(offset + 64 + LUT.nbytes - 1)
        byte = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte ^ 0x01]))
    report = verify(out, specs)
    assert all(c.equivalent for c in report.checks)  # only the attribute's blob changed
    bad = [c for c in report.attributes if not c.equivalent]
    assert [c.key for c in bad] == ["extra"] and not report.equivalent
    assert report.summary().endswith(bad[0].difference)
    assert main(["verify", out, "--against", *specs]) == 1
    assert "program attribute 'extra': differs" in capsys.readouterr().out


def test_merge_verify_catches_a_fault_in_an_attribute_blob(attr_pair, tmp_path, monkeypatch):
    specs, _ = attr_pair
    original = BlobWriter.copy_from

    def copy_from(self, source, blob):  # corrupt only the 32-byte attribute blobs
        record = original(self, source, blob)
        if blob.size == LUT.nbytes:
            os.pwrite(self._fd, b"\xff", record + 64)
        return record

    monkeypatch.setattr(BlobWriter, "copy_from", copy_from)
    out = str(tmp_path / "out.mlpackage")
    with pytest.raises(VerificationFailed) as info:
        merge(specs, out, verify=True)
    assert "program attribute" in str(info.value)
    assert not os.path.lexists(out) and leftovers(tmp_path) == []


def test_same_attribute_bytes_at_another_offset_is_no_conflict(tmp_path):
    """Two sources whose "lut" attributes hold the same bytes stored at different offsets: the
    values are equal, so the merge reports nothing dropped."""
    w = np.arange(64, dtype=np.float16).reshape(8, 8)
    a = minipkg.make(tmp_path / "a.mlpackage", {"main": [("float16", w)]}, extra_blobs=[("float16", LUT)])
    b = minipkg.make(tmp_path / "b.mlpackage", {"main": [("float16", w + 1), ("float16", w + 2)]},
                     extra_blobs=[("float16", LUT)])
    add_attribute_blobs(a, {"lut": 1})
    add_attribute_blobs(b, {"lut": 2})
    report = merge([f"{a}:main=infer", f"{b}:main=prefill"], str(tmp_path / "out.mlpackage"))
    assert report.warnings == []
