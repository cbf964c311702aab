"""Load memory of each function of a Core ML package, per compute unit (macOS 15+, Apple silicon).

How it loads: the way an app does
    Each package is compiled once (``coremltools.models.utils.compile_model``) into a fixed
    ``.mlmodelc`` under ``--compiled-dir``; every run then loads its functions from that one
    compiled model with ``coremltools.models.CompiledMLModel(path, compute_units=...,
    function_name=...)``, keeping each model alive. (``coremltools.models.MLModel(pkg.mlpackage)``
    would compile a private copy on every call, so functions of one package could never share.)
    A load is checked: a model without a Core ML proxy is a failed load, not a sample.

What it measures
    For every package and compute unit (CPU_ONLY, CPU_AND_GPU and CPU_AND_NE by default), one
    *cold* run (the first load of a freshly compiled model: Core ML specializes it for the
    device, out of process for the Neural Engine, and caches the result on disk; it also records
    which device each operation is planned on, via ``MLComputePlan``), kept in the JSON and the
    cold/warm timing table but out of the memory tables; then ``--repeats`` *warm* runs, each a
    fresh Python process. A run first drops the compiled weight files' cached pages; after the
    baseline, each load and one prediction on inputs synthesized from the spec, it records

    * ``phys_footprint`` and resident size (``task_info(TASK_VM_INFO)``, all fields kept);
    * the neural footprint (``ri_neural_footprint`` of ``proc_pid_rusage(RUSAGE_INFO_V6)``:
      Neural Engine memory charged to the process, a ledger *outside* phys_footprint);
    * the resident bytes of each compiled ``weights/weight.bin`` (``mincore`` over a read-only
      mapping that is never touched: the file's pages in memory, whoever maps them);
    * for CPU_AND_NE and ALL, the ``aned`` process's phys_footprint and neural footprint where
      this user may read them (usually only as root).

    ``phys_footprint`` does not count clean file-backed pages: weights used from a mapping of
    weight.bin add about nothing to it, shared or not, while a copy of them (heap, IOSurface,
    Neural Engine buffers) does. So the verdict compares each further function's *private*
    growth, Δ(phys_footprint + neural footprint [+ aned's when readable]), with what the
    function's weights would add: 0 on a shared mapping, its referenced bytes as a per-function
    copy, and its dense bytes (palettized weights expanded to fp16) as a dense copy. A
    prediction is chosen when it alone lies within the tolerance (``--tolerance-mib``, default
    2 MiB, or ``--tolerance`` of the function's referenced bytes, default 20%, whichever is
    larger). The mincore column shows the file side: on a shared mapping it grows by the
    function's unshared pages (:func:`milsurgery.memory.memory_model`).

    ``--separate`` adds, per compute unit, runs loading the same functions from separate
    single-function packages (each compiled once): nothing can be shared between them, so their
    verdict is "either (nothing shared)". A ``plan.json`` written by ``bench/make_experiments.py``
    may stand in for PKG.

What it needs
    macOS 15 or later on Apple silicon (an arm64 Python, not Rosetta) and coremltools 8 or later
    whose native module imports (a wheel built for this macOS); milsurgery is imported from this
    checkout. Anywhere else the script exits with status 2 and says what is missing;
    ``--plan-only`` works anywhere.

Run on a Mac, from the repository root::

    python3 bench/load_memory.py llm.mlpackage --json load.json --markdown load.md
    python3 bench/load_memory.py llm.mlpackage --functions infer,prefill \\
        --separate infer.mlpackage prefill.mlpackage
    python3 bench/load_memory.py experiments/plan.json --repeats 3 \\
        --json experiments/results.json --markdown experiments/results.md

Exit status: 0 every run measured, 1 some run failed (its error and the child's stderr are in the
results), 2 bad usage, an unwritable ``--json``/``--markdown`` destination or an unsupported
platform. Each child streams one JSON line per sample on stdout, so a crash or a timeout keeps
what was measured; the parent writes the JSON after every run.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import functools
import gc
import hashlib
import importlib.metadata
import importlib.util
import json
import mmap
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from milsurgery import MilSurgeryError  # noqa: E402
from milsurgery.formats import BLOB_DTYPE_BY_PROTO  # noqa: E402
from milsurgery.memory import memory_model  # noqa: E402
from milsurgery.package import Package  # noqa: E402
from milsurgery.spec import default_function, function_descriptions, iter_function_values, pb, tensor_element_count  # noqa: E402

PROG = "load_memory.py"
RESULTS_SCHEMA = 2
COMPUTE_UNITS = ("CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE", "ALL")  # names of coremltools.ComputeUnit
DEFAULT_COMPUTE_UNITS = ("CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE")
#: Compute units that may run on the Neural Engine: their runs also read aned's footprint.
NEURAL_ENGINE_UNITS = ("CPU_AND_NE", "ALL")
MIN_MACOS = 15
MIN_COREMLTOOLS = 8
#: Page size of Apple silicon: the granularity of the shared-mapping prediction.
APPLE_SILICON_PAGE = 16384
MIB = 1 << 20
DEFAULT_TIMEOUT = 1800.0
DEFAULT_TOLERANCE = 0.2
DEFAULT_TOLERANCE_MIB = 2.0
DEFAULT_COMPILED_DIR = os.path.join(tempfile.gettempdir(), "milsurgery-load-memory")
#: Lines of a child's stderr kept in the results.
STDERR_LINES = 200


class PlanError(ValueError):
    """The packages and options do not make a runnable experiment."""


class UnsupportedInput(ValueError):
    """An input whose type this script cannot synthesize."""


class LoadFailed(RuntimeError):
    """Core ML returned no usable model (coremltools hides the load error and leaves no proxy)."""


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
    p.add_argument("--compiled-dir", default=DEFAULT_COMPILED_DIR, metavar="DIR",
                   help="where each package is compiled once, replacing an earlier compilation "
                        "(default: milsurgery-load-memory in the temporary directory)")
    p.add_argument("--json", metavar="OUT.json", help="write every raw measurement as JSON")
    p.add_argument("--markdown", metavar="OUT.md", help="write the report as Markdown")
    p.add_argument("--plan-only", action="store_true", help="print the runs as JSON and exit (works anywhere)")
    p.add_argument("--no-predict", action="store_true",
                   help="only load; no prediction after each load (weights may then never be touched)")
    p.add_argument("--repeats", type=int, default=1, metavar="N",
                   help="warm runs of each configuration, each in a fresh process (report: medians)")
    p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE, metavar="FRACTION",
                   help=f"verdict tolerance as a fraction of a function's referenced weight bytes "
                        f"(default {DEFAULT_TOLERANCE:g})")
    p.add_argument("--tolerance-mib", type=float, default=DEFAULT_TOLERANCE_MIB, metavar="MIB",
                   help=f"smallest verdict tolerance in MiB (default {DEFAULT_TOLERANCE_MIB:g})")
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
    if args.tolerance < 0 or args.tolerance_mib < 0:
        parser.error("--tolerance and --tolerance-mib must not be negative")
    if args.separate is not None:
        if len(args.packages) != 1 or _is_plan_file(args.packages[0]):
            parser.error("--separate needs exactly one PKG, a package (a plan.json names its own)")
    return args


def _major_version(text: str) -> int | None:
    """The leading number of a version string ("8.3.0" -> 8), or ``None``."""
    match = re.match(r"\s*(\d+)", str(text))
    return int(match.group(1)) if match else None


def _installed_coremltools() -> str | None:
    try:
        return importlib.metadata.version("coremltools")
    except importlib.metadata.PackageNotFoundError:
        return None


def unmet_requirement(
    system: str | None = None,
    machine: str | None = None,
    macos: str | None = None,
    coremltools: str | None | bool = True,
) -> str | None:
    """``None`` when measurements can run here, else the one-line message saying what is needed.

    The arguments default to this process's platform (``coremltools``: the installed version,
    ``None`` when absent); tests pass others. Whether coremltools' native module imports is
    checked by the child processes (:func:`coremltools_problem`), as importing it is slow.
    """
    system = sys.platform if system is None else system
    machine = platform.machine() if machine is None else machine
    macos = platform.mac_ver()[0] if macos is None else macos
    if coremltools is True:
        coremltools = _installed_coremltools()
    problems = []
    if system != "darwin":
        problems.append(f"this is {platform.system() if system == sys.platform else system} {machine}")
    else:
        if machine != "arm64":
            problems.append(f"this Python runs as {machine}, not arm64")
        major = macos.split(".")[0]
        if not major.isdigit() or int(major) < MIN_MACOS:
            problems.append(f"this is macOS {macos or 'of unknown version'}")
    if not coremltools:
        problems.append("coremltools is not installed")
    elif (_major_version(coremltools) or 0) < MIN_COREMLTOOLS:
        problems.append(f"coremltools {coremltools} is older than {MIN_COREMLTOOLS}")
    if not problems:
        return None
    return (f"{PROG}: needs macOS {MIN_MACOS}+ on Apple silicon (arm64) with coremltools {MIN_COREMLTOOLS}+ "
            f"installed; {'; '.join(problems)} (--plan-only works anywhere)")


def coremltools_problem(ct) -> str | None:
    """What keeps an imported coremltools from running Core ML, or ``None``."""
    version = getattr(ct, "__version__", "?")
    if (_major_version(version) or 0) < MIN_COREMLTOOLS:
        return f"coremltools {version} is older than {MIN_COREMLTOOLS}"
    try:
        importlib.import_module("coremltools.libcoremlpython")
    except Exception as exc:  # noqa: BLE001 - any failure means Core ML cannot be called
        return (f"coremltools {version}: its native module coremltools.libcoremlpython does not import "
                f"({type(exc).__name__}: {exc}); install a coremltools wheel built for this macOS")
    return None


def check_destination(path: str, option: str) -> str | None:
    """``None`` if ``path`` can be written (a file in an existing, writable directory), else why not.

    Creates and removes one empty temporary file next to ``path``.
    """
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        return f"{option} {path}: is a directory"
    if not os.path.isdir(directory):
        return f"{option} {path}: directory {directory} does not exist"
    try:
        fd, tmp = tempfile.mkstemp(prefix=".load_memory-", dir=directory)
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        return f"{option} {path}: cannot write in {directory} ({exc.strerror or exc})"
    if os.path.exists(path) and not os.access(path, os.W_OK):
        return f"{option} {path}: not writable"
    return None


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


def _function_order(package: str, requested: list[str] | None) -> tuple[list[str], bool]:
    """The functions to load, in order, and whether the package is multi-function."""
    with Package(package) as pkg:
        multi = bool(pkg.model.description.functions)
        if requested is None:
            return list(pkg.functions), multi
        for name in requested:
            if name not in pkg.functions:
                raise PlanError(f"{pkg.path}: no function {name!r} (it has {pkg.functions})")
        return list(requested), multi


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


def _separate_function(path: str, wanted: str) -> tuple[str, bool]:
    """The function to load from a separate package (``wanted`` if it has it, else its only
    one), and whether the package is multi-function."""
    if not os.path.isdir(path):
        raise PlanError(f"{path}: separate package for function {wanted!r} does not exist")
    with Package(path) as pkg:
        multi = bool(pkg.model.description.functions)
        if wanted in pkg.functions:
            return wanted, multi
        if len(pkg.functions) == 1:
            return default_function(pkg.model), multi
        raise PlanError(f"{pkg.path}: has functions {pkg.functions}, none named {wanted!r}")


def compiled_path(package: str, compiled_dir: str) -> str:
    """The fixed ``.mlmodelc`` a package is compiled to: its name plus a digest of its path."""
    package = os.path.abspath(package)
    stem = os.path.basename(package.rstrip(os.sep))
    stem = stem[: -len(".mlpackage")] if stem.endswith(".mlpackage") else stem
    digest = hashlib.sha256(package.encode("utf-8", "surrogateescape")).hexdigest()[:12]
    return os.path.join(os.path.abspath(compiled_dir), f"{stem}-{digest}.mlmodelc")


def _load(function: str, path: str, name: str, multifunction: bool, compiled_dir: str) -> dict:
    """One load: ``function_name`` names the function in the package's spec; ``select`` is what
    the load passes as ``function_name`` (``None`` for a single-function model: its default)."""
    return {"function": function, "path": path, "function_name": name,
            "select": name if multifunction else None, "compiled": compiled_path(path, compiled_dir)}


def _loads(package: str, order: list[str], multi: bool, separate, compiled_dir: str) -> dict[str, list[dict]]:
    """Mode -> the loads of one child run, in order (each from its package's compiled model)."""
    runs = {"merged": [_load(f, package, f, multi, compiled_dir) for f in order]}
    if separate is not None:
        paths = [os.path.abspath(p) for p in _separate_paths(separate, order)]
        runs["separate"] = [_load(f, p, *_separate_function(p, f), compiled_dir=compiled_dir)
                            for f, p in zip(order, paths)]
    return runs


def build_plan(args: argparse.Namespace) -> list[dict]:
    """Every child run: per package x compute unit x mode, one cold run, then ``repeats`` warm ones.

    A run's ``loads`` name what it loads, in order: the package, the function and the compiled
    model to load it from (``merged``: the package's; ``separate``: each separate package's). The
    merged run comes before the separate one. Reads package specs (never weights).
    """
    sources = []
    for item in args.packages:
        if _is_plan_file(item):
            sources.extend(read_experiment_plan(item))
        else:
            sources.append((item, args.separate))
    compiled_dir = getattr(args, "compiled_dir", DEFAULT_COMPILED_DIR)
    plan = []
    for package, separate in sources:
        package = os.path.abspath(package)
        order, multi = _function_order(package, args.functions)
        runs = _loads(package, order, multi, separate, compiled_dir)
        for unit in args.compute_units:
            for mode, loads in runs.items():
                for phase, repeat in [("cold", 0)] + [("warm", r) for r in range(args.repeats)]:
                    plan.append({
                        "package": package,
                        "mode": mode,
                        "compute_unit": unit,
                        "phase": phase,
                        "functions": order,
                        "loads": loads,
                        "predict": not args.no_predict,
                        "repeat": repeat,
                    })
    return plan


def compile_jobs(plan: list[dict]) -> list[dict]:
    """The distinct (package, compiled model) pairs of a plan, in order of first use."""
    jobs: dict[str, str] = {}
    for config in plan:
        for load in config["loads"]:
            jobs.setdefault(load["compiled"], load["path"])
    return [{"source": source, "compiled": compiled} for compiled, source in jobs.items()]


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


def _within(shape, bounds) -> bool:
    """Whether every dimension of ``shape`` lies in its (lower, upper) bound; upper -1: unbounded."""
    return len(shape) == len(bounds) and all(lo <= d and (hi < 0 or d <= hi) for d, (lo, hi) in zip(shape, bounds))


def input_shape(feature: pb.FeatureDescription) -> tuple[int, ...]:
    """A multi-array input's shape: its default shape, which Core ML uses when nothing else is
    asked; for a flexible input whose default is not allowed, the lower bounds of its range or
    its first enumerated shape."""
    array = feature.type.multiArrayType
    default = tuple(array.shape)
    flexibility = array.WhichOneof("ShapeFlexibility")
    if flexibility == "shapeRange" and array.shapeRange.sizeRanges:
        bounds = [(r.lowerBound, r.upperBound) for r in array.shapeRange.sizeRanges]
        shape = default if _within(default, bounds) else tuple(max(1, lo) for lo, _ in bounds)
    elif flexibility == "enumeratedShapes" and array.enumeratedShapes.shapes:
        allowed = [tuple(s.shape) for s in array.enumeratedShapes.shapes]
        shape = default if default in allowed else allowed[0]
    else:
        shape = default
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
    """An image input's (width, height): its default size unless a flexible input excludes it."""
    default = (image.width, image.height)
    flexibility = image.WhichOneof("SizeFlexibility")
    if flexibility == "imageSizeRange":
        r = image.imageSizeRange
        bounds = [(r.widthRange.lowerBound, r.widthRange.upperBound),
                  (r.heightRange.lowerBound, r.heightRange.upperBound)]
        return default if _within(default, bounds) else (max(1, bounds[0][0]), max(1, bounds[1][0]))
    if flexibility == "enumeratedSizes" and image.enumeratedSizes.sizes:
        allowed = [(s.width, s.height) for s in image.enumeratedSizes.sizes]
        return default if default in allowed else allowed[0]
    return default


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
# Neural footprint: proc_pid_rusage(pid, RUSAGE_INFO_V6, ...)

RUSAGE_INFO_V6 = 6


class RusageInfoV6(ctypes.Structure):
    """``struct rusage_info_v6`` of <sys/resource.h> (XNU's ``bsd/sys/resource.h``), field order
    as the header declares it.

    Natural alignment: a 16-byte UUID, then 56 ``uint64_t``: 464 bytes. The fields from
    ``ri_secure_time_in_system`` to ``ri_interval_max_neural_footprint`` took the first five of
    what the first v6 header declared ``ri_reserved[14]`` (newer headers name more of the rest;
    the size never changes). The kernel (``gather_rusage_info``) fills the three neural fields
    from the task's ``neural_nofootprint_total`` ledger (current, lifetime maximum, interval
    maximum), which is not part of ``ri_phys_footprint``; a kernel that predates them leaves 0.
    """

    _fields_ = [("ri_uuid", ctypes.c_uint8 * 16)] + [
        (name, ctypes.c_uint64) for name in (
            "ri_user_time", "ri_system_time", "ri_pkg_idle_wkups", "ri_interrupt_wkups", "ri_pageins",
            "ri_wired_size", "ri_resident_size", "ri_phys_footprint", "ri_proc_start_abstime",
            "ri_proc_exit_abstime",
            # v1
            "ri_child_user_time", "ri_child_system_time", "ri_child_pkg_idle_wkups",
            "ri_child_interrupt_wkups", "ri_child_pageins", "ri_child_elapsed_abstime",
            # v2
            "ri_diskio_bytesread", "ri_diskio_byteswritten",
            # v3
            "ri_cpu_time_qos_default", "ri_cpu_time_qos_maintenance", "ri_cpu_time_qos_background",
            "ri_cpu_time_qos_utility", "ri_cpu_time_qos_legacy", "ri_cpu_time_qos_user_initiated",
            "ri_cpu_time_qos_user_interactive", "ri_billed_system_time", "ri_serviced_system_time",
            # v4
            "ri_logical_writes", "ri_lifetime_max_phys_footprint", "ri_instructions", "ri_cycles",
            "ri_billed_energy", "ri_serviced_energy", "ri_interval_max_phys_footprint", "ri_runnable_time",
            # v5
            "ri_flags",
            # v6
            "ri_user_ptime", "ri_system_ptime", "ri_pinstructions", "ri_pcycles", "ri_energy_nj",
            "ri_penergy_nj", "ri_secure_time_in_system", "ri_secure_ptime_in_system",
            "ri_neural_footprint", "ri_lifetime_max_neural_footprint", "ri_interval_max_neural_footprint",
        )
    ] + [("ri_reserved", ctypes.c_uint64 * 9)]


#: The rusage fields kept in a sample (bytes).
RUSAGE_FIELDS = ("ri_phys_footprint", "ri_resident_size", "ri_wired_size", "ri_neural_footprint",
                 "ri_lifetime_max_neural_footprint", "ri_interval_max_neural_footprint")


@functools.lru_cache(maxsize=1)
def _libproc():
    lib = ctypes.CDLL(ctypes.util.find_library("System"), use_errno=True)
    lib.proc_pid_rusage.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.POINTER(RusageInfoV6)]
    lib.proc_pid_rusage.restype = ctypes.c_int
    return lib


def pid_rusage(pid: int) -> dict[str, int]:
    """:data:`RUSAGE_FIELDS` of a process (macOS); ``OSError`` when it cannot be read (EPERM for
    another user's process unless root)."""
    if sys.platform != "darwin":
        raise OSError("proc_pid_rusage needs macOS")
    info = RusageInfoV6()
    if _libproc().proc_pid_rusage(pid, RUSAGE_INFO_V6, ctypes.byref(info)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"proc_pid_rusage({pid}): {os.strerror(err)}")
    return {name: getattr(info, name) for name in RUSAGE_FIELDS}


def find_process(name: str) -> int | None:
    """The pid of the process named exactly ``name`` (``pgrep -x``), or ``None``."""
    try:
        out = subprocess.run(["pgrep", "-x", name], capture_output=True, text=True, timeout=10).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    return int(out[0]) if out and out[0].isdigit() else None


# ---------------------------------------------------------------------------------------------
# Residency of the compiled weight files: mincore over an untouched read-only mapping


#: ``MS_INVALIDATE`` of <sys/mman.h> (2 on macOS and Linux).
MS_INVALIDATE = 2


@functools.lru_cache(maxsize=1)
def _libc():
    lib = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    lib.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
    lib.mincore.restype = ctypes.c_int
    lib.msync.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    lib.msync.restype = ctypes.c_int
    return lib


class WeightResidency:
    """Resident bytes of weight files, read with ``mincore`` (macOS and Linux).

    Each file is mapped read-only once and never touched, so the mapping adds nothing itself:
    ``mincore`` reports the file's pages that are in memory (the unified buffer cache on macOS,
    the page cache on Linux), whichever process or mapping brought them in. One bit per page:
    ``MINCORE_INCORE`` (0x1) on both. Opening costs one ``mmap`` per file; a sample one
    ``mincore`` call and a vector of one byte per page.
    """

    def __init__(self, paths: list[str]):
        self.page = mmap.PAGESIZE
        self._maps: dict[str, tuple[mmap.mmap | None, np.ndarray | None]] = {}
        for path in dict.fromkeys(paths):
            size = os.path.getsize(path)
            if size == 0:
                self._maps[path] = (None, None)
                continue
            with open(path, "rb") as f:
                m = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ)
            self._maps[path] = (m, np.frombuffer(m, np.uint8))

    def evict(self) -> str:
        """Ask the kernel to drop the files' clean cached pages, so that a run sees which pages
        its loads bring in (the previous run left them cached). Linux: ``posix_fadvise``
        ``DONTNEED``; macOS: ``msync(MS_INVALIDATE)`` on the mapping, which flushes the file's
        resident pages from its VM object. Pages another process keeps mapped and in use may
        stay: the baseline sample shows what remained. Returns the method used."""
        for path, (m, view) in self._maps.items():
            if view is None:
                continue
            if hasattr(os, "posix_fadvise"):
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)
            elif _libc().msync(ctypes.c_void_p(view.ctypes.data), ctypes.c_size_t(view.size), MS_INVALIDATE) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"msync({path}, MS_INVALIDATE): {os.strerror(err)}")
        return "posix_fadvise(DONTNEED)" if hasattr(os, "posix_fadvise") else "msync(MS_INVALIDATE)"

    def resident(self) -> dict[str, int]:
        """File -> bytes of it resident in memory (whole pages, the last one counted in full)."""
        out = {}
        for path, (m, view) in self._maps.items():
            if view is None:
                out[path] = 0
                continue
            pages = -(-view.size // self.page)
            vec = (ctypes.c_ubyte * pages)()
            if _libc().mincore(ctypes.c_void_p(view.ctypes.data), ctypes.c_size_t(view.size), vec) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"mincore({path}): {os.strerror(err)}")
            out[path] = int(np.count_nonzero(np.frombuffer(vec, np.uint8) & 1)) * self.page
        return out

    def close(self) -> None:
        maps = [m for m, _ in self._maps.values() if m is not None]
        self._maps.clear()  # drops the numpy views, so the maps can close
        for m in maps:
            m.close()


def compiled_weight_files(compiled: str) -> list[str]:
    """The weight files of a compiled ML program (``weights/*.bin`` in the ``.mlmodelc``)."""
    directory = os.path.join(compiled, "weights")
    if not os.path.isdir(directory):
        return []
    return sorted(os.path.join(directory, n) for n in os.listdir(directory) if n.endswith(".bin"))


# ---------------------------------------------------------------------------------------------
# One sample of every metric


def darwin_self_memory() -> dict:
    """This process's footprint: ``task_vm_info`` (every field) and its rusage neural footprint."""
    info = task_vm_info()
    try:
        rusage = pid_rusage(os.getpid())
    except OSError as exc:
        rusage = {"error": str(exc)}
    return {"phys_footprint": info["phys_footprint"], "resident_size": info["resident_size"],
            "neural_footprint": rusage.get("ri_neural_footprint"), "task_vm_info": info, "rusage": rusage}


#: The function reading this process's memory; a test may put another in its place.
self_memory = darwin_self_memory


def helper_memory(pid: int | None) -> dict:
    """phys_footprint and neural footprint of a helper process (``aned``), or why they are unknown."""
    if pid is None:
        return {"phys_footprint": None, "neural_footprint": None, "error": "no aned process found"}
    try:
        r = pid_rusage(pid)
    except OSError as exc:
        return {"phys_footprint": None, "neural_footprint": None, "error": str(exc)}
    return {"phys_footprint": r["ri_phys_footprint"], "neural_footprint": r["ri_neural_footprint"], "pid": pid}


class Probe:
    """Every metric of one sample: this process, the compiled weight files, ``aned``."""

    def __init__(self, weight_files: list[str], aned: bool):
        self.residency = WeightResidency(weight_files)
        self.aned_pid = find_process("aned") if aned else None
        self.aned = aned

    def sample(self) -> dict:
        memory = dict(self_memory())
        resident = self.residency.resident()
        memory["weights_resident"] = resident
        memory["weights_resident_bytes"] = sum(resident.values())
        if self.aned:
            memory["aned"] = helper_memory(self.aned_pid)
        return memory

    def close(self) -> None:
        self.residency.close()


# ---------------------------------------------------------------------------------------------
# The child: one configuration in a fresh process, one JSON line per event


def _description(load: dict) -> pb.FunctionDescription:
    with Package(load["path"]) as pkg:
        return function_descriptions(pkg.model)[load["function_name"]]


def check_loaded(model, what: str):
    """``model`` if Core ML really loaded it, else :class:`LoadFailed`.

    coremltools' ``MLModel`` catches Core ML's load error, only warns, and leaves its proxy
    ``None``; ``CompiledMLModel`` keeps its proxy in ``_proxy``. Either missing is a failed load.
    """
    proxy = getattr(model, "_proxy", None)
    if proxy is None:
        proxy = getattr(model, "__proxy__", None)
    if proxy is None:
        cause = getattr(model, "_framework_error", None)
        raise LoadFailed(f"Core ML did not load {what}" + (f": {cause}" if cause else " (no model proxy)"))
    return model


def _device_name(device) -> str:
    name = type(device).__name__
    return {"MLNeuralEngineComputeDevice": "neural_engine", "MLGPUComputeDevice": "gpu",
            "MLCPUComputeDevice": "cpu"}.get(name, name)


def _operations(block):
    for op in block.operations:
        yield op
        for nested in getattr(op, "blocks", None) or []:
            yield from _operations(nested)


def compute_devices(ct, compiled: str, unit: str, functions: list[str]) -> dict:
    """Function -> {device: operations Core ML plans to run there} (``MLComputePlan``, macOS 14.4+).

    ``const`` operations are left out; an operation without a device usage counts as ``unknown``.
    """
    from coremltools.models.compute_plan import MLComputePlan

    plan = MLComputePlan.load_from_path(compiled, compute_units=getattr(ct.ComputeUnit, unit))
    program = plan.model_structure.program
    if program is None:
        raise ValueError(f"{compiled}: not an ML program")
    out = {}
    for name in functions:
        counts: dict[str, int] = {}
        for op in _operations(program.functions[name].block):
            if op.operator_name == "const":
                continue
            usage = plan.get_compute_device_usage_for_mlprogram_operation(op)
            device = _device_name(usage.preferred_compute_device) if usage is not None else "unknown"
            counts[device] = counts.get(device, 0) + 1
        out[name] = counts
    return out


def _child_environment(ct) -> dict:
    return {"pid": os.getpid(), "coremltools": getattr(ct, "__version__", None), "macos": platform.mac_ver()[0],
            "machine": platform.machine(), "task_vm_info_count": TASK_VM_INFO_COUNT, "page_size": mmap.PAGESIZE}


def _import_coremltools():
    import coremltools

    return coremltools


def measure(config: dict, emit) -> None:
    """Run one configuration in this process, calling ``emit`` with each event as it happens.

    Events: ``start`` (environment), ``sample`` (baseline, then per function ``load`` and unless
    ``predict`` is false ``predict``, each with every metric of :class:`Probe`), for a cold run
    ``compute_plan``, and ``end`` (``error`` naming the failed step, or ``None``). Inputs are
    synthesized, specs read and weight files mapped before the baseline, so deltas are Core ML's
    alone. A stateful function predicts with ``state=model.make_state()``.
    """
    ct = _import_coremltools()
    problem = coremltools_problem(ct)
    if problem:
        raise RuntimeError(problem)
    loads = config["loads"]
    unit_name = config["compute_unit"]
    unit = getattr(ct.ComputeUnit, unit_name)
    descriptions = [_description(load) for load in loads]
    feeds = [synthesize_inputs(d) if config["predict"] else None for d in descriptions]
    weight_files = [p for c in dict.fromkeys(ld["compiled"] for ld in loads) for p in compiled_weight_files(c)]
    probe = Probe(weight_files, aned=unit_name in NEURAL_ENGINE_UNITS)
    try:
        evicted = probe.residency.evict()
    except OSError as exc:  # recorded: the baseline sample shows what stayed resident
        evicted = f"failed: {exc}"
    emit({"event": "start", "environment": {**_child_environment(ct), "weights_evicted_with": evicted}})
    alive = []  # every model and state stays referenced until the process ends
    gc.collect()
    step = "baseline"

    def sample(kind: str, function: str | None, seconds: float | None) -> None:
        emit({"event": "sample", "step": kind if function is None else f"{kind} {function}", "kind": kind,
              "function": function, "seconds": seconds, "memory": probe.sample()})

    try:
        sample("baseline", None, None)
        for load, description, feed in zip(loads, descriptions, feeds):
            step = f"load {load['function']}"
            start = time.perf_counter()
            model = ct.models.CompiledMLModel(load["compiled"], compute_units=unit,
                                              function_name=load["select"])
            alive.append(model)
            check_loaded(model, f"function {load['function_name']!r} of {load['compiled']}")
            sample("load", load["function"], time.perf_counter() - start)
            if feed is None:
                continue
            step = f"predict {load['function']}"
            start = time.perf_counter()
            kwargs = {"state": model.make_state()} if description.state else {}
            alive.append(kwargs)
            model.predict(feed, **kwargs)
            sample("predict", load["function"], time.perf_counter() - start)
        if config.get("phase") == "cold":
            step = "compute plan"
            devices = {}
            for compiled in dict.fromkeys(ld["compiled"] for ld in loads):  # one plan per compiled model
                mine = [ld for ld in loads if ld["compiled"] == compiled]
                try:
                    found = compute_devices(ct, compiled, unit_name, [ld["function_name"] for ld in mine])
                    devices.update({ld["function"]: found[ld["function_name"]] for ld in mine})
                except Exception as exc:  # noqa: BLE001 - recorded: the plan is optional
                    devices.update({ld["function"]: {"error": f"{type(exc).__name__}: {exc}"} for ld in mine})
            emit({"event": "compute_plan", "devices": devices})
    except Exception as exc:  # noqa: BLE001 - reported, with the step, to the parent
        emit({"event": "end", "error": f"{step}: {type(exc).__name__}: {exc}"})
        return
    finally:
        probe.close()
    emit({"event": "end", "error": None})


def compile_packages(jobs: list[dict], emit) -> None:
    """Compile each job's package to its fixed ``.mlmodelc`` (an earlier one there is replaced);
    one ``compiled`` event per job, with its ``error`` or ``None``."""
    ct = _import_coremltools()
    problem = coremltools_problem(ct)
    if problem:
        emit({"event": "problem", "error": problem})
        return
    from coremltools.models.utils import compile_model

    for job in jobs:
        start = time.perf_counter()
        error = None
        try:
            compiled = job["compiled"]
            if not compiled.endswith(".mlmodelc"):
                raise ValueError(f"{compiled}: a compiled model's name ends in .mlmodelc")
            if os.path.isdir(compiled):
                shutil.rmtree(compiled)
            os.makedirs(os.path.dirname(compiled), exist_ok=True)
            compile_model(job["source"], compiled)
            if not os.path.isdir(compiled):
                raise RuntimeError(f"compile_model wrote nothing at {compiled}")
        except Exception as exc:  # noqa: BLE001 - reported per package
            error = f"{type(exc).__name__}: {exc}"
        emit({"event": "compiled", **job, "seconds": round(time.perf_counter() - start, 3), "error": error})


def child_main(task: str, payload: str) -> int:
    """``--child CONFIG`` or ``--compile JOBS``: run it, streaming one JSON line per event on stdout.

    Whatever else anything writes to stdout (Python or native code) goes to stderr.
    """
    sys.stdout.flush()
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)

    def emit(event: dict) -> None:
        sys.stdout.flush()
        out.write(json.dumps(event) + "\n")
        out.flush()

    try:
        data = json.loads(payload)
        if task == "--compile":
            compile_packages(data, emit)
        else:
            measure(data, emit)
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        emit({"event": "end", "error": f"{type(exc).__name__}: {exc}"})
    sys.stdout.flush()
    out.close()
    return 0


# ---------------------------------------------------------------------------------------------
# The parent: compile, run every configuration, predict


def _text(data) -> str:
    if data is None:
        return ""
    return data.decode("utf-8", "replace") if isinstance(data, bytes) else data


def _events(stdout: str) -> list[dict]:
    """The JSON event lines of a child's stdout, in order (a torn last line is dropped)."""
    events = []
    for line in stdout.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and "event" in event:
            events.append(event)
    return events


#: The command that runs a child (this script); a test may run another in its place.
CHILD_COMMAND = [sys.executable, os.path.abspath(__file__)]


def run_child(args: list[str], timeout: float) -> tuple[list[dict], str | None, list[str]]:
    """Run this script with ``args`` in a fresh process: (events, failure, stderr lines).

    ``failure`` says how the process ended when that was not normally (timeout, signal, status);
    the events streamed before are kept either way.
    """
    command = [*CHILD_COMMAND, *args]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        stdout, stderr, failure = proc.stdout, proc.stderr, None
        if proc.returncode != 0:
            failure = f"child exited with status {proc.returncode}"
    except subprocess.TimeoutExpired as exc:
        stdout, stderr = _text(exc.stdout), _text(exc.stderr)
        failure = f"child timed out after {timeout:g} s"
    return _events(stdout), failure, stderr.splitlines()[-STDERR_LINES:]


def run_config(config: dict, timeout: float) -> dict:
    """Measure ``config`` in a fresh child process (this script with ``--child``).

    The run keeps every sample the child streamed, its stderr, and an ``error`` when a step
    failed or the child did not finish (a crash or a timeout after some samples keeps them).
    """
    events, failure, stderr = run_child(["--child", json.dumps(config)], timeout)
    run = {"config": config, "samples": [], "error": None, "environment": None, "compute_plan": None,
           "stderr": stderr}
    ended = False
    for event in events:
        kind = event.pop("event")
        if kind == "start":
            run["environment"] = event.get("environment")
        elif kind == "sample":
            run["samples"].append(event)
        elif kind == "compute_plan":
            run["compute_plan"] = event.get("devices")
        elif kind == "end":
            ended = True
            run["error"] = event.get("error")
    if failure and not run["error"]:
        last = stderr[-1] if stderr else "no output on stderr"
        run["error"] = f"{failure} after {len(run['samples'])} samples: {last}"
    elif not ended and not run["error"]:
        run["error"] = f"child ended without finishing after {len(run['samples'])} samples"
    return run


def compile_all(jobs: list[dict], timeout: float) -> tuple[dict[str, dict], str | None]:
    """Compile every package once, in one child: ({compiled path: job result}, problem).

    ``problem`` is set when coremltools cannot run Core ML here at all.
    """
    if not jobs:
        return {}, None
    events, failure, stderr = run_child(["--compile", json.dumps(jobs)], timeout * len(jobs))
    done = {}
    for event in events:
        if event["event"] == "problem":
            return done, event["error"]
        if event["event"] == "compiled":
            done[event["compiled"]] = {k: v for k, v in event.items() if k != "event"}
        if event["event"] == "end" and event.get("error"):
            return done, event["error"]
    for job in jobs:
        if job["compiled"] not in done:
            last = stderr[-1] if stderr else "no output on stderr"
            done[job["compiled"]] = {**job, "seconds": None,
                                     "error": f"{failure or 'not compiled'}: {last}"}
    return done, None


def _walk(block):
    for op in block.operations:
        yield op
        for nested in op.blocks:
            yield from _walk(nested)


def dense_weight_bytes(pkg: Package, function: str) -> int:
    """A function's weight bytes once every ``constexpr_*`` op is expanded to a dense tensor.

    Blobs referenced by ordinary ops count as stored (each distinct blob once); a constexpr op
    counts its output tensor (elements x element size) when some non-constexpr op or the
    block's outputs use it, and the blobs it reads do not count. For 4-bit palettized weights
    this is about 4x the stored bytes: what a runtime holds if it expands them at load.
    Reads the spec and the blob records only.
    """
    fn = pkg.function(function)
    blocks = [e.value for e in fn.block_specializations]
    constexpr_outputs: dict[str, pb.NamedValueType] = {}
    used_densely: set[str] = set()
    for block in blocks:
        used_densely.update(block.outputs)
        for op in _walk(block):
            if op.type.startswith("constexpr_"):
                for out in op.outputs:
                    constexpr_outputs[out.name] = out
                continue
            for arg in op.inputs:
                used_densely.update(b.name for b in arg.value.arguments if b.WhichOneof("binding") == "name")
            for nested in op.blocks:
                used_densely.update(nested.outputs)
    total = 0
    for name, out in constexpr_outputs.items():
        if name not in used_densely or out.type.WhichOneof("type") != "tensorType":
            continue
        count = tensor_element_count(out.type.tensorType)
        dtype = BLOB_DTYPE_BY_PROTO.get(out.type.tensorType.dataType)
        if count is not None:
            total += count * (dtype.bits if dtype else 16) // 8
    seen = set()
    for ref in iter_function_values(function, fn):
        if ref.value.WhichOneof("value") != "blobFileValue" or ref.op_type.startswith("constexpr_"):
            continue
        key = (ref.file_name, ref.offset)
        if key not in seen:
            seen.add(key)
            total += pkg.resolve(ref).blob.size
    return total


def _dense(path: str, functions: list[str]) -> dict[str, int]:
    with Package(path) as pkg:
        return {f: dense_weight_bytes(pkg, f) for f in functions}


def _predict_run(config: dict, page_size: int) -> list[dict]:
    """Per function of a run: weight bytes it references, and what it adds in each regime.

    ``shared_mapping_added_bytes`` is the file side (pages the function adds to one mapping);
    the private side of a shared mapping is 0. ``per_function_copy_added_bytes`` and
    ``dense_copy_added_bytes`` are private memory.
    """
    rows = []
    if config["mode"] == "merged":
        model = memory_model(config["package"], config["functions"], page_size=page_size, duplicates=False)
        dense = _dense(config["package"], config["functions"])
        for f in model["functions"]:
            rows.append({"function": f["name"], "referenced_bytes": f["referenced_bytes"],
                         "shared_mapping_added_bytes": f["added_page_bytes"],
                         "per_function_copy_added_bytes": f["referenced_bytes"],
                         "dense_copy_added_bytes": dense[f["name"]]})
        return rows
    for load in config["loads"]:  # separate files share nothing: every function pays in full
        f = memory_model(load["path"], [load["function_name"]], page_size=page_size, duplicates=False)["functions"][0]
        rows.append({"function": load["function"], "referenced_bytes": f["referenced_bytes"],
                     "shared_mapping_added_bytes": f["referenced_page_bytes"],
                     "per_function_copy_added_bytes": f["referenced_bytes"],
                     "dense_copy_added_bytes": _dense(load["path"], [load["function_name"]])[load["function_name"]]})
    return rows


def weight_predictions(plan: list[dict], page_size: int = APPLE_SILICON_PAGE) -> list[dict]:
    """The predictions for every distinct (package, mode, order) of the plan (reads no weights)."""
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
    return {"macos": platform.mac_ver()[0], "machine": platform.machine(),
            "chip": _sysctl("machdep.cpu.brand_string"), "coremltools": _installed_coremltools(),
            "python": platform.python_version()}


def _write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def run_plan(plan: list[dict], *, timeout: float = DEFAULT_TIMEOUT, json_path: str | None = None,
             tolerance: float = DEFAULT_TOLERANCE, tolerance_mib: float = DEFAULT_TOLERANCE_MIB) -> dict:
    """Compile each package once, then run every configuration, one child each, in plan order.

    Returns the results document; raises ``RuntimeError`` when coremltools cannot run Core ML.
    """
    results = {"schema": RESULTS_SCHEMA, "environment": environment(),
               "settings": {"tolerance": tolerance, "tolerance_mib": tolerance_mib, "timeout": timeout},
               "predictions": weight_predictions(plan, mmap.PAGESIZE), "compiled": [], "runs": []}
    jobs = compile_jobs(plan)
    print(f"compiling {len(jobs)} packages ...", file=sys.stderr, flush=True)
    compiled, problem = compile_all(jobs, timeout)
    if problem:
        raise RuntimeError(problem)
    results["compiled"] = list(compiled.values())
    for i, config in enumerate(plan, 1):
        label = f"{os.path.basename(config['package'])} {config['mode']} {config['compute_unit']} {config['phase']}"
        print(f"[{i}/{len(plan)}] {label} (repeat {config['repeat'] + 1}) ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        failed = [compiled[ld["compiled"]] for ld in config["loads"] if compiled[ld["compiled"]]["error"]]
        if failed:
            run = {"config": config, "samples": [], "environment": None, "compute_plan": None, "stderr": [],
                   "error": f"compiling {failed[0]['source']}: {failed[0]['error']}"}
        else:
            run = run_config(config, timeout)
        run["wall_seconds"] = round(time.perf_counter() - start, 3)
        results["runs"].append(run)
        if run.get("error"):
            print(f"    failed: {run['error']}", file=sys.stderr, flush=True)
        if json_path:
            _write_text(json_path, json.dumps(results, indent=2) + "\n")
    return results


# ---------------------------------------------------------------------------------------------
# Verdict


def _aned_bytes(memory: dict) -> int | None:
    aned = memory.get("aned")
    if not aned or aned.get("phys_footprint") is None:
        return None
    return aned["phys_footprint"] + (aned.get("neural_footprint") or 0)


def private_bytes(memory: dict, with_aned: bool) -> int:
    """Memory a copy of the weights would be charged to: phys_footprint, plus the neural
    footprint (a separate ledger), plus aned's footprints when ``with_aned``."""
    total = memory["phys_footprint"] + (memory.get("neural_footprint") or 0)
    if with_aned:
        total += _aned_bytes(memory) or 0
    return total


def tolerance_bytes(referenced: int, tolerance: float, tolerance_mib: float) -> float:
    """How far a measured growth may lie from a prediction and still match it."""
    return max(tolerance_mib * MIB, tolerance * referenced)


def verdict(mode: str, index: int, growth: float, predicted: dict, tol: float, predicted_run: bool = True) -> str:
    """Which regime a function's private growth matches.

    Candidates: a shared mapping adds 0 private bytes, a per-function copy the referenced bytes,
    a dense copy the dense bytes (listed only when they differ). A candidate matches when the
    growth lies within ``tol`` of it; one match names it, several say "either", none "neither".
    """
    if mode == "separate":
        label = "either (nothing shared)"
    elif index == 0:
        label = "first function (includes runtime setup)"
    elif not predicted["referenced_bytes"]:
        label = "either (no weights)"
    else:
        candidates = [("shared mapping", 0), ("per-function copy", predicted["per_function_copy_added_bytes"])]
        if predicted.get("dense_copy_added_bytes") not in (None, predicted["per_function_copy_added_bytes"]):
            candidates.append(("dense copy", predicted["dense_copy_added_bytes"]))
        within = [name for name, value in candidates if abs(growth - value) <= tol]
        if len(within) == 1:
            label = within[0]
        elif within:
            label = f"either ({' or '.join(within)}: within the tolerance of each)"
        else:
            label = "neither (off every prediction by more than the tolerance)"
    if not predicted_run and mode != "separate" and index > 0:
        label += "; --no-predict: weights may never have been touched"
    return label


# ---------------------------------------------------------------------------------------------
# The Markdown report


def _mib(n: float | None) -> str:
    return "" if n is None else f"{n / MIB:.2f}"


def _delta_mib(n: float | None) -> str:
    return "" if n is None else f"{n / MIB:+.2f}"


def _seconds(s: float | None) -> str:
    return "" if s is None else f"{s:.2f}"


def _groups(runs: list[dict]) -> dict[tuple[str, str, str], list[dict]]:
    """(package, mode, compute unit) -> its runs, in order of first appearance."""
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for run in runs:
        c = run["config"]
        groups.setdefault((c["package"], c["mode"], c["compute_unit"]), []).append(run)
    return groups


def _median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _with_aned(runs: list[dict]) -> bool:
    """Whether aned's footprint was readable in every sample of these runs."""
    samples = [s for r in runs for s in r["samples"]]
    return bool(samples) and all(_aned_bytes(s["memory"]) is not None for s in samples)


def _median_steps(runs: list[dict]) -> list[dict]:
    """Steps of the warm runs that completed, each metric the median over those runs."""
    complete = [r for r in runs if r["config"].get("phase", "warm") == "warm" and not r.get("error") and r.get("samples")]
    if not complete:
        return []
    with_aned = _with_aned(complete)
    steps = []
    for sample in complete[0]["samples"]:
        same = [s for r in complete for s in r["samples"] if s["step"] == sample["step"]]
        mem = [s["memory"] for s in same]
        steps.append({
            "step": sample["step"], "kind": sample["kind"], "function": sample["function"],
            "phys": _median([m["phys_footprint"] for m in mem]),
            "neural": _median([m.get("neural_footprint") for m in mem]),
            "aned": _median([_aned_bytes(m) for m in mem]) if with_aned else None,
            "private": _median([private_bytes(m, with_aned) for m in mem]),
            "rss": _median([m["resident_size"] for m in mem]),
            "weights": _median([m.get("weights_resident_bytes") for m in mem]),
            "seconds": _median([s["seconds"] for s in same]),
        })
    return steps


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _step_rows(mode: str, unit: str, steps: list[dict]) -> list[str]:
    rows, previous = [], None
    for s in steps:
        d = (lambda key: None if previous is None else _diff(s[key], previous[key]))  # noqa: E731
        rows.append(f"| {mode} | {unit} | {s['step']} | {_mib(s['phys'])} | {_delta_mib(d('phys'))} | "
                    f"{_mib(s['neural'])} | {_mib(s['aned'])} | {_delta_mib(d('private'))} | {_mib(s['rss'])} | "
                    f"{_delta_mib(d('rss'))} | {_mib(s['weights'])} | {_delta_mib(d('weights'))} | "
                    f"{_seconds(s['seconds'])} |")
        previous = s
    return rows


def _growth(steps: list[dict], functions: list[str]) -> list[dict]:
    """Per function: each metric from the last step of the function before it (or the
    baseline) to its own last step."""
    last = {s["function"]: s for s in steps if s["function"] is not None}
    out, before = [], steps[0]
    for f in functions:
        if f not in last:
            break
        now = last[f]
        out.append({"function": f, **{k: _diff(now[k], before[k]) for k in ("private", "weights", "rss")}})
        before = now
    return out


def _growth_rows(mode: str, unit: str, steps: list[dict], config: dict, predicted: dict, settings: dict) -> list[str]:
    rows = []
    for i, g in enumerate(_growth(steps, config["functions"])):
        p = predicted.get(g["function"])
        if p is None:
            rows.append(f"| {mode} | {unit} | {g['function']} | {_delta_mib(g['private'])} | "
                        f"{_delta_mib(g['weights'])} | {_delta_mib(g['rss'])} |  |  |  |  |  |")
            continue
        tol = tolerance_bytes(p["referenced_bytes"], settings["tolerance"], settings["tolerance_mib"])
        label = verdict(mode, i, g["private"], p, tol, config.get("predict", True))
        if unit in NEURAL_ENGINE_UNITS and steps[0]["aned"] is None and mode != "separate" and i > 0:
            label += "; aned not readable: what it holds is not counted (run as root to count it)"
        rows.append(f"| {mode} | {unit} | {g['function']} | {_delta_mib(g['private'])} | {_delta_mib(g['weights'])} | "
                    f"{_delta_mib(g['rss'])} | {_mib(p['shared_mapping_added_bytes'])} | "
                    f"{_mib(p['per_function_copy_added_bytes'])} | {_mib(p.get('dense_copy_added_bytes'))} | "
                    f"±{_mib(tol)} | {label} |")
    return rows


def _timing_rows(mode: str, unit: str, runs: list[dict]) -> list[str]:
    """Load and predict seconds per function: the cold run against the median warm run."""
    cold = [r for r in runs if r["config"].get("phase") == "cold"]
    warm = [r for r in runs if r["config"].get("phase", "warm") == "warm"]
    rows = []
    for f in runs[0]["config"]["functions"]:
        def secs(group, kind):
            return _median([s["seconds"] for r in group for s in r["samples"]
                            if s["function"] == f and s["kind"] == kind])
        values = [secs(cold, "load"), secs(warm, "load"), secs(cold, "predict"), secs(warm, "predict")]
        if all(v is None for v in values):
            continue
        rows.append(f"| {mode} | {unit} | {f} | " + " | ".join(_seconds(v) for v in values) + " |")
    return rows


def _device_rows(mode: str, unit: str, runs: list[dict]) -> list[str]:
    rows = []
    for run in runs:
        plan = run.get("compute_plan")
        if not plan:
            continue
        for f, counts in plan.items():
            if "error" in counts:
                rows.append(f"| {mode} | {unit} | {f} |  |  |  |  | {counts['error']} |")
                continue
            known = {"neural_engine", "gpu", "cpu", "unknown"}
            other = ", ".join(f"{k}: {v}" for k, v in counts.items() if k not in known)
            rows.append(f"| {mode} | {unit} | {f} | {counts.get('neural_engine', 0)} | {counts.get('gpu', 0)} | "
                        f"{counts.get('cpu', 0)} | {counts.get('unknown', 0)} | {other} |")
        break
    return rows


def _environment_line(env: dict) -> str:
    parts = [f"macOS {env['macos']}" if env.get("macos") else None, env.get("machine"), env.get("chip"),
             f"coremltools {env['coremltools']}" if env.get("coremltools") else None,
             f"Python {env['python']}" if env.get("python") else None]
    return ", ".join(p for p in parts if p)


STEP_HEADER = [
    "| mode | compute unit | step | phys_footprint MiB | Δ phys_footprint | neural footprint MiB | aned MiB | "
    "Δ private | RSS MiB | Δ RSS | weight.bin resident MiB | Δ resident | seconds |",
    "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
]
GROWTH_HEADER = [
    "| mode | compute unit | function | measured Δ private MiB | measured Δ weight.bin resident MiB | "
    "measured Δ RSS MiB | shared mapping: adds to weight.bin resident MiB (private 0) | "
    "per-function copy: private adds MiB | dense copy: private adds MiB | tolerance MiB | private growth matches |",
    "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
]
TIMING_HEADER = [
    "| mode | compute unit | function | cold load s | warm load s | cold predict s | warm predict s |",
    "|---|---|---|---:|---:|---:|---:|",
]
DEVICE_HEADER = [
    "| mode | compute unit | function | Neural Engine ops | GPU ops | CPU ops | unknown | other |",
    "|---|---|---|---:|---:|---:|---:|---|",
]


def _package_section(package: str, groups: dict, predictions: dict, settings: dict) -> list[str]:
    steps_rows, growth_rows, timing_rows, device_rows = [], [], [], []
    for (pkg, mode, unit), runs in groups.items():
        if pkg != package:
            continue
        timing_rows += _timing_rows(mode, unit, runs)
        device_rows += _device_rows(mode, unit, runs)
        steps = _median_steps(runs)
        if not steps:
            continue
        steps_rows += _step_rows(mode, unit, steps)
        predicted = {p["function"]: p for p in predictions.get((pkg, mode), [])}
        growth_rows += _growth_rows(mode, unit, steps, runs[0]["config"], predicted, settings)
    lines = [f"## {os.path.basename(package)}", ""]
    if not steps_rows:
        lines += ["No warm run of this package completed.", ""]
    else:
        lines += ["### Memory after each step (warm runs)", "", *STEP_HEADER, *steps_rows, ""]
        lines += ["### Growth per additional function against the predictions", "",
                  *GROWTH_HEADER, *growth_rows, ""]
    if timing_rows:
        lines += ["### Cold and warm", "", *TIMING_HEADER, *timing_rows, ""]
    if device_rows:
        lines += ["### Where Core ML plans each operation (MLComputePlan, cold run)", "",
                  *DEVICE_HEADER, *device_rows, ""]
    return lines


def _failure_lines(runs: list[dict]) -> list[str]:
    failed = [r for r in runs if r.get("error")]
    if not failed:
        return []
    lines = ["## Failed runs", ""]
    for r in failed:
        c = r["config"] or {}
        where = (f"{os.path.basename(c.get('package', '?'))} {c.get('mode', '?')} {c.get('compute_unit', '?')} "
                 f"{c.get('phase', 'warm')} (repeat {c.get('repeat', 0) + 1})")
        kept = f" ({len(r['samples'])} samples kept)" if r.get("samples") else ""
        lines.append(f"- {where}: {r['error']}{kept}")
    return lines + [""]


def render_markdown(results: dict) -> str:
    """The report: per package, memory after each step, growth per function against the
    predictions with the verdict, cold against warm, and planned devices. Pure: reads
    ``results`` only.
    """
    runs = [r for r in results["runs"] if r.get("config")]
    groups = _groups(runs)
    predictions = {(p["package"], p["mode"]): p["functions"] for p in results.get("predictions", [])}
    settings = {"tolerance": DEFAULT_TOLERANCE, "tolerance_mib": DEFAULT_TOLERANCE_MIB, **results.get("settings", {})}
    warm = max((sum(r["config"].get("phase", "warm") == "warm" for r in g) for g in groups.values()), default=0)
    lines = ["# Core ML load memory per function", ""]
    env = _environment_line(results.get("environment", {}))
    notes = [env] if env else []
    if warm > 1:
        notes.append(f"medians of up to {warm} warm runs per configuration, each in a fresh process")
    if notes:
        lines += ["; ".join(notes), ""]
    lines += [
        "Δ: change from the previous step. Private: phys_footprint + neural footprint (+ aned's footprints "
        "when readable), the memory a copy of the weights is charged to; clean pages of a mapped weight.bin "
        "are not in it, and show in weight.bin resident (mincore). Growth of a function: from the last step of "
        "the function before it (or the baseline) to its own last step. A prediction matches when the private "
        f"growth lies within the tolerance of it (the larger of {settings['tolerance_mib']:g} MiB and "
        f"{settings['tolerance'] * 100:g}% of the function's referenced weight bytes). Cold: the first load "
        "after compiling, not in the memory tables.", ""]
    for package in dict.fromkeys(key[0] for key in groups):
        lines += _package_section(package, groups, predictions, settings)
    lines += _failure_lines(results["runs"])
    return "\n".join(lines).rstrip() + "\n"


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] in (["--child"], ["--compile"]):
        if len(argv) != 2:
            print(f"{PROG}: {argv[0]} takes one JSON argument", file=sys.stderr)
            return 2
        return child_main(argv[0], argv[1])
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
    for path, option in ((args.json, "--json"), (args.markdown, "--markdown")):
        problem = check_destination(path, option) if path else None
        if problem:
            print(f"{PROG}: error: {problem}", file=sys.stderr)
            return 2
    try:
        results = run_plan(plan, timeout=args.timeout, json_path=args.json, tolerance=args.tolerance,
                           tolerance_mib=args.tolerance_mib)
    except RuntimeError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    report = render_markdown(results)
    print(report, end="")
    if args.markdown:
        _write_text(args.markdown, report)
    if args.json:
        _write_text(args.json, json.dumps(results, indent=2) + "\n")
    return 1 if any(r.get("error") for r in results["runs"]) else 0


if __name__ == "__main__":
    sys.exit(main())
