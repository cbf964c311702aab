"""Weights and what Core ML materializes from them: the semantics of the constexpr ops.

A *weight* is the tensor produced by a ``const`` op whose value is a blob, or by a constexpr op
whose inputs are consts or other constexpr ops (a chain). :func:`find_weights` lists a function's
weights; :func:`iter_values` yields a weight's materialized values in float64, window by window
in C order, read straight from the blob files.

1. Every input of the producing ops becomes a node that can hand out a slice of rows (a range
   along axis 0) of its tensor: a blob is read with ``pread`` for just those rows, an immediate
   value is decoded once (it is small by construction).
2. A constexpr node asks its inputs for the rows it needs (the indices' rows, the LUT groups or
   scale blocks covering them) and computes its own rows in float64.
3. :func:`iter_values` asks the weight's node for about :data:`WINDOW_ELEMENTS` elements at a
   time, so memory stays bounded by the window (or by one row along axis 0, if that is larger),
   whatever the size of the tensor.

Supported ops (semantics as coremltools defines them in ``ops/defs/iOS16/constexpr_ops.py`` and
``ops/defs/iOS18/compression.py``): ``constexpr_lut_to_dense`` (iOS 16 attribute form with packed
indices; iOS 18 input form with per-group LUTs and ``vector_axis``),
``constexpr_affine_dequantize``, ``constexpr_blockwise_shift_scale``, ``constexpr_sparse_to_dense``
(both forms), ``constexpr_lut_to_sparse`` and ``constexpr_sparse_blockwise_shift_scale`` feeding a
``constexpr_sparse_to_dense``, ``constexpr_cast``, and chains of these (a LUT produced by a
``constexpr_blockwise_shift_scale``, pruned + palettized weights...).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator

import numpy as np

from ._proto import milsurgery_spec_pb2 as pb
from .errors import SpecError, UsageError
from .formats import BLOB_DTYPE_BY_NAME, BLOB_DTYPE_BY_PROTO
from .package import Package, ResolvedRef
from .weights import Weight, WeightGraph, shape_of
from .weights import find_weights as _find_weights

__all__ = ["Weight", "WINDOW_ELEMENTS", "find_weights", "get_weight", "iter_values", "dequantize", "sample_values"]

#: Elements materialized at once by :func:`iter_values` (8 MiB of float64).
WINDOW_ELEMENTS = 1 << 20

_FLOAT_TYPES = {pb.FLOAT16: np.float16, pb.FLOAT32: np.float32, pb.FLOAT64: np.float64}


def _rowlen(shape: tuple[int, ...]) -> int:
    return math.prod(shape[1:]) if shape else 1


# --- nodes -------------------------------------------------------------------------------------
class _Node:
    """A tensor that can hand out rows [r0, r1) along axis 0 (rank 0: its single value)."""

    shape: tuple[int, ...] = ()

    def rows(self, r0: int, r1: int) -> np.ndarray:
        raise NotImplementedError

    def whole(self) -> np.ndarray:
        if not self.shape:
            return self.rows(0, 1)
        return self.rows(0, self.shape[0])

    def elements(self, e0: int, e1: int) -> np.ndarray:
        """Flat elements [e0, e1) in C order (reads the rows covering them)."""
        n = _rowlen(self.shape)
        if not self.shape:
            return self.whole().reshape(1)[e0:e1]
        r0, r1 = e0 // n, -(-e1 // n)
        flat = self.rows(r0, r1).reshape(-1)
        return flat[e0 - r0 * n : e1 - r0 * n]

    def pick(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """The values of rows ``rows`` (along axis 0) at flat positions ``cols`` within a row:
        shape (len(rows), len(cols)), as :meth:`rows` gives them (reads those rows only)."""
        return np.stack([self.rows(int(r), int(r) + 1).reshape(-1)[cols] for r in rows])


#: Bit widths that do not divide a byte: (bytes, codes) of the smallest run of whole bytes
#: holding whole codes.
_UNITS = {3: (3, 8), 5: (5, 8), 6: (3, 4), 7: (7, 8)}


def _unpack(raw: np.ndarray, bits: int, skip: int, count: int, signed: bool) -> np.ndarray:
    """``count`` codes of ``bits`` bits from bytes ``raw``, starting ``skip`` bits in, LSB first."""
    mask = (1 << bits) - 1
    if bits == 8 and skip == 0:
        codes = raw[:count]
    elif bits in (1, 2, 4) and skip == 0:
        per = 8 // bits
        codes = np.empty((raw.size, per), dtype=np.uint8)
        for i in range(per):
            np.bitwise_and(raw >> (i * bits) if i else raw, mask, out=codes[:, i])
        codes = codes.reshape(-1)[:count]
    elif bits in _UNITS and skip == 0:
        # Runs of whole bytes read as one little-endian integer, then each code shifted out.
        nbytes, per = _UNITS[bits]
        units = -(-count // per)
        run = np.zeros(units * nbytes, dtype=np.uint8)
        run[: min(raw.size, run.size)] = raw[: run.size]
        run = run.reshape(units, nbytes)
        word = np.uint32 if nbytes <= 4 else np.uint64
        v = run[:, 0].astype(word)
        for j in range(1, nbytes):
            v |= run[:, j].astype(word) << word(8 * j)
        codes = np.empty((units, per), dtype=np.uint8)
        for i in range(per):
            codes[:, i] = (v >> word(i * bits)) & word(mask)
        codes = codes.reshape(-1)[:count]
    else:
        return _codes_at(raw, bits, skip + np.arange(count, dtype=np.int64) * bits, signed)
    if signed:  # two's complement: flip the sign bit, then subtract it
        half = 1 << (bits - 1)
        codes = (codes ^ np.uint8(half)).view(np.int8) - np.int8(half)
    return codes


def _codes_at(raw: np.ndarray, bits: int, positions: np.ndarray, signed: bool) -> np.ndarray:
    """The codes of ``bits`` bits (at most 8) starting at bit ``positions`` of bytes ``raw``, LSB
    first: each from the two bytes holding it."""
    mask = (1 << bits) - 1
    padded = np.zeros(raw.size + 2, dtype=np.uint8)
    padded[: raw.size] = raw
    at = positions >> 3
    pair = padded[at].astype(np.uint16) | (padded[at + 1].astype(np.uint16) << np.uint16(8))
    codes = ((pair >> (positions & 7).astype(np.uint16)) & np.uint16(mask)).astype(np.uint8)
    if signed:  # two's complement: flip the sign bit, then subtract it
        half = 1 << (bits - 1)
        codes = (codes ^ np.uint8(half)).view(np.int8) - np.int8(half)
    return codes


class _ValueNode(_Node):
    """A const's value: a blob read window by window, or an immediate value decoded whole."""

    def __init__(self, value: pb.Value, resolved: ResolvedRef | None, where: str, pkg: Package):
        self.where = where
        shape = shape_of(value.type)
        if shape is None:
            raise SpecError(pkg.spec_path, f"{where}: not a tensor of constant shape")
        self.shape = shape
        self.dtype = value.type.tensorType.dataType
        self.resolved = resolved
        self._array = None
        if resolved is None:
            self._array = _decode_immediate(value, shape, pkg, where)

    def _packed(self, e0: int, e1: int) -> tuple[np.ndarray, int]:
        """The bytes holding sub-byte elements [e0, e1), and the bit of the first one in them."""
        blob, d = self.resolved.blob, self.resolved.blob.dtype
        b0, b1 = e0 * d.bits // 8, -(-e1 * d.bits // 8)
        raw = np.frombuffer(os.pread(self.resolved.file.fileno(), b1 - b0, blob.data_offset + b0), dtype=np.uint8)
        return raw, e0 * d.bits - b0 * 8

    def _read(self, e0: int, e1: int) -> np.ndarray:
        blob, bf = self.resolved.blob, self.resolved.file
        d = blob.dtype
        if d.sub_byte:
            raw, skip = self._packed(e0, e1)
            return _unpack(raw, d.bits, skip, e1 - e0, d.name == "int4")
        width = d.bits // 8
        raw = os.pread(bf.fileno(), (e1 - e0) * width, blob.data_offset + e0 * width)
        if d.name == "bfloat16":
            return (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        if d.numpy is None:
            raise UsageError(f"{self.where}: {d.name} values are not supported")
        return np.frombuffer(raw, dtype=d.numpy)

    def rows(self, r0: int, r1: int) -> np.ndarray:
        if not self.shape:
            return self._array.reshape(()) if self._array is not None else self._read(0, 1).reshape(())
        n = _rowlen(self.shape)
        if self._array is not None:
            flat = self._array[r0 * n : r1 * n]
        else:
            flat = self._read(r0 * n, r1 * n)
        return flat.reshape((r1 - r0,) + self.shape[1:])

    def pick(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        if not self.shape:
            return super().pick(rows, cols)
        n = _rowlen(self.shape)
        if self._array is not None:
            return self._array.reshape(-1, n)[rows][:, cols]
        d = self.resolved.blob.dtype
        if not d.sub_byte:
            return np.stack([self._read(int(r) * n, (int(r) + 1) * n)[cols] for r in rows])
        # Sub-byte codes: each row's bytes are read, only the picked codes decoded.
        out = []
        for r in rows:
            raw, skip = self._packed(int(r) * n, (int(r) + 1) * n)
            out.append(_codes_at(raw, d.bits, skip + cols.astype(np.int64) * d.bits, d.name == "int4"))
        return np.stack(out)


def _decode_immediate(value: pb.Value, shape, pkg: Package, where: str) -> np.ndarray:
    if value.WhichOneof("value") != "immediateValue" or value.immediateValue.WhichOneof("value") != "tensor":
        raise SpecError(pkg.spec_path, f"{where}: not a tensor value")
    t = value.immediateValue.tensor
    kind = t.WhichOneof("value")
    n = math.prod(shape)
    dt = value.type.tensorType.dataType
    if kind == "bytes":
        raw = np.frombuffer(t.bytes.values, dtype=np.uint8)
        d = BLOB_DTYPE_BY_PROTO.get(dt)
        if d is None:
            raise SpecError(pkg.spec_path, f"{where}: cannot decode bytes of type {dt}")
        if d.sub_byte:
            arr = _unpack(raw, d.bits, 0, n, d.name == "int4")
        elif d.numpy is not None:
            arr = raw.view(d.numpy)
        else:
            raise UsageError(f"{where}: {d.name} values are not supported")
    elif kind in ("floats", "ints", "longInts", "doubles", "bools"):
        arr = np.asarray(list(getattr(t, kind).values))
        if kind == "floats":
            arr = arr.astype(np.float32)
    else:
        raise SpecError(pkg.spec_path, f"{where}: unsupported immediate tensor ({kind})")
    arr = arr.reshape(-1)
    if arr.size != n:
        raise SpecError(pkg.spec_path, f"{where}: holds {arr.size} values, its type {list(shape)} needs {n}")
    return arr


def _group_offsets(r0: int, shape: tuple[int, ...], blocks: list[int], first_block: int, groups: tuple[int, ...]) -> np.ndarray:
    """For a window of rows [r0, r0 + shape[0]) of a tensor of ``shape``, the flat index of each
    element's block (LUT group, scale block) in a C-ordered array of ``groups`` blocks whose
    axis 0 starts at ``first_block``. Broadcast sums of per-axis vectors (int64): the result
    broadcasts to ``shape`` (axes with one block have size 1)."""
    rank = len(shape)
    strides = [math.prod(groups[k + 1 :]) for k in range(rank)]
    out = np.zeros((1,) * rank, dtype=np.int64)
    for k in range(rank):
        if groups[k] == 1:
            continue  # one block along this axis: contributes nothing
        start = r0 if k == 0 else 0
        idx = (np.arange(start, start + shape[k], dtype=np.int64) // blocks[k] - (first_block if k == 0 else 0)) * strides[k]
        out = out + idx.reshape([-1 if j == k else 1 for j in range(rank)])
    return out


class _Lut(_Node):
    """iOS 18 ``constexpr_lut_to_dense``: ``out = lut[groups..., indices, :]`` with the vector
    placed along ``vector_axis``; ``lut`` has shape (groups per axis..., palette, vector)."""

    def __init__(self, indices: _Node, lut: _Node, vector_axis: int | None, fail):
        ishape, lshape = indices.shape, lut.shape
        if len(lshape) != len(ishape) + 2:
            raise fail(f"lut has rank {len(lshape)}, indices rank {len(ishape)}: expected {len(ishape) + 2}")
        self.vs = lshape[-1]
        self.palette = lshape[-2]
        bits = getattr(BLOB_DTYPE_BY_PROTO.get(getattr(indices, "dtype", None)), "bits", None)
        if bits is not None and self.palette != 1 << bits:
            raise fail(f"lut holds {self.palette} entries per palette, {1 << bits} needed for {bits}-bit indices")
        self.blocks = []
        for k, (n, g) in enumerate(zip(ishape, lshape)):
            if g == 0 or n % g:
                raise fail(f"indices axis {k} ({n}) is not a multiple of the lut's {g} groups")
            self.blocks.append(n // g)
        self.axis = 0
        if self.vs > 1:
            if vector_axis is None:
                raise fail("vector_axis is required when the lut holds vectors")
            self.axis = vector_axis + len(ishape) if vector_axis < 0 else vector_axis
            if not 0 <= self.axis < len(ishape):
                raise fail(f"vector_axis {vector_axis} is out of range")
        shape = list(ishape)
        if self.vs > 1:
            shape[self.axis] *= self.vs
        self.shape = tuple(shape)
        self.indices, self.lut = indices, lut

    def rows(self, r0: int, r1: int) -> np.ndarray:
        vs, ax = self.vs, self.axis
        i0, i1 = (r0 // vs, -(-r1 // vs)) if vs > 1 and ax == 0 else (r0, r1)
        idx = self.indices.rows(i0, i1)
        g0, g1 = i0 // self.blocks[0], (i1 - 1) // self.blocks[0] + 1
        lut = self.lut.rows(g0, g1).astype(np.float64)
        # Flat position of each element's palette in the LUT, plus its index: one take.
        base = _group_offsets(i0, idx.shape, self.blocks, g0, lut.shape[:-2]) * self.palette
        flat = (base + idx.astype(np.int64)).reshape(-1)
        if vs == 1:
            return np.take(lut.reshape(-1), flat).reshape(idx.shape)
        out = lut.reshape(-1, vs)[flat].reshape(idx.shape + (vs,))
        out = np.moveaxis(out, -1, ax + 1)
        merged = list(idx.shape)
        merged[ax] *= vs
        out = out.reshape(merged)
        if ax == 0:
            out = out[r0 - i0 * vs : r1 - i0 * vs]
        return out


    def pick(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Only the picked indices are looked up, in the LUT groups of each picked row."""
        if self.vs != 1 or len(self.shape) < 1:
            return super().pick(rows, cols)
        idx = self.indices.pick(rows, cols).astype(np.intp)
        coords = np.unravel_index(cols, self.shape[1:]) if len(self.shape) > 1 else ()
        groups = tuple(c // b for c, b in zip(coords, self.blocks[1:]))
        out = np.empty(idx.shape, dtype=np.float64)
        for k, r in enumerate(rows):
            g = int(r) // self.blocks[0]
            lut = self.lut.rows(g, g + 1)[0].astype(np.float64)  # (groups along axes 1..., palette, 1)
            out[k] = lut[groups + (idx[k], 0)]
        return out


class _Packed(_Node):
    """iOS 16 packed bits: a uint8 vector holding ``bits``-bit codes LSB first, seen as ``shape``."""

    def __init__(self, data: _Node, bits: int, shape: tuple[int, ...], fail, what: str):
        need = -(-math.prod(shape) * bits // 8)
        if data.shape != (need,):
            raise fail(f"{what} holds {list(data.shape)} bytes, {need} needed for {math.prod(shape)} {bits}-bit codes")
        self.data, self.bits, self.shape = data, bits, shape

    def rows(self, r0: int, r1: int) -> np.ndarray:
        n = _rowlen(self.shape)
        e0, e1 = r0 * n, r1 * n
        b0, b1 = e0 * self.bits // 8, -(-e1 * self.bits // 8)
        raw = np.ascontiguousarray(self.data.rows(b0, b1)).view(np.uint8)
        return _unpack(raw, self.bits, e0 * self.bits - b0 * 8, e1 - e0, False).reshape((r1 - r0,) + self.shape[1:])


class _Lookup(_Node):
    """iOS 16 ``constexpr_lut_to_dense``: ``out = lut[indices]`` with one LUT for the tensor."""

    def __init__(self, codes: _Node, lut: np.ndarray):
        self.codes, self.lut, self.shape = codes, lut.astype(np.float64), codes.shape

    def rows(self, r0: int, r1: int) -> np.ndarray:
        return self.lut[self.codes.rows(r0, r1).astype(np.intp)]


class _Affine(_Node):
    """iOS 16 ``constexpr_affine_dequantize``: ``(q - zero_point) * scale`` along ``axis``."""

    def __init__(self, data: _Node, zero_point: np.ndarray, scale: np.ndarray, axis: int, fail):
        rank = len(data.shape)
        if not -rank <= axis < rank:
            raise fail(f"axis {axis} is out of range for rank {rank}")
        self.axis = axis % rank
        for name, arr in (("scale", scale), ("zero_point", zero_point)):
            if arr.ndim > 1 or (arr.ndim == 1 and arr.size != data.shape[self.axis]):
                raise fail(f"{name} has shape {list(arr.shape)}, expected a scalar or {data.shape[self.axis]} values")
        self.data, self.shape = data, data.shape
        self.zp, self.scale = zero_point.astype(np.float64), scale.astype(np.float64)

    def _along(self, arr: np.ndarray, r0: int, r1: int) -> np.ndarray:
        if arr.ndim == 0:
            return arr
        if self.axis == 0:
            arr = arr[r0:r1]
        return arr.reshape([-1 if k == self.axis else 1 for k in range(len(self.shape))])

    def rows(self, r0: int, r1: int) -> np.ndarray:
        q = self.data.rows(r0, r1).astype(np.float64)
        return (q - self._along(self.zp, r0, r1)) * self._along(self.scale, r0, r1)


class _ShiftScale(_Node):
    """iOS 18 ``constexpr_blockwise_shift_scale``: ``scale * (data - offset)``, scale and offset
    repeated over blocks of ``data.shape[k] // scale.shape[k]`` along each axis."""

    def __init__(self, data: _Node, scale: _Node, offset: _Node | None, fail):
        if len(scale.shape) != len(data.shape) or (offset is not None and offset.shape != scale.shape):
            raise fail(f"scale {list(scale.shape)} / offset must have the rank of data {list(data.shape)}")
        self.blocks = []
        for k, (n, s) in enumerate(zip(data.shape, scale.shape)):
            if s == 0 or n % s:
                raise fail(f"data axis {k} ({n}) is not a multiple of scale's {s}")
            self.blocks.append(n // s)
        self.data, self.scale, self.offset, self.shape = data, scale, offset, data.shape

    def rows(self, r0: int, r1: int) -> np.ndarray:
        d = self.data.rows(r0, r1).astype(np.float64)
        if not self.shape:
            s = self.scale.whole().astype(np.float64)
            o = 0.0 if self.offset is None else self.offset.whole().astype(np.float64)
            return (d - o) * s
        b0, b1 = r0 // self.blocks[0], (r1 - 1) // self.blocks[0] + 1
        # Each axis k > 0 of the window is split into (blocks, block size) and the scale table
        # broadcast over the block size: no index arrays. Along axis 0 the table's rows are
        # repeated per data row (a window is only a few blocks tall).
        split = [d.shape[0]]
        table_shape = [d.shape[0]]
        for k in range(1, len(d.shape)):
            split += [d.shape[k] // self.blocks[k], self.blocks[k]]
            table_shape += [d.shape[k] // self.blocks[k], 1]
        pos = np.arange(r0, r1) // self.blocks[0] - b0 if self.blocks[0] > 1 else slice(None)
        view = d.reshape(split)
        if self.offset is not None:
            view = view - self.offset.rows(b0, b1)[pos].astype(np.float64).reshape(table_shape)
        return (view * self.scale.rows(b0, b1)[pos].astype(np.float64).reshape(table_shape)).reshape(d.shape)

    def pick(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Only the picked codes, with the scale (and offset) of each one's block."""
        if len(self.shape) < 1:
            return super().pick(rows, cols)
        d = self.data.pick(rows, cols).astype(np.float64)
        if len(self.shape) == 1:
            where = np.zeros_like(cols)
        else:
            coords = np.unravel_index(cols, self.shape[1:])
            where = np.ravel_multi_index(tuple(c // b for c, b in zip(coords, self.blocks[1:])), self.scale.shape[1:])
        blocks = rows // self.blocks[0]
        if self.offset is not None:
            d = d - self.offset.pick(blocks, where).astype(np.float64)
        return d * self.scale.pick(blocks, where).astype(np.float64)


class _Repeat(_Node):
    """A tensor repeated ``times`` along ``axis`` (the mask of vector-palettized sparse data)."""

    def __init__(self, base: _Node, times: int, axis: int):
        self.base, self.times, self.axis = base, times, axis
        shape = list(base.shape)
        shape[axis] *= times
        self.shape = tuple(shape)

    def rows(self, r0: int, r1: int) -> np.ndarray:
        t = self.times
        if self.axis == 0:
            i0 = r0 // t
            return np.repeat(self.base.rows(i0, -(-r1 // t)), t, axis=0)[r0 - i0 * t : r1 - i0 * t]
        return np.repeat(self.base.rows(r0, r1), t, axis=self.axis)


class _Scatter(_Node):
    """Sparse data: ``nonzero`` (1-D, in C order) scattered where ``mask`` is nonzero.

    The position in ``nonzero`` of a window's first value is the count of set mask bits before
    it, carried from the previous window (windows are asked for in increasing order; going back
    recounts from the start)."""

    def __init__(self, nonzero: _Node, mask: _Node, fail):
        if len(nonzero.shape) != 1:
            raise fail(f"nonzero_data has shape {list(nonzero.shape)}, expected rank 1")
        self.nonzero, self.mask, self.shape, self.fail = nonzero, mask, mask.shape, fail
        self._pos = self._count = 0

    def _advance(self, r0: int) -> None:
        if r0 < self._pos:
            self._pos = self._count = 0
        step = max(1, (WINDOW_ELEMENTS * 8) // max(1, _rowlen(self.shape)))
        while self._pos < r0:
            r1 = min(r0, self._pos + step)
            self._count += int(np.count_nonzero(self.mask.rows(self._pos, r1)))
            self._pos = r1

    def rows(self, r0: int, r1: int) -> np.ndarray:
        self._advance(r0)
        m = self.mask.rows(r0, r1) != 0
        k = int(np.count_nonzero(m))
        total = self.nonzero.shape[0]
        if self._count + k > total or (r1 == self.shape[0] and self._count + k != total):
            raise self.fail(f"the mask sets {'more than' if self._count + k > total else 'fewer than'} the {total} nonzero values given")
        vals = self.nonzero.elements(self._count, self._count + k)
        out = np.zeros(m.shape, dtype=np.float64 if vals.dtype.kind == "f" else np.int64)
        out[m] = vals
        self._pos, self._count = r1, self._count + k
        return out


class _Where(_Node):
    """``values`` where ``mask`` is nonzero, else zero (dense values of sparse ops)."""

    def __init__(self, values: _Node, mask: _Node, given: _Node | None = None, fail=None):
        if given is not None and given.shape != mask.shape:
            raise fail(f"mask has shape {list(given.shape)}, the sparse op's is {list(mask.shape)}")
        self.values, self.mask, self.given, self.fail, self.shape = values, mask, given, fail, mask.shape

    def rows(self, r0: int, r1: int) -> np.ndarray:
        m = self.mask.rows(r0, r1) != 0
        if self.given is not None and not np.array_equal(m, self.given.rows(r0, r1) != 0):
            raise self.fail(f"mask differs from the sparse op's mask in rows {r0}..{r1 - 1}")
        return np.where(m, self.values.rows(r0, r1), 0.0)


class _Cast(_Node):
    def __init__(self, source: _Node):
        self.source, self.shape = source, source.shape

    def rows(self, r0: int, r1: int) -> np.ndarray:
        return self.source.rows(r0, r1).astype(np.float64)


# --- building nodes from ops -------------------------------------------------------------------
class _Graph(WeightGraph):
    """A function's ops and blob references (:class:`milsurgery.weights.WeightGraph`), able to
    build each weight's evaluation."""

    @classmethod
    def of(cls, graph: WeightGraph) -> _Graph:
        """``graph`` able to evaluate: itself, or a view sharing its tables (made once)."""
        if isinstance(graph, cls):
            return graph
        view = graph.__dict__.get("_evaluation")
        if view is None:
            view = cls.__new__(cls)
            view.__dict__.update(graph.__dict__)
            graph._evaluation = view
        return view

    def value_node(self, op: pb.Operation, value: pb.Value, location: str) -> _ValueNode:
        where = f"function {self.function!r} op {op.outputs[0].name if op.outputs else '?'!r} ({op.type}) {location}"
        resolved = None
        if value.WhichOneof("value") == "blobFileValue":
            for r in self.refs.get(op.outputs[0].name if op.outputs else "", []):
                if r.ref.location == location:
                    resolved = r
                    break
            if resolved is None:
                raise SpecError(self.pkg.spec_path, f"{where}: blob reference not found")
        return _ValueNode(value, resolved, where, self.pkg)

    def input_node(self, op: pb.Operation, name: str, required: bool = True) -> _Node | None:
        p = self.param(op, name)
        if p is None:
            if required:
                raise self.fail(op)(f"input {name!r} is missing")
            return None
        if p[0] == "value":
            return self.value_node(op, p[1], p[2])
        return self.node(p[1], p[2])

    def small(self, op: pb.Operation, name: str, required: bool = True) -> np.ndarray | None:
        node = self.input_node(op, name, required)
        return None if node is None else node.whole()

    def node(self, op: pb.Operation, index: int = 0) -> _Node:
        fail = self.fail(op)
        t = op.type
        if t == "const":
            val = next((e.value for e in op.attributes if e.key == "val"), None)
            if val is None:
                raise fail("const op has no val attribute")
            return self.value_node(op, val, "attributes[val]")
        if index != 0 and t not in ("constexpr_lut_to_sparse", "constexpr_sparse_blockwise_shift_scale"):
            raise fail(f"output {index} is not a weight")
        declared = shape_of(op.outputs[index].type) if len(op.outputs) > index else None
        if t == "constexpr_lut_to_dense":
            if self.param(op, "shape") is not None:  # iOS 16: attributes, packed indices, one LUT
                lut = self.small(op, "lut").reshape(-1)
                bits = int(round(math.log2(lut.size))) if lut.size else 0
                if lut.size < 2 or 1 << bits != lut.size:
                    raise fail(f"lut holds {lut.size} values, not a power of two")
                shape = tuple(int(v) for v in self.small(op, "shape").reshape(-1))
                node = _Lookup(_Packed(self.input_node(op, "indices"), bits, shape, fail, "indices"), lut)
            else:
                va = self.small(op, "vector_axis", required=False)
                node = _Lut(self.input_node(op, "indices"), self.input_node(op, "lut"),
                            None if va is None else int(va), fail)
        elif t == "constexpr_affine_dequantize":
            node = _Affine(self.input_node(op, "quantized_data"), self.small(op, "zero_point"),
                           self.small(op, "scale"), int(self.small(op, "axis")), fail)
        elif t == "constexpr_blockwise_shift_scale":
            node = _ShiftScale(self.input_node(op, "data"), self.input_node(op, "scale"),
                               self.input_node(op, "offset", required=False), fail)
        elif t == "constexpr_cast":
            node = _Cast(self.input_node(op, "source_val"))
        elif t == "constexpr_sparse_to_dense":
            node = self._sparse_to_dense(op, fail)
        elif t in ("constexpr_lut_to_sparse", "constexpr_sparse_blockwise_shift_scale"):
            raise fail("a sparse op's outputs are a weight only through constexpr_sparse_to_dense")
        else:
            raise fail("not a const or constexpr op milsurgery can evaluate")
        if declared is not None and declared != node.shape:
            raise fail(f"computes shape {list(node.shape)} but declares {list(declared)}")
        return node

    def _sparse_to_dense(self, op: pb.Operation, fail) -> _Node:
        if self.param(op, "shape") is not None:  # iOS 16: packed mask bits
            shape = tuple(int(v) for v in self.small(op, "shape").reshape(-1))
            mask = _Packed(self.input_node(op, "mask"), 1, shape, fail, "mask")
            return _Scatter(self.input_node(op, "nonzero_data"), mask, fail)
        pn, pm = self.param(op, "nonzero_data"), self.param(op, "mask")
        if pn is None or pm is None:
            raise fail("inputs nonzero_data and mask are required")
        if pn[0] == "op" and pn[1].type in ("constexpr_lut_to_sparse", "constexpr_sparse_blockwise_shift_scale"):
            src = pn[1]
            if pn[2] != 1:
                raise fail("nonzero_data must be output 1 of the sparse op")
            # The mask is the sparse op's output 0, or (as coremltools writes it) a const holding
            # the same bits; the latter is checked window by window.
            given = None if pm[0] == "op" and pm[1] is src and pm[2] == 0 else self.input_node(op, "mask")
            sfail = self.fail(src)
            if src.type == "constexpr_lut_to_sparse":
                imask = self.input_node(src, "indices_mask")
                codes = _Scatter(self.input_node(src, "indices_nonzero_data"), imask, sfail)
                va = self.small(src, "vector_axis", required=False)
                values = _Lut(codes, self.input_node(src, "lut"), None if va is None else int(va), sfail)
                mask = imask if values.vs == 1 else _Repeat(imask, values.vs, values.axis)
                return _Where(values, mask, given, fail)
            dmask = self.input_node(src, "data_mask")
            data = _Scatter(self.input_node(src, "nonzero_data"), dmask, sfail)
            values = _ShiftScale(data, self.input_node(src, "scale"), self.input_node(src, "offset", required=False), sfail)
            return _Where(values, dmask, given, fail)
        return _Scatter(self.input_node(op, "nonzero_data"), self.input_node(op, "mask"), fail)


# --- weights -----------------------------------------------------------------------------------
def find_weights(pkg: Package, function: str) -> list[Weight]:
    """Every weight of ``function`` that holds blob data, in graph order (see
    :func:`milsurgery.weights.find_weights`), each able to be evaluated here."""
    return _find_weights(pkg, function, _Graph)


def get_weight(pkg: Package, function: str, name: str) -> Weight:
    """The weight whose variable is ``name`` in ``function`` (raises UsageError if none)."""
    for w in find_weights(pkg, function):
        if w.name == name:
            return w
    raise UsageError(f"{pkg.path}: function {function!r} has no weight {name!r}")


def _node_of(w: Weight) -> _Node:
    graph = _Graph.of(w.graph) if isinstance(w.graph, WeightGraph) else _Graph(w.package, w.function)
    return graph.node(w.ops[0], 0)


def check_weight(w: Weight) -> None:
    """Build the weight's evaluation (checks every op's shapes and inputs; reads no weight bytes
    except immediate values). Raises :class:`SpecError` naming the op on an inconsistency."""
    _node_of(w)


def iter_values(w: Weight, window: int = WINDOW_ELEMENTS) -> Iterator[np.ndarray]:
    """The weight's materialized values as flat float64 arrays, in C order, about ``window``
    elements at a time (at least one row along axis 0). Reads each blob byte about once.

    Each op is computed in float64 and the result rounded once to the weight's type (float16 or
    float32), the tensor Core ML materializes; the values are then handed out as float64."""
    node = _node_of(w)
    store = _FLOAT_TYPES.get(w.dtype)

    def materialized(values) -> np.ndarray:
        values = np.asarray(values)
        if store is not None:
            values = values.astype(store)
        return values.astype(np.float64, copy=False).reshape(-1)

    if not node.shape:
        yield materialized(node.whole())
        return
    rows = node.shape[0]
    step = max(1, window // max(1, _rowlen(node.shape)))
    for r0 in range(0, rows, step):
        yield materialized(node.rows(r0, min(rows, r0 + step)))


def dequantize(w: Weight) -> np.ndarray:
    """The whole materialized tensor in float64 (for tests and small weights: memory grows with
    the tensor; use :func:`iter_values` otherwise)."""
    parts = list(iter_values(w))
    return np.concatenate(parts).reshape(w.shape) if parts else np.zeros(w.shape)


def sample_values(w: Weight, count: int = 256) -> np.ndarray:
    """About ``count`` values taken from rows spread evenly along axis 0 (cheap: reads only those
    rows; sparse weights also count mask bits up to the last row)."""
    node = _node_of(w)
    if not node.shape:
        return np.asarray(node.whole(), dtype=np.float64).reshape(1)
    rows, n = node.shape[0], _rowlen(node.shape)
    per_row = min(n, max(1, count // min(rows, 16)))
    picks = np.unique(np.linspace(0, rows - 1, num=min(rows, max(1, count // per_row))).astype(np.int64))
    cols = np.unique(np.linspace(0, n - 1, num=per_row).astype(np.int64))
    store = _FLOAT_TYPES.get(w.dtype, np.float64)
    return node.pick(picks, cols).astype(store).astype(np.float64).reshape(-1)


def lut_parts(w: Weight):
    """For a weight that is one iOS 18 ``constexpr_lut_to_dense`` of scalar entries: a reader of
    its palette indices by rows, a reader of its LUT groups by rows, the group sizes per axis and
    the palette size; None for any other form. Lets metrics work on indices and palettes without
    materializing values (see :func:`milsurgery.measure.compare_weights`)."""
    if w.op_type != "constexpr_lut_to_dense":
        return None
    node = _node_of(w)
    if not isinstance(node, _Lut) or node.vs != 1 or not isinstance(node.indices, _ValueNode) or not isinstance(node.lut, _ValueNode):
        return None
    return node.indices.rows, node.lut.rows, list(node.blocks), node.palette


def group_offsets(r0: int, shape: tuple[int, ...], blocks: list[int], first_block: int, groups: tuple[int, ...]) -> np.ndarray:
    """Public form of the block-index helper used by the LUT and shift-scale evaluations."""
    return _group_offsets(r0, shape, blocks, first_block, groups)


def store_type(w: Weight):
    """The numpy type Core ML materializes the weight in (float16/float32), or None."""
    return _FLOAT_TYPES.get(w.dtype)


def blocked_parts(w: Weight):
    """For a weight that is one iOS 18 ``constexpr_blockwise_shift_scale`` of consts whose blocks
    are contiguous runs of elements (per-block along the last axis, per-channel quantization):
    (data, scale, offset or None, block size), each a tensor whose flat elements in C order are
    read with ``.elements(e0, e1)`` (``data`` as integer codes, the scale block ``k`` covering data
    elements ``[k * block, (k + 1) * block)``); None for any other form. Lets metrics compare
    codes and scales block by block and materialize only the blocks that differ (see
    :func:`milsurgery.measure.compare_weights`)."""
    if w.op_type != "constexpr_blockwise_shift_scale":
        return None
    node = _node_of(w)
    if not isinstance(node, _ShiftScale) or not node.shape:
        return None
    # Blocks are contiguous runs when, after the first axis split into blocks, each block spans
    # its axes whole (per-block along the last axis, per-channel of a linear or conv weight).
    first = next((k for k, b in enumerate(node.blocks) if b != 1), len(node.blocks))
    if any(node.blocks[k] != node.shape[k] for k in range(first + 1, len(node.shape))):
        return None
    if not all(isinstance(p, _ValueNode) for p in (node.data, node.scale) + ((node.offset,) if node.offset else ())):
        return None
    return node.data, node.scale, node.offset, math.prod(node.blocks)


def const_part(w: Weight):
    """For a blob-valued ``const`` weight: its tensor (flat elements read with
    ``.elements(e0, e1)``, in the blob's own type); None for any other form."""
    if w.op_type != "const":
        return None
    node = _node_of(w)
    return node if isinstance(node, _ValueNode) and node.shape else None


def element_type(part) -> str | None:
    """The blob dtype name (``int8``, ``uint4``, ``float16``...) of a tensor handed out by
    :func:`blocked_parts` or :func:`const_part`."""
    d = BLOB_DTYPE_BY_PROTO.get(part.dtype)
    return None if d is None else d.name


def raw_bytes(part, e0: int, e1: int) -> np.ndarray | None:
    """The stored bytes (uint8) of flat elements [e0, e1) of a blob-held tensor handed out by
    :func:`blocked_parts` or :func:`const_part`; None for an immediate value or a range that
    does not start and end on byte boundaries."""
    r = getattr(part, "resolved", None)
    if r is None:
        return None
    bits = r.blob.dtype.bits
    if (e0 * bits) % 8 or (e1 * bits) % 8:
        return None
    b0, b1 = e0 * bits // 8, e1 * bits // 8
    return np.frombuffer(os.pread(r.file.fileno(), b1 - b0, r.blob.data_offset + b0), dtype=np.uint8)


def code_unit(bits: int) -> tuple[int, int]:
    """(bytes, codes) of the smallest run of whole bytes that holds whole ``bits``-bit codes."""
    return (1, 8 // bits) if bits in (1, 2, 4, 8) else _UNITS[bits]


def unpack_codes(raw: np.ndarray, name: str) -> np.ndarray:
    """Integer codes of blob type ``name`` (``int4``, ``uint8``...) from whole stored bytes."""
    d = BLOB_DTYPE_BY_NAME[name]
    if not d.sub_byte:
        return raw.view(d.numpy)
    return _unpack(np.ascontiguousarray(raw), d.bits, 0, raw.size * 8 // d.bits, d.name == "int4")


def lut_indices(w: Weight):
    """For a weight :func:`lut_parts` accepts: its indices tensor (for :func:`raw_bytes`);
    None otherwise."""
    if lut_parts(w) is None:
        return None
    return _node_of(w).indices
