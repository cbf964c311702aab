"""Near-duplicate adoption: a weight of one function is written as references to the blobs of an
almost identical weight of the anchor function.

:func:`plan_adoption` takes the functions a command is about to write and:

1. lists every function's weights (:func:`milsurgery.weights.find_weights`, spec only) and
   gives each a structural key: the producing ops' types, their non-blob inputs and
   attributes, their output types and each blob's dtype and shape, with names left out. Only
   weights with equal keys can pair, so adoption never changes anything in a graph but blob
   references;
2. sets aside weights byte-identical to an anchor weight of the same key (blob samples, then the
   bytes decide) and re-points them at the anchor's blobs, so the writer's coalescing sees one
   blob and does not compare the bytes again. Steps 1 and 2 need no numpy: when every weight is
   byte-identical, adoption ends here and costs what a plain merge's coalescing would;
   otherwise :mod:`milsurgery.measure` is loaded and every weight's ops are checked for
   consistency before anything is decided;
3. takes a cheap sketch of each remaining weight (256 materialized values from 16 rows spread
   along axis 0) and ranks the anchor's weights of the same key by sketch distance (names with
   a trailing ``_N`` stripped break ties; they never decide);
4. computes, for the nearest candidate (and a runner-up whose sketch is about as close), the
   full metrics over the whole materialized tensors with float64 accumulation
   (:func:`milsurgery.measure.compare_weights`: for the common kinds only what differs is decoded, the norms
   coming from one pass over the anchor); the best candidate meeting every threshold is
   adopted, otherwise the weight is reported as rejected with the threshold that failed.
   The pairs are measured on several processes (:mod:`milsurgery.parallel`: pairs sharing an
   anchor together, on this process and helpers started as soon as the screen shows that
   something must be measured); threads would not help, as two threads measured slower than
   one on a 2-core machine (the numpy calls on cache-sized windows contend for the interpreter
   lock). The decisions do not depend on how many processes measure;
5. returns the mapping of references (output function, op, location) -> the anchor's blob, which
   :func:`milsurgery.assemble.write_package` applies before coalescing (the writer is unchanged:
   the re-pointed references coalesce with the anchor's), and records the adoption in the
   output's metadata (``userDefined["milsurgery.adopted"]``).

I/O: the spec, 64-byte records and a few KiB of samples per blob for every weight; rows for the
sketches; each candidate pair's blobs once for the byte comparison and once for the metrics.
Memory is bounded by the windows (about 1 Mi elements at most), not by tensor or model size (a
LUT weight also keeps its index counts and palettes per group: at most 1 Mi entries each, else
it is materialized in windows).
"""

from __future__ import annotations

import json
import re
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from ._proto import milsurgery_spec_pb2 as pb
from .coalesce import BlobSource, blobs_equal, sample_digest
from .errors import UsageError
from .formats import ADOPTED_METADATA_KEY
from .package import ResolvedRef
from .spec import BlobRef, blanked_value
from .thresholds import Metrics, Thresholds, adoption_options  # noqa: F401 (re-exported)
from .weights import Weight, find_weights

__all__ = [
    "Thresholds",
    "Metrics",
    "Adoption",
    "Rejection",
    "AdoptReport",
    "AdoptPlan",
    "METADATA_KEY",
    "compare_weights",
    "render_report",
    "structure_key",
    "plan_adoption",
]

#: The ``userDefined`` metadata key recording what adoption did to a package.
METADATA_KEY = ADOPTED_METADATA_KEY
#: Candidates (best sketch first) whose full metrics are computed for one target weight.
CANDIDATES = 2
#: Sketch distances (relative L2) this close to the nearest candidate's count as a tie.
SKETCH_SLACK = 1e-3


def _ref_slots(w: Weight) -> dict[tuple[int, str], ResolvedRef]:
    """(index of the op in ``w.ops``, location in the op) -> blob reference."""
    index = {id(op): i for i, op in enumerate(w.ops)}
    by_name = {op.outputs[0].name: id(op) for op in w.ops if op.outputs}
    return {(index[by_name[r.ref.op_name]], r.ref.location): r for r in w.refs}


def structure_key(w: Weight) -> tuple:
    """What must be equal for two weights to pair: op types, non-blob inputs and attributes,
    output types, and each blob's dtype and shape (blob locations and all names left out), as
    a tuple of its parts (compared whole: no digest, so no two structures can collide)."""
    parts: list = []
    position = {op.outputs[0].name: i for i, op in enumerate(w.ops) if op.outputs}
    for op in w.ops:
        parts.append(("op", op.type))
        for e in sorted(op.inputs, key=lambda e: e.key):
            parts.append(("in", e.key))
            for b in e.value.arguments:
                if b.WhichOneof("binding") == "name":
                    parts.append(("ref", position.get(b.name, b.name)))
                else:
                    parts.append(("value", blanked_value(b.value)))
        for e in sorted(op.attributes, key=lambda e: e.key):
            if e.key != "name":
                parts.append(("attr", e.key, blanked_value(e.value)))
        for out in op.outputs:
            parts.append(("out", out.type.SerializeToString(deterministic=True)))
    parts.append(("slots", tuple(sorted(_ref_slots(w)))))
    return tuple(parts)


def _base_name(name: str) -> str:
    return re.sub(r"_\d+$", "", name)


@dataclass
class Adoption:
    """A target weight written as references to an anchor weight's blobs."""

    function: str
    op: str
    kind: str
    anchor_function: str
    anchor_op: str
    metrics: Metrics
    bytes_saved: int

    def to_dict(self) -> dict:
        d = asdict(self)
        d["metrics"] = self.metrics.to_dict()
        return d


@dataclass
class Rejection:
    """A target weight left as it was: its best candidate failed a threshold (``failed``)."""

    function: str
    op: str
    kind: str
    anchor_function: str
    anchor_op: str
    failed: str
    metrics: Metrics

    def to_dict(self) -> dict:
        d = asdict(self)
        d["metrics"] = self.metrics.to_dict()
        return d


@dataclass
class AdoptReport:
    """What adoption found: every adopted weight, every rejected candidate, totals."""

    anchor: str
    thresholds: Thresholds
    adopted: list[Adoption] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    weights: int = 0  # weights of the non-anchor functions
    identical: int = 0  # weights byte-identical to an anchor weight (left to exact coalescing)
    unpaired: int = 0  # weights with no anchor weight of the same structure
    seconds: float = 0.0
    dry_run: bool = False

    @property
    def bytes_saved(self) -> int:
        return sum(a.bytes_saved for a in self.adopted)

    def to_dict(self) -> dict:
        return {
            "anchor": self.anchor,
            "thresholds": self.thresholds.to_dict(),
            "dry_run": self.dry_run,
            "adopted": [a.to_dict() for a in self.adopted],
            "rejected": [r.to_dict() for r in self.rejected],
            "totals": {
                "weights": self.weights,
                "adopted": len(self.adopted),
                "rejected": len(self.rejected),
                "identical": self.identical,
                "unpaired": self.unpaired,
                "bytes_saved": self.bytes_saved,
                "seconds": self.seconds,
            },
        }

    def render_text(self) -> str:
        return render_report(self.to_dict())


def _metrics_text(m: dict) -> str:
    return (f"cosine {m['cosine']:.9f}, mean |delta| {m['mean_abs']:.3g}, max |delta| {m['max_abs']:.3g}, "
            f"relative RMS {m['rel_rms']:.3g}")


def render_report(d: dict) -> str:
    """The text form of an :meth:`AdoptReport.to_dict` (what the CLI prints)."""
    t, tot = d["thresholds"], d["totals"]
    lines = [
        f"adoption (anchor function {d['anchor']!r}; min cosine {t['min_cosine']:g}, max mean |delta| "
        f"{t['max_mean_abs']:g}, max |delta| {'none' if t['max_abs'] is None else format(t['max_abs'], 'g')})"
        + (": dry run, nothing written" if d["dry_run"] else "")
    ]
    for a in d["adopted"]:
        lines.append(
            f"  adopted {a['function']}:{a['op']} ({a['kind']}) from {a['anchor_function']}:{a['anchor_op']}: "
            f"{_metrics_text(a['metrics'])}; {a['bytes_saved']} bytes saved"
        )
    for r in d["rejected"]:
        lines.append(
            f"  rejected {r['function']}:{r['op']} ({r['kind']}) vs {r['anchor_function']}:{r['anchor_op']}: "
            f"{r['failed']} ({_metrics_text(r['metrics'])})"
        )
    lines.append(
        f"  totals: {tot['adopted']} adopted ({tot['bytes_saved']} bytes saved), {tot['rejected']} rejected, "
        f"{tot['identical']} byte-identical, {tot['unpaired']} without a candidate, of {tot['weights']} weights; "
        f"{tot['seconds']:.2f} s"
    )
    return "\n".join(lines)


class DeferredMismatch(Exception):
    """A weight taken as byte-identical from its blob samples was not: the plan must be made
    again with its bytes compared (see :func:`plan_adoption`'s ``defer_identical``)."""


@dataclass
class AdoptPlan:
    """What adoption decided, and the blob references it re-points (:meth:`apply`)."""

    report: AdoptReport
    #: (output function, op name, location) -> the anchor's blob that reference is to point at
    mapping: dict[tuple[str, str, str], ResolvedRef]
    #: Weights whose blobs' samples equal those of anchor weights (output function, weight, the
    #: anchor weights sampled equal) and whose bytes the writer's own coalescing is to confirm
    #: (:meth:`confirm`); counted as byte-identical in the report.
    deferred: list[tuple[str, Weight, list[Weight]]] = field(default_factory=list)

    def confirm(self, pairs: list[tuple[BlobRef, ResolvedRef]], canonical: list[int]) -> None:
        """Called by the writer once every blob is copied, with the pairs written and, for each,
        the index of the first pair holding identical bytes: raises :class:`DeferredMismatch`
        unless every deferred weight's blobs were coalesced with those of one of its anchor
        weights (its bytes equal theirs). The writer then discards its output."""
        if not self.deferred:
            return
        index = {(new.function, new.op_name, new.location): i for i, (new, _) in enumerate(pairs)}
        anchor = self.report.anchor

        def shared(out_name: str, w: Weight, c: Weight) -> bool:
            for ra, rt in _blob_pairs(c, w):
                i = index.get((out_name, rt.ref.op_name, rt.ref.location))
                j = index.get((anchor, ra.ref.op_name, ra.ref.location))
                if i is None or j is None or canonical[i] != canonical[j]:
                    return False
            return True

        for out_name, w, matched in self.deferred:
            if not any(shared(out_name, w, c) for c in matched):
                raise DeferredMismatch(f"{w.describe()}: blob samples equal an anchor weight's, bytes differ")

    def apply(self, model: pb.Model, pairs: list[tuple[BlobRef, ResolvedRef]]) -> list[tuple[BlobRef, ResolvedRef]]:
        """Re-point the adopted references of ``pairs`` (output reference, source blob) at the
        anchor's blobs and record the adoption in ``model``'s metadata."""
        out = []
        for new, src in pairs:
            found = self.mapping.get((new.function, new.op_name, new.location))
            out.append((new, found if found is not None else src))
        if self.report.adopted:
            _record(model, self.report)
        return out


def _record(model: pb.Model, report: AdoptReport) -> None:
    meta = model.description.metadata
    prior = {"count": 0, "bytes": 0}
    for e in list(meta.userDefined):
        if e.key == METADATA_KEY:
            try:
                prior = json.loads(e.value)
            except ValueError:
                pass
            meta.userDefined.remove(e)
    t = report.thresholds
    entry = {
        "count": int(prior.get("count", 0)) + len(report.adopted),
        "bytes": int(prior.get("bytes", 0)) + report.bytes_saved,
        "anchor": report.anchor,
        "min_cosine": t.min_cosine,
        "max_mean_abs": t.max_mean_abs,
        "max_abs": t.max_abs,
    }
    meta.userDefined.add(key=METADATA_KEY, value=json.dumps(entry, sort_keys=True))


class _Samples:
    """(dtype, size, padding, sample digest) of a blob, equal for byte-identical blobs; computed
    once per blob (a target meets every anchor weight of its structure)."""

    def __init__(self):
        self._cache: dict[tuple[int, int], tuple] = {}

    def __call__(self, r: ResolvedRef) -> tuple:
        key = (id(r.file), r.blob.record_offset)
        found = self._cache.get(key)
        if found is None:
            b = r.blob
            found = self._cache[key] = (b.dtype.code, b.size, b.padding_bits if b.dtype.sub_byte else 0,
                                        sample_digest(BlobSource(r.file, b)))
        return found


def _blob_pairs(anchor: Weight, target: Weight) -> list[tuple[ResolvedRef, ResolvedRef]]:
    sa, st = _ref_slots(anchor), _ref_slots(target)
    return [(sa[k], st[k]) for k in sorted(st)]


class _Screen:
    """First look at one target weight, from the spec and blob samples only (no numpy):
    ("unpaired", None) when no anchor weight has its structure, ("identical", None) when it
    references the very same blobs as one, ("sampled", (anchor weights whose blob samples equal
    its own, all candidates)) when bytes are to decide, else ("measure", the anchor weights of
    its structure)."""

    def __init__(self, pool: dict[tuple, list[Weight]]):
        self.pool = pool
        self.sample = _Samples()
        # Per structure key, the anchor weights by their blobs (file, record) and by their blobs'
        # samples, slot by slot: a target finds its matches by lookup, not by comparing with
        # every same-shaped anchor weight.
        self._index: dict[tuple, tuple[dict, dict]] = {}

    def _blobs(self, w: Weight) -> tuple:
        slots = _ref_slots(w)
        return tuple((id(slots[k].file), slots[k].blob.record_offset) for k in sorted(slots))

    def _samples(self, w: Weight) -> tuple:
        slots = _ref_slots(w)
        return tuple(self.sample(slots[k]) for k in sorted(slots))

    def __call__(self, w: Weight):
        key = structure_key(w)
        candidates = self.pool.get(key, [])
        if not candidates:
            return ("unpaired", None)
        index = self._index.get(key)
        if index is None:
            by_blobs, by_samples = {}, {}
            for c in candidates:
                by_blobs.setdefault(self._blobs(c), c)
                by_samples.setdefault(self._samples(c), []).append(c)
            index = self._index[key] = (by_blobs, by_samples)
        if self._blobs(w) in index[0]:
            return ("identical", None)  # already the very same blobs
        # Byte-identical weights are found before any value is computed: samples of every blob
        # agree, then the bytes decide (:func:`_confirm`, or the writer: see plan_adoption).
        matched = index[1].get(self._samples(w))
        if matched:
            return ("sampled", (matched, candidates))
        return ("measure", candidates)


def _confirm(w: Weight, found) -> tuple:
    """A "sampled" verdict of :class:`_Screen` decided by the bytes: ("identical", the first
    anchor weight whose blobs hold the same bytes) or ("measure", every candidate)."""
    matched, candidates = found
    for c in matched:
        if all(blobs_equal(BlobSource(ra.file, ra.blob), BlobSource(rt.file, rt.blob)) for ra, rt in _blob_pairs(c, w)):
            return ("identical", c)
    return ("measure", candidates)


class _Judge:
    """Decides target weights that are not byte-identical to a candidate, in two steps:
    :meth:`propose` (cheap: sketches and blob comparisons) says which candidates to measure,
    :meth:`decide` judges their metrics. A decision is ("rejected" | "adopted" | "identical",
    anchor weight, metrics, failed threshold or the target's blobs that differ from the
    anchor's: {(id of file, record offset): size})."""

    def __init__(self, thresholds: Thresholds):
        from .measure import Sketches

        self.thresholds, self.sketch, self.norms = thresholds, Sketches(), {}

    def propose(self, w: Weight, candidates: list[Weight]) -> tuple:
        """("identical", candidate) or ("measure", [(candidate, {blob key: (size, equal)})...])."""
        base = _base_name(w.name)
        ranked = sorted((d, _base_name(c.name) != base, i)
                        for i, (c, d) in enumerate(zip(candidates, self.sketch.distances(candidates, w))))
        # The best sketch is always measured; a runner-up only if its sketch is about as close
        # (a clear winner is not second-guessed with another full pass).
        nearest = ranked[0][0]
        proposed = []
        for d, _, i in ranked[:CANDIDATES]:
            if d > 2 * nearest + SKETCH_SLACK:
                continue
            c = candidates[i]
            same = {}
            for ra, rt in _blob_pairs(c, w):
                key = (id(rt.file), rt.blob.record_offset)
                if key not in same:
                    same[key] = (rt.blob.size, blobs_equal(BlobSource(ra.file, ra.blob), BlobSource(rt.file, rt.blob)))
            if all(eq for _, eq in same.values()):
                return ("identical", c)
            proposed.append((c, same))
        return ("measure", proposed)

    def decide(self, proposed: list[tuple[Weight, dict]], metrics: list[Metrics]) -> tuple:
        """The best candidate passing every threshold, else the first one's failure."""
        best: tuple[Weight, Metrics, dict] | None = None
        first_fail: tuple[Weight, Metrics, str] | None = None
        for (c, same), m in zip(proposed, metrics):
            failed = self.thresholds.failure(m)
            if failed is None:
                differing = {key: size for key, (size, eq) in same.items() if not eq}
                if best is None or (m.cosine, -m.mean_abs) > (best[1].cosine, -best[1].mean_abs):
                    best = (c, m, differing)
            elif first_fail is None:
                first_fail = (c, m, failed)
        if best is None:
            return ("rejected",) + first_fail
        return ("adopted",) + best


def _judge_all(judge: _Judge, items: list[tuple[Weight, list[Weight]]], helpers) -> list[tuple]:
    """:class:`_Judge`'s decision for every (target, candidates) item, in order; the candidates'
    metrics measured together, here and on ``helpers`` (:func:`milsurgery.parallel.measure_pairs`)."""
    from .parallel import measure_pairs

    proposals = [judge.propose(w, candidates) for w, candidates in items]
    pairs = [(c, w) for (w, _), (kind, found) in zip(items, proposals) if kind == "measure" for c, _ in found]
    metrics = iter(measure_pairs(pairs, judge.norms, helpers))
    out = []
    for kind, found in proposals:
        if kind == "identical":
            out.append(("identical", found, None, None))
        else:
            out.append(judge.decide(found, [next(metrics) for _ in found]))
    return out


def plan_adoption(
    functions: Sequence[tuple[object, str, str]],
    thresholds: Thresholds,
    anchor: str | None = None,
    *,
    dry_run: bool = False,
    defer_identical: bool = False,
    workers: int | None = None,
) -> AdoptPlan:
    """Decide which weights adopt which: ``functions`` lists (package, source function name,
    output function name) in output order; the anchor is the first or the one named ``anchor``
    (an output name). Reads the spec, the sketches' rows, and for each candidate pair the blobs
    (byte comparison) and, unless identical, both weights whole in windows.

    Every weight is screened first from the spec and blob bytes (:class:`_Screen`); only if some
    weight is not byte-identical to an anchor weight are values evaluated (numpy is imported
    then), and then every weight's ops are checked for consistency before anything is decided.
    When all are byte-identical the outcome is a plain merge's, at a plain merge's cost: with
    ``defer_identical`` (not with ``dry_run``) and every weight's blob samples equal to an anchor
    weight's, the bytes are not compared here but left to the writer's coalescing, which
    compares them while it copies (:meth:`AdoptPlan.confirm` checks it did share them; if not,
    the caller plans again without deferring). Pairs are measured on ``workers`` processes
    (default: one per CPU; :func:`milsurgery.parallel.measure_pairs`); the plan is the same for
    any number."""
    return _plan_steps(functions, thresholds, anchor, dry_run, defer_identical, workers)[1]()


def _plan_steps(functions, thresholds: Thresholds, anchor: str | None, dry_run: bool, defer_identical: bool,
                workers: int | None = None):
    """:func:`plan_adoption` in two steps: the screen (spec and blob samples, no numpy) runs now;
    returns whether there is more to do than leaving every weight to the writer's coalescing
    (bytes to compare, values to measure) and a callable that does it and returns the plan."""
    start = time.perf_counter()
    names = [f[2] for f in functions]
    if anchor is None:
        anchor = names[0]
    if anchor not in names:
        raise UsageError(f"anchor function {anchor!r} is not among the output functions {names}")
    pkg_a, src_a, _ = functions[names.index(anchor)]
    report = AdoptReport(anchor, thresholds, dry_run=dry_run)
    mapping: dict[tuple[str, str, str], ResolvedRef] = {}
    pool: dict[tuple, list[Weight]] = {}
    anchors = find_weights(pkg_a, src_a)
    for w in anchors:
        pool.setdefault(structure_key(w), []).append(w)
    targets = [(out_name, w) for pkg, src, out_name in functions if out_name != anchor for w in find_weights(pkg, src)]
    screen = _Screen(pool)
    first = [screen(w) for _, w in targets]
    deferred = []
    all_identical = defer_identical and not dry_run and all(kind in ("identical", "sampled") for kind, _ in first)
    if all_identical:
        deferred = [(out_name, w, found[0]) for (out_name, w), (kind, found) in zip(targets, first) if kind == "sampled"]
        first = [("identical", None) for _ in first]  # confirmed by the writer

    def finish() -> AdoptPlan:
        from .parallel import Helpers, helpers_for

        # Helper processes measure with this one; started first, their start-up overlaps the
        # checks and sketches below.
        measured = {id(x): x for (_, w), (kind, found) in zip(targets, first) if kind == "measure" for x in (w, *found)}
        with helpers_for(list(measured.values()), workers) if measured else Helpers(0, []) as helpers:
            return decide(helpers)

    def decide(helpers) -> AdoptPlan:
        nonlocal first
        first = [_confirm(w, found) if kind == "sampled" else (kind, found) for (_, w), (kind, found) in zip(targets, first)]
        judge = None
        freed: list[dict[tuple[int, int], int]] = []  # per adopted weight, its blobs that differ
        if any(kind != "identical" for kind, _ in first):
            from .dequant import check_weight

            for w in anchors + [w for _, w in targets]:
                check_weight(w)  # every weight's ops are consistent before anything is decided
            judge = _Judge(thresholds)
        items = [(w, found) for (_, w), (kind, found) in zip(targets, first) if kind == "measure"]
        decided = iter(_judge_all(judge, items, helpers) if items else ())
        for (out_name, w), (kind, found) in zip(targets, first):
            report.weights += 1
            m = detail = None
            c = found
            if kind == "measure":
                kind, c, m, detail = next(decided)
            if kind == "unpaired":
                report.unpaired += 1
                continue
            if kind == "identical":
                report.identical += 1
                if c is not None:
                    # Re-pointed at the anchor's blobs (the same bytes): the writer's coalescing
                    # sees one blob and does not compare them again.
                    for ra, rt in _blob_pairs(c, w):
                        mapping[(out_name, rt.ref.op_name, rt.ref.location)] = ra
                continue
            if kind == "rejected":
                report.rejected.append(Rejection(out_name, w.name, w.kind, anchor, c.name, detail, m))
                continue
            report.adopted.append(Adoption(out_name, w.name, w.kind, anchor, c.name, m, 0))
            freed.append(detail)
            for ra, rt in _blob_pairs(c, w):
                mapping[(out_name, rt.ref.op_name, rt.ref.location)] = ra
        # Bytes saved: an adopted weight's blobs that differed from the anchor's and that no
        # reference left in any output function still uses, each blob counted once.
        if report.adopted:
            still = {(id(r.file), r.blob.record_offset) for pkg, src, out_name in functions for r in pkg.function_refs(src)
                     if (out_name, r.ref.op_name, r.ref.location) not in mapping}
            counted: set[tuple[int, int]] = set()
            for a, blobs in zip(report.adopted, freed):
                a.bytes_saved = sum(size for key, size in blobs.items() if key not in still and key not in counted)
                counted.update(blobs)
        report.seconds = time.perf_counter() - start
        return AdoptPlan(report, mapping, deferred)

    return not all_identical, finish


def plan_for_picks(picks, thresholds: Thresholds, anchor: str | None, dry_run: bool = False,
                   workers: int | None = None) -> AdoptPlan:
    """:func:`plan_adoption` for the picks (:class:`milsurgery.assemble.Pick`) of a writer."""
    return plan_adoption([(p.source, p.name, p.new_name) for p in picks], thresholds, anchor, dry_run=dry_run, workers=workers)


def write_adopting(picks, thresholds: Thresholds, anchor: str | None, write,
                   workers: int | None = None) -> tuple[AdoptPlan, object]:
    """Plan adoption for ``picks`` and write with it: ``write(adjust, confirm, unchanged)`` writes
    the package (:func:`milsurgery.assemble.write_package`'s keywords of those names). Returns
    the plan and what ``write`` returned.

    Weights are screened first (spec and blob samples, no numpy). When every one is
    byte-identical to an anchor weight by its samples, the bytes are left to the writer's
    coalescing, which compares them while it copies, as in a plain merge; should one not be
    (equal samples, different bytes), the writer's output is discarded and the plan made and
    written again with every byte compared first. Otherwise the rest of the plan is made on
    another thread while the writer copies the anchor's blobs, which adoption never changes
    (``unchanged``: the writer calls ``adjust``, which waits for the plan, only once it reaches
    other functions' blobs; when the anchor is not the first function nothing is copied before)."""
    names = [p.new_name for p in picks]
    functions = [(p.source, p.name, p.new_name) for p in picks]
    more, finish = _plan_steps(functions, thresholds, anchor, False, True, workers)
    if not more:
        plan = finish()
        try:
            return plan, write(plan.apply, plan.confirm, None)
        except DeferredMismatch:
            plan = plan_for_picks(picks, thresholds, anchor, workers=workers)
            return plan, write(plan.apply, None, None)
    made: dict[str, object] = {}

    def plan_now() -> None:
        try:
            made["plan"] = finish()
        except BaseException as exc:  # handed to the writer's thread by adjust
            made["error"] = exc

    thread = threading.Thread(target=plan_now, name="milsurgery-adopt", daemon=True)

    def adjust(model, pairs):
        thread.join()
        if "error" in made:
            raise made["error"]
        return made["plan"].apply(model, pairs)

    thread.start()
    try:
        report = write(adjust, None, anchor or names[0])
        return made["plan"], report
    finally:
        # The plan reads the sources, which the caller closes next: it must be done by then
        # (an interrupt is let through at once: the process is on its way out).
        if not isinstance(sys.exc_info()[1], KeyboardInterrupt):
            thread.join()


def weight_differences(pkg, function: str, src, src_function: str, differing, tolerance: Thresholds | None, check):
    """For ``verify``: judge blobs of ``pkg``'s ``function`` that differ from the source's, weight
    by weight.

    Each weight holding a differing blob is compared with the source's weight (full metrics). With
    ``tolerance`` met, the weight goes to ``check.tolerated`` and its blobs are not reported.
    Returns (output ref, source ref, note) for the blobs still to report as differences: ``note``
    names the weight's op and metrics (for the first blob of each weight) or is empty.
    """
    from .measure import compare_weights

    mine = {op.outputs[0].name: w for w in find_weights(pkg, function) for op in w.ops if op.outputs}
    theirs = {op.outputs[0].name: w for w in find_weights(src, src_function) for op in w.ops if op.outputs}
    left, verdicts = [], {}
    for ra, rb in differing:
        wa, wb = mine.get(ra.ref.op_name), theirs.get(rb.ref.op_name)
        if wa is None or wb is None or wa.name != wb.name or wa.shape != wb.shape:
            left.append((ra, rb, ""))
            continue
        note = ""
        if wa.name not in verdicts:
            m = compare_weights(wb, wa)
            failed = tolerance.failure(m) if tolerance is not None else "no tolerance given"
            verdicts[wa.name] = failed is None
            if failed is None:
                check.tolerated.append({"op": wa.name, "kind": wa.kind, "metrics": m.to_dict()})
            else:
                note = f"; the values of weight {wa.name!r} ({wa.kind}) differ: {m.text()} ({failed})"
        if not verdicts[wa.name]:
            left.append((ra, rb, note))
    return left


def __getattr__(name: str):
    # compare_weights lives in milsurgery.measure (numpy); importing this module does not load it.
    if name == "compare_weights":
        from .measure import compare_weights

        return compare_weights
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
