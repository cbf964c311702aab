"""Scale benchmark: each command against packages of 1000, 2000 and 4000 functions.

The packages hold weightless functions (one ``const`` of an immediate value feeding the output),
so the cost measured is the per-function work of opening, planning and writing: no weight bytes
are read. ``--blobs`` gives every function a small blob of its own instead (one in ten a
duplicate), so the per-blob work (sharing, duplicates, coalescing, memory model) is measured too. Each command runs in its own process (``python -m milsurgery ...``); wall time and the
process's peak RSS (``ru_maxrss`` from ``wait4``) are printed per size, with the time ratio
against the smallest size side by side: near-linear cost shows as a ratio close to the ratio of
function counts (2x, 4x), quadratic cost as its square (4x, 16x). Run from the repository root::

    python bench/scale_bench.py                       # 1000, 2000, 4000 functions
    python bench/scale_bench.py --sizes 100,200 --json out.json
    python bench/scale_bench.py --blobs               # one small blob per function
    python bench/scale_bench.py --only "inspect --json" --reference-tree ../old-checkout --timeout 120

Packages are written to ``--workdir`` (default ``bench/out/scale``) and removed afterwards
unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from milsurgery.blobfile import BlobWriter  # noqa: E402
from milsurgery.package import StagedPackage  # noqa: E402
from milsurgery.spec import pb  # noqa: E402


def build_weightless(path: str, n: int, *, blobs: bool = False) -> str:
    """A package of ``n`` functions ``f0``..``f{n-1}``, each ``const`` of one immediate float32
    scalar tensor as its output; weight.bin holds no blob. With ``blobs``, each const is instead a
    16-element float32 blob of its own, and every tenth function's blob repeats function 0's
    bytes (duplicates for inspect and shrink to find)."""
    model = pb.Model(specificationVersion=9)
    model.mlProgram.version = 1
    with StagedPackage(path, sync=False) as staged:
        writer = BlobWriter(staged.weight_path("weight.bin"), sync=False)
        for i in range(n):
            name = f"f{i}"
            fn = model.mlProgram.functions.add(key=name).value
            fn.opset = "CoreML8"
            block = fn.block_specializations.add(key="CoreML8").value
            value = pb.Value()
            value.type.tensorType.dataType = pb.FLOAT32
            value.type.tensorType.rank = 1
            if blobs:
                value.type.tensorType.dimensions.add().constant.size = 16
                seed = 0 if i % 10 == 0 else i
                value.blobFileValue.fileName = "@model_path/weights/weight.bin"
                value.blobFileValue.offset = writer.add_array("float32", [float(seed + k) for k in range(16)])
            else:
                value.type.tensorType.dimensions.add().constant.size = 1
                value.immediateValue.tensor.floats.values.append(float(i))
            op = block.operations.add(type="const")
            op.outputs.add(name=f"{name}_out").type.CopyFrom(value.type)
            op.attributes.add(key="val").value.CopyFrom(value)
            block.outputs.append(f"{name}_out")
            desc = model.description.functions.add(name=name)
            out = desc.output.add(name=f"{name}_out")
            out.type.multiArrayType.shape.append(16 if blobs else 1)
            out.type.multiArrayType.dataType = pb.ArrayFeatureType.FLOAT32
        writer.close()
        model.description.defaultFunctionName = "f0"
        staged.commit(model)
    return path


def commands(pkg: str, n: int, scratch: str) -> dict[str, list[str]]:
    """The command lines measured, by label; outputs go to ``scratch``."""
    last = f"f{n - 1}"
    return {
        "inspect --json": ["inspect", "--json", pkg],
        "inspect --json --memory": ["inspect", "--json", "--memory", pkg],
        "shrink -o": ["shrink", pkg, "-o", os.path.join(scratch, "shrunk.mlpackage"), "--no-sync", "--quiet"],
        "extract 1": ["extract", pkg, last, "-o", os.path.join(scratch, "one.mlpackage"), "--no-sync", "--quiet"],
        "rename 1": ["rename", pkg, f"{last}=renamed", "-o", os.path.join(scratch, "renamed.mlpackage"), "--no-sync", "--quiet"],
        "verify (itself)": ["verify", pkg, "--against", pkg],
    }


def run(argv: list[str], timeout: float, tree: str = ROOT) -> tuple[float, int, int]:
    """(wall seconds, peak RSS in KiB, exit status) of ``python -m milsurgery ARGV`` with the
    milsurgery of the source tree ``tree``; a run past ``timeout`` is killed (exit -9)."""
    env = dict(os.environ, PYTHONPATH=tree)
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "milsurgery", *argv], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=env, cwd=tree)  # cwd leads sys.path with -m
    deadline = start + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.perf_counter() > deadline:
            proc.kill()
            pid, status, usage = os.wait4(proc.pid, 0)
            break
        time.sleep(0.005)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if proc.returncode != 0:
        print(f"  ! {' '.join(argv[:2])}: exit {proc.returncode}: {err.strip()[:200]}", file=sys.stderr)
    peak_kib = usage.ru_maxrss if sys.platform != "darwin" else usage.ru_maxrss // 1024
    return wall, peak_kib, proc.returncode


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1000,2000,4000", help="function counts, comma-separated")
    ap.add_argument("--workdir", default=os.path.join(HERE, "out", "scale"))
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per command before it is killed")
    ap.add_argument("--only", default=None, help="comma-separated labels of the commands to run")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    ap.add_argument("--keep", action="store_true", help="keep the packages built")
    ap.add_argument("--blobs", action="store_true",
                    help="give every function a small weight blob of its own (every tenth a duplicate)")
    ap.add_argument("--reference-tree", default=None, metavar="DIR",
                    help="also run each command with the milsurgery of another checkout (e.g. the previous "
                         "release), side by side")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    os.makedirs(args.workdir, exist_ok=True)
    results: dict[str, dict[int, dict]] = {}
    try:
        for n in sizes:
            pkg = os.path.join(args.workdir, f"weightless-{n}.mlpackage")
            shutil.rmtree(pkg, ignore_errors=True)
            t0 = time.perf_counter()
            build_weightless(pkg, n, blobs=args.blobs)
            print(f"built {n} functions in {time.perf_counter() - t0:.2f} s", file=sys.stderr)
            scratch = os.path.join(args.workdir, f"scratch-{n}")
            for label, cmd in commands(pkg, n, scratch).items():
                if args.only and label not in args.only.split(","):
                    continue
                shutil.rmtree(scratch, ignore_errors=True)
                os.makedirs(scratch)
                wall, peak, rc = run(cmd, args.timeout)
                row = {"seconds": round(wall, 3), "peak_rss_kib": peak, "exit": rc}
                if args.reference_tree:
                    shutil.rmtree(scratch, ignore_errors=True)
                    os.makedirs(scratch)
                    ref_wall, ref_peak, ref_rc = run(cmd, args.timeout, os.path.abspath(args.reference_tree))
                    row["reference"] = {"seconds": round(ref_wall, 3), "peak_rss_kib": ref_peak, "exit": ref_rc}
                results.setdefault(label, {})[n] = row
            shutil.rmtree(scratch, ignore_errors=True)
            if not args.keep:
                shutil.rmtree(pkg, ignore_errors=True)
    finally:
        if not args.keep and not os.listdir(args.workdir):
            os.rmdir(args.workdir)
    base = sizes[0]
    print(f"{'command':26s}" + "".join(f"{n:>8d} fn: s  (x{base})   MiB" for n in sizes))
    for label, by_size in results.items():
        row = f"{label:26s}"
        for n in sizes:
            r = by_size[n]
            ratio = r["seconds"] / by_size[base]["seconds"] if by_size[base]["seconds"] else float("nan")
            row += f"{r['seconds']:>13.2f} ({ratio:4.1f}x) {r['peak_rss_kib'] / 1024:6.0f}"
            if r["exit"]:
                row += " FAIL"
        print(row)
        if args.reference_tree:
            row = f"{'  reference':26s}"
            for n in sizes:
                ref = by_size[n]["reference"]
                speed = ref["seconds"] / by_size[n]["seconds"] if by_size[n]["seconds"] else float("nan")
                status = " KILLED" if ref["exit"] == -9 else (" FAIL" if ref["exit"] else "")
                row += f"{ref['seconds']:>13.2f} ({speed:4.1f}x slower) {ref['peak_rss_kib'] / 1024:6.0f}{status}"
            print(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"sizes": sizes, "results": results}, f, indent=2)
    return 1 if any(r["exit"] for by in results.values() for r in by.values()) else 0  # the reference may fail


if __name__ == "__main__":
    sys.exit(main())
