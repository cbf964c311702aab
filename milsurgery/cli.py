"""The ``milsurgery`` command line: parses arguments, calls the library, prints.

Exit status: 0 success; 1 ``verify`` found a difference or ``check`` a violation; 2 any error (one line on stderr,
``milsurgery: error: ...``; ``--debug`` adds the traceback); 130 interrupted (SIGINT), 143
terminated (SIGTERM), partial outputs removed.

A command is a ``cmd_NAME(args)`` function calling the library's public function of that name,
and an :func:`add_command` call in :func:`build_parser` with a one-line summary, a description
and examples; every argument has a help text (tests/test_cli.py checks both). Commands that read
or write a lot pass a :class:`ProgressBar` as the library's ``progress`` callback.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import signal
import sys
import time
import traceback

from . import __version__
from .errors import MilSurgeryError, UsageError

__all__ = ["main", "build_parser", "add_command", "human_bytes"]


def human_bytes(n: int) -> str:
    """``n`` bytes in B, KiB, MiB, GiB or TiB (one decimal above bytes)."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024:
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


class ProgressBar:
    """A one-line progress bar on stderr, drawn only when stderr is a terminal.

    Called as ``bar(phase, done, total)`` with byte counts; it shows ``done`` of ``total``, so the
    figures always agree with the percentage.
    """

    def __init__(self, enabled: bool):
        self.enabled = enabled and sys.stderr.isatty()
        self._last = 0.0
        self._phase = ""

    def __call__(self, phase: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if phase == self._phase and now - self._last < 0.1 and done < total:
            return
        self._phase, self._last = phase, now
        frac = min(done / total, 1.0) if total else 1.0
        bar = "#" * int(frac * 30)
        sys.stderr.write(f"\r{phase:9s} [{bar:<30s}] {frac * 100:5.1f}% {human_bytes(done):>10s} of {human_bytes(total):<10s}")
        sys.stderr.flush()

    def finish(self) -> None:
        if self.enabled and self._phase:
            sys.stderr.write("\r" + " " * 79 + "\r")
            sys.stderr.flush()


def _print_json(obj) -> None:
    # One write: json.dump would issue a write per token (seconds for thousands of functions).
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def _print_report(report, quiet: bool, as_json: bool, *, appended: bool = False) -> None:
    if as_json:
        _print_json(report.to_dict())
        return
    for w in report.warnings:
        print(f"milsurgery: warning: {w}", file=sys.stderr)
    if quiet:
        return
    n = len(report.functions)
    print(
        f"{'appended to' if appended else 'wrote'} {report.output}: {n} function{'s' if n != 1 else ''} "
        f"{', '.join(report.functions)} (default {report.default_function!r}), spec version {report.spec_version}"
    )
    reused = (
        f"{report.blobs_coalesced} already stored (identical bytes), not written again ({human_bytes(report.bytes_coalesced)})"
    )
    if appended:
        print(
            f"  weight.bin now {human_bytes(report.weight_file_bytes)}: appended {report.blobs_written} blobs "
            f"({human_bytes(report.bytes_written)}); {reused}"
        )
    else:
        print(f"  weight.bin {human_bytes(report.bytes_written)}: {report.blobs_written} blobs written; {reused}")
    print(
        f"  read {human_bytes(report.bytes_read)} of source weights to copy and compare "
        f"(identical blobs are read twice) in {report.seconds:.2f} s"
    )
    verified = getattr(report, "verified", None)
    if verified is not None:
        print(f"  verified: {verified['summary']}")
    if getattr(report, "adoption", None) is not None:
        from .adopt import render_report

        print(render_report(report.adoption))


def _warn_suffix(path) -> None:
    if path is not None and not str(path).rstrip("/").endswith(".mlpackage"):
        print(f"milsurgery: warning: {path} does not end in .mlpackage; Core ML tools expect that suffix", file=sys.stderr)


def _adopt_kwargs(args) -> dict:
    return dict(adopt=args.adopt, anchor=args.anchor, min_cosine=args.min_cosine, max_mean_abs=args.max_mean_abs,
                max_abs=args.max_abs, dry_run=args.dry_run, workers=args.workers)


def _print_dry_run(report, as_json: bool) -> int:
    if as_json:
        _print_json(report.to_dict())
    else:
        print(report.render_text())
    return 0


def cmd_inspect(args) -> int:
    from .inspect import inspect_package, render_text

    if args.order and not args.memory:
        raise UsageError("--order sets the load order of --memory; add --memory")
    bar = ProgressBar(True)  # drawn on a terminal only, on stderr: --json output is unaffected
    try:
        info = inspect_package(args.package, duplicates=not args.no_duplicates, progress=bar)
    finally:
        bar.finish()
    if args.memory:
        from .memory import memory_model, render_memory_text

        order = args.order.split(",") if args.order else None
        info["memory"] = memory_model(args.package, order, duplicates=not args.no_duplicates)
    if args.json:
        _print_json(info)
    else:
        print(render_text(info, all_ops=args.all_ops))
        if args.memory:
            print(render_memory_text(info["memory"]))
    return 0


def cmd_merge(args) -> int:
    from .merge import merge

    if args.dry_run:  # writes nothing: prints what adoption would do
        report = merge(args.sources, args.output, default=args.default, force=args.force, **_adopt_kwargs(args))
        return _print_dry_run(report, args.json)
    return _run_writer(
        args, lambda bar: merge(
            args.sources, args.output, default=args.default, force=args.force, sync=not args.no_sync,
            verify=args.verify, progress=bar, **_adopt_kwargs(args),
        )
    )


def _run_writer(args, call, *, appended: bool = False) -> int:
    bar = ProgressBar(not args.quiet)
    try:
        report = call(bar)
    finally:
        bar.finish()
    _print_report(report, args.quiet, args.json, appended=appended)
    _warn_suffix(getattr(args, "output", None))  # after success, so a failure stays one line
    return 0


def cmd_shrink(args) -> int:
    from .surgery import shrink

    from .package import Package

    if args.dry_run:
        return _print_dry_run(shrink(args.package, **_adopt_kwargs(args)), args.json)
    if args.output is None and not args.in_place:
        raise UsageError("shrink needs -o OUT or --in-place")
    with Package(args.package) as pkg:  # reads the spec and the blob records only
        before = sum(bf.file_size for bf in pkg.blob_files.values())
    code = _run_writer(
        args, lambda bar: shrink(
            args.package, args.output, in_place=args.in_place, force=args.force, sync=not args.no_sync, progress=bar,
            wait=not args.no_wait, **_adopt_kwargs(args),
        )
    )
    if not (args.quiet or args.json):
        after = args.output if args.output is not None else args.package
        with Package(after) as pkg:
            now = sum(bf.file_size for bf in pkg.blob_files.values())
        print(f"  weights {human_bytes(before)} before, {human_bytes(now)} after: {human_bytes(before - now)} recovered")
    return code


def cmd_extract(args) -> int:
    from .surgery import extract

    return _run_writer(
        args,
        lambda bar: extract(
            args.package, args.functions, args.output, single=args.single, default=args.default,
            force=args.force, sync=not args.no_sync, progress=bar,
        ),
    )


def cmd_remove(args) -> int:
    from .surgery import remove

    return _run_writer(
        args, lambda bar: remove(
            args.package, args.functions, args.output, default=args.default, force=args.force, sync=not args.no_sync,
            progress=bar,
        )
    )


def cmd_rename(args) -> int:
    from .surgery import rename

    return _run_writer(args, lambda bar: rename(args.package, args.mapping, args.output, force=args.force, sync=not args.no_sync, progress=bar))


def cmd_append(args) -> int:
    from .surgery import append

    return _run_writer(args, lambda bar: append(args.package, args.sources, progress=bar, wait=not args.no_wait), appended=True)


def cmd_compress(args) -> int:
    from .compress import compress

    if args.output is None and not args.dry_run:
        raise UsageError("compress needs -o OUT (or --dry-run)")
    bar = ProgressBar(not args.quiet)
    try:
        report = compress(
            args.package, args.output, palettize_bits=args.palettize, mode=args.mode, group_size=args.group_size,
            quantize_dtype=args.quantize, block_size=args.block_size, min_elements=args.min_elements,
            skip=args.skip, dry_run=args.dry_run, workers=args.workers, force=args.force,
            sync=not args.no_sync, progress=bar,
        )
    finally:
        bar.finish()
    if args.json:
        _print_json(report.to_dict())
        return 0
    for w in report.warnings:
        print(f"milsurgery: warning: {w}", file=sys.stderr)
    if args.quiet:
        return 0
    verb = "would write" if report.dry_run else f"wrote {report.output}:"
    print(
        f"{verb} {report.configuration}; {report.consts_replaced} consts replaced by "
        f"{report.weights_compressed} compressed weights; weights {human_bytes(report.bytes_before)} -> "
        f"{human_bytes(report.bytes_after)}{' (estimated)' if report.dry_run else ''} in {report.seconds:.2f} s"
    )
    for w in report.weights:
        print(
            f"  {', '.join(w.ops)} {w.dtype}{w.shape}: {human_bytes(w.bytes_before)} -> {human_bytes(w.bytes_after)}, "
            f"relative RMS error {w.relative_rms:.3g}, max |delta| {w.max_abs_error:.3g}"
        )
    for s in report.skipped:
        print(f"  skipped {s}")
    return 0


def cmd_verify(args) -> int:
    from .verify import verify

    if args.package is None:  # options first: ``verify --against A B PKG``
        if len(args.against) < 2:
            raise UsageError("verify needs PKG and at least one --against source (verify PKG --against SRC...)")
        args.package = args.against.pop()
    bar = ProgressBar(not args.json)
    try:
        report = verify(args.package, args.against, tolerance=args.tolerance, min_cosine=args.min_cosine,
                        max_mean_abs=args.max_mean_abs, max_abs=args.max_abs, progress=bar,
                        default=args.default)
    finally:
        bar.finish()
    if args.json:
        _print_json(report.to_dict())
    else:
        for d in report.package_differences:
            print(f"package: DIFFERS: {d}")
        for c in report.checks:
            status = "equivalent to" if c.equivalent else "differs from"
            print(f"{c.function}: {status} {c.source} ({c.blobs_compared} blobs, {human_bytes(c.bytes_compared)} compared)")
            for d in c.differences:
                print(f"  {d}")
            for n in c.notes:
                print(f"  note: {n}")
            for t in c.tolerated:
                m = t["metrics"]
                print(f"  within tolerance: op {t['op']!r} ({t['kind']}): cosine {m['cosine']:.9f}, mean |delta| "
                      f"{m['mean_abs']:.3g}, max |delta| {m['max_abs']:.3g}, relative RMS {m['rel_rms']:.3g}")
        for a in report.attributes:
            if a.equivalent:
                print(f"program attribute {a.key!r}: equivalent to {a.matched}'s ({a.blobs_compared} blobs, {human_bytes(a.bytes_compared)} compared)")
            else:
                print(f"program attribute {a.key!r}: differs\n  {a.difference}")
    return 0 if report.equivalent else 1


def cmd_check(args) -> int:
    from .check import check

    report = check(args.package)
    if args.json:
        _print_json(report.to_dict())
    elif report.valid:
        print(f"{report.path}: valid")
    else:
        print(f"{report.path}: {len(report.violations)} violation(s) of Core ML's rules:")
        for v in report.violations:
            print(f"  {v}")
    return 0 if report.valid else 1


def cmd_completion(args) -> int:
    from .completion import completion

    sys.stdout.write(completion(args.shell))
    return 0


def cmd_show(args) -> int:
    from .show import show

    ops = [t for t in args.ops.split(",") if t] if args.ops else None
    sys.stdout.write(show(args.package, args.functions, ops=ops, values=not args.no_values))
    return 0


def cmd_diff(args) -> int:
    from .diff import diff, render_diff

    report = diff(args.a, args.b, shapes=not args.ignore_shapes)
    if args.json:
        _print_json(report.to_dict())
    else:
        print(render_diff(report))
    return 0 if report.identical else 1


_NO_SYNC_HELP = (
    "do not flush OUT to disk (fsync) before it appears: faster; other programs still see OUT "
    "appear whole, but a power loss or system crash soon after may leave it incomplete"
)
_PKG_HELP = "an ML-program package (.mlpackage directory)"
_SRC_HELP = (
    "a source package: SRC takes all its functions under their own names, SRC:FUNC one function, "
    "SRC:FUNC=NEW that function named NEW (a single-function model's function is main)"
)


_NO_WAIT_HELP = "if another process is editing PKG in place, fail at once instead of waiting for it"


def _add_output_options(p, *, output=True) -> None:
    if output:
        p.add_argument("-o", "--output", required=True, metavar="OUT.mlpackage", help="the package to write (must not exist unless --force)")
        p.add_argument("--force", action="store_true", help="replace OUT if it exists")
        p.add_argument("--no-sync", action="store_true", help=_NO_SYNC_HELP)
    p.add_argument("--quiet", action="store_true", help="no progress bar, no summary")
    p.add_argument("--json", action="store_true", help="print the report as JSON (exact byte counts)")


def add_command(sub, name: str, summary: str, description: str, examples: list[str]) -> argparse.ArgumentParser:
    """Add subcommand ``name``: ``summary`` in the command list, ``description`` and ``examples``
    (command lines, without the leading ``milsurgery``) in its ``--help``."""
    epilog = "examples:\n" + "\n".join(f"  milsurgery {e}" for e in examples) if examples else None
    return sub.add_parser(
        name, help=summary, description=description, epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def _add_threshold_options(p) -> None:
    p.add_argument("--min-cosine", type=float, metavar="C", help="near-duplicates need cosine >= C (default 0.9999)")
    p.add_argument("--max-mean-abs", type=float, metavar="D", help="near-duplicates need mean |delta| <= D (default 1e-3)")
    p.add_argument("--max-abs", type=float, metavar="D", help="near-duplicates need max |delta| <= D (default: no limit)")


def _add_adopt_options(p) -> None:
    p.add_argument("--adopt", action="store_true", help="write near-duplicate weights of later functions as references to the anchor function's weights")
    p.add_argument("--anchor", metavar="FUNC", help="with --adopt: the function others adopt from (default: the first)")
    _add_threshold_options(p)
    p.add_argument("--dry-run", action="store_true", help="with --adopt: write nothing, print what would be adopted")
    p.add_argument("--workers", type=int, metavar="N",
                   help="with --adopt: processes measuring weights, this one included (default: one per CPU, at most 8; the result does not depend on it)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="milsurgery",
        description=(
            "Low-level surgery on Core ML ML-program packages (.mlpackage): merge functions of several\n"
            "packages into one with identical weights stored once, shrink, extract, remove, rename,\n"
            "append, verify and inspect, without loading weights into memory."
        ),
        epilog="'milsurgery COMMAND --help' describes a command, with examples.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-V", "--version", action="version", version=f"milsurgery {__version__}")
    parser.add_argument("--debug", action="store_true", help="show a traceback on errors (accepted anywhere on the line)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = add_command(
        sub, "inspect", "describe a package: functions, blobs, sharing, duplicates",
        "Spec version; functions with inputs, outputs, states, opset and op types; blobs and bytes by\n"
        "dtype; bytes each function references and each pair shares; identical blobs at different\n"
        "offsets (what shrink recovers); unreferenced blobs; metadata. Reads no weight bytes except\n"
        "to compare blobs whose dtype and size collide (--no-duplicates skips that).",
        ["inspect llm.mlpackage", "inspect llm.mlpackage --json", "inspect llm.mlpackage --memory --order prefill,infer"],
    )
    p.add_argument("package", metavar="PKG", help=_PKG_HELP)
    p.add_argument("--json", action="store_true", help="machine-readable output (stable keys, exact bytes)")
    p.add_argument("--no-duplicates", action="store_true", help="skip the duplicate-content search (reads no weight bytes)")
    p.add_argument("--all-ops", action="store_true", help="list every op type of each function (default: the 8 most used)")
    p.add_argument("--memory", action="store_true", help="model weight memory per function in load order (shared mapping vs per-function copies)")
    p.add_argument("--order", metavar="F1,F2,...", help="load order for --memory, every function once (default: the package's function order)")
    p.set_defaults(func=cmd_inspect)

    p = add_command(
        sub, "merge", "merge functions of several packages into one multi-function package",
        "Writes OUT with the chosen functions; every weight blob is stored once per distinct content\n"
        "(identical bytes, compared byte by byte), graphs are kept except their blob offsets.\n"
        "Sources are only read; OUT appears complete or not at all. --adopt also shares weights that\n"
        "are near-duplicates (within --min-cosine, --max-mean-abs, --max-abs) of the anchor's.",
        [
            "merge -o llm.mlpackage infer.mlpackage:main=infer prefill.mlpackage:main=prefill",
            "merge -o llm.mlpackage infer.mlpackage:main=infer prefill.mlpackage:main=prefill --default infer --verify",
            "merge -o all.mlpackage a.mlpackage b.mlpackage     # every function of both",
            "merge -o llm.mlpackage infer.mlpackage:main=infer prefill.mlpackage:main=prefill --adopt --dry-run",
        ],
    )
    p.add_argument("sources", nargs="+", metavar="SRC[:FUNC[=NEW]]", help=_SRC_HELP)
    p.add_argument("--default", metavar="NAME", help="default function (otherwise the first)")
    p.add_argument("--verify", action="store_true", help="check the written package against its sources before moving it into place (on a difference: exit 1, nothing replaced)")
    _add_output_options(p)
    _add_adopt_options(p)
    p.set_defaults(func=cmd_merge)

    p = add_command(
        sub, "shrink", "coalesce identical blobs and drop unreferenced ones",
        "Stores each distinct weight blob once (within and across functions) and drops blobs no\n"
        "function references; the spec is otherwise unchanged. Writes OUT, or with --in-place\n"
        "replaces PKG in one atomic step.",
        ["shrink combined.mlpackage -o small.mlpackage", "shrink combined.mlpackage --in-place",
         "shrink combined.mlpackage -o small.mlpackage --adopt"],
    )
    p.add_argument("package", metavar="PKG", help=_PKG_HELP)
    p.add_argument("-o", "--output", metavar="OUT.mlpackage", help="the package to write (must not exist unless --force)")
    p.add_argument("--in-place", action="store_true", help="replace PKG atomically instead of writing OUT")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--no-sync", action="store_true", help=_NO_SYNC_HELP + " (not with --in-place)")
    p.add_argument("--no-wait", action="store_true", help=_NO_WAIT_HELP)
    _add_output_options(p, output=False)
    _add_adopt_options(p)
    p.set_defaults(func=cmd_shrink)

    p = add_command(
        sub, "extract", "a package with only some functions and the blobs they use",
        "Keeps the named functions (FUNC=NEW renames one) and only the blobs they reference. With\n"
        "--single and one function the result is an ordinary single-function model.",
        ["extract llm.mlpackage prefill -o prefill.mlpackage --single",
         "extract llm.mlpackage infer=decode prefill -o two.mlpackage --default decode"],
    )
    p.add_argument("package", metavar="PKG", help=_PKG_HELP)
    p.add_argument("functions", nargs="+", metavar="FUNC[=NEW]", help="a function of PKG to keep, optionally renamed to NEW")
    p.add_argument("--single", action="store_true", help="write an ordinary single-function model (one FUNC)")
    p.add_argument("--default", metavar="NAME", help="default function of the output")
    _add_output_options(p)
    p.set_defaults(func=cmd_extract)

    p = add_command(
        sub, "remove", "a package without some functions",
        "Writes OUT without the named functions; blobs only they referenced are dropped. Removing\n"
        "the default function needs --default.",
        ["remove llm.mlpackage prefill -o infer-only.mlpackage"],
    )
    p.add_argument("package", metavar="PKG", help=_PKG_HELP)
    p.add_argument("functions", nargs="+", metavar="FUNC", help="a function of PKG to drop")
    p.add_argument("--default", metavar="NAME", help="new default function (required when removing the default)")
    _add_output_options(p)
    p.set_defaults(func=cmd_remove)

    p = add_command(
        sub, "rename", "rename functions (the default follows)",
        "Writes OUT with functions renamed; the default function follows its rename.",
        ["rename llm.mlpackage infer=decode -o renamed.mlpackage"],
    )
    p.add_argument("package", metavar="PKG", help=_PKG_HELP)
    p.add_argument("mapping", nargs="+", metavar="OLD=NEW", help="a function of PKG and its new name (a MIL identifier)")
    _add_output_options(p)
    p.set_defaults(func=cmd_rename)

    p = add_command(
        sub, "append", "add functions to a package in place, appending only new blobs",
        "Edits PKG in place: appends to its weight.bin only blobs whose bytes it does not hold yet,\n"
        "then replaces the spec atomically. Killed at any moment, PKG is the old or the new package.",
        ["append llm.mlpackage adapter.mlpackage:main=lora_fr"],
    )
    p.add_argument("package", metavar="PKG", help=_PKG_HELP + ", edited in place")
    p.add_argument("sources", nargs="+", metavar="SRC[:FUNC[=NEW]]", help=_SRC_HELP)
    p.add_argument("--no-wait", action="store_true", help=_NO_WAIT_HELP)
    _add_output_options(p, output=False)
    p.set_defaults(func=cmd_append)

    p = add_command(
        sub, "show", "print the program as text (model.mil syntax); reads no weight bytes",
        "Prints the ML program in the syntax Core ML's compiler writes to model.mil: the program\n"
        "version, its attributes, each function with its inputs, one line per op with output types,\n"
        "inputs, attributes and name, and blob values as BLOBFILE(path, offset). Works on .mlpackage\n"
        "and compiled .mlmodelc folders alike.",
        ["show llm.mlpackage", "show llm.mlpackage prefill --ops linear,matmul", "show llm.mlpackage --no-values"],
    )
    p.add_argument("package", metavar="PKG", help="an ML-program package (.mlpackage) or compiled model (.mlmodelc)")
    p.add_argument("functions", nargs="*", metavar="FUNC", help="only these functions (default: all)")
    p.add_argument("--ops", metavar="TYPE,...", help="only ops of these types")
    p.add_argument("--no-values", action="store_true", help="elide immediate values of more than 16 elements")
    p.set_defaults(func=cmd_show)

    p = add_command(
        sub, "diff", "how two functions differ: I/O, ops (aligned by structure), weight bytes (exit 1 if they differ)",
        "Compares function A (of A, or its default function) with function B: inputs and outputs,\n"
        "ops added, removed or changed (matched by structure, not only by name), and weights whose\n"
        "bytes differ, named by op with their sizes. Exit 0 when identical, 1 when they differ.",
        ["diff llm.mlpackage:infer llm.mlpackage:prefill", "diff llm.mlpackage:infer llm.mlpackage:prefill --ignore-shapes --json"],
    )
    p.add_argument("a", metavar="A[:FUNC]", help="a package or compiled model, optionally :FUNC (default: its default function)")
    p.add_argument("b", metavar="B[:FUNC]", help="the other side, as A")
    p.add_argument("--ignore-shapes", action="store_true", help="leave out differences that are only of shapes")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_diff)

    p = add_command(
        sub, "compress", "palettize or quantize every distinct weight once, shared by all functions",
        "Replaces each weight const by the constexpr ops coremltools would emit (LUT palettization or\n"
        "linear quantization), once per distinct weight, referenced by every function. Reports each\n"
        "weight's error; --dry-run computes and reports without writing.",
        ["compress llm.mlpackage --palettize 4 -o llm-4bit.mlpackage",
         "compress llm.mlpackage --quantize int8 --block-size 32 -o llm-int8.mlpackage",
         "compress llm.mlpackage --palettize 4 --dry-run"],
    )
    p.add_argument("package", metavar="PKG", help=_PKG_HELP)
    p.add_argument("-o", "--output", metavar="OUT.mlpackage", help="the package to write (must not exist unless --force)")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--palettize", type=int, metavar="NBITS", help="LUT palettization with 1, 2, 3, 4, 6 or 8-bit indices")
    how.add_argument("--quantize", metavar="int8|int4", help="symmetric linear quantization")
    p.add_argument("--mode", default="kmeans", choices=["kmeans", "uniform"], help="how LUTs are chosen (default kmeans, as coremltools)")
    p.add_argument("--group-size", type=int, default=0, metavar="G", help="output channels per LUT (default: one LUT per weight)")
    p.add_argument("--block-size", type=int, default=0, metavar="B", help="input-channel elements per scale (default: one scale per output channel)")
    p.add_argument("--min-elements", type=int, default=2048, metavar="N", help="leave weights of at most N elements as they are (default 2048, as coremltools)")
    p.add_argument("--skip", action="append", default=[], metavar="OP_NAME_GLOB", help="leave consts whose op or output name matches (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="compute and report, write nothing")
    p.add_argument("--workers", type=int, metavar="N", help="worker processes (default: all cores)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--no-sync", action="store_true", help=_NO_SYNC_HELP)
    _add_output_options(p, output=False)
    p.set_defaults(func=cmd_compress)

    p = add_command(
        sub, "verify", "prove functions of PKG equal their sources (exit 1 if not)",
        "Each named function must equal its source: graph identical except blob offsets, every\n"
        "referenced blob the same bytes, same inputs, outputs and states. Exit 0 when equivalent,\n"
        "1 with a report naming the function, the op or input, and what differs. --against may\n"
        "come first; PKG is then the last word. With --tolerance, a weight whose blobs differ (an\n"
        "adopted near-duplicate) passes when its values meet the thresholds.",
        ["verify llm.mlpackage --against infer.mlpackage:main=infer prefill.mlpackage:main=prefill",
         "verify --against infer.mlpackage:main=infer prefill.mlpackage:main=prefill llm.mlpackage",
         "verify llm.mlpackage --against infer.mlpackage:main=infer prefill.mlpackage:main=prefill --tolerance"],
    )
    p.add_argument("package", metavar="PKG", nargs="?", help=_PKG_HELP + " to check")
    p.add_argument("--against", nargs="+", required=True, metavar="SRC[:FUNC[=NEW]]", help=_SRC_HELP + "; NEW names the function of PKG")
    p.add_argument("--json", action="store_true", help="print the report as JSON (exact byte counts)")
    p.add_argument("--default", metavar="NAME", help="the default function PKG must have (otherwise: the first source function, or a source's default)")
    p.add_argument("--tolerance", action="store_true", help="a weight whose blobs differ passes when its dequantized values meet the thresholds")
    _add_threshold_options(p)
    p.set_defaults(func=cmd_verify)

    p = add_command(
        sub, "check", "apply Core ML's spec rules to PKG offline (exit 1 listing each violation)",
        "Applies, on any OS, the rules of Apple's open-source Core ML model validator that concern\n"
        "ML programs (specification version, model description and multi-function rules, feature\n"
        "types, shapes, defaults, states, default function) and what the MIL side requires that can\n"
        "be checked without Apple's compiler. Exit 0 if valid, 1 listing each violation with the\n"
        "validator's message, 2 if PKG cannot be read.",
        ["check llm.mlpackage", "check llm.mlpackage --json"],
    )
    p.add_argument("package", metavar="PKG", help="an .mlpackage directory or a model.mlmodel spec file")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_check)

    p = add_command(
        sub, "completion", "print a shell completion script (bash, zsh or fish)",
        "Prints a completion script generated from this parser (needs shtab: pip install\n"
        "'milsurgery[completion]'). bash: source it from ~/.bashrc; zsh: save it as _milsurgery in\n"
        "a directory of $fpath; fish: save it as ~/.config/fish/completions/milsurgery.fish.",
        ["completion bash > milsurgery.bash", "completion zsh > ~/.zfunc/_milsurgery"],
    )
    p.add_argument("shell", choices=["bash", "zsh", "fish"], help="the shell to complete for")
    p.set_defaults(func=cmd_completion)
    return parser


def _commands(parser: argparse.ArgumentParser) -> list[str]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return list(action.choices)
    return []


def _unknown_command(parser: argparse.ArgumentParser, argv: list[str]) -> str | None:
    """The error for a mistyped command (with the closest names), or None."""
    words = [a for a in argv if not a.startswith("-")]
    if not words or any(a in ("-h", "--help", "-V", "--version") for a in argv[: argv.index(words[0])]):
        return None
    commands = _commands(parser)
    if words[0] in commands:
        return None
    close = difflib.get_close_matches(words[0], commands, n=2, cutoff=0.6)
    hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
    return f"unknown command {words[0]!r}{hint}; commands: {', '.join(commands)}"


class Terminated(BaseException):
    """SIGTERM arrived: unwinds like Ctrl-C, so partial outputs are removed on the way out."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    if hasattr(signal, "SIGXFSZ"):
        # Past a file-size limit (ulimit -f) writes then fail with EFBIG, which is reported as
        # a clean error, instead of the signal killing the process halfway.
        try:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        except ValueError:  # not the main thread: leave signal handling to the caller
            pass
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # --debug is accepted anywhere before a "--"
    cut = argv.index("--") if "--" in argv else len(argv)
    debug = "--debug" in argv[:cut]
    argv = [a for a in argv[:cut] if a != "--debug"] + argv[cut:]
    if not argv:
        parser.print_help()
        return 0
    unknown = _unknown_command(parser, argv)
    if unknown:
        parser.print_usage(sys.stderr)
        print(f"milsurgery: error: {unknown}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    args.debug = debug
    if args.command is None:
        parser.print_help()
        return 0
    try:
        # SIGTERM (a timeout, a service manager) would end the process where it stands and leave
        # a partial directory for the next run to remove; unwinding removes it now.
        previous_term = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread
        previous_term = None
    try:
        return args.func(args)
    except MilSurgeryError as exc:
        report = getattr(exc, "report", None)
        if report is not None:  # merge --verify found a difference: a result, not an error
            print(f"milsurgery: verification failed: {exc}", file=sys.stderr)
            return 1
        if args.debug:
            traceback.print_exc()
        print(f"milsurgery: error: {exc}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Terminated) as exc:
        word, signum = ("interrupted", signal.SIGINT) if isinstance(exc, KeyboardInterrupt) else ("terminated", signal.SIGTERM)
        if args.command == "append" or getattr(args, "in_place", False):
            outcome = f"{args.package} is complete, as it was or with the whole edit"
        else:
            outcome = "no output was written"
        print(f"milsurgery: {word}; {outcome}", file=sys.stderr)
        return 128 + signum
    except BrokenPipeError:  # output piped to a command that stopped reading (| head)
        try:  # so the interpreter's final flush of stdout does not fail again
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):  # stdout is not a file descriptor (captured in-process)
            pass
        return 0
    finally:
        if previous_term is not None:
            signal.signal(signal.SIGTERM, previous_term)


if __name__ == "__main__":
    sys.exit(main())
