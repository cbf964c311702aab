"""``diff``: how two functions differ (of one model or of two, packages or compiled models).

1. Open both models (spec and blob records only) and pick the functions (``PATH[:FUNC]``; without
   ``FUNC`` the model's default function).
2. I/O: inputs, outputs and states of the two descriptions, matched by name.
3. Ops: each function's ops in program order (nested blocks flattened after their op) get a
   structural signature: op type, input names (the keys, not the variables bound), the types of
   the ops producing each input, and for ``const`` ops the dtype and rank of the value. The two
   signature sequences are aligned (difflib); inside a replaced stretch, ops of one type pair in
   order. Unpaired ops are added or removed; paired ops are compared field by field: output types
   (``shape`` when only dimensions differ), inputs (variables translated through the pairing),
   attributes other than ``name``, immediate values, and names.
4. Weights: for every paired op, each blob reference is compared with the one at the same place
   in the other op, dtype and size from the records, then bytes through mmap windows (only when
   the sizes agree); differing ones are listed with their sizes.

Costs: the two specs, the blob records, and the bytes of paired blobs of equal size (each pair
once, in bounded windows; identical records are not read).
"""

from __future__ import annotations

import difflib
import os
from dataclasses import asdict, dataclass, field

from ._proto import milsurgery_spec_pb2 as pb
from .coalesce import BlobSource, blobs_equal
from .compiled import open_model
from .errors import UsageError
from .inspect import feature_summary, shape_text
from .miltext import op_text, program_syntax, type_text
from .package import Package
from .sources import parse_source
from .spec import blanked_value

__all__ = ["diff", "DiffReport", "OpChange", "render_diff"]


@dataclass
class OpChange:
    """An op of A matched to one of B that differs, and how."""

    a: str  # op label in A: "name (type)"
    b: str
    changes: list[str]  # kinds: shape, type, inputs, attributes, values, weights, name
    details: list[str] = field(default_factory=list)
    text_a: str = ""
    text_b: str = ""


@dataclass
class DiffReport:
    """How function B differs from function A: I/O, ops changed, removed and added, weights."""

    a: str  # "PATH:FUNC"
    b: str
    io: list[str] = field(default_factory=list)  # "-input x: ...", "+input x: ..."
    unchanged: int = 0
    changed: list[OpChange] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)  # op text lines of A
    added: list[str] = field(default_factory=list)  # op text lines of B
    weights: list[dict] = field(default_factory=list)
    weight_bytes_compared: int = 0
    shapes_ignored: bool = False

    @property
    def identical(self) -> bool:
        return not (self.io or self.changed or self.removed or self.added or self.weights)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["identical"] = self.identical
        return out


def _flatten(block: pb.Block, out: list[pb.Operation]) -> None:
    for op in block.operations:
        out.append(op)
        for nested in op.blocks:
            _flatten(nested, out)


def _ops(fn: pb.Function) -> list[pb.Operation]:
    out: list[pb.Operation] = []
    for e in fn.block_specializations:
        _flatten(e.value, out)
    return out


def _label(op: pb.Operation) -> str:
    return f"{op.outputs[0].name if op.outputs else '?'} ({op.type})"


def _signatures(ops: list[pb.Operation]) -> list[tuple]:
    producer: dict[str, str] = {}
    sigs = []
    for op in ops:
        ins = []
        for e in op.inputs:
            kinds = tuple(
                producer.get(b.name, "input") if b.WhichOneof("binding") == "name" else "value" for b in e.value.arguments
            )
            ins.append((e.key, kinds))
        extra = ()
        if op.type == "const" and op.outputs:
            t = op.outputs[0].type
            if t.WhichOneof("type") == "tensorType":
                extra = (t.tensorType.dataType, t.tensorType.rank)
        sigs.append((op.type, tuple(sorted(ins)), extra))
        for o in op.outputs:
            producer[o.name] = op.type
    return sigs


def _pair(a_ops, b_ops) -> tuple[list[tuple[int, int]], list[int], list[int]]:
    sa, sb = _signatures(a_ops), _signatures(b_ops)
    pairs, only_a, only_b = [], [], []
    matcher = difflib.SequenceMatcher(None, sa, sb, autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            pairs.extend(zip(range(i1, i2), range(j1, j2)))
            continue
        rest_b = list(range(j1, j2))
        for i in range(i1, i2):
            j = next((j for j in rest_b if b_ops[j].type == a_ops[i].type), None)
            if j is None:
                only_a.append(i)
            else:
                rest_b.remove(j)
                pairs.append((i, j))
        only_b.extend(rest_b)
    return sorted(pairs), only_a, sorted(only_b)


def _shape_only(ta: pb.ValueType, tb: pb.ValueType) -> bool:
    if ta.WhichOneof("type") != "tensorType" or tb.WhichOneof("type") != "tensorType":
        return False
    return ta.tensorType.dataType == tb.tensorType.dataType


def _compare_op(oa: pb.Operation, ob: pb.Operation, names: dict[str, str]) -> tuple[list[str], list[str]]:
    kinds: list[str] = []
    details: list[str] = []

    def add(kind: str, detail: str) -> None:
        if kind not in kinds:
            kinds.append(kind)
        details.append(detail)

    syntax = True
    ta = [o.type for o in oa.outputs]
    tb = [o.type for o in ob.outputs]
    if ta != tb:
        shape = len(ta) == len(tb) and all(_shape_only(x, y) for x, y in zip(ta, tb))
        add("shape" if shape else "type", " -> ".join(
            ", ".join(type_text(t, syntax) for t in ts) for ts in (ta, tb)))
    if [o.name for o in oa.outputs] != [o.name for o in ob.outputs]:
        add("name", f"outputs {[o.name for o in oa.outputs]} -> {[o.name for o in ob.outputs]}")
    ia = {e.key: e.value for e in oa.inputs}
    ib = {e.key: e.value for e in ob.inputs}
    for key in sorted(set(ia) | set(ib)):
        if key not in ia or key not in ib:
            add("inputs", f"input {key} {'added' if key in ib else 'removed'}")
            continue
        xa, xb = list(ia[key].arguments), list(ib[key].arguments)
        same = len(xa) == len(xb)
        for ba, bb in zip(xa, xb):
            if ba.WhichOneof("binding") != bb.WhichOneof("binding"):
                same = False
            elif ba.WhichOneof("binding") == "name":
                same = same and names.get(ba.name, ba.name) == bb.name
            elif blanked_value(ba.value) != blanked_value(bb.value):
                same = False
        if not same:
            add("inputs", f"input {key} differs")
    aa = {e.key: e.value for e in oa.attributes}
    ab = {e.key: e.value for e in ob.attributes}
    for key in sorted(set(aa) | set(ab)):
        va, vb = aa.get(key), ab.get(key)
        if va is None or vb is None:
            add("attributes", f"attribute {key} {'added' if va is None else 'removed'}")
        elif blanked_value(va) != blanked_value(vb):
            if key == "name":
                add("name", "name attribute differs")
            elif va.WhichOneof("value") == "immediateValue" and vb.WhichOneof("value") == "immediateValue" and va.type == vb.type:
                add("values", f"attribute {key}: immediate values differ")
            elif va.type != vb.type and _shape_only(va.type, vb.type):
                add("shape", f"attribute {key}: {type_text(va.type)} -> {type_text(vb.type)}")
            else:
                add("attributes", f"attribute {key} differs")
    return kinds, details


def _function_io(pkg: Package, name: str) -> dict[str, dict]:
    d = pkg.descriptions[name]
    out = {}
    for label, items in (("input", d.input), ("output", d.output), ("state", d.state)):
        for f in items:
            out[f"{label} {f.name}"] = feature_summary(f)
    return out


def _io_text(key: str, f: dict) -> str:
    bits = [key + ":", f["type"].replace("Type", "")] + ([f["dtype"]] if "dtype" in f else []) + ([shape_text(f)] if "shape" in f else [])
    return " ".join(bits) + (" (optional)" if f["optional"] else "")


def _open_side(text: str, opened: dict[str, Package]) -> tuple[Package, str]:
    spec = parse_source(text)
    if spec.new_name is not None:
        raise UsageError(f"{text!r}: diff takes PATH[:FUNC], not a rename")
    key = os.path.realpath(spec.path)
    pkg = opened.get(key)
    if pkg is None:
        pkg = opened[key] = open_model(spec.path)
    name = spec.function or pkg.default_function
    if name not in pkg.functions:
        raise UsageError(f"{pkg.path}: no function {name!r} (it has {pkg.functions})")
    return pkg, name


def diff(a: str | os.PathLike, b: str | os.PathLike, *, shapes: bool = True) -> DiffReport:
    """Compare function ``a`` with function ``b`` (each ``PATH[:FUNC]``; default: the model's
    default function). ``shapes=False`` leaves out changes that are only of shapes (an op whose
    sole difference is the dimensions of its outputs or attributes, and I/O features that differ
    only in shape): what differs between ``infer`` and ``prefill`` besides shapes."""
    opened: dict[str, Package] = {}
    try:
        pa, fa = _open_side(os.fspath(a), opened)
        pb_, fb = _open_side(os.fspath(b), opened)
        return _diff(pa, fa, pb_, fb, shapes)
    finally:
        for p in opened.values():
            p.close()


def _diff(pa: Package, fa: str, pb_: Package, fb: str, shapes: bool) -> DiffReport:
    report = DiffReport(f"{pa.path}:{fa}", f"{pb_.path}:{fb}", shapes_ignored=not shapes)
    ioa, iob = _function_io(pa, fa), _function_io(pb_, fb)
    for key in list(ioa) + [k for k in iob if k not in ioa]:
        x, y = ioa.get(key), iob.get(key)
        if x == y:
            continue
        if x is not None and y is not None and not shapes and {**x, "shape": None} == {**y, "shape": None}:
            continue
        if x is not None:
            report.io.append("-" + _io_text(key, x))
        if y is not None:
            report.io.append("+" + _io_text(key, y))

    fn_a, fn_b = pa.function(fa), pb_.function(fb)
    sa = program_syntax(pa.model.mlProgram) != "1.0"
    sb = program_syntax(pb_.model.mlProgram) != "1.0"
    a_ops, b_ops = _ops(fn_a), _ops(fn_b)
    pairs, only_a, only_b = _pair(a_ops, b_ops)
    names = {x.name: y.name for x, y in zip(fn_a.inputs, fn_b.inputs)}
    for i, j in pairs:
        for x, y in zip(a_ops[i].outputs, b_ops[j].outputs):
            names[x.name] = y.name
    refs_a: dict[str, list] = {}
    for r in pa.function_refs(fa):
        refs_a.setdefault(r.ref.op_name, []).append(r)
    refs_b: dict[str, list] = {}
    for r in pb_.function_refs(fb):
        refs_b.setdefault(r.ref.op_name, []).append(r)
    seen: dict[tuple, bool] = {}
    for i, j in pairs:
        oa, ob = a_ops[i], b_ops[j]
        kinds, details = _compare_op(oa, ob, names)
        na = oa.outputs[0].name if oa.outputs else ""
        nb = ob.outputs[0].name if ob.outputs else ""
        for ra, rb in zip(refs_a.get(na, []), refs_b.get(nb, [])):
            x, y = BlobSource(ra.file, ra.blob), BlobSource(rb.file, rb.blob)
            key = (x.key, y.key)
            if key not in seen:
                if x.shape_key == y.shape_key and x.key != y.key:
                    report.weight_bytes_compared += ra.blob.size
                seen[key] = blobs_equal(x, y)
            if not seen[key]:
                report.weights.append({
                    "op_a": na, "op_b": nb, "type": oa.type, "where": ra.ref.location,
                    "dtype_a": ra.blob.dtype.name, "bytes_a": ra.blob.size,
                    "dtype_b": rb.blob.dtype.name, "bytes_b": rb.blob.size,
                })
                if "weights" not in kinds:
                    kinds.append("weights")
                details.append(f"{ra.ref.location}: weight bytes differ ({ra.blob.dtype.name} {ra.blob.size} B vs "
                               f"{rb.blob.dtype.name} {rb.blob.size} B)")
        if not shapes and kinds and set(kinds) <= {"shape"}:
            kinds = []
        if kinds:
            report.changed.append(OpChange(_label(oa), _label(ob), kinds, details, op_text(oa, sa), op_text(ob, sb)))
        else:
            report.unchanged += 1
    report.removed = [op_text(a_ops[i], sa) for i in only_a]
    report.added = [op_text(b_ops[j], sb) for j in only_b]
    return report


def render_diff(report: DiffReport) -> str:
    """Unified-diff style text of a :class:`DiffReport`."""
    lines = [f"--- {report.a}", f"+++ {report.b}"]
    if report.io:
        lines.append(f"@@ inputs, outputs, states: {len(report.io)} lines differ @@")
        lines.extend(report.io)
    lines.append(
        f"@@ ops: {len(report.changed)} changed, {len(report.removed)} removed, {len(report.added)} added, "
        f"{report.unchanged} unchanged @@"
    )
    for c in report.changed:
        lines.append(f"# {c.a} -> {c.b}: {', '.join(c.changes)}")
        lines.extend(f"#   {d}" for d in c.details)
        if c.text_a != c.text_b:
            lines.append("-" + c.text_a)
            lines.append("+" + c.text_b)
    lines.extend("-" + t for t in report.removed)
    lines.extend("+" + t for t in report.added)
    if report.weights:
        lines.append(f"@@ weights: {len(report.weights)} differ @@")
        for w in report.weights:
            lines.append(
                f" op {w['op_a']!r} / {w['op_b']!r} ({w['type']}) {w['where']}: "
                f"{w['dtype_a']} {w['bytes_a']} bytes vs {w['dtype_b']} {w['bytes_b']} bytes"
            )
    if report.identical:
        lines.append("no differences besides shapes" if report.shapes_ignored else "functions are identical")
    return "\n".join(lines)
