"""Measured weight residency per function on a shared mapping, against milsurgery's memory model.

This is the part of the load-memory study that runs anywhere Linux does: it maps a package's
weight file(s) once, the way Core ML maps weights on the CPU, evicts the file from the page cache,
then touches every page of every blob each function references, function after function, and
records after each function

* the pages of the mapping that are resident (``mincore``), and
* the process's file-backed resident memory (``RssFile`` from /proc/self/status),

and compares the resident bytes with the memory model's prediction for a shared mapping
(:func:`milsurgery.memory.memory_model`, page-granular). The second function of a pair that
shares weights must add only its unshared bytes. Readahead is turned off on the mapping
(``MADV_RANDOM``) so that only touched pages become resident.

    python bench/residency.py PKG [--order f1,f2] [--json out.json] [--tolerance 0.05]

Prints a Markdown table; exits 1 if the model and the measurement differ by more than the
tolerance (5%) for any function, 2 on bad input or where mincore is unavailable.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import mmap
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from milsurgery import MilSurgeryError, Package  # noqa: E402
from milsurgery.memory import memory_model  # noqa: E402

PAGE = mmap.PAGESIZE


def _libc():
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
    libc.mincore.restype = ctypes.c_int
    return libc


def resident_pages(libc, addr: int, length: int) -> int:
    """How many pages of [addr, addr+length) are resident in memory (mincore)."""
    pages = -(-length // PAGE)
    vec = (ctypes.c_ubyte * pages)()
    if libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(length), vec) != 0:
        raise OSError(ctypes.get_errno(), "mincore failed")
    return int(np.count_nonzero(np.frombuffer(vec, np.uint8) & 1))


def rss_file_kib() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssFile:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def measure(path: str, order: list[str] | None = None) -> dict:
    """Touch each function's blobs in turn on one shared mapping per file; see module doc."""
    libc = _libc()
    with Package(path) as pkg:
        model = memory_model(pkg, order, page_size=PAGE, duplicates=False)
        order = model["order"]
        maps = {}
        try:
            for name, bf in pkg.blob_files.items():
                fd = os.open(bf.path, os.O_RDONLY)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # evict: start cold
                mm = mmap.mmap(fd, bf.file_size, access=mmap.ACCESS_READ)
                mm.madvise(mmap.MADV_RANDOM)  # no readahead: only touched pages come in
                arr = np.frombuffer(mm, np.uint8)
                maps[name] = (fd, mm, arr)
            base = {n: resident_pages(libc, a.ctypes.data, a.size) for n, (_, _, a) in maps.items()}
            rss0 = rss_file_kib()
            rows = []
            for i, name in enumerate(order):
                for r in pkg.function_refs(name):
                    arr = maps[r.ref.file_name][2]
                    start, end = r.blob.data_offset, r.blob.data_offset + r.blob.size
                    int(arr[start:end:PAGE].sum()) + int(arr[end - 1])  # one read per page
                resident = sum(
                    (resident_pages(libc, a.ctypes.data, a.size) - base[n]) * PAGE for n, (_, _, a) in maps.items()
                )
                rss = rss_file_kib()
                predicted = model["functions"][i]["shared_mapping_page_bytes"]
                rows.append({
                    "function": name,
                    "predicted_bytes": predicted,
                    "predicted_added_bytes": model["functions"][i]["added_page_bytes"],
                    "resident_bytes": resident,
                    "rss_file_delta_bytes": None if rss is None or rss0 is None else (rss - rss0) * 1024,
                    "relative_error": abs(resident - predicted) / predicted if predicted else 0.0,
                    "per_function_copy_bytes": model["functions"][i]["per_function_copy_bytes"],
                })
            for i in range(1, len(rows)):
                rows[i]["resident_added_bytes"] = rows[i]["resident_bytes"] - rows[i - 1]["resident_bytes"]
            if rows:
                rows[0]["resident_added_bytes"] = rows[0]["resident_bytes"]
        finally:
            arr = None  # drop every numpy view of the maps before closing them
            handles = [(fd, mm) for fd, mm, _ in maps.values()]
            maps.clear()
            for fd, mm in handles:
                mm.close()
                os.close(fd)
    return {"package": os.path.abspath(path), "page_size": PAGE, "order": order, "functions": rows}


def render(result: dict) -> str:
    mib = lambda n: "n/a" if n is None else f"{n / 2**20:.2f}"  # noqa: E731
    lines = [
        f"Residency on one shared mapping: {result['package']}",
        "",
        "| function | model: resident MiB | measured (mincore) MiB | RssFile delta MiB | model adds MiB | measured adds MiB | error | per-function copies MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["functions"]:
        lines.append(
            f"| {r['function']} | {mib(r['predicted_bytes'])} | {mib(r['resident_bytes'])} | {mib(r['rss_file_delta_bytes'])} | "
            f"{mib(r['predicted_added_bytes'])} | {mib(r['resident_added_bytes'])} | {r['relative_error'] * 100:.2f}% | "
            f"{mib(r['per_function_copy_bytes'])} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("package")
    parser.add_argument("--order", help="load order, comma-separated (default: package order)")
    parser.add_argument("--json", metavar="FILE", help="also write the result as JSON")
    parser.add_argument("--tolerance", type=float, default=0.05)
    args = parser.parse_args(argv)
    if not hasattr(os, "posix_fadvise") or not hasattr(mmap, "MADV_RANDOM"):
        print("residency.py: needs Linux (posix_fadvise, madvise, mincore)", file=sys.stderr)
        return 2
    try:
        result = measure(args.package, args.order.split(",") if args.order else None)
    except MilSurgeryError as exc:
        print(f"residency.py: error: {exc}", file=sys.stderr)
        return 2
    print(render(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    worst = max((r["relative_error"] for r in result["functions"]), default=0.0)
    print(f"\nlargest model-vs-measurement error: {worst * 100:.2f}% (tolerance {args.tolerance * 100:.0f}%)")
    return 0 if worst <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
