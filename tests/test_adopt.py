"""Near-duplicate adoption (``merge``/``shrink --adopt``, ``verify --tolerance``).

The fixture reproduces what deployers do: the same float weights converted twice (``infer`` with
sequence length 1; ``prefill`` with length 4, three elements in a hundred nudged by one fp16 ulp, an
extra op that shifts every auto-generated name, and the linears in reverse order so the same
weight carries another name), each compressed separately by coremltools. Which pairs should be
adopted is computed independently, in float64 numpy from coremltools' own evaluation of the
constexpr ops; outputs are checked with coremltools' loader, its C++ blob reader and Apple's
validator.
"""

from __future__ import annotations

import json
import math
import os
import subprocess

import numpy as np
import pytest

from checks import ct_load_program, ct_read_referenced_blobs, ct_spec, spec_path, weights_dir
from compressed_models import compress, ct_function_weights, linear_weights, linears
from milsurgery import UsageError, inspect_package, merge, shrink, verify
from milsurgery.adopt import Thresholds, compare_weights
from milsurgery.cli import main
from milsurgery.dequant import dequantize, find_weights, sample_values
from milsurgery.package import Package

HERE = os.path.dirname(os.path.abspath(__file__))
VALIDATOR = os.path.join(HERE, "..", "..", "shared", "tools", "coreml-validate")
SHAPES = [(16, 1280)] * 3 + [(8, 1280)]
ORDER = [3, 2, 1, 0]  # prefill's linears, reversed
KINDS = ("lut4_grouped", "int4_block")
DEFAULT = Thresholds()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("adopt")
    infer = linears(str(d / "infer_f.mlpackage"), linear_weights(7, SHAPES), seq=1)
    prefill = linears(str(d / "prefill_f.mlpackage"), linear_weights(7, SHAPES, nudge=0.03), seq=4,
                      extra_op=True, order=ORDER)
    out = {"dir": d}
    for kind in KINDS:
        out[kind] = (compress(infer, str(d / f"infer_{kind}.mlpackage"), kind),
                     compress(prefill, str(d / f"prefill_{kind}.mlpackage"), kind))
    return out


def sources(pair):
    return [f"{pair[0]}:main=infer", f"{pair[1]}:main=prefill"]


def metrics(a: np.ndarray, t: np.ndarray) -> dict:
    """Independent metrics (delta = anchor - target), float64 numpy on whole arrays."""
    a, t = a.ravel(), t.ravel()
    d = a - t
    return {"cosine": float(a @ t / math.sqrt((a @ a) * (t @ t))), "mean_abs": float(np.abs(d).mean()),
            "max_abs": float(np.abs(d).max()), "rel_rms": float(math.sqrt((d @ d) / (t @ t)))}


def meets(m: dict, th: Thresholds) -> bool:
    return m["cosine"] >= th.min_cosine and m["mean_abs"] <= th.max_mean_abs and (th.max_abs is None or m["max_abs"] <= th.max_abs)


def expected_adoptions(pair, th: Thresholds) -> dict:
    """prefill weight -> infer weights it may adopt: same op chain and shape, values not already
    equal, every threshold met (all computed from coremltools' evaluation)."""
    anchors, targets = ct_function_weights(pair[0], "main"), ct_function_weights(pair[1], "main")
    out = {}
    for tn, (tv, tchain) in targets.items():
        ok = [an for an, (av, achain) in anchors.items()
              if achain == tchain and av.shape == tv.shape and not np.array_equal(av, tv) and meets(metrics(av, tv), th)]
        if ok:
            out[tn] = ok
    return out


def blob_keys(pkg: str, function: str, op_name: str) -> list[tuple[str, int]]:
    """(fileName, offset) of every blob feeding ``op_name``, via coremltools' spec classes."""
    spec = ct_spec(pkg)
    block = next(iter(spec.mlProgram.functions[function].block_specializations.values()))
    ops = {o.outputs[0].name: o for o in block.operations}
    found, stack = [], [ops[op_name]]
    while stack:
        op = stack.pop()
        values = list(op.attributes.values()) + [b.value for a in op.inputs.values() for b in a.arguments if b.HasField("value")]
        found += [(v.blobFileValue.fileName, v.blobFileValue.offset) for v in values if v.HasField("blobFileValue")]
        stack += [ops[b.name] for a in op.inputs.values() for b in a.arguments if b.name in ops]
    return sorted(found)


def weight_bin(pkg: str) -> str:
    return os.path.join(weights_dir(pkg), "weight.bin")


@pytest.mark.parametrize("kind", KINDS)
def test_merge_adopts_every_passing_pair(models, kind, tmp_path):
    pair = models[kind]
    expected = expected_adoptions(pair, DEFAULT)
    assert expected, f"{kind}: the fixture should hold near-duplicates"
    out = str(tmp_path / "out.mlpackage")
    report = merge(sources(pair), out, adopt=True)
    adopted = {a["op"]: a for a in report.adoption["adopted"]}
    assert set(adopted) == set(expected)
    anchors = ct_function_weights(pair[0], "main")
    targets = ct_function_weights(pair[1], "main")
    written = ct_function_weights(out, "prefill")
    for op, a in adopted.items():
        assert a["anchor_op"] in expected[op]
        # Recomputed independently from the sources, the pair meets every threshold ...
        m = metrics(anchors[a["anchor_op"]][0], targets[op][0])
        assert meets(m, DEFAULT)
        for key in ("cosine", "mean_abs", "max_abs", "rel_rms"):
            assert a["metrics"][key] == pytest.approx(m[key], rel=1e-9, abs=1e-12)
        # ... and the output's weight is the anchor's, by reference and by value.
        assert blob_keys(out, "prefill", op) == blob_keys(out, "infer", a["anchor_op"])
        np.testing.assert_array_equal(written[op][0], anchors[a["anchor_op"]][0])
        assert a["bytes_saved"] > 0
    # Reordered and renamed: the same float weight, not the same name, is the anchor.
    index_infer = {n: int(n.split("_")[1]) for n in anchors if "weight" in n}
    for op, a in adopted.items():
        j = int(op.split("_")[1])
        assert index_infer[a["anchor_op"]] == ORDER[j]
    # Size: the single function's weights plus those that were not adopted, nothing more.
    single = os.path.getsize(weight_bin(pair[0]))
    assert os.path.getsize(weight_bin(out)) <= single + 64 * len(targets)
    plain = merge(sources(pair), str(tmp_path / "plain.mlpackage"))
    # (bytes saved count blob data; each blob dropped also drops its 64-byte record and padding)
    assert 0 < report.adoption["totals"]["bytes_saved"] <= plain.bytes_written - report.bytes_written
    assert plain.bytes_written - report.bytes_written < report.adoption["totals"]["bytes_saved"] + 128 * len(adopted) * 3
    # Independent readers accept it.
    assert ct_read_referenced_blobs(out) > 0
    prog = ct_load_program(out)
    assert set(prog.functions) == {"infer", "prefill"}
    if os.path.exists(VALIDATOR):
        # Apple's validator says of the adopted package exactly what it says of the plain merge
        # (whose model-level I/O is the merge writer's business, not adoption's).
        runs = [subprocess.run([VALIDATOR, spec_path(p)], capture_output=True, text=True)
                for p in (out, str(tmp_path / "plain.mlpackage"))]
        assert runs[0].returncode in (0, 1)
        assert (runs[0].returncode, runs[0].stdout) == (runs[1].returncode, runs[1].stdout)
    # Provenance.
    info = inspect_package(out, duplicates=False)
    assert info["adopted"]["count"] == len(adopted)
    assert info["adopted"]["bytes"] == report.adoption["totals"]["bytes_saved"]
    assert info["adopted"]["min_cosine"] == DEFAULT.min_cosine
    assert inspect_package(str(tmp_path / "plain.mlpackage"), duplicates=False)["adopted"] is None


def test_verify_tolerance(models, tmp_path, capsys):
    pair = models["lut4_grouped"]
    out = str(tmp_path / "out.mlpackage")
    report = merge(sources(pair), out, adopt=True)
    adopted = [a["op"] for a in report.adoption["adopted"]]
    against = ["--against", *sources(pair)]
    assert main(["verify", out, *against]) == 1
    text = capsys.readouterr().out
    for op in adopted:
        assert f"weight {op!r}" in text and "cosine" in text
    assert main(["verify", out, *against, "--tolerance"]) == 0
    text = capsys.readouterr().out
    assert all(f"within tolerance: op {op!r}" in text for op in adopted)
    v = verify(out, sources(pair), tolerance=True)
    assert v.equivalent and {t["op"] for c in v.checks for t in c.tolerated} == set(adopted)
    # A tolerance tighter than the adopted pairs meet fails again.
    worst = min(a["metrics"]["cosine"] for a in report.adoption["adopted"])
    assert not verify(out, sources(pair), tolerance=True, min_cosine=math.nextafter(worst, 2)).equivalent
    # merge --verify applies the adoption's thresholds.
    merge(sources(pair), str(tmp_path / "checked.mlpackage"), adopt=True, verify=True)


def test_threshold_flips_decision(models):
    pair = models["lut4_grouped"]
    base = merge(sources(pair), "unused", adopt=True, dry_run=True)
    target = base.adopted[0]
    m = target.metrics
    for field_, just_fail, just_pass in (
        ("min_cosine", math.nextafter(m.cosine, 2), m.cosine),
        ("max_mean_abs", math.nextafter(m.mean_abs, -1), m.mean_abs),
        ("max_abs", math.nextafter(m.max_abs, -1), m.max_abs),
    ):
        kw = {field_: just_pass, "min_cosine": min(m.cosine, DEFAULT.min_cosine)} if field_ != "min_cosine" else {field_: just_pass}
        passed = merge(sources(pair), "unused", adopt=True, dry_run=True, **kw)
        assert target.op in {a.op for a in passed.adopted}, field_
        kw[field_] = just_fail
        failed = merge(sources(pair), "unused", adopt=True, dry_run=True, **kw)
        assert target.op not in {a.op for a in failed.adopted}, field_
        (rej,) = [r for r in failed.rejected if r.op == target.op]
        assert field_ in rej.failed
    assert not os.path.exists("unused")


def test_unmeetable_thresholds_give_plain_merge(models, tmp_path):
    pair = models["lut4_grouped"]
    a, b = str(tmp_path / "a.mlpackage"), str(tmp_path / "b.mlpackage")
    merge(sources(pair), a)
    report = merge(sources(pair), b, adopt=True, min_cosine=1.0, max_mean_abs=0.0, max_abs=0.0)
    assert report.adoption["adopted"] == [] and report.adoption["rejected"]
    for rel in ("Data/com.apple.CoreML/model.mlmodel", "Data/com.apple.CoreML/weights/weight.bin"):
        with open(os.path.join(a, rel), "rb") as fa, open(os.path.join(b, rel), "rb") as fb:
            assert fa.read() == fb.read(), rel


def test_nothing_adopted_across_kinds(models, tmp_path):
    mixed = (models["lut4_grouped"][0], models["int4_block"][1])
    report = merge(sources(mixed), str(tmp_path / "m.mlpackage"), adopt=True)
    assert report.adoption["adopted"] == [] and report.adoption["rejected"] == []
    assert expected_adoptions(mixed, DEFAULT) == {}


def test_nothing_adopted_across_shapes_or_attributes(models, tmp_path):
    """Weights of another shape, or a different group size, never pair."""
    pair = models["lut4_grouped"]
    other = compress(str(models["dir"] / "prefill_f.mlpackage"), str(tmp_path / "g16.mlpackage"), "lut6_grouped")
    report = merge([f"{pair[0]}:main=infer", f"{other}:main=prefill"], str(tmp_path / "m.mlpackage"), adopt=True)
    assert report.adoption["adopted"] == [] and report.adoption["rejected"] == []
    with Package(pair[0]) as pa:
        small = [w for w in find_weights(pa, "main") if w.shape == (8, 1280)]
        big = [w for w in find_weights(pa, "main") if w.shape == (16, 1280)]
        from milsurgery.adopt import structure_key

        assert structure_key(small[0]) != structure_key(big[0])
        assert len({structure_key(w) for w in big}) == 1  # same structure, different values


def test_shrink_adopts_inside_one_package(models, tmp_path, capsys):
    pair = models["int4_block"]
    merged = str(tmp_path / "plain.mlpackage")
    merge(sources(pair), merged)
    via_merge = merge(sources(pair), str(tmp_path / "m.mlpackage"), adopt=True)
    out = str(tmp_path / "s.mlpackage")
    report = shrink(merged, out, adopt=True)
    assert report.bytes_written == via_merge.bytes_written
    assert [a["op"] for a in report.adoption["adopted"]] == [a["op"] for a in via_merge.adoption["adopted"]]
    assert verify(out, [f"{merged}"], tolerance=True).equivalent
    assert not verify(out, [f"{merged}"]).equivalent
    before = os.path.getsize(weight_bin(merged))
    assert main(["shrink", merged, "--in-place", "--adopt", "--quiet"]) == 0
    assert os.path.getsize(weight_bin(merged)) == report.bytes_written < before


def test_dry_run_and_cli_reports(models, tmp_path, capsys):
    pair = models["lut4_grouped"]
    out = str(tmp_path / "out.mlpackage")
    assert main(["merge", "-o", out, *sources(pair), "--adopt", "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "dry run, nothing written" in text and "adopted prefill:" in text and "totals:" in text
    assert os.listdir(tmp_path) == []
    assert main(["merge", "-o", out, *sources(pair), "--adopt", "--dry-run", "--json", "--min-cosine", "0.99999999"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["dry_run"] and d["totals"]["rejected"] == len(d["rejected"]) > 0
    for r in d["rejected"]:
        assert "min_cosine" in r["failed"] and r["metrics"]["cosine"] < 0.99999999
    assert os.listdir(tmp_path) == []
    assert main(["merge", "-o", out, *sources(pair), "--adopt", "--json", "--quiet"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["adoption"]["totals"]["adopted"] == len(d["adoption"]["adopted"]) > 0
    for a in d["adoption"]["adopted"]:
        assert {"function", "op", "kind", "anchor_function", "anchor_op", "metrics", "bytes_saved"} <= set(a)
        assert a["anchor_function"] == "infer" and a["kind"] == "constexpr_lut_to_dense"
    # --anchor picks the other direction.
    rev = merge(sources(pair), "unused", adopt=True, anchor="prefill", dry_run=True)
    assert rev.anchor == "prefill" and all(a.function == "infer" for a in rev.adopted) and rev.adopted


@pytest.mark.parametrize("argv, message", [
    (["--adopt", "--min-cosine", "1.5"], "min_cosine (--min-cosine) must be a number from -1 to 1, got 1.5"),
    (["--adopt", "--max-mean-abs", "-1"], "max_mean_abs (--max-mean-abs) must be a finite number >= 0, got -1.0"),
    (["--adopt", "--max-abs", "nan"], "max_abs (--max-abs) must be a finite number >= 0, got nan"),
    (["--adopt", "--anchor", "nope"], "anchor function 'nope' is not among the output functions ['infer', 'prefill']"),
    (["--min-cosine", "0.5"], "--min-cosine applies only with --adopt"),
    (["--dry-run"], "--dry-run applies only with --adopt"),
])
def test_bad_adopt_options(models, tmp_path, capsys, argv, message):
    out = str(tmp_path / "out.mlpackage")
    assert main(["merge", "-o", out, *sources(models["lut4_grouped"]), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"milsurgery: error: {message}"]
    assert os.listdir(tmp_path) == []


def test_python_thresholds_validated():
    with pytest.raises(UsageError, match="min_cosine"):
        Thresholds(min_cosine=float("nan"))
    with pytest.raises(UsageError, match="max_mean_abs"):
        Thresholds(max_mean_abs=float("inf"))


def test_sketch_proposes_full_metrics_decide(models):
    """The sketch ranks the right anchor first among same-shaped weights; the full metrics
    agree with independent numpy on the whole tensors."""
    pair = models["lut4_grouped"]
    with Package(pair[0]) as pa, Package(pair[1]) as pb_:
        anchors = [w for w in find_weights(pa, "main") if w.shape == (16, 1280)]
        targets = [w for w in find_weights(pb_, "main") if w.shape == (16, 1280)]
        for t in targets:
            dist = [float(np.linalg.norm(sample_values(a) - sample_values(t))) for a in anchors]
            full = [metrics(dequantize(a), dequantize(t)) for a in anchors]
            assert int(np.argmin(dist)) == int(np.argmax([f["cosine"] for f in full]))
            for a, f in zip(anchors, full):
                m = compare_weights(a, t)
                assert m.cosine == pytest.approx(f["cosine"], rel=1e-12)
                assert m.mean_abs == pytest.approx(f["mean_abs"], rel=1e-12)
                assert m.max_abs == f["max_abs"]
                assert m.elements == 16 * 1280


@pytest.fixture(scope="module")
def sparse_pairs(tmp_path_factory):
    """Float16 infer/prefill pairs with awkward rows (values in float16's subnormal range, an
    all-zero row, a large row), as converted and as compressed by blockwise kinds."""
    d = tmp_path_factory.mktemp("sparse_diff")
    shapes = [(16, 512), (32, 512)]

    def awkward(ws):
        ws[0][1] *= np.float16(1e-3)  # ~5e-5: scales below 2**-14, subnormal values
        ws[0][2] = 0
        ws[1][3] *= np.float16(2000.0)  # large values: scales near the top of float16's range
        return ws

    infer = linears(str(d / "i.mlpackage"), awkward(linear_weights(11, shapes)), seq=1)
    prefill = linears(str(d / "p.mlpackage"), awkward(linear_weights(11, shapes, nudge=0.3)), seq=4)
    out = {"fp16": (infer, prefill)}
    for kind in ("int8_block", "int4_block", "uint4_channel", "lut6_grouped"):
        out[kind] = (compress(infer, str(d / f"i_{kind}.mlpackage"), kind),
                     compress(prefill, str(d / f"p_{kind}.mlpackage"), kind))
    return out


@pytest.mark.parametrize("kind", ["fp16", "int8_block", "int4_block", "uint4_channel", "lut6_grouped"])
def test_sparse_difference_metrics_match_independent(sparse_pairs, kind):
    """Blockwise-quantized, LUT and float16 weights are measured where they differ, with the
    norms derived from the anchor's: the metrics equal an independent float64 computation over
    the whole tensors as coremltools evaluates them (awkward scales included), and the anchor's
    cached norm (or index counts) gives the same answer the second time."""
    from milsurgery.dequant import blocked_parts, const_part, lut_parts

    part = {"fp16": const_part, "lut6_grouped": lut_parts}.get(kind, blocked_parts)

    pair = sparse_pairs[kind]
    anchors, targets = ct_function_weights(pair[0], "main"), ct_function_weights(pair[1], "main")
    with Package(pair[0]) as pa, Package(pair[1]) as pb_:
        wa = {w.name: w for w in find_weights(pa, "main")}
        wt = {w.name: w for w in find_weights(pb_, "main")}
        differing = 0
        for name, (tv, _) in targets.items():
            a, t = wa[name], wt[name]
            if a.size < 1000:
                continue  # biases
            # the sparse-difference path is the one measuring this pair
            assert part(a) is not None
            ref = metrics(anchors[name][0], tv)
            norms: dict = {}
            for _ in range(2):
                m = compare_weights(a, t, norms)
                assert m.elements == tv.size
                assert m.cosine == pytest.approx(ref["cosine"], rel=1e-12)
                assert m.mean_abs == pytest.approx(ref["mean_abs"], rel=1e-12)
                assert m.max_abs == ref["max_abs"]
                assert m.rel_rms == pytest.approx(ref["rel_rms"], rel=1e-9)
            assert norms  # filled by the anchor's first measurement
            differing += not np.array_equal(anchors[name][0], tv)
        assert differing, "the pairs should differ somewhere"


def test_int4_table_sum_of_squares_equals_materialized():
    """The table path for symmetric int4 (sum of squares from lookups on pairs of stored bytes
    and on the scale's bits) equals squaring the float16-materialized values, for every code
    and scales across float16's normal range; scales it cannot take are declined."""
    from milsurgery.measure import _int4_sumsq
    from milsurgery.dequant import unpack_codes

    rng = np.random.default_rng(7)
    for block in (4, 32, 128, 512):
        n_blocks = 200
        raw = rng.integers(0, 256, n_blocks * block // 2, dtype=np.uint8)
        raw[: block // 2] = (np.arange(block // 2) * 17 % 256).astype(np.uint8)  # codes -8..7 all seen
        scale = (2.0 ** rng.uniform(-14, 12.9, n_blocks)).astype(np.float16) * rng.choice([-1, 1], n_blocks).astype(np.float16)
        q = unpack_codes(raw, "int4").astype(np.float64).reshape(n_blocks, block)
        values = (q * scale.astype(np.float64)[:, None]).astype(np.float16).astype(np.float64).reshape(-1)
        assert _int4_sumsq(raw, scale, block) == pytest.approx(float(values @ values), rel=1e-13)
    assert _int4_sumsq(raw, np.full(n_blocks, 2.0**-15, np.float16), 512) is None  # subnormal products
    assert _int4_sumsq(raw, np.full(n_blocks, 9000, np.float16), 512) is None  # 8 * 9000 overflows
    assert _int4_sumsq(raw[:-2], scale[:-1], 1024) is None  # blocks too long for the 16-bit fields


def test_round_f16_equals_numpy_for_every_significand():
    """Rounding float32 values to float16 precision (Veltkamp's split) equals numpy's float16
    conversion for every float32 significand, both signs, in the lowest and highest binades of
    float16's normal range and one between (rounding does not depend on the binade there)."""
    from milsurgery.measure import _round_f16

    significands = np.arange(1 << 23, dtype=np.uint32)
    for exponent in (-14, 0, 15):
        for sign in (0, 1):
            bits = significands | np.uint32(((sign << 8) | (exponent + 127)) << 23)
            x = bits.view(np.float32).copy()
            with np.errstate(over="ignore"):
                expected = x.astype(np.float16).astype(np.float32)
            _round_f16(x)
            finite = np.isfinite(expected)  # above 65504 numpy gives inf: outside the valid range
            assert exponent != 15 or not finite.all()
            np.testing.assert_array_equal(x[finite], expected[finite])


@pytest.mark.parametrize("name", ["uint1", "uint2", "uint3", "uint4", "uint6", "uint8"])
def test_lut_index_counts_from_stored_bytes(name):
    """Per-group index counts taken from stored bytes (a count per byte value, or per pair of
    codes for widths that do not divide a byte, split into codes) equal counting the decoded
    indices, for every index width."""
    from milsurgery.dequant import unpack_codes
    from milsurgery.measure import _window_counts

    bits = int(name[4:])
    rng = np.random.default_rng(bits)
    shape, blocks = (24, 64), [8, 64]  # 3 groups of 8 rows
    raw = rng.integers(0, 256, math.prod(shape) * bits // 8, dtype=np.uint8)
    idx = unpack_codes(raw, name).reshape(shape)
    want = np.stack([np.bincount(idx[g * 8:(g + 1) * 8].reshape(-1), minlength=1 << bits) for g in range(3)])
    got = _window_counts(raw, lambda: idx, 0, 0, 3, (3, 1), blocks, 1 << bits, name)
    assert got.shape == want.shape and np.array_equal(got, want)
    # the decoded path (no stored bytes at hand) agrees
    assert np.array_equal(_window_counts(None, lambda: idx, 0, 0, 3, (3, 1), blocks, 1 << bits, name), want)


def test_identical_weights_are_confirmed_by_the_writer(sparse_pairs, tmp_path):
    """When every weight's blob samples equal an anchor weight's, merge --adopt leaves the byte
    comparison to the writer's coalescing (no numpy imported, output as a plain merge's); a
    weight whose bytes differ outside the samples is caught before anything is written, and
    the merge is planned again with the bytes compared: the weight is then measured and adopted."""
    import shutil
    import sys

    from milsurgery.coalesce import SAMPLE

    infer = sparse_pairs["int8_block"][0]
    copy = str(tmp_path / "copy.mlpackage")
    shutil.copytree(infer, copy)
    out = str(tmp_path / "out.mlpackage")
    code = ("import json, sys; from milsurgery import merge; "
            f"r = merge([{infer + ':main=infer'!r}, {copy + ':main=prefill'!r}], {out!r}, adopt=True); "
            "print(json.dumps([r.adoption['totals'], 'numpy' in sys.modules]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    totals, numpy_loaded = json.loads(done.stdout)
    assert not numpy_loaded
    assert totals["identical"] == totals["weights"] > 0 and totals["adopted"] == totals["rejected"] == 0
    plain = str(tmp_path / "plain.mlpackage")
    merge([f"{infer}:main=infer", f"{copy}:main=prefill"], plain)
    with open(weight_bin(out), "rb") as f, open(weight_bin(plain), "rb") as g:
        assert f.read() == g.read()

    # One int8 code one step up, between the start and middle samples of its blob.
    with Package(copy) as pkg:
        w = next(w for w in find_weights(pkg, "main") if w.shape == (32, 512))
        blob = next(r.blob for r in w.refs if r.blob.size == 32 * 512)
    assert blob.size > 3 * SAMPLE
    at = blob.data_offset + SAMPLE + 100
    with open(weight_bin(copy), "r+b") as f:
        f.seek(at)
        byte = f.read(1)[0]
        f.seek(at)
        f.write(bytes([(byte + 1) % 256 if byte != 127 else 126]))
    from milsurgery.adopt import plan_adoption

    with Package(infer) as pa, Package(copy) as pc:
        plan = plan_adoption([(pa, "main", "infer"), (pc, "main", "prefill")], DEFAULT, defer_identical=True)
        assert [t.name for _, t, _ in plan.deferred if t.name == w.name] == [w.name]  # taken as identical at first
    shutil.rmtree(out)
    report = merge([f"{infer}:main=infer", f"{copy}:main=prefill"], out, adopt=True)
    d = report.adoption
    assert [a["op"] for a in d["adopted"]] == [w.name] and d["totals"]["identical"] == d["totals"]["weights"] - 1
    dry = merge([f"{infer}:main=infer", f"{copy}:main=prefill"], "unused", adopt=True, dry_run=True)
    assert [a.op for a in dry.adopted] == [w.name]
    assert os.path.getsize(weight_bin(out)) == os.path.getsize(weight_bin(infer))
    assert sorted(os.listdir(tmp_path)) == ["copy.mlpackage", "out.mlpackage", "plain.mlpackage"]


def test_bytes_saved_counts_each_freed_blob_once(models, tmp_path):
    """Two output functions taken from one prefill package share its blobs: adopting both frees
    each blob once. The report's bytes saved equal the data the output no longer holds (each
    freed blob also took a 64-byte record and alignment: at most 128 bytes more)."""
    infer, prefill = models["int4_block"]
    srcs = [f"{infer}:main=infer", f"{prefill}:main=p1", f"{prefill}:main=p2"]
    plain, adopted = str(tmp_path / "plain.mlpackage"), str(tmp_path / "adopted.mlpackage")
    merge(srcs, plain)
    report = merge(srcs, adopted, adopt=True).adoption
    per_function = {f: sum(a["bytes_saved"] for a in report["adopted"] if a["function"] == f) for f in ("p1", "p2")}
    assert per_function["p1"] > 0 and per_function["p2"] == 0
    assert {a["op"] for a in report["adopted"] if a["function"] == "p2"} == {a["op"] for a in report["adopted"] if a["function"] == "p1"}
    saved = report["totals"]["bytes_saved"]
    shrunk = os.path.getsize(weight_bin(plain)) - os.path.getsize(weight_bin(adopted))
    assert saved <= shrunk <= saved + 128 * len(report["adopted"])
