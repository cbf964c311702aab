"""weight.bin reader and writer: every dtype round-trips, and coremltools' C++ code agrees."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from checks import CT_READ, all_records
import milsurgery.blobfile
from milsurgery.blobfile import BlobFile, BlobWriter, pack_bits, unpack_bits
from milsurgery.errors import BlobFileError
from milsurgery.formats import BLOB_DTYPES

RNG = np.random.default_rng(7)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sample(code: int, n: int = 37) -> np.ndarray:
    d = BLOB_DTYPES[code]
    if d.sub_byte:
        lo, hi = (-8, 8) if d.name == "int4" else (0, 1 << d.bits)
        return RNG.integers(lo, hi, n)
    if d.numpy and d.numpy.lstrip("<").startswith("f"):
        return RNG.standard_normal(n).astype(d.numpy)
    if d.numpy:
        info = np.iinfo(np.dtype(d.numpy))
        return RNG.integers(info.min, info.max, n, endpoint=True).astype(d.numpy)
    return RNG.integers(0, 1 << d.bits, n)  # bfloat16 / float8: raw bit patterns


@pytest.mark.parametrize("code", sorted(BLOB_DTYPES))
def test_every_dtype_roundtrips(tmp_path, code):
    values = sample(code)
    path = tmp_path / "w.bin"
    with BlobWriter(path) as w:
        first = w.add_array(code, values)
        second = w.add_array(code, values[:5])
    with BlobFile(path) as bf:
        assert list(bf.blobs) == [first, second] == [64, bf.blobs[second].record_offset]
        assert second % 64 == 0
        b = bf.blobs[first]
        assert b.dtype.code == code and b.data_offset == first + 64
        assert b.element_count == values.size
        got = bf.values(b)
        assert np.array_equal(got.astype(np.int64) if got.dtype.kind in "iu" else got,
                              values.astype(got.dtype).astype(np.int64) if got.dtype.kind in "iu" else values)
        assert bf.view(b).tobytes() == bytes(bf.view(b))  # zero-copy view of the data
    raw = all_records(str(path))  # decoded by hand, independently of BlobFile
    assert [r[1] for r in raw] == [code, code]


@pytest.mark.parametrize("code", sorted(CT_READ))
def test_coremltools_reads_what_we_write(tmp_path, code):
    from coremltools.libmilstoragepython import _BlobStorageReader

    values = sample(code)
    path = tmp_path / "w.bin"
    with BlobWriter(path) as w:
        offset = w.add_array(code, values)
    got = np.asarray(getattr(_BlobStorageReader(str(path)), CT_READ[code])(offset))
    d = BLOB_DTYPES[code]
    if d.name == "float16":  # the binding returns fp16 as raw uint16 bit patterns
        assert np.array_equal(got.view(np.uint16), values.view(np.uint16))
    elif d.numpy:
        assert got.tobytes() == values.astype(d.numpy).tobytes()
    else:
        assert np.array_equal(got.astype(np.int64), values.astype(np.int64))


@pytest.mark.parametrize("code", sorted(CT_READ))
def test_we_read_what_coremltools_writes(tmp_path, code):
    from coremltools.libmilstoragepython import _BlobStorageWriter

    d = BLOB_DTYPES[code]
    values = sample(code)
    method = CT_READ[code].replace("read_", "write_")
    if d.name == "float16":
        arg = values.view(np.uint16)
    elif d.sub_byte:
        arg = values.astype(np.int8 if d.name == "int4" else np.uint8)
    else:
        arg = values
    path = str(tmp_path / "ct.bin")
    w = _BlobStorageWriter(path)
    offset = getattr(w, method)(arg)
    del w  # the C++ writer finishes the file when destroyed
    with BlobFile(path) as bf:
        got = bf.values(bf.blobs[offset])
        assert np.array_equal(got.astype(np.int64) if d.sub_byte else got.view(np.uint8),
                              values.astype(np.int64) if d.sub_byte else np.ascontiguousarray(arg).view(np.uint8))


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 6])
def test_pack_bits_is_lsb_first(bits):
    codes = RNG.integers(0, 1 << bits, 50)
    packed = pack_bits(codes, bits)
    assert len(packed) == (50 * bits + 7) // 8
    as_int = int.from_bytes(packed, "little")
    assert [(as_int >> (i * bits)) & ((1 << bits) - 1) for i in range(50)] == list(codes)
    assert list(unpack_bits(packed, bits, 50)) == list(codes)


def test_formats_worked_example(tmp_path):
    """The byte-level example of FORMATS.md: fp16 [0,1,2] then uint4 [1,2,3,15,0]."""
    path = tmp_path / "w.bin"
    with BlobWriter(path) as w:
        w.add_array("float16", np.array([0, 1, 2], np.float16))
        w.add_array("uint4", [1, 2, 3, 15, 0])
    data = path.read_bytes()
    assert data[:8] == struct.pack("<II", 2, 2)
    assert data[64:96] == bytes.fromhex("efbeadde01000000060000000000000080000000000000000000000000000000")
    assert data[128:134] == bytes.fromhex("0000003c0040")
    rec = struct.unpack_from("<IIQQQ", data, 192)
    assert rec == (0xDEADBEEF, 11, 3, 256, 4)
    assert data[256:259] == bytes.fromhex("21f300")
    assert len(data) == 259  # no padding after the last blob


def test_copy_from_moves_bytes_and_falls_back_to_chunks(tmp_path, monkeypatch):
    src = tmp_path / "src.bin"
    payload = RNG.integers(0, 255, 3 * 1024 * 1024 + 5, dtype=np.uint8)
    with BlobWriter(src) as w:
        w.add_array("uint8", payload[:10])
        off = w.add_array("uint8", payload)
    for mode in ("copy_file_range", "preadv", "pread"):  # each step removes one more way
        if mode == "preadv":
            monkeypatch.delattr(os, "copy_file_range", raising=False)
            monkeypatch.setattr("milsurgery.blobfile.CHUNK_SIZE", 1 << 20)  # several chunks
        if mode == "pread":
            monkeypatch.delattr(os, "preadv", raising=False)
        dst = tmp_path / f"dst-{mode}.bin"
        with BlobFile(src) as bf, BlobWriter(dst) as w:
            new = w.copy_from(bf, bf.blobs[off])
        with BlobFile(dst) as out:
            assert out.view(out.blobs[new]).tobytes() == payload.tobytes()


def test_append_mode_keeps_count_and_drops_trailing_garbage(tmp_path):
    path = tmp_path / "w.bin"
    with BlobWriter(path) as w:
        w.add_array("float32", [1.0, 2.0])
    with open(path, "ab") as f:
        f.write(b"\x99" * 100)  # what an interrupted append could leave
    with BlobFile(path) as bf:
        assert bf.count == 1 and bf.trailing_bytes == 100
    with BlobWriter(path, append=True) as w:
        off = w.add_array("float32", [3.0])
    with BlobFile(path) as bf:
        assert bf.count == 2 and bf.trailing_bytes == 0
        assert bf.values(bf.blobs[off]).tolist() == [3.0]


def test_writer_refuses_to_overwrite(tmp_path):
    from milsurgery.errors import WriteError

    path = tmp_path / "w.bin"
    path.write_bytes(b"x")
    with pytest.raises(WriteError, match="w.bin"):
        BlobWriter(path)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmHWM from /proc")
def test_open_reads_no_weight_bytes(tmp_path):
    """A file with 4 GiB of (sparse) blob data opens without the process's memory growing."""
    path = tmp_path / "big.bin"
    with BlobWriter(path, sync=False) as w:
        w.add_array("uint8", [1])
    size = 4 << 30
    with open(path, "r+b") as f:  # a second record claiming 4 GiB of data, left sparse
        f.seek(192)
        f.write(struct.pack("<IIQQQ", 0xDEADBEEF, 3, size, 256, 0) + bytes(32))
        f.truncate(256 + size)
        f.seek(0)
        f.write(struct.pack("<I", 2))
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {ROOT!r})
        from milsurgery.blobfile import BlobFile
        before = [int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')][0]
        bf = BlobFile({str(path)!r})
        assert len(bf) == 2 and bf.blobs[192].size == {size}
        print([int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')][0] - before)
    """)
    grown_kib = int(subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True).stdout)
    assert grown_kib < 16 * 1024


def test_a_file_that_cannot_be_mapped_is_a_precise_error(tmp_path, monkeypatch):
    """Opening maps the weight file once; a failing mapping names the file, not a traceback."""
    path = tmp_path / "w.bin"
    with BlobWriter(path) as w:
        w.add_array("uint8", [1, 2, 3])
    real_mmap = milsurgery.blobfile.mmap.mmap

    def failing_mmap(*args, **kwargs):
        raise OSError(19, "No such device")

    monkeypatch.setattr(milsurgery.blobfile.mmap, "mmap", failing_mmap)
    with pytest.raises(BlobFileError, match=r"w\.bin: cannot map the file \(\d+ bytes\): No such device"):
        BlobFile(path)
    monkeypatch.setattr(milsurgery.blobfile.mmap, "mmap", real_mmap)
