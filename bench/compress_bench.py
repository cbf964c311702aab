"""Compression benchmark: milsurgery merge + compress vs coremltools' per-function pipeline.

Builds (or reuses, see ``bench/merge_bench.py``) an LLM-like infer/prefill pair of a given size,
then runs, each step in its own process:

* ``milsurgery``: ``milsurgery merge`` of the pair, then ``milsurgery compress --palettize
  NBITS --group-size G`` of the merged package (k-means, as coremltools);
* ``coremltools``: what deployers do today, since coremltools refuses to compress a
  multifunction model: ``palettize_weights`` on each function's package separately (the same
  configuration: ``OpPalettizerConfig(nbits, mode, granularity="per_grouped_channel",
  group_size=G)``), then ``save_multifunction`` of the two compressed packages.

Reported per pipeline: wall and CPU time of each step and in total, the peak resident memory (the sum of
VmRSS over the step's process and its children, sampled every few milliseconds: milsurgery's
workers are children), and the output weight.bin size; and the ratios milsurgery / coremltools.
``coremltools palettize (one function)`` is the time of palettizing one package alone. Run from
the repository root::

    python bench/compress_bench.py --size 1024           # >= 1 GiB of fp16 per function
    python bench/compress_bench.py --size 64 --mode uniform --json out.json

Needs coremltools, kmeans1d and scikit-learn (``pip install '.[test]'``).
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
sys.path.insert(0, HERE)

import adopt_bench  # noqa: E402
from merge_bench import REFERENCE, build_pair, settle, warm, weight_bin  # noqa: E402

PALETTIZE = """
import sys
import coremltools as ct
from coremltools.optimize.coreml import OpPalettizerConfig, OptimizationConfig, palettize_weights
src, out, nbits, group, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
model = ct.models.MLModel(src, skip_model_load=True)
config = OpPalettizerConfig(nbits=nbits, mode=mode, granularity="per_grouped_channel", group_size=group)
palettize_weights(model, OptimizationConfig(global_config=config)).save(out)
"""

SAVE_MULTIFUNCTION = REFERENCE  # coremltools merging infer and prefill, as merge_bench runs it


def drift_pair(workdir: str, size_mib: int) -> tuple[str, str]:
    """The drift scenario: adopt_bench's model converted twice from the same float weights, at
    sequence length 1 (infer) and 8 (prefill), the prefill's with a fraction ``adopt_bench.NUDGE``
    of elements one fp16 ulp up (the drift of graph-dependent casts), left in fp16. Hidden size
    2048 from 256 MiB on (512 below, for quick runs). Built once and cached."""
    hidden = adopt_bench.HIDDEN if size_mib >= 256 else 512
    layers = max(1, round(size_mib * 2**20 / (12 * hidden * hidden * 2)))
    tag = f"adopt-{size_mib}m-h{hidden}-l{layers}"
    out = []
    for name, seq, nudge in (("infer", 1, 0.0), ("prefill", 8, adopt_bench.NUDGE)):
        args = (str(seq), str(layers), str(hidden), str(nudge))
        path = os.path.join(workdir, f"{tag}-{name}-fp16.mlpackage")
        out.append(adopt_bench.cached(path, lambda tmp, a=args: adopt_bench.run_py(adopt_bench.BUILD, tmp, *a)))
    return out[0], out[1]


# Reconstruction error of one function's compressed weights against a package's own fp16 values:
# per weight (paired by output name; coremltools appends "_palettized" to it) the metrics of milsurgery.measure.compare_weights; the worst
# of each over the weights.
ERROR = """
import json, sys
from milsurgery import Package
from milsurgery.measure import compare_weights
from milsurgery.dequant import find_weights
out, function, src = sys.argv[1:4]
with Package(out) as a, Package(src) as b:
    theirs = {w.name: w for w in find_weights(b, "main")}
    ms = [compare_weights(w, theirs[w.name.removesuffix("_palettized")]) for w in find_weights(a, function) if w.kind != "const"]
print(json.dumps({"weights": len(ms), "max relative RMS": max(m.rel_rms for m in ms),
                  "max |delta|": max(m.max_abs for m in ms), "max mean |delta|": max(m.mean_abs for m in ms),
                  "min cosine": min(m.cosine for m in ms)}))
"""


def _tree_rss_kib(pid: int) -> int:
    """VmRSS of ``pid`` plus all its descendants (Linux /proc), in KiB."""
    total, todo, seen = 0, [pid], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                        break
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo.extend(int(c) for c in f.read().split())
        except OSError:
            continue
    return total


def timed(cmd: list[str]) -> dict:
    """Run ``cmd``: wall seconds, CPU seconds (user + system of the process and the children it
    waited for: less sensitive than wall time to other load on the machine) and the peak of its
    process tree's summed resident memory."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    peak = 0
    while True:
        peak = max(peak, _tree_rss_kib(proc.pid))
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        time.sleep(0.005)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    stderr = proc.stderr.read().decode(errors="replace")
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:5])} ... failed:\n{stderr[-3000:]}")
    cpu = usage.ru_utime + usage.ru_stime
    return {"seconds": round(wall, 2), "cpu_seconds": round(cpu, 2), "peak_rss_mib": round(peak / 1024, 1)}


def run_scenario(workdir: str, infer: str, prefill: str, merge_args: list[str], compress_args: list[str],
                 reference: bool, errors: bool) -> dict:
    """``milsurgery merge [merge_args]`` then ``milsurgery compress`` of the pair, against
    coremltools palettizing each function and ``save_multifunction``; with ``errors``, the
    reconstruction error of each pipeline's prefill weights against the prefill's fp16 values."""
    py = sys.executable
    env_cmd = [py, "-m", "milsurgery"]
    out = os.path.join(workdir, "compress-run")
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    steps: dict[str, dict[str, dict]] = {"milsurgery": {}, "coremltools": {}}
    merged, compressed = os.path.join(out, "merged.mlpackage"), os.path.join(out, "compressed.mlpackage")
    for path in (infer, prefill):
        warm(path)
    settle()
    merge = " ".join(["merge", *merge_args])
    steps["milsurgery"][merge] = timed([*env_cmd, "merge", f"{infer}:main=infer", f"{prefill}:main=prefill", *merge_args,
                                        "-o", merged, "--quiet"])
    settle()
    steps["milsurgery"]["compress"] = timed([*env_cmd, "compress", merged, "-o", compressed, *compress_args, "--quiet"])
    result = {"input_weight_bytes": os.path.getsize(weight_bin(infer)), "steps": steps,
              "output_bytes": {"milsurgery": os.path.getsize(weight_bin(compressed))}}
    if errors:
        result["prefill error"] = {"milsurgery": json.loads(adopt_bench.run_py(ERROR, compressed, "prefill", prefill, capture=True))}
    if reference:
        nbits, group, mode = compress_args[1], compress_args[3], compress_args[5]
        pa, pb_ = os.path.join(out, "infer-pal.mlpackage"), os.path.join(out, "prefill-pal.mlpackage")
        ref_out = os.path.join(out, "ct-multifunction.mlpackage")
        settle()
        steps["coremltools"]["palettize infer"] = timed([py, "-c", PALETTIZE, infer, pa, nbits, group, mode])
        settle()
        steps["coremltools"]["palettize prefill"] = timed([py, "-c", PALETTIZE, prefill, pb_, nbits, group, mode])
        settle()
        steps["coremltools"]["save_multifunction"] = timed([py, "-c", SAVE_MULTIFUNCTION, pa, pb_, ref_out])
        result["output_bytes"]["coremltools"] = os.path.getsize(weight_bin(ref_out))
        if errors:
            result["prefill error"]["coremltools"] = json.loads(adopt_bench.run_py(ERROR, pb_, "main", prefill, capture=True))
    for name, s in steps.items():
        if s:
            result[name] = {
                "seconds": round(sum(x["seconds"] for x in s.values()), 2),
                "cpu_seconds": round(sum(x["cpu_seconds"] for x in s.values()), 2),
                "peak_rss_mib": max(x["peak_rss_mib"] for x in s.values()),
            }
    if reference:
        one = steps["coremltools"]["palettize infer"]
        result["ratios"] = {
            "output size milsurgery/coremltools": round(result["output_bytes"]["milsurgery"] / result["output_bytes"]["coremltools"], 3),
            "wall milsurgery total/coremltools total": round(result["milsurgery"]["seconds"] / result["coremltools"]["seconds"], 3),
            "milsurgery compress/coremltools palettize (one function)": round(steps["milsurgery"]["compress"]["seconds"] / one["seconds"], 3),
            "CPU milsurgery compress/coremltools palettize (one function)": round(
                steps["milsurgery"]["compress"]["cpu_seconds"] / one["cpu_seconds"], 3),
            "peak RSS milsurgery/coremltools": round(result["milsurgery"]["peak_rss_mib"] / result["coremltools"]["peak_rss_mib"], 3),
        }
    shutil.rmtree(out, ignore_errors=True)
    return result


def run(workdir: str, size_mib: int, nbits: int, group: int, mode: str, reference: bool, drift: bool = True) -> dict:
    """Both scenarios in one run: the no-drift pair (merge_bench's, identical weights: plain
    ``merge``) at the top level, the drift pair (``merge --adopt``) under ``"drift"``."""
    compress_args = ["--palettize", str(nbits), "--group-size", str(group), "--mode", mode]
    result = {"size_mib": size_mib, "nbits": nbits, "group_size": group, "mode": mode, "cores": os.cpu_count()}
    result.update(run_scenario(workdir, *build_pair(workdir, size_mib), [], compress_args, reference, errors=False))
    if drift:
        result["drift"] = run_scenario(workdir, *drift_pair(workdir, size_mib), ["--adopt"], compress_args, reference, errors=True)
    return result


def render(r: dict) -> str:
    lines = [f"{r['size_mib']} MiB of fp16 per function, palettize {r['nbits']} bits {r['mode']}, "
             f"group size {r['group_size']}, {r['cores']} cores"]
    for title, x in (("no drift (identical weights): LLM-like pair", r), ("drift (0.1% of prefill elements +1 ulp)", r.get("drift"))):
        if x is None:
            continue
        lines.append(f"{title}, {x['input_weight_bytes']} bytes per function")
        for name, steps in x["steps"].items():
            for step, t in steps.items():
                lines.append(f"  {name:12s} {step:20s} {t['seconds']:9.2f} s  CPU {t['cpu_seconds']:9.2f} s  peak RSS {t['peak_rss_mib']:9.1f} MiB")
            if name in x:
                lines.append(f"  {name:12s} {'total':20s} {x[name]['seconds']:9.2f} s  CPU {x[name]['cpu_seconds']:9.2f} s  "
                             f"peak RSS {x[name]['peak_rss_mib']:9.1f} MiB  output {x['output_bytes'][name]} bytes")
        for k, v in x.get("ratios", {}).items():
            lines.append(f"  {k}: {v}")
        for name, e in x.get("prefill error", {}).items():
            lines.append(f"  prefill weights vs the prefill's fp16 values, {name}: " + ", ".join(f"{k} {v:.4g}" for k, v in e.items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=1024, help="MiB of fp16 weights per function (default 1024)")
    ap.add_argument("--nbits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=16)
    ap.add_argument("--mode", default="kmeans", choices=["kmeans", "uniform"])
    ap.add_argument("--no-reference", action="store_true", help="skip coremltools' pipeline")
    ap.add_argument("--no-drift", action="store_true", help="skip the drift scenario")
    ap.add_argument("--workdir", default=os.path.join(HERE, "out"))
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = ap.parse_args(argv)
    os.makedirs(args.workdir, exist_ok=True)
    result = run(args.workdir, args.size, args.nbits, args.group_size, args.mode, not args.no_reference, not args.no_drift)
    print(render(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
