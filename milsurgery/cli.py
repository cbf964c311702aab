"""The ``milsurgery`` command line: parses arguments, calls the library, prints.

Exit status: 0 success; 1 ``verify`` found a difference or ``check`` a violation; 2 any error (one line on stderr,
``milsurgery: error: ...``; ``--debug`` adds the traceback); 130 interrupted (SIGINT), 143
terminated (SIGTERM), partial outputs removed.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
import traceback

from . import __version__
from .errors import MilSurgeryError, UsageError

__all__ = ["main", "build_parser"]


class ProgressBar:
    """A one-line progress bar on stderr, drawn only when stderr is a terminal."""

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
        frac = done / total if total else 1.0
        bar = "#" * int(frac * 30)
        sys.stderr.write(f"\r{phase:8s} [{bar:<30s}] {frac * 100:5.1f}% {done / 2**20:9.1f} MiB")
        sys.stderr.flush()

    def finish(self) -> None:
        if self.enabled and self._phase:
            sys.stderr.write("\r" + " " * 72 + "\r")
            sys.stderr.flush()


def _print_json(obj) -> None:
    # One write: json.dump would issue a write per token (seconds for thousands of functions).
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def _print_report(report, quiet: bool, as_json: bool) -> None:
    if as_json:
        _print_json(report.to_dict())
        return
    for w in report.warnings:
        print(f"milsurgery: warning: {w}", file=sys.stderr)
    if quiet:
        return
    print(
        f"wrote {report.output}: functions {', '.join(report.functions)} "
        f"(default {report.default_function!r}), spec version {report.spec_version}"
    )
    print(
        f"  weight.bin {report.bytes_written} bytes, {report.blobs_written} blobs "
        f"({report.blobs_coalesced} coalesced, {report.bytes_coalesced} bytes saved); "
        f"read {report.bytes_read} bytes in {report.seconds:.2f} s"
    )
    if getattr(report, "adoption", None) is not None:
        from .adopt import render_report

        print(render_report(report.adoption))


def _adopt_kwargs(args) -> dict:
    return dict(adopt=args.adopt, anchor=args.anchor, min_cosine=args.min_cosine, max_mean_abs=args.max_mean_abs,
                max_abs=args.max_abs, dry_run=args.dry_run)


def _print_dry_run(report, as_json: bool) -> int:
    if as_json:
        _print_json(report.to_dict())
    else:
        print(report.render_text())
    return 0


def cmd_inspect(args) -> int:
    from .inspect import inspect_package, render_text

    info = inspect_package(args.package, duplicates=not args.no_duplicates)
    if args.memory:
        from .memory import memory_model, render_memory_text

        order = args.order.split(",") if args.order else None
        info["memory"] = memory_model(args.package, order, duplicates=not args.no_duplicates)
    if args.json:
        _print_json(info)
    else:
        print(render_text(info))
        if args.memory:
            print(render_memory_text(info["memory"]))
    return 0


def cmd_merge(args) -> int:
    from .merge import merge

    bar = ProgressBar(not args.quiet)
    try:
        report = merge(args.sources, args.output, default=args.default, force=args.force, sync=not args.no_sync, verify=args.verify, progress=bar, **_adopt_kwargs(args))
    finally:
        bar.finish()
    if args.dry_run:
        return _print_dry_run(report, args.json)
    _print_report(report, args.quiet, args.json)
    return 0


def _run_writer(args, call) -> int:
    bar = ProgressBar(not args.quiet)
    try:
        report = call(bar)
    finally:
        bar.finish()
    _print_report(report, args.quiet, args.json)
    return 0


def cmd_shrink(args) -> int:
    from .surgery import shrink

    if args.dry_run:
        return _print_dry_run(shrink(args.package, **_adopt_kwargs(args)), args.json)
    if args.output is None and not args.in_place:
        raise UsageError("shrink needs -o OUT or --in-place")
    return _run_writer(args, lambda bar: shrink(args.package, args.output, in_place=args.in_place, force=args.force, sync=not args.no_sync, progress=bar, wait=not args.no_wait, **_adopt_kwargs(args)))


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

    return _run_writer(args, lambda bar: append(args.package, args.sources, progress=bar, wait=not args.no_wait))


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
        f"{report.weights_compressed} compressed weights; weights {report.bytes_before} -> "
        f"{report.bytes_after} bytes{' (estimated)' if report.dry_run else ''} in {report.seconds:.2f} s"
    )
    for w in report.weights:
        print(
            f"  {', '.join(w.ops)} {w.dtype}{w.shape}: {w.bytes_before} -> {w.bytes_after} bytes, "
            f"relative RMS error {w.relative_rms:.3g}, max |delta| {w.max_abs_error:.3g}"
        )
    for s in report.skipped:
        print(f"  skipped {s}")
    return 0


def cmd_verify(args) -> int:
    from .verify import verify

    report = verify(args.package, args.against, tolerance=args.tolerance, min_cosine=args.min_cosine,
                    max_mean_abs=args.max_mean_abs, max_abs=args.max_abs, default=args.default)
    if args.json:
        _print_json(report.to_dict())
    else:
        for d in report.package_differences:
            print(f"package: DIFFERS: {d}")
        for c in report.checks:
            status = "equivalent" if c.equivalent else "DIFFERS"
            print(f"{c.function}: {status} to {c.source} ({c.blobs_compared} blobs, {c.bytes_compared} bytes compared)")
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
                print(f"program attribute {a.key!r}: equivalent to {a.matched}'s ({a.blobs_compared} blobs, {a.bytes_compared} bytes compared)")
            else:
                print(f"program attribute {a.key!r}: DIFFERS\n  {a.difference}")
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


_NO_WAIT_HELP = "if another process is editing PKG in place, fail at once instead of waiting for it"


def _add_output_options(p, *, output=True) -> None:
    if output:
        p.add_argument("-o", "--output", required=True, metavar="OUT.mlpackage")
        p.add_argument("--force", action="store_true", help="replace OUT if it exists")
        p.add_argument("--no-sync", action="store_true", help=_NO_SYNC_HELP)
    p.add_argument("--quiet", action="store_true", help="no progress bar, no summary")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def _add_threshold_options(p) -> None:
    p.add_argument("--min-cosine", type=float, metavar="C", help="near-duplicates need cosine >= C (default 0.9999)")
    p.add_argument("--max-mean-abs", type=float, metavar="D", help="near-duplicates need mean |delta| <= D (default 1e-3)")
    p.add_argument("--max-abs", type=float, metavar="D", help="near-duplicates need max |delta| <= D (default: no limit)")


def _add_adopt_options(p) -> None:
    p.add_argument("--adopt", action="store_true", help="write near-duplicate weights of later functions as references to the anchor function's weights")
    p.add_argument("--anchor", metavar="FUNC", help="with --adopt: the function others adopt from (default: the first)")
    _add_threshold_options(p)
    p.add_argument("--dry-run", action="store_true", help="with --adopt: write nothing, print what would be adopted")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="milsurgery",
        description="Low-level surgery on Core ML ML-program packages (.mlpackage).",
    )
    parser.add_argument("--version", action="version", version=f"milsurgery {__version__}")
    parser.add_argument("--debug", action="store_true", help="show a traceback on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("inspect", help="describe a package: functions, blobs, sharing, duplicates")
    p.add_argument("package", metavar="PKG")
    p.add_argument("--json", action="store_true", help="machine-readable output (stable keys)")
    p.add_argument("--no-duplicates", action="store_true", help="skip the duplicate-content search (reads no weight bytes)")
    p.add_argument("--memory", action="store_true", help="model weight memory per function in load order (shared mapping vs per-function copies)")
    p.add_argument("--order", metavar="F1,F2,...", help="load order for --memory (default: the package's function order)")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("merge", help="merge functions of several packages into one multi-function package")
    p.add_argument("sources", nargs="+", metavar="SRC[:FUNC[=NEW]]")
    p.add_argument("--default", metavar="NAME", help="default function (otherwise the first)")
    p.add_argument("--verify", action="store_true", help="check the written package against its sources before moving it into place (on a difference: exit 1, nothing replaced)")
    _add_output_options(p)
    _add_adopt_options(p)
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("shrink", help="coalesce identical blobs and drop unreferenced ones")
    p.add_argument("package", metavar="PKG")
    p.add_argument("-o", "--output", metavar="OUT.mlpackage")
    p.add_argument("--in-place", action="store_true", help="replace PKG atomically instead of writing OUT")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--no-sync", action="store_true", help=_NO_SYNC_HELP + " (not with --in-place)")
    p.add_argument("--no-wait", action="store_true", help=_NO_WAIT_HELP)
    _add_output_options(p, output=False)
    _add_adopt_options(p)
    p.set_defaults(func=cmd_shrink)

    p = sub.add_parser("extract", help="a package with only some functions and the blobs they use")
    p.add_argument("package", metavar="PKG")
    p.add_argument("functions", nargs="+", metavar="FUNC[=NEW]")
    p.add_argument("--single", action="store_true", help="write an ordinary single-function model (one FUNC)")
    p.add_argument("--default", metavar="NAME", help="default function of the output")
    _add_output_options(p)
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("remove", help="a package without some functions")
    p.add_argument("package", metavar="PKG")
    p.add_argument("functions", nargs="+", metavar="FUNC")
    p.add_argument("--default", metavar="NAME", help="new default function (required when removing the default)")
    _add_output_options(p)
    p.set_defaults(func=cmd_remove)

    p = sub.add_parser("rename", help="rename functions (the default follows)")
    p.add_argument("package", metavar="PKG")
    p.add_argument("mapping", nargs="+", metavar="OLD=NEW")
    _add_output_options(p)
    p.set_defaults(func=cmd_rename)

    p = sub.add_parser("append", help="add functions to a package in place, appending only new blobs")
    p.add_argument("package", metavar="PKG")
    p.add_argument("sources", nargs="+", metavar="SRC[:FUNC[=NEW]]")
    p.add_argument("--no-wait", action="store_true", help=_NO_WAIT_HELP)
    _add_output_options(p, output=False)
    p.set_defaults(func=cmd_append)

    p = sub.add_parser("show", help="print the program as text (model.mil syntax); reads no weight bytes")
    p.add_argument("package", metavar="PKG")
    p.add_argument("functions", nargs="*", metavar="FUNC", help="only these functions (default: all)")
    p.add_argument("--ops", metavar="TYPE,...", help="only ops of these types")
    p.add_argument("--no-values", action="store_true", help="elide immediate values of more than 16 elements")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("diff", help="how two functions differ: I/O, ops (aligned by structure), weight bytes (exit 1 if they differ)")
    p.add_argument("a", metavar="A[:FUNC]")
    p.add_argument("b", metavar="B[:FUNC]")
    p.add_argument("--ignore-shapes", action="store_true", help="leave out differences that are only of shapes")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_diff)
    p = sub.add_parser("compress", help="palettize or quantize every distinct weight once, shared by all functions")
    p.add_argument("package", metavar="PKG")
    p.add_argument("-o", "--output", metavar="OUT.mlpackage")
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

    p = sub.add_parser("verify", help="prove functions of PKG equal their sources (exit 1 if not)")
    p.add_argument("package", metavar="PKG")
    p.add_argument("--against", nargs="+", required=True, metavar="SRC[:FUNC[=NEW]]")
    p.add_argument("--default", metavar="NAME", help="the default function PKG must have (otherwise: the first source function, or a source's default)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--tolerance", action="store_true", help="a weight whose blobs differ passes when its dequantized values meet the thresholds")
    _add_threshold_options(p)
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("check", help="apply Core ML's spec rules to PKG offline (exit 1 listing each violation)")
    p.add_argument("package", metavar="PKG", help="an .mlpackage directory or a model.mlmodel spec file")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_check)
    return parser


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
    args = parser.parse_args(argv)
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
    except BrokenPipeError:
        return 0
    finally:
        if previous_term is not None:
            signal.signal(signal.SIGTERM, previous_term)


if __name__ == "__main__":
    sys.exit(main())
