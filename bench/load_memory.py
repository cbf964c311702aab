"""Load memory of each function of a Core ML package, per compute unit (macOS 15+, Apple silicon).

What it measures
    For every package and compute unit (CPU_ONLY, CPU_AND_GPU and CPU_AND_NE by default) a fresh
    Python process loads the package's functions one at a time with
    ``coremltools.models.MLModel(path, function_name=NAME, compute_units=coremltools.ComputeUnit.X)``,
    keeping every model alive. After each load, and after one prediction on inputs synthesized
    from the spec, it records the process's ``phys_footprint`` (the figure Jetsam and Xcode's
    memory gauge use) and its resident size, both read with ``task_info(TASK_VM_INFO)``; every
    other field of ``task_vm_info`` is kept in the JSON too (``ledger_tag_neural_footprint``, ...).

    The growth each further function adds is set against milsurgery's weight-memory model
    (:func:`milsurgery.memory.memory_model`): a *shared mapping* (a blob costs memory once,
    whichever functions reference it) against a *per-function copy* (every function pays for
    all the weights it references). The first function's growth also holds Core ML's one-time
    runtime setup, so the comparison is meaningful from the second function on.

    ``--separate`` adds, per compute unit, a run loading the same functions from separate
    single-function packages (one ``MLModel`` each, same order, same process): what a merged
    package should beat. A ``plan.json`` written by ``bench/make_experiments.py`` may stand in
    for PKG: it names each experiment package and its separate counterparts.

What it needs
    macOS 15 or later on Apple silicon (an arm64 Python, not Rosetta) and coremltools 8 or later
    (``pip install coremltools``); milsurgery is imported from this checkout. Anywhere else the
    script exits with status 2 and says so; ``--plan-only`` works anywhere.

Run on a Mac, from the repository root::

    python3 bench/load_memory.py llm.mlpackage --json load.json --markdown load.md
    python3 bench/load_memory.py llm.mlpackage --functions infer,prefill \\
        --separate infer.mlpackage prefill.mlpackage
    python3 bench/load_memory.py experiments/plan.json --repeats 3 \\
        --json experiments/results.json --markdown experiments/results.md

Exit status: 0 every run measured, 1 some run failed (its error is in the results), 2 bad usage
or an unsupported platform. Each child process prints one JSON line on stdout; the parent
collects them, prints the Markdown report and writes the files asked for (the JSON after every
run, so a long experiment keeps what it measured).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import functools
import gc
import importlib.metadata
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from milsurgery import MilSurgeryError  # noqa: E402
from milsurgery.memory import memory_model  # noqa: E402
from milsurgery.package import Package  # noqa: E402
from milsurgery.spec import default_function, function_descriptions, pb  # noqa: E402

PROG = "load_memory.py"
RESULTS_SCHEMA = 1
COMPUTE_UNITS = ("CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE", "ALL")  # names of coremltools.ComputeUnit
DEFAULT_COMPUTE_UNITS = ("CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE")
MIN_MACOS = 15
#: Page size of Apple silicon: the granularity of the shared-mapping prediction.
APPLE_SILICON_PAGE = 16384
MIB = 1 << 20
DEFAULT_TIMEOUT = 1800.0


class PlanError(ValueError):
    """The packages and options do not make a runnable experiment."""


class UnsupportedInput(ValueError):
    """An input whose type this script cannot synthesize."""


# ---------------------------------------------------------------------------------------------
# Command line


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _is_plan_file(item: str) -> bool:
    """A PKG argument naming an experiment plan (``plan.json``) rather than a package."""
    return item.lower().endswith(".json")


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("packages", nargs="+", metavar="PKG",
                   help="an .mlpackage, or a plan.json written by bench/make_experiments.py")
    p.add_argument("--compute-units", default=",".join(DEFAULT_COMPUTE_UNITS), metavar="CU[,CU...]",
                   help=f"compute units, each its own runs (default {','.join(DEFAULT_COMPUTE_UNITS)}; "
                        f"choose from {', '.join(COMPUTE_UNITS)})")
    p.add_argument("--functions", metavar="F1,F2",
                   help="functions to load, in this order (default: all, in the package's order)")
    p.add_argument("--separate", nargs="+", metavar="DIR_OR_PKG",
                   help="the same functions as separate packages: one per function in load order, "
                        "or one directory holding FUNCTION.mlpackage for each (put PKG first)")
    p.add_argument("--json", metavar="OUT.json", help="write every raw measurement as JSON")
    p.add_argument("--markdown", metavar="OUT.md", help="write the report as Markdown")
    p.add_argument("--plan-only", action="store_true", help="print the runs as JSON and exit (works anywhere)")
    p.add_argument("--no-predict", action="store_true", help="only load; no prediction after each load")
    p.add_argument("--repeats", type=int, default=1, metavar="N",
                   help="run each configuration N times, each in a fresh process (report: medians)")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                   help=f"time limit of one child process (default {DEFAULT_TIMEOUT:g})")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and validate the command line; exits with status 2 on a usage error.

    ``compute_units`` becomes a list of names, ``functions`` a list or ``None``.
    """
    parser = _build_parser()
    args = parser.parse_args(argv)
    units = _csv(args.compute_units)
    unknown = [u for u in units if u not in COMPUTE_UNITS]
    if unknown:
        parser.error(f"--compute-units: unknown compute unit {unknown[0]!r} (choose from {', '.join(COMPUTE_UNITS)})")
    if not units:
        parser.error("--compute-units: name at least one compute unit")
    args.compute_units = list(dict.fromkeys(units))
    if args.functions is not None:
        args.functions = _csv(args.functions)
        if not args.functions:
            parser.error("--functions: name at least one function")
        if len(set(args.functions)) != len(args.functions):
            parser.error(f"--functions: a function is named twice in {args.functions}")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.timeout <= 0:
        parser.error("--timeout must be positive")
    if args.separate is not None:
        if len(args.packages) != 1 or _is_plan_file(args.packages[0]):
            parser.error("--separate needs exactly one PKG, a package (a plan.json names its own)")
    return args


def unmet_requirement(
    system: str | None = None,
    machine: str | None = None,
    macos: str | None = None,
    have_coremltools: bool | None = None,
) -> str | None:
    """``None`` when measurements can run here, else the one-line message saying what is needed.

    The arguments default to this process's platform; tests pass others.
    """
    system = sys.platform if system is None else system
    machine = platform.machine() if machine is None else machine
    macos = platform.mac_ver()[0] if macos is None else macos
    if have_coremltools is None:
        have_coremltools = importlib.util.find_spec("coremltools") is not None
    problems = []
    if system != "darwin":
        problems.append(f"this is {platform.system() if system == sys.platform else system} {machine}")
    else:
        if machine != "arm64":
            problems.append(f"this Python runs as {machine}, not arm64")
        major = macos.split(".")[0]
        if not major.isdigit() or int(major) < MIN_MACOS:
            problems.append(f"this is macOS {macos or 'of unknown version'}")
    if not have_coremltools:
        problems.append("coremltools is not installed")
    if not problems:
        return None
    return (f"{PROG}: needs macOS {MIN_MACOS}+ on Apple silicon (arm64) with coremltools installed; "
            f"{'; '.join(problems)} (--plan-only works anywhere)")


# ---------------------------------------------------------------------------------------------
# The plan: one configuration per child process


def read_experiment_plan(path: str) -> list[tuple[str, dict[str, str] | None]]:
    """(package, {function: separate package} or None) for each package of a ``plan.json``."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise PlanError(f"{path}: cannot read the experiment plan ({exc})") from None
    entries = data.get("packages") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise PlanError(f"{path}: not an experiment plan (no list 'packages')")
    base = os.path.dirname(os.path.abspath(path))
    resolve = lambda rel: os.path.join(base, *rel.split("/"))  # noqa: E731 - plans use '/'
    sources = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            raise PlanError(f"{path}: packages[{i}] has no 'path'")
        separate = entry.get("separate")
        sources.append((resolve(entry["path"]),
                        {f: resolve(p) for f, p in separate.items()} if separate else None))
    return sources


def _function_order(package: str, requested: list[str] | None) -> list[str]:
    with Package(package) as pkg:
        if requested is None:
            return list(pkg.functions)
        for name in requested:
            if name not in pkg.functions:
                raise PlanError(f"{pkg.path}: no function {name!r} (it has {pkg.functions})")
        return list(requested)


def _separate_paths(separate, order: list[str]) -> list[str]:
    """One separate package per function of ``order``, from a mapping, a directory or a list."""
    if isinstance(separate, dict):
        missing = [f for f in order if f not in separate]
        if missing:
            raise PlanError(f"no separate package for function {missing[0]!r}")
        return [separate[f] for f in order]
    if len(separate) == 1 and not separate[0].rstrip("/").endswith(".mlpackage"):
        return [os.path.join(separate[0], f"{f}.mlpackage") for f in order]
    if len(separate) != len(order):
        raise PlanError(f"--separate gives {len(separate)} packages for {len(order)} functions {order}")
    return list(separate)


def _separate_function(path: str, wanted: str) -> str:
    """The function to load from a separate package: ``wanted`` if it has it, else its only one."""
    if not os.path.isdir(path):
        raise PlanError(f"{path}: separate package for function {wanted!r} does not exist")
    with Package(path) as pkg:
        if wanted in pkg.functions:
            return wanted
        if len(pkg.functions) == 1:
            return default_function(pkg.model)
        raise PlanError(f"{pkg.path}: has functions {pkg.functions}, none named {wanted!r}")


def _loads(package: str, order: list[str], separate) -> dict[str, list[dict]]:
    """Mode -> the MLModel loads of one child run, in order."""
    runs = {"merged": [{"function": f, "path": package, "function_name": f} for f in order]}
    if separate is not None:
        paths = [os.path.abspath(p) for p in _separate_paths(separate, order)]
        runs["separate"] = [
            {"function": f, "path": p, "function_name": _separate_function(p, f)} for f, p in zip(order, paths)
        ]
    return runs


def build_plan(args: argparse.Namespace) -> list[dict]:
    """Every child run: each package x compute unit x repeat, the merged run then the separate one.

    A run's ``loads`` name what it loads, in order: the package and function for ``merged``, the
    separate package and the function to load from it for ``separate`` (same function order).
    Reads package specs (never weights) to know their functions.
    """
    sources = []
    for item in args.packages:
        if _is_plan_file(item):
            sources.extend(read_experiment_plan(item))
        else:
            sources.append((item, args.separate))
    plan = []
    for package, separate in sources:
        package = os.path.abspath(package)
        order = _function_order(package, args.functions)
        runs = _loads(package, order, separate)
        for unit in args.compute_units:
            for repeat in range(args.repeats):
                for mode, loads in runs.items():
                    plan.append({
                        "package": package,
                        "mode": mode,
                        "compute_unit": unit,
                        "functions": order,
                        "loads": loads,
                        "predict": not args.no_predict,
                        "repeat": repeat,
                    })
    return plan


# ---------------------------------------------------------------------------------------------
# Inputs synthesized from the spec (milsurgery's parser; coremltools is not needed)

_ARRAY_DTYPES = {
    pb.ArrayFeatureType.FLOAT32: np.float32,
    pb.ArrayFeatureType.FLOAT16: np.float16,
    pb.ArrayFeatureType.DOUBLE: np.float64,
    pb.ArrayFeatureType.INT32: np.int32,
    pb.ArrayFeatureType.INT8: np.int8,
}
_PIL_MODES = {
    pb.ImageFeatureType.GRAYSCALE: "L",
    pb.ImageFeatureType.GRAYSCALE_FLOAT16: "F",
    pb.ImageFeatureType.RGB: "RGB",
    pb.ImageFeatureType.BGR: "RGB",
}


def input_shape(feature: pb.FeatureDescription) -> tuple[int, ...]:
    """A multi-array input's shape: the lower bounds of a shape range, the first enumerated
    shape, else the default shape."""
    array = feature.type.multiArrayType
    flexibility = array.WhichOneof("ShapeFlexibility")
    if flexibility == "shapeRange" and array.shapeRange.sizeRanges:
        shape = tuple(max(1, r.lowerBound) for r in array.shapeRange.sizeRanges)
    elif flexibility == "enumeratedShapes" and array.enumeratedShapes.shapes:
        shape = tuple(array.enumeratedShapes.shapes[0].shape)
    else:
        shape = tuple(array.shape)
    if not shape or any(d < 1 for d in shape):
        raise UnsupportedInput(f"input {feature.name!r}: multi-array has no usable shape ({list(shape)})")
    return shape


def _array_input(feature: pb.FeatureDescription, rng: np.random.Generator) -> np.ndarray:
    code = feature.type.multiArrayType.dataType
    dtype = _ARRAY_DTYPES.get(code)
    if dtype is None:
        name = pb.ArrayFeatureType.ArrayDataType.Name(code) if code in pb.ArrayFeatureType.ArrayDataType.values() else code
        raise UnsupportedInput(f"input {feature.name!r}: multi-array data type {name} is not supported")
    shape = input_shape(feature)
    if np.issubdtype(dtype, np.floating):
        return rng.standard_normal(shape, dtype=np.float32).astype(dtype)
    return np.zeros(shape, dtype)  # integer inputs are usually indices: 0 is always valid


def _image_size(image: pb.ImageFeatureType) -> tuple[int, int]:
    flexibility = image.WhichOneof("SizeFlexibility")
    if flexibility == "imageSizeRange":
        r = image.imageSizeRange
        return max(1, r.widthRange.lowerBound), max(1, r.heightRange.lowerBound)
    if flexibility == "enumeratedSizes" and image.enumeratedSizes.sizes:
        first = image.enumeratedSizes.sizes[0]
        return first.width, first.height
    return image.width, image.height


def _image_input(feature: pb.FeatureDescription):
    try:
        from PIL import Image
    except ImportError:
        raise UnsupportedInput(
            f"input {feature.name!r} is an image: synthesizing it needs Pillow (pip install pillow), "
            "which is not installed"
        ) from None
    image = feature.type.imageType
    mode = _PIL_MODES.get(image.colorSpace)
    width, height = _image_size(image)
    if mode is None or width < 1 or height < 1:
        raise UnsupportedInput(f"input {feature.name!r}: image of color space {image.colorSpace} and size "
                               f"{width}x{height} is not supported")
    return Image.new(mode, (width, height))


def synthesize_inputs(description: pb.FunctionDescription, *, seed: int = 0) -> dict:
    """Deterministic inputs for one prediction: input name -> numpy array (PIL image for images).

    Float arrays are standard-normal from a generator seeded with ``seed``; integer arrays are
    zeros. Optional inputs of types this cannot make are left out; any other such input raises
    :class:`UnsupportedInput` naming it. States are not inputs (see :func:`measure`).
    """
    rng = np.random.default_rng(seed)
    inputs = {}
    for feature in description.input:
        kind = feature.type.WhichOneof("Type")
        if kind == "multiArrayType":
            inputs[feature.name] = _array_input(feature, rng)
        elif kind == "imageType":
            inputs[feature.name] = _image_input(feature)
        elif not feature.type.isOptional:
            raise UnsupportedInput(f"input {feature.name!r}: {kind or 'untyped'} inputs are not supported "
                                   "(multi-arrays and images are)")
    return inputs


# ---------------------------------------------------------------------------------------------
# phys_footprint and resident size: task_info(mach_task_self(), TASK_VM_INFO, ...)

TASK_VM_INFO = 22
KERN_SUCCESS = 0


class TaskVMInfo(ctypes.Structure):
    """``task_vm_info_data_t`` of <mach/task_info.h> (macOS 15 SDK, revision 7).

    The header declares it under ``#pragma pack(push, 4)``: 8-byte fields are only 4-aligned, so
    ``ledger_swapins`` follows ``decompressions`` at offset 348 with no padding.
    """

    _layout_ = "ms"  # needed with _pack_ from Python 3.14 on; ignored before
    _pack_ = 4
    _fields_ = [
        ("virtual_size", ctypes.c_uint64),
        ("region_count", ctypes.c_int32),
        ("page_size", ctypes.c_int32),
        ("resident_size", ctypes.c_uint64),
        ("resident_size_peak", ctypes.c_uint64),
        ("device", ctypes.c_uint64),
        ("device_peak", ctypes.c_uint64),
        ("internal", ctypes.c_uint64),
        ("internal_peak", ctypes.c_uint64),
        ("external", ctypes.c_uint64),
        ("external_peak", ctypes.c_uint64),
        ("reusable", ctypes.c_uint64),
        ("reusable_peak", ctypes.c_uint64),
        ("purgeable_volatile_pmap", ctypes.c_uint64),
        ("purgeable_volatile_resident", ctypes.c_uint64),
        ("purgeable_volatile_virtual", ctypes.c_uint64),
        ("compressed", ctypes.c_uint64),
        ("compressed_peak", ctypes.c_uint64),
        ("compressed_lifetime", ctypes.c_uint64),
        # rev1
        ("phys_footprint", ctypes.c_uint64),
        # rev2
        ("min_address", ctypes.c_uint64),
        ("max_address", ctypes.c_uint64),
        # rev3
        ("ledger_phys_footprint_peak", ctypes.c_int64),
        ("ledger_purgeable_nonvolatile", ctypes.c_int64),
        ("ledger_purgeable_novolatile_compressed", ctypes.c_int64),  # sic, as the header spells it
        ("ledger_purgeable_volatile", ctypes.c_int64),
        ("ledger_purgeable_volatile_compressed", ctypes.c_int64),
        ("ledger_tag_network_nonvolatile", ctypes.c_int64),
        ("ledger_tag_network_nonvolatile_compressed", ctypes.c_int64),
        ("ledger_tag_network_volatile", ctypes.c_int64),
        ("ledger_tag_network_volatile_compressed", ctypes.c_int64),
        ("ledger_tag_media_footprint", ctypes.c_int64),
        ("ledger_tag_media_footprint_compressed", ctypes.c_int64),
        ("ledger_tag_media_nofootprint", ctypes.c_int64),
        ("ledger_tag_media_nofootprint_compressed", ctypes.c_int64),
        ("ledger_tag_graphics_footprint", ctypes.c_int64),
        ("ledger_tag_graphics_footprint_compressed", ctypes.c_int64),
        ("ledger_tag_graphics_nofootprint", ctypes.c_int64),
        ("ledger_tag_graphics_nofootprint_compressed", ctypes.c_int64),
        ("ledger_tag_neural_footprint", ctypes.c_int64),
        ("ledger_tag_neural_footprint_compressed", ctypes.c_int64),
        ("ledger_tag_neural_nofootprint", ctypes.c_int64),
        ("ledger_tag_neural_nofootprint_compressed", ctypes.c_int64),
        # rev4
        ("limit_bytes_remaining", ctypes.c_uint64),
        # rev5
        ("decompressions", ctypes.c_int32),
        # rev6
        ("ledger_swapins", ctypes.c_int64),
        # rev7
        ("ledger_tag_neural_nofootprint_total", ctypes.c_int64),
        ("ledger_tag_neural_nofootprint_peak", ctypes.c_int64),
    ]


#: TASK_VM_INFO_COUNT: the struct's size in natural_t (32-bit) units.
TASK_VM_INFO_COUNT = ctypes.sizeof(TaskVMInfo) // ctypes.sizeof(ctypes.c_uint32)


def filled_fields(info: TaskVMInfo, count: int) -> dict[str, int]:
    """The fields of ``info`` the kernel filled, given the count (natural_t units) it returned.

    An older kernel fills an older, shorter revision of the struct.
    """
    filled = count * ctypes.sizeof(ctypes.c_uint32)
    return {
        name: getattr(info, name)
        for name, ctype in TaskVMInfo._fields_
        if getattr(TaskVMInfo, name).offset + ctypes.sizeof(ctype) <= filled
    }


@functools.lru_cache(maxsize=1)
def _libsystem():
    lib = ctypes.CDLL(ctypes.util.find_library("System"))
    lib.task_info.argtypes = [ctypes.c_uint32, ctypes.c_uint32, ctypes.POINTER(TaskVMInfo), ctypes.POINTER(ctypes.c_uint32)]
    lib.task_info.restype = ctypes.c_int
    return lib


def task_vm_info() -> dict[str, int]:
    """This process's ``task_vm_info`` as a dict (bytes); raises ``OSError`` off macOS."""
    if sys.platform != "darwin":
        raise OSError("task_info(TASK_VM_INFO) needs macOS")
    lib = _libsystem()
    task = ctypes.c_uint32.in_dll(lib, "mach_task_self_").value  # what mach_task_self() reads
    info = TaskVMInfo()
    count = ctypes.c_uint32(TASK_VM_INFO_COUNT)
    kr = lib.task_info(task, TASK_VM_INFO, ctypes.byref(info), ctypes.byref(count))
    if kr != KERN_SUCCESS:
        raise OSError(f"task_info(TASK_VM_INFO) failed: kern_return_t {kr}")
    fields = filled_fields(info, count.value)
    if "phys_footprint" not in fields:
        raise OSError(f"task_info(TASK_VM_INFO) returned {count.value} words, too few for phys_footprint")
    return fields


# ---------------------------------------------------------------------------------------------
# The child: one configuration in a fresh process


def _description(load: dict) -> pb.FunctionDescription:
    with Package(load["path"]) as pkg:
        return function_descriptions(pkg.model)[load["function_name"]]


def _sample(kind: str, function: str | None, seconds: float | None) -> dict:
    return {
        "step": kind if function is None else f"{kind} {function}",
        "kind": kind,
        "function": function,
        "seconds": seconds,
        "memory": task_vm_info(),
    }


def _child_environment(ct) -> dict:
    return {"pid": os.getpid(), "coremltools": ct.__version__, "macos": platform.mac_ver()[0],
            "machine": platform.machine(), "task_vm_info_count": TASK_VM_INFO_COUNT}


def measure(config: dict) -> dict:
    """Run one configuration in this process: baseline, then per function a load and (unless
    ``predict`` is false) one prediction, sampling memory after each step.

    Inputs are synthesized and specs read before the baseline, so deltas are Core ML's alone.
    A stateful function predicts with ``state=model.make_state()``. A failing step ends the run;
    the samples so far are kept and ``error`` names the step.
    """
    import coremltools as ct

    loads = config["loads"]
    descriptions = [_description(load) for load in loads]
    feeds = [synthesize_inputs(d) if config["predict"] else None for d in descriptions]
    unit = getattr(ct.ComputeUnit, config["compute_unit"])
    result = {"config": config, "samples": [], "error": None, "environment": _child_environment(ct)}
    alive = []  # every model and state stays referenced until the process ends
    gc.collect()
    step = "baseline"
    try:
        result["samples"].append(_sample("baseline", None, None))
        for load, description, feed in zip(loads, descriptions, feeds):
            step = f"load {load['function']}"
            start = time.perf_counter()
            model = ct.models.MLModel(load["path"], function_name=load["function_name"], compute_units=unit)
            alive.append(model)
            result["samples"].append(_sample("load", load["function"], time.perf_counter() - start))
            if feed is None:
                continue
            step = f"predict {load['function']}"
            start = time.perf_counter()
            kwargs = {"state": model.make_state()} if description.state else {}
            alive.append(kwargs)
            model.predict(feed, **kwargs)
            result["samples"].append(_sample("predict", load["function"], time.perf_counter() - start))
    except Exception as exc:  # noqa: BLE001 - reported, with the step, to the parent
        result["error"] = f"{step}: {type(exc).__name__}: {exc}"
    return result


def child_main(config_json: str) -> int:
    """``--child CONFIG``: measure one configuration; print exactly one JSON line on stdout.

    Whatever else anything writes to stdout (Python or native code) goes to stderr.
    """
    sys.stdout.flush()
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    config = None
    try:
        config = json.loads(config_json)
        result = measure(config)
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        result = {"config": config, "samples": [], "error": f"{type(exc).__name__}: {exc}"}
    sys.stdout.flush()
    out.write(json.dumps(result) + "\n")
    out.close()
    return 0


# ---------------------------------------------------------------------------------------------
# The parent: run every configuration, predict, report


def _last_json_line(text: str) -> dict | None:
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                return None
    return None


def run_config(config: dict, timeout: float) -> dict:
    """Measure ``config`` in a fresh child process (this script with ``--child``)."""
    command = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(config)]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"config": config, "samples": [], "error": f"child timed out after {timeout:g} s"}
    result = _last_json_line(proc.stdout)
    stderr_tail = proc.stderr.strip().splitlines()[-20:]
    if result is None:
        last = stderr_tail[-1] if stderr_tail else "no output"
        return {"config": config, "samples": [], "error": f"child exited with status {proc.returncode}: {last}",
                "stderr_tail": stderr_tail}
    if proc.returncode != 0 and not result.get("error"):
        result["error"] = f"child exited with status {proc.returncode}"
    if result.get("error"):
        result["stderr_tail"] = stderr_tail
    return result


def _predict_run(config: dict, page_size: int) -> list[dict]:
    """Per function of a run: weight bytes it references, and what it adds under each regime."""
    rows = []
    if config["mode"] == "merged":
        model = memory_model(config["package"], config["functions"], page_size=page_size, duplicates=False)
        for f in model["functions"]:
            rows.append({"function": f["name"], "referenced_bytes": f["referenced_bytes"],
                         "shared_mapping_added_bytes": f["added_page_bytes"],
                         "per_function_copy_added_bytes": f["referenced_bytes"]})
        return rows
    for load in config["loads"]:  # separate files share nothing: both regimes pay in full
        f = memory_model(load["path"], [load["function_name"]], page_size=page_size, duplicates=False)["functions"][0]
        rows.append({"function": load["function"], "referenced_bytes": f["referenced_bytes"],
                     "shared_mapping_added_bytes": f["referenced_page_bytes"],
                     "per_function_copy_added_bytes": f["referenced_bytes"]})
    return rows


def weight_predictions(plan: list[dict], page_size: int = APPLE_SILICON_PAGE) -> list[dict]:
    """The memory model's predictions for every distinct (package, mode, order) of the plan."""
    seen: dict[tuple, dict] = {}
    for config in plan:
        key = (config["package"], config["mode"], tuple(config["functions"]))
        if key not in seen:
            seen[key] = {"package": config["package"], "mode": config["mode"], "page_size": page_size,
                         "functions": _predict_run(config, page_size)}
    return list(seen.values())


def _sysctl(name: str) -> str | None:
    if sys.platform != "darwin":
        return None
    try:
        return subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment() -> dict:
    try:
        coremltools = importlib.metadata.version("coremltools")
    except importlib.metadata.PackageNotFoundError:
        coremltools = None
    return {"macos": platform.mac_ver()[0], "machine": platform.machine(),
            "chip": _sysctl("machdep.cpu.brand_string"), "coremltools": coremltools,
            "python": platform.python_version()}


def _write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def run_plan(plan: list[dict], *, timeout: float = DEFAULT_TIMEOUT, json_path: str | None = None) -> dict:
    """Run every configuration, one child each, in plan order; the results document."""
    results = {"schema": RESULTS_SCHEMA, "environment": environment(),
               "predictions": weight_predictions(plan), "runs": []}
    for i, config in enumerate(plan, 1):
        label = f"{os.path.basename(config['package'])} {config['mode']} {config['compute_unit']}"
        print(f"[{i}/{len(plan)}] {label} (repeat {config['repeat'] + 1}) ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        run = run_config(config, timeout)
        run["wall_seconds"] = round(time.perf_counter() - start, 3)
        results["runs"].append(run)
        if run.get("error"):
            print(f"    failed: {run['error']}", file=sys.stderr, flush=True)
        if json_path:
            _write_text(json_path, json.dumps(results, indent=2) + "\n")
    return results


# ---------------------------------------------------------------------------------------------
# The Markdown report


def _mib(n: float | None) -> str:
    return "" if n is None else f"{n / MIB:.2f}"


def _delta_mib(n: float | None) -> str:
    return "" if n is None else f"{n / MIB:+.2f}"


def _groups(runs: list[dict]) -> dict[tuple[str, str, str], list[dict]]:
    """(package, mode, compute unit) -> its runs, in order of first appearance."""
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for run in runs:
        c = run["config"]
        groups.setdefault((c["package"], c["mode"], c["compute_unit"]), []).append(run)
    return groups


def _median_steps(runs: list[dict]) -> list[dict]:
    """Steps of the runs that completed, each metric the median over those runs."""
    complete = [r for r in runs if not r.get("error") and r.get("samples")]
    if not complete:
        return []
    steps = []
    for sample in complete[0]["samples"]:
        same = [s for r in complete for s in r["samples"] if s["step"] == sample["step"]]
        seconds = [s["seconds"] for s in same if s["seconds"] is not None]
        steps.append({
            "step": sample["step"], "kind": sample["kind"], "function": sample["function"],
            "phys": statistics.median(s["memory"]["phys_footprint"] for s in same),
            "rss": statistics.median(s["memory"]["resident_size"] for s in same),
            "seconds": statistics.median(seconds) if seconds else None,
        })
    return steps


def _step_rows(mode: str, unit: str, steps: list[dict]) -> list[str]:
    rows, previous = [], None
    for s in steps:
        dp = None if previous is None else s["phys"] - previous["phys"]
        dr = None if previous is None else s["rss"] - previous["rss"]
        seconds = "" if s["seconds"] is None else f"{s['seconds']:.2f}"
        rows.append(f"| {mode} | {unit} | {s['step']} | {_mib(s['phys'])} | {_delta_mib(dp)} | "
                    f"{_mib(s['rss'])} | {_delta_mib(dr)} | {seconds} |")
        previous = s
    return rows


def _growth(steps: list[dict], functions: list[str]) -> list[tuple[str, float, float]]:
    """(function, phys growth, rss growth): each function's last step against the one before."""
    last = {s["function"]: s for s in steps if s["function"] is not None}
    out, before = [], steps[0]
    for f in functions:
        if f not in last:
            break
        out.append((f, last[f]["phys"] - before["phys"], last[f]["rss"] - before["rss"]))
        before = last[f]
    return out


def _closer(index: int, growth: float, shared: int, copy: int) -> str:
    if index == 0:
        return "first function (includes runtime setup)"
    if shared == copy:
        return "either (nothing shared)"
    return "shared mapping" if abs(growth - shared) < abs(growth - copy) else "per-function copy"


def _growth_rows(mode: str, unit: str, steps: list[dict], functions: list[str], predicted: dict) -> list[str]:
    rows = []
    for i, (f, phys, rss) in enumerate(_growth(steps, functions)):
        p = predicted.get(f)
        shared = p["shared_mapping_added_bytes"] if p else None
        copy = p["per_function_copy_added_bytes"] if p else None
        closer = _closer(i, phys, shared, copy) if p else ""
        rows.append(f"| {mode} | {unit} | {f} | {_delta_mib(phys)} | {_delta_mib(rss)} | {_mib(shared)} | "
                    f"{_mib(copy)} | {closer} |")
    return rows


def _environment_line(env: dict) -> str:
    parts = [f"macOS {env['macos']}" if env.get("macos") else None, env.get("machine"), env.get("chip"),
             f"coremltools {env['coremltools']}" if env.get("coremltools") else None,
             f"Python {env['python']}" if env.get("python") else None]
    return ", ".join(p for p in parts if p)


STEP_HEADER = [
    "| mode | compute unit | step | phys_footprint MiB | Δ phys_footprint MiB | RSS MiB | Δ RSS MiB | seconds |",
    "|---|---|---|---:|---:|---:|---:|---:|",
]
GROWTH_HEADER = [
    "| mode | compute unit | function | measured Δ phys_footprint MiB | measured Δ RSS MiB | "
    "model: shared mapping adds MiB | model: per-function copy adds MiB | phys_footprint closer to |",
    "|---|---|---|---:|---:|---:|---:|---|",
]


def _package_section(package: str, groups: dict, predictions: dict) -> list[str]:
    steps_rows, growth_rows = [], []
    for (pkg, mode, unit), runs in groups.items():
        if pkg != package:
            continue
        steps = _median_steps(runs)
        if not steps:
            continue
        steps_rows += _step_rows(mode, unit, steps)
        predicted = {p["function"]: p for p in predictions.get((pkg, mode), [])}
        growth_rows += _growth_rows(mode, unit, steps, runs[0]["config"]["functions"], predicted)
    lines = [f"## {os.path.basename(package)}", ""]
    if not steps_rows:
        return lines + ["No run of this package completed.", ""]
    lines += ["### Memory after each step", "", *STEP_HEADER, *steps_rows, ""]
    lines += ["### Growth per additional function against the predicted weight bytes", "",
              *GROWTH_HEADER, *growth_rows, ""]
    return lines


def _failure_lines(runs: list[dict]) -> list[str]:
    failed = [r for r in runs if r.get("error")]
    if not failed:
        return []
    lines = ["## Failed runs", ""]
    for r in failed:
        c = r["config"] or {}
        where = f"{os.path.basename(c.get('package', '?'))} {c.get('mode', '?')} {c.get('compute_unit', '?')} " \
                f"(repeat {c.get('repeat', 0) + 1})"
        lines.append(f"- {where}: {r['error']}")
    return lines + [""]


def render_markdown(results: dict) -> str:
    """The report: per package, memory after each step and growth per function against the
    memory model's shared-mapping and per-function-copy predictions. Pure: reads ``results`` only.
    """
    runs = [r for r in results["runs"] if r.get("config")]
    groups = _groups(runs)
    predictions = {(p["package"], p["mode"]): p["functions"] for p in results.get("predictions", [])}
    repeats = max((len(g) for g in groups.values()), default=0)
    lines = ["# Core ML load memory per function", ""]
    env = _environment_line(results.get("environment", {}))
    notes = [env] if env else []
    if repeats > 1:
        notes.append(f"medians of up to {repeats} runs per configuration, each in a fresh process")
    if notes:
        lines += ["; ".join(notes), ""]
    lines += ["Δ: change from the previous step. Growth of a function: from the last step of the function "
              "before it (or the baseline) to its own last step. Predictions: milsurgery's memory model.", ""]
    for package in dict.fromkeys(key[0] for key in groups):
        lines += _package_section(package, groups, predictions)
    lines += _failure_lines(results["runs"])
    return "\n".join(lines).rstrip() + "\n"


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--child"]:
        if len(argv) != 2:
            print(f"{PROG}: --child takes one JSON configuration", file=sys.stderr)
            return 2
        return child_main(argv[1])
    args = parse_args(argv)
    if not args.plan_only:
        problem = unmet_requirement()
        if problem:
            print(problem, file=sys.stderr)
            return 2
    try:
        plan = build_plan(args)
    except (PlanError, MilSurgeryError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    if args.plan_only:
        print(json.dumps(plan, indent=2))
        return 0
    results = run_plan(plan, timeout=args.timeout, json_path=args.json)
    report = render_markdown(results)
    print(report, end="")
    if args.markdown:
        _write_text(args.markdown, report)
    if args.json:
        _write_text(args.json, json.dumps(results, indent=2) + "\n")
    return 1 if any(r.get("error") for r in results["runs"]) else 0


if __name__ == "__main__":
    sys.exit(main())
