"""Package surgery after a merge: shrink, extract, remove, rename, append.

Each returns a :class:`milsurgery.assemble.WriteReport`. All but ``append`` write a new package
through :func:`milsurgery.assemble.write_package` (atomic, sources untouched); ``shrink`` can also
replace its source in place, by building the new package beside it and exchanging the two
directories in one atomic step. ``append`` edits in place: new blobs are appended to weight.bin
and flushed, the header count is updated, then the spec is replaced with a rename, so a process
killed at any instant leaves the old package or the new one. Both in-place edits hold the
package's edit lock (:mod:`milsurgery.lock`) from before they read it until they are done, so
concurrent editors run one after another.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence

from ._proto import milsurgery_spec_pb2 as pb
from .assemble import Pick, Progress, WriteReport, _blob_refs_of, _set_io, write_package
from .atomic import exchange_paths, replace_file
from .blobfile import BlobWriter, restore_blob_file
from .coalesce import BlobSource, Stats, group_identical
from .errors import InvalidModelError, UsageError
from .formats import DEFAULT_WEIGHT_REF, MAIN_FUNCTION, MULTIFUNCTION_SPEC_VERSION
from .check import MODEL_LEVEL_IO, check_model
from .sources import SourceSpec, check_function_name, resolve_sources
from .compiled import open_model
from .lock import edit_lock
from .package import PARTIAL_MARKER, Package, remove_entry, remove_stale_partials

__all__ = ["shrink", "extract", "remove", "rename", "append", "parse_rename"]

#: Called with a step name after each durable step of ``append`` (tests inject crashes here).
_checkpoint: Callable[[str], None] = lambda step: None


def _is_single(pkg: Package) -> bool:
    return not pkg.model.description.functions


def _write_same_shape(pkg: Package, picks: list[Pick], out, default, force, progress, sync=True, adjust=None) -> WriteReport:
    """Write ``picks`` keeping the source's form: single-function stays single, same version."""
    single = _is_single(pkg) and len(picks) == 1 and picks[0].new_name == MAIN_FUNCTION
    version = pkg.model.specificationVersion if single else max(pkg.model.specificationVersion, MULTIFUNCTION_SPEC_VERSION)
    return write_package(
        out, picks, default=default, single=single, spec_version=version, force=force, sync=sync, progress=progress,
        adjust=adjust,
    )


def shrink(
    package: str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    in_place: bool = False,
    force: bool = False,
    sync: bool = True,
    progress: Progress | None = None,
    adopt: bool = False,
    anchor: str | None = None,
    min_cosine: float | None = None,
    max_mean_abs: float | None = None,
    max_abs: float | None = None,
    dry_run: bool = False,
    wait: bool = True,
    workers: int | None = None,
):
    """Coalesce identical blobs and drop unreferenced ones; write ``out`` or replace ``package``.

    The spec is otherwise unchanged (same functions, names, spec version). The report's
    ``bytes_written`` against the source weight.bin size gives the bytes recovered. ``sync=False``
    (new output only) skips flushing the output to disk. ``adopt``, the thresholds and ``workers`` work as in
    :func:`milsurgery.merge.merge`, between the package's functions (``dry_run`` returns the
    :class:`milsurgery.adopt.AdoptReport` and writes nothing). In place, ``package`` may be a
    symlink (the package it names is replaced) and the edit holds the package's edit lock;
    ``wait=False`` raises :class:`PackageLockedError` instead of waiting for another editor.
    """
    from .thresholds import adoption_options

    thresholds = adoption_options(adopt, anchor, min_cosine, max_mean_abs, max_abs, dry_run, workers)
    if thresholds is not None:
        from .adopt import plan_for_picks
    if dry_run:
        with Package(package) as pkg:
            return plan_for_picks([Pick(pkg, f, f) for f in pkg.functions], thresholds, anchor, True, workers).report
    if (out is None) == (not in_place):
        raise UsageError("shrink needs exactly one of an output path (-o OUT, in Python out) or --in-place (in_place=True)")
    if in_place and not sync:
        raise UsageError("--no-sync (sync=False) applies to a new output, not to --in-place (in_place=True): an in-place edit is always flushed")
    if not in_place:
        with Package(package) as pkg:
            picks = [Pick(pkg, f, f) for f in pkg.functions]
            plan = plan_for_picks(picks, thresholds, anchor, workers=workers) if thresholds is not None else None
            adjust = plan.apply if plan is not None else None
            report = _write_same_shape(pkg, picks, out, pkg.default_function, force, progress, sync, adjust)
            if plan is not None:
                report.adoption = plan.report.to_dict()
            return report
    # A symlink to a package: the real package is edited (exchanging the symlink would leave it
    # as it was). The lock keeps other in-place editors out until the exchange is done.
    with edit_lock(package, wait=wait) as real, Package(real) as pkg:
        picks = [Pick(pkg, f, f) for f in pkg.functions]
        plan = plan_for_picks(picks, thresholds, anchor, workers=workers) if thresholds is not None else None
        adjust = plan.apply if plan is not None else None
        parent, name = os.path.split(pkg.path)
        remove_stale_partials(pkg.path)
        staged = os.path.join(parent, f".{name}{PARTIAL_MARKER}{os.getpid()}-inplace")
        remove_entry(staged)
        try:
            report = _write_same_shape(pkg, picks, staged, pkg.default_function, False, progress, adjust=adjust)
            if plan is not None:
                report.adoption = plan.report.to_dict()
            exchange_paths(staged, pkg.path)  # the one step that switches old for new
        finally:
            remove_entry(staged)
        report.output = pkg.path
        return report


def extract(
    package: str | os.PathLike,
    functions: Sequence[str],
    out: str | os.PathLike,
    *,
    single: bool = False,
    default: str | None = None,
    force: bool = False,
    sync: bool = True,
    progress: Progress | None = None,
) -> WriteReport:
    """A package with only ``functions`` (``FUNC`` or ``FUNC=NEW`` each) and the blobs they use.

    With ``single`` (one function) the result is an ordinary single-function model: I/O at model
    level, function ``main``, the lowest spec version its opset and states allow.
    """
    if not functions:
        raise UsageError("extract needs at least one function")
    with open_model(package) as pkg:
        picks = resolve_sources(
            [SourceSpec(pkg.path, *_split_rename(f)) for f in functions], {os.path.realpath(pkg.path): pkg}
        )
        if single:
            return write_package(out, picks, single=True, force=force, sync=sync, progress=progress)
        names = [p.new_name for p in picks]
        if default is None:
            src_default = next((p.new_name for p in picks if p.name == pkg.default_function), None)
            default = src_default or names[0]
        return write_package(
            out, picks, default=default, spec_version=max(pkg.model.specificationVersion, MULTIFUNCTION_SPEC_VERSION),
            force=force, sync=sync, progress=progress,
        )


def _split_rename(text: str) -> tuple[str, str | None]:
    old, eq, new = text.partition("=")
    if not old or (eq and not new):
        raise UsageError(f"{text!r}: expected FUNC or FUNC=NEW")
    return old, (new if eq else None)


def parse_rename(items: Sequence[str] | Mapping[str, str]) -> dict[str, str]:
    """``["OLD=NEW", ...]`` (or a mapping) as a dict, refusing malformed or repeated entries."""
    if isinstance(items, Mapping):
        for new in items.values():
            check_function_name(new)
        return dict(items)
    mapping: dict[str, str] = {}
    for item in items:
        old, new = _split_rename(item)
        if new is None:
            raise UsageError(f"{item!r}: expected OLD=NEW")
        if old in mapping:
            raise UsageError(f"function {old!r} is renamed twice")
        check_function_name(new)
        mapping[old] = new
    return mapping


def remove(
    package: str | os.PathLike,
    functions: Sequence[str],
    out: str | os.PathLike,
    *,
    default: str | None = None,
    force: bool = False,
    sync: bool = True,
    progress: Progress | None = None,
) -> WriteReport:
    """A package without ``functions``; blobs only they referenced are dropped.

    Removing the default function requires naming a new ``default``.
    """
    with Package(package) as pkg:
        for f in functions:
            if f not in pkg.functions:
                raise UsageError(f"{pkg.path}: no function {f!r} (it has {pkg.functions})")
        keep = [f for f in pkg.functions if f not in functions]
        if not keep:
            raise UsageError(f"{pkg.path}: removing {list(functions)} would leave no function")
        if default is None:
            if pkg.default_function in functions:
                raise UsageError(
                    f"{pkg.path}: {pkg.default_function!r} is the default function; name the new "
                    f"default with --default (in Python default=; one of {keep})"
                )
            default = pkg.default_function
        picks = [Pick(pkg, f, f) for f in keep]
        version = max(pkg.model.specificationVersion, MULTIFUNCTION_SPEC_VERSION)
        return write_package(out, picks, default=default, spec_version=version, force=force, sync=sync, progress=progress)


def rename(
    package: str | os.PathLike,
    mapping: Sequence[str] | Mapping[str, str],
    out: str | os.PathLike,
    *,
    force: bool = False,
    sync: bool = True,
    progress: Progress | None = None,
) -> WriteReport:
    """A package with functions renamed (``OLD=NEW``); ``defaultFunctionName`` follows."""
    mapping = parse_rename(mapping)
    with Package(package) as pkg:
        for old in mapping:
            if old not in pkg.functions:
                raise UsageError(f"{pkg.path}: no function {old!r} (it has {pkg.functions})")
        picks = [Pick(pkg, f, mapping.get(f, f)) for f in pkg.functions]
        default = mapping.get(pkg.default_function, pkg.default_function)
        version = max(pkg.model.specificationVersion, MULTIFUNCTION_SPEC_VERSION)
        return write_package(out, picks, default=default, spec_version=version, force=force, sync=sync, progress=progress)


def append(
    package: str | os.PathLike,
    sources: Sequence[str | os.PathLike | SourceSpec],
    *,
    progress: Progress | None = None,
    wait: bool = True,
) -> WriteReport:
    """Add functions from ``sources`` (``SRC[:FUNC[=NEW]]``) to ``package`` in place.

    The edit holds the package's edit lock from before it is read (another editor waits for it,
    or with ``wait=False`` raises :class:`PackageLockedError`); a symlink names the real package.

    Only blobs whose content is not already in the package's weight.bin are appended. Order of
    durable steps: blob data appended and flushed; header count updated and flushed; new spec
    written beside the old one, flushed, renamed over it. Killed at any instant, the package
    opens as the old version (possibly with unreferenced bytes after its blobs, which ``shrink``
    removes) or as the new one.
    """
    start = time.perf_counter()
    opened: dict[str, Package] = {}
    # Locked before anything is read: a second editor waits, then appends to what this one wrote.
    with edit_lock(package, wait=wait) as real, Package(real) as pkg:
        opened[os.path.realpath(pkg.path)] = pkg
        try:
            return _append(pkg, sources, opened, progress, start)
        finally:
            for p in opened.values():
                if p is not pkg:
                    p.close()


def _append(pkg: Package, sources, opened, progress, start) -> WriteReport:
    picks = resolve_sources(sources, opened)
    if not picks:
        raise UsageError("append needs at least one source function")
    names = list(pkg.functions)
    for p in picks:
        if p.new_name in names:
            raise UsageError(
                f"{pkg.path}: already has a function {p.new_name!r} (from {p.source.path}:{p.name}); "
                "rename it with SRC:FUNC=NEW"
            )
        names.append(p.new_name)
    target = pkg.blob_files.get(DEFAULT_WEIGHT_REF)
    if target is None:
        raise UsageError(f"{pkg.path}: has no {DEFAULT_WEIGHT_REF} to append to")

    model = pb.Model()
    model.CopyFrom(pkg.model)
    desc = model.description
    if not desc.functions:  # single-function model becomes multifunction: main keeps its I/O
        main = pkg.descriptions[MAIN_FUNCTION]
        desc.functions.append(main)
        desc.defaultFunctionName = MAIN_FUNCTION
    # A multi-function model has no model-level I/O (Apple's validator refuses it): main's moved
    # into its FunctionDescription above, and what an earlier milsurgery left there goes.
    for name in MODEL_LEVEL_IO:
        desc.ClearField(name)
    versions = [model.specificationVersion, MULTIFUNCTION_SPEC_VERSION]
    pairs = []
    for p in picks:
        entry = model.mlProgram.functions.add(key=p.new_name)
        entry.value.CopyFrom(p.source.function(p.name))
        fdesc = pb.FunctionDescription(name=p.new_name)
        _set_io(fdesc, p.source.descriptions[p.name])
        desc.functions.append(fdesc)
        versions.append(p.source.model.specificationVersion)
        new_refs = _blob_refs_of(p.new_name, entry.value)
        pairs.extend(zip(new_refs, p.source.function_refs(p.name)))
    model.specificationVersion = max(versions)

    existing = [BlobSource(target, b) for b in target]
    incoming = [BlobSource(r.file, r.blob) for _, r in pairs]
    stats = Stats()
    canonical = group_identical(existing + incoming, stats)
    n_old = len(existing)
    offsets = {i: s.blob.record_offset for i, s in enumerate(existing)}
    report = WriteReport(
        output=pkg.path, functions=names, default_function=desc.defaultFunctionName,
        spec_version=model.specificationVersion, references=len(pairs), warnings=[],
    )
    appended = 0
    total = sum(s.blob.size for s in incoming)
    with BlobWriter(target.path, append=True) as writer:  # on error: cut back to the old bytes
        for i, src in enumerate(incoming, start=n_old):
            if canonical[i] == i:
                offsets[i] = writer.copy_from(src.file, src.blob)
                appended += src.blob.size
                report.blobs_written += 1
                _checkpoint("blob")
                if progress:
                    progress("copying", appended, total)
        _checkpoint("data")
    _checkpoint("count")
    for (ref, _), c in zip(pairs, canonical[n_old:]):
        ref.value.blobFileValue.fileName = DEFAULT_WEIGHT_REF
        ref.value.blobFileValue.offset = offsets[c]
    try:
        violations = check_model(model)
        if violations:
            raise InvalidModelError(pkg.path, violations)
        replace_file(pkg.spec_path, model.SerializeToString())
    except Exception:
        # The old spec is still in place (also when the new one breaks Core ML's rules): take the
        # appended blobs back out of weight.bin so the package is byte-identical to before.
        restore_blob_file(target.path, target.count, target.file_size)
        raise
    _checkpoint("spec")
    first = {}
    for i, s in enumerate(incoming, start=n_old):
        first.setdefault(s.key, i)
    report.source_blobs = len(first)
    report.blobs_coalesced = sum(1 for i in first.values() if canonical[i] != i)
    report.bytes_coalesced = sum(incoming[i - n_old].blob.size for i in first.values() if canonical[i] != i)
    report.bytes_read = stats.bytes_read + appended
    report.bytes_written = appended
    report.weight_file_bytes = os.path.getsize(target.path)
    report.seconds = time.perf_counter() - start
    return report
