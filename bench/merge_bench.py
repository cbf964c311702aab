"""Merge benchmark: milsurgery merge vs coremltools' save_multifunction vs cp, in one run.

Builds LLM-like pairs with coremltools (the same weights converted at sequence length 1,
"infer", and 64, "prefill"), then for each size times, each in its own process:

* ``save_multifunction``: coremltools' reference merge of the two packages;
* ``milsurgery``: ``python -m milsurgery merge A:main=infer B:main=prefill -o OUT --quiet``;
* ``cp``: ``cp`` of milsurgery's output weight.bin, and ``cp + sync``: the same followed by an
  fsync of the copy. milsurgery fsyncs its output before renaming it into place, so ``cp + sync``
  is the like-for-like limit of the disk; plain ``cp`` only fills the page cache.

Every input is read once before timing, so every tool runs with a warm page cache; before each
timed run dirty pages are flushed (``os.sync``) so earlier writes are not charged to it. Each
tool runs ``--repeat`` times (median wall time reported). Wall time, the peak RSS of each process
(VmHWM) and the output weight.bin size are printed with the ratios, and written as JSON with
``--json``. Run from the repository root::

    python bench/merge_bench.py                      # one pair, ~1 GiB per package
    python bench/merge_bench.py --sizes 256,1024     # peak RSS at two sizes: flat memory
    python bench/merge_bench.py --sizes 64 --no-reference   # quick, without coremltools' merge

Needs coremltools (``pip install '.[test]'``) to build the inputs and run the reference.
Inputs are cached in ``--workdir`` (default ``bench/out``) by size.
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

VOCAB, HIDDEN = 32000, 2048

REFERENCE = """
import sys
import coremltools as ct
a, b, out = sys.argv[1:4]
desc = ct.utils.MultiFunctionDescriptor()
desc.add_function(a, "main", "infer")
desc.add_function(b, "main", "prefill")
desc.default_function_name = "infer"
ct.utils.save_multifunction(desc, out)
"""


def layers_for(size_mib: int) -> tuple[int, int, int]:
    """(hidden, ffn, layers) giving about ``size_mib`` MiB of fp16 weights with a 32k vocabulary."""
    hidden = HIDDEN if size_mib >= 512 else 512
    ffn = 4 * hidden
    fixed = 2 * VOCAB * hidden * 2  # embedding + lm_head, fp16
    per_layer = (4 * hidden * hidden + 2 * hidden * ffn) * 2
    layers = max(1, round((size_mib * 2**20 - fixed) / per_layer))
    return hidden, ffn, layers


def build_pair(workdir: str, size_mib: int) -> tuple[str, str]:
    """The infer/prefill pair for a size, built once (in a child process) and cached."""
    hidden, ffn, layers = layers_for(size_mib)
    tag = f"llm-{size_mib}m-h{hidden}-l{layers}"
    paths = []
    for name, seq in (("infer", 1), ("prefill", 64)):
        path = os.path.join(workdir, f"{tag}-{name}.mlpackage")
        if not os.path.isdir(path):
            print(f"building {path} ...", file=sys.stderr, flush=True)
            tmp = path[: -len(".mlpackage")] + "-building.mlpackage"
            shutil.rmtree(tmp, ignore_errors=True)
            build = (
                "import sys; sys.path.insert(0, sys.argv[1]); from ct_models import llm_like; "
                "llm_like(sys.argv[2], seq_len=int(sys.argv[3]), vocab=int(sys.argv[4]), hidden=int(sys.argv[5]), "
                "ffn=int(sys.argv[6]), layers=int(sys.argv[7]), seed=0)"
            )
            subprocess.run(
                [sys.executable, "-c", build, os.path.join(ROOT, "tests"), tmp, str(seq), str(VOCAB), str(hidden), str(ffn), str(layers)],
                check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            os.rename(tmp, path)
        paths.append(path)
    return paths[0], paths[1]


def weight_bin(pkg: str) -> str:
    return os.path.join(pkg, "Data", "com.apple.CoreML", "weights", "weight.bin")


def warm(path: str) -> None:
    """Read every file under ``path`` once so timings start from a warm page cache."""
    for root, _dirs, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                while f.read(64 << 20):
                    pass


def _hwm_kib(pid: int) -> int | None:
    """The process's peak resident memory so far (VmHWM, per address space, Linux)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def timed(cmd: list[str]) -> dict:
    """Run ``cmd`` in its own process: wall seconds and peak RSS in MiB.

    Peak RSS is the child's VmHWM, sampled every few milliseconds until it exits: unlike
    ``ru_maxrss`` it is per address space, so it does not include the memory of the (large)
    process that started the child. Where /proc is missing (macOS), ``ru_maxrss`` from wait4.
    """
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    while True:
        hwm = _hwm_kib(proc.pid)
        if hwm is not None:
            peak = max(peak, hwm)
        try:
            _pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        except ChildProcessError:
            break
        if _pid:
            break
        time.sleep(0.002)
    wall = time.perf_counter() - start
    stderr = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed:\n{stderr[-2000:]}")
    if not peak:
        peak = usage.ru_maxrss // 1024 if sys.platform == "darwin" else usage.ru_maxrss  # KiB
    return {"seconds": round(wall, 3), "peak_rss_mib": round(peak / 1024, 1)}


def settle() -> None:
    """Flush dirty pages left by earlier steps, so their write-back is not timed with the next."""
    os.sync()
    time.sleep(0.5)


def timed_runs(cmd: list[str], repeat: int, before=None) -> dict:
    """``timed(cmd)`` ``repeat`` times (``before()`` ahead of each run): median wall time and
    the largest peak RSS, plus every run's wall time."""
    runs = []
    for _ in range(repeat):
        if before:
            before()
        settle()
        runs.append(timed(cmd))
    walls = sorted(r["seconds"] for r in runs)
    return {
        "seconds": walls[len(walls) // 2],
        "runs_seconds": [r["seconds"] for r in runs],
        "peak_rss_mib": max(r["peak_rss_mib"] for r in runs),
    }


def run_size(workdir: str, size_mib: int, reference: bool, repeat: int) -> dict:
    a, b = build_pair(workdir, size_mib)
    warm(a)
    warm(b)
    result = {"size_mib": size_mib, "repeat": repeat,
              "inputs_bytes": os.path.getsize(weight_bin(a)) + os.path.getsize(weight_bin(b))}
    ours = os.path.join(workdir, "out-milsurgery.mlpackage")
    result["milsurgery"] = timed_runs(
        [sys.executable, "-m", "milsurgery", "merge", f"{a}:main=infer", f"{b}:main=prefill", "-o", ours, "--quiet"],
        repeat, before=lambda: shutil.rmtree(ours, ignore_errors=True),
    )
    result["milsurgery"]["output_bytes"] = os.path.getsize(weight_bin(ours))
    copy = os.path.join(workdir, "cp-weight.bin")

    def fresh_copy() -> None:
        if os.path.exists(copy):
            os.remove(copy)

    # cp leaves the bytes in the page cache; milsurgery fsyncs its output before renaming it into
    # place, so "cp + sync" (coreutils sync FILE, an fsync) is the like-for-like disk limit.
    result["cp"] = timed_runs(["cp", weight_bin(ours), copy], repeat, before=fresh_copy)
    result["cp"]["output_bytes"] = os.path.getsize(copy)
    result["cp+sync"] = timed_runs(["sh", "-c", 'cp "$0" "$1" && sync "$1"', weight_bin(ours), copy], repeat,
                                   before=fresh_copy)
    result["cp+sync"]["output_bytes"] = os.path.getsize(copy)
    fresh_copy()
    if reference:
        theirs = os.path.join(workdir, "out-save_multifunction.mlpackage")
        result["save_multifunction"] = timed_runs(
            [sys.executable, "-c", REFERENCE, a, b, theirs], repeat,
            before=lambda: shutil.rmtree(theirs, ignore_errors=True),
        )
        result["save_multifunction"]["output_bytes"] = os.path.getsize(weight_bin(theirs))
        shutil.rmtree(theirs)
        result["speedup_vs_save_multifunction"] = round(
            result["save_multifunction"]["seconds"] / result["milsurgery"]["seconds"], 1
        )
        result["rss_ratio_vs_save_multifunction"] = round(
            result["save_multifunction"]["peak_rss_mib"] / result["milsurgery"]["peak_rss_mib"], 1
        )
    result["time_vs_cp"] = round(result["milsurgery"]["seconds"] / result["cp"]["seconds"], 2)
    result["time_vs_cp_sync"] = round(result["milsurgery"]["seconds"] / result["cp+sync"]["seconds"], 2)
    shutil.rmtree(ours)
    return result


def render(results: list[dict]) -> str:
    lines = [
        "| pair (MiB each) | tool | wall s | peak RSS MiB | output weight.bin bytes |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        for tool in ("save_multifunction", "milsurgery", "cp", "cp+sync"):
            if tool in r:
                t = r[tool]
                lines.append(f"| {r['size_mib']} | {tool} | {t['seconds']:.2f} | {t['peak_rss_mib']:.0f} | {t['output_bytes']} |")
    lines.append("")
    for r in results:
        parts = [
            f"{r['size_mib']} MiB: milsurgery takes {r['time_vs_cp_sync']}x the time of cp+sync "
            f"({r['time_vs_cp']}x that of cp)"
        ]
        if "speedup_vs_save_multifunction" in r:
            parts.append(
                f"is {r['speedup_vs_save_multifunction']}x faster than save_multifunction "
                f"with {r['rss_ratio_vs_save_multifunction']}x less peak RSS"
            )
        lines.append(", ".join(parts))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1024", help="MiB of weights per package, comma-separated (default 1024)")
    parser.add_argument("--workdir", default=os.path.join(HERE, "out"), help="where inputs are cached")
    parser.add_argument("--no-reference", action="store_true", help="skip save_multifunction")
    parser.add_argument("--repeat", type=int, default=3,
                        help="timed runs per tool; the median wall time is reported (default 3)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args(argv)
    os.makedirs(args.workdir, exist_ok=True)
    os.environ["PYTHONPATH"] = ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    results = [run_size(args.workdir, int(s), not args.no_reference, args.repeat) for s in args.sizes.split(",")]
    print(render(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
