"""``merge``: several packages' functions into one multi-function package, weights coalesced."""

from __future__ import annotations

import os
from collections.abc import Sequence

from .assemble import Progress, WriteReport, write_package
from .package import Package
from .sources import SourceSpec, parse_source, resolve_sources  # noqa: F401 (parse_source: public here too)

__all__ = ["SourceSpec", "parse_source", "resolve_sources", "merge"]


def merge(
    sources: Sequence[str | os.PathLike | SourceSpec],
    out: str | os.PathLike,
    *,
    default: str | None = None,
    force: bool = False,
    sync: bool = True,
    verify: bool = False,
    progress: Progress | None = None,
) -> WriteReport:
    """Merge functions of ``sources`` (``PATH[:FUNC[=NEW]]`` each) into the package ``out``.

    Every blob referenced by a chosen function is written once per distinct content (dtype and
    bytes); unreferenced blobs are dropped. Sources are read, never modified; ``out`` appears
    complete or not at all. With ``verify``, the written package is checked against its sources
    (graphs equal except blob offsets, referenced bytes equal) before it is moved into place; a
    difference raises :class:`milsurgery.verify.VerificationFailed`, nothing appears at ``out``
    and a package that ``force`` would have replaced is left as it was. ``sync=False`` skips
    flushing the output to disk: it still appears whole to other programs, but a power loss or
    system crash soon after may leave it incomplete.
    """
    opened: dict[str, Package] = {}
    try:
        picks = resolve_sources(sources, opened)
        check = None
        if verify:
            from .verify import verify_staged

            dest = os.path.abspath(os.fspath(out))
            check = lambda staged: verify_staged(staged, dest, picks)  # noqa: E731
        return write_package(out, picks, default=default, force=force, sync=sync, progress=progress, check=check)
    finally:
        for pkg in opened.values():
            pkg.close()
