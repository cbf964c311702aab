"""``python -m milsurgery.demo``: the main job on a small example built on the spot.

Builds two single-function packages from the same weights (``infer`` at sequence length 1 and
``prefill`` at 16, as a converter would produce them), merges them into one multi-function
package with weights coalesced, verifies the result against the sources, checks it against Core
ML's spec rules and shows ``inspect``.
Needs only milsurgery's runtime dependencies.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

from .cli import human_bytes
from .check import check as validity
from .inspect import inspect_package, render_text
from .merge import merge
from .synth import build_llm_like


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m milsurgery.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", metavar="DIR", help="build in DIR (kept) instead of a temporary directory removed on exit")
    args = parser.parse_args(argv)
    try:
        if args.keep:
            os.makedirs(args.keep, exist_ok=True)
            _run(args.keep, kept=True)
        else:
            with tempfile.TemporaryDirectory(prefix="milsurgery-demo-") as tmp:
                _run(tmp, kept=False)
    except BrokenPipeError:  # output piped to a command that stopped reading (| head)
        # Point stdout at /dev/null so the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def _run(work: str, kept: bool) -> None:
    infer = os.path.join(work, "infer.mlpackage")
    prefill = os.path.join(work, "prefill.mlpackage")
    out = os.path.join(work, "llm.mlpackage")
    where = "kept after the demo" if kept else "a temporary directory removed when the demo ends; --keep DIR keeps the packages"
    print(f"working in {work}: {where}")
    for path, seq in ((infer, 1), (prefill, 16)):
        build_llm_like(path, seq_lens=seq, hidden=256, layers=8, seed=0, force=True)
        size = os.path.getsize(os.path.join(path, "Data/com.apple.CoreML/weights/weight.bin"))
        print(f"built {path}: {human_bytes(size)} of weights")
    print(f"\n$ milsurgery merge -o {out} {infer}:main=infer {prefill}:main=prefill --verify")
    report = merge([f"{infer}:main=infer", f"{prefill}:main=prefill"], out, force=True, verify=True)
    print(
        f"merged {len(report.functions)} functions: weight.bin {human_bytes(report.bytes_written)}, "
        f"{report.blobs_written} blobs written, {report.blobs_coalesced} identical to a blob already stored "
        f"({human_bytes(report.bytes_coalesced)} not written again), {report.seconds:.3f} s"
    )
    print(f"verified: {report.verified['summary']}")
    print(f"check (Core ML's spec rules): {validity(out).summary()}")
    print(f"\n$ milsurgery inspect {out}")
    print(render_text(inspect_package(out)))
    sys.stdout.flush()

if __name__ == "__main__":
    sys.exit(main())
