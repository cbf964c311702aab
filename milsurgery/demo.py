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

from .check import check as validity
from .inspect import inspect_package, render_text
from .merge import merge
from .synth import build_llm_like
from .verify import verify


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m milsurgery.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", metavar="DIR", help="build in DIR (kept) instead of a temporary directory")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="milsurgery-demo-") as tmp:
        work = args.keep or tmp
        os.makedirs(work, exist_ok=True)
        infer = os.path.join(work, "infer.mlpackage")
        prefill = os.path.join(work, "prefill.mlpackage")
        out = os.path.join(work, "llm.mlpackage")
        for path, seq in ((infer, 1), (prefill, 16)):
            build_llm_like(path, seq_lens=seq, hidden=256, layers=8, seed=0, force=True)
            print(f"built {path}: {os.path.getsize(os.path.join(path, 'Data/com.apple.CoreML/weights/weight.bin'))} bytes of weights")
        print(f"\n$ milsurgery merge -o {out} {infer}:main=infer {prefill}:main=prefill --verify")
        report = merge([f"{infer}:main=infer", f"{prefill}:main=prefill"], out, force=True, verify=True)
        print(
            f"merged {len(report.functions)} functions: {report.blobs_written} blobs written, "
            f"{report.blobs_coalesced} coalesced ({report.bytes_coalesced} bytes not duplicated), "
            f"weight.bin {report.bytes_written} bytes, {report.seconds:.3f} s"
        )
        check = verify(out, [f"{infer}:main=infer", f"{prefill}:main=prefill"])
        print(f"verify: {check.summary()}")
        print(f"check (Core ML's spec rules): {validity(out).summary()}")
        print(f"\n$ milsurgery inspect {out}")
        print(render_text(inspect_package(out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
