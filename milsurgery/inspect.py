"""``inspect``: what a package holds, which bytes each function references, what is shared.

``violations`` lists the rules of Core ML's validator the spec breaks (:mod:`milsurgery.check`).
Everything except the duplicate search comes from the spec and the 64-byte blob records: no
weight bytes are read. The duplicate search hashes only blobs whose dtype and size collide.
The dictionary :func:`inspect_package` returns is the stable ``--json`` output (see README).
"""

from __future__ import annotations

import os
import sys
from itertools import combinations

from ._proto import milsurgery_spec_pb2 as pb
from .check import check_model
from .coalesce import BlobSource, group_identical
from .compiled import open_model
from .package import Package
from .spec import op_type_histogram

__all__ = ["inspect", "inspect_package", "render_text", "feature_summary", "shape_text", "JSON_SCHEMA_VERSION"]

#: Bumped when a key of the JSON output changes meaning or disappears (additions keep it).
#: 2: a feature's ``shape`` is a list (ranges as ``{"min", "max"}`` objects), not a string.
#: 2: ``shared`` lists only the pairs of functions that share at least one blob.
JSON_SCHEMA_VERSION = 2

_ARRAY_TYPES = {65568: "fp32", 65600: "fp64", 131104: "int32", 131080: "int8", 65552: "fp16"}


def _shape(arr: pb.ArrayFeatureType, out: dict) -> None:
    """Set ``out["shape"]``: a list of sizes, a flexible size as ``{"min", "max"}`` (``max`` None
    when unbounded), None when unspecified; enumerated shapes also list ``shapes``."""
    kind = arr.WhichOneof("ShapeFlexibility")
    if kind == "shapeRange":
        out["shape"] = [
            r.lowerBound if r.upperBound == r.lowerBound
            else {"min": r.lowerBound, "max": None if r.upperBound < 0 else r.upperBound}
            for r in arr.shapeRange.sizeRanges
        ]
        return
    out["shape"] = None if not arr.shape and kind is None else list(arr.shape)
    if kind == "enumeratedShapes":
        out["shapes"] = [list(s.shape) for s in arr.enumeratedShapes.shapes]


def shape_text(feature: dict) -> str:
    """A feature's shape as text: ``[1..4096, 1024]``, ``[1, 3] (one of 2 shapes)``."""
    shape = feature.get("shape")
    if shape is None:
        return "[unspecified]"
    dims = [
        f"{d['min']}..{'inf' if d['max'] is None else d['max']}" if isinstance(d, dict) else str(d) for d in shape
    ]
    text = "[" + ", ".join(dims) + "]"
    if "shapes" in feature:
        text += f" (one of {len(feature['shapes'])} shapes)"
    return text


def feature_summary(fd: pb.FeatureDescription) -> dict:
    """A feature as ``{"name", "type", "shape"?, "dtype"?, "optional"}``."""
    t = fd.type
    kind = t.WhichOneof("Type") or "unknown"
    out: dict = {"name": fd.name, "type": kind}
    arr = None
    if kind == "multiArrayType":
        arr = t.multiArrayType
    elif kind == "stateType" and t.stateType.WhichOneof("Type") == "arrayType":
        arr = t.stateType.arrayType
    elif kind == "imageType":
        out["shape"] = [t.imageType.height, t.imageType.width]
        out["dtype"] = pb.ImageFeatureType.ColorSpace.Name(t.imageType.colorSpace) if t.imageType.colorSpace in pb.ImageFeatureType.ColorSpace.values() else str(t.imageType.colorSpace)
    if arr is not None:
        _shape(arr, out)
        out["dtype"] = _ARRAY_TYPES.get(arr.dataType, str(arr.dataType))
    out["optional"] = bool(t.isOptional)
    return out


def _feature_text(f: dict) -> str:
    bits = [f["name"] + ":", f["type"].replace("Type", "")]
    if "dtype" in f:
        bits.append(f["dtype"])
    if "shape" in f:
        bits.append(shape_text(f))
    if f["optional"]:
        bits.append("(optional)")
    return " ".join(bits)


def inspect_package(path: str | os.PathLike, *, duplicates: bool = True, progress=None) -> dict:
    """Describe a package; see README ("inspect --json") for every key.

    Blob identity across functions is by (file, offset): two functions share bytes when they
    reference the same record. ``duplicates`` searches for records with identical content at
    different offsets (what ``shrink`` would recover); it reads the bytes of colliding blobs only,
    calling ``progress(phase, done, total)`` (bytes), if given, as it goes.
    """
    with open_model(path) as pkg:
        return _inspect(pkg, duplicates, progress)


def _inspect(pkg: Package, find_duplicates: bool, progress=None) -> dict:
    files = []
    blob_key = {}
    for bf in pkg.weight_files:  # each file once, however many names the spec gives it
        name = pkg.weight_file_name(bf)
        by_dtype: dict[str, dict] = {}
        for b in bf:
            d = by_dtype.setdefault(b.dtype.name, {"blobs": 0, "bytes": 0})
            d["blobs"] += 1
            d["bytes"] += b.size
        files.append(
            {
                "name": name,
                "path": os.path.relpath(bf.path, pkg.path),
                "file_bytes": bf.file_size,
                "blobs": len(bf),
                "blob_bytes": sum(b.size for b in bf),
                "trailing_bytes": bf.trailing_bytes,
                "by_dtype": dict(sorted(by_dtype.items())),
            }
        )
        for b in bf:
            blob_key[(name, b.record_offset)] = b
    referenced_by: dict[tuple[str, int], set[str]] = {}
    for r in pkg.refs:
        referenced_by.setdefault(pkg.blob_key(r), set()).add(r.ref.function)

    functions = []
    func_blobs: dict[str, set] = {}
    for name in pkg.functions:
        fn = pkg.function(name)
        desc = pkg.descriptions[name]
        refs = pkg.function_refs(name)
        keys = {pkg.blob_key(r) for r in refs}
        func_blobs[name] = keys
        functions.append(
            {
                "name": name,
                "default": name == pkg.default_function,
                "opset": [e.key for e in fn.block_specializations],
                "inputs": [feature_summary(f) for f in desc.input],
                "outputs": [feature_summary(f) for f in desc.output],
                "states": [feature_summary(f) for f in desc.state],
                "ops": sum(op_type_histogram(fn).values()),
                "op_types": op_type_histogram(fn),
                "blob_references": len(refs),
                "blobs": len(keys),
                "bytes": sum(blob_key[k].size for k in keys),
            }
        )
    # Only pairs that share a blob, found from each blob's users: linear in references when
    # little is shared (listing every pair would be quadratic in functions).
    position = {name: i for i, name in enumerate(pkg.functions)}
    pair_totals: dict[tuple[str, str], list[int]] = {}
    for key, users in referenced_by.items():
        users = [u for u in users if u in position]  # program attributes belong to no function
        if len(users) < 2:
            continue
        for a, b in combinations(sorted(users, key=position.__getitem__), 2):
            total = pair_totals.setdefault((a, b), [0, 0])
            total[0] += 1
            total[1] += blob_key[key].size
    shared = [
        {"functions": [a, b], "blobs": n, "bytes": size}
        for (a, b), (n, size) in sorted(pair_totals.items(), key=lambda item: (position[item[0][0]], position[item[0][1]]))
    ]

    unreferenced = [
        {"file": name, "offset": off, "dtype": b.dtype.name, "bytes": b.size}
        for (name, off), b in blob_key.items()
        if (name, off) not in referenced_by
    ]
    dup_groups = []
    if find_duplicates:
        keys = list(blob_key)
        sources = [BlobSource(pkg.blob_files[n], blob_key[(n, o)]) for n, o in keys]
        canonical = group_identical(sources, progress=progress)
        groups: dict[int, list[int]] = {}
        for i, c in enumerate(canonical):
            groups.setdefault(c, []).append(i)
        for members in groups.values():
            if len(members) < 2:
                continue
            b = sources[members[0]].blob
            dup_groups.append(
                {
                    "dtype": b.dtype.name,
                    "bytes": b.size,
                    "copies": [{"file": keys[i][0], "offset": keys[i][1]} for i in members],
                    "recoverable_bytes": b.size * (len(members) - 1),
                }
            )
    opsets = sorted({o for f in functions for o in f["opset"]})
    meta = pkg.model.description.metadata
    return {
        "schema": JSON_SCHEMA_VERSION,
        "path": pkg.path,
        "container": "mlmodelc" if getattr(pkg, "unrecovered", None) is not None else "mlpackage",
        "unrecovered": list(getattr(pkg, "unrecovered", [])),
        "spec_version": pkg.model.specificationVersion,
        "spec_bytes": pkg.spec_size,
        "default_function": pkg.default_function,
        "functions": functions,
        "mixed_opsets": len(opsets) > 1,
        "weight_files": files,
        "shared": shared,
        "duplicates": dup_groups if find_duplicates else None,
        "duplicate_bytes": sum(g["recoverable_bytes"] for g in dup_groups) if find_duplicates else None,
        "unreferenced": unreferenced,
        "unreferenced_bytes": sum(u["bytes"] for u in unreferenced),
        "violations": [
            {"rule": v.rule, "message": v.message, "where": v.where} for v in check_model(pkg.model)
        ],
        "metadata": {
            "shortDescription": meta.shortDescription,
            "versionString": meta.versionString,
            "author": meta.author,
            "license": meta.license,
            "userDefined": {e.key: e.value for e in meta.userDefined},
        },
        "adopted": _adopted(meta),
    }


def _adopted(meta) -> dict | None:
    """The near-duplicate adoption recorded in the metadata (``milsurgery.adopted``), or None."""
    import json

    from .formats import ADOPTED_METADATA_KEY as METADATA_KEY

    for e in meta.userDefined:
        if e.key == METADATA_KEY:
            try:
                found = json.loads(e.value)
            except ValueError:
                return {"unreadable": e.value}
            return found if isinstance(found, dict) else {"unreadable": e.value}
    return None


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def render_text(info: dict, *, all_ops: bool = False) -> str:
    """The human-readable form of :func:`inspect_package`'s result (``all_ops``: every op type,
    not only the 8 most used)."""
    lines = [f"{info['path']}", f"  spec version {info['spec_version']}, default function {info['default_function']!r}"]
    if info.get("container") == "mlmodelc":
        lines.append("  compiled model (.mlmodelc): spec rebuilt from model.mil and metadata.json")
        for note in info.get("unrecovered", []):
            lines.append(f"  not recovered: {note}")
    if info["mixed_opsets"]:
        lines.append("  note: functions use different opsets")
    for v in info.get("violations", []):
        lines.append(f"  NOT VALID for Core ML: {v['where']}: {v['message']}")
        if v["rule"] == "validateModelLevelFeatureDescriptionsAreEmpty":
            lines.append("    (written by an earlier milsurgery? `milsurgery shrink` rewrites it without model-level I/O)")
    for f in info["functions"]:
        lines.append(
            f"  function {f['name']!r}{' (default)' if f['default'] else ''}: opset {', '.join(f['opset'])}, "
            f"{f['ops']} ops, {f['blobs']} blobs, {_size(f['bytes'])} of weights"
        )
        for label, key in (("input", "inputs"), ("output", "outputs"), ("state", "states")):
            for feat in f[key]:
                lines.append(f"    {label} {_feature_text(feat)}")
        shown = len(f["op_types"]) if all_ops else 8
        top = ", ".join(f"{k} {v}" for k, v in list(f["op_types"].items())[:shown])
        more = len(f["op_types"]) - shown
        lines.append(f"    ops: {top}{f', +{more} more types (--all-ops lists them)' if more > 0 else ''}")
    for wf in info["weight_files"]:
        lines.append(f"  weights {wf['path']}: {wf['blobs']} blobs, {_size(wf['file_bytes'])}")
        for dtype, d in wf["by_dtype"].items():
            lines.append(f"    {dtype}: {d['blobs']} blobs, {_size(d['bytes'])}")
        if wf["trailing_bytes"]:
            lines.append(f"    {_size(wf['trailing_bytes'])} after the last blob")
    for s in info["shared"]:
        a, b = s["functions"]
        lines.append(f"  shared by {a!r} and {b!r}: {s['blobs']} blobs, {_size(s['bytes'])}")
    if info["duplicates"] is not None:
        lines.append(
            f"  duplicate content at different offsets: {len(info['duplicates'])} groups, "
            f"{_size(info['duplicate_bytes'])} recoverable"
        )
    lines.append(f"  unreferenced blobs: {len(info['unreferenced'])}, {_size(info['unreferenced_bytes'])}")
    adopted = info.get("adopted")
    if adopted is not None:
        if "unreadable" in adopted:
            lines.append(f"  NOT byte-faithful: near-duplicate weights were adopted ({adopted['unreadable']})")
        else:
            lines.append(
                f"  NOT byte-faithful: {adopted.get('count')} near-duplicate weights adopted from function "
                f"{adopted.get('anchor')!r} ({_size(int(adopted.get('bytes') or 0))} saved; min cosine "
                f"{adopted.get('min_cosine')}, max mean |delta| {adopted.get('max_mean_abs')}, max |delta| "
                f"{adopted.get('max_abs')})"
            )
    meta = info["metadata"]
    for key in ("author", "license", "versionString", "shortDescription"):
        if meta[key]:
            lines.append(f"  {key}: {meta[key]}")
    for k, v in meta["userDefined"].items():
        lines.append(f"  userDefined {k}: {v}")
    return "\n".join(lines)


class _CallableModule(type(os)):
    """``milsurgery.inspect`` is this module and, called, :func:`inspect_package`, so the command
    is a function of its name while ``import milsurgery.inspect`` keeps working."""

    def __call__(self, path: str | os.PathLike, *, duplicates: bool = True, progress=None) -> dict:
        return inspect_package(path, duplicates=duplicates, progress=progress)


sys.modules[__name__].__class__ = _CallableModule
inspect = sys.modules[__name__]
