"""``--no-sync``: the same output, written without flushing it to disk.

By default every command that writes a package fsyncs its files and directories before the
rename that makes it appear. ``--no-sync`` (``sync=False``) skips those flushes for a new output
only; in-place edits are always flushed.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import milsurgery.blobfile as blobfile
from milsurgery.cli import main

import minipkg

RNG = np.random.default_rng(11)


@pytest.fixture
def pkgs(tmp_path):
    w = [RNG.standard_normal((64, 64)).astype(np.float16) for _ in range(3)]
    a = minipkg.make(tmp_path / "a.mlpackage", {"main": [("float16", w[0]), ("float16", w[1])]})
    b = minipkg.make(tmp_path / "b.mlpackage", {"main": [("float16", w[0]), ("float16", w[2])]})
    multi = minipkg.make(
        tmp_path / "multi.mlpackage",
        {"f": [("float16", w[0]), ("float16", w[1])], "g": [0, ("float16", w[2])]},
        extra_blobs=[("float16", w[2])],
    )
    return a, b, multi


def _tree(path) -> dict[str, object]:
    """Every file's bytes; the manifest with its (random) identifiers replaced by what they name."""
    out: dict[str, object] = {}
    for root, _dirs, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            with open(full, "rb") as f:
                out[os.path.relpath(full, path)] = f.read()
    manifest = json.loads(out.pop("Manifest.json"))
    entries = manifest.pop("itemInfoEntries")
    manifest["root"] = entries[manifest.pop("rootModelIdentifier")]
    manifest["entries"] = sorted(entries.values(), key=lambda e: e["path"])
    out["Manifest.json"] = manifest
    return out


COMMANDS = {
    "merge": lambda a, b, m, out: ["merge", "-o", out, f"{a}:main=x", f"{b}:main=y"],
    "shrink": lambda a, b, m, out: ["shrink", m, "-o", out],
    "extract": lambda a, b, m, out: ["extract", m, "g", "-o", out],
    "extract --single": lambda a, b, m, out: ["extract", m, "g", "--single", "-o", out],
    "remove": lambda a, b, m, out: ["remove", m, "g", "-o", out],
    "rename": lambda a, b, m, out: ["rename", m, "f=first", "-o", out],
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_no_sync_writes_the_same_package_without_flushing(pkgs, tmp_path, monkeypatch, command):
    a, b, multi = pkgs
    flushed: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (flushed.append(fd), real_fsync(fd))[1])
    writeback: list[int] = []
    if blobfile._sync_file_range is not None:
        real_range = blobfile._sync_file_range
        monkeypatch.setattr(blobfile, "WRITEBACK_STEP", 4096)  # blobs here are 8 KiB
        monkeypatch.setattr(
            blobfile, "_sync_file_range", lambda *args: (writeback.append(args[1]), real_range(*args))[1]
        )

    durable = str(tmp_path / "durable.mlpackage")
    assert main([*COMMANDS[command](a, b, multi, durable), "--quiet"]) == 0
    assert flushed, "the default run flushes"
    if blobfile._sync_file_range is not None:
        assert writeback, "the default run starts write-back while copying"
    flushed.clear()
    writeback.clear()

    fast = str(tmp_path / "fast.mlpackage")
    assert main([*COMMANDS[command](a, b, multi, fast), "--quiet", "--no-sync"]) == 0
    assert flushed == [] and writeback == []
    assert _tree(fast) == _tree(durable)


def test_in_place_edits_refuse_no_sync(pkgs, capsys):
    _, _, multi = pkgs
    before = _tree(multi)
    assert main(["shrink", multi, "--in-place", "--no-sync"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--no-sync" in err[0] and "--in-place" in err[0]
    assert _tree(multi) == before
    with pytest.raises(SystemExit):  # append edits in place: it has no such option
        main(["append", multi, f"{multi}:f=h", "--no-sync"])
