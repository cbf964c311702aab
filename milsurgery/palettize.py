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
group needs them. Everything here works on arrays already in memory: one weight at a time.
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
    import numpy as np

    top = (1 << nbits) - 1
    lo, hi = np.amin(values), np.amax(values)
    if not lo < hi:
        # A constant group (coremltools divides by zero here): every index 0, the table the value.
        return np.full(top + 1, lo, dtype=values.dtype), np.zeros(values.size, dtype=np.uint8)
    step = (hi - lo) / top
    codes = np.round(((values - lo) / (hi - lo)) * top).astype(np.uint8)
    lut = np.arange(top + 1) * step + lo
    return lut.astype(values.dtype), codes


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

        a = original.astype(np.float64).ravel()
        d = approx.astype(np.float64).ravel() - a
        if not d.size:
            return
        # plain reductions, not BLAS dot: on many small groups its thread start-up dominates
        self.max_abs = max(self.max_abs, float(np.max(np.abs(d))))
        d *= d
        a *= a
        self.squared_error += float(d.sum())
        self.squared_norm += float(a.sum())
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
    luts, codes = [], []
    for g in np.split(moved, groups, axis=0):
        flat = g.reshape(-1)
        lut, idx = group_lut(flat, nbits, mode)
        if errors is not None:
            errors.add(flat, lut[idx])
        luts.append(lut)
        codes.append(idx)
    indices = np.swapaxes(np.stack(codes).reshape(moved.shape), 0, axis)
    lut_shape = [1] * (rank + 2)
    lut_shape[0], lut_shape[-2] = groups, 1 << nbits
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
