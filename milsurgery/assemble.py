"""The pipeline every package-producing command shares: pick functions, coalesce, write.

``merge``, ``shrink``, ``extract``, ``remove`` and ``rename`` differ only in which functions they
pick and what they call them. :func:`write_package` takes those picks and:

1. builds the output spec: the first source's spec (so unknown fields, metadata and program
   attributes survive) with a program holding exactly the picked functions, each a copy of its
   source's Function message, and a FunctionDescription per function;
2. pairs every blob reference of the output with the source blob it came from;
3. groups the referenced source blobs by identical content (:mod:`milsurgery.coalesce`) and
4. copies one blob per content, file to file, into the output's single ``weight.bin`` and points
   every reference at it; the comparisons of step 3 run in a second thread while step 4 copies
   the blobs already known to be first of their content;
5. writes spec and manifest, checks the staged package against Core ML's spec rules
   (:mod:`milsurgery.check`) and renames it into place.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from ._proto import milsurgery_spec_pb2 as pb
from .blobfile import BlobWriter
from .check import check_staged
from .coalesce import BlobSource, ConcurrentGrouping, Stats, blobs_equal
from .errors import UsageError
from .formats import (
    DEFAULT_WEIGHT_REF,
    MAIN_FUNCTION,
    MULTIFUNCTION_SPEC_VERSION,
    SPEC_FOR_OPSET,
    WEIGHT_FILE_NAME,
)
from .package import Package, ResolvedRef, StagedPackage
from .spec import BlobRef, blanked_value, iter_function_values, values_in_value

__all__ = ["Pick", "WriteReport", "build_model", "write_package", "values_equal", "distinct_sources", "Progress"]

#: progress(phase, done, total): phase names the work ("copying"); done and total are bytes.
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class Pick:
    """One function of the output: ``source``'s function ``name``, written as ``new_name``."""

    source: Package
    name: str
    new_name: str

    def __post_init__(self) -> None:
        # A name from a command line may hold undecodable bytes (as lone surrogates), which a
        # protobuf string cannot store: refuse it here, where every writer's names pass.
        try:
            self.new_name.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise UsageError(
                f"function name {self.new_name!r} (for {self.name!r} of {self.source.path}) is not valid "
                f"UTF-8 at character {exc.start}"
            ) from None


@dataclass
class WriteReport:
    """What a command wrote and what it cost."""

    output: str
    functions: list[str]
    default_function: str
    spec_version: int
    references: int = 0  # blob references in the output spec
    source_blobs: int = 0  # distinct source blobs referenced
    blobs_written: int = 0  # records in the output weight.bin
    blobs_coalesced: int = 0  # source blobs folded into an identical one
    bytes_coalesced: int = 0  # data bytes not written thanks to coalescing
    bytes_read: int = 0  # weight bytes read to hash, compare and copy
    bytes_written: int = 0  # size of the output weight.bin (append: bytes appended to it)
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    weight_file_bytes: int = 0  # size of the output weight.bin when the command ends
    verified: dict | None = None  # merge --verify: the verification report (VerifyReport.to_dict)
    adoption: dict | None = None  # near-duplicate adoption's report (AdoptReport.to_dict), if asked

    def to_dict(self) -> dict:
        return asdict(self)


def distinct_sources(picks: list[Pick]) -> list[Package]:
    """The packages ``picks`` come from, each once, in order of first use."""
    out: list[Package] = []
    for p in picks:
        if all(p.source is not s for s in out):
            out.append(p.source)
    return out


def _function_spec_version(pick: Pick) -> int:
    """The lowest spec version that can hold ``pick``'s function as a single-function model."""
    opset_names = [e.key for e in pick.source.function(pick.name).block_specializations]
    version = max((SPEC_FOR_OPSET.get(o, pick.source.model.specificationVersion) for o in opset_names), default=0)
    if pick.source.descriptions[pick.name].state:
        version = max(version, MULTIFUNCTION_SPEC_VERSION)
    return version


def _merge_metadata(out: pb.Model, sources: list[Package], warnings: list[str]) -> None:
    meta = out.description.metadata
    keys = {e.key: e.value for e in meta.userDefined}
    for pkg in sources[1:]:
        other = pkg.model.description.metadata
        for name in ("shortDescription", "versionString", "author", "license"):
            mine, theirs = getattr(meta, name), getattr(other, name)
            if not mine and theirs:
                setattr(meta, name, theirs)
            elif theirs and theirs != mine:
                warnings.append(f"metadata {name}: kept {mine!r} from the first source, dropped {theirs!r} from {pkg.path}")
        for e in other.userDefined:
            if e.key not in keys:
                meta.userDefined.add(key=e.key, value=e.value)
                keys[e.key] = e.value
            elif keys[e.key] != e.value:
                warnings.append(
                    f"metadata userDefined[{e.key!r}]: kept {keys[e.key]!r} from the first source, "
                    f"dropped {e.value!r} from {pkg.path}"
                )


def values_equal(a: Package, va: pb.Value, b: Package, vb: pb.Value, where: str) -> bool:
    """Whether two Values are equal once each blob reference is replaced by the blob's bytes."""
    if blanked_value(va) != blanked_value(vb):
        return False
    pairs = zip(a.value_refs(va, where), b.value_refs(vb, where))
    return all(blobs_equal(BlobSource(ra.file, ra.blob), BlobSource(rb.file, rb.blob)) for ra, rb in pairs)


def _blob_refs_of(name: str, function: pb.Function) -> list[BlobRef]:
    """The blob references of one function of a spec, in the order ``iter_blob_refs`` gives them
    (walking only that function: walking the program per function would be quadratic)."""
    return [r for r in iter_function_values(name, function) if r.value.WhichOneof("value") == "blobFileValue"]


def _set_io(target, desc: pb.FunctionDescription) -> None:
    """Copy a function's I/O onto a ModelDescription or FunctionDescription."""
    for name in ("input", "output", "state"):
        getattr(target, name).extend(getattr(desc, name))
    target.predictedFeatureName = desc.predictedFeatureName
    target.predictedProbabilitiesName = desc.predictedProbabilitiesName


def build_model(
    picks: list[Pick],
    *,
    default: str | None = None,
    single: bool = False,
    spec_version: int | None = None,
    warnings: list[str] | None = None,
) -> tuple[pb.Model, list[tuple[BlobRef, ResolvedRef]]]:
    """The output spec for ``picks`` and, for each of its blob references, the source blob.

    The returned references still hold the sources' file names and offsets; the caller rewrites
    them. ``single`` produces an ordinary single-function model (one pick, named ``main``) with
    the lowest spec version its opset and states allow. ``spec_version`` overrides the version.
    """
    warnings = warnings if warnings is not None else []
    if not picks:
        raise UsageError("no functions selected")
    names = [p.new_name for p in picks]
    first_of: dict[str, Pick] = {}
    for p in picks:
        first = first_of.setdefault(p.new_name, p)
        if first is not p:
            raise UsageError(
                f"two functions would be named {p.new_name!r}: {first.name!r} from {first.source.path} "
                f"and {p.name!r} from {p.source.path}"
            )
    if single and len(picks) != 1:
        raise UsageError(f"a single-function model holds one function, {len(picks)} were selected")
    default = default if default is not None else picks[0].new_name
    if default not in names:
        raise UsageError(f"default function {default!r} is not among the output functions {names}")

    sources = distinct_sources(picks)
    base = sources[0]
    out = pb.Model()
    out.CopyFrom(base.model)
    desc = out.description
    for name in ("input", "output", "state", "functions"):
        desc.ClearField(name)
    if not single:
        desc.ClearField("trainingInput")  # a multi-function model has no model-level I/O at all
    desc.ClearField("predictedFeatureName")
    desc.ClearField("predictedProbabilitiesName")
    desc.ClearField("defaultFunctionName")
    out.mlProgram.ClearField("functions")
    _merge_metadata(out, sources, warnings)
    for pkg in sources:
        for rel in pkg.other_items():
            warnings.append(
                f"{pkg.path}: manifest item {rel!r} is not carried over (the output holds the spec "
                "and the weights only)"
            )

    pairs: list[tuple[BlobRef, ResolvedRef]] = []
    # Program attributes: the first source's entries as they are, plus keys only later sources
    # have; a later source's different value of a key already kept (blob bytes compared, not
    # where they are stored) is reported. ``attr_sources`` follows the output's entries one to
    # one, so each blob reference in them is paired with the very Value it was copied from.
    attr_sources = [(base, e.value) for e in base.model.mlProgram.attributes]
    kept: dict[str, tuple[Package, pb.Value]] = {}
    for e in base.model.mlProgram.attributes:
        kept.setdefault(e.key, (base, e.value))
    for pkg in sources[1:]:
        for e in pkg.model.mlProgram.attributes:
            if e.key not in kept:
                out.mlProgram.attributes.add(key=e.key).value.CopyFrom(e.value)
                attr_sources.append((pkg, e.value))
                kept[e.key] = (pkg, e.value)
            else:
                first, value = kept[e.key]
                if not values_equal(first, value, pkg, e.value, f"program.attributes[{e.key}]"):
                    warnings.append(
                        f"program attribute {e.key!r}: kept the value of {first.path}, dropped the "
                        f"different value of {pkg.path}"
                    )
        doc = pkg.model.mlProgram.docString
        if not out.mlProgram.docString:
            out.mlProgram.docString = doc
        elif doc and doc != out.mlProgram.docString:
            warnings.append(f"program docString: kept the first source's, dropped the different one of {pkg.path}")
    for entry, (pkg, src_value) in zip(out.mlProgram.attributes, attr_sources):
        where = f"program.attributes[{entry.key}]"
        walked = zip(values_in_value(entry.value, where), values_in_value(src_value, where))
        for (loc, new), (_, old) in walked:
            if new.WhichOneof("value") == "blobFileValue":
                pairs.append((BlobRef("", "", "", loc, new), pkg.resolve(BlobRef("", "", "", loc, old))))

    versions = []
    for p in picks:
        entry = out.mlProgram.functions.add(key=MAIN_FUNCTION if single else p.new_name)
        entry.value.CopyFrom(p.source.function(p.name))
        new_refs = _blob_refs_of(entry.key, entry.value)
        src_refs = p.source.function_refs(p.name)
        assert len(new_refs) == len(src_refs), "a copied function must walk like its source"
        pairs.extend(zip(new_refs, src_refs))
        fdesc = pb.FunctionDescription(name=p.new_name)
        _set_io(fdesc, p.source.descriptions[p.name])
        if not single:
            desc.functions.append(fdesc)
        versions.append(p.source.model.specificationVersion)

    if single:
        _set_io(desc, p.source.descriptions[p.name])
        out.specificationVersion = _function_spec_version(picks[0])
    else:
        # Model-level input, output, state, predicted names and training input stay empty: Apple's
        # validator refuses them in a multi-function model (see milsurgery.check), and
        # coremltools' save_multifunction leaves them empty too.
        desc.defaultFunctionName = default
        out.specificationVersion = max([MULTIFUNCTION_SPEC_VERSION, *versions])
    if spec_version is not None:
        out.specificationVersion = spec_version
    return out, pairs


def _distinct_bytes(sources: list[BlobSource]) -> int:
    """Bytes of the distinct blobs among ``sources`` (what copying them all reads at most)."""
    return sum(s.blob.size for s in {s.key: s for s in sources}.values())


def _check_staged(tmp: str, dest: str, check: Callable[[str], None] | None) -> None:
    """Core ML's rules on every package written (an invalid one is an internal error, never
    published), then the caller's own check."""
    check_staged(tmp, dest)
    if check is not None:
        check(tmp)


def write_package(
    dest: str | os.PathLike,
    picks: list[Pick],
    *,
    default: str | None = None,
    single: bool = False,
    spec_version: int | None = None,
    force: bool = False,
    sync: bool = True,
    progress: Progress | None = None,
    check: Callable[[str], None] | None = None,
    adjust: Callable[[pb.Model, list[tuple[BlobRef, ResolvedRef]]], list[tuple[BlobRef, ResolvedRef]]] | None = None,
    confirm: Callable[[list[tuple[BlobRef, ResolvedRef]], list[int]], None] | None = None,
    unchanged: str | None = None,
) -> WriteReport:
    """Write a new package holding ``picks`` to ``dest`` atomically; see the module docstring.

    The staged package must pass :func:`milsurgery.check.check_staged` (Core ML's spec rules)
    before it is moved into place. ``sync=False`` skips flushing the output to disk (see :class:`StagedPackage`). ``check`` is
    called with the staged package's directory before it is moved into place; an exception from
    it leaves ``dest`` as it was (see :meth:`StagedPackage.commit`). ``adjust(model, pairs)``,
    called once the output spec is built, may return the pairs with some references paired with
    other source blobs (and edit the model's metadata): near-duplicate adoption uses it;
    compression also replaces ops in the graphs and pairs the new references with blobs of a
    scratch file (see :mod:`milsurgery.compress`). ``confirm(pairs, canonical)``, called once every
    blob is copied with, for each pair, the index of the first pair holding identical bytes, may
    raise to discard the output (adoption uses it to have the coalescing confirm weights it took
    as byte-identical). ``unchanged`` names an output function whose references ``adjust`` never
    changes: the leading pairs of program attributes and of that function are then copied
    before ``adjust`` is called, so that work ``adjust`` waits for (adoption's decisions, made on
    another thread) runs while they are copied."""
    start = time.perf_counter()
    warnings: list[str] = []
    model, pairs = build_model(picks, default=default, single=single, spec_version=spec_version, warnings=warnings)
    early = 0  # leading pairs copied before adjust is called
    if adjust is not None and unchanged is not None:
        while early < len(pairs) and pairs[early][0].function in ("", unchanged):
            early += 1
    if adjust is not None and not early:
        pairs = adjust(model, pairs)
    report = WriteReport(
        output=os.path.abspath(os.fspath(dest)),
        functions=[MAIN_FUNCTION] if single else [p.new_name for p in picks],
        default_function=MAIN_FUNCTION if single else (default or picks[0].new_name),
        spec_version=model.specificationVersion,
        references=len(pairs),
        warnings=warnings,
    )
    try:
        output_real = os.path.realpath(report.output)
    except ValueError as exc:  # a NUL character, which no file name may hold
        raise UsageError(f"output path {report.output!r} is not usable: {exc}") from None
    for src in distinct_sources(picks):
        if output_real == os.path.realpath(src.path):
            raise UsageError(f"{report.output}: the output cannot be one of the sources")
    sources = [BlobSource(r.file, r.blob) for _, r in pairs]
    stats = Stats()
    canonical: list[int] = []
    with StagedPackage(dest, force=force, sync=sync, sources=[s.path for s in distinct_sources(picks)]) as staged:
        offsets: dict[int, int] = {}
        copied = done = 0
        seen: set[tuple[int, int]] = set()

        def copy(grouping: ConcurrentGrouping, sources: list[BlobSource], lo: int, hi: int, total: int) -> None:
            nonlocal copied, done
            for i in range(lo, hi):
                src = sources[i]
                canonical.append(grouping.canonical_of(i))
                if canonical[i] == i:
                    offsets[i] = writer.copy_from(src.file, src.blob)
                    copied += src.blob.size
                if src.key not in seen:
                    seen.add(src.key)
                    done += src.blob.size
                    if progress:
                        progress("copying", done, total)

        # Identical blobs are found while the first of each are being copied: the grouping's
        # comparisons and the copies overlap.
        with BlobWriter(staged.weight_path(WEIGHT_FILE_NAME), sync=sync) as writer:
            if early:
                # The pairs adjust leaves alone first, with a grouping of their own: the first
                # of each content among them is the first in the whole list too, so the
                # grouping of all pairs below agrees with it on them.
                total = _distinct_bytes(sources)
                with ConcurrentGrouping(sources[:early], stats) as grouping:
                    copy(grouping, sources, 0, early, total)
                pairs = adjust(model, pairs)
                sources = [BlobSource(r.file, r.blob) for _, r in pairs]
            total = _distinct_bytes(sources)
            with ConcurrentGrouping(sources, stats) as grouping:
                copy(grouping, sources, early, len(sources), total)
        if confirm is not None:
            confirm(pairs, canonical)
        for (ref, _), c in zip(pairs, canonical):
            ref.value.blobFileValue.fileName = DEFAULT_WEIGHT_REF
            ref.value.blobFileValue.offset = offsets[c]
        staged.commit(model, check=lambda tmp: _check_staged(tmp, report.output, check))
    first_index: dict[tuple[int, int], int] = {}
    for i, src in enumerate(sources):
        first_index.setdefault(src.key, i)
    folded = [i for i in first_index.values() if canonical[i] != i]
    report.source_blobs = len(first_index)
    report.blobs_written = len(offsets)
    report.blobs_coalesced = len(folded)
    report.bytes_coalesced = sum(sources[i].blob.size for i in folded)
    report.bytes_read = stats.bytes_read + copied
    report.bytes_written = report.weight_file_bytes = writer.size
    report.seconds = time.perf_counter() - start
    return report
