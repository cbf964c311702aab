"""``verify``: prove that functions of a package are equivalent to their sources.

A function is equivalent to its source when its graph is identical except for blob references
(file name and offset), and every blob it references holds the same dtype, padding and bytes as
the source's blob at the same place in the graph; its I/O description must match too.

Program attributes holding blob references are checked too: each must equal, referenced bytes
included, the value of some source having that key (see :func:`_check_attributes`).

The check is independent of how the package was written: it walks both functions, compares the
referenced bytes, blanks the blob references in copies of both and compares the serialized
graphs. On a difference it reports the function, the op and what differs.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from ._proto import milsurgery_spec_pb2 as pb
from .assemble import Pick, distinct_sources, values_equal
from .coalesce import BlobSource, blobs_equal
from .errors import FormatError, MilSurgeryError, UsageError
from .compiled import open_model
from .sources import SourceSpec, resolve_sources
from .package import Package, ResolvedRef
from .spec import iter_blob_refs

__all__ = ["VerificationFailed", "FunctionCheck", "AttributeCheck", "VerifyReport", "verify", "verify_picks", "verify_staged"]


class VerificationFailed(MilSurgeryError):
    """Raised by ``merge(verify=True)`` when the output differs from its sources."""

    def __init__(self, report: VerifyReport):
        self.report = report
        super().__init__(report.summary())


@dataclass
class FunctionCheck:
    function: str  # name in the package being verified
    source: str  # "PATH:FUNC"
    differences: list[str] = field(default_factory=list)
    blobs_compared: int = 0
    bytes_compared: int = 0
    #: weights whose blobs differ but whose values meet the tolerance (``verify(tolerance=...)``):
    #: op, kind and metrics against the source's weight
    tolerated: list[dict] = field(default_factory=list)

    @property
    def equivalent(self) -> bool:
        return not self.differences


@dataclass
class AttributeCheck:
    """A program attribute holding blob references, checked against the sources that have it."""

    key: str
    sources: list[str]  # packages whose program has an attribute of this key
    matched: str | None = None  # the first of them whose value it equals, bytes included
    blobs_compared: int = 0  # blobs the attribute references (each compared with a candidate's)
    bytes_compared: int = 0

    @property
    def equivalent(self) -> bool:
        return self.matched is not None

    @property
    def difference(self) -> str:
        return (
            f"program attribute {self.key!r} equals none of the sources' values "
            f"(graphs and referenced bytes compared with {', '.join(self.sources)})"
        )


@dataclass
class VerifyReport:
    package: str
    checks: list[FunctionCheck]
    attributes: list[AttributeCheck] = field(default_factory=list)

    @property
    def equivalent(self) -> bool:
        return all(c.equivalent for c in self.checks) and all(a.equivalent for a in self.attributes)

    def summary(self) -> str:
        bad = [c for c in self.checks if not c.equivalent]
        if bad:
            first = bad[0]
            return f"{self.package}: function {first.function!r} differs from {first.source}: {first.differences[0]}"
        bad_attrs = [a for a in self.attributes if not a.equivalent]
        if bad_attrs:
            return f"{self.package}: {bad_attrs[0].difference}"
        attrs = f" and {len(self.attributes)} program attributes holding blobs" if self.attributes else ""
        return f"{self.package}: {len(self.checks)} functions{attrs} equivalent to their sources"

    def to_dict(self) -> dict:
        return {
            "package": self.package,
            "equivalent": self.equivalent,
            "functions": [
                {
                    "function": c.function,
                    "source": c.source,
                    "equivalent": c.equivalent,
                    "differences": c.differences,
                    "blobs_compared": c.blobs_compared,
                    "bytes_compared": c.bytes_compared,
                    "tolerated": c.tolerated,
                }
                for c in self.checks
            ],
            "program_attributes": [
                {
                    "key": a.key,
                    "sources": a.sources,
                    "equivalent": a.equivalent,
                    "matched": a.matched,
                    "blobs_compared": a.blobs_compared,
                    "bytes_compared": a.bytes_compared,
                }
                for a in self.attributes
            ],
        }


def _blanked(function: pb.Function) -> pb.Function:
    """A copy of ``function`` with every blob reference's file name and offset cleared."""
    holder = pb.Model()
    entry = holder.mlProgram.functions.add(key="f")
    entry.value.CopyFrom(function)
    for ref in iter_blob_refs(holder, functions=["f"]):
        ref.value.blobFileValue.fileName = ""
        ref.value.blobFileValue.offset = 0
    return entry.value


def _op_label(op: pb.Operation) -> str:
    return f"op {op.outputs[0].name!r} ({op.type})" if op.outputs else f"op ({op.type})"


def _first_graph_difference(a: pb.Function, b: pb.Function) -> str:
    """Where two blanked functions first differ, in words."""
    for name in ("inputs", "opset", "attributes"):
        if getattr(a, name) != getattr(b, name):
            return f"function {name} differ"
    ka = [e.key for e in a.block_specializations]
    kb = [e.key for e in b.block_specializations]
    if ka != kb:
        return f"opset blocks differ: {ka} vs {kb}"
    for ea, eb in zip(a.block_specializations, b.block_specializations):
        found = _block_difference(ea.value, eb.value, f"block {ea.key}")
        if found:
            return found
    return "graphs differ"


def _block_difference(a: pb.Block, b: pb.Block, where: str) -> str | None:
    for name in ("inputs", "outputs", "attributes"):
        if list(getattr(a, name)) != list(getattr(b, name)):
            return f"{where}: {name} differ"
    for i, (oa, ob) in enumerate(zip(a.operations, b.operations)):
        if oa == ob:
            continue
        for name in ("type", "inputs", "outputs", "attributes"):
            va, vb = getattr(oa, name), getattr(ob, name)
            if (va if isinstance(va, str) else list(va)) != (vb if isinstance(vb, str) else list(vb)):
                if name in ("inputs", "attributes"):
                    da = {e.key: e.value for e in va}
                    db = {e.key: e.value for e in vb}
                    keys = sorted(k for k in set(da) | set(db) if da.get(k) != db.get(k))
                    if not keys:  # same mapping, different entry order or repeated keys
                        return f"{where}: {_op_label(oa)}: {name} differ in entry order or repeated keys"
                    return f"{where}: {_op_label(oa)}: {name}[{keys[0]}] differs"
                return f"{where}: {_op_label(oa)}: {name} differ"
        for j, (na, nb) in enumerate(zip(oa.blocks, ob.blocks)):
            found = _block_difference(na, nb, f"{where}: {_op_label(oa)}.blocks[{j}]")
            if found:
                return found
        return f"{where}: {_op_label(oa)}: nested blocks differ"
    if len(a.operations) != len(b.operations):
        return f"{where}: {len(a.operations)} operations vs {len(b.operations)} in the source"
    return None


def _description_differences(a: pb.FunctionDescription, b: pb.FunctionDescription) -> list[str]:
    out = []
    for name in ("input", "output", "state"):
        if list(getattr(a, name)) != list(getattr(b, name)):
            out.append(f"description {name} differs")
    for name in ("predictedFeatureName", "predictedProbabilitiesName"):
        if getattr(a, name) != getattr(b, name):
            out.append(f"description {name} differs")
    return out


def _recovered_description_differences(a: pb.FunctionDescription, b: pb.FunctionDescription) -> list[str]:
    """Differences in what a compiled model's metadata.json records: names, kinds, array dtypes
    and shapes, optionality of inputs, outputs and states."""
    from .inspect import feature_summary

    return [
        f"description {name} differs"
        for name in ("input", "output", "state")
        if [feature_summary(f) for f in getattr(a, name)] != [feature_summary(f) for f in getattr(b, name)]
    ]


def _check(pkg: Package, name: str, pick: Pick, tolerance=None) -> FunctionCheck:
    src = pick.source
    check = FunctionCheck(function=name, source=f"{src.path}:{pick.name}")
    mine, theirs = pkg.function(name), src.function(pick.name)
    refs_a: list[ResolvedRef] = pkg.function_refs(name)
    refs_b: list[ResolvedRef] = src.function_refs(pick.name)
    if getattr(pkg, "unrecovered", None) is not None or getattr(src, "unrecovered", None) is not None:
        # A compiled model's description is rebuilt from metadata.json: compare what it holds.
        check.differences += _recovered_description_differences(pkg.descriptions[name], src.descriptions[pick.name])
    else:
        check.differences += _description_differences(pkg.descriptions[name], src.descriptions[pick.name])
    ba, bb = _blanked(mine), _blanked(theirs)
    if ba.SerializeToString(deterministic=True) != bb.SerializeToString(deterministic=True):
        check.differences.append(_first_graph_difference(ba, bb))
        return check
    # Same graph shape => the walks pair up reference by reference.
    seen: dict[tuple, bool] = {}
    differing: list[tuple[ResolvedRef, ResolvedRef]] = []
    for ra, rb in zip(refs_a, refs_b):
        a, b = BlobSource(ra.file, ra.blob), BlobSource(rb.file, rb.blob)
        key = (a.key, b.key)
        if key not in seen:
            seen[key] = blobs_equal(a, b)
            check.blobs_compared += 1
            check.bytes_compared += ra.blob.size
        if not seen[key]:
            differing.append((ra, rb))
    if differing:
        from .adopt import weight_differences

        # Weights whose blobs differ are judged by their values (tolerated ones drop out).
        differing = weight_differences(pkg, name, src, pick.name, differing, tolerance, check)
    for ra, rb, note in differing:
        r = ra.ref
        check.differences.append(
            f"{r.describe()}: blob at offset {ra.blob.record_offset} of {ra.file.path} "
            f"({ra.blob.dtype.name}, {ra.blob.size} bytes) differs from the source's blob at "
            f"offset {rb.blob.record_offset} of {rb.file.path} ({rb.blob.dtype.name}, {rb.blob.size} bytes){note}"
        )
    return check


def _check_attributes(pkg: Package, sources: Sequence[Package]) -> list[AttributeCheck]:
    """Check every program attribute of ``pkg`` that holds blob references.

    A merge keeps the first source's value of a key that several sources have, and ``append``
    keeps the package's own, so an attribute is equivalent when it equals the value of *some*
    source having that key: same structure with blob references blanked, and the same bytes in
    every referenced blob. Keys no source has are not checked (nothing to compare with).
    """
    checks = []
    for entry in pkg.model.mlProgram.attributes:
        where = f"program.attributes[{entry.key}]"
        refs = pkg.value_refs(entry.value, where)
        if not refs:
            continue
        candidates = [
            (src, e.value) for src in sources for e in src.model.mlProgram.attributes if e.key == entry.key
        ]
        if not candidates:
            continue
        check = AttributeCheck(entry.key, sorted({src.path for src, _ in candidates}))
        for src, value in candidates:
            if values_equal(pkg, entry.value, src, value, where):
                check.matched = src.path
                break
        check.blobs_compared = len(refs)
        check.bytes_compared = sum(r.blob.size for r in refs)
        checks.append(check)
    return checks


def verify_picks(pkg: Package, picks: Sequence[Pick], tolerance=None) -> VerifyReport:
    """Check each pick's ``new_name`` function of ``pkg`` against its source function, and the
    program attributes of ``pkg`` holding blob references against the picks' sources'."""
    checks = []
    present = set(pkg.functions)
    for pick in picks:
        if pick.new_name not in present:
            raise UsageError(f"{pkg.path}: no function {pick.new_name!r} to verify (it has {pkg.functions})")
        checks.append(_check(pkg, pick.new_name, pick, tolerance))
    return VerifyReport(pkg.path, checks, _check_attributes(pkg, distinct_sources(list(picks))))


def verify(
    package: str | os.PathLike,
    against: Sequence[str | os.PathLike | SourceSpec],
    *,
    tolerance: bool = False,
    min_cosine: float | None = None,
    max_mean_abs: float | None = None,
    max_abs: float | None = None,
) -> VerifyReport:
    """Verify functions of ``package`` against sources given as ``SRC[:FUNC[=NEW]]``.

    ``SRC`` alone checks every function of SRC under its own name; ``SRC:FUNC=NEW`` checks the
    package's function NEW against SRC's FUNC. Raises :class:`MilSurgeryError` on bad input.

    A weight whose blobs differ from the source's (an adopted near-duplicate) is a difference
    whose message gives its metrics; with ``tolerance`` it passes when its dequantized values
    meet the thresholds (defaults as for ``merge(adopt=True)``) and is listed in the check's
    ``tolerated`` with its metrics.
    """
    from .thresholds import adoption_options

    thresholds = adoption_options(tolerance, None, min_cosine, max_mean_abs, max_abs, False)
    opened: dict[str, Package] = {}
    try:
        with open_model(package) as pkg:
            picks = resolve_sources(against, opened)
            return verify_picks(pkg, picks, thresholds)
    finally:
        for p in opened.values():
            p.close()


def verify_staged(staged: str, dest: str, picks: Sequence[Pick], tolerance=None) -> VerifyReport:
    """Verify a package written to the staging directory ``staged`` that is to become ``dest``.

    Raises :class:`VerificationFailed` if it differs from its sources, or the error that opening
    it raised; messages name ``dest`` rather than the staging directory, which the caller removes.
    """

    def renamed(text: str) -> str:
        return text.replace(staged, dest)

    try:
        with Package(staged) as pkg:
            report = verify_picks(pkg, picks, tolerance)
    except MilSurgeryError as exc:  # same class, so callers catch what they would have
        if isinstance(exc, FormatError):
            exc.path = renamed(exc.path)
        exc.args = (f"{dest}: the package written does not open, so it was not kept: {renamed(str(exc))}",)
        raise exc from None
    report.package = dest
    for check in report.checks:
        check.differences = [renamed(d) for d in check.differences]
    if not report.equivalent:
        raise VerificationFailed(report)
    return report
