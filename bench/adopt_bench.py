"""Near-duplicate adoption benchmark: ``merge --adopt`` vs plain ``merge`` vs ``save_multifunction``.

Builds LLM-like infer/prefill pairs the way deployers get them: the same float weights converted
twice with coremltools (sequence length 1 and 8), with a small fraction of the prefill weights'
elements nudged by one fp16 ulp (the drift of graph-dependent casts and constant folding), then
each package compressed separately with coremltools:

* ``lut4``: k-means LUT4, ``per_grouped_channel``, group size 8;
* ``lut6``: k-means LUT6, ``per_grouped_channel``, group size 16;
* ``lut4u``: uniform LUT4, ``per_grouped_channel``, group size 8: the same ops and blob layout as
  ``lut4``, built in seconds rather than coremltools' k-means minutes, so LUT adoption can be
  timed at sizes k-means cannot reach here (a group's LUT only changes when a nudged element is
  its minimum or maximum, so most LUTs are equal and only some indices differ);
* ``lut6u``: uniform LUT6, ``per_grouped_channel``, group size 16: likewise for ``lut6``;
* ``int8``: linear int8, ``per_block`` 32;
* ``int4``: linear int4, ``per_block`` 32;
* ``identical``: the infer package (``int8``) against a copy of itself: every weight is
  byte-identical (adoption must then cost no more than a plain merge);
* ``fp16``: the two float16 packages as converted, not compressed (what ``merge --adopt`` sees
  before ``milsurgery compress``): 0.1 % of elements one ulp apart.

For each size and kind, in one run: an independent computation (coremltools' own decompression
of both packages, float64 numpy, pairs known by construction) lists the pairs that meet the
thresholds and the size the output should have (one function's weight.bin plus the bytes of the
weights that fail); then each tool runs in its own process, timed, with its peak RSS (VmHWM;
and that of the helper processes it started): ``milsurgery merge --adopt``
(weights measured on one process per CPU, the default), ``merge --adopt --workers 1`` (one
process), ``milsurgery merge`` and, unless ``--no-reference``, coremltools'
``save_multifunction``. Inputs are read once before each run (warm page cache); milsurgery's
modules are compiled to bytecode first, as an installed package's are. The adoption pass is
also timed alone, with the default workers and with one: a dry run, in a process that has already
imported numpy and the metrics module (``merge --adopt`` imports them only once some weight
must be measured).
Run from the repository root::

    python bench/adopt_bench.py --sizes 64,256            # fp16 MiB of weights per package
    python bench/adopt_bench.py --sizes 64 --kinds lut4 --no-reference

Inputs are cached in ``--workdir`` (default ``bench/out``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

sys.path.insert(0, ROOT)

from merge_bench import REFERENCE, compile_package, settle, timed, warm, weight_bin  # noqa: E402
from milsurgery.parallel import default_workers  # noqa: E402

KINDS = ("lut4", "lut6", "lut4u", "lut6u", "int8", "int4", "identical", "fp16")
HIDDEN = 2048  # groups of 8 rows hold 16,384 values: kmeans1d, as coremltools picks it for real models
NUDGE = 0.001

BUILD = r"""
import sys
import numpy as np
import coremltools as ct
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import types

path, seq, layers, hidden, nudge = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
ffn = 4 * hidden


def weight(index, shape):
    w = (np.random.default_rng([0, index]).standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16)
    if nudge:
        hit = np.random.default_rng([0, index, 99]).random(shape) < nudge
        w = np.where(hit, np.nextafter(w, np.float16(np.inf)), w).astype(np.float16)
    return w.astype(np.float32)


@mb.program(input_specs=[mb.TensorSpec(shape=(seq, hidden), dtype=types.fp32)], opset_version=ct.target.iOS18)
def prog(x):
    i = 0
    for layer in range(layers):
        shapes = [("q", (hidden, hidden)), ("k", (hidden, hidden)), ("v", (hidden, hidden)), ("o", (hidden, hidden)),
                  ("up", (ffn, hidden)), ("down", (hidden, ffn))]
        w = {}
        for name, shape in shapes:
            w[name] = weight(i, shape)
            i += 1
        q = mb.linear(x=x, weight=w["q"])
        k = mb.linear(x=x, weight=w["k"])
        v = mb.linear(x=x, weight=w["v"])
        a = mb.linear(x=mb.add(x=mb.mul(x=q, y=k), y=v), weight=w["o"])
        x = mb.add(x=x, y=a)
        x = mb.add(x=x, y=mb.linear(x=mb.silu(x=mb.linear(x=x, weight=w["up"])), weight=w["down"]))
    return x


model = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18,
                   compute_precision=ct.precision.FLOAT16)
model.save(path)
"""

COMPRESS = r"""
import sys
import coremltools as ct
import coremltools.optimize.coreml as cto

src, dest, kind = sys.argv[1:4]
model = ct.models.MLModel(src, skip_model_load=True)
if kind in ("lut4", "lut6", "lut4u", "lut6u"):
    nbits, group = (6, 16) if kind.startswith("lut6") else (4, 8)
    mode = "uniform" if kind.endswith("u") else "kmeans"
    op = cto.OpPalettizerConfig(mode=mode, nbits=nbits, granularity="per_grouped_channel", group_size=group)
    out = cto.palettize_weights(model, cto.OptimizationConfig(global_config=op))
else:
    op = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype=kind, granularity="per_block", block_size=32)
    out = cto.linear_quantize_weights(model, cto.OptimizationConfig(global_config=op))
out.save(dest)
"""

EXPECTED = r"""
import json, math, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
from compressed_models import ct_function_weights

a, b, min_cos, max_mean = sys.argv[2], sys.argv[3], float(sys.argv[4]), float(sys.argv[5])
wa, wb = ct_function_weights(a, "main"), ct_function_weights(b, "main")
# Both conversions name the weights the same way (same graph, no extra op): pairs by construction.
out = {"pairs": 0, "pass": [], "fail": [], "identical": 0}
for name, (tv, _) in wb.items():
    av = wa[name][0]
    out["pairs"] += 1
    if np.array_equal(av, tv):
        out["identical"] += 1
        continue
    x, y = av.ravel(), tv.ravel()
    d = x - y
    cos = float(x @ y / math.sqrt((x @ x) * (y @ y)))
    mean = float(np.abs(d).mean())
    (out["pass"] if cos >= min_cos and mean <= max_mean else out["fail"]).append(name)
print(json.dumps(out))
"""


# The adoption pass alone, as `merge --adopt --dry-run` runs it, with the modules it loads on
# demand (numpy, the metrics) imported before it starts: the whole command is timed separately.
DRY_RUN = r"""
import json, sys
import milsurgery.measure
from milsurgery import merge
workers = int(sys.argv[2]) or None
print(json.dumps(merge(sys.argv[3:], sys.argv[1], adopt=True, dry_run=True, workers=workers).to_dict()))
"""


def layers_for(size_mib: int) -> int:
    per_layer = 12 * HIDDEN * HIDDEN * 2  # q, k, v, o (h x h) + up, down (4h x h), fp16
    return max(1, round(size_mib * 2**20 / per_layer))


def run_py(code: str, *args: str, capture: bool = False) -> str:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-c", code, *args], check=True, env=env, text=True,
                          stdout=subprocess.PIPE if capture else subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return done.stdout if capture else ""


def cached(path: str, make) -> str:
    if not os.path.isdir(path):
        print(f"building {path} ...", file=sys.stderr, flush=True)
        tmp = path[: -len(".mlpackage")] + "-building.mlpackage"
        shutil.rmtree(tmp, ignore_errors=True)
        make(tmp)
        os.rename(tmp, path)
    return path


def build_pair(workdir: str, size_mib: int, kind: str) -> tuple[str, str]:
    layers = layers_for(size_mib)
    tag = f"adopt-{size_mib}m-h{HIDDEN}-l{layers}"
    floats = {}
    for name in ("infer", "prefill"):
        floats[name] = os.path.join(workdir, f"{tag}-{name}-fp16.mlpackage")
    if kind == "identical":
        infer, _ = build_pair(workdir, size_mib, "int8")
        copy = os.path.join(workdir, f"{tag}-infer-int8-copy.mlpackage")
        return infer, cached(copy, lambda tmp: shutil.copytree(infer, tmp))
    out = []
    for name in ("infer", "prefill"):
        seq, nudge = (1, 0.0) if name == "infer" else (8, NUDGE)
        src = cached(floats[name], lambda tmp, s=seq, n=nudge: run_py(BUILD, tmp, str(s), str(layers), str(HIDDEN), str(n)))
        if kind == "fp16":
            out.append(src)
            continue
        dest = os.path.join(workdir, f"{tag}-{name}-{kind}.mlpackage")
        out.append(cached(dest, lambda tmp, s=src: run_py(COMPRESS, s, tmp, kind)))
    return out[0], out[1]


def run_case(workdir: str, size_mib: int, kind: str, reference: bool, rounds: int = 1) -> dict:
    a, b = build_pair(workdir, size_mib, kind)
    expected = json.loads(run_py(EXPECTED, os.path.join(ROOT, "tests"), a, b, "0.9999", "0.001", capture=True))
    inputs = os.path.getsize(weight_bin(a)) + os.path.getsize(weight_bin(b))
    result = {"size_mib": size_mib, "kind": kind, "inputs_bytes": inputs, "infer_bytes": os.path.getsize(weight_bin(a)),
              "expected": {k: (len(v) if isinstance(v, list) else v) for k, v in expected.items()}}
    srcs = [f"{a}:main=infer", f"{b}:main=prefill"]
    cmd = [sys.executable, "-m", "milsurgery", "merge", *srcs, "--quiet", "-o"]
    tools = {
        "merge --adopt": cmd[:-2] + ["--adopt", "--json", "-o"],
        "merge --adopt --workers 1": cmd[:-2] + ["--adopt", "--workers", "1", "--json", "-o"],
        "merge": cmd,
    }
    if reference:
        tools["save_multifunction"] = [sys.executable, "-c", REFERENCE, a, b]
    runs: dict[str, list[dict]] = {tool: [] for tool in tools}
    for i in range(rounds):  # the tools take turns, in a different order each round
        order = list(tools) if i % 2 == 0 else list(reversed(tools))
        for tool in order:
            out = os.path.join(workdir, f"out-{tool.replace(' ', '').replace('-', '')}.mlpackage")
            shutil.rmtree(out, ignore_errors=True)
            warm(a)
            warm(b)
            settle()
            r = timed(tools[tool] + [out])
            r["output_bytes"] = os.path.getsize(weight_bin(out))
            runs[tool].append(r)
            shutil.rmtree(out, ignore_errors=True)
    for tool in tools:
        ordered = sorted(runs[tool], key=lambda r: r["seconds"])
        r = dict(ordered[(len(ordered) - 1) // 2])  # the median run (the lower one of an even count)
        r["rounds_seconds"] = [x["seconds"] for x in runs[tool]]
        r["peak_rss_mib"] = max(x["peak_rss_mib"] for x in runs[tool])
        r["peak_rss_helpers_mib"] = max(x["peak_rss_helpers_mib"] for x in runs[tool])
        r["helpers"] = max(x["helpers"] for x in runs[tool])
        result[tool] = r
        if tool == "merge --adopt":
            out = os.path.join(workdir, "out-mergeadopt.mlpackage")
            passes: dict[str, list[float]] = {"": [], "_1_worker": []}
            for i in range(rounds):  # default workers and one process, taking turns
                for suffix in ("", "_1_worker") if i % 2 == 0 else ("_1_worker", ""):
                    workers = "1" if suffix else "0"
                    report = subprocess.run([sys.executable, "-c", DRY_RUN, out + "-dry", workers, *srcs], check=True,
                                            capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT))
                    d = json.loads(report.stdout)
                    passes[suffix].append(d["totals"]["seconds"])
                    adopted = sorted(x["op"] for x in d["adopted"])
                    if result.setdefault("adopted", adopted) != adopted:
                        raise SystemExit(f"{kind}: the dry runs with workers {workers} adopted other weights")
            result["rejected"] = sorted(x["op"] for x in d["rejected"])
            for suffix, values in passes.items():
                result["adopt_seconds_in_process" + suffix] = sorted(values)[(len(values) - 1) // 2]
                result["adopt_seconds_rounds" + suffix] = values
    result["adopted_as_expected"] = result["adopted"] == sorted(expected["pass"]) and result["rejected"] == sorted(expected["fail"])
    ours = result["merge --adopt"]
    result["seconds_per_gib_compressed"] = round(ours["seconds"] / (inputs / 2**30), 2)
    result["pass_seconds_per_gib"] = round(result["adopt_seconds_in_process"] / (inputs / 2**30), 2)
    result["pass_seconds_per_gib_1_worker"] = round(result["adopt_seconds_in_process_1_worker"] / (inputs / 2**30), 2)
    result["seconds_per_gib_compressed_1_worker"] = round(result["merge --adopt --workers 1"]["seconds"] / (inputs / 2**30), 2)
    result["workers"] = default_workers()
    result["output_vs_single"] = round(ours["output_bytes"] / result["infer_bytes"], 4)
    result["time_vs_plain_merge"] = round(ours["seconds"] / result["merge"]["seconds"], 2)
    if reference:
        result["time_vs_save_multifunction"] = round(ours["seconds"] / result["save_multifunction"]["seconds"], 3)
    del result["adopted"], result["rejected"]
    return result


def render(results: list[dict]) -> str:
    lines = []
    for r in results:
        e = r["expected"]
        lines.append(
            f"{r['size_mib']} MiB fp16/package, {r['kind']}: inputs {r['inputs_bytes'] / 2**20:.1f} MiB compressed "
            f"(infer alone {r['infer_bytes'] / 2**20:.1f} MiB); independent check: {e['pass']} pairs pass, "
            f"{e['fail']} fail, {e['identical']} identical of {e['pairs']}; adopted as expected: {r['adopted_as_expected']}"
        )
        for tool in ("merge --adopt", "merge --adopt --workers 1", "merge", "save_multifunction"):
            if tool in r:
                t = r[tool]
                helpers = f" + {t['helpers']} helper(s) <= {t['peak_rss_helpers_mib']:5.1f} MiB" if t["helpers"] else ""
                lines.append(f"  {tool:22s} {t['seconds']:8.2f} s  peak RSS {t['peak_rss_mib']:7.1f} MiB{helpers}  "
                             f"weight.bin {t['output_bytes'] / 2**20:8.1f} MiB")
        extra = f", {r['time_vs_save_multifunction']}x save_multifunction's time" if "time_vs_save_multifunction" in r else ""
        lines.append(f"  adoption pass (in process, dry run): {r['adopt_seconds_in_process']:.2f} s, "
                     f"{r['pass_seconds_per_gib']} s per GiB of input ({r['workers']} processes); one process "
                     f"{r['adopt_seconds_in_process_1_worker']:.2f} s, {r['pass_seconds_per_gib_1_worker']} s per GiB")
        lines.append(f"  adopt: {r['seconds_per_gib_compressed']} s per GiB of compressed input "
                     f"({r['seconds_per_gib_compressed_1_worker']} with --workers 1), output "
                     f"{r['output_vs_single']}x the single function, {r['time_vs_plain_merge']}x plain merge's time{extra}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="64", help="comma-separated MiB of fp16 weights per package")
    p.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated among {', '.join(KINDS)}")
    p.add_argument("--no-reference", action="store_true", help="skip coremltools' save_multifunction")
    p.add_argument("--rounds", type=int, default=1, help="runs of each tool, taking turns; the median is reported")
    p.add_argument("--workdir", default=os.path.join(HERE, "out"))
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args(argv)
    os.makedirs(args.workdir, exist_ok=True)
    compile_package()
    results = []
    for size in (int(s) for s in args.sizes.split(",")):
        for kind in args.kinds.split(","):
            if kind not in KINDS:
                p.error(f"unknown kind {kind!r}")
            results.append(run_case(args.workdir, size, kind, not args.no_reference, args.rounds))
            print(render(results[-1:]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
