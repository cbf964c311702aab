"""Show benchmark: the program as text with ``milsurgery show`` vs coremltools, in one run.

coremltools prints a program only as its pymil ``Program``: its milproto loader
(``coremltools.converters.mil.frontend.milproto.load.load``, given the spec and the weights
directory) builds every op and gives each weight a numpy value, then ``str(program)`` prints it.
``milsurgery show`` parses the spec and the blob records and prints, reading no weight bytes.
Each tool runs in its own process on the same LLM-like package (the ``infer`` package of
``merge_bench.py``: sequence length 1, 32k vocabulary; cached in ``--workdir``), in
``--repeat`` shuffled rounds with a warm page cache; the median wall time and the peak RSS
(VmHWM) are printed with the ratios. Run from the repository root::

    python bench/show_bench.py --sizes 256,1024 --repeat 3

Needs coremltools (``pip install '.[test]'``) to build the inputs and run the reference.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from merge_bench import build_llm, run_interleaved, warm, weight_bin  # noqa: E402

REFERENCE = """
import os, sys
import coremltools as ct
from coremltools.converters.mil.frontend.milproto.load import load
spec = ct.utils.load_spec(sys.argv[1])
weights = os.path.join(sys.argv[1], "Data", "com.apple.CoreML", "weights")
program = load(spec, spec.specificationVersion, weights)
sys.stdout.write(str(program))
"""

TOOLS = ("coremltools", "milsurgery show")


def run_size(workdir: str, size_mib: int, repeat: int) -> dict:
    pkg = build_llm(workdir, size_mib, "infer", 1)
    warm(pkg)
    spec = os.path.join(pkg, "Data", "com.apple.CoreML", "model.mlmodel")
    tools = {
        "coremltools": ([sys.executable, "-c", REFERENCE, pkg], lambda: warm(pkg), spec),
        "milsurgery show": ([sys.executable, "-m", "milsurgery", "show", pkg], lambda: warm(pkg), spec),
    }
    result = {"size_mib": size_mib, "repeat": repeat, "weight_bytes": os.path.getsize(weight_bin(pkg))}
    result.update(run_interleaved(tools, repeat, seed=size_mib))
    for t in TOOLS:
        result[t].pop("output_bytes", None)
    result["speedup"] = round(result["coremltools"]["seconds"] / result["milsurgery show"]["seconds"], 1)
    result["rss_ratio"] = round(result["coremltools"]["peak_rss_mib"] / result["milsurgery show"]["peak_rss_mib"], 1)
    return result


def render(results: list[dict]) -> str:
    lines = ["| MiB of weights | tool | wall s (median) | runs s | peak RSS MiB |", "|---|---|---|---|---|"]
    for r in results:
        for tool in TOOLS:
            t = r[tool]
            runs = " ".join(f"{x:.2f}" for x in t["runs_seconds"])
            lines.append(f"| {r['size_mib']} | {tool} | {t['seconds']:.2f} | {runs} | {t['peak_rss_mib']:.0f} |")
    lines.append("")
    for r in results:
        lines.append(f"{r['size_mib']} MiB: milsurgery show is {r['speedup']}x faster with {r['rss_ratio']}x less peak RSS")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="256", help="MiB of weights, comma-separated (default 256)")
    parser.add_argument("--workdir", default=os.path.join(HERE, "out"), help="where inputs are cached")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per tool (median reported)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    os.makedirs(args.workdir, exist_ok=True)
    os.environ["PYTHONPATH"] = ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")
    results = [run_size(args.workdir, int(s), args.repeat) for s in args.sizes.split(",")]
    print(render(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
