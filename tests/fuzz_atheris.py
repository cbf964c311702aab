#!/usr/bin/env python3
"""Coverage-guided fuzzing of package opening and ``inspect`` with atheris (libFuzzer).

Not collected by pytest (the file name does not start with ``test_``); ``tests/test_fuzz.py``
holds the bounded Hypothesis fuzz tests that CI runs. This is for long runs::

    pip install atheris
    python tests/fuzz_atheris.py --write-seeds corpus         # the valid package's three files
    python tests/fuzz_atheris.py corpus -max_total_time=180   # any libFuzzer arguments
    python tests/fuzz_atheris.py --keep-going crashes corpus -max_total_time=180
    python tests/fuzz_atheris.py --replay crash-1234abcd ...  # reproduce, atheris not needed

Each input's first byte chooses the file it replaces in a small valid two-function package
(0: weight.bin, 1: model.mlmodel, 2: Manifest.json, modulo 3); the remaining bytes are that
file's new content. The package is opened (``Package``) and inspected (``inspect_package``);
with ``--merge``, a package that opens is also merged into a new package. Only
``MilSurgeryError`` may escape, and its message must name the file or the package; anything else
is a crash.

``--keep-going DIR`` does not stop at the first crash: it saves each input whose failure is new
(new exception type and deepest milsurgery frame) as ``DIR/crash-<sha1>``, prints its
traceback once, and goes on. ``--replay FILE...`` runs saved inputs (libFuzzer's ``crash-*``
files included) and prints what each does; it exits 1 if any of them fails.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # the project root, so milsurgery imports uninstalled

MANIFEST = "Manifest.json"
SPEC = os.path.join("Data", "com.apple.CoreML", "model.mlmodel")
WEIGHTS = os.path.join("Data", "com.apple.CoreML", "weights", "weight.bin")
TARGETS = (WEIGHTS, SPEC, MANIFEST)  # chosen by the first byte of an input, modulo 3
PKG_NAME = "fuzzed.mlpackage"
OUT_NAME = "merged.mlpackage"


def _import_milsurgery():
    global MilSurgeryError, Package, inspect_package, merge, build_llm_like
    from milsurgery import MilSurgeryError, Package, inspect_package, merge  # noqa: F401
    from milsurgery.synth import build_llm_like  # noqa: F401


class Harness:
    """A seed package in a temporary directory, reset before each input."""

    def __init__(self, with_merge: bool = False):
        self.root = tempfile.mkdtemp(prefix="milsurgery-fuzz-")
        self.pkg = os.path.join(self.root, PKG_NAME)
        self.out = os.path.join(self.root, OUT_NAME)
        self.with_merge = with_merge
        build_llm_like(self.pkg, seq_lens={"a": 1, "b": 4}, hidden=16, layers=2, shared_fraction=0.5)
        self.seed = {}
        for rel in TARGETS:
            with open(os.path.join(self.pkg, rel), "rb") as f:
                self.seed[rel] = f.read()
        self.runs = 0

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def seed_inputs(self) -> dict[str, bytes]:
        return {f"seed-{i}-{os.path.basename(rel)}": bytes([i]) + self.seed[rel] for i, rel in enumerate(TARGETS)}

    def _reset(self) -> None:
        # A command may have replaced a file or left an output: restore the exact seed tree.
        for rel, data in self.seed.items():
            path = os.path.join(self.pkg, rel)
            if not os.path.isfile(path) or os.path.islink(path):
                shutil.rmtree(self.pkg, ignore_errors=True)
                break
        for rel, data in self.seed.items():
            path = os.path.join(self.pkg, rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(data)
        for name in os.listdir(self.root):
            if name != PKG_NAME:
                shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)

    def run(self, data: bytes) -> None:
        """One input. Raises whatever the library raised that is not a MilSurgeryError."""
        if not data:
            return
        self.runs += 1
        self._reset()
        rel = TARGETS[data[0] % len(TARGETS)]
        with open(os.path.join(self.pkg, rel), "wb") as f:
            f.write(data[1:])
        names = (os.path.basename(rel), PKG_NAME)
        try:
            Package(self.pkg).close()
            inspect_package(self.pkg)
        except MilSurgeryError as exc:
            _check_message(exc, names)
            return
        if self.with_merge:
            try:
                merge([self.pkg], self.out)
            except MilSurgeryError as exc:
                _check_message(exc, names + (OUT_NAME,))
                if os.path.lexists(self.out):
                    raise AssertionError(f"merge failed ({exc}) but left {self.out}") from None
                return
            try:
                inspect_package(self.out)
            except MilSurgeryError as exc:
                raise AssertionError(f"merge wrote a package that does not open: {exc}") from None


def _check_message(exc: Exception, names) -> None:
    if not any(n in str(exc) for n in names):
        raise AssertionError(f"{type(exc).__name__} names none of {names}: {exc}")


def _signature(exc: BaseException) -> tuple[str, str]:
    """Exception type and the deepest milsurgery frame: what makes two crashes the same bug."""
    frame = "?"
    for fs in traceback.extract_tb(exc.__traceback__):
        if f"{os.sep}milsurgery{os.sep}" in fs.filename:
            frame = f"{os.path.basename(fs.filename)}:{fs.lineno} {fs.name}"
    return type(exc).__name__, frame


def _describe(data: bytes) -> str:
    if not data:
        return "empty input"
    return f"replaces {TARGETS[data[0] % len(TARGETS)]} with {len(data) - 1} bytes"


def replay(paths: list[str], with_merge: bool) -> int:
    _import_milsurgery()
    harness = Harness(with_merge)
    failed = 0
    try:
        for path in paths:
            with open(path, "rb") as f:
                data = f.read()
            try:
                harness.run(data)
            except Exception as exc:  # noqa: BLE001 - reporting every kind is the point
                failed += 1
                kind, frame = _signature(exc)
                print(f"{path}: FAIL ({_describe(data)}): {kind} at {frame}")
                traceback.print_exception(exc)
            else:
                print(f"{path}: ok ({_describe(data)})")
    finally:
        harness.close()
    print(f"{len(paths)} inputs replayed, {failed} failed")
    return 1 if failed else 0


def write_seeds(directory: str) -> int:
    _import_milsurgery()
    harness = Harness()
    try:
        os.makedirs(directory, exist_ok=True)
        for name, data in harness.seed_inputs().items():
            with open(os.path.join(directory, name), "wb") as f:
                f.write(data)
            print(os.path.join(directory, name))
    finally:
        harness.close()
    return 0


def fuzz(argv: list[str], keep_going: str | None, with_merge: bool) -> int:
    try:
        import atheris
    except ImportError:
        print("fuzz_atheris.py: atheris is not installed: pip install atheris (or use --replay FILE...)")
        return 2
    with atheris.instrument_imports():
        _import_milsurgery()
    harness = Harness(with_merge)
    seen: dict[tuple[str, str], str] = {}

    def run(data: bytes) -> None:
        # One branch per target file, so that libFuzzer sees distinct coverage for each and
        # keeps seeds for all three in its corpus.
        if not data:
            return
        target = data[0] % len(TARGETS)
        if target == 0:
            harness.run(bytes([0]) + data[1:])
        elif target == 1:
            harness.run(bytes([1]) + data[1:])
        else:
            harness.run(bytes([2]) + data[1:])

    run = atheris.instrument_func(run)

    def one_input(data: bytes) -> None:
        if keep_going is None:
            run(data)
            return
        try:
            run(data)
        except Exception as exc:  # noqa: BLE001
            sig = _signature(exc)
            if sig in seen:
                return
            name = os.path.join(keep_going, "crash-" + hashlib.sha1(data).hexdigest())
            with open(name, "wb") as f:
                f.write(data)
            seen[sig] = name
            print(
                f"\n=== new failure #{len(seen)} after {harness.runs} inputs: {sig[0]} at {sig[1]} "
                f"({_describe(data)}); input saved as {name}",
                flush=True,
            )
            traceback.print_exception(exc)
            sys.stdout.flush()

    if keep_going is not None:
        os.makedirs(keep_going, exist_ok=True)
    try:
        atheris.Setup([sys.argv[0], *argv], atheris.instrument_func(one_input))
        atheris.Fuzz()
    finally:
        harness.close()
    return 0


def main(argv: list[str]) -> int:
    with_merge = "--merge" in argv
    argv = [a for a in argv if a != "--merge"]
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__)
        return 0
    if argv[:1] == ["--replay"]:
        if len(argv) < 2:
            print("usage: fuzz_atheris.py --replay FILE...", file=sys.stderr)
            return 2
        return replay(argv[1:], with_merge)
    if argv[:1] == ["--write-seeds"]:
        if len(argv) != 2:
            print("usage: fuzz_atheris.py --write-seeds DIR", file=sys.stderr)
            return 2
        return write_seeds(argv[1])
    keep_going = None
    if argv[:1] == ["--keep-going"]:
        if len(argv) < 2:
            print("usage: fuzz_atheris.py --keep-going DIR [libFuzzer args]", file=sys.stderr)
            return 2
        keep_going, argv = argv[1], argv[2:]
    return fuzz(argv, keep_going, with_merge)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
