"""MIL blob storage files (``weight.bin``): a validating reader and an appending writer.

The reader maps the file once and checks every record at open (version, count, sentinels, dtypes,
bounds, alignment, sub-byte padding); afterwards callers trust what it hands out. Opening reads
only the 64-byte records, never weight bytes: a blob's data is read when a caller asks for a view,
a chunk iterator or its values.

The writer appends records at 64-byte aligned offsets, keeps the header's ``count`` right, and
copies blob bytes straight from another file with ``os.copy_file_range`` (falling back to bounded
``pread``/``write`` chunks), so weight bytes do not pass through Python memory in bulk.
"""

from __future__ import annotations

import mmap
import os
import stat
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import BlobFileError, WriteError
from .formats import (
    ALIGNMENT,
    BLOB_DTYPE_BY_NAME,
    BLOB_DTYPES,
    HEADER_SIZE,
    HEADER_STRUCT,
    RECORD_SIZE,
    RECORD_STRUCT,
    SENTINEL,
    STORAGE_VERSION,
    BlobDType,
    align,
)

if TYPE_CHECKING:
    import numpy as np

# numpy is imported where values are encoded or decoded, not at import: the weight path (open,
# compare, copy) never needs it, and importing it is a good part of a command's start-up time.

__all__ = ["Blob", "BlobFile", "BlobWriter", "pack_bits", "unpack_bits", "restore_blob_file", "CHUNK_SIZE"]

#: Size of the windows used to hash, compare and copy blob bytes. Bounds memory per operation.
CHUNK_SIZE = 8 << 20


@dataclass(frozen=True)
class Blob:
    """One blob of a blob file: where its record and data are, and what they hold."""

    record_offset: int
    dtype: BlobDType
    size: int  # bytes of data
    data_offset: int
    padding_bits: int  # as stored; meaningful only for sub-byte dtypes

    @property
    def element_count(self) -> int:
        """Number of elements the data holds (sub-byte padding excluded)."""
        if self.dtype.sub_byte:
            return (self.size * 8 - self.padding_bits) // self.dtype.bits
        return self.size * 8 // self.dtype.bits


class BlobFile:
    """A validated, memory-mapped MIL blob storage file (version 2).

    ``BlobFile(path)`` raises :class:`BlobFileError` naming the file and the offset of the first
    fault. ``blobs`` maps each record offset (what a spec's ``BlobFileValue.offset`` holds) to its
    :class:`Blob`, in file order. Use as a context manager or call :meth:`close`.
    """

    def __init__(self, path: str | os.PathLike, *, fd: int | None = None):
        self.path = os.fspath(path)
        self._mm: mmap.mmap | None = None
        self._fd = -1
        if fd is not None:  # already opened (and checked) by the caller; this object now owns it
            self._fd = fd
        else:
            flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
            try:
                self._fd = os.open(self.path, flags)  # non-blocking: a FIFO must not hang the open
            except OSError as exc:
                raise BlobFileError(self.path, f"cannot open: {exc.strerror}") from None
        try:
            st = os.fstat(self._fd)
            if not stat.S_ISREG(st.st_mode):
                raise BlobFileError(self.path, "is not a regular file")
            self.identity = (st.st_dev, st.st_ino)
            self.file_size = st.st_size
            if self.file_size < HEADER_SIZE:
                raise BlobFileError(
                    self.path,
                    f"file is {self.file_size} bytes, shorter than the {HEADER_SIZE}-byte storage header",
                )
            self.blobs: dict[int, Blob] = {}
            self.end_of_blobs = HEADER_SIZE
            self._validate()
            # Mapped only now: records are read with pread, so validating maps no pages (page
            # faults on a mapping would read ahead around every record).
            try:
                self._mm = mmap.mmap(self._fd, self.file_size, access=mmap.ACCESS_READ)
            except OSError as exc:
                raise BlobFileError(self.path, f"cannot map the file ({self.file_size} bytes): {exc.strerror}") from None
        except BaseException:
            self.close()
            raise

    # -- validation ----------------------------------------------------------------------------
    def _read(self, offset: int, n: int) -> bytes:
        try:
            data = os.pread(self._fd, n, offset)
        except OSError as exc:
            raise BlobFileError(self.path, f"cannot read: {exc.strerror}", offset) from None
        if len(data) != n:
            raise BlobFileError(self.path, "file shrank while being read", offset)
        return data

    def _validate(self) -> None:
        path, size = self.path, self.file_size
        count, version, *_reserved = HEADER_STRUCT.unpack(self._read(0, HEADER_SIZE))
        if version != STORAGE_VERSION:
            raise BlobFileError(
                path, f"storage version is {version}, only version {STORAGE_VERSION} is supported", 4
            )
        # Every blob takes a 64-byte record and at least one byte of data.
        max_count = (size - HEADER_SIZE) // (RECORD_SIZE + 1)
        if count > max_count:
            raise BlobFileError(
                path,
                f"header claims {count} blobs but a {size}-byte file can hold at most {max_count}",
                0,
            )
        offset = HEADER_SIZE
        for index in range(count):
            if offset + RECORD_SIZE > size:
                raise BlobFileError(
                    path,
                    f"blob {index} of {count}: metadata record runs past the end of the "
                    f"{size}-byte file",
                    offset,
                )
            sentinel, code, nbytes, data_offset, padding, *_ = RECORD_STRUCT.unpack(self._read(offset, RECORD_SIZE))
            if sentinel != SENTINEL:
                raise BlobFileError(
                    path, f"blob {index}: bad sentinel 0x{sentinel:08X} (expected 0xDEADBEEF)", offset
                )
            dtype = BLOB_DTYPES.get(code)
            if dtype is None:
                raise BlobFileError(path, f"blob {index}: unknown blob dtype {code}", offset + 4)
            if data_offset != offset + RECORD_SIZE:
                overlap = " (it overlaps the bytes before it)" if data_offset < offset + RECORD_SIZE else ""
                raise BlobFileError(
                    path,
                    f"blob {index}: data offset {data_offset} is not record offset + {RECORD_SIZE} "
                    f"({offset + RECORD_SIZE}){overlap}",
                    offset + 16,
                )
            if nbytes == 0:
                raise BlobFileError(path, f"blob {index}: data size is 0", offset + 8)
            if data_offset + nbytes > size:
                raise BlobFileError(
                    path,
                    f"blob {index}: {nbytes} bytes of data at {data_offset} run past the end of "
                    f"the {size}-byte file",
                    offset + 8,
                )
            if dtype.sub_byte:
                if padding >= 8 or (nbytes * 8 - padding) % dtype.bits:
                    raise BlobFileError(
                        path,
                        f"blob {index}: padding of {padding} bits is inconsistent with "
                        f"{nbytes} bytes of {dtype.bits}-bit {dtype.name} elements",
                        offset + 24,
                    )
            elif nbytes * 8 % dtype.bits:
                raise BlobFileError(
                    path,
                    f"blob {index}: {nbytes} bytes is not a whole number of {dtype.name} elements",
                    offset + 8,
                )
            self.blobs[offset] = Blob(offset, dtype, nbytes, data_offset, padding)
            self.end_of_blobs = data_offset + nbytes
            offset = align(self.end_of_blobs)
        self.count = count

    # -- access ----------------------------------------------------------------------------------
    def __enter__(self) -> BlobFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __len__(self) -> int:
        return len(self.blobs)

    def __iter__(self) -> Iterator[Blob]:
        return iter(self.blobs.values())

    def __repr__(self) -> str:
        return f"BlobFile({self.path!r}, {len(self.blobs)} blobs, {self.file_size} bytes)"

    @property
    def trailing_bytes(self) -> int:
        """Bytes after the last counted blob (left by an interrupted append, or garbage)."""
        return self.file_size - self.end_of_blobs

    def close(self) -> None:
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:  # a view is still alive; the map closes when it is collected
                pass
            self._mm = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def fileno(self) -> int:
        return self._fd

    def view(self, blob: Blob) -> memoryview:
        """Zero-copy view of a blob's data (pages are read from disk as they are touched)."""
        if self._mm is None:
            raise ValueError(f"{self.path} is closed")
        return memoryview(self._mm)[blob.data_offset : blob.data_offset + blob.size]

    def chunks(self, blob: Blob, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
        """Blob data in bounded chunks read with ``pread`` (memory does not grow with the blob)."""
        pos, end = blob.data_offset, blob.data_offset + blob.size
        while pos < end:
            data = os.pread(self._fd, min(chunk_size, end - pos), pos)
            if not data:
                raise BlobFileError(self.path, "file shrank while being read", pos)
            pos += len(data)
            yield data

    def values(self, blob: Blob) -> np.ndarray:
        """The blob's elements as a numpy array.

        Byte-sized numeric dtypes come back as their numpy type (a view into the map); sub-byte
        dtypes are unpacked to uint8 (int4 to int8); bfloat16 and float8 come back as their raw
        bit patterns (uint16 / uint8), since numpy has no such types.
        """
        import numpy as np

        data = self.view(blob)
        d = blob.dtype
        if d.sub_byte:
            return unpack_bits(data, d.bits, blob.element_count, signed=d.name == "int4")
        if d.numpy is not None:
            return np.frombuffer(data, dtype=d.numpy)
        return np.frombuffer(data, dtype="<u2" if d.bits == 16 else "u1")


def pack_bits(codes: np.ndarray, bits: int) -> bytes:
    """Pack integer codes LSB-first, ``bits`` bits each (element i at bits [i*b, i*b+b))."""
    import numpy as np

    codes = np.asarray(codes).astype(np.int64).ravel() & ((1 << bits) - 1)
    as_bits = np.unpackbits(codes.astype(np.uint8)[:, None], axis=1, bitorder="little")[:, :bits]
    return np.packbits(as_bits.ravel(), bitorder="little").tobytes()


def unpack_bits(data, bits: int, count: int, *, signed: bool = False) -> np.ndarray:
    """Inverse of :func:`pack_bits`: ``count`` codes of ``bits`` bits (int8 sign-extended if signed)."""
    import numpy as np

    raw = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")[: count * bits]
    codes = np.packbits(raw.reshape(count, bits), axis=1, bitorder="little").ravel()
    if signed:
        codes = codes.astype(np.int8)
        codes = np.where(codes >= 1 << (bits - 1), codes - (1 << bits), codes).astype(np.int8)
    return codes


def _read_chunk(fd: int, buf: bytearray, nbytes: int, offset: int) -> memoryview:
    """Read up to ``nbytes`` at ``offset`` into ``buf`` (reused, so no allocation per chunk)."""
    view = memoryview(buf)[:nbytes]
    if hasattr(os, "preadv"):
        return view[: os.preadv(fd, [view], offset)]
    data = os.pread(fd, nbytes, offset)
    view[: len(data)] = data
    return view[: len(data)]


def _copy_range(src_fd: int, src_off: int, dst_fd: int, dst_off: int, nbytes: int) -> None:
    """Copy bytes file to file: ``copy_file_range`` where available (the kernel moves the bytes,
    or shares them on file systems with reflinks), else through one reused bounded buffer."""
    copy = getattr(os, "copy_file_range", None)
    buf = None
    while nbytes > 0:
        done = 0
        if copy is not None:
            try:
                done = copy(src_fd, dst_fd, min(nbytes, 1 << 30), src_off, dst_off)
            except OSError as exc:
                if exc.errno not in (18, 22, 38, 95, 1):  # EXDEV EINVAL ENOSYS EOPNOTSUPP EPERM
                    raise
                copy = None
                continue
        if done == 0:  # no copy_file_range, or it made no progress: use a bounded buffer
            if buf is None:
                buf = bytearray(min(nbytes, CHUNK_SIZE))
            chunk = _read_chunk(src_fd, buf, min(nbytes, len(buf)), src_off)
            if not chunk:
                raise OSError(5, "source file shrank during copy")
            done = os.pwrite(dst_fd, chunk, dst_off)
        src_off += done
        dst_off += done
        nbytes -= done


def _load_sync_file_range():
    """libc's ``sync_file_range`` (Linux), or None where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError, ImportError):
        return None
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return fn


_sync_file_range = _load_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2  # start write-back of dirty pages in the range, do not wait

#: Bytes copied between two starts of write-back when the writer will fsync.
WRITEBACK_STEP = 32 << 20


def _count_and_version(count: int) -> bytes:
    """The header's first 8 bytes: what an append rewrites (the rest of the header stays)."""
    return HEADER_STRUCT.pack(count, STORAGE_VERSION, *[0] * 7)[:8]


class BlobWriter:
    """Writes a blob storage file, appending one record + data per blob.

    ``BlobWriter(path)`` creates a new file (refusing to overwrite one); ``BlobWriter(path,
    append=True)`` opens an existing, valid file and appends after its last blob. Records land at
    64-byte aligned offsets, gaps are zero bytes, and ``count`` in the header is written by
    :meth:`close` (after the data is flushed with ``fsync`` when ``sync`` is true), so a reader never
    sees a count that covers bytes not yet written.
    """

    def __init__(self, path: str | os.PathLike, *, append: bool = False, sync: bool = True):
        self.path = os.fspath(path)
        self.sync = sync
        self.bytes_written = 0
        try:
            if append:
                with BlobFile(self.path) as existing:
                    self.count = existing.count
                    self._end = existing.end_of_blobs
                    self._original_size: int | None = existing.file_size
                self._fd = os.open(self.path, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
            else:
                self._fd = os.open(
                    self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644
                )
                self.count = 0
                self._original_size = None
                os.pwrite(self._fd, HEADER_STRUCT.pack(0, STORAGE_VERSION, *[0] * 7), 0)
                self._end = HEADER_SIZE
        except OSError as exc:
            raise WriteError(f"{self.path}: cannot open for writing: {exc.strerror}") from None
        self._writeback_from = 0
        self.closed = False

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    @property
    def size(self) -> int:
        """Size of the file once closed: the end of the last blob's data."""
        return self._end

    def reserve(self, dtype: BlobDType | str | int, nbytes: int, padding_bits: int = 0) -> tuple[int, int]:
        """Append the record of a blob of ``nbytes`` whose data someone else writes later (worker
        processes writing windows of it with ``pwrite``): returns (record offset, data offset).
        Data never written reads as zeros."""
        d = self._dtype(dtype)
        return self._reserve(d, nbytes, padding_bits if d.sub_byte else 0)

    def _reserve(self, dtype: BlobDType, nbytes: int, padding_bits: int) -> tuple[int, int]:
        if nbytes <= 0:
            raise ValueError("a blob must hold at least one byte")
        record = align(self._end, ALIGNMENT)
        data = record + RECORD_SIZE
        rec = RECORD_STRUCT.pack(SENTINEL, dtype.code, nbytes, data, padding_bits, 0, 0, 0, 0)
        gap = record - self._end
        self._pwrite(b"\0" * gap + rec, self._end)
        self._end = data + nbytes
        self.count += 1
        return record, data

    def _pwrite(self, data: bytes, offset: int) -> None:
        view = memoryview(data)
        try:
            while view:
                n = os.pwrite(self._fd, view, offset)
                view, offset = view[n:], offset + n
                self.bytes_written += n
        except OSError as exc:
            raise WriteError(f"{self.path}: write failed at offset {offset}: {exc.strerror}") from None

    @staticmethod
    def _dtype(dtype: BlobDType | str | int) -> BlobDType:
        if isinstance(dtype, BlobDType):
            return dtype
        found = BLOB_DTYPE_BY_NAME.get(dtype) if isinstance(dtype, str) else BLOB_DTYPES.get(dtype)
        if found is None:
            raise ValueError(f"unknown blob dtype {dtype!r}")
        return found

    def add_bytes(self, dtype: BlobDType | str | int, data, padding_bits: int = 0) -> int:
        """Append a blob holding ``data`` (already encoded); return its record offset."""
        d = self._dtype(dtype)
        data = memoryview(data).cast("B")
        record, data_offset = self._reserve(d, len(data), padding_bits if d.sub_byte else 0)
        self._pwrite(data, data_offset)
        return record

    def add_array(self, dtype: BlobDType | str | int, values) -> int:
        """Append a blob encoding ``values`` as ``dtype``; return its record offset.

        Sub-byte dtypes take integer codes (int4: -8..7); bfloat16/float8 take raw bit patterns.
        """
        import numpy as np

        d = self._dtype(dtype)
        values = np.asarray(values).ravel()
        if d.sub_byte:
            return self.add_bytes(d, pack_bits(values, d.bits), (-values.size * d.bits) % 8)
        np_type = d.numpy or ("<u2" if d.bits == 16 else "u1")
        return self.add_bytes(d, np.ascontiguousarray(values.astype(np_type)).view(np.uint8))

    def copy_from(self, source: BlobFile, blob: Blob) -> int:
        """Append a copy of ``blob`` from ``source``, moving bytes file to file; return its offset.

        When the file will be fsynced, write-back of the copied bytes is started every
        :data:`WRITEBACK_STEP` bytes (Linux ``sync_file_range``), so the disk writes while the
        copy goes on and the final fsync has little left to wait for.
        """
        record, data_offset = self._reserve(blob.dtype, blob.size, blob.padding_bits if blob.dtype.sub_byte else 0)
        writeback = self.sync and _sync_file_range is not None
        step = WRITEBACK_STEP if writeback else blob.size
        try:
            for start in range(0, blob.size, step):
                n = min(step, blob.size - start)
                _copy_range(source.fileno(), blob.data_offset + start, self._fd, data_offset + start, n)
                if writeback:
                    self._start_writeback(data_offset + start + n)
        except OSError as exc:
            raise WriteError(
                f"{self.path}: copying blob at {blob.record_offset} of {source.path} failed: "
                f"{exc.strerror}"
            ) from None
        self.bytes_written += blob.size
        return record

    def _start_writeback(self, upto: int) -> None:
        """Start writing bytes up to ``upto`` to disk without waiting (a hint: failures are
        reported by the final fsync)."""
        if upto - self._writeback_from >= WRITEBACK_STEP:
            _sync_file_range(self._fd, self._writeback_from, upto - self._writeback_from, _SYNC_FILE_RANGE_WRITE)
            self._writeback_from = upto

    def close(self) -> None:
        """Flush data, then write ``count`` in the header (and flush again when ``sync``)."""
        if self.closed:
            return
        try:
            os.ftruncate(self._fd, self._end)  # drop bytes an interrupted append left behind
            if self.sync:
                os.fsync(self._fd)
            os.pwrite(self._fd, _count_and_version(self.count), 0)
            if self.sync:
                os.fsync(self._fd)
        except OSError as exc:
            raise WriteError(f"{self.path}: finishing the file failed: {exc.strerror}") from None
        finally:
            os.close(self._fd)
            self.closed = True

    def abort(self) -> None:
        """Close without updating the header (the caller discards or ignores the file).

        In append mode the file is cut back to its size at open, so it is byte-identical to
        before (best effort: if even that fails, the header still counts only the old blobs).
        """
        if not self.closed:
            try:
                if self._original_size is not None:
                    os.ftruncate(self._fd, self._original_size)
            except OSError:
                pass
            finally:
                os.close(self._fd)
                self.closed = True


def restore_blob_file(path: str, count: int, size: int) -> None:
    """Undo a completed append: write the old ``count`` back, then cut the file to ``size``.

    The header is rewritten first, so at no moment does it count blobs that are not there.
    """
    try:
        fd = os.open(path, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise WriteError(f"{path}: cannot reopen to undo an append: {exc.strerror}") from None
    try:
        os.pwrite(fd, _count_and_version(count), 0)
        os.fsync(fd)
        os.ftruncate(fd, size)
        os.fsync(fd)
    except OSError as exc:
        raise WriteError(f"{path}: undoing an append failed: {exc.strerror}") from None
    finally:
        os.close(fd)
