"""Dequantization (milsurgery.dequant) against coremltools' own evaluation of the constexpr ops.

Fixtures are compressed by coremltools (``palettize_weights``, ``linear_quantize_weights``,
``prune_weights`` and their joint forms), one package per kind, built once for the module. The
reference values come from coremltools' milproto loader and its ops' value inference, not from
milsurgery's reader.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from checks import ct_load_program, spec_path
from compressed_models import KINDS, compress, ct_value, linear_weights, linears
from milsurgery import SpecError
from milsurgery.cli import main
from milsurgery.dequant import WINDOW_ELEMENTS, dequantize, find_weights, get_weight, iter_values, sample_values
from milsurgery.package import Package
from milsurgery.spec import pb

SHAPES = [(16, 1280), (8, 1280)]


@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    d = tmp_path_factory.mktemp("dequant")
    base = {t: linears(str(d / f"base_{t}.mlpackage"), linear_weights(0, SHAPES), target=t) for t in ("iOS16", "iOS18")}
    return {kind: compress(base[target], str(d / f"{kind}.mlpackage"), kind) for kind, target in KINDS.items()}


def ct_weights(pkg_path: str) -> dict:
    prog = ct_load_program(pkg_path)
    return {op.outputs[0].name: op.outputs[0] for op in prog.functions["main"].operations}


@pytest.mark.parametrize("kind", list(KINDS))
def test_dequantize_matches_coremltools(packages, kind):
    path = packages[kind]
    ct_vars = ct_weights(path)
    compressed = 0
    with Package(path) as pkg:
        weights = find_weights(pkg, "main")
        # The weights are exactly what the linear ops consume, as coremltools' program sees it.
        # (coremltools stores consts of fewer than 10 values inline, not as blobs: not weights.)
        used = {v.name for v in ct_vars.values() if v.op.op_type == "linear" for v in (v.op.weight, v.op.bias)
                if v.op.op_type != "const" or v.val.size >= 10}
        assert {w.name for w in weights} == used
        for w in weights:
            ref = np.asarray(ct_value(ct_vars[w.name]))
            mine = dequantize(w)
            assert mine.shape == ref.shape == w.shape
            if w.op_type == "const":
                np.testing.assert_array_equal(mine, ref.astype(np.float64))
                continue
            compressed += 1
            # Computed in float64 and rounded once to the weight's type, the values are exactly
            # those coremltools computes in that type.
            np.testing.assert_array_equal(mine.astype(ref.dtype), ref, err_msg=kind)
            np.testing.assert_array_equal(mine, ref.astype(np.float64), err_msg=kind)
    assert compressed >= 1, f"{kind}: coremltools compressed nothing"


@pytest.mark.parametrize("kind", ["lut2_vector", "sparse_lut4", "int4_block", "lut4_ios16", "sparse_ios16"])
def test_windows_agree_with_whole(packages, kind):
    """Tiny windows (one row each; a vector LUT's rows straddle vectors) give the same values."""
    with Package(packages[kind]) as pkg:
        w = get_weight(pkg, "main", next(w.name for w in find_weights(pkg, "main") if w.op_type != "const"))
        whole = dequantize(w)
        for window in (1, 7, 3000):
            parts = list(iter_values(w, window=window))
            assert max(p.size for p in parts) <= max(window, whole.shape[1]) if whole.ndim > 1 else True
            np.testing.assert_array_equal(np.concatenate(parts).reshape(w.shape), whole)
        sample = sample_values(w, 64)
        assert 0 < sample.size <= 64 * 2
        assert np.isin(sample, whole).all()


def test_window_bounded_by_constant(packages):
    with Package(packages["lut4_grouped"]) as pkg:
        w = next(w for w in find_weights(pkg, "main") if w.op_type != "const")
        assert all(p.size <= max(WINDOW_ELEMENTS, w.shape[1]) for p in iter_values(w))


def test_weights_describe_their_ops(packages):
    with Package(packages["sparse_lut4"]) as pkg:
        w = next(w for w in find_weights(pkg, "main") if w.op_type != "const")
        assert w.kind == "constexpr_sparse_to_dense+constexpr_lut_to_sparse"
        assert [op.type for op in w.ops][:2] == ["constexpr_sparse_to_dense", "constexpr_lut_to_sparse"]
        assert w.blob_bytes == sum({(r.blob.record_offset): r.blob.size for r in w.refs}.values()) > 0


def _corrupt_ios16_shape(src: str, dest: str) -> str:
    """Copy ``src`` with the iOS 16 LUT op's ``shape`` attribute (and declared output) enlarged,
    so its packed indices no longer hold enough codes."""
    import shutil

    shutil.copytree(src, dest)
    model = pb.Model()
    with open(spec_path(dest), "rb") as f:
        model.ParseFromString(f.read())
    block = model.mlProgram.functions[0].value.block_specializations[0].value
    op = next(o for o in block.operations if o.type == "constexpr_lut_to_dense")
    shape_attr = next(e.value for e in op.attributes if e.key == "shape")
    t = shape_attr.immediateValue.tensor
    kind = t.WhichOneof("value")
    if kind == "bytes":
        arr = np.frombuffer(t.bytes.values, dtype=np.uint32).copy()
        arr[0] *= 2
        t.bytes.values = arr.tobytes()
    else:
        vals = getattr(t, kind).values
        vals[0] *= 2
    op.outputs[0].type.tensorType.dimensions[0].constant.size *= 2
    with open(spec_path(dest), "wb") as f:
        f.write(model.SerializeToString())
    return op.outputs[0].name


def test_blob_too_small_for_declared_shape(packages, tmp_path, capsys):
    bad = str(tmp_path / "bad.mlpackage")
    op_name = _corrupt_ios16_shape(packages["lut4_ios16"], bad)
    with Package(bad) as pkg:
        w = next(w for w in find_weights(pkg, "main") if w.name == op_name)
        with pytest.raises(SpecError, match=f"op '{op_name}' \\(constexpr_lut_to_dense\\): indices holds"):
            dequantize(w)
    out = tmp_path / "out.mlpackage"
    code = main(["merge", "-o", str(out), f"{packages['lut4_ios16']}:main=a", f"{bad}:main=b", "--adopt"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and op_name in err[0] and err[0].startswith("milsurgery: error: ")
    assert not os.path.exists(out)
    assert [p for p in os.listdir(tmp_path) if p != "bad.mlpackage"] == []


@pytest.mark.parametrize("kind", list(KINDS))
def test_sketch_values_are_the_weights_values_at_their_positions(packages, kind):
    """A weight's sketch (values picked at spread rows and columns, looked up without
    materializing the rows) equals the materialized tensor at those positions."""
    from milsurgery.dequant import _node_of, store_type

    with Package(packages[kind]) as pkg:
        for w in find_weights(pkg, "main"):
            whole = dequantize(w)
            node = _node_of(w)
            if not node.shape:
                continue
            rows = np.unique(np.linspace(0, w.shape[0] - 1, num=min(w.shape[0], 5)).astype(np.int64))
            flat = whole.reshape(w.shape[0], -1)
            cols = np.unique(np.linspace(0, flat.shape[1] - 1, num=min(flat.shape[1], 7)).astype(np.int64))
            picked = node.pick(rows, cols)
            assert picked.shape == (rows.size, cols.size)
            # rows are computed in float64; the weight is what Core ML stores them as
            as_stored = picked.astype(store_type(w) or np.float64).astype(np.float64)
            np.testing.assert_array_equal(as_stored, flat[rows][:, cols], err_msg=f"{kind} {w.name}")
            sketch = sample_values(w, 64)
            assert 0 < sketch.size <= 64 * 2 and np.isin(sketch, whole).all()


def test_unpack_every_width_and_offset():
    """Codes of every width from 1 to 8 bits, at every bit offset into the first byte, equal an
    independent reading of the bits (numpy's unpackbits, least significant bit first)."""
    from milsurgery.dequant import _unpack

    rng = np.random.default_rng(5)
    raw = rng.integers(0, 256, 61, dtype=np.uint8)
    bits_le = np.unpackbits(raw, bitorder="little")
    for bits in range(1, 9):
        for skip in range(8):
            for count in (0, 1, 7, (raw.size * 8 - skip) // bits):
                want = np.array([int("".join(map(str, bits_le[skip + k * bits: skip + (k + 1) * bits][::-1])), 2)
                                 for k in range(count)], dtype=np.int64)
                got = _unpack(raw, bits, skip, count, False)
                assert got.dtype == np.uint8 and np.array_equal(got.astype(np.int64), want), (bits, skip, count)
                if bits == 4:
                    signed = _unpack(raw, bits, skip, count, True).astype(np.int64)
                    assert np.array_equal(signed, np.where(want >= 8, want - 16, want)), (skip, count)


def test_picks_of_one_dimensional_and_vector_luts():
    """Picking values agrees with materializing rows for LUTs of rank 1 and of vectors, and for a
    rank-1 blockwise weight (made from arrays, as the ops would see their inputs)."""
    from milsurgery.dequant import _Lut, _Node, _ShiftScale

    class Array(_Node):
        def __init__(self, a):
            self.a, self.shape = a, a.shape

        def rows(self, r0, r1):
            return self.a[r0:r1]

    def fail(message):
        return AssertionError(message)

    rng = np.random.default_rng(3)
    one_d = _Lut(Array(rng.integers(0, 4, 12)), Array(rng.standard_normal((3, 4, 1))), None, fail)
    vec = _Lut(Array(rng.integers(0, 4, (4, 6))), Array(rng.standard_normal((2, 1, 4, 2))), 0, fail)
    scaled = _ShiftScale(Array(rng.integers(-8, 8, 12)), Array(rng.standard_normal(3)), Array(rng.integers(-2, 2, 3)), fail)
    for node in (one_d, vec, scaled):
        rows = np.arange(node.shape[0])
        n = int(np.prod(node.shape[1:]))
        cols = np.arange(n)
        want = np.stack([node.rows(int(r), int(r) + 1).reshape(-1) for r in rows])
        np.testing.assert_array_equal(node.pick(rows, cols), want)
