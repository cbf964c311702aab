"""Measuring weight pairs on several processes (near-duplicate adoption's costly step).

:func:`measure_pairs` computes :func:`milsurgery.measure.compare_weights` for many (anchor,
target) pairs. Pairs sharing an anchor form one task (the anchor's norm is computed once per
task); tasks go, largest first, to whichever process is free: this one and up to ``workers - 1``
helper processes (``python -m milsurgery.parallel``). Threads would not do: numpy's operations
on the windows are short, and two threads spend their time waiting for the interpreter lock.

A helper reads the same open files as this process (their descriptors are passed to it, so a
file renamed or replaced meanwhile is not read instead) and is told each weight's ops and blob
references; it sends back metrics. A pair's metrics are the same whichever process computes
them (the same code, the same order of sums). A helper gets tasks only once it is ready, so
this process never waits for one to start. Anything that goes wrong in a helper (it cannot
start, it dies, it answers garbage, a task raises) makes this process compute that task itself:
an error is then raised here, as without helpers. Helpers are killed once the pairs are
measured, or when this process exits; one whose parent is gone ends when its input closes.
"""

from __future__ import annotations

import atexit
import os
import pickle
import struct
import subprocess
import sys
import threading
from dataclasses import dataclass

from ._proto import milsurgery_spec_pb2 as pb
from .package import ResolvedRef
from .spec import BlobRef
from .weights import Weight

__all__ = ["measure_pairs", "helpers_for", "Helpers", "default_workers", "MIN_PARALLEL_BYTES"]

#: Blob bytes the weights to measure must hold, at least, before helper processes are started:
#: a helper takes about 0.3 s of another CPU to start (numpy and this package imported), CPU
#: the writer's copy also wants. Measured with 2 CPUs (adopt_bench, whole command, one process
#: against two): even at 192-216 MiB of inputs, 0.26 s faster at 289 MiB, 0.1 s slower at 72 MiB.
MIN_PARALLEL_BYTES = 128 << 20
#: The command that starts a helper (a list: argv).
WORKER_COMMAND = [sys.executable, "-m", "milsurgery.parallel"]

_LENGTH = struct.Struct("<Q")
_MAX_MESSAGE = 1 << 30  # far above any task or answer: a longer one means the stream is out of step
#: glibc's malloc settings for a helper (unless the environment sets them): a fresh process
#: gives the windows' temporaries (0.5-1 MiB each) back to the system after every window and
#: faults them in again, which made a helper measure a pair 3x slower than the parent (int8,
#: 1536 MiB: 0.17 s against 0.06 s a 4096 x 2048 weight). Other allocators ignore them.
_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(256 << 20)}
_live: set[subprocess.Popen] = set()
_live_lock = threading.Lock()


#: Most processes :func:`default_workers` gives (each helper holds numpy and its windows: ~40 MiB).
MAX_DEFAULT_WORKERS = 8


def default_workers() -> int:
    """Processes to measure with: one per CPU this process may run on, at most
    :data:`MAX_DEFAULT_WORKERS`."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(MAX_DEFAULT_WORKERS, cpus))


# -- what a helper is told about a weight -------------------------------------------------------


@dataclass
class _PackageName:
    """What errors about a weight name: its package's paths."""

    path: str
    spec_path: str


def _describe(w: Weight) -> tuple:
    refs = [(r.ref.op_name, r.ref.location, r.file.fileno(), r.file.path, r.blob) for r in w.refs]
    return (w.package.path, w.package.spec_path, w.function, w.name, [op.SerializeToString() for op in w.ops],
            refs, tuple(w.shape), w.dtype)


class _File:
    """A blob file a helper reads through a descriptor inherited from the parent."""

    def __init__(self, fd: int, path: str):
        self._fd, self.path = fd, path

    def fileno(self) -> int:
        return self._fd


def _rebuild(desc: tuple, files: dict[int, _File]) -> Weight:
    """The weight :func:`_describe` described, evaluable (:mod:`milsurgery.dequant`)."""
    from .dequant import _Graph

    path, spec_path, function, name, op_bytes, refs, shape, dtype = desc
    ops = []
    for data in op_bytes:
        op = pb.Operation()
        op.ParseFromString(data)
        ops.append(op)
    graph = _Graph.__new__(_Graph)
    graph.pkg, graph.function, graph.block = _PackageName(path, spec_path), function, None
    graph.producers = {out.name: (op, i) for op in ops for i, out in enumerate(op.outputs)}
    graph.refs = {}
    resolved = []
    for op_name, location, fd, file_path, blob in refs:
        f = files.get(fd)
        if f is None:
            f = files[fd] = _File(fd, file_path)
        r = ResolvedRef(BlobRef(function, "", op_name, location, pb.Value()), f, blob)
        graph.refs.setdefault(op_name, []).append(r)
        resolved.append(r)
    return Weight(graph.pkg, function, name, ops, resolved, shape, dtype, graph)


# -- the pipe protocol: length-prefixed pickles -------------------------------------------------


def _send(stream, message) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_LENGTH.pack(len(data)) + data)
    stream.flush()


def _receive(stream):
    head = stream.read(_LENGTH.size)
    if len(head) < _LENGTH.size:
        raise EOFError
    (n,) = _LENGTH.unpack(head)
    if n > _MAX_MESSAGE:
        raise ValueError(f"message of {n} bytes")
    data = stream.read(n)
    if len(data) < n:
        raise EOFError
    return pickle.loads(data)


def _worker_main() -> int:
    """A helper's loop: read a task (an anchor and its targets), send back their metrics (or
    ``None`` if the task raised: the parent then computes it itself)."""
    from .measure import compare_weights

    source, sink = sys.stdin.buffer, sys.stdout.buffer
    files: dict[int, _File] = {}
    try:
        _send(sink, "ready")  # imports done: tasks sent from now on start at once
        while True:
            try:
                anchor_desc, target_descs = _receive(source)
            except EOFError:
                return 0
            try:
                anchor = _rebuild(anchor_desc, files)
                norms: dict = {}
                result = [compare_weights(anchor, _rebuild(t, files), norms) for t in target_descs]
            except Exception:
                result = None
            _send(sink, result)
    except (KeyboardInterrupt, BrokenPipeError):
        return 0


# -- the parent's side --------------------------------------------------------------------------


def _kill_live() -> None:
    with _live_lock:
        procs = list(_live)
    for p in procs:
        _stop(p)


def _start(fds: list[int]) -> subprocess.Popen | None:
    # The helper imports this very copy of the package (the same code gives the same metrics),
    # wherever this process found it.
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(_MALLOC_ENV, **os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)
    try:
        p = subprocess.Popen(WORKER_COMMAND, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             pass_fds=fds, close_fds=True, env=env)
    except (OSError, ValueError, TypeError):  # no usable interpreter; descriptors cannot be passed
        return None
    with _live_lock:
        _live.add(p)
    return p


def _stop(p: subprocess.Popen) -> None:
    """End a helper: killed (it holds nothing: it only reads and computes), its pipes closed."""
    for step in (p.kill, p.stdin.close, p.stdout.close):
        try:
            step()
        except (OSError, ValueError):
            pass
    p.wait()
    with _live_lock:
        _live.discard(p)


atexit.register(_kill_live)


class Helpers:
    """Helper processes, started early (their start-up overlaps this process's own work) and
    used by :func:`measure_pairs`. ``fds``: descriptors of every blob file the pairs will read.
    Close with :meth:`close` (or use as a context manager)."""

    def __init__(self, count: int, fds: list[int]):
        self.fds = sorted(set(fds))
        self.procs = [p for p in (_start(self.fds) for _ in range(max(0, count))) if p is not None]
        self.used = False  # serve one measure_pairs call: its threads own the pipes

    def close(self) -> None:
        """Stop the helpers (killed: one may still be starting, and none holds anything)."""
        procs, self.procs = self.procs, []
        for p in procs:
            _stop(p)

    def __enter__(self) -> Helpers:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()


def helpers_for(weights: list[Weight], workers: int | None = None, min_parallel_bytes: int | None = None) -> Helpers:
    """Helpers for measuring ``weights`` (their pairs): ``workers - 1`` of them (``workers`` default
    :func:`default_workers`), none when the weights hold fewer than ``min_parallel_bytes`` (default
    :data:`MIN_PARALLEL_BYTES`) of blobs."""
    workers = default_workers() if workers is None else max(1, int(workers))
    least = MIN_PARALLEL_BYTES if min_parallel_bytes is None else min_parallel_bytes
    if workers <= 1 or sum(w.blob_bytes for w in weights) < least:
        return Helpers(0, [])
    return Helpers(workers - 1, [r.file.fileno() for w in weights for r in w.refs])


def measure_pairs(pairs: list[tuple[Weight, Weight]], norms: dict | None = None, helpers: Helpers | None = None) -> list:
    """:func:`milsurgery.measure.compare_weights` of every (anchor, target) pair, in order, on
    this process and ``helpers`` (whose ``fds`` must cover the pairs' blob files). ``norms`` is
    this process's cache of anchor norms (:func:`compare_weights`)."""
    from .measure import compare_weights

    norms = {} if norms is None else norms
    groups: dict[int, list[int]] = {}
    for k, (a, _) in enumerate(pairs):
        groups.setdefault(id(a), []).append(k)
    tasks = sorted(groups.values(), key=lambda ks: -sum(pairs[ks[0]][0].size + pairs[k][1].size for k in ks))
    results: list = [None] * len(pairs)
    procs = []
    if helpers is not None and not helpers.used:
        helpers.used = True
        procs = list(helpers.procs)
    if procs and not {r.file.fileno() for a, t in pairs for w in (a, t) for r in w.refs} <= set(helpers.fds):
        procs = []  # a file the helpers cannot read

    def local(ks: list[int]) -> None:
        for k in ks:
            a, t = pairs[k]
            results[k] = compare_weights(a, t, norms)

    if not procs or len(tasks) < 2:
        for ks in tasks:
            local(ks)
        return results

    cond = threading.Condition()
    queue = iter(tasks)
    undone: list[list[int]] = []  # tasks a helper failed: computed here afterwards
    state = {"lent": 0, "stop": False}  # tasks a helper holds; no more tasks to hand out

    def take(remote: bool) -> list[int] | None:
        with cond:
            ks = None if state["stop"] else next(queue, None)
            if ks is not None and remote:
                state["lent"] += 1
            return ks

    def settle(ks: list[int], got) -> None:
        with cond:
            if got is None or len(got) != len(ks):
                undone.append(ks)
            else:
                for k, m in zip(ks, got):
                    results[k] = m
            state["lent"] -= 1
            cond.notify_all()

    def serve(p: subprocess.Popen) -> None:
        # Tasks go to a helper only once it is ready: one still starting holds none, so this
        # process never waits for a helper's start-up (it may take every task itself).
        ks = None
        try:
            if _receive(p.stdout) != "ready":
                raise ValueError("helper out of step")
            while (ks := take(remote=True)) is not None:
                _send(p.stdin, (_describe(pairs[ks[0]][0]), [_describe(pairs[k][1]) for k in ks]))
                got = _receive(p.stdout)
                settle(ks, got)
                ks = None
        except Exception:  # whatever went wrong, the task is done here and the helper not used again
            if ks is not None:
                settle(ks, None)
            _stop(p)

    for p in procs:
        threading.Thread(target=serve, args=(p,), name="milsurgery-measure", daemon=True).start()
    try:
        while (ks := take(remote=False)) is not None:
            local(ks)
    except BaseException:
        with cond:
            state["stop"] = True
        raise
    with cond:
        cond.wait_for(lambda: state["lent"] == 0)
    for ks in sorted(undone):
        local(ks)
    return results


if __name__ == "__main__":
    sys.exit(_worker_main())
