"""A model of weight memory when functions of a package are loaded one after another.

Two regimes bound what a runtime holds:

* **shared mapping** (Core ML on CPU/GPU): the weight file is mapped once; a blob costs memory the
  first time any loaded function references it, and residency is per page, so the figure that
  matches a measurement is the union of the pages covering the referenced blobs;
* **per-function copy** (what users report for the Neural Engine, where each function's compiled
  program holds its own copy of its weights): every loaded function costs all its weight bytes.

Sharing on a shared mapping is by (file, record offset). Blobs with identical content stored at
different offsets, or in different files, are counted twice: ``sharing_defeated`` lists them and
what coalescing them (``milsurgery shrink``) would save. Only that search reads weight bytes.

:func:`memory_model` returns a dict with these keys (stable; ``schema`` changes if one changes
meaning):

- ``schema``, ``path``, ``page_size``, ``order`` (load order);
- ``functions``: one entry per function in load order with ``name``, ``referenced_bytes``
  (distinct blobs' data bytes), ``referenced_page_bytes`` (pages covering them),
  ``added_bytes`` / ``added_page_bytes`` (what loading it adds on a shared mapping), and the
  cumulative ``shared_mapping_bytes``, ``shared_mapping_page_bytes`` and
  ``per_function_copy_bytes`` after it is loaded;
- ``sharing_defeated``: groups of identical content at several places, each with ``dtype``,
  ``bytes``, ``copies`` (``file``, ``offset``, ``functions``) and ``extra_bytes``;
  ``sharing_defeated_bytes`` sums ``extra_bytes`` (``None`` when duplicates were not searched).
"""

from __future__ import annotations

import bisect
import os
from itertools import combinations

from .coalesce import BlobSource, group_identical
from .compiled import open_model
from .errors import UsageError
from .inspect import _size
from .package import Package

__all__ = ["memory_model", "render_memory_text", "MEMORY_SCHEMA_VERSION"]

MEMORY_SCHEMA_VERSION = 1


class _RunningUnion:
    """The union of half-open [start, end) intervals per file, kept merged and sorted as they are
    added; ``total`` is its length. Adding costs a binary search plus the intervals it absorbs."""

    def __init__(self) -> None:
        self._files: dict[str, tuple[list[int], list[int]]] = {}
        self.total = 0

    def add(self, file: str, start: int, end: int) -> None:
        starts, ends = self._files.setdefault(file, ([], []))
        i = bisect.bisect_left(ends, start)  # first interval ending at or after start
        j, covered = i, 0
        while j < len(starts) and starts[j] <= end:
            start, end = min(start, starts[j]), max(end, ends[j])
            covered += ends[j] - starts[j]
            j += 1
        starts[i:j] = [start]
        ends[i:j] = [end]
        self.total += end - start - covered


def _union_bytes(intervals: list[tuple[str, int, int]]) -> int:
    """Total length of the union of half-open [start, end) intervals, per file."""
    total = 0
    by_file: dict[str, list[tuple[int, int]]] = {}
    for f, start, end in intervals:
        by_file.setdefault(f, []).append((start, end))
    for spans in by_file.values():
        spans.sort()
        cur_start, cur_end = spans[0]
        for start, end in spans[1:]:
            if start > cur_end:
                total += cur_end - cur_start
                cur_start, cur_end = start, end
            else:
                cur_end = max(cur_end, end)
        total += cur_end - cur_start
    return total


def memory_model(
    package: str | os.PathLike | Package,
    order: list[str] | None = None,
    *,
    page_size: int = 4096,
    duplicates: bool = True,
) -> dict:
    """Model the weight memory of loading ``order``'s functions one at a time (see module doc).

    Functions ``order`` does not name are loaded after it, in the package's order."""
    if isinstance(package, Package):
        return _model(package, order, page_size, duplicates)
    with open_model(package) as pkg:
        return _model(pkg, order, page_size, duplicates)


def _model(pkg: Package, order, page_size: int, find_duplicates: bool) -> dict:
    order = list(order) if order else list(pkg.functions)
    present = set(pkg.functions)
    for name in order:
        if name not in present:
            raise UsageError(f"{pkg.path}: no function {name!r} (it has {pkg.functions})")
    if len(set(order)) != len(order):
        raise UsageError(f"load order names a function twice: {order}")
    order += [name for name in pkg.functions if name not in order]
    blobs: dict[str, dict[tuple[str, int], object]] = {}
    for name in order:
        blobs[name] = {pkg.blob_key(r): r for r in pkg.function_refs(name)}

    def spans(keys, pages: bool):
        out = []
        for key in keys:
            b = pkg.blob_files[key[0]].blobs[key[1]]
            if pages:
                out.append((key[0], b.data_offset // page_size * page_size,
                            -(-(b.data_offset + b.size) // page_size) * page_size))
            else:
                out.append((key[0], b.data_offset, b.data_offset + b.size))
        return out

    functions, loaded, copies = [], set(), 0
    shared_before = pages_before = 0
    # The loaded union grows by each function's new blobs only: linear in blobs overall (taking
    # the union of everything loaded again for every function was quadratic in functions).
    union, union_pages = _RunningUnion(), _RunningUnion()
    for name in order:
        keys = set(blobs[name])
        new = keys - loaded
        loaded |= keys
        own = _union_bytes(spans(keys, False)) if keys else 0
        own_pages = _union_bytes(spans(keys, True)) if keys else 0
        for span in spans(new, False):
            union.add(*span)
        for span in spans(new, True):
            union_pages.add(*span)
        shared, shared_pages = union.total, union_pages.total
        copies += own
        functions.append({
            "name": name,
            "referenced_bytes": own,
            "referenced_page_bytes": own_pages,
            "added_bytes": shared - shared_before,
            "added_page_bytes": shared_pages - pages_before,
            "shared_mapping_bytes": shared,
            "shared_mapping_page_bytes": shared_pages,
            "per_function_copy_bytes": copies,
        })
        shared_before, pages_before = shared, shared_pages

    defeated = None
    if find_duplicates:
        defeated = []
        users: dict[tuple[str, int], list[str]] = {}
        for name in order:
            for key in blobs[name]:
                users.setdefault(key, []).append(name)
        keys = list(users)
        sources = [BlobSource(pkg.blob_files[f], pkg.blob_files[f].blobs[o]) for f, o in keys]
        groups: dict[int, list[int]] = {}
        for i, c in enumerate(group_identical(sources)):
            groups.setdefault(c, []).append(i)
        for members in groups.values():
            if len(members) < 2:
                continue
            b = sources[members[0]].blob
            defeated.append({
                "dtype": b.dtype.name,
                "bytes": b.size,
                "copies": [{"file": keys[i][0], "offset": keys[i][1], "functions": users[keys[i]]} for i in members],
                "across_functions": any(
                    set(users[keys[x]]) != set(users[keys[y]]) for x, y in combinations(members, 2)
                ),
                "extra_bytes": b.size * (len(members) - 1),
            })
    return {
        "schema": MEMORY_SCHEMA_VERSION,
        "path": pkg.path,
        "page_size": page_size,
        "order": order,
        "functions": functions,
        "sharing_defeated": defeated,
        "sharing_defeated_bytes": None if defeated is None else sum(g["extra_bytes"] for g in defeated),
    }


def render_memory_text(model: dict) -> str:
    """A table of :func:`memory_model`'s result."""
    lines = [
        f"weight memory by load order ({model['path']}):",
        f"  {'function':<16s} {'references':>11s} {'adds (shared)':>14s} {'shared mapping':>15s} "
        f"{'(pages)':>11s} {'per-function copies':>20s}",
    ]
    for f in model["functions"]:
        lines.append(
            f"  {f['name']:<16.16s} {_size(f['referenced_bytes']):>11s} {_size(f['added_bytes']):>14s} "
            f"{_size(f['shared_mapping_bytes']):>15s} {_size(f['shared_mapping_page_bytes']):>11s} "
            f"{_size(f['per_function_copy_bytes']):>20s}"
        )
    if model["sharing_defeated"] is not None:
        groups = model["sharing_defeated"]
        lines.append(
            f"  identical blobs stored apart: {len(groups)} groups, {_size(model['sharing_defeated_bytes'])} "
            "counted twice (coalesce them with `milsurgery shrink`)"
        )
        for g in groups[:10]:
            where = "; ".join(f"{c['offset']} ({', '.join(c['functions'])})" for c in g["copies"])
            lines.append(f"    {g['dtype']} {g['bytes']} bytes at {where}")
        if len(groups) > 10:
            lines.append(f"    ... {len(groups) - 10} more groups")
    return "\n".join(lines)
