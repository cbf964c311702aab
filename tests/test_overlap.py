"""Comparing while copying (ConcurrentGrouping) and early write-back (sync_file_range).

The writer asks the grouping, source by source, whether a blob is the first of its content; the
grouping compares in a second thread. These tests show that the answers are those of the serial
:func:`group_identical`, that decided sources are answered without waiting for comparisons, and
that a failure on either side ends both, leaving no output.
"""

from __future__ import annotations

import os
import random
import threading

import numpy as np
import pytest

import milsurgery.blobfile as blobfile
import milsurgery.coalesce as coalesce
from milsurgery import merge
from milsurgery.blobfile import BlobFile, BlobWriter
from milsurgery.coalesce import BlobSource, ConcurrentGrouping, group_identical
from milsurgery.errors import BlobFileError, WriteError

import minipkg

RNG = np.random.default_rng(7)


def _compare_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "milsurgery-compare"]


@pytest.fixture
def mixed_blobs(tmp_path):
    """A weight file with same-size blobs that are equal, differ at one byte, or differ only
    outside the sampled slices, plus blobs of unique sizes."""
    base = RNG.integers(0, 255, 6 * coalesce.SAMPLE, dtype=np.uint8)
    inner = base.copy()
    inner[coalesce.SAMPLE + 3] ^= 1  # outside the start, middle and end samples
    last = base.copy()
    last[-1] ^= 0x80
    small = RNG.integers(0, 255, 100, dtype=np.uint8)
    arrays = [base, inner, base, last, small, base, small.copy(), inner, small[:50], last]
    path = tmp_path / "w.bin"
    with BlobWriter(path) as w:
        for arr in arrays:
            w.add_array("uint8", arr)
    return path


@pytest.mark.parametrize("seed", range(12))
def test_concurrent_answers_equal_serial_grouping(mixed_blobs, seed):
    """Any order of sources, physical duplicates included: the same canonical indices."""
    with BlobFile(mixed_blobs) as bf:
        blobs = list(bf)
        rng = random.Random(seed)
        picked = [rng.choice(blobs) for _ in range(rng.randint(1, 16))]  # repeats are physical duplicates
        sources = [BlobSource(bf, b) for b in picked]
        expected = group_identical(sources)
        with ConcurrentGrouping(sources) as grouping:
            got = [grouping.canonical_of(i) for i in range(len(sources))]
        assert got == expected
        assert not _compare_threads()


def test_decided_sources_are_answered_while_comparisons_wait(mixed_blobs, monkeypatch):
    """The first blob of each content is answered with the worker blocked; a source whose
    comparison is still running waits for it and then gets the right answer."""
    release = threading.Event()
    real_resolve = coalesce._resolve

    def blocked_resolve(*args):
        assert release.wait(30), "the test never released the worker"
        return real_resolve(*args)

    with BlobFile(mixed_blobs) as bf:
        sources = [BlobSource(bf, b) for b in bf]
        expected = group_identical(sources)
        monkeypatch.setattr(coalesce, "_resolve", blocked_resolve)
        with ConcurrentGrouping(sources) as grouping:
            # 0 and 4 are the first of their candidate groups, 8 has a size of its own: all
            # three are decided before any comparison.
            assert grouping.canonical_of(0) == 0
            assert grouping.canonical_of(4) == 4
            assert grouping.canonical_of(8) == 8
            timer = threading.Timer(0.2, release.set)
            timer.start()
            assert grouping.canonical_of(2) == 0  # waits for the comparison of 0 and 2
            assert release.is_set()
            assert [grouping.canonical_of(i) for i in range(len(sources))] == expected
        timer.join()


def test_worker_failure_reaches_the_writer_and_leaves_nothing(tmp_path, monkeypatch):
    """A mapping that fails in the comparing thread is reported as a precise error by merge,
    and the output does not appear."""
    w = RNG.standard_normal((64, 64)).astype(np.float16)
    a = minipkg.make(tmp_path / "a.mlpackage", {"main": [("float16", w), ("float16", w + 1)]})
    b = minipkg.make(tmp_path / "b.mlpackage", {"main": [("float16", w), ("float16", w + 1)]})
    real_mmap = coalesce.mmap.mmap

    def failing_mmap(*args, **kwargs):
        if kwargs.get("access") == coalesce.mmap.ACCESS_COPY:  # only the comparison's windows
            raise OSError(12, "Cannot allocate memory")
        return real_mmap(*args, **kwargs)

    monkeypatch.setattr(coalesce.mmap, "mmap", failing_mmap)
    out = tmp_path / "out.mlpackage"
    with pytest.raises(BlobFileError, match=r"weight\.bin at offset \d+: cannot map \d+ bytes to compare: Cannot allocate memory"):
        merge([f"{a}:main=x", f"{b}:main=y"], out)
    monkeypatch.setattr(coalesce.mmap, "mmap", real_mmap)
    assert sorted(os.listdir(tmp_path)) == ["a.mlpackage", "b.mlpackage"]
    assert not _compare_threads()


def test_writer_failure_stops_the_worker(tmp_path, monkeypatch):
    """A copy that fails ends the comparing thread before merge returns; nothing is left."""
    w = RNG.standard_normal((64, 64)).astype(np.float16)
    a = minipkg.make(tmp_path / "a.mlpackage", {"main": [("float16", w), ("float16", w + 1)]})
    b = minipkg.make(tmp_path / "b.mlpackage", {"main": [("float16", w), ("float16", w + 2)]})

    def failing_copy(self, source, blob):
        raise WriteError(f"{self.path}: write failed at offset 64: No space left on device")

    monkeypatch.setattr(BlobWriter, "copy_from", failing_copy)
    with pytest.raises(WriteError, match="No space left on device"):
        merge([f"{a}:main=x", f"{b}:main=y"], tmp_path / "out.mlpackage")
    assert sorted(os.listdir(tmp_path)) == ["a.mlpackage", "b.mlpackage"]
    assert not _compare_threads()


def test_leaving_stops_the_worker_inside_a_candidate_set(tmp_path, monkeypatch):
    """Leaving the ``with`` block (an error or Ctrl-C in the writer) stops a worker that is
    hashing a large group of same-size blobs before its next window, not after the whole group."""
    import time

    monkeypatch.setattr(coalesce, "WINDOW", 64 << 10)
    data = RNG.integers(0, 255, 1 << 20, dtype=np.uint8)  # 16 windows per blob
    path = tmp_path / "w.bin"
    with BlobWriter(path) as w:
        for _ in range(3):  # three equal blobs: sampled, then hashed in full
            w.add_array("uint8", data)
    started, release = threading.Event(), threading.Event()
    read = []
    real_windows = coalesce._windows

    def counted_windows(src, window=None, stop=None):
        for view in real_windows(src, window, stop):
            read.append(len(view))
            if len(read) == 1:
                started.set()
                assert release.wait(30), "the test never released the worker"
            yield view

    monkeypatch.setattr(coalesce, "_windows", counted_windows)
    stats = coalesce.Stats()
    with BlobFile(path) as bf:
        sources = [BlobSource(bf, b) for b in bf]
        grouping = ConcurrentGrouping(sources, stats)

        def release_once_stopping():
            while not grouping._stop:
                time.sleep(0.001)
            release.set()

        releaser = threading.Thread(target=release_once_stopping)
        with grouping:
            assert started.wait(30)
            releaser.start()
        releaser.join()
    assert not _compare_threads()
    assert read == [64 << 10], f"the worker read {len(read)} windows after being asked to stop"
    assert stats.bytes_hashed == 3 * coalesce.SAMPLE * 3  # the samples only; no full hash finished


def test_merge_output_is_the_same_whatever_the_thread_timing(tmp_path, monkeypatch):
    """A slow worker (every comparison delayed) and a fast one produce identical outputs."""
    import time

    layers = [RNG.standard_normal((32, 32)).astype(np.float16) for _ in range(6)]
    a = minipkg.make(tmp_path / "a.mlpackage", {"main": [("float16", x) for x in layers]})
    b = minipkg.make(tmp_path / "b.mlpackage", {"main": [("float16", x) for x in layers[:4]] + [("float16", layers[0] + 1)]})
    merge([f"{a}:main=x", f"{b}:main=y"], tmp_path / "fast.mlpackage")
    real_resolve = coalesce._resolve
    monkeypatch.setattr(coalesce, "_resolve", lambda *args: (time.sleep(0.02), real_resolve(*args))[1])
    merge([f"{a}:main=x", f"{b}:main=y"], tmp_path / "slow.mlpackage")
    for rel in ("Data/com.apple.CoreML/model.mlmodel", "Data/com.apple.CoreML/weights/weight.bin"):
        with open(tmp_path / "fast.mlpackage" / rel, "rb") as f1, open(tmp_path / "slow.mlpackage" / rel, "rb") as f2:
            assert f1.read() == f2.read(), rel


@pytest.mark.skipif(blobfile._sync_file_range is None, reason="sync_file_range is Linux-only")
@pytest.mark.parametrize("sync", [True, False])
def test_copy_starts_writeback_in_steps(tmp_path, monkeypatch, sync):
    """With fsync ahead, write-back of copied bytes starts every WRITEBACK_STEP bytes, over
    consecutive ranges of the output; without it, never. The bytes are copied either way."""
    step = 1 << 20
    monkeypatch.setattr(blobfile, "WRITEBACK_STEP", step)
    calls: list[tuple[int, int, int]] = []
    real = blobfile._sync_file_range

    def spy(fd, offset, nbytes, flags):
        calls.append((offset, nbytes, flags))
        return real(fd, offset, nbytes, flags)

    monkeypatch.setattr(blobfile, "_sync_file_range", spy)
    payload = RNG.integers(0, 255, 3 * step + 5, dtype=np.uint8)
    src = tmp_path / "src.bin"
    with BlobWriter(src, sync=False) as w:
        off = w.add_array("uint8", payload)
    assert not calls  # add_array writes directly; only copies start write-back
    dst = tmp_path / "dst.bin"
    with BlobFile(src) as bf, BlobWriter(dst, sync=sync) as w:
        new = w.copy_from(bf, bf.blobs[off])
        new2 = w.copy_from(bf, bf.blobs[off])
    with BlobFile(dst) as out:
        assert out.view(out.blobs[new]).tobytes() == payload.tobytes()
        assert out.view(out.blobs[new2]).tobytes() == payload.tobytes()
        size = out.file_size
    if not sync:
        assert calls == []
        return
    assert len(calls) >= 5
    assert calls[0][0] == 0
    for (o1, n1, _), (o2, _, _) in zip(calls, calls[1:]):
        assert o2 == o1 + n1  # consecutive ranges, nothing skipped
    assert all(n >= step and flags == blobfile._SYNC_FILE_RANGE_WRITE for _, n, flags in calls)
    assert calls[-1][0] + calls[-1][1] <= size

