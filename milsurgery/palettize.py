"""Palettization math: per-group look-up tables (LUTs) and indices, computed as coremltools does.

A weight is split into groups along its output-channel axis (``group_size`` channels each, or one
group for the whole tensor); each group gets its own table of ``2**nbits`` values and every
element an index into it. What Core ML materializes is ``lut[group][index]``
(``constexpr_lut_to_dense``, iOS 18).

Two ways to choose a table, both matching coremltools' ``palettize_weights`` value for value, so
results can be compared byte for byte:

- ``kmeans``: a group of at least :data:`KMEANS1D_MIN_VALUES` float16 values is clustered with the
  exact 1-D k-means of the ``kmeans1d`` package (on the distinct values weighted by their counts),
  any other group with scikit-learn's ``KMeans(n_clusters, init="k-means++", tol=1e-2, n_init=1,
  random_state=0)`` on the values in the group's element order; centroids are rounded to the
  weight's dtype.
- ``uniform``: ``2**nbits`` evenly spaced values from the group's minimum to its maximum.

Both packages are optional (``pip install 'milsurgery[compress]'``) and imported only when a
group needs them. Everything here works on arrays already in memory (a weight, or a window of
whole groups of it). ``uniform`` works on all groups of an array at once, in float32 for
float16 weights (see :func:`_uniform_groups`), with the same results as coremltools' float16
arithmetic.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import UsageError

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "SUPPORTED_NBITS",
    "KMEANS1D_MIN_VALUES",
    "MODES",
    "group_lut",
    "palettize",
    "ErrorSums",
    "pack_codes",
]

#: Index widths Core ML's ``constexpr_lut_to_dense`` accepts.
SUPPORTED_NBITS = (1, 2, 3, 4, 6, 8)
#: From this many float16 values in a group on, k-means uses kmeans1d (as coremltools does).
KMEANS1D_MIN_VALUES = 10_000
MODES = ("kmeans", "uniform")

_INSTALL = "install it with: pip install 'milsurgery[compress]'"


def _kmeans1d():
    try:
        import kmeans1d
    except ImportError:
        raise UsageError(
            f"k-means palettization of groups of {KMEANS1D_MIN_VALUES} or more float16 values needs "
            f"the kmeans1d package; {_INSTALL}"
        ) from None
    return kmeans1d


def _sklearn_kmeans():
    try:
        from sklearn.cluster import KMeans
    except ImportError:
        raise UsageError(
            f"k-means palettization of groups under {KMEANS1D_MIN_VALUES} values (or of float32 "
            f"weights) needs scikit-learn; {_INSTALL}"
        ) from None
    return KMeans


def _cluster_weighted(distinct: np.ndarray, counts: np.ndarray, k: int) -> tuple[list, np.ndarray]:
    """Optimal 1-D k-means of ``distinct`` values repeated ``counts`` times: (centroids, the
    cluster of each distinct value).

    kmeans1d releases that take ``weights`` solve it on the distinct values directly (as the
    copy coremltools bundles does); older ones (0.5 and before) get the values repeated, which is
    the same problem: the clusters are ranges of the sorted values and each distinct value's
    copies sit together, so the first copy's cluster is every copy's.
    """
    import inspect

    import numpy as np

    cluster = _kmeans1d().cluster
    if "weights" in inspect.signature(cluster).parameters:
        result = cluster(distinct, k, weights=counts)
        return result.centroids, np.asarray(result.clusters)
    result = cluster(np.repeat(distinct, counts), k)
    first = np.cumsum(counts) - counts
    return result.centroids, np.asarray(result.clusters)[first]


def _kmeans(values: np.ndarray, nbits: int) -> tuple[np.ndarray, np.ndarray]:
    import numpy as np

    n = values.size
    size = 1 << nbits
    lut = np.zeros(size)
    if values.dtype == np.float16 and n >= KMEANS1D_MIN_VALUES:
        distinct, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
        k = min(len(distinct), size)
        centroids, clusters = _cluster_weighted(distinct, counts, k)
        lut[:k] = centroids
        codes = clusters[inverse.ravel()]
    else:
        import warnings

        k = min(n, size)
        with warnings.catch_warnings():
            # fewer distinct values than clusters: scikit-learn warns and still returns a result
            warnings.simplefilter("ignore")
            km = _sklearn_kmeans()(k, init="k-means++", tol=1e-2, n_init=1, random_state=0).fit(values.reshape(-1, 1))
        codes = km.labels_[:n]
        lut[:k] = km.cluster_centers_[:, 0]
    return lut.astype(values.dtype), codes.astype(np.uint8)


def _uniform(values: np.ndarray, nbits: int) -> tuple[np.ndarray, np.ndarray]:
    lut, codes, _ = _uniform_groups(values.reshape(1, -1), nbits)
    return lut[0], codes.reshape(-1)


def _fp16_codes(lo, hi, top: int, values):
    """coremltools' uniform index ``round(((v - lo) / (hi - lo)) * top)`` with every step rounded to
    float16, as numpy's float16 arithmetic does (float32 work, rounded once per step: exact for
    these operations). ``lo``, ``hi``: float32 arrays broadcasting against float32 ``values``."""
    import numpy as np

    f16, f32 = np.float16, np.float32
    t = (values - lo).astype(f16).astype(f32)
    t = (t / (hi - lo).astype(f16).astype(f32)).astype(f16).astype(f32)
    return np.rint((t * f32(top)).astype(f16).astype(f32))


#: Every finite float16 value, ascending, as float32 (for the threshold search of uniform mode).
_FP16_SORTED = None


def _uniform_thresholds(lo, hi, top: int):
    """Per group (rows of ``lo``/``hi``, float32), the smallest float16 value whose uniform index
    is at least k, for k = 1 .. top (shape ``(groups, top)``). The index is a non-decreasing
    function of the value (every step is), so ``index(v) = #{k : threshold_k <= v}``; a binary
    search over the float16 values finds each threshold in 16 steps, for all groups at once."""
    import numpy as np

    global _FP16_SORTED
    if _FP16_SORTED is None:
        every = np.arange(1 << 16, dtype=np.uint16).view(np.float16)
        _FP16_SORTED = np.unique(every[np.isfinite(every)].astype(np.float32))
    table = _FP16_SORTED
    want = np.arange(1, top + 1, dtype=np.float32)[None, :]
    left = np.repeat(np.searchsorted(table, lo), top, axis=1)  # index(lo) = 0 < k
    right = np.repeat(np.searchsorted(table, hi), top, axis=1)  # index(hi) = top >= k
    while True:
        open_ = left < right
        if not open_.any():
            return table[right]
        mid = (left + right) // 2
        reached = _fp16_codes(lo, hi, top, table[mid]) >= want
        right = np.where(open_ & reached, mid, right)
        left = np.where(open_ & ~reached, mid + 1, left)


def _uniform_groups(groups: np.ndarray, nbits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Uniform LUTs ``(groups, 2**nbits)`` and uint8 indices ``(groups, n)`` of the rows of
    ``groups``, each row as coremltools computes one group: indices
    ``round(((v - min) / (max - min)) * top)`` and LUT ``arange(2**nbits) * ((max - min) / top) +
    min``, in the weight's dtype. A constant group (where coremltools divides by zero) gets every
    index 0 and a table of its value. Third: the values as float32 or wider (for the error)."""
    import numpy as np

    top = (1 << nbits) - 1
    dtype = groups.dtype
    # float16 arithmetic in numpy is slow: compare and reduce in float32 (exact for these values)
    wide = groups.astype(np.float32) if dtype == np.float16 else groups
    lo = np.amin(wide, axis=1, keepdims=True).astype(dtype)
    hi = np.amax(wide, axis=1, keepdims=True).astype(dtype)
    flat = ~(lo < hi)[:, 0]
    step = (hi - lo) / top  # the weight's dtype, as coremltools' scalar arithmetic
    lut = (np.arange(top + 1) * step + lo).astype(dtype)
    if dtype == np.float16:
        lo32, hi32 = lo.astype(np.float32), hi.astype(np.float32)
        if flat.any():
            hi32[flat] = lo32[flat] + 1  # any order; these rows are overwritten below
        thresholds = _uniform_thresholds(lo32, hi32, top)
        if top <= 15:
            codes = np.zeros(groups.shape, dtype=np.uint8)
            hit = np.empty(groups.shape, dtype=bool)
            for k in range(top):
                np.greater_equal(wide, thresholds[:, k : k + 1], out=hit)
                codes += hit.view(np.uint8)
        else:
            codes = np.empty(groups.shape, dtype=np.uint8)
            for g in range(groups.shape[0]):
                codes[g] = np.searchsorted(thresholds[g], wide[g], side="right")
    else:
        with np.errstate(invalid="ignore", divide="ignore"):
            codes = np.round(((groups - lo) / (hi - lo)) * top).astype(np.uint8)
    if flat.any():
        codes[flat] = 0
        lut[flat] = lo[flat]
    return lut, codes, wide


def group_lut(values: np.ndarray, nbits: int, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """The table (``2**nbits`` values of ``values.dtype``) and uint8 indices of one group.

    ``values`` is the group flattened in the order coremltools flattens it (see :func:`palettize`).
    """
    if nbits not in SUPPORTED_NBITS:
        raise UsageError(f"palettization to {nbits} bits is not supported (choose one of {SUPPORTED_NBITS})")
    if mode == "kmeans":
        return _kmeans(values, nbits)
    if mode == "uniform":
        return _uniform(values, nbits)
    raise UsageError(f"palettization mode {mode!r} is not supported (choose one of {MODES})")


class ErrorSums:
    """Reconstruction error accumulated group by group, in float64."""

    def __init__(self) -> None:
        self.squared_error = 0.0
        self.squared_norm = 0.0
        self.max_abs = 0.0
        self.count = 0

    def add(self, original: np.ndarray, approx: np.ndarray) -> None:
        import numpy as np

        a = original.astype(np.float64).reshape(-1)
        d = approx.astype(np.float64).reshape(-1)
        if not d.size:
            return
        d -= a
        self.max_abs = max(self.max_abs, float(d.max()), -float(d.min()))
        # float64 dot products: no squared temporaries (workers run their BLAS on one thread)
        self.squared_error += float(np.dot(d, d))
        self.squared_norm += float(np.dot(a, a))
        self.count += d.size

    @property
    def relative_rms(self) -> float:
        """sqrt(sum of squared errors / sum of squared values); 0 for an all-zero weight."""
        if self.squared_norm == 0:
            return 0.0 if self.squared_error == 0 else float("inf")
        return (self.squared_error / self.squared_norm) ** 0.5


def palettize(
    weight: np.ndarray, nbits: int, mode: str, axis: int, group_size: int = 0, errors: ErrorSums | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (uint8, ``weight``'s shape) and LUT (rank + 2, ``weight``'s dtype) of ``weight``.

    Groups are ``group_size`` consecutive slices along ``axis`` (0: the whole tensor is one
    group); ``axis``'s size must be a multiple of ``group_size``. Each group is flattened after
    moving ``axis`` to the front, as coremltools does, which fixes the order k-means sees. The
    LUT's shape is ``[1, .., groups (at axis), .., 1, 2**nbits, 1]``. ``errors``, if given,
    accumulates the difference between ``weight`` and what the result materializes.
    """
    import numpy as np

    rank = weight.ndim
    channels = weight.shape[axis]
    group_size = group_size or channels
    if channels % group_size:
        raise UsageError(f"axis {axis} of size {channels} cannot be split into groups of {group_size}")
    moved = np.swapaxes(weight, 0, axis)
    groups = channels // group_size
    lut_shape = [1] * (rank + 2)
    lut_shape[0], lut_shape[-2] = groups, 1 << nbits
    if mode == "uniform" and nbits in SUPPORTED_NBITS:
        # every group at once: one vectorized pass instead of a loop of small ones
        rows = moved.reshape(groups, -1)
        lut, idx, wide = _uniform_groups(rows, nbits)
        if errors is not None:
            errors.add(wide, np.take_along_axis(lut.astype(wide.dtype), idx, axis=1))
        del wide
        indices = np.swapaxes(idx.reshape(moved.shape), 0, axis)
        lut = np.swapaxes(lut.reshape(lut_shape), 0, axis)
        return np.ascontiguousarray(indices), np.ascontiguousarray(lut)
    luts, codes = [], []
    for g in np.split(moved, groups, axis=0):
        flat = g.reshape(-1)
        lut, idx = group_lut(flat, nbits, mode)
        if errors is not None:
            errors.add(flat, lut[idx])
        luts.append(lut)
        codes.append(idx)
    indices = np.swapaxes(np.stack(codes).reshape(moved.shape), 0, axis)
    lut = np.swapaxes(np.stack(luts).reshape(lut_shape), 0, axis)
    return np.ascontiguousarray(indices), np.ascontiguousarray(lut)


def pack_codes(codes: np.ndarray, bits: int) -> bytes:
    """Pack unsigned integer codes LSB-first, ``bits`` bits each (element i at bits
    [i*b, i*b+b)), as MIL blob storage holds sub-byte data; negative codes (int4) are stored
    two's complement.

    Works on 24-bit words (3, 4, 6, 8, 12 or 24 codes each for 8, 6, 4, 3, 2, 1 bits), so
    temporary memory is about 1.4 bytes per code, not a byte per bit.
    """
    import numpy as np

    if 24 % bits:
        raise ValueError(f"cannot pack {bits}-bit codes")
    per_word = 24 // bits
    flat = np.asarray(codes).reshape(-1)
    n = flat.size
    padded = -n % per_word
    if padded:
        flat = np.concatenate([flat, np.zeros(padded, dtype=flat.dtype)])
    columns = flat.reshape(-1, per_word)
    mask = (1 << bits) - 1
    words = np.zeros(columns.shape[0], dtype="<u4")
    for i in range(per_word):
        words |= (columns[:, i].astype(np.int64) & mask).astype("<u4") << np.uint32(bits * i)
    packed = words.view(np.uint8).reshape(-1, 4)[:, :3].reshape(-1)
    return packed[: (n * bits + 7) // 8].tobytes()
