"""``merge``: several packages' functions into one multi-function package, weights coalesced."""

from __future__ import annotations

import os
from collections.abc import Sequence

from .assemble import Progress, WriteReport, write_package
from .package import Package
from .sources import SourceSpec, check_function_name, parse_source, resolve_sources  # noqa: F401 (public here too)

__all__ = ["SourceSpec", "parse_source", "resolve_sources", "merge", "check_function_name"]


def merge(
    sources: Sequence[str | os.PathLike | SourceSpec],
    out: str | os.PathLike,
    *,
    default: str | None = None,
    force: bool = False,
    sync: bool = True,
    verify: bool = False,
    progress: Progress | None = None,
    adopt: bool = False,
    anchor: str | None = None,
    min_cosine: float | None = None,
    max_mean_abs: float | None = None,
    max_abs: float | None = None,
    dry_run: bool = False,
    workers: int | None = None,
):
    """Merge functions of ``sources`` (``PATH[:FUNC[=NEW]]`` each) into the package ``out``.

    Every blob referenced by a chosen function is written once per distinct content (dtype and
    bytes); unreferenced blobs are dropped. Sources are read, never modified; ``out`` appears
    complete or not at all. With ``verify``, the written package is checked against its sources
    (graphs equal except blob offsets, referenced bytes equal) before it is moved into place; a
    difference raises :class:`milsurgery.verify.VerificationFailed`, nothing appears at ``out``
    and a package that ``force`` would have replaced is left as it was; on success the report's
    ``verified`` holds the verification report (with a one-line ``summary``). ``sync=False`` skips
    flushing the output to disk: it still appears whole to other programs, but a power loss or
    system crash soon after may leave it incomplete.

    With ``adopt``, each weight of a function that is a near-duplicate of a weight of the anchor
    function (the first, or ``anchor``) is written as references to the anchor weight's blobs
    (see :mod:`milsurgery.adopt`): it holds when cosine >= ``min_cosine`` (default 0.9999), mean
    |delta| <= ``max_mean_abs`` (default 1e-3) and, if given, max |delta| <= ``max_abs``. The
    report's ``adoption`` lists what was adopted and rejected; ``verify`` then checks adopted
    weights against those thresholds. ``dry_run`` writes nothing and returns the
    :class:`milsurgery.adopt.AdoptReport`. ``workers`` processes measure weights, this one
    included (default: one per CPU, at most 8; :mod:`milsurgery.parallel`); the outcome does not
    depend on it.
    """
    from .thresholds import adoption_options

    thresholds = adoption_options(adopt, anchor, min_cosine, max_mean_abs, max_abs, dry_run, workers)
    opened: dict[str, Package] = {}
    try:
        picks = resolve_sources(sources, opened)
        if thresholds is not None and dry_run:
            from .adopt import plan_for_picks

            return plan_for_picks(picks, thresholds, anchor, dry_run, workers).report
        check = None
        checked = []
        if verify:
            from .verify import verify_staged

            dest = os.path.abspath(os.fspath(out))
            expected_default = default if default is not None else (picks[0].new_name if picks else None)
            check = lambda staged: checked.append(  # noqa: E731
                verify_staged(staged, dest, picks, thresholds, progress, default=expected_default)
            )

        def write(adjust=None, confirm=None, unchanged=None):
            return write_package(out, picks, default=default, force=force, sync=sync, progress=progress, check=check,
                                 adjust=adjust, confirm=confirm, unchanged=unchanged)

        if thresholds is not None:
            from .adopt import write_adopting

            plan, report = write_adopting(picks, thresholds, anchor, write, workers)
            report.adoption = plan.report.to_dict()
        else:
            report = write()
        if checked:
            report.verified = dict(checked[0].to_dict(), summary=checked[0].summary())
        return report
    finally:
        for pkg in opened.values():
            pkg.close()
