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
