"""Thresholds of near-duplicate adoption and the checking of the options that set them.

Kept apart from :mod:`milsurgery.adopt` (which needs numpy) so that commands check their options
without importing it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from .errors import UsageError

__all__ = ["Thresholds", "Metrics", "adoption_options"]


@dataclass
class Metrics:
    """How far a target weight's values are from an anchor's (delta = anchor - target)."""

    cosine: float
    mean_abs: float
    max_abs: float
    rel_rms: float  # sqrt(sum delta^2 / sum target^2)
    elements: int

    def to_dict(self) -> dict:
        return asdict(self)

    def text(self) -> str:
        return (f"cosine {self.cosine:.9f}, mean |delta| {self.mean_abs:.3g}, max |delta| {self.max_abs:.3g}, "
                f"relative RMS {self.rel_rms:.3g}")


@dataclass(frozen=True)
class Thresholds:
    """What a near-duplicate must meet: all given must hold."""

    min_cosine: float = 0.9999
    max_mean_abs: float = 1e-3
    max_abs: float | None = None

    def __post_init__(self) -> None:
        def bad(name: str, value, rule: str) -> UsageError:
            return UsageError(f"{name} (--{name.replace('_', '-')}) must be {rule}, got {value!r}")

        c = self.min_cosine
        if not isinstance(c, (int, float)) or isinstance(c, bool) or not -1.0 <= c <= 1.0:
            raise bad("min_cosine", c, "a number from -1 to 1")
        for name in ("max_mean_abs", "max_abs"):
            v = getattr(self, name)
            if v is None and name == "max_abs":
                continue
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not (math.isfinite(v) and v >= 0):
                raise bad(name, v, "a finite number >= 0")

    def failure(self, m) -> str | None:
        """The first threshold ``m`` does not meet, in words, or None if it meets them all."""
        if not m.cosine >= self.min_cosine:
            return f"cosine {m.cosine:.9g} < min_cosine {self.min_cosine:g}"
        if not m.mean_abs <= self.max_mean_abs:
            return f"mean |delta| {m.mean_abs:.6g} > max_mean_abs {self.max_mean_abs:g}"
        if self.max_abs is not None and not m.max_abs <= self.max_abs:
            return f"max |delta| {m.max_abs:.6g} > max_abs {self.max_abs:g}"
        return None

    def to_dict(self) -> dict:
        return asdict(self)


def adoption_options(
    adopt: bool,
    anchor: str | None,
    min_cosine: float | None,
    max_mean_abs: float | None,
    max_abs: float | None,
    dry_run: bool,
    workers: int | None = None,
) -> Thresholds | None:
    """Check the adoption keywords of ``merge``/``shrink``: the thresholds (defaults filled in)
    with ``adopt``, None without it; options that only make sense with ``adopt`` are refused, and
    ``workers`` (processes measuring weights) must be a whole number >= 1."""
    if not adopt:
        given = [n for n, v in (("anchor", anchor), ("min_cosine", min_cosine), ("max_mean_abs", max_mean_abs),
                                ("max_abs", max_abs), ("workers", workers)) if v is not None] + (["dry_run"] if dry_run else [])
        if given:
            raise UsageError(f"--{given[0].replace('_', '-')} applies only with --adopt")
        return None
    if workers is not None and (not isinstance(workers, int) or isinstance(workers, bool) or workers < 1):
        raise UsageError(f"workers (--workers) must be a whole number >= 1, got {workers!r}")
    defaults = Thresholds()
    return Thresholds(
        defaults.min_cosine if min_cosine is None else min_cosine,
        defaults.max_mean_abs if max_mean_abs is None else max_mean_abs,
        max_abs,
    )
