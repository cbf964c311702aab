"""Merge benchmark: milsurgery merge vs coremltools' save_multifunction vs cp, in one run.

Builds LLM-like pairs with coremltools (the same weights converted at sequence length 1,
"infer", and 64, "prefill"), then for each size times, each in its own process:

* ``save_multifunction``: coremltools' reference merge of the two packages;
* ``milsurgery``: ``python -m milsurgery merge A:main=infer B:main=prefill -o OUT --quiet``, which
  fsyncs its output before renaming it into place;
* ``milsurgery --no-sync``: the same without the fsync;
* ``cp``: ``cp`` of a copy of milsurgery's output weight.bin, and ``cp + sync``: the same followed
  by an fsync of the copy. ``cp + sync`` is the like-for-like limit of the disk for ``milsurgery``;
  plain ``cp`` only fills the page cache, like ``--no-sync``.

Every input is read again before each timed run, so every tool runs with a warm page cache, and
dirty pages are flushed first (``os.sync``) so earlier writes are not charged to it. The tools run
in ``--repeat`` rounds, each round running every tool once in a shuffled order, so a drift of the
machine spreads over all of them; the median wall time is reported with every run's. Wall time,
the peak RSS of each process (VmHWM) and the output weight.bin size are printed with the ratios,
and written as JSON with ``--json``. Run from the repository root::

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
import random
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


#: Tools in the order they are reported.
TOOLS = ("save_multifunction", "milsurgery", "milsurgery --no-sync", "cp", "cp+sync")


def layers_for(size_mib: int) -> tuple[int, int, int]:
    """(hidden, ffn, layers) giving about ``size_mib`` MiB of fp16 weights with a 32k vocabulary."""
    hidden = HIDDEN if size_mib >= 512 else 512
    ffn = 4 * hidden
    fixed = 2 * VOCAB * hidden * 2  # embedding + lm_head, fp16
    per_layer = (4 * hidden * hidden + 2 * hidden * ffn) * 2
    layers = max(1, round((size_mib * 2**20 - fixed) / per_layer))
    return hidden, ffn, layers


def build_llm(workdir: str, size_mib: int, name: str, seq: int) -> str:
    """One LLM-like package of a size (``infer`` at seq 1, ``prefill`` at 64), built once in a
    child process and cached in ``workdir``."""
    hidden, ffn, layers = layers_for(size_mib)
    path = os.path.join(workdir, f"llm-{size_mib}m-h{hidden}-l{layers}-{name}.mlpackage")
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
    return path


def build_pair(workdir: str, size_mib: int) -> tuple[str, str]:
    """The infer/prefill pair for a size, built once (in a child process) and cached."""
    return build_llm(workdir, size_mib, "infer", 1), build_llm(workdir, size_mib, "prefill", 64)


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


def _children(pid: int) -> list[int]:
    """The processes ``pid`` started (any of its threads; Linux ``children`` files)."""
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return out


def timed(cmd: list[str]) -> dict:
    """Run ``cmd`` in its own process: wall seconds and peak RSS in MiB.

    Peak RSS is the child's VmHWM, sampled every few milliseconds until it exits: unlike
    ``ru_maxrss`` it is per address space, so it does not include the memory of the (large)
    process that started the child. Where /proc is missing (macOS), ``ru_maxrss`` from wait4.
    ``peak_rss_helpers_mib`` is the largest VmHWM of the processes the child started (helpers,
    sampled likewise; 0 if none), ``helpers`` how many there were. (wait4's ``ru_maxrss`` would
    not do: on exec a process inherits the peak of the process it was forked from.)
    """
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    helpers: dict[int, int] = {}
    while True:
        hwm = _hwm_kib(proc.pid)
        if hwm is not None:
            peak = max(peak, hwm)
        for child in _children(proc.pid):
            child_hwm = _hwm_kib(child)
            if child_hwm is not None:
                helpers[child] = max(helpers.get(child, 0), child_hwm)
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
    return {"seconds": round(wall, 3), "peak_rss_mib": round(peak / 1024, 1),
            "peak_rss_helpers_mib": round(max(helpers.values(), default=0) / 1024, 1), "helpers": len(helpers)}


def compile_package() -> None:
    """Write milsurgery's bytecode next to its sources, as installing it does, so that timed
    runs load compiled modules (with PYTHONDONTWRITEBYTECODE set, or a read-only checkout, every
    run would otherwise compile them from source: about 0.2 s for ``merge --adopt``)."""
    subprocess.run([sys.executable, "-m", "compileall", "-q", os.path.join(ROOT, "milsurgery")], check=True,
                   stdout=subprocess.DEVNULL)


def settle() -> None:
    """Flush dirty pages left by earlier steps, so their write-back is not timed with the next."""
    os.sync()
    time.sleep(0.5)


def run_interleaved(tools: dict[str, tuple[list[str], object]], repeat: int, seed: int = 0) -> dict[str, dict]:
    """Run each tool ``repeat`` times, in rounds: every round runs each tool once, in a shuffled
    order, so a drift of the machine (other load, write-back, the host's cache) spreads over all
    tools instead of landing on whichever ran last. ``tools`` maps a name to (command, a function
    called before each run, the file whose size is the tool's output). Median wall time, every
    run's wall time, the largest peak RSS and the output's size (the same in every run)."""
    runs: dict[str, list[dict]] = {name: [] for name in tools}
    rng = random.Random(seed)
    for _ in range(repeat):
        order = list(tools)
        rng.shuffle(order)
        for name in order:
            cmd, before, output = tools[name]
            if before:
                before()
            settle()
            run = timed(cmd)
            run["output_bytes"] = os.path.getsize(output)
            runs[name].append(run)
    result = {}
    for name, rs in runs.items():
        walls = sorted(r["seconds"] for r in rs)
        result[name] = {
            "seconds": walls[len(walls) // 2],
            "runs_seconds": [r["seconds"] for r in rs],
            "peak_rss_mib": max(r["peak_rss_mib"] for r in rs),
            "output_bytes": sorted({r["output_bytes"] for r in rs}),
        }
        if len(result[name]["output_bytes"]) == 1:
            result[name]["output_bytes"] = result[name]["output_bytes"][0]
    return result


def run_size(workdir: str, size_mib: int, reference: bool, repeat: int) -> dict:
    a, b = build_pair(workdir, size_mib)
    warm(a)
    warm(b)
    result = {"size_mib": size_mib, "repeat": repeat,
              "inputs_bytes": os.path.getsize(weight_bin(a)) + os.path.getsize(weight_bin(b))}
    outs = {
        "milsurgery": os.path.join(workdir, "out-milsurgery.mlpackage"),
        "milsurgery --no-sync": os.path.join(workdir, "out-milsurgery-nosync.mlpackage"),
        "save_multifunction": os.path.join(workdir, "out-save_multifunction.mlpackage"),
    }
    # cp copies milsurgery's output weight.bin: make one to copy first.
    merge_cmd = [sys.executable, "-m", "milsurgery", "merge", f"{a}:main=infer", f"{b}:main=prefill", "--quiet", "-o"]
    shutil.rmtree(outs["milsurgery"], ignore_errors=True)
    subprocess.run(merge_cmd + [outs["milsurgery"]], check=True)
    model_copy = os.path.join(workdir, "cp-source-weight.bin")
    shutil.copyfile(weight_bin(outs["milsurgery"]), model_copy)
    shutil.rmtree(outs["milsurgery"])
    copy = os.path.join(workdir, "cp-weight.bin")

    def clean() -> None:
        """Remove every tool's output (and warm the inputs again) before the next run."""
        for out in outs.values():
            shutil.rmtree(out, ignore_errors=True)
        if os.path.exists(copy):
            os.remove(copy)
        warm(a)
        warm(b)
        warm(model_copy)

    tools = {
        "milsurgery": (merge_cmd + [outs["milsurgery"]], clean, weight_bin(outs["milsurgery"])),
        "milsurgery --no-sync": (
            merge_cmd + [outs["milsurgery --no-sync"], "--no-sync"], clean, weight_bin(outs["milsurgery --no-sync"])
        ),
        # cp leaves the bytes in the page cache, like --no-sync; milsurgery by default fsyncs its
        # output before renaming it into place, like "cp + sync" (coreutils sync FILE, an fsync).
        "cp": (["cp", model_copy, copy], clean, copy),
        "cp+sync": (["sh", "-c", 'cp "$0" "$1" && sync "$1"', model_copy, copy], clean, copy),
    }
    if reference:
        tools["save_multifunction"] = (
            [sys.executable, "-c", REFERENCE, a, b, outs["save_multifunction"]], clean, weight_bin(outs["save_multifunction"])
        )
    result.update(run_interleaved(tools, repeat, seed=size_mib))
    ours, fast = result["milsurgery"]["seconds"], result["milsurgery --no-sync"]["seconds"]
    if reference:
        result["speedup_vs_save_multifunction"] = round(result["save_multifunction"]["seconds"] / ours, 1)
        result["rss_ratio_vs_save_multifunction"] = round(
            result["save_multifunction"]["peak_rss_mib"] / result["milsurgery"]["peak_rss_mib"], 1
        )
    result["time_vs_cp_sync"] = round(ours / result["cp+sync"]["seconds"], 2)
    result["time_vs_cp"] = round(ours / result["cp"]["seconds"], 2)
    result["no_sync_time_vs_cp"] = round(fast / result["cp"]["seconds"], 2)
    clean()
    os.remove(model_copy)
    return result


def render(results: list[dict]) -> str:
    lines = [
        "| pair (MiB each) | tool | wall s (median) | runs s | peak RSS MiB | output weight.bin bytes |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        for tool in TOOLS:
            if tool in r:
                t = r[tool]
                runs = " ".join(f"{x:.2f}" for x in t["runs_seconds"])
                lines.append(
                    f"| {r['size_mib']} | {tool} | {t['seconds']:.2f} | {runs} | {t['peak_rss_mib']:.0f} | {t['output_bytes']} |"
                )
    lines.append("")
    for r in results:
        parts = [
            f"{r['size_mib']} MiB: milsurgery takes {r['time_vs_cp_sync']}x the time of cp+sync "
            f"({r['time_vs_cp']}x that of cp); with --no-sync {r['no_sync_time_vs_cp']}x that of cp"
        ]
        if "speedup_vs_save_multifunction" in r:
            parts.append(
                f"it is {r['speedup_vs_save_multifunction']}x faster than save_multifunction "
                f"with {r['rss_ratio_vs_save_multifunction']}x less peak RSS"
            )
        lines.append("; ".join(parts))
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
