"""Ctrl-C (SIGINT) and SIGTERM in the middle of a merge: the CLI unwinds, removes its partial
output, stops the comparing thread and exits 130 / 143 with one line on stderr.

The merge runs in a child process whose writer (or comparing thread) is made to stop at a known
point and say so on stdout; the test then sends the signal. Two points: while a blob is being
copied, and while the writer waits for a comparison still running.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import pytest

import minipkg
from conftest import tree_digest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs the CLI with one hook: at the chosen point, print "ready" and stall (the signal arrives).
CHILD = r"""
import sys, time
import milsurgery.blobfile as blobfile
import milsurgery.coalesce as coalesce
from milsurgery.cli import main

where = sys.argv[1]

def pause():
    print("ready", flush=True)
    time.sleep(60)

if where == "copy":
    real_copy = blobfile.BlobWriter.copy_from
    calls = []
    def copy_from(self, source, blob):
        calls.append(1)
        if len(calls) == 2:
            pause()
        return real_copy(self, source, blob)
    blobfile.BlobWriter.copy_from = copy_from
else:  # a comparison crawls (until asked to stop), so the writer waits for its answer
    real_windows = coalesce._windows
    def windows(src, window=None, stop=None):
        for i, view in enumerate(real_windows(src, window, stop)):
            if i == 0 and stop is not None:
                print("ready", flush=True)
                while not stop():
                    time.sleep(0.01)
            yield view
    coalesce._windows = windows
sys.exit(main(sys.argv[2:]))
"""


@pytest.fixture
def pair(tmp_path):
    rng = np.random.default_rng(3)
    layers = [rng.standard_normal((32, 32)).astype(np.float16) for _ in range(3)]
    a = minipkg.make(tmp_path / "a.mlpackage", {"main": [("float16", x) for x in layers]})
    b = minipkg.make(tmp_path / "b.mlpackage", {"main": [("float16", x) for x in layers[:2]] + [("float16", layers[2] + 1)]})
    return a, b


@pytest.mark.parametrize("where, extra", [("copy", []), ("compare", []), ("copy", ["--adopt"])])
@pytest.mark.parametrize("sig, code, word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_signal_mid_merge_leaves_nothing(pair, tmp_path, where, extra, sig, code, word):
    """With --adopt, the writer copies the anchor's blobs while adoption's decisions are made on
    another thread: a signal then ends both, leaving nothing."""
    a, b = pair
    before = [tree_digest(a), tree_digest(b)]
    out = tmp_path / "out.mlpackage"
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, where, "merge", *extra, "-o", str(out), f"{a}:main=x", f"{b}:main=y"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=ROOT),
    )
    try:
        assert child.stdout.readline() == "ready\n", child.stderr.read()
        partials = [e for e in os.listdir(tmp_path) if ".milsurgery-partial-" in e]
        assert len(partials) == 1  # the merge is under way
        child.send_signal(sig)
        stdout, stderr = child.communicate(timeout=30)
    finally:
        child.kill()
    assert child.returncode == code, stderr
    assert stderr == f"milsurgery: {word}; no output was written\n" and stdout == ""
    assert sorted(os.listdir(tmp_path)) == ["a.mlpackage", "b.mlpackage"]
    assert [tree_digest(a), tree_digest(b)] == before


def test_main_restores_the_sigterm_handler(pair, tmp_path):
    """Called in-process, main leaves the caller's SIGTERM handler as it found it."""
    from milsurgery.cli import main

    a, _ = pair
    mine = lambda signum, frame: None  # noqa: E731
    previous = signal.signal(signal.SIGTERM, mine)
    try:
        assert main(["inspect", "--no-duplicates", a]) == 0
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.mark.parametrize("sig, code, word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_signal_mid_append_leaves_the_package_as_it_was(pair, tmp_path, sig, code, word):
    """An in-place append stopped while copying: the appended bytes are cut back, and the
    message says what state the package is in rather than "no output"."""
    a, _ = pair
    rng = np.random.default_rng(5)
    c = minipkg.make(tmp_path / "c.mlpackage", {"main": [("float16", rng.standard_normal((16, 16)).astype(np.float16)) for _ in range(3)]})
    before = tree_digest(a)
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, "copy", "append", a, f"{c}:main=z"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=ROOT),
    )
    try:
        assert child.stdout.readline() == "ready\n", child.stderr.read()
        child.send_signal(sig)
        stdout, stderr = child.communicate(timeout=30)
    finally:
        child.kill()
    assert child.returncode == code, stderr
    assert stderr == f"milsurgery: {word}; {a} is complete, as it was or with the whole edit\n"
    assert tree_digest(a) == before
