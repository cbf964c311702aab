"""How far apart two weights' values are: the metrics of near-duplicate adoption and ``verify
--tolerance`` (:func:`compare_weights`), and the cheap sketches that rank candidate pairs.

Metrics are exact float64 sums over the whole materialized tensors, computed in bounded windows.
For the common kinds only what differs between two weights is decoded (see
:func:`compare_weights`); anything else is materialized window by window
(:func:`milsurgery.dequant.iter_values`). Imported only when values must be compared: finding
weights and screening byte-identical ones (:mod:`milsurgery.adopt`) need no numpy.
"""

from __future__ import annotations

import math

import numpy as np

from .dequant import (
    WINDOW_ELEMENTS,
    Weight,
    blocked_parts,
    code_unit,
    const_part,
    element_type,
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
from .formats import BLOB_DTYPE_BY_NAME
from .thresholds import Metrics

__all__ = ["compare_weights", "Sketches", "SKETCH_VALUES"]

#: Values in a weight's sketch.
SKETCH_VALUES = 256


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


#: Elements per window of LUT indices whose width does not divide a byte (3 or 6 bits): their
#: per-window temporaries and 4,096 counters per group want smaller windows to stay in the CPU's
#: caches (uniform LUT6 at 384 MiB: pass 0.58-0.79 s at 2**18 against 0.94-1.19 s at 2**20; LUT4
#: is fastest at 2**20).
_LUT_WINDOW_ODD = 1 << 18


def _lut_windows(shape: tuple[int, ...], blocks: list[int], window: int = WINDOW_ELEMENTS):
    """Row windows [r0, r1) of about ``window`` elements, whole LUT groups along axis 0, with
    the groups [g0, g1) along axis 0 they cover."""
    n_row = math.prod(shape[1:])
    step = max(blocks[0], window // max(1, n_row) // blocks[0] * blocks[0])
    for r0 in range(0, shape[0], step):
        r1 = min(shape[0], r0 + step)
        yield r0, r1, r0 // blocks[0], (r1 - 1) // blocks[0] + 1


def _split_counts(by_key: np.ndarray, bits: int, digits: int, palette: int) -> np.ndarray:
    """counts[group, code] from counts[group, key] of keys holding ``digits`` codes (a stored
    byte's codes, or two decoded codes paired): a key's codes are its digits in base
    ``2**bits``, so each code position is a sum over the other digits' axes (codes of
    ``palette`` or more, which no valid index holds, dropped)."""
    split = by_key.reshape((by_key.shape[0],) + (1 << bits,) * digits)
    counts = np.zeros((by_key.shape[0], 1 << bits), dtype=np.int64)
    for k in range(digits):
        counts += split.sum(axis=tuple(a for a in range(1, digits + 1) if a != k + 1)) if digits > 1 else split
    return counts[:, :palette]


def _window_counts(raw, idx, r0: int, g0: int, g1: int, groups: tuple[int, ...], blocks: list[int], palette: int,
                   name: str) -> np.ndarray:
    """counts[group, index] of the groups [g0, g1) along axis 0 that a window of rows starting
    at ``r0`` covers (groups flat in C order).

    Indices in groups along axis 0 only are counted from their stored bytes ``raw``: widths
    that divide a byte one count per byte value and group, 3 and 6 bits one per 12 bits of
    each 3-byte run; the counts are then split into codes. Any other layout is counted from the
    decoded indices ``idx()``."""
    bits = BLOB_DTYPE_BY_NAME[name].bits if name in BLOB_DTYPE_BY_NAME else 0
    ng = g1 - g0
    if raw is not None and bits and math.prod(groups[1:]) == 1:
        if bits in (3, 6) and raw.size % (3 * ng) == 0:
            # Three bytes hold 24 bits: two keys of 12 bits (two 6-bit or four 3-bit codes),
            # read as little-endian 32-bit words three bytes apart; counted group by group (a
            # group's 4,096 counters stay in the CPU's caches).
            padded = np.zeros(raw.size + 1, dtype=np.uint8)
            padded[: raw.size] = raw
            words = np.ndarray((raw.size // 3,), dtype="<u4", buffer=padded, strides=(3,))
            v = words & np.uint32(0xFFFFFF)
            key = np.empty((v.size, 2), dtype=np.uint16)
            np.bitwise_and(v, 0xFFF, out=key[:, 0], casting="unsafe")
            np.right_shift(v, 12, out=key[:, 1], casting="unsafe")
            key = key.reshape(ng, -1)
            by_key = np.empty((ng, 4096), dtype=np.int64)
            for g in range(ng):
                by_key[g] = np.bincount(key[g], minlength=4096)
            return _split_counts(by_key, bits, 12 // bits, palette)
        if bits in (1, 2, 4, 8) and raw.size % ng == 0:
            key = raw.reshape(ng, -1).astype(np.intp)
            key += (np.arange(ng, dtype=np.intp) * 256)[:, None]
            by_key = np.bincount(key.reshape(-1), minlength=ng * 256)
            return _split_counts(by_key.reshape(ng, 256), bits, 8 // bits, palette)
    ind = idx()
    key = group_offsets(r0, ind.shape, blocks, g0, groups) * palette + ind
    return np.bincount(key.reshape(-1), minlength=math.prod(groups) * palette).reshape(-1, palette)


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
    n_groups = [n // b for n, b in zip(shape, blocks)]
    per_g0 = math.prod(n_groups[1:])
    cached = norms.get(("lut counts", id(anchor)))
    if cached is None:  # counted in the loop below, from the same reads
        if math.prod(n_groups) * palette > _MAX_BINS:
            return None
        counts = np.empty((math.prod(n_groups), palette), dtype=np.int64)
    else:
        counts = cached
    ind_a, ind_t = lut_indices(anchor), lut_indices(target)
    bits = BLOB_DTYPE_BY_NAME[name].bits if name in BLOB_DTYPE_BY_NAME else 0
    unit_bytes, per_unit = code_unit(bits) if bits else (0, 0)
    n_row = math.prod(shape[1:])
    off_a = np.zeros(counts.shape, dtype=np.int64)  # elements with differing indices, by anchor index
    off_t = np.zeros(counts.shape, dtype=np.int64)  # ... by target index
    diff = _Diff()
    las, lts = [], []
    window = WINDOW_ELEMENTS if bits in (1, 2, 4, 8) else _LUT_WINDOW_ODD
    for r0, r1, g0, g1 in _lut_windows(shape, blocks, window):
        la_, lt_ = lut_a(g0, g1), lut_t(g0, g1)
        groups = la_.shape[:-2]
        la = la_.reshape(-1, palette).astype(store).astype(np.float64)
        lt = lt_.reshape(-1, palette).astype(store).astype(np.float64)
        las.append(la)
        lts.append(lt)
        e0, e1 = r0 * n_row, r1 * n_row
        whole_units = per_unit and e0 % per_unit == 0 and e1 % per_unit == 0
        ra = raw_bytes(ind_a, e0, e1) if whole_units else None
        rt = raw_bytes(ind_t, e0, e1) if ra is not None else None
        ia = _Lazy(lambda r0=r0, r1=r1: rows_a(r0, r1))
        if cached is None:
            counts[g0 * per_g0 : g1 * per_g0] = _window_counts(ra, ia, r0, g0, g1, groups, blocks, palette, name)
        if ra is not None and rt is not None:
            # Differing stored bytes, the runs of whole codes holding them, then their codes
            # (equal codes among them dropped).
            where_b = np.flatnonzero(ra != rt)
            if unit_bytes > 1:
                where_b = np.unique(where_b // unit_bytes)
                ca = unpack_codes(ra.reshape(-1, unit_bytes)[where_b].reshape(-1), name)
                ct = unpack_codes(rt.reshape(-1, unit_bytes)[where_b].reshape(-1), name)
            else:
                ca = unpack_codes(ra[where_b], name)
                ct = unpack_codes(rt[where_b], name)
            flat = (where_b[:, None] * per_unit + np.arange(per_unit)).reshape(-1)
            keep = ca != ct
            where, i, j = flat[keep], ca[keep].astype(np.int64), ct[keep].astype(np.int64)
            win_shape = (r1 - r0,) + shape[1:]
        else:
            ia_, it = ia(), rows_t(r0, r1)
            where = np.flatnonzero(ia_ != it)
            i, j = ia_.reshape(-1)[where].astype(np.int64), it.reshape(-1)[where].astype(np.int64)
            win_shape = ia_.shape
        if where.size:
            g = _at(group_offsets(r0, win_shape, blocks, g0, groups), win_shape, where)
            diff.add(la[g, i], lt[g, j])
            base = g0 * per_g0 * palette
            size = la.size
            off_a.reshape(-1)[base : base + size] += np.bincount(g * palette + i, minlength=size)
            off_t.reshape(-1)[base : base + size] += np.bincount(g * palette + j, minlength=size)
    if cached is None:
        norms[("lut counts", id(anchor))] = counts
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
    float32. Valid for values that are 0 or of magnitude in [2**-14, 65504] after rounding.

    Veltkamp's split: with ``c = x * (2**13 + 1)``, ``c - (c - x)`` is ``x`` rounded to
    24 - 13 = 11 significant bits, float16's precision. That it rounds ties to even as float16
    does holds for every float32 significand (a test checks them all against numpy's
    conversion); three float operations against five integer ones on the bits."""
    c = x * np.float32(8193.0)
    np.subtract(c, x, out=x)
    np.subtract(c, x, out=x)


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
    scale = s32[:, None]
    shift = None if o is None else o.astype(np.float32)[:, None]
    for q in parts:
        x = q.astype(np.float32)
        rows = x.reshape(-1, per)  # a block's codes per row: scale and offset broadcast
        if shift is not None:
            rows -= shift
        rows *= scale
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


class Sketches:
    """Each weight's sketch (:func:`milsurgery.dequant.sample_values`), taken once."""

    def __init__(self):
        self._cache: dict[int, np.ndarray] = {}
        self._stacks: dict[int, tuple[list[Weight], np.ndarray]] = {}

    def __call__(self, w: Weight) -> np.ndarray:
        s = self._cache.get(id(w))
        if s is None:
            s = self._cache[id(w)] = sample_values(w, SKETCH_VALUES)
        return s

    def distances(self, candidates: list[Weight], w: Weight) -> list[float]:
        """Relative L2 distance (infinite if not finite) of each candidate's sketch from ``w``'s,
        in one pass over the candidates' sketches, stacked once per candidate list (many targets
        share one; candidates have ``w``'s structure, so their sketches have its size)."""
        kept = self._stacks.get(id(candidates))
        if kept is None or kept[0] is not candidates:
            kept = self._stacks[id(candidates)] = (candidates, np.stack([self(c) for c in candidates]))
        mine = self(w)
        with np.errstate(all="ignore"):
            diff = kept[1] - mine
            d = np.sqrt(np.einsum("ij,ij->i", diff, diff)) / (float(np.linalg.norm(mine)) + 1e-30)
        return [float(x) if math.isfinite(x) else math.inf for x in d]
