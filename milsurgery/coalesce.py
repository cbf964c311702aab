"""Finding blobs with identical content: group by shape of the data, hash, confirm byte by byte.

Two blobs are the same weight iff they have the same dtype, the same size, the same sub-byte
padding and the same bytes. The bit pattern decides: -0.0 and 0.0 differ, a NaN-bearing tensor
equals its exact copy. Hashes (xxh3-128 of samples, then of whole blobs) only narrow down the
candidates among blobs of one (dtype, size); a byte comparison always decides.

Bytes are read through bounded mmap windows that are unmapped as soon as they are used, so a
process's resident memory does not grow with the size of the blobs.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import threading
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import xxhash

from .blobfile import Blob, BlobFile
from .errors import BlobFileError

__all__ = ["BlobSource", "Stats", "Stopped", "group_identical", "ConcurrentGrouping", "blob_digest", "sample_digest", "blobs_equal", "WINDOW"]

#: Bytes mapped at once while hashing or comparing.
WINDOW = 8 << 20
_PAGE = mmap.ALLOCATIONGRANULARITY

#: ``stop()`` returning true asks a comparison or hash to give up (checked before each window).
Stop = Callable[[], bool]


class Stopped(Exception):
    """A comparison or hash gave up because its ``stop`` callable returned true."""


@dataclass(frozen=True)
class BlobSource:
    """A blob in a particular open file."""

    file: BlobFile
    blob: Blob

    @property
    def key(self) -> tuple:
        """Identity of the physical blob: the file's device and inode (one file reached by two
        names, hard links or symlinks is one file) and the record offset."""
        return (getattr(self.file, "identity", id(self.file)), self.blob.record_offset)

    @property
    def shape_key(self) -> tuple[int, int, int]:
        b = self.blob
        return (b.dtype.code, b.size, b.padding_bits if b.dtype.sub_byte else 0)


def _windows(src: BlobSource, window: int | None = None, stop: Stop | None = None):
    """Yield memoryviews of the blob's data in chunks of ``window`` bytes (the last one shorter),
    one short-lived mapping at a time. Two blobs of one size yield chunks of equal lengths.
    Raises :class:`Stopped` before a window if ``stop()`` is true.

    The mappings are private (copy-on-write, never written) rather than read-only only so that
    ctypes can take their address for ``memcmp``: reading them shares the page cache as a
    read-only mapping would.
    """
    window = window or WINDOW
    fd, data, size = src.file.fileno(), src.blob.data_offset, src.blob.size
    for chunk in range(0, size, window):
        if stop is not None and stop():
            raise Stopped
        pos = data + chunk
        base = pos - pos % _PAGE
        length = pos + min(window, size - chunk) - base
        try:
            mm = mmap.mmap(fd, length, access=mmap.ACCESS_COPY, offset=base)
        except OSError as exc:
            raise BlobFileError(src.file.path, f"cannot map {length} bytes to compare: {exc.strerror}", base) from None
        try:
            if hasattr(mm, "madvise"):
                mm.madvise(mmap.MADV_SEQUENTIAL)
            with memoryview(mm) as whole, whole[pos - base :] as view:
                yield view
        finally:
            mm.close()


def _load_memcmp():
    try:
        fn = ctypes.CDLL(None).memcmp
    except (OSError, AttributeError, TypeError):
        return None
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    return fn


_memcmp = _load_memcmp()


def _same_bytes(a: memoryview, b: memoryview) -> bool:
    """Compare two equally long buffers without copying them (libc memcmp on their addresses,
    which also runs outside the GIL).

    memoryview's own ``==`` compares element by element (about 0.5 GB/s); memcmp runs at memory
    speed. Without a usable libc, fall back to comparing bounded copies.
    """
    if _memcmp is None or a.readonly or b.readonly:
        step = 1 << 20
        return all(a[i : i + step].tobytes() == b[i : i + step].tobytes() for i in range(0, len(a), step))
    pa, pb = ctypes.c_char.from_buffer(a), ctypes.c_char.from_buffer(b)
    try:
        return _memcmp(ctypes.addressof(pa), ctypes.addressof(pb), len(a)) == 0
    finally:
        del pa, pb  # release the buffer exports before the mappings close


@dataclass
class Stats:
    """What identity checks cost: bytes hashed and bytes compared."""

    bytes_hashed: int = 0
    bytes_compared: int = 0

    @property
    def bytes_read(self) -> int:
        return self.bytes_hashed + self.bytes_compared


def blob_digest(src: BlobSource, stats: Stats | None = None, stop: Stop | None = None) -> bytes:
    """xxh3-128 of a blob's data, read through mmap windows."""
    h = xxhash.xxh3_128()
    for view in _windows(src, stop=stop):
        h.update(view)
    if stats is not None:
        stats.bytes_hashed += src.blob.size
    return h.digest()


#: Bytes read from each of the start, middle and end of a blob for its sample digest.
SAMPLE = 4096


def sample_digest(src: BlobSource, stats: Stats | None = None) -> bytes:
    """xxh3-128 of up to three small slices of a blob (start, middle, end), read with ``pread``.

    Cheap to compute whatever the blob's size; tells most different same-size blobs apart, so
    that the full hash is needed only among blobs whose samples agree.
    """
    size, data = src.blob.size, src.blob.data_offset
    if size <= 3 * SAMPLE:
        starts = [0]
        length = size
    else:
        starts = [0, (size // 2) - SAMPLE // 2, size - SAMPLE]
        length = SAMPLE
    h = xxhash.xxh3_128()
    for start in starts:
        h.update(os.pread(src.file.fileno(), length, data + start))
    if stats is not None:
        stats.bytes_hashed += length * len(starts)
    return h.digest()


def blobs_equal(a: BlobSource, b: BlobSource, stats: Stats | None = None, stop: Stop | None = None) -> bool:
    """True iff two blobs have the same dtype, size, padding and bytes."""
    if a.shape_key != b.shape_key:
        return False
    if a.key == b.key:
        return True
    for va, vb in zip(_windows(a, stop=stop), _windows(b)):
        if stats is not None:
            stats.bytes_compared += 2 * len(va)
        if len(va) != len(vb) or not _same_bytes(va, vb):
            return False
    return True


@dataclass
class _Plan:
    """What the cheap pass over the sources decides, and what is left to compare.

    ``canonical[i]`` is final for every source outside ``pending``; a physical duplicate (the same
    record of the same file seen again) points at its first occurrence, whose own canonical may
    still be pending. ``candidate_sets`` are the groups left to compare, each sorted, ordered by
    their first undecided member (the second), so a writer going through the sources in order
    waits as little as possible.
    """

    canonical: list[int]
    candidate_sets: list[list[int]]
    pending: dict[int, int]  # undecided source -> index of its candidate set


def _plan(sources: Sequence[BlobSource], stats: Stats | None) -> _Plan:
    canonical = list(range(len(sources)))
    by_shape: dict[Hashable, list[int]] = {}
    seen_physical: dict[tuple[int, int], int] = {}
    for i, src in enumerate(sources):
        first = seen_physical.setdefault(src.key, i)
        if first != i:
            canonical[i] = first
            continue
        by_shape.setdefault(src.shape_key, []).append(i)
    candidate_sets: list[list[int]] = []
    for members in by_shape.values():
        if len(members) == 2:
            candidate_sets.append(members)
        elif len(members) > 2:
            # Many blobs of one size (the layers of a model): a sample digest splits them cheaply.
            by_sample: dict[bytes, list[int]] = {}
            for i in members:
                by_sample.setdefault(sample_digest(sources[i], stats), []).append(i)
            candidate_sets.extend(same for same in by_sample.values() if len(same) > 1)
    candidate_sets.sort(key=lambda members: members[1])
    pending = {i: k for k, members in enumerate(candidate_sets) for i in members[1:]}
    return _Plan(canonical, candidate_sets, pending)


def _resolve(
    sources: Sequence[BlobSource], members: list[int], canonical: list[int], stats: Stats | None, stop: Stop | None = None
) -> None:
    """Decide ``canonical`` for one candidate set (sorted; its first member stays canonical)."""
    if len(members) == 2:
        # Two candidates: compare them directly. Hashing both would read the same bytes once
        # more, and a byte comparison decides either way (it stops at the first difference).
        i, j = members
        if blobs_equal(sources[i], sources[j], stats, stop):
            canonical[j] = i
        return
    by_digest: dict[bytes, list[int]] = {}
    for i in members:
        by_digest.setdefault(blob_digest(sources[i], stats, stop), []).append(i)
    for same_hash in by_digest.values():
        reps: list[int] = []
        for i in same_hash:
            for r in reps:
                if blobs_equal(sources[r], sources[i], stats, stop):
                    canonical[i] = r
                    break
            else:
                reps.append(i)


def group_identical(sources: Sequence[BlobSource], stats: Stats | None = None, progress=None) -> list[int]:
    """For each source, the index of the first source with identical content (itself if none).

    Only blobs whose (dtype, size, padding) collide are looked at. Three or more such blobs are
    first split by a sample digest (a few KiB of each); then any two candidates left are compared
    byte by byte, and three or more are hashed in full, equal hashes confirmed by comparing
    bytes. :class:`ConcurrentGrouping` does the same while a writer copies. ``progress(phase,
    done, total)``, if given, is called after each candidate set with the data bytes of the sets
    settled so far.
    """
    plan = _plan(sources, stats)
    total = sum(sources[i].blob.size for members in plan.candidate_sets for i in members)
    done = 0
    for members in plan.candidate_sets:
        _resolve(sources, members, plan.canonical, stats)
        done += sum(sources[i].blob.size for i in members)
        if progress is not None:
            progress("comparing", done, total)
    canonical = plan.canonical
    # Point duplicates of a physical blob at the canonical of its first occurrence.
    for i, c in enumerate(canonical):
        canonical[i] = canonical[c]
    return canonical


class ConcurrentGrouping:
    """:func:`group_identical` running in a background thread while the caller writes.

    The cheap pass (shapes, sample digests) runs at construction. Inside ``with``, a worker
    compares the remaining candidates; :meth:`canonical_of` answers at once for sources that pass
    already decided (every first member of a group: what a writer copies) and waits for the
    worker only where a comparison is still running. Comparing (``memcmp``, hashing) and copying
    (``copy_file_range``) both run outside the GIL, so the two overlap on separate cores.

    A worker's exception is raised by :meth:`canonical_of`; leaving the ``with`` block stops the
    worker (before the next window of at most :data:`WINDOW` bytes it would read) and waits for it.
    """

    def __init__(self, sources: Sequence[BlobSource], stats: Stats | None = None):
        self._sources = sources
        self._stats = stats
        self._plan = _plan(sources, stats)
        self._resolved = 0  # candidate sets decided so far
        self._error: BaseException | None = None
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._work, name="milsurgery-compare", daemon=True)

    def __enter__(self) -> ConcurrentGrouping:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        with self._cond:
            self._stop = True
        if self._thread.is_alive():
            self._thread.join()

    def _stopping(self) -> bool:
        return self._stop

    def _work(self) -> None:
        try:
            for k, members in enumerate(self._plan.candidate_sets):
                if self._stop:
                    return
                _resolve(self._sources, members, self._plan.canonical, self._stats, self._stopping)
                with self._cond:
                    self._resolved = k + 1
                    self._cond.notify_all()
        except Stopped:  # the caller left: nobody waits for the rest
            return
        except BaseException as exc:  # handed to the caller's thread
            with self._cond:
                self._error = exc
                self._cond.notify_all()

    def canonical_of(self, i: int) -> int:
        """The index of the first source with content identical to source ``i``."""
        first = self._plan.canonical[i]
        if first != i and i not in self._plan.pending:
            return self.canonical_of(first)  # a physical duplicate: its first occurrence decides
        k = self._plan.pending.get(i)
        if k is not None and self._resolved <= k:
            with self._cond:
                while self._resolved <= k and self._error is None:
                    self._cond.wait()
                if self._resolved <= k:  # the worker failed before deciding this source
                    raise self._error
        return self._plan.canonical[i]
