"""``compress``: palettize or quantize every distinct weight of a package once, for all functions.

coremltools compresses one function at a time; two functions of a merged package that share a
weight then get two compressed copies. Here a weight's compressed form is computed once per
distinct blob content and every ``const`` that referenced it, in any function, is rewritten to
use it, so sharing survives by construction:

1. plan: every function must be opset CoreML8 (iOS 18) or newer; each ``const`` op whose value
   is a float16/float32 blob of rank >= 2 with more than ``min_elements`` elements, not matched
   by ``skip`` and not feeding a constexpr op, is a candidate. Its output-channel axis (and
   input axis) comes from the ops that consume it, as coremltools picks it (``matmul``'s ``y``:
   last axis unless ``transpose_y``; ``conv_transpose``: 1; others: 0). Consumers that disagree
   leave the weight as it is. A shape the configuration cannot split is an error, raised before
   anything is written;
2. group the candidates' blobs by identical content (:mod:`milsurgery.coalesce`, bytes decide);
3. compress each distinct (content, grouping) once, in worker processes, one weight per worker
   at a time. Every output blob's size follows from the shapes, so its place in a scratch blob
   file beside the destination is reserved first; a worker then reads the weight from the
   source file in windows of whole groups (palettization) or blocks (quantization) along axis
   0, about :data:`WINDOW_ELEMENTS` values each, runs :mod:`milsurgery.palettize` or
   :mod:`milsurgery.quantize` on the window, accumulates the reconstruction error and writes the
   window's encoded indices + LUT (or data + scale) at their places before reading the next.
   Only descriptions (and tensors small enough to go inline) return to the main process. A
   weight whose groups do not follow axis 0 is one window;
4. write the package with :func:`milsurgery.assemble.write_package`, whose ``adjust`` step replaces
   each candidate ``const`` by the one constexpr op coremltools emits (``constexpr_lut_to_dense``
   with ``indices``/``lut``, or ``constexpr_blockwise_shift_scale`` with ``data``/``scale``, both
   bound to blob values), keeping the output variable's name and type so no consumer changes;
   the writer copies the new blobs and every still-referenced old one file to file, once per
   content. Blobs only replaced consts used are not written. The spec's user-defined metadata
   records what was done under :data:`METADATA_KEY`.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

from ._proto import milsurgery_spec_pb2 as pb
from .assemble import Pick, Progress, WriteReport, write_package
from .blobfile import BlobFile, BlobWriter
from .coalesce import BlobSource, group_identical
from .errors import DestinationExistsError, PackageError, UsageError, WriteError
from .formats import (
    ALIGNMENT,
    BLOB_DTYPE_BY_NAME,
    DEFAULT_WEIGHT_REF,
    MULTIFUNCTION_SPEC_VERSION,
    RECORD_SIZE,
    SPEC_FOR_OPSET,
    align,
)
from .package import PARTIAL_MARKER, Package, ResolvedRef, open_input
from .palettize import MODES, SUPPORTED_NBITS, ErrorSums, pack_codes, palettize
from .quantize import QUANT_DTYPES, quantize
from .spec import BlobRef, entry

__all__ = ["compress", "CompressReport", "WeightReport", "METADATA_KEY", "DEFAULT_MIN_ELEMENTS"]

#: Weights with at most this many elements stay as they are (coremltools' ``weight_threshold``).
DEFAULT_MIN_ELEMENTS = 2048
#: User-defined metadata key of the output that records the compression configuration.
METADATA_KEY = "milsurgery.compressed"
#: Compressed tensors with fewer elements are written into the spec, not the weight file.
INLINE_LIMIT = 10
#: Lowest spec version whose opset has the iOS 18 constexpr ops written here.
_IOS18 = MULTIFUNCTION_SPEC_VERSION
_FLOAT_PROTO = {pb.DataType.Value("FLOAT16"): "float16", pb.DataType.Value("FLOAT32"): "float32"}


@dataclass
class WeightReport:
    """One distinct compressed weight: where it is used and what compression cost."""

    ops: list[str]  # "function/op name" of every const replaced by this form
    shape: list[int]
    dtype: str
    op_type: str  # the constexpr op written
    axis: int  # output-channel axis the groups / blocks follow
    bytes_before: int
    bytes_after: int
    relative_rms: float
    max_abs_error: float


@dataclass
class CompressReport:
    """What ``compress`` did (or, with ``dry_run``, would do)."""

    output: str | None
    dry_run: bool
    configuration: str
    consts_replaced: int = 0
    weights_compressed: int = 0  # distinct compressed forms
    bytes_before: int = 0  # source weight file(s)
    bytes_after: int = 0  # output weight.bin (estimated with dry_run)
    weights: list[WeightReport] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # "function/op: reason"
    seconds: float = 0.0
    write: WriteReport | None = None

    @property
    def warnings(self) -> list[str]:
        return self.write.warnings if self.write else []

    def to_dict(self) -> dict:
        return asdict(self)


# -- configuration -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Config:
    """One compression setting, as the options gave it."""

    nbits: int | None
    mode: str
    group_size: int
    dtype: str | None
    block_size: int

    def describe(self) -> str:
        if self.nbits is not None:
            grouping = f"group_size={self.group_size}" if self.group_size else "per_tensor"
            return f"palettize nbits={self.nbits} mode={self.mode} {grouping}"
        grouping = f"block_size={self.block_size}" if self.block_size else "per_channel"
        return f"quantize dtype={self.dtype} linear_symmetric {grouping}"


def _config(palettize_bits, mode, group_size, quantize_dtype, block_size) -> _Config:
    if (palettize_bits is None) == (quantize_dtype is None):
        raise UsageError("compress needs exactly one of --palettize NBITS or --quantize int8|int4")
    if palettize_bits is not None:
        if palettize_bits not in SUPPORTED_NBITS:
            raise UsageError(f"--palettize {palettize_bits}: supported are {', '.join(map(str, SUPPORTED_NBITS))} bits")
        if mode not in MODES:
            raise UsageError(f"--mode {mode}: supported are {', '.join(MODES)}")
        if group_size is None or group_size < 0:
            raise UsageError(f"--group-size {group_size}: must be a positive number of channels (0: per tensor)")
        if block_size:
            raise UsageError("--block-size applies to --quantize; palettization groups with --group-size")
        return _Config(palettize_bits, mode, group_size, None, 0)
    if quantize_dtype not in QUANT_DTYPES:
        raise UsageError(f"--quantize {quantize_dtype}: supported are {', '.join(sorted(QUANT_DTYPES))}")
    if block_size is None or block_size < 0:
        raise UsageError(f"--block-size {block_size}: must be a positive number of elements (0: per channel)")
    if group_size:
        raise UsageError("--group-size applies to --palettize; quantization blocks with --block-size")
    return _Config(None, mode, 0, quantize_dtype, block_size)


# -- planning ------------------------------------------------------------------------------------


@dataclass
class _Candidate:
    """A const op whose weight may be compressed, and where it is."""

    function: str
    block_path: tuple
    index: int  # position of the const op in its block
    op_name: str
    var: str  # output variable name
    ref: ResolvedRef
    shape: tuple[int, ...]
    dtype: str
    axis: int
    in_axis: int


def _walk_blocks(path: tuple, block: pb.Block):
    yield path, block
    for i, op in enumerate(block.operations):
        for j, nested in enumerate(op.blocks):
            yield from _walk_blocks(path + (i, j), nested)


def _blocks(function: pb.Function):
    for e in function.block_specializations:
        yield from _walk_blocks((e.key,), e.value)


def _block_at(function: pb.Function, path: tuple) -> pb.Block:
    block = entry(function.block_specializations, path[0])
    for i in range(1, len(path), 2):
        block = block.operations[path[i]].blocks[path[i + 1]]
    return block


def _op_name(op: pb.Operation) -> str:
    v = entry(op.attributes, "name")
    if v is not None and v.immediateValue.tensor.strings.values:
        return v.immediateValue.tensor.strings.values[0]
    return op.outputs[0].name if op.outputs else ""


def _bool_input(op: pb.Operation, key: str, consts: dict[str, pb.Value]) -> bool:
    arg = entry(op.inputs, key)
    if arg is None or not arg.arguments:
        return False
    b = arg.arguments[0]
    value = b.value if b.WhichOneof("binding") == "value" else consts.get(b.name)
    if value is None:
        return False
    bools = value.immediateValue.tensor.bools.values
    return bool(bools and bools[0])


def _axes_for_use(op: pb.Operation, key: str, rank: int, consts: dict[str, pb.Value]) -> tuple[int, int]:
    """(output axis, input axis) of a weight of ``rank`` used as input ``key`` of ``op``."""
    out_axis, in_axis = 0, 1
    if op.type == "conv_transpose":
        out_axis, in_axis = 1, 0
    elif op.type == "matmul":
        if key == "y":
            out_axis, in_axis = (-2, -1) if _bool_input(op, "transpose_y", consts) else (-1, -2)
        else:
            out_axis, in_axis = (-1, -2) if _bool_input(op, "transpose_x", consts) else (-2, -1)
    return out_axis % rank, in_axis % rank


def _shape(value: pb.Value) -> tuple[int, ...] | None:
    dims = []
    for d in value.type.tensorType.dimensions:
        if d.WhichOneof("dimension") != "constant":
            return None
        dims.append(d.constant.size)
    return tuple(dims)


def _check_opsets(pkg: Package) -> None:
    for e in pkg.model.mlProgram.functions:
        for spec in e.value.block_specializations:
            if SPEC_FOR_OPSET.get(spec.key, 0) < _IOS18:
                raise UsageError(
                    f"{pkg.path}: function {e.key!r} uses opset {spec.key}, older than CoreML8 (iOS 18); "
                    "its compressed ops would differ: convert it with minimum_deployment_target iOS18 first"
                )


def _plan(pkg: Package, min_elements: int, skip: list[str]) -> tuple[list[_Candidate], list[str]]:
    candidates: list[_Candidate] = []
    skipped: list[str] = []
    for fname, function in ((e.key, e.value) for e in pkg.model.mlProgram.functions):
        consts: dict[str, pb.Value] = {}
        uses: dict[str, list[tuple[pb.Operation, str]]] = {}
        for _, block in _blocks(function):
            for op in block.operations:
                if op.type == "const" and op.outputs:
                    v = entry(op.attributes, "val")
                    if v is not None:
                        consts[op.outputs[0].name] = v
                for e in op.inputs:
                    for b in e.value.arguments:
                        if b.WhichOneof("binding") == "name":
                            uses.setdefault(b.name, []).append((op, e.key))
        for path, block in _blocks(function):
            for index, op in enumerate(block.operations):
                if op.type != "const" or len(op.outputs) != 1:
                    continue
                value = entry(op.attributes, "val")
                if value is None or value.WhichOneof("value") != "blobFileValue":
                    continue
                dtype = _FLOAT_PROTO.get(value.type.tensorType.dataType)
                shape = _shape(value)
                if dtype is None or shape is None or len(shape) < 2:
                    continue
                var, name = op.outputs[0].name, _op_name(op)
                where = f"{fname}/{name}"
                n = 1
                for s in shape:
                    n *= s
                if n <= min_elements or n < 10:
                    continue
                if any(fnmatch.fnmatchcase(name, g) or fnmatch.fnmatchcase(var, g) for g in skip):
                    skipped.append(f"{where}: matches --skip")
                    continue
                users = uses.get(var, [])
                if any(u.type.startswith("constexpr_") for u, _ in users):
                    skipped.append(f"{where}: feeds a constexpr op")
                    continue
                axes = {_axes_for_use(u, k, len(shape), consts) for u, k in users} or {(0, 1)}
                if len({a for a, _ in axes}) > 1 or len({b for _, b in axes}) > 1:
                    skipped.append(f"{where}: its consumers use different output channel axes")
                    continue
                (axis, in_axis), = axes
                ref = pkg.resolve(BlobRef(fname, op.type, var, "attributes[val]", value))
                candidates.append(_Candidate(fname, path, index, name, var, ref, shape, dtype, axis, in_axis))
    return candidates, skipped


def _grouping(c: _Candidate, config: _Config) -> tuple:
    """What fixes the compressed form besides the values: the groups or blocks."""
    if config.nbits is not None:
        size = c.shape[c.axis]
        if config.group_size and size % config.group_size:
            raise UsageError(
                f"function {c.function!r} op {c.op_name!r}: shape {list(c.shape)} has {size} output "
                f"channels (axis {c.axis}), not a multiple of --group-size {config.group_size}"
            )
        group = 0 if config.group_size in (0, size) else config.group_size
        return ("palettize", c.axis, group)
    blocks = [0] * len(c.shape)
    blocks[c.axis] = 1
    if config.block_size:
        size = c.shape[c.in_axis]
        if size % config.block_size:
            raise UsageError(
                f"function {c.function!r} op {c.op_name!r}: shape {list(c.shape)} has {size} input "
                f"channels (axis {c.in_axis}), not a multiple of --block-size {config.block_size}"
            )
        blocks[c.in_axis] = config.block_size
    return ("quantize", c.axis, tuple(blocks))


# -- the work of one weight (runs in a worker process) ------------------------------------------

#: Elements of a weight read and compressed at once (2 MiB of float16): a weight is processed in
#: windows of whole groups (palettization) or whole blocks (quantization) along its first axis,
#: and each window's encoded blobs are written before the next is read.
WINDOW_ELEMENTS = 1 << 20


def _layout(shape: tuple[int, ...], dtype: str, grouping: tuple, config: _Config) -> tuple[str, list[tuple[str, str, list[int]]]]:
    """The constexpr op and its blobs ``(input key, blob dtype, shape)`` for a weight."""
    kind, axis, how = grouping
    if kind == "palettize":
        lut = [1] * (len(shape) + 2)
        lut[axis] = shape[axis] // how if how else 1
        lut[-2] = 1 << config.nbits
        return "constexpr_lut_to_dense", [("indices", f"uint{config.nbits}", list(shape)), ("lut", dtype, lut)]
    scale = [size // b if b else 1 for size, b in zip(shape, how)]
    return "constexpr_blockwise_shift_scale", [("data", config.dtype, list(shape)), ("scale", dtype, scale)]


def _window_rows(shape: tuple[int, ...], grouping: tuple) -> int:
    """Rows along axis 0 that can be compressed on their own: whole groups or blocks, in windows
    of about :data:`WINDOW_ELEMENTS` (all rows when the groups or blocks span axis 0)."""
    kind, axis, how = grouping
    rows = shape[0]
    if kind == "palettize":
        unit = (how or rows) if axis == 0 else rows
    else:
        unit = how[0] or rows
    row_len = 1
    for s in shape[1:]:
        row_len *= s
    return unit * max(1, WINDOW_ELEMENTS // max(1, unit * row_len))


class _Sink:
    """One output blob written window by window at its place in the scratch file (or only
    counted, or kept for an inline tensor). Sub-byte codes are packed in runs of 8 so every
    window's bytes start on a byte boundary; a remainder waits for the next window."""

    def __init__(self, fd: int | None, name: str, offset: int | None, inline: bool):
        self.fd, self.dtype, self.offset, self.inline = fd, BLOB_DTYPE_BY_NAME[name], offset, inline
        self.count = 0
        self.parts: list = []  # inline: the values; sub-byte: codes waiting to be packed

    def _write(self, raw: bytes) -> None:
        view = memoryview(raw)
        while view:
            n = os.pwrite(self.fd, view, self.offset)
            view, self.offset = view[n:], self.offset + n

    def add(self, values) -> None:
        import numpy as np

        values = values.reshape(-1)
        self.count += values.size
        if self.inline or self.fd is None:
            if self.inline:
                self.parts.append(values)
            return
        d = self.dtype
        if not d.sub_byte:
            self._write(values.astype(d.numpy).tobytes())
            return
        if self.parts:
            values = np.concatenate([*self.parts, values])
        whole = values.size - values.size % 8
        self.parts = [values[whole:]] if whole < values.size else []
        if whole:
            self._write(pack_codes(values[:whole], d.bits))

    def finish(self) -> tuple[bytes | None, int]:
        """(inline raw bytes or None, padding bits)."""
        import numpy as np

        padding = (-self.count * self.dtype.bits) % 8 if self.dtype.sub_byte else 0
        if self.inline:
            return _encode(self.dtype.name, np.concatenate(self.parts))[1], padding
        if self.parts and self.fd is not None:
            self._write(pack_codes(np.concatenate(self.parts), self.dtype.bits))
        return None, padding


def _encode(name: str, values) -> tuple[str, bytes, int]:
    d = BLOB_DTYPE_BY_NAME[name]
    if d.sub_byte:
        return name, pack_codes(values, d.bits), (-values.size * d.bits) % 8
    return name, values.astype(d.numpy).tobytes(), 0


def _compress_one(job: tuple) -> dict:
    """Compress one weight window by window: read the window's values from the source blob,
    compress them, write the encoded blobs at their reserved places in the scratch file
    ``out_path`` (None: only measure); return the error and what describes the blobs (only
    inline tensors' bytes travel back)."""
    import numpy as np

    root, path, identity, offset, dtype, shape, grouping, config, out_path, places = job
    np_type = np.dtype("<f2" if dtype == "float16" else "<f4")
    op_type, blobs = _layout(shape, dtype, grouping, config)
    kind, axis, how = grouping
    rows, row_len = shape[0], int(np.prod(shape[1:], dtype=np.int64))
    step = _window_rows(shape, grouping)
    fd = os.open(out_path, os.O_WRONLY | getattr(os, "O_CLOEXEC", 0)) if out_path else None
    try:
        sinks = [
            _Sink(fd, name, place, int(np.prod(bshape, dtype=np.int64)) < INLINE_LIMIT)
            for (key, name, bshape), place in zip(blobs, places)
        ]
        errors = ErrorSums()
        # opened as every package file is (contained, no symlink followed), and it must still be
        # the file the main process validated
        source = open_input(root, path, fault=lambda message: PackageError(f"{path}: {message}"))
        with os.fdopen(source, "rb") as f:
            st = os.fstat(f.fileno())
            if (st.st_dev, st.st_ino) != identity:
                raise PackageError(f"{path}: replaced by another file while compressing")
            for r0 in range(0, rows, step):
                n = min(step, rows - r0)
                f.seek(offset + r0 * row_len * np_type.itemsize)
                values = np.fromfile(f, dtype=np_type, count=n * row_len)
                values = values.astype(np_type.newbyteorder("="), copy=False).reshape((n, *shape[1:]))
                if not np.all(np.isfinite(values)):
                    return {"skip": "holds inf or NaN values"}
                if kind == "palettize":
                    first, second = palettize(values, config.nbits, config.mode, axis, how, errors)
                else:
                    first, second = quantize(values, config.dtype, list(how), errors)
                del values
                sinks[0].add(first)
                sinks[1].add(second)
        out = []
        for (key, name, bshape), sink in zip(blobs, sinks):
            raw, padding = sink.finish()
            d = BLOB_DTYPE_BY_NAME[name]
            size = 0 if sink.inline else (sink.count * d.bits + 7) // 8
            out.append({"key": key, "dtype": name, "shape": bshape, "raw": raw, "padding": padding,
                        "size": size, "inline": sink.inline})
    finally:
        if fd is not None:
            os.close(fd)
    return {"op_type": op_type, "blobs": out, "relative_rms": errors.relative_rms, "max_abs": errors.max_abs}


def _worker_init() -> None:
    """Parallelism is across weights: each worker's numeric libraries get one thread. The
    parent handles interruption: workers ignore Ctrl-C and end at once on SIGTERM (whatever
    handlers a forked worker inherited)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return
    threadpool_limits(1)


def _run_jobs(jobs: list[tuple], workers: int, sizes: list[int], progress: Progress | None):
    """Yield ``(job number, result)`` as jobs finish; at most ``2 * workers`` jobs are queued
    (each job is a description; a worker holds one window of one weight at a time)."""
    total, done = sum(sizes), 0
    if workers <= 1 or len(jobs) <= 1:
        for j, job in enumerate(jobs):
            result = _compress_one(job)
            done += sizes[j]
            if progress:
                progress("compressing", done, total)
            yield j, result
        return
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    # Workers are forks of this process (quick, and they need no importable main module) unless
    # scikit-learn is loaded here: a fork of a process whose OpenMP runtime has started threads
    # can hang in the child, so then they start from a clean process instead.
    methods = multiprocessing.get_all_start_methods()
    if "fork" in methods and "sklearn" not in sys.modules:
        method = "fork"
    else:
        method = "forkserver" if "forkserver" in methods else "spawn"
    context = multiprocessing.get_context(method)
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_worker_init)
    try:
        pending: dict = {}
        queue = iter(range(len(jobs)))
        for j in queue:
            pending[pool.submit(_compress_one, jobs[j])] = j
            if len(pending) >= 2 * workers:
                break
        while pending:
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                j = pending.pop(fut)
                result = fut.result()
                for nxt in queue:
                    pending[pool.submit(_compress_one, jobs[nxt])] = nxt
                    break
                done += sizes[j]
                if progress:
                    progress("compressing", done, total)
                yield j, result
    except BaseException:
        # Interrupted or failed: stop the workers now rather than wait for their weights.
        procs = list((getattr(pool, "_processes", None) or {}).values())
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.join(5)
        pool.shutdown(wait=False, cancel_futures=True)  # waiting could hang on the dead workers' queue
        raise
    pool.shutdown(wait=True)


# -- the rewrite -----------------------------------------------------------------------------------


def _tensor_value(value: pb.Value, blob: dict) -> None:
    """A tensor Value: bound to the scratch blob ``blob["record"]`` (the writer moves it into the
    output's weight.bin), or for a small tensor its values inline (float16 as raw bytes, float32
    as floats, as coremltools writes them)."""
    import numpy as np

    tt = value.type.tensorType
    tt.dataType = BLOB_DTYPE_BY_NAME[blob["dtype"]].proto
    tt.rank = len(blob["shape"])
    for s in blob["shape"]:
        tt.dimensions.add().constant.size = s
    if not blob["inline"]:
        value.blobFileValue.fileName = DEFAULT_WEIGHT_REF
        value.blobFileValue.offset = blob["record"]
    elif blob["dtype"] == "float32":
        value.immediateValue.tensor.floats.values.extend(np.frombuffer(blob["raw"], dtype="<f4").tolist())
    else:
        value.immediateValue.tensor.bytes.values = blob["raw"]


def _constexpr_op(old: pb.Operation, op_type: str, blobs: list[dict]) -> pb.Operation:
    new = pb.Operation(type=op_type)
    for blob in blobs:
        binding = new.inputs.add(key=blob["key"]).value.arguments.add()
        _tensor_value(binding.value, blob)
    new.outputs.add().CopyFrom(old.outputs[0])
    name = entry(old.attributes, "name")
    if name is not None:
        attr = new.attributes.add(key="name").value
        attr.CopyFrom(name)
        suffix = "_palettized" if op_type == "constexpr_lut_to_dense" else "_quantized"
        strings = attr.immediateValue.tensor.strings.values
        if strings:
            strings[0] = strings[0] + suffix
    return new


def _set_metadata(model: pb.Model, text: str) -> None:
    meta = model.description.metadata
    for e in meta.userDefined:
        if e.key == METADATA_KEY:
            e.value = text
            return
    meta.userDefined.add(key=METADATA_KEY, value=text)


# -- the command -----------------------------------------------------------------------------------


def compress(
    package: str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    palettize_bits: int | None = None,
    mode: str = "kmeans",
    group_size: int = 0,
    quantize_dtype: str | None = None,
    block_size: int = 0,
    min_elements: int = DEFAULT_MIN_ELEMENTS,
    skip: list[str] | tuple[str, ...] = (),
    dry_run: bool = False,
    workers: int | None = None,
    force: bool = False,
    sync: bool = True,
    progress: Progress | None = None,
) -> CompressReport:
    """Compress ``package``'s weights into the new package ``out``; see the module docstring.

    Exactly one of ``palettize_bits`` (1, 2, 3, 4, 6, 8; ``mode`` ``"kmeans"`` or ``"uniform"``;
    ``group_size`` output channels per LUT, 0 for one LUT per tensor) and ``quantize_dtype``
    (``"int8"`` or ``"int4"``, symmetric; ``block_size`` input-channel elements per scale, 0 for
    one scale per output channel). Consts with at most ``min_elements`` elements, or whose op
    name or output name matches a glob in ``skip``, stay. ``workers`` processes compress in
    parallel (default: all cores). With ``dry_run`` nothing is written and the report's
    ``bytes_after`` is an estimate. I/O: reads each compressed weight once (one window of it in
    memory per worker) plus what :func:`milsurgery.assemble.write_package` reads to coalesce and copy;
    the source is never modified and ``out`` appears complete or not at all.
    """
    start = time.perf_counter()
    config = _config(palettize_bits, mode, group_size, quantize_dtype, block_size)
    if min_elements is None or min_elements < 0:
        raise UsageError(f"--min-elements {min_elements}: must be 0 or more")
    if out is None and not dry_run:
        raise UsageError("compress needs an output path (-o) unless --dry-run")
    workers = workers or os.cpu_count() or 1
    with Package(package) as pkg:
        _check_opsets(pkg)
        candidates, skipped = _plan(pkg, min_elements, list(skip))
        groupings = [_grouping(c, config) for c in candidates]
        canon = group_identical([BlobSource(c.ref.file, c.ref.blob) for c in candidates])
        form_of: dict[tuple, int] = {}  # (canonical candidate, grouping) -> job number
        job_of: list[int] = []
        firsts: list[int] = []
        for i, (c, g) in enumerate(zip(candidates, groupings)):
            key = (canon[i], g)
            if key not in form_of:
                form_of[key] = len(firsts)
                firsts.append(i)
            job_of.append(form_of[key])
        layouts = [_layout(candidates[i].shape, candidates[i].dtype, groupings[i], config)[1] for i in firsts]
        report = CompressReport(
            output=None if dry_run else os.path.abspath(os.fspath(out)),
            dry_run=dry_run,
            configuration=config.describe(),
            skipped=skipped,
        )
        report.bytes_before = sum(bf.file_size for bf in pkg.blob_files.values())
        if not dry_run:
            dest = os.path.abspath(os.fspath(out))
            if os.path.realpath(dest) == os.path.realpath(pkg.path):
                raise UsageError(f"{dest}: the output cannot be the source")
            if os.path.lexists(dest) and not force:
                raise DestinationExistsError(f"{dest}: already exists (replace it with --force, in Python force=True)")
            if not os.path.isdir(os.path.dirname(dest)):
                raise WriteError(f"{dest}: parent directory {os.path.dirname(dest)} does not exist")
        scratch_dir = scratch = None
        try:
            results: list[dict | None] = [None] * len(firsts)
            if not dry_run:
                scratch_dir = tempfile.mkdtemp(
                    prefix=f".{os.path.basename(dest)}{PARTIAL_MARKER}{os.getpid()}-scratch-", dir=os.path.dirname(dest)
                )
                scratch = BlobWriter(os.path.join(scratch_dir, "compressed.bin"), sync=False)
            # Every blob's place in the scratch file is reserved now (sizes follow from shapes),
            # so workers write their windows there directly and send back only descriptions.
            records: list[list[int | None]] = []
            jobs = []
            for i, layout in zip(firsts, layouts):
                c = candidates[i]
                recs, places = [], []
                for _key, name, bshape in layout:
                    d = BLOB_DTYPE_BY_NAME[name]
                    count = 1
                    for s in bshape:
                        count *= s
                    if scratch is None or count < INLINE_LIMIT:
                        recs.append(None)
                        places.append(None)
                        continue
                    padding = (-count * d.bits) % 8 if d.sub_byte else 0
                    record, data = scratch.reserve(d, (count * d.bits + 7) // 8, padding)
                    recs.append(record)
                    places.append(data)
                records.append(recs)
                out_path = scratch.path if scratch is not None else None
                jobs.append((pkg.path, c.ref.file.path, c.ref.file.identity, c.ref.blob.data_offset, c.dtype, c.shape, groupings[i], config, out_path, places))
            if scratch is not None:
                scratch.close()  # the records are final; workers fill in the data
            sizes = [candidates[i].ref.blob.size for i in firsts]
            for j, result in _run_jobs(jobs, workers, sizes, progress):
                if "blobs" in result:
                    for b, record in zip(result["blobs"], records[j]):
                        b["record"] = record
                results[j] = result

            # Per distinct form: the report line; per candidate: replaced or skipped.
            replaced: list[tuple[_Candidate, dict]] = []
            users: dict[int, list[str]] = {}
            for i, c in enumerate(candidates):
                r = results[job_of[i]]
                if "skip" in r:
                    skipped.append(f"{c.function}/{c.op_name}: {r['skip']}")
                    continue
                replaced.append((c, r))
                users.setdefault(job_of[i], []).append(f"{c.function}/{c.op_name}")
            removed_blobs: dict[tuple[int, int], int] = {}
            for j, ops in users.items():
                c, r = candidates[firsts[j]], results[j]
                after = sum(b["size"] for b in r["blobs"])
                report.weights.append(
                    WeightReport(
                        ops=ops, shape=list(c.shape), dtype=c.dtype, op_type=r["op_type"], axis=c.axis,
                        bytes_before=c.ref.blob.size, bytes_after=after,
                        relative_rms=r["relative_rms"], max_abs_error=r["max_abs"],
                    )
                )
            for c, _ in replaced:
                removed_blobs[(id(c.ref.file), c.ref.blob.record_offset)] = c.ref.blob.size
            report.consts_replaced = len(replaced)
            report.weights_compressed = len(report.weights)

            if dry_run:
                added = sum(
                    RECORD_SIZE + align(b["size"], ALIGNMENT) for j in users for b in results[j]["blobs"] if not b["inline"]
                )
                gone = sum(RECORD_SIZE + align(size, ALIGNMENT) for size in removed_blobs.values())
                report.bytes_after = max(0, report.bytes_before - gone + added)
                report.seconds = time.perf_counter() - start
                return report

            by_place = {(c.function, c.block_path, c.index): (c, r) for c, r in replaced}
            replaced_vars = {(c.function, c.var) for c, _ in replaced}

            with BlobFile(os.path.join(scratch_dir, "compressed.bin")) as scratch_file:

                def rewrite(model: pb.Model, pairs: list) -> list:
                    kept = [
                        (ref, src) for ref, src in pairs
                        if not (ref.op_type == "const" and (ref.function, ref.op_name) in replaced_vars)
                    ]
                    functions = {e.key: e.value for e in model.mlProgram.functions}
                    for (fname, path, index), (c, r) in by_place.items():
                        block = _block_at(functions[fname], path)
                        old = block.operations[index]
                        old.CopyFrom(_constexpr_op(old, r["op_type"], r["blobs"]))
                        for e, b in zip(old.inputs, r["blobs"]):
                            if b["inline"]:
                                continue
                            value = e.value.arguments[0].value
                            ref = BlobRef(fname, old.type, c.var, f"inputs[{e.key}][0]", value)
                            kept.append((ref, ResolvedRef(ref, scratch_file, scratch_file.blobs[b["record"]])))
                    if replaced:
                        _set_metadata(model, config.describe() + f" min_elements={min_elements}")
                    return kept

                single = not pkg.model.description.functions
                picks = [Pick(pkg, f, f) for f in pkg.functions]
                report.write = write_package(
                    dest, picks, default=pkg.default_function, single=single,
                    spec_version=pkg.model.specificationVersion, force=force, sync=sync,
                    progress=progress, adjust=rewrite,
                )
            report.bytes_after = report.write.bytes_written
        finally:
            if scratch is not None and not scratch.closed:
                scratch.abort()
            if scratch_dir is not None:
                shutil.rmtree(scratch_dir, ignore_errors=True)
    report.seconds = time.perf_counter() - start
    return report
