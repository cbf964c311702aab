"""Near-duplicate adoption: a weight of one function is written as references to the blobs of an
almost identical weight of the anchor function.

:func:`plan_adoption` takes the functions a command is about to write and:

1. lists every function's weights (:func:`milsurgery.dequant.find_weights`, spec only), checks
   that each one's ops are consistent, and gives each a structural key: the producing ops'
   types, their non-blob inputs and attributes, their output types and each blob's dtype and
   shape, with names left out. Only weights with equal keys can pair, so adoption never changes
   anything in a graph but blob references;
2. sets aside weights byte-identical to an anchor weight of the same key (blob samples, then the
   bytes decide) and re-points them at the anchor's blobs, so the writer's coalescing sees one
   blob and does not compare the bytes again;
3. takes a cheap sketch of each remaining weight (256 materialized values from 16 rows spread
   along axis 0) and ranks the anchor's weights of the same key by sketch distance (names with
   a trailing ``_N`` stripped break ties; they never decide);
4. computes, for the nearest candidate (and a runner-up whose sketch is about as close), the
   full metrics over the whole materialized tensors with float64 accumulation
   (:func:`compare_weights`: for the common kinds only what differs is decoded, the norms
   coming from one pass over the anchor); the best candidate meeting every threshold is
   adopted, otherwise the weight is reported as rejected with the threshold that failed.
   Target weights are judged one after the other, in order (two threads were measured slower
   than one on a 2-core machine: the numpy calls on cache-sized windows contend);
5. returns the mapping of references (output function, op, location) -> the anchor's blob, which
   :func:`milsurgery.assemble.write_package` applies before coalescing (the writer is unchanged:
   the re-pointed references coalesce with the anchor's), and records the adoption in the
   output's metadata (``userDefined["milsurgery.adopted"]``).

I/O: the spec, 64-byte records and a few KiB of samples per blob for every weight; rows for the
sketches; each candidate pair's blobs once for the byte comparison and once for the metrics.
Memory is bounded by the windows (about 1 Mi elements at most), not by tensor or model size (a
LUT weight also keeps its index counts and palettes per group: at most 1 Mi entries each, else
it is materialized in windows).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from ._proto import milsurgery_spec_pb2 as pb
from .coalesce import BlobSource, blobs_equal, sample_digest
from .dequant import (
    WINDOW_ELEMENTS,
    Weight,
    blocked_parts,
    check_weight,
    const_part,
    element_type,
    find_weights,
    group_offsets,
    iter_values,
    lut_indices,
    lut_parts,
    raw_bytes,
    sample_values,
    store_type,
    unpack_codes,
)
from .errors import UsageError
from .formats import ADOPTED_METADATA_KEY, BLOB_DTYPE_BY_NAME
from .package import ResolvedRef
from .spec import BlobRef, blanked_value
from .thresholds import Thresholds, adoption_options  # noqa: F401 (re-exported)

__all__ = [
    "Thresholds",
    "Metrics",
    "Adoption",
    "Rejection",
    "AdoptReport",
    "AdoptPlan",
    "METADATA_KEY",
    "compare_weights",
    "render_report",
    "structure_key",
    "plan_adoption",
]

#: The ``userDefined`` metadata key recording what adoption did to a package.
METADATA_KEY = ADOPTED_METADATA_KEY
#: Candidates (best sketch first) whose full metrics are computed for one target weight.
CANDIDATES = 2
#: Values in a weight's sketch.
SKETCH_VALUES = 256
#: Sketch distances (relative L2) this close to the nearest candidate's count as a tie.
SKETCH_SLACK = 1e-3


@dataclass
class Metrics:
    """How far a target weight's values are from an anchor's (delta = anchor - target)."""

    cosine: float
    mean_abs: float
    max_abs: float
    rel_rms: float  # sqrt(sum delta^2 / sum target^2)
    elements: int

    def to_dict(self) -> dict:
        return asdict(self)

    def text(self) -> str:
        return (f"cosine {self.cosine:.9f}, mean |delta| {self.mean_abs:.3g}, max |delta| {self.max_abs:.3g}, "
                f"relative RMS {self.rel_rms:.3g}")


class _Sums:
    """Float64 accumulators of the metrics (delta = anchor - target)."""

    def __init__(self):
        self.dot = self.na = self.nt = self.sq = self.sabs = self.mx = 0.0
        self.n = 0

    def add_values(self, a: np.ndarray, t: np.ndarray) -> None:
        d = a - t
        self.dot += float(a @ t)
        self.na += float(a @ a)
        self.nt += float(t @ t)
        self.sq += float(d @ d)
        np.abs(d, out=d)
        self.sabs += float(d.sum())
        if d.size:
            self.mx = max(self.mx, float(d.max()))
        self.n += a.size

    def metrics(self) -> Metrics:
        if self.na == 0.0 and self.nt == 0.0:
            cosine = 1.0
        elif self.na == 0.0 or self.nt == 0.0:
            cosine = 0.0
        else:
            cosine = self.dot / math.sqrt(self.na * self.nt)
        rel = math.sqrt(self.sq / self.nt) if self.nt > 0 else (0.0 if self.sq == 0 else math.inf)
        mx = math.nan if math.isnan(self.sabs) else self.mx
        return Metrics(cosine, self.sabs / self.n if self.n else 0.0, mx, rel, self.n)


#: Largest (groups x palette) table of index counts the LUT path keeps for one weight.
_MAX_BINS = 1 << 20


def _lut_windows(shape: tuple[int, ...], blocks: list[int]):
    """Row windows [r0, r1) of about :data:`WINDOW_ELEMENTS` elements, whole LUT groups along
    axis 0, with the groups [g0, g1) along axis 0 they cover."""
    n_row = math.prod(shape[1:])
    step = max(blocks[0], WINDOW_ELEMENTS // max(1, n_row) // blocks[0] * blocks[0])
    for r0 in range(0, shape[0], step):
        r1 = min(shape[0], r0 + step)
        yield r0, r1, r0 // blocks[0], (r1 - 1) // blocks[0] + 1


def _index_counts(rows, lut, shape, blocks, palette, indices, name):
    """counts[group, index] over the whole weight (groups flat in C order) and the number of
    groups per unit of axis 0; None if the table would be too large.

    Indices of 1, 2, 4 or 8 bits in groups along axis 0 only are counted from their stored
    bytes (one count per byte value and group, then split into the codes each byte holds); any
    other layout from the decoded indices."""
    bits = BLOB_DTYPE_BY_NAME[name].bits if name in BLOB_DTYPE_BY_NAME else 0
    per_byte = 8 // bits if bits in (1, 2, 4, 8) else 0
    n_row = math.prod(shape[1:])
    per_g0 = None
    parts = []
    for r0, r1, g0, g1 in _lut_windows(shape, blocks):
        groups = lut(g0, g1).shape[:-2]
        per_g0 = math.prod(groups[1:])
        if (shape[0] // blocks[0]) * per_g0 * palette > _MAX_BINS:
            return None
        raw = raw_bytes(indices, r0 * n_row, r1 * n_row) if per_byte and per_g0 == 1 else None
        if raw is not None and raw.size % (g1 - g0) == 0:
            key = raw.reshape(g1 - g0, -1).astype(np.intp)
            key += (np.arange(g1 - g0, dtype=np.intp) * 256)[:, None]
            by_byte = np.bincount(key.reshape(-1), minlength=(g1 - g0) * 256).reshape(g1 - g0, 256)
            codes = unpack_codes(np.arange(256, dtype=np.uint8), name).reshape(256, per_byte).astype(np.intp)
            counts = np.zeros((g1 - g0, palette), dtype=np.int64)
            for k in range(per_byte):  # the k-th code of each byte value
                counts += by_byte @ (codes[:, k][:, None] == np.arange(palette)[None, :]).astype(np.int64)
            parts.append(counts.reshape(-1))
            continue
        idx = rows(r0, r1)
        key = group_offsets(r0, idx.shape, blocks, g0, groups) * palette + idx
        parts.append(np.bincount(key.reshape(-1), minlength=math.prod(groups) * palette))
    return np.concatenate(parts).reshape(-1, palette), per_g0


def _at(offsets: np.ndarray, shape: tuple[int, ...], flat: np.ndarray) -> np.ndarray:
    """``np.broadcast_to(offsets, shape).reshape(-1)[flat]`` without materializing the broadcast."""
    where = np.unravel_index(flat, shape)
    return offsets[tuple(i if offsets.shape[k] > 1 else 0 for k, i in enumerate(where))]


def _compare_luts(anchor: Weight, target: Weight, norms: dict) -> Metrics | None:
    """Metrics of two LUT weights of the same structure, exact, without materializing values.

    Elements whose anchor and target indices are equal (nearly all) have values ``la[g, i]``
    and ``lt[g, i]``: they are counted per (group, index) from the anchor's index counts (one
    pass over its indices, cached in ``norms``) less the elements whose indices differ, which
    are found by comparing the index arrays and looked up one by one. The target's counts
    follow from the anchor's and those differing elements."""
    pa, pt = lut_parts(anchor), lut_parts(target)
    if pa is None or pt is None or pa[2] != pt[2] or pa[3] != pt[3]:
        return None
    rows_a, lut_a, blocks, palette = pa
    rows_t, lut_t = pt[0], pt[1]
    store = store_type(anchor) or np.float64
    shape = anchor.shape
    name = element_type(lut_indices(anchor))
    cached = norms.get(("lut counts", id(anchor)))
    if cached is None:
        cached = _index_counts(rows_a, lut_a, shape, blocks, palette, lut_indices(anchor), name)
        if cached is None:
            return None
        norms[("lut counts", id(anchor))] = cached
    counts, per_g0 = cached
    ind_a, ind_t = lut_indices(anchor), lut_indices(target)
    bits = BLOB_DTYPE_BY_NAME[name].bits if name in BLOB_DTYPE_BY_NAME else 0
    per_byte = 8 // bits if bits in (1, 2, 4, 8) else 0
    n_row = math.prod(shape[1:])
    off_a = np.zeros(counts.shape, dtype=np.int64)  # elements with differing indices, by anchor index
    off_t = np.zeros(counts.shape, dtype=np.int64)  # ... by target index
    diff = _Diff()
    las, lts = [], []
    for r0, r1, g0, g1 in _lut_windows(shape, blocks):
        la_, lt_ = lut_a(g0, g1), lut_t(g0, g1)
        groups = la_.shape[:-2]
        la = la_.reshape(-1, palette).astype(store).astype(np.float64)
        lt = lt_.reshape(-1, palette).astype(store).astype(np.float64)
        las.append(la)
        lts.append(lt)
        e0, e1 = r0 * n_row, r1 * n_row
        ra = raw_bytes(ind_a, e0, e1) if per_byte else None
        rt = raw_bytes(ind_t, e0, e1) if ra is not None else None
        if ra is not None and rt is not None:
            # Differing stored bytes, then the codes they hold (equal codes among them dropped).
            where_b = np.flatnonzero(ra != rt)
            ca = unpack_codes(ra[where_b], name)
            ct = unpack_codes(rt[where_b], name)
            flat = (where_b[:, None] * per_byte + np.arange(per_byte)).reshape(-1)
            keep = ca != ct
            where, i, j = flat[keep], ca[keep].astype(np.int64), ct[keep].astype(np.int64)
            win_shape = (r1 - r0,) + shape[1:]
        else:
            ia, it = rows_a(r0, r1), rows_t(r0, r1)
            where = np.flatnonzero(ia != it)
            i, j = ia.reshape(-1)[where].astype(np.int64), it.reshape(-1)[where].astype(np.int64)
            win_shape = ia.shape
        if where.size:
            g = _at(group_offsets(r0, win_shape, blocks, g0, groups), win_shape, where)
            diff.add(la[g, i], lt[g, j])
            base = g0 * per_g0 * palette
            size = la.size
            off_a.reshape(-1)[base : base + size] += np.bincount(g * palette + i, minlength=size)
            off_t.reshape(-1)[base : base + size] += np.bincount(g * palette + j, minlength=size)
    la, lt = np.concatenate(las), np.concatenate(lts)
    same = (counts - off_a).astype(np.float64)  # elements with equal indices
    d = la - lt
    s = _Sums()
    s.na = float(np.einsum("ij,ij->", counts.astype(np.float64), la * la))
    s.nt = float(np.einsum("ij,ij->", (counts - off_a + off_t).astype(np.float64), lt * lt))
    s.sq = diff.sq + float(np.einsum("ij,ij->", same, d * d))
    ad = np.abs(d)
    s.sabs = diff.sabs + float(np.einsum("ij,ij->", same, ad))
    used = ad[same > 0]
    s.mx = max(diff.mx, float(used.max()) if used.size else 0.0)
    if math.isnan(s.sabs):
        s.mx = math.nan
    s.n = anchor.size
    s.dot = (s.na + s.nt - s.sq) / 2
    return s.metrics()


#: Elements per window of the sparse-difference paths (small enough for the CPU caches).
_FAST_WINDOW = 1 << 17
#: Elements per window when a symmetric int4 anchor's norm comes from table lookups
#: (:func:`_int4_sumsq`): that path has few temporaries per element, so its per-window
#: overhead weighs more than the caches (at 384 MiB: 0.41-0.44 s median for the pass at 2**19
#: and 2**20 against 0.64 s at 2**17, while the float32 path slows down 3x past 2**17).
_INT4_WINDOW = 1 << 19
#: Blob types whose blockwise codes the sparse-difference path reads (at most 8 bits: codes
#: times a float16 scale are exact in float32).
_CODES = ("int8", "uint8", "int4", "uint4", "uint3", "uint2", "uint1", "uint6")


def _sumsq(x: np.ndarray) -> float:
    """Sum of squares in float64 (einsum: no BLAS threads, float64 products and sums)."""
    x64 = x.astype(np.float64)
    return float(np.einsum("i,i->", x64, x64))


def _sumsq_f16_exact(x: np.ndarray) -> float:
    """Sum of squares of float32 values that are float16 values, in float64: their squares (22
    significant bits at most, within float32's range) are exact in float32."""
    x = x * x
    return float(np.add.reduce(x, dtype=np.float64))


def _sumsq_f16(h: np.ndarray) -> float:
    """Sum of squares of float16 values in float64, exactly as from ``h.astype(float64)``.

    numpy converts float16 without hardware help (~6 ns a value); moving the exponent and
    mantissa bits into a float32 and scaling by 2**112 gives the same value (subnormals too) in a
    few integer passes. Infinities and NaNs take numpy's conversion."""
    u = h.view(np.uint16).astype(np.uint32)
    u &= 0x7FFF  # the sign does not matter for a square
    if u.size and int(u.max()) >= 0x7C00:
        return _sumsq(h.astype(np.float64))
    u <<= 13
    x = u.view(np.float32)
    x *= np.float32(2.0**112)
    return _sumsq_f16_exact(x)


def _round_f16(x: np.ndarray) -> None:
    """Round float32 values in place to the nearest float16 value (ties to even), staying
    float32. Valid for values that are 0 or of magnitude in [2**-14, 65504] after rounding."""
    u = x.view(np.uint32)
    t = u >> 13
    t &= 1
    t += 0xFFF
    u += t
    u &= np.uint32(0xFFFFE000)


def _exact_blocks(q: np.ndarray, s: np.ndarray, o, store) -> np.ndarray:
    """Materialized values of blocks (rows of codes ``q``, each with its scale in ``s`` and
    offset in ``o``): each op in float64, the result rounded once to ``store``."""
    v = q.astype(np.float64)
    if o is not None:
        v -= o.astype(np.float64)[:, None]
    v *= s.astype(np.float64)[:, None]
    return v.astype(store).astype(np.float64).reshape(-1)


def _block_codes(raw: np.ndarray | None, name: str, codes, units: int, idx: np.ndarray) -> np.ndarray:
    """The codes of blocks ``idx`` of a window: decoded from their stored bytes only, when the
    window's bytes are at hand, else taken from all its codes."""
    if raw is None:
        return codes().reshape(units, -1)[idx]
    return unpack_codes(raw.reshape(units, -1)[idx].reshape(-1), name).reshape(idx.size, -1)


def _blocked_sumsq(parts, s: np.ndarray, o, block: int, codes) -> float:
    """Sum of squares of the float16-materialized ``s * (q - o)``, in float64.

    ``parts`` holds the codes as arrays whose elements each cover ``block // len(parts)``
    consecutive elements per block (a 4-bit block's low nibbles, then its high nibbles: the
    order of a sum does not matter). Codes of at most 8 bits times a float16 scale are exact in
    float32; rounding that to float16 is done on the bits. Blocks whose scale could give a
    float16 subnormal or overflow are materialized exactly instead (``codes()`` gives all the
    window's codes, in order)."""
    s32 = s.astype(np.float32)
    a = np.abs(s32)
    special = np.flatnonzero(~((a >= np.float32(2.0**-14)) & (a <= np.float32(65504.0 / 256))))
    total = 0.0
    if special.size:
        rows = codes().reshape(-1, block)[special]
        total += _sumsq(_exact_blocks(rows, s[special], None if o is None else o[special], np.float16))
        s32[special] = 0
    per = block // len(parts)
    scale = np.repeat(s32, per)
    shift = None if o is None else np.repeat(o.astype(np.float32), per)
    for q in parts:
        x = q.astype(np.float32)
        if shift is not None:
            x -= shift
        x *= scale
        _round_f16(x)
        total += _sumsq_f16_exact(x)
    return total


#: Largest int4 block whose per-block sums fit the 16-bit fields of :func:`_int4_tables_once`: a
#: pair of bytes adds at most 4 * 8**2 = 256 to the sum of squares, so 512 / 4 * 256 = 32768 < 2**16.
_INT4_TABLE_MAX_BLOCK = 512
_int4_tables: tuple[np.ndarray, np.ndarray] | None = None


def _int4_tables_once() -> tuple[np.ndarray, np.ndarray]:
    """Two lookup tables for :func:`_int4_sumsq`, made on first use (a few milliseconds).

    ``pairs[v]``, for each of the 65,536 values of two stored int4 bytes (four codes), packs four
    16-bit sums: of ``q**2``; of the count of ``|q| == 3`` plus four times that of ``|q| == 6``;
    of the count of ``|q| == 5``; of that of ``|q| == 7``. Products of a float16 scale by 0, 1, 2,
    4 or 8 are exact in float16, by 6 they round as twice the product by 3 (same significand), so
    only 3, 5 and 7 need a rounded square. ``scales[b]``, for each float16 bit pattern ``b`` of a
    scale ``s``: ``s**2`` and, for k = 3, 5, 7, ``float16(k*s)**2 - (k*s)**2`` (exact in float64)."""
    global _int4_tables
    if _int4_tables is None:
        v = np.arange(1 << 16, dtype=np.int64)
        q = [np.abs(np.where(n >= 8, n - 16, n)) for n in ((v >> (4 * k)) & 15 for k in range(4))]
        fields = [sum(x * x for x in q), sum((x == 3) + 4 * (x == 6) for x in q),
                  sum((x == 5) * 1 for x in q), sum((x == 7) * 1 for x in q)]
        pairs = sum(f.astype(np.uint64) << np.uint64(16 * k) for k, f in enumerate(fields))
        s = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float64)
        with np.errstate(all="ignore"):  # infinities and NaNs: never looked up (see the range test)
            cols = [s * s]
            for k in (3.0, 5.0, 7.0):
                exact = s * k
                rounded = exact.astype(np.float16).astype(np.float64)
                cols.append(rounded * rounded - exact * exact)
        _int4_tables = (pairs, np.stack(cols, axis=1))
    return _int4_tables


def _int4_sumsq(raw: np.ndarray, s: np.ndarray, block: int) -> float | None:
    """Sum of squares of the float16-materialized ``s * q`` of a window of symmetric int4 codes
    (``raw``: the stored bytes of whole blocks; ``s``: one float16 scale per block), in float64,
    from lookups on pairs of bytes: per block ``s**2 * sum(q**2)`` (exact) plus, for codes 3, 5
    and 7, the difference their rounding makes to a square, times their count. None when the
    window does not suit the tables (block size; a scale whose products could be float16
    subnormals or overflow)."""
    if block % 4 or block > _INT4_TABLE_MAX_BLOCK or raw.size % 2:
        return None
    a = np.abs(s.astype(np.float32))
    if a.size and not (a.min() >= np.float32(2.0**-14) and a.max() <= np.float32(65504.0 / 8)):
        return None
    pairs, scales = _int4_tables_once()
    packed = np.einsum("ij->i", np.take(pairs, raw.view("<u2")).reshape(s.size, block // 4))
    fields = packed.view(np.uint16).reshape(s.size, 4).astype(np.float64)
    return float(np.einsum("ij,ij->", np.take(scales, s.view(np.uint16), axis=0), fields))


def _code_parts(raw: np.ndarray | None, name: str, codes):
    """The codes of a window as :func:`_blocked_sumsq` takes them: 4-bit codes straight from the
    stored bytes as (low nibbles, high nibbles), others whole."""
    if raw is not None and name in ("int4", "uint4"):
        lo, hi = raw & np.uint8(15), raw >> np.uint8(4)
        if name == "int4":  # two's complement: flip the sign bit, then subtract it
            lo ^= np.uint8(8)
            hi ^= np.uint8(8)
            return [lo.view(np.int8) - np.int8(8), hi.view(np.int8) - np.int8(8)]
        return [lo, hi]
    return [codes()]


def _differ(a: np.ndarray, b: np.ndarray, units: int) -> np.ndarray:
    """Per unit (equal runs of ``a``'s bytes), whether ``a`` and ``b`` differ in any byte."""
    ra, rb = a.view(np.uint8).reshape(units, -1), b.view(np.uint8).reshape(units, -1)
    width = ra.shape[1]
    for word in (np.uint64, np.uint32, np.uint16):
        if width % np.dtype(word).itemsize == 0:
            ra, rb = ra.view(word), rb.view(word)
            break
    ne = ra != rb
    k = ne.shape[1]
    if k in (1, 2, 4, 8):  # a unit's k flags (bytes of 0 or 1) read as one word: nonzero if any is
        return ne.view(f"u{k}").reshape(units) != 0
    return ne.any(axis=1)


class _Diff:
    """Float64 sums over the elements that differ, and what they add to each norm."""

    def __init__(self):
        self.sq = self.sabs = self.mx = self.na = self.nt = 0.0

    def add(self, va: np.ndarray, vt: np.ndarray) -> None:
        d = va - vt
        self.sq += float(np.einsum("i,i->", d, d))
        self.na += float(np.einsum("i,i->", va, va))
        self.nt += float(np.einsum("i,i->", vt, vt))
        np.abs(d, out=d)
        self.sabs += float(d.sum())
        if d.size:
            self.mx = max(self.mx, float(d.max()))

    def metrics(self, na: float, n: int) -> Metrics:
        """The pair's metrics given the anchor's whole norm ``na`` (sum of squares)."""
        s = _Sums()
        s.na = na
        s.nt = na - self.na + self.nt
        s.sq, s.sabs, s.mx, s.n = self.sq, self.sabs, self.mx, n
        s.dot = (s.na + s.nt - s.sq) / 2  # |a - t|^2 = |a|^2 + |t|^2 - 2 a.t
        return s.metrics()


def _compare_blocked(anchor: Weight, target: Weight, norms: dict) -> Metrics | None:
    """Metrics of two blockwise-quantized weights: blocks whose stored codes, scale and offset
    are all equal contribute delta = 0, so only differing blocks are decoded and materialized;
    the anchor's norm is computed once over all its blocks (and cached in ``norms``), the
    target's follows from it."""
    pa, pt = blocked_parts(anchor), blocked_parts(target)
    if pa is None or pt is None or pa[3] != pt[3] or store_type(anchor) is not np.float16:
        return None
    (da, sa_, oa_, block), (dt, st_, ot_, _) = pa, pt
    if block > WINDOW_ELEMENTS:
        return None  # windows hold whole blocks: a per-tensor scale of a large weight is windowed by rows
    name = element_type(da)
    if name not in _CODES or element_type(sa_) != "float16" or (oa_ is None) != (ot_ is None):
        return None
    if any(p.elements(0, 1).dtype != np.float16 for p in (sa_, st_)):
        return None  # a scale given as a list of floats
    n = anchor.size
    na = norms.get(id(anchor))
    total = 0.0
    diff = _Diff()
    int4_table = name == "int4" and oa_ is None and block % 4 == 0 and block <= _INT4_TABLE_MAX_BLOCK
    step = max(block, (_INT4_WINDOW if int4_table else _FAST_WINDOW) // block * block)
    for e0 in range(0, n, step):
        e1 = min(n, e0 + step)
        b0, b1 = e0 // block, e1 // block
        units = b1 - b0
        ra, rt = raw_bytes(da, e0, e1), raw_bytes(dt, e0, e1)
        if ra is None or rt is None or ra.size % units:
            ra = rt = None  # codes compared decoded
        qa = _Lazy(lambda e0=e0, e1=e1, ra=ra: unpack_codes(ra, name) if ra is not None else da.elements(e0, e1))
        qt = _Lazy(lambda e0=e0, e1=e1, rt=rt: unpack_codes(rt, name) if rt is not None else dt.elements(e0, e1))
        sa, st = sa_.elements(b0, b1), st_.elements(b0, b1)
        oa = oa_.elements(b0, b1) if oa_ is not None else None
        ot = ot_.elements(b0, b1) if ot_ is not None else None
        if na is None:
            quick = _int4_sumsq(ra, sa, block) if int4_table and ra is not None else None
            total += quick if quick is not None else _blocked_sumsq(_code_parts(ra, name, qa), sa, oa, block, qa)
        differ = _differ(ra, rt, units) if ra is not None else _differ(qa(), qt(), units)
        differ |= sa.view(np.uint16) != st.view(np.uint16)
        if oa is not None:
            differ |= _differ(oa, ot, units)
        idx = np.flatnonzero(differ)
        if idx.size:
            pick = (lambda o: None) if oa is None else (lambda o: o[idx])
            diff.add(_exact_blocks(_block_codes(ra, name, qa, units, idx), sa[idx], pick(oa), np.float16),
                     _exact_blocks(_block_codes(rt, name, qt, units, idx), st[idx], pick(ot), np.float16))
    if na is None:
        na = norms[id(anchor)] = total
    return diff.metrics(na, n)


class _Lazy:
    """A value computed on first call, then kept."""

    def __init__(self, make):
        self.make, self.value = make, None

    def __call__(self):
        if self.value is None:
            self.value = self.make()
        return self.value


def _compare_consts(anchor: Weight, target: Weight, norms: dict) -> Metrics | None:
    """Metrics of two float16 ``const`` weights: only elements whose bits differ are
    materialized; the anchor's norm is computed once (and cached in ``norms``)."""
    ca, ct = const_part(anchor), const_part(target)
    if ca is None or ct is None or element_type(ca) != "float16" or element_type(ct) != "float16":
        return None
    if store_type(anchor) is not np.float16:
        return None
    n = anchor.size
    na = norms.get(id(anchor))
    total = 0.0
    diff = _Diff()
    for e0 in range(0, n, _FAST_WINDOW):
        e1 = min(n, e0 + _FAST_WINDOW)
        a, t = ca.elements(e0, e1), ct.elements(e0, e1)
        if na is None:
            total += _sumsq_f16(a)
        idx = np.flatnonzero(a.view(np.uint16) != t.view(np.uint16))
        if idx.size:
            diff.add(a[idx].astype(np.float64), t[idx].astype(np.float64))
    if na is None:
        na = norms[id(anchor)] = total
    return diff.metrics(na, n)


def compare_weights(anchor: Weight, target: Weight, norms: dict | None = None) -> Metrics:
    """Metrics over the whole materialized tensors, window by window (float64 accumulation;
    memory bounded by the window). Both weights must have the same shape.

    Two LUT weights of the same structure are compared through a joint histogram of their
    indices per group (exact: every element is counted with its two values). Blockwise-quantized
    weights (codes with float16 scales along the last axis) and float16 consts are compared
    where they differ: equal codes, scales and offsets give delta = 0, so only the differing
    blocks or elements are materialized, and the norms follow from the anchor's (computed once,
    cached in ``norms`` when given: an anchor is often measured against several targets), since
    |a - t|^2 = |a|^2 + |t|^2 - 2 a.t. Any other pair is compared by materializing both in
    windows (:func:`milsurgery.dequant.iter_values`)."""
    if anchor.shape != target.shape:
        raise UsageError(f"{anchor.describe()} and {target.describe()} have different shapes")
    norms = {} if norms is None else norms
    fast = None
    if anchor.shape:
        fast = _compare_luts(anchor, target, norms) or _compare_blocked(anchor, target, norms) or _compare_consts(anchor, target, norms)
    if fast is not None:
        return fast
    sums = _Sums()
    for a, t in zip(iter_values(anchor), iter_values(target)):
        sums.add_values(a, t)
    return sums.metrics()


def _ref_slots(w: Weight) -> dict[tuple[int, str], ResolvedRef]:
    """(index of the op in ``w.ops``, location in the op) -> blob reference."""
    index = {id(op): i for i, op in enumerate(w.ops)}
    by_name = {op.outputs[0].name: id(op) for op in w.ops if op.outputs}
    return {(index[by_name[r.ref.op_name]], r.ref.location): r for r in w.refs}


def structure_key(w: Weight) -> bytes:
    """What must be equal for two weights to pair: op types, non-blob inputs and attributes,
    output types, and each blob's dtype and shape (blob locations and all names left out)."""
    h = hashlib.sha256()
    position = {op.outputs[0].name: i for i, op in enumerate(w.ops) if op.outputs}
    for op in w.ops:
        h.update(b"op:" + op.type.encode() + b"\0")
        for e in sorted(op.inputs, key=lambda e: e.key):
            h.update(b"in:" + e.key.encode() + b"\0")
            for b in e.value.arguments:
                if b.WhichOneof("binding") == "name":
                    h.update(f"ref:{position.get(b.name, b.name)}\0".encode())
                else:
                    h.update(blanked_value(b.value))
        for e in sorted(op.attributes, key=lambda e: e.key):
            if e.key != "name":
                h.update(b"attr:" + e.key.encode() + b"\0" + blanked_value(e.value))
        for out in op.outputs:
            h.update(b"out:" + out.type.SerializeToString(deterministic=True))
    h.update(repr(sorted(_ref_slots(w))).encode())
    return h.digest()


def _base_name(name: str) -> str:
    return re.sub(r"_\d+$", "", name)


@dataclass
class Adoption:
    function: str
    op: str
    kind: str
    anchor_function: str
    anchor_op: str
    metrics: Metrics
    bytes_saved: int

    def to_dict(self) -> dict:
        d = asdict(self)
        d["metrics"] = self.metrics.to_dict()
        return d


@dataclass
class Rejection:
    function: str
    op: str
    kind: str
    anchor_function: str
    anchor_op: str
    failed: str
    metrics: Metrics

    def to_dict(self) -> dict:
        d = asdict(self)
        d["metrics"] = self.metrics.to_dict()
        return d


@dataclass
class AdoptReport:
    """What adoption found: every adopted weight, every rejected candidate, totals."""

    anchor: str
    thresholds: Thresholds
    adopted: list[Adoption] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    weights: int = 0  # weights of the non-anchor functions
    identical: int = 0  # weights byte-identical to an anchor weight (left to exact coalescing)
    unpaired: int = 0  # weights with no anchor weight of the same structure
    seconds: float = 0.0
    dry_run: bool = False

    @property
    def bytes_saved(self) -> int:
        return sum(a.bytes_saved for a in self.adopted)

    def to_dict(self) -> dict:
        return {
            "anchor": self.anchor,
            "thresholds": self.thresholds.to_dict(),
            "dry_run": self.dry_run,
            "adopted": [a.to_dict() for a in self.adopted],
            "rejected": [r.to_dict() for r in self.rejected],
            "totals": {
                "weights": self.weights,
                "adopted": len(self.adopted),
                "rejected": len(self.rejected),
                "identical": self.identical,
                "unpaired": self.unpaired,
                "bytes_saved": self.bytes_saved,
                "seconds": self.seconds,
            },
        }

    def render_text(self) -> str:
        return render_report(self.to_dict())


def _metrics_text(m: dict) -> str:
    return (f"cosine {m['cosine']:.9f}, mean |delta| {m['mean_abs']:.3g}, max |delta| {m['max_abs']:.3g}, "
            f"relative RMS {m['rel_rms']:.3g}")


def render_report(d: dict) -> str:
    """The text form of an :meth:`AdoptReport.to_dict` (what the CLI prints)."""
    t, tot = d["thresholds"], d["totals"]
    lines = [
        f"adoption (anchor function {d['anchor']!r}; min cosine {t['min_cosine']:g}, max mean |delta| "
        f"{t['max_mean_abs']:g}, max |delta| {'none' if t['max_abs'] is None else format(t['max_abs'], 'g')})"
        + (": dry run, nothing written" if d["dry_run"] else "")
    ]
    for a in d["adopted"]:
        lines.append(
            f"  adopted {a['function']}:{a['op']} ({a['kind']}) from {a['anchor_function']}:{a['anchor_op']}: "
            f"{_metrics_text(a['metrics'])}; {a['bytes_saved']} bytes saved"
        )
    for r in d["rejected"]:
        lines.append(
            f"  rejected {r['function']}:{r['op']} ({r['kind']}) vs {r['anchor_function']}:{r['anchor_op']}: "
            f"{r['failed']} ({_metrics_text(r['metrics'])})"
        )
    lines.append(
        f"  totals: {tot['adopted']} adopted ({tot['bytes_saved']} bytes saved), {tot['rejected']} rejected, "
        f"{tot['identical']} byte-identical, {tot['unpaired']} without a candidate, of {tot['weights']} weights; "
        f"{tot['seconds']:.2f} s"
    )
    return "\n".join(lines)


@dataclass
class AdoptPlan:
    report: AdoptReport
    #: (output function, op name, location) -> the anchor's blob that reference is to point at
    mapping: dict[tuple[str, str, str], ResolvedRef]

    def apply(self, model: pb.Model, pairs: list[tuple[BlobRef, ResolvedRef]]) -> list[tuple[BlobRef, ResolvedRef]]:
        """Re-point the adopted references of ``pairs`` (output reference, source blob) at the
        anchor's blobs and record the adoption in ``model``'s metadata."""
        out = []
        for new, src in pairs:
            found = self.mapping.get((new.function, new.op_name, new.location))
            out.append((new, found if found is not None else src))
        if self.report.adopted:
            _record(model, self.report)
        return out


def _record(model: pb.Model, report: AdoptReport) -> None:
    meta = model.description.metadata
    prior = {"count": 0, "bytes": 0}
    for e in list(meta.userDefined):
        if e.key == METADATA_KEY:
            try:
                prior = json.loads(e.value)
            except ValueError:
                pass
            meta.userDefined.remove(e)
    t = report.thresholds
    entry = {
        "count": int(prior.get("count", 0)) + len(report.adopted),
        "bytes": int(prior.get("bytes", 0)) + report.bytes_saved,
        "anchor": report.anchor,
        "min_cosine": t.min_cosine,
        "max_mean_abs": t.max_mean_abs,
        "max_abs": t.max_abs,
    }
    meta.userDefined.add(key=METADATA_KEY, value=json.dumps(entry, sort_keys=True))


class _Sketches:
    def __init__(self):
        self._cache: dict[int, np.ndarray] = {}

    def __call__(self, w: Weight) -> np.ndarray:
        s = self._cache.get(id(w))
        if s is None:
            s = self._cache[id(w)] = sample_values(w, SKETCH_VALUES)
        return s


def _distance(a: np.ndarray, b: np.ndarray) -> float:
    d = float(np.linalg.norm(a - b))
    return d / (float(np.linalg.norm(b)) + 1e-30) if math.isfinite(d) else math.inf


def _sample(r: ResolvedRef) -> tuple:
    """(dtype, size, padding, sample digest) of a blob: equal for byte-identical blobs."""
    b = r.blob
    return (b.dtype.code, b.size, b.padding_bits if b.dtype.sub_byte else 0, sample_digest(BlobSource(r.file, b)))


def _blob_pairs(anchor: Weight, target: Weight) -> list[tuple[ResolvedRef, ResolvedRef]]:
    sa, st = _ref_slots(anchor), _ref_slots(target)
    return [(sa[k], st[k]) for k in sorted(st)]


class _Judge:
    """Decides one target weight: ("unpaired" | "identical" | "rejected" | "adopted", anchor
    weight or None, metrics, failed threshold or bytes saved)."""

    def __init__(self, pool: dict[bytes, list[Weight]], thresholds: Thresholds, sketch: _Sketches, norms: dict):
        self.pool, self.thresholds, self.sketch, self.norms = pool, thresholds, sketch, norms

    def __call__(self, w: Weight):
        candidates = self.pool.get(structure_key(w), [])
        if not candidates:
            return ("unpaired", None, None, None)
        if any(all(ra.file is rt.file and ra.blob.record_offset == rt.blob.record_offset
                   for ra, rt in _blob_pairs(c, w)) for c in candidates):
            return ("identical", None, None, None)  # already the very same blobs
        # Byte-identical weights are found before any value is computed: samples of every blob
        # agree, then the bytes decide (each blob is read once: the writer is told).
        for c in candidates:
            pairs = _blob_pairs(c, w)
            if all(_sample(ra) == _sample(rt) for ra, rt in pairs) and all(
                    blobs_equal(BlobSource(ra.file, ra.blob), BlobSource(rt.file, rt.blob)) for ra, rt in pairs):
                return ("identical", c, None, None)
        mine = self.sketch(w)
        base = _base_name(w.name)
        ranked = sorted((_distance(self.sketch(c), mine), _base_name(c.name) != base, i) for i, c in enumerate(candidates))
        # The best sketch is always measured; a runner-up only if its sketch is about as close
        # (a clear winner is not second-guessed with another full pass).
        nearest = ranked[0][0]
        proposed = [candidates[i] for d, _, i in ranked[:CANDIDATES] if d <= 2 * nearest + SKETCH_SLACK]
        best: tuple[Weight, Metrics, int] | None = None
        first_fail: tuple[Weight, Metrics, str] | None = None
        for c in proposed:
            same = {}
            for ra, rt in _blob_pairs(c, w):
                key = (id(rt.file), rt.blob.record_offset)
                if key not in same:
                    same[key] = (rt.blob.size, blobs_equal(BlobSource(ra.file, ra.blob), BlobSource(rt.file, rt.blob)))
            if all(eq for _, eq in same.values()):
                return ("identical", c, None, None)
            m = compare_weights(c, w, self.norms)
            failed = self.thresholds.failure(m)
            if failed is None:
                saved = sum(size for size, eq in same.values() if not eq)
                if best is None or (m.cosine, -m.mean_abs) > (best[1].cosine, -best[1].mean_abs):
                    best = (c, m, saved)
            elif first_fail is None:
                first_fail = (c, m, failed)
        if best is None:
            return ("rejected",) + first_fail
        return ("adopted",) + best


def plan_adoption(
    functions: Sequence[tuple[object, str, str]],
    thresholds: Thresholds,
    anchor: str | None = None,
    *,
    dry_run: bool = False,
) -> AdoptPlan:
    """Decide which weights adopt which: ``functions`` lists (package, source function name,
    output function name) in output order; the anchor is the first or the one named ``anchor``
    (an output name). Reads the spec, the sketches' rows, and for each candidate pair the blobs
    (byte comparison) and, unless identical, both weights whole in windows."""
    start = time.perf_counter()
    names = [f[2] for f in functions]
    if anchor is None:
        anchor = names[0]
    if anchor not in names:
        raise UsageError(f"anchor function {anchor!r} is not among the output functions {names}")
    pkg_a, src_a, _ = functions[names.index(anchor)]
    report = AdoptReport(anchor, thresholds, dry_run=dry_run)
    mapping: dict[tuple[str, str, str], ResolvedRef] = {}
    pool: dict[bytes, list[Weight]] = {}
    for w in find_weights(pkg_a, src_a):
        check_weight(w)
        pool.setdefault(structure_key(w), []).append(w)
    targets = []
    for pkg, src, out_name in functions:
        if out_name != anchor:
            for w in find_weights(pkg, src):
                check_weight(w)  # every weight's ops are consistent before anything is decided
                targets.append((out_name, w))
    judge = _Judge(pool, thresholds, _Sketches(), {})
    for out_name, w in targets:
        report.weights += 1
        kind, c, m, detail = judge(w)
        if kind == "unpaired":
            report.unpaired += 1
            continue
        if kind == "identical":
            report.identical += 1
            if c is not None:
                # Re-pointed at the anchor's blobs (the same bytes): the writer's coalescing
                # sees one blob and does not compare them again.
                for ra, rt in _blob_pairs(c, w):
                    mapping[(out_name, rt.ref.op_name, rt.ref.location)] = ra
            continue
        if kind == "rejected":
            report.rejected.append(Rejection(out_name, w.name, w.kind, anchor, c.name, detail, m))
            continue
        report.adopted.append(Adoption(out_name, w.name, w.kind, anchor, c.name, m, detail))
        for ra, rt in _blob_pairs(c, w):
            mapping[(out_name, rt.ref.op_name, rt.ref.location)] = ra
    report.seconds = time.perf_counter() - start
    return AdoptPlan(report, mapping)


def plan_for_picks(picks, thresholds: Thresholds, anchor: str | None, dry_run: bool = False) -> AdoptPlan:
    """:func:`plan_adoption` for the picks (:class:`milsurgery.assemble.Pick`) of a writer."""
    return plan_adoption([(p.source, p.name, p.new_name) for p in picks], thresholds, anchor, dry_run=dry_run)


def weight_differences(pkg, function: str, src, src_function: str, differing, tolerance: Thresholds | None, check):
    """For ``verify``: judge blobs of ``pkg``'s ``function`` that differ from the source's, weight
    by weight.

    Each weight holding a differing blob is compared with the source's weight (full metrics). With
    ``tolerance`` met, the weight goes to ``check.tolerated`` and its blobs are not reported.
    Returns (output ref, source ref, note) for the blobs still to report as differences: ``note``
    names the weight's op and metrics (for the first blob of each weight) or is empty.
    """
    mine = {op.outputs[0].name: w for w in find_weights(pkg, function) for op in w.ops if op.outputs}
    theirs = {op.outputs[0].name: w for w in find_weights(src, src_function) for op in w.ops if op.outputs}
    left, verdicts = [], {}
    for ra, rb in differing:
        wa, wb = mine.get(ra.ref.op_name), theirs.get(rb.ref.op_name)
        if wa is None or wb is None or wa.name != wb.name or wa.shape != wb.shape:
            left.append((ra, rb, ""))
            continue
        note = ""
        if wa.name not in verdicts:
            m = compare_weights(wb, wa)
            failed = tolerance.failure(m) if tolerance is not None else "no tolerance given"
            verdicts[wa.name] = failed is None
            if failed is None:
                check.tolerated.append({"op": wa.name, "kind": wa.kind, "metrics": m.to_dict()})
            else:
                note = f"; the values of weight {wa.name!r} ({wa.kind}) differ: {m.text()} ({failed})"
        if not verdicts[wa.name]:
            left.append((ra, rb, note))
    return left
