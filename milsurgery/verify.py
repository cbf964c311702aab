"""``verify``: prove that functions of a package are equivalent to their sources.

A function is equivalent to its source when its graph is identical except for blob references
(file name and offset), and every blob it references holds the same dtype, padding and bytes as
the source's blob at the same place in the graph; its I/O description must match too.

Program attributes holding blob references are checked too: each must equal, referenced bytes
included, the value of some source having that key, and a key no source has is a difference
(see :func:`_check_attributes`).

Besides the functions, everything else that changes what Core ML loads or describes is checked
(:func:`_package_differences`): the model-level description (empty in a multi-function model),
the specification version, ``isUpdatable``, the program version, the default function (when the
whole package is verified) and blob files in subdirectories of ``weights/``, which coremltools
and Core ML may resolve differently and are therefore refused.

Protobuf maps are unordered (a package re-saved by coremltools may list op inputs in another
order), so graphs are compared with every map sorted by key. Sub-byte blobs that differ only in
the padding bits past their last element hold equal values: that is reported as a note, not a
difference.

The check is independent of how the package was written: it walks both functions, compares the
referenced bytes, blanks the blob references in copies of both and compares the serialized
graphs. On a difference it reports the function, the op and what differs.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from ._proto import milsurgery_spec_pb2 as pb
from .assemble import Pick, _function_spec_version, distinct_sources, values_equal
from .check import MODEL_LEVEL_IO
from .coalesce import BlobSource, _same_bytes, _windows, blobs_equal
from .errors import FormatError, MilSurgeryError, UsageError
from .formats import MODEL_PATH_PREFIX, MULTIFUNCTION_SPEC_VERSION
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
    """One function of the verified package checked against its source function."""

    function: str  # name in the package being verified
    source: str  # "PATH:FUNC"
    differences: list[str] = field(default_factory=list)
    blobs_compared: int = 0
    bytes_compared: int = 0
    notes: list[str] = field(default_factory=list)  # equal values, said in words (padding bits)
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
        if not self.sources:
            return f"program attribute {self.key!r} holds blobs but no source has an attribute of this key"
        return (
            f"program attribute {self.key!r} equals none of the sources' values "
            f"(graphs and referenced bytes compared with {', '.join(self.sources)})"
        )


@dataclass
class VerifyReport:
    """Every function's check, the attributes' and what differs outside the functions."""

    package: str
    checks: list[FunctionCheck]
    attributes: list[AttributeCheck] = field(default_factory=list)
    #: differences outside the functions: model-level description, specification version,
    #: isUpdatable, program version, default function, blob file paths
    package_differences: list[str] = field(default_factory=list)

    @property
    def equivalent(self) -> bool:
        return (
            all(c.equivalent for c in self.checks)
            and all(a.equivalent for a in self.attributes)
            and not self.package_differences
        )

    def summary(self) -> str:
        if self.package_differences:
            return f"{self.package}: {self.package_differences[0]}"
        bad = [c for c in self.checks if not c.equivalent]
        if bad:
            first = bad[0]
            return f"{self.package}: function {first.function!r} differs from {first.source}: {first.differences[0]}"
        bad_attrs = [a for a in self.attributes if not a.equivalent]
        if bad_attrs:
            return f"{self.package}: {bad_attrs[0].difference}"
        attrs = f" and {len(self.attributes)} program attribute{'s' if len(self.attributes) != 1 else ''} holding blobs" if self.attributes else ""
        n = len(self.checks)
        return f"{self.package}: {n} function{'s' if n != 1 else ''}{attrs} equivalent to {'their sources' if n != 1 else 'its source'}"

    def to_dict(self) -> dict:
        return {
            "package": self.package,
            "equivalent": self.equivalent,
            "package_differences": self.package_differences,
            "functions": [
                {
                    "function": c.function,
                    "source": c.source,
                    "equivalent": c.equivalent,
                    "differences": c.differences,
                    "blobs_compared": c.blobs_compared,
                    "bytes_compared": c.bytes_compared,
                    "notes": c.notes,
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


def _is_map_entry(descriptor) -> bool:
    """Our schema declares ``map<K, V>`` as ``repeated XxxEntry {key = 1; value = 2}``."""
    return descriptor.name.endswith("Entry") and set(descriptor.fields_by_name) == {"key", "value"}


def _sort_maps(message) -> None:
    """Sort every map field of ``message`` by key, in place and recursively; of a repeated key
    only the last entry is kept, as protobuf does when it parses a map."""
    for fd, value in message.ListFields():
        if fd.message_type is None:
            continue
        if fd.is_repeated:
            if _is_map_entry(fd.message_type):
                keys = [e.key for e in value]
                if all(a < b for a, b in zip(keys, keys[1:])):  # sorted, no repeated key
                    for v in value:
                        _sort_maps(v)
                    continue
                last = {e.key: e for e in value}
                kept = []
                for key in sorted(last):
                    copy = type(last[key])()
                    copy.CopyFrom(last[key])
                    kept.append(copy)
                del value[:]
                value.extend(kept)
            for v in value:
                _sort_maps(v)
        else:
            _sort_maps(value)


def _canonical(function: pb.Function, name: str) -> pb.Model:
    """A model holding only a copy of ``function`` (as ``name``) with its maps sorted by key."""
    holder = pb.Model()
    entry = holder.mlProgram.functions.add(key=name)
    entry.value.CopyFrom(function)
    _sort_maps(entry.value)
    return holder


def _blanked(function: pb.Function) -> pb.Function:
    """A copy of ``function`` with every blob reference's file name and offset cleared."""
    holder = pb.Model()
    entry = holder.mlProgram.functions.add(key="f")
    entry.value.CopyFrom(function)
    for ref in iter_blob_refs(holder, functions=["f"]):
        ref.value.blobFileValue.fileName = ""
        ref.value.blobFileValue.offset = 0
    return entry.value


def _serialized(function: pb.Function) -> bytes:
    return function.SerializeToString(deterministic=True)


def _padding_only_difference(a: BlobSource, b: BlobSource) -> int | None:
    """How many padding bits (past the last element of a sub-byte blob) differ when nothing
    else does, so the values are equal; ``None`` if anything else differs. Reads both blobs."""
    ba, bb = a.blob, b.blob
    if a.shape_key != b.shape_key or not ba.dtype.sub_byte or not 0 < ba.padding_bits < 8:
        return None
    mask = (1 << (8 - ba.padding_bits)) - 1  # elements fill each byte from its low bit
    done = 0
    last = None
    for va, vb in zip(_windows(a), _windows(b)):
        done += len(va)
        body = len(va) - 1 if done == ba.size else len(va)
        if not _same_bytes(va[:body], vb[:body]):
            return None
        if body < len(va):
            last = (va[body], vb[body])
    if last is None or (last[0] ^ last[1]) & mask:
        return None
    return bin(last[0] ^ last[1]).count("1")


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


def _feature_text(fd: pb.FeatureDescription) -> str:
    from .inspect import feature_summary

    f = feature_summary(fd)
    from .inspect import shape_text

    bits = [f["type"]] + ([f["dtype"]] if "dtype" in f else []) + ([shape_text(f)] if "shape" in f else [])
    return " ".join(bits + (["optional"] if f["optional"] else []))


def _description_differences(a: pb.FunctionDescription, b: pb.FunctionDescription) -> list[str]:
    """Each input, output or state that differs, by name, with both sides' type and shape."""
    out = []
    for name in ("input", "output", "state"):
        mine, theirs = list(getattr(a, name)), list(getattr(b, name))
        if mine == theirs:
            continue
        by_name = {f.name: f for f in theirs}
        for i, f in enumerate(mine):
            other = by_name.get(f.name)
            if other is None:
                out.append(f"{name} {f.name!r} ({_feature_text(f)}) is not in the source")
            elif other != f:
                a_text, b_text = _feature_text(f), _feature_text(other)
                if a_text == b_text:
                    a_text, b_text = str(f).replace("\n", " "), str(other).replace("\n", " ")
                out.append(f"{name} {f.name!r}: {a_text} here, {b_text} in the source")
            elif theirs.index(other) != i:
                out.append(f"{name} {f.name!r} is at position {i}, at {theirs.index(other)} in the source")
        names = {f.name for f in mine}
        for f in theirs:
            if f.name not in names:
                out.append(f"{name} {f.name!r} ({_feature_text(f)}) of the source is missing")
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


#: Type of the op standing for a whole weight when graphs are compared up to their weights.
_WEIGHT_PLACEHOLDER = "milsurgery.weight"


def _weights_replaced(pkg: Package, function: str):
    """A canonical copy (:func:`_canonical`) of ``function`` in which each weight's producing
    ops (a blob ``const``, or a constexpr op and the consts feeding it) are one placeholder op
    giving the weight's output variable, at the weight's place; and the weights by name."""
    from .dequant import find_weights

    fn = pkg.function(function)
    weights = find_weights(pkg, function)
    copy = _canonical(fn, function)
    if not weights:
        return copy, {}
    block = weights[0].graph.block
    key = None
    for e in fn.block_specializations:  # the block find_weights reads
        if e.key == fn.opset or key is None:
            key = e.key
    drop = {id(op) for w in weights for op in w.ops}
    terminal = {id(w.ops[0]) for w in weights}
    ops = []
    for op in block.operations:
        if id(op) in terminal:
            placeholder = pb.Operation(type=_WEIGHT_PLACEHOLDER)
            placeholder.outputs.add().CopyFrom(op.outputs[0])
            ops.append(placeholder)
        elif id(op) not in drop:
            ops.append(op)
    target = None
    for e in copy.mlProgram.functions[0].value.block_specializations:
        if e.key == key:
            target = e.value
    del target.operations[:]
    target.operations.extend(ops)
    return copy, {w.name: w for w in weights}


def _weights_within(pkg: Package, name: str, src: Package, src_name: str, tolerance, check: FunctionCheck) -> bool:
    """With a tolerance, graphs that differ only in how weights are produced (a ``const``
    rewritten to constexpr ops by ``compress``, say) are compared weight by weight on their
    dequantized values: each weight meeting the thresholds goes to ``check.tolerated`` with its
    metrics, any other is a difference naming it. False when the graphs differ otherwise."""
    from .measure import compare_weights

    ca, wa = _weights_replaced(pkg, name)
    cb, wb = _weights_replaced(src, src_name)
    fa, fb = _blanked(ca.mlProgram.functions[0].value), _blanked(cb.mlProgram.functions[0].value)
    if _serialized(fa) != _serialized(fb) or set(wa) != set(wb):
        return False
    for var, a in wa.items():
        b = wb[var]
        if a.kind == b.kind == "const" and a.dtype == b.dtype and len(a.refs) == len(b.refs) == 1:
            check.blobs_compared += 1
            check.bytes_compared += a.refs[0].blob.size
            if blobs_equal(BlobSource(a.refs[0].file, a.refs[0].blob), BlobSource(b.refs[0].file, b.refs[0].blob)):
                continue
        if a.shape != b.shape:
            check.differences.append(f"weight {var!r}: shape {list(a.shape)} here, {list(b.shape)} in the source")
            continue
        m = compare_weights(b, a)
        failed = tolerance.failure(m)
        if failed is None:
            check.tolerated.append({"op": var, "kind": a.kind, "source kind": b.kind, "metrics": m.to_dict()})
        else:
            check.differences.append(
                f"weight {var!r} ({a.kind}; {b.kind} in the source): the values differ: {m.text()} ({failed})"
            )
    return True


def _check(pkg: Package, name: str, pick: Pick, tolerance=None, progress=None, done: list | None = None, total: int = 0) -> FunctionCheck:
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
    if _serialized(ba) != _serialized(bb):
        # Maps are unordered (a package re-saved by coremltools writes them in its own order):
        # compare again with every map sorted by key, and pair the references in that order.
        ca, cb = _canonical(mine, name), _canonical(theirs, pick.name)
        ba, bb = _blanked(ca.mlProgram.functions[0].value), _blanked(cb.mlProgram.functions[0].value)
        if _serialized(ba) != _serialized(bb):
            if tolerance is None or not _weights_within(pkg, name, src, pick.name, tolerance, check):
                check.differences.append(_first_graph_difference(ba, bb))
            return check
        refs_a = [pkg.resolve(r) for r in iter_blob_refs(ca)]
        refs_b = [src.resolve(r) for r in iter_blob_refs(cb)]
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
            if progress is not None and done is not None:
                done[0] += ra.blob.size
                progress("verifying", done[0], total)
            bits = None if seen[key] else _padding_only_difference(a, b)
            if bits is not None:
                seen[key] = True
                check.notes.append(
                    f"{ra.ref.describe()}: blob at offset {ra.blob.record_offset} of {ra.file.path} differs "
                    f"from the source's only in {bits} padding bit(s) past its last element; the values are equal"
                )
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
    every referenced blob. A key no source has is a difference: its blobs come from nowhere.
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
        check = AttributeCheck(entry.key, sorted({src.path for src, _ in candidates}))
        for src, value in candidates:
            if values_equal(pkg, entry.value, src, value, where):
                check.matched = src.path
                break
        check.blobs_compared = len(refs)
        check.bytes_compared = sum(r.blob.size for r in refs)
        checks.append(check)
    return checks


def _expected_defaults(picks: Sequence[Pick], default: str | None) -> list[str]:
    """Default function names a package of ``picks`` may have: ``default`` if given; else the
    first pick (what ``merge`` picks) or a multi-function source's default function under its
    new name (what ``extract`` and ``rename`` keep)."""
    if default is not None:
        return [default]
    out = [picks[0].new_name]
    for p in picks:
        if p.source.model.description.functions and p.name == p.source.default_function and p.new_name not in out:
            out.append(p.new_name)
    return out


def _package_differences(pkg: Package, picks: Sequence[Pick], default: str | None) -> list[str]:
    """What differs outside the functions: model-level description, specification version,
    isUpdatable, program version, default function (when ``picks`` cover every function of
    ``pkg``) and blob files in subdirectories of weights/. Reads no weight bytes."""
    out = []
    model, sources = pkg.model, distinct_sources(list(picks))
    d = model.description
    whole = set(pkg.functions) <= {p.new_name for p in picks}
    multi = bool(d.functions)
    if multi:
        for name in MODEL_LEVEL_IO:
            value = getattr(d, name)
            if (len(value) if not isinstance(value, str) else value):
                out.append(
                    f"model-level description {name} is not empty (a multi-function model keeps its I/O "
                    "in its FunctionDescriptions; Core ML refuses it at model level)"
                )
    version = model.specificationVersion
    if multi:
        expected = max([MULTIFUNCTION_SPEC_VERSION, *(p.source.model.specificationVersion for p in picks)])
        if version < expected or (whole and version != expected):
            out.append(
                f"specification version is {version}, expected {expected} (the highest of "
                f"{MULTIFUNCTION_SPEC_VERSION} and the sources')"
            )
    else:
        low = max(_function_spec_version(p) for p in picks)
        high = max(p.source.model.specificationVersion for p in picks)
        if not low <= version <= high:
            out.append(
                f"specification version is {version}, expected {low}"
                + (f" to {high} (the lowest the function needs to its source's)" if high > low else "")
            )
    updatable = {s.model.isUpdatable for s in sources}
    if model.isUpdatable not in updatable:
        out.append(f"isUpdatable is {model.isUpdatable}, the sources' is {sorted(updatable)[0]}")
    program_versions = sorted({s.model.mlProgram.version for s in sources})
    if model.mlProgram.version not in program_versions:
        out.append(f"program version is {model.mlProgram.version}, the sources' is {program_versions[0]}")
    if whole and multi:
        allowed = _expected_defaults(picks, default)
        if d.defaultFunctionName not in allowed:
            out.append(
                f"default function is {d.defaultFunctionName!r}, expected "
                + " or ".join(repr(a) for a in allowed)
            )
    reported = set()
    for r in pkg.refs:
        name = r.ref.file_name
        if "/" in name[len(MODEL_PATH_PREFIX) :] and name not in reported:
            reported.add(name)
            out.append(
                f"{r.ref.describe()}: blob file {name!r} is in a subdirectory of weights/, which "
                "coremltools and Core ML may resolve differently; not accepted"
            )
    return out


def verify_picks(
    pkg: Package, picks: Sequence[Pick], tolerance=None, progress=None, *, default: str | None = None
) -> VerifyReport:
    """Check each pick's ``new_name`` function of ``pkg`` against its source function, the
    program attributes of ``pkg`` holding blob references against the picks' sources', and what
    lies outside the functions (:func:`_package_differences`; ``default`` is the expected default
    function, see :func:`_expected_defaults`).

    Reads every referenced blob of both sides once per distinct pair; ``progress(phase, done,
    total)`` is called with the bytes compared so far."""
    checks = []
    present = set(pkg.functions)
    for pick in picks:
        if pick.new_name not in present:
            raise UsageError(f"{pkg.path}: no function {pick.new_name!r} to verify (it has {pkg.functions})")
    total = 0
    if progress is not None:
        for pick in picks:
            pairs = {(BlobSource(ra.file, ra.blob).key, BlobSource(rb.file, rb.blob).key): ra.blob.size
                     for ra, rb in zip(pkg.function_refs(pick.new_name), pick.source.function_refs(pick.name))}
            total += sum(pairs.values())
    done = [0]
    for pick in picks:
        checks.append(_check(pkg, pick.new_name, pick, tolerance, progress, done, total))
    sources = distinct_sources(list(picks))
    # A compiled model's spec is rebuilt from model.mil and metadata.json (version, description):
    # what lies outside its functions is compared only between packages.
    compiled = any(getattr(m, "unrecovered", None) is not None for m in (pkg, *sources))
    outside = [] if compiled else _package_differences(pkg, picks, default)
    return VerifyReport(pkg.path, checks, _check_attributes(pkg, sources), outside)


def verify(
    package: str | os.PathLike,
    against: Sequence[str | os.PathLike | SourceSpec],
    *,
    tolerance: bool = False,
    min_cosine: float | None = None,
    max_mean_abs: float | None = None,
    max_abs: float | None = None,
    progress=None,
    default: str | None = None,
) -> VerifyReport:
    """Verify functions of ``package`` against sources given as ``SRC[:FUNC[=NEW]]``.

    ``SRC`` alone checks every function of SRC under its own name; ``SRC:FUNC=NEW`` checks the
    package's function NEW against SRC's FUNC. When the sources cover every function, the
    default function must be ``default`` (if given; see :func:`_expected_defaults` otherwise).
    Raises :class:`MilSurgeryError` on bad input.

    A weight whose blobs differ from the source's (an adopted near-duplicate) is a difference
    whose message gives its metrics; with ``tolerance`` it passes when its dequantized values
    meet the thresholds (defaults as for ``merge(adopt=True)``) and is listed in the check's
    ``tolerated`` with its metrics.
    ``progress(phase, done, total)``, if given, is called with the bytes compared so far.
    """
    from .thresholds import adoption_options

    thresholds = adoption_options(tolerance, None, min_cosine, max_mean_abs, max_abs, False)
    opened: dict[str, Package] = {}
    try:
        with open_model(package) as pkg:
            picks = resolve_sources(against, opened)
            return verify_picks(pkg, picks, thresholds, progress, default=default)
    finally:
        for p in opened.values():
            p.close()


def verify_staged(
    staged: str, dest: str, picks: Sequence[Pick], tolerance=None, progress=None, default: str | None = None
) -> VerifyReport:
    """Verify a package written to the staging directory ``staged`` that is to become ``dest``.

    Raises :class:`VerificationFailed` if it differs from its sources, or the error that opening
    it raised; messages name ``dest`` rather than the staging directory, which the caller removes.
    """

    def renamed(text: str) -> str:
        return text.replace(staged, dest)

    try:
        with Package(staged) as pkg:
            report = verify_picks(pkg, picks, tolerance, progress, default=default)
    except MilSurgeryError as exc:  # same class, so callers catch what they would have
        if isinstance(exc, FormatError):
            exc.path = renamed(exc.path)
        exc.args = (f"{dest}: the package written does not open, so it was not kept: {renamed(str(exc))}",)
        raise exc from None
    report.package = dest
    for check in report.checks:
        check.differences = [renamed(d) for d in check.differences]
        check.notes = [renamed(n) for n in check.notes]
    report.package_differences = [renamed(d) for d in report.package_differences]
    if not report.equivalent:
        raise VerificationFailed(report)
    return report
