"""``compress``: weights palettized or quantized once per distinct blob, for every function.

Checked against coremltools itself: on single-function sources the blobs of every compressed
weight are byte-identical to what ``palettize_weights`` / ``linear_quantize_weights`` write for the
same configuration (k-means through scikit-learn below 10,000 values per group and through
kmeans1d above), with the same constexpr op signature; the output loads with coremltools' loader
(whose op definitions check the constexpr signatures), its C++ blob reader and Apple's
validator; the values coremltools' own op evaluation materializes give exactly the error our
report states. On a merged infer/prefill package every shared weight stays shared.
"""

from __future__ import annotations

import json
import math
import os
import sys

import numpy as np
import pytest

import checks
import ct_models
from milsurgery import UsageError, compress, merge
from milsurgery.cli import main


#: Shapes of the fixture's weights: a linear of 8,192 values (sklearn path), a matmul ``y``
#: (its output axis is the last one) and a linear of 24,576 values each (kmeans1d path per
#: tensor and per group of 64 channels), plus a bias and a weight below the size threshold.
HIDDEN, WIDE, OUT = 64, 192, 128


def _mixed(path: str, seed: int = 0, target: str = "iOS18") -> str:
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((OUT, HIDDEN)) * 0.05).astype(np.float16)
    w2 = (rng.standard_normal((OUT, WIDE)) * 0.05).astype(np.float16)
    w3 = (rng.laplace(size=(OUT, WIDE)) * 0.05).astype(np.float16)
    small = (rng.standard_normal((HIDDEN, 16)) * 0.05).astype(np.float16)
    bias = (rng.standard_normal(OUT) * 0.05).astype(np.float16)
    opset = {"iOS18": ct.target.iOS18, "iOS17": ct.target.iOS17}[target]

    @mb.program(input_specs=[mb.TensorSpec((1, HIDDEN), dtype=types.fp16)], opset_version=opset)
    def prog(x):
        h = mb.linear(x=x, weight=w1, bias=bias, name="fc1")  # (1, 128)
        h = mb.matmul(x=h, y=w2, name="mm")  # (1, 192)
        h = mb.linear(x=h, weight=w3, name="fc3")  # (1, 128)
        s = mb.matmul(x=x, y=small, name="small")  # (1, 16)
        return mb.concat(values=[h, s], axis=1, name="out")

    model = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=opset,
                       compute_precision=ct.precision.FLOAT16)
    model.save(path)
    return path


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> str:
    return _mixed(str(tmp_path_factory.mktemp("mixed") / "mixed.mlpackage"))


def _ct_compress(src: str, dst: str, kind: str, **kwargs) -> str:
    import coremltools as ct
    from coremltools.optimize.coreml import (
        OpLinearQuantizerConfig,
        OpPalettizerConfig,
        OptimizationConfig,
        linear_quantize_weights,
        palettize_weights,
    )

    model = ct.models.MLModel(src, skip_model_load=True)
    if kind == "palettize":
        out = palettize_weights(model, OptimizationConfig(global_config=OpPalettizerConfig(**kwargs)))
    else:
        out = linear_quantize_weights(model, OptimizationConfig(global_config=OpLinearQuantizerConfig(**kwargs)))
    out.save(dst)
    return dst


def _constexpr_ops(pkg: str) -> dict[str, dict[str, dict]]:
    """function -> weight name -> {op type, inputs: key -> (dataType, shape, blob offset, bytes)}.

    Read with coremltools' generated classes and ``struct`` (tests/checks.py); the weight name is
    the op's ``name`` attribute without coremltools' ``_palettized``/``_quantized`` suffix."""
    spec = checks.ct_spec(pkg)
    out: dict[str, dict[str, dict]] = {}
    for fname, fn in spec.mlProgram.functions.items():
        ops = out.setdefault(fname, {})
        for op in fn.block_specializations[fn.opset].operations:
            if not op.type.startswith("constexpr_"):
                continue
            name = op.attributes["name"].immediateValue.tensor.strings.values[0]
            for suffix in ("_palettized", "_quantized"):
                name = name.removesuffix(suffix)
            inputs = {}
            for key, arg in op.inputs.items():
                v = arg.arguments[0].value
                tt = v.type.tensorType
                if v.HasField("blobFileValue"):
                    rec = checks.read_record(pkg, v.blobFileValue.fileName, v.blobFileValue.offset)
                    at = v.blobFileValue.offset
                else:  # small tensors are inline: compare the serialized value
                    rec, at = (None, None, None, v.immediateValue.SerializeToString()), None
                inputs[key] = (tt.dataType, [d.constant.size for d in tt.dimensions], at, rec)
            ops[name] = {"type": op.type, "inputs": inputs, "output": op.outputs[0].name}
    return out


def _assert_same_as_coremltools(ours: str, theirs: str, expect: int) -> None:
    a, b = _constexpr_ops(ours)["main"], _constexpr_ops(theirs)["main"]
    assert sorted(a) == sorted(b) and len(a) == expect, (sorted(a), sorted(b))
    for name in a:
        assert a[name]["type"] == b[name]["type"]
        assert a[name]["output"] == name  # we keep the const's output name; coremltools renames
        assert sorted(a[name]["inputs"]) == sorted(b[name]["inputs"])
        for key in a[name]["inputs"]:
            dt_a, shape_a, _, rec_a = a[name]["inputs"][key]
            dt_b, shape_b, _, rec_b = b[name]["inputs"][key]
            assert (dt_a, shape_a) == (dt_b, shape_b), (name, key)
            assert rec_a[:3] == rec_b[:3], (name, key)  # blob dtype, size, padding
            assert rec_a[3] == rec_b[3], f"{name}.{key}: bytes differ from coremltools'"


def _check_loads(pkg: str, source: str | None = None) -> None:
    """coremltools' loader and C++ blob reader read ``pkg``; Apple's validator accepts it (or,
    given the ``source`` it was compressed from, says of it what it says of the source: the
    model description is not compression's to change)."""
    checks.ct_load_program(pkg)  # builds every op with coremltools' op definitions
    assert checks.ct_read_referenced_blobs(pkg) > 0
    if not checks.have_coreml_validate():
        return  # Apple's validator is not beside the checkout: its verdict is checked where it is
    run = checks.coreml_validate(pkg)
    if source is None:
        assert run == (0, "valid"), run
    else:
        assert run == checks.coreml_validate(source)


def _dense_weights(pkg: str) -> dict[str, np.ndarray]:
    """Every blob const of the (uncompressed) source, by output name, via coremltools' loader."""
    prog = checks.ct_load_program(pkg)
    return {
        op.outputs[0].name: np.asarray(op.outputs[0].val)
        for op in prog.functions["main"].operations
        if op.op_type == "const" and op.outputs[0].val is not None and np.asarray(op.outputs[0].val).size >= 10
    }


def _materialized(pkg: str) -> dict[str, np.ndarray]:
    """What coremltools' own evaluation of each constexpr op yields, by output name."""
    prog = checks.ct_load_program(pkg)
    out = {}
    for fname, fn in prog.functions.items():
        for op in fn.operations:
            if op.op_type.startswith("constexpr_"):
                out[f"{fname}/{op.outputs[0].name}"] = np.asarray(op.materialized_val_inference())
    return out


PALETTE_CASES = [
    # nbits, mode, group size: per tensor hits kmeans1d for the 20,480-value weights
    (4, "kmeans", 0),
    (2, "kmeans", 32),
    (6, "kmeans", 64),  # groups of 64 x 192 = 12,288 values: kmeans1d per group
    (3, "uniform", 0),
    (8, "uniform", 32),
]


@pytest.mark.parametrize("nbits,mode,group", PALETTE_CASES)
def test_palettize_matches_coremltools_byte_for_byte(mixed, tmp_path, nbits, mode, group):
    ours = str(tmp_path / "ours.mlpackage")
    report = compress(mixed, ours, palettize_bits=nbits, mode=mode, group_size=group, workers=1)
    kwargs = {"nbits": nbits, "mode": mode}
    if group:
        kwargs.update(granularity="per_grouped_channel", group_size=group)
    theirs = _ct_compress(mixed, str(tmp_path / "theirs.mlpackage"), "palettize", **kwargs)
    _assert_same_as_coremltools(ours, theirs, expect=3)
    assert report.consts_replaced == 3 and report.weights_compressed == 3
    _check_loads(ours)


@pytest.mark.parametrize("dtype,block", [("int8", 0), ("int4", 16), ("int8", 32)])
def test_quantize_matches_coremltools_byte_for_byte(mixed, tmp_path, dtype, block):
    ours = str(tmp_path / "ours.mlpackage")
    compress(mixed, ours, quantize_dtype=dtype, block_size=block, workers=1)
    kwargs = {"mode": "linear_symmetric", "dtype": dtype}
    if block:
        kwargs.update(granularity="per_block", block_size=block)
    theirs = _ct_compress(mixed, str(tmp_path / "theirs.mlpackage"), "quantize", **kwargs)
    _assert_same_as_coremltools(ours, theirs, expect=3)
    _check_loads(ours)


def test_reported_error_is_what_coremltools_materializes(mixed, tmp_path):
    """Our per-weight error, recomputed from coremltools' evaluation of the ops we wrote."""
    dense = _dense_weights(mixed)
    for kwargs, bound in (
        ({"palettize_bits": 4, "group_size": 16}, None),
        ({"quantize_dtype": "int8", "block_size": 32}, 0.5),  # |delta| <= scale / 2 (+ fp16 rounding)
    ):
        out = str(tmp_path / f"{len(os.listdir(tmp_path))}.mlpackage")
        report = compress(mixed, out, workers=1, **kwargs)
        values = _materialized(out)
        assert len(values) == len(report.weights) == 3
        for w in report.weights:
            (name,) = [op.split("/", 1)[1] for op in w.ops]
            src = dense[name].astype(np.float64)
            got = values[f"main/{name}"].astype(np.float64)
            assert got.shape == src.shape == tuple(w.shape)
            delta = got - src
            assert np.max(np.abs(delta)) == pytest.approx(w.max_abs_error, rel=1e-9, abs=1e-12)
            assert np.sqrt(np.sum(delta**2) / np.sum(src**2)) == pytest.approx(w.relative_rms, rel=1e-9)
            assert 0 < w.relative_rms < 0.2
            if bound is not None:  # each block's scale is max|w| / 127
                assert w.relative_rms < 0.01
        _check_loads(out)


def test_parallel_workers_write_the_same_bytes(mixed, tmp_path):
    one, two = str(tmp_path / "one.mlpackage"), str(tmp_path / "two.mlpackage")
    compress(mixed, one, palettize_bits=4, mode="uniform", group_size=16, workers=1)
    compress(mixed, two, palettize_bits=4, mode="uniform", group_size=16, workers=2)
    read = lambda p: open(os.path.join(checks.weights_dir(p), "weight.bin"), "rb").read()  # noqa: E731
    assert read(one) == read(two)
    assert open(checks.spec_path(one), "rb").read() == open(checks.spec_path(two), "rb").read()


def test_min_elements_skip_and_dry_run(mixed, tmp_path):
    out = str(tmp_path / "out.mlpackage")
    report = compress(mixed, out, palettize_bits=4, min_elements=10_000, skip=["fc3*"], workers=1)
    names = sorted(n for w in report.weights for n in w.ops)
    assert len(names) == 1 and "main/" in names[0]  # w1 (8,192) too small; w3 skipped by name
    assert any("matches --skip" in s for s in report.skipped)
    assert sorted(_constexpr_ops(out)["main"]) == [names[0].split("/")[1]]
    before = os.listdir(tmp_path)
    dry = compress(mixed, str(tmp_path / "dry.mlpackage"), palettize_bits=4, dry_run=True, workers=1)
    assert os.listdir(tmp_path) == before
    assert dry.dry_run and dry.weights_compressed == 3 and 0 < dry.bytes_after < dry.bytes_before
    spec = checks.ct_spec(out)
    assert "palettize nbits=4" in spec.description.metadata.userDefined["milsurgery.compressed"]


@pytest.fixture(scope="module")
def llm_pair(tmp_path_factory):
    """infer (seq 1) and prefill (seq 8) of one LLM-like network, merged by milsurgery, and the
    infer package alone."""
    d = tmp_path_factory.mktemp("llm")
    kw = {"hidden": 64, "layers": 1, "vocab": 256}
    infer = ct_models.llm_like(str(d / "infer.mlpackage"), seq_len=1, **kw)
    prefill = ct_models.llm_like(str(d / "prefill.mlpackage"), seq_len=8, **kw)
    merged = str(d / "merged.mlpackage")
    merge([f"{infer}:main=infer", f"{prefill}:main=prefill"], merged)
    return infer, merged


def _weight_bytes(pkg: str) -> int:
    return os.path.getsize(os.path.join(checks.weights_dir(pkg), "weight.bin"))


def test_merged_functions_share_every_compressed_weight(llm_pair, tmp_path):
    infer, merged = llm_pair
    single, multi = str(tmp_path / "single.mlpackage"), str(tmp_path / "multi.mlpackage")
    # min_elements keeps this to the four 16,384-value weights (k-means through kmeans1d: quick)
    compress(infer, single, palettize_bits=4, min_elements=8192, workers=1)
    report = compress(merged, multi, palettize_bits=4, min_elements=8192, workers=2)
    assert report.weights_compressed == 4
    # the same compressed blobs as the single function's, computed in worker processes
    alone = _constexpr_ops(single)["main"]
    for name, op in alone.items():
        assert {k: v[3] for k, v in op["inputs"].items()} == {k: v[3] for k, v in _constexpr_ops(multi)["infer"][name]["inputs"].items()}
    ops = _constexpr_ops(multi)
    # Each distinct weight compressed once; both functions reference the same blobs.
    assert report.consts_replaced == 2 * report.weights_compressed == 2 * len(ops["infer"])
    refs = lambda fn: {k: tuple(i[2] for i in v["inputs"].values() if i[2]) for k, v in ops[fn].items()}  # noqa: E731
    assert sorted(refs("infer").values()) == sorted(refs("prefill").values())
    assert _weight_bytes(multi) <= 1.01 * _weight_bytes(single)
    _check_loads(multi, source=merged)
    values = _materialized(multi)
    for name in ops["infer"]:
        assert np.array_equal(values[f"infer/{name}"], values[f"prefill/{name}"])


def test_coremltools_refuses_what_compress_does(llm_pair, tmp_path):
    """The reason this command exists: coremltools cannot compress a multifunction model."""
    import coremltools as ct
    from coremltools.optimize.coreml import OpPalettizerConfig, OptimizationConfig, palettize_weights

    _, merged = llm_pair
    model = ct.models.MLModel(merged, skip_model_load=True, function_name="infer")
    with pytest.raises(Exception, match="multifunction"):
        palettize_weights(model, OptimizationConfig(global_config=OpPalettizerConfig(nbits=4)))


# -- bad input: one line, nothing written -------------------------------------------------------


def _run_cli(argv, capsys) -> tuple[int, str]:
    capsys.readouterr()  # drop what building fixtures printed
    code = main(argv)
    err = capsys.readouterr().err
    return code, err


@pytest.mark.parametrize(
    "args,message",
    [
        (["--palettize", "5"], "--palettize 5: supported are 1, 2, 3, 4, 6, 8 bits"),
        (["--palettize", "4", "--group-size", "7"], "not a multiple of --group-size 7"),
        (["--quantize", "int2"], "--quantize int2: supported are int4, int8"),
        (["--quantize", "int8", "--block-size", "24"], "not a multiple of --block-size 24"),
        (["--quantize", "int8", "--group-size", "4"], "--group-size applies to --palettize"),
        (["--palettize", "4", "--block-size", "4"], "--block-size applies to --quantize"),
    ],
)
def test_bad_configuration_is_one_line_and_writes_nothing(mixed, tmp_path, capsys, args, message):
    out = tmp_path / "out.mlpackage"
    code, err = _run_cli(["compress", mixed, "-o", str(out), "--workers", "1", *args], capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("milsurgery: error: ") and message in err, err
    assert os.listdir(tmp_path) == []


def test_opset_older_than_ios18_is_refused(tmp_path, capsys):
    old = _mixed(str(tmp_path / "old.mlpackage"), target="iOS17")
    before = sorted(os.listdir(tmp_path))
    code, err = _run_cli(["compress", old, "-o", str(tmp_path / "out.mlpackage"), "--palettize", "4"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert "function 'main' uses opset CoreML7, older than CoreML8 (iOS 18)" in err
    assert sorted(os.listdir(tmp_path)) == before


def test_missing_optional_packages_say_what_to_install(mixed, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "kmeans1d", None)
    with pytest.raises(UsageError, match=r"kmeans1d package; install it with: pip install 'milsurgery\[compress\]'"):
        compress(mixed, str(tmp_path / "a.mlpackage"), palettize_bits=4, workers=1)
    monkeypatch.setitem(sys.modules, "sklearn.cluster", None)
    with pytest.raises(UsageError, match=r"needs scikit-learn; install it with"):
        compress(mixed, str(tmp_path / "b.mlpackage"), palettize_bits=4, group_size=16, workers=1)
    # uniform needs neither
    compress(mixed, str(tmp_path / "c.mlpackage"), palettize_bits=4, mode="uniform", workers=1)
    assert sorted(os.listdir(tmp_path)) == ["c.mlpackage"]


def test_cli_json_report(mixed, tmp_path, capsys):
    out = tmp_path / "out.mlpackage"
    assert main(["compress", mixed, "-o", str(out), "--quantize", "int4", "--block-size", "16", "--json", "--workers", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["consts_replaced"] == 3 and report["bytes_after"] == _weight_bytes(str(out))
    assert report["bytes_after"] < report["bytes_before"] / 3
    assert {w["op_type"] for w in report["weights"]} == {"constexpr_blockwise_shift_scale"}
    assert all(0 < w["relative_rms"] < 0.2 and w["max_abs_error"] > 0 for w in report["weights"])


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 6, 8])
def test_pack_codes_is_the_blob_layout(bits):
    """The worker's packer writes what the blob writer's generic packer writes (LSB-first), for
    lengths that do and do not fill a byte."""
    from milsurgery.blobfile import pack_bits
    from milsurgery.palettize import pack_codes

    rng = np.random.default_rng(bits)
    for n in (1, 5, 8, 23, 24, 25, 1001):
        codes = rng.integers(0, 1 << bits, n).astype(np.uint8)
        assert pack_codes(codes, bits) == pack_bits(codes, bits)
    if bits == 4:  # FORMATS.md's worked example, and int4 two's complement
        assert pack_codes(np.array([1, 2, 3, 15, 0]), 4) == bytes.fromhex("21f300")
        assert pack_codes(np.array([-1, 7, -8]), 4) == bytes.fromhex("7f08")


def test_dequant_reads_what_the_report_states(mixed, tmp_path):
    """``milsurgery.dequant`` (the constexpr semantics written for near-duplicate adoption)
    materializes the compressed weights with exactly the errors the report gives."""
    from milsurgery import open_package
    from milsurgery.dequant import dequantize, find_weights

    out = str(tmp_path / "out.mlpackage")
    report = compress(mixed, out, palettize_bits=3, group_size=32, workers=1)
    with open_package(out) as pkg, open_package(mixed) as src:
        ours = {w.name: w for w in find_weights(pkg, "main")}
        dense = {w.name: w for w in find_weights(src, "main")}
        for w in report.weights:
            (name,) = [op.split("/", 1)[1] for op in w.ops]
            assert [op.type for op in ours[name].ops] == ["constexpr_lut_to_dense"]
            delta = dequantize(ours[name]).astype(np.float64) - dequantize(dense[name]).astype(np.float64)
            assert np.max(np.abs(delta)) == pytest.approx(w.max_abs_error, rel=1e-9, abs=1e-12)
            ref = dequantize(dense[name]).astype(np.float64)
            assert np.sqrt(np.sum(delta**2) / np.sum(ref**2)) == pytest.approx(w.relative_rms, rel=1e-9)


@pytest.mark.parametrize("kwargs", [
    {"palettize_bits": 3, "mode": "uniform", "group_size": 32},
    {"palettize_bits": 2, "mode": "kmeans", "group_size": 32},
    {"quantize_dtype": "int4", "block_size": 16},
])
def test_windows_of_one_group_write_the_same_bytes(mixed, tmp_path, monkeypatch, kwargs):
    """A weight is compressed in windows of whole groups / rows, each written before the next is
    read: the smallest windows give the same package as one window per weight."""
    mc = sys.modules["milsurgery.compress"]  # the package exports the function under that name
    whole, windowed = str(tmp_path / "whole.mlpackage"), str(tmp_path / "windowed.mlpackage")
    compress(mixed, whole, workers=1, **kwargs)
    monkeypatch.setattr(mc, "WINDOW_ELEMENTS", 1)
    assert mc._window_rows((OUT, HIDDEN), ("palettize", 0, 32)) == 32
    report = compress(mixed, windowed, workers=1, **kwargs)
    assert report.weights_compressed == 3
    read = lambda p: open(os.path.join(checks.weights_dir(p), "weight.bin"), "rb").read()  # noqa: E731
    assert read(whole) == read(windowed)
    assert open(checks.spec_path(whole), "rb").read() == open(checks.spec_path(windowed), "rb").read()


def test_sub_byte_codes_written_in_odd_windows_are_one_bit_stream(tmp_path):
    from milsurgery.compress import _Sink
    from milsurgery.palettize import pack_codes

    codes = np.random.default_rng(0).integers(0, 8, size=1001).astype(np.uint8)
    path = tmp_path / "blob"
    path.write_bytes(b"\xff" * 8)
    fd = os.open(path, os.O_WRONLY)
    try:
        sink = _Sink(fd, "uint3", 8, inline=False)
        for a, b in ((0, 5), (5, 6), (6, 300), (300, 1001)):
            sink.add(codes[a:b])
        raw, padding = sink.finish()
    finally:
        os.close(fd)
    assert raw is None and padding == (-1001 * 3) % 8
    assert path.read_bytes() == b"\xff" * 8 + pack_codes(codes, 3)


def test_verify_tolerance_judges_compressed_weights_by_their_values(mixed, tmp_path, capsys):
    """verify --tolerance against the uncompressed package: the const -> constexpr rewrite is
    judged weight by weight on dequantized values (each weight's metrics listed); without it,
    the rewrite is a graph difference."""
    from milsurgery import verify

    int8, lut2 = str(tmp_path / "int8.mlpackage"), str(tmp_path / "lut2.mlpackage")
    compress(mixed, int8, quantize_dtype="int8", workers=1)
    report = compress(mixed, lut2, palettize_bits=2, group_size=32, workers=1)
    assert main(["verify", int8, "--against", mixed]) == 1
    assert main(["verify", int8, "--against", mixed, "--tolerance"]) == 0
    (check,) = verify(int8, [mixed], tolerance=True).checks
    assert sorted(t["op"] for t in check.tolerated) == sorted(n.split("/", 1)[1] for w in compress(
        mixed, dry_run=True, quantize_dtype="int8", workers=1).weights for n in w.ops)
    assert all(t["kind"] == "constexpr_blockwise_shift_scale" and t["metrics"]["cosine"] > 0.9999 for t in check.tolerated)
    # 2-bit LUTs are far from the default thresholds: each weight is named with its metrics ...
    capsys.readouterr()
    assert main(["verify", lut2, "--against", mixed, "--tolerance"]) == 1
    err = capsys.readouterr()
    for w in report.weights:
        assert w.ops[0].split("/", 1)[1] in err.out + err.err
    # ... and thresholds just below the worst weight's metrics pass it; the metrics are the report's
    (check,) = verify(lut2, [mixed], tolerance=True, min_cosine=0.5, max_mean_abs=1.0).checks
    assert not check.differences and len(check.tolerated) == len(report.weights)
    max_abs = {t["op"]: t["metrics"]["max_abs"] for t in check.tolerated}
    for w in report.weights:
        assert max_abs[w.ops[0].split("/", 1)[1]] == pytest.approx(w.max_abs_error, rel=1e-9)
    worst = min(t["metrics"]["cosine"] for t in check.tolerated)
    assert not verify(lut2, [mixed], tolerance=True, min_cosine=math.nextafter(worst, 2), max_mean_abs=1.0).equivalent


def test_weight_file_replaced_before_a_worker_reads_it(mixed, tmp_path, monkeypatch, capsys):
    """A worker opens the weight file as every package file is opened and checks it is still
    the one the package was validated with: a weight.bin swapped for another file (here a copy:
    same bytes, another inode) between the two is a one-line error, and nothing is written."""
    import shutil

    compress_mod = sys.modules["milsurgery.compress"]  # the name milsurgery.compress is the function
    src = str(tmp_path / "src.mlpackage")
    shutil.copytree(mixed, src)
    blob = os.path.join(checks.weights_dir(src), "weight.bin")
    run_jobs = compress_mod._run_jobs

    def swap_then_run(*args, **kwargs):
        shutil.copyfile(blob, blob + ".new")
        os.replace(blob + ".new", blob)
        yield from run_jobs(*args, **kwargs)

    monkeypatch.setattr(compress_mod, "_run_jobs", swap_then_run)
    out = str(tmp_path / "out.mlpackage")
    assert main(["compress", src, "-o", out, "--palettize", "4", "--mode", "uniform", "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "weight.bin: replaced by another file while compressing" in err
    assert not os.path.exists(out) and os.listdir(tmp_path) == ["src.mlpackage"]
