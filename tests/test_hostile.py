"""Hostile packages that are still valid, and careless invocations that must still work.

* One weight file named two ways (``weights/./weight.bin``, a hard link, a symlink inside
  ``weights/``): counted once by inspect and the memory model, each blob copied once by shrink;
  numbers checked against a hand walk of the records.
* ``shrink --in-place`` and ``append`` through a symlink edit the real package and keep the link;
  stale temporary entries of dead runs (directories, symlinks) beside it are removed, a symlink's
  target never.
* ``--force`` still replaces an existing package.
* ``inspect`` lists only pairs of functions that share something.
* :func:`milsurgery.package.read_input`, the one way package files are read: containment,
  special files, the size cap.
* ``bench/scale_bench.py`` runs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import minipkg
from checks import all_records, ct_load_program, ct_read_referenced_blobs
from milsurgery import FormatError, PackageError, SpecError, UnsafePathError, check, inspect_package, merge, open_package, shrink, verify
from milsurgery.cli import main
from milsurgery.memory import memory_model
from milsurgery.package import PARTIAL_MARKER, read_input
from milsurgery.spec import iter_blob_refs, pb
from test_malformed import time_limit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WEIGHTS_DIR = os.path.join("Data", "com.apple.CoreML", "weights")


def _edit_spec_refs(pkg: str, function: str, **fields) -> None:
    """Set ``fields`` of every blob reference of ``function`` in the package's spec."""
    path = os.path.join(pkg, "Data", "com.apple.CoreML", "model.mlmodel")
    model = pb.Model()
    with open(path, "rb") as f:
        model.ParseFromString(f.read())
    for ref in iter_blob_refs(model, functions=[function]):
        for k, v in fields.items():
            setattr(ref.value.blobFileValue, k, v)
    with open(path, "wb") as f:
        f.write(model.SerializeToString())


def make_shared(path) -> str:
    """Functions a and b share one blob (record 0); each has one blob of its own; one blob is
    referenced by nothing."""
    rng = np.random.default_rng(3)
    return minipkg.make(
        path,
        {
            "a": [("float16", rng.standard_normal((8, 8)).astype(np.float16)), ("float32", rng.standard_normal(5).astype(np.float32))],
            "b": [0, ("float16", rng.standard_normal(3).astype(np.float16))],
        },
        extra_blobs=[("float32", [1.0, 2.0])],
    )


ALIASES = {
    "dot": lambda wdir: "@model_path/weights/./weight.bin",
    "hardlink": lambda wdir: (os.link(os.path.join(wdir, "weight.bin"), os.path.join(wdir, "alias.bin")),
                              "@model_path/weights/alias.bin")[1],
    "symlink": lambda wdir: (os.symlink("weight.bin", os.path.join(wdir, "alias.bin")),
                             "@model_path/weights/alias.bin")[1],
}


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    return make_shared(tmp_path_factory.mktemp("hostile") / "plain.mlpackage")


@pytest.fixture(params=list(ALIASES))
def aliased(request, plain, tmp_path):
    """The shared package with every reference of function b through a second name of weight.bin."""
    pkg = str(tmp_path / f"{request.param}.mlpackage")
    shutil.copytree(plain, pkg, symlinks=True)
    name = ALIASES[request.param](os.path.join(pkg, WEIGHTS_DIR))
    _edit_spec_refs(pkg, "b", fileName=name)
    return request.param, pkg


def test_one_file_named_two_ways_is_counted_once(aliased, plain):
    _kind, pkg = aliased
    records = all_records(os.path.join(plain, WEIGHTS_DIR, "weight.bin"))  # hand walk: (offset, dtype, size, data)
    sizes = {off: size for off, _dtype, size, _data in records}
    (r0, r1, r2, _extra) = sorted(sizes)
    info = inspect_package(pkg)
    (wf,) = info["weight_files"]
    assert wf["file_bytes"] == os.path.getsize(os.path.join(plain, WEIGHTS_DIR, "weight.bin"))
    assert wf["blobs"] == len(records) and wf["blob_bytes"] == sum(sizes.values())
    by_name = {f["name"]: f for f in info["functions"]}
    assert by_name["a"]["bytes"] == sizes[r0] + sizes[r1]
    assert by_name["b"]["bytes"] == sizes[r0] + sizes[r2]
    assert info["shared"] == [{"functions": ["a", "b"], "blobs": 1, "bytes": sizes[r0]}]
    assert info["duplicates"] == [] and info["duplicate_bytes"] == 0
    assert [u["offset"] for u in info["unreferenced"]] == [max(sizes)]
    model = memory_model(pkg, ["a", "b"])
    assert model["functions"][-1]["shared_mapping_bytes"] == sizes[r0] + sizes[r1] + sizes[r2]
    assert model["sharing_defeated"] == []


def test_shrink_of_an_aliased_package_copies_each_blob_once(aliased, plain, tmp_path):
    kind, pkg = aliased
    out = str(tmp_path / "out.mlpackage")
    report = shrink(pkg, out)
    assert report.blobs_written == 3 and report.blobs_coalesced == 0
    assert len(all_records(os.path.join(out, WEIGHTS_DIR, "weight.bin"))) == 3
    assert verify(out, [plain]).equivalent
    assert ct_read_referenced_blobs(out) == 3  # coremltools' C++ reader
    if kind == "dot":
        ct_load_program(pkg)  # coremltools accepts the alias itself: the package is legitimate


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def test_shrink_in_place_through_a_symlink_edits_the_real_package(plain, tmp_path):
    real_dir = tmp_path / "real"
    real_dir.mkdir()
    real = str(real_dir / "p.mlpackage")
    shutil.copytree(plain, real)
    link = str(tmp_path / "link.mlpackage")
    os.symlink(real, link)
    # what dead runs left beside the real package: an exchanged symlink and a directory
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "data.txt").write_text("not milsurgery's")
    pid = _dead_pid()
    stale_link = real_dir / f".p.mlpackage{PARTIAL_MARKER}{pid}-inplace"
    os.symlink(str(keep), stale_link)
    stale_dir = real_dir / f".p.mlpackage{PARTIAL_MARKER}{pid}-abcd1234"
    stale_dir.mkdir()
    before = os.path.getsize(os.path.join(real, WEIGHTS_DIR, "weight.bin"))

    with time_limit(60):
        assert main(["shrink", "--in-place", "--quiet", link]) == 0

    assert os.path.islink(link) and os.readlink(link) == real
    assert sorted(os.listdir(real_dir)) == ["p.mlpackage"]  # stale entries gone, nothing new left
    assert (keep / "data.txt").read_text() == "not milsurgery's"  # a link's target is never removed
    assert os.path.getsize(os.path.join(real, WEIGHTS_DIR, "weight.bin")) < before
    assert inspect_package(real)["unreferenced"] == []
    assert verify(real, [plain]).equivalent
    assert ct_read_referenced_blobs(real) == 3


def test_append_through_a_symlink_edits_the_real_package(plain, tmp_path):
    real = str(tmp_path / "p.mlpackage")
    shutil.copytree(plain, real)
    link = str(tmp_path / "link.mlpackage")
    os.symlink(real, link)
    with time_limit(60):
        assert main(["append", "--quiet", link, f"{plain}:a=c"]) == 0
    assert os.path.islink(link) and os.readlink(link) == real
    with open_package(real) as pkg:
        assert pkg.functions == ["a", "b", "c"]
    assert verify(real, [plain, f"{plain}:a=c"]).equivalent


def test_force_still_replaces_an_existing_package(plain, tmp_path):
    out = str(tmp_path / "out.mlpackage")
    merge([f"{plain}:a"], out)
    merge([f"{plain}:b"], out, force=True)
    with open_package(out) as pkg:
        assert pkg.functions == ["b"]
    assert sorted(os.listdir(tmp_path)) == ["out.mlpackage"]


def test_inspect_lists_only_pairs_that_share(tmp_path):
    w = np.arange(6, dtype=np.float16)
    pkg = minipkg.make(
        tmp_path / "p.mlpackage",
        {"a": [("float16", w)], "b": [("float16", w + 1)], "c": [0], "d": [("float16", w + 2)]},
    )
    info = inspect_package(pkg)
    assert info["shared"] == [{"functions": ["a", "c"], "blobs": 1, "bytes": 12}]
    assert info["schema"] == 2


# -- read_input: the one way package files are read ------------------------------------------------
def test_read_input_refuses_escapes_special_files_and_oversize(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "ok.json").write_bytes(b"x" * 100)
    assert read_input(str(root), str(root / "ok.json"), 100) == b"x" * 100  # exactly the cap: read
    with pytest.raises(PackageError, match="too large"):
        read_input(str(root), str(root / "ok.json"), 99)
    (tmp_path / "secret").write_text("outside")
    os.symlink(str(tmp_path / "secret"), root / "escape")
    with pytest.raises(UnsafePathError, match="outside the package"):
        read_input(str(root), str(root / "escape"), 100)
    os.symlink("ok.json", root / "inside-link")
    assert read_input(str(root), str(root / "inside-link"), 100) == b"x" * 100  # contained: fine
    os.mkfifo(root / "fifo")
    with time_limit(10), pytest.raises(PackageError, match="FIFO"):
        read_input(str(root), str(root / "fifo"), 100)
    with pytest.raises(PackageError, match="directory"):
        read_input(str(tmp_path), str(root), 100)
    with pytest.raises(PackageError, match="does not exist"):
        read_input(str(root), str(root / "nothing"), 100)
    if os.path.exists("/dev/zero"):  # a device reports size 0 and never ends: refused unread
        with time_limit(10), pytest.raises(PackageError, match="character device"):
            read_input("/dev", "/dev/zero", 100)


def test_scale_bench_runs(tmp_path, capsys):
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import scale_bench

    out = tmp_path / "r.json"
    rc = scale_bench.main(["--sizes", "20,40", "--blobs", "--only", "inspect --json,rename 1", "--workdir",
                           str(tmp_path / "w"), "--json", str(out)])
    assert rc == 0
    import json

    results = json.loads(out.read_text())["results"]
    assert set(results) == {"inspect --json", "rename 1"}
    for by_size in results.values():
        assert all(r["exit"] == 0 and r["seconds"] > 0 and r["peak_rss_kib"] > 0 for r in by_size.values())
    assert not (tmp_path / "w").exists()  # packages removed
    assert "inspect --json" in capsys.readouterr().out
    built = scale_bench.build_weightless(str(tmp_path / "b.mlpackage"), 20, blobs=True)
    info = inspect_package(built)
    assert len(info["functions"]) == 20 and info["weight_files"][0]["blobs"] == 20
    assert [len(g["copies"]) for g in info["duplicates"]] == [2]  # f0 and f10 hold the same bytes


def test_inspect_shared_ignores_program_attribute_references(tmp_path):
    """A blob referenced by a program attribute and by functions: pairs of functions only."""
    w = np.arange(6, dtype=np.float16)
    pkg = minipkg.make(tmp_path / "p.mlpackage", {"a": [("float16", w)], "b": [0]})
    path = os.path.join(pkg, "Data", "com.apple.CoreML", "model.mlmodel")
    model = pb.Model()
    with open(path, "rb") as f:
        model.ParseFromString(f.read())
    first = next(iter_blob_refs(model, functions=["a"])).value
    model.mlProgram.attributes.add(key="shared_table").value.CopyFrom(first)
    with open(path, "wb") as f:
        f.write(model.SerializeToString())
    assert inspect_package(pkg)["shared"] == [{"functions": ["a", "b"], "blobs": 1, "bytes": 12}]


def test_running_union_equals_the_batch_union():
    """memory's incremental union (linear in blobs) against the sort-and-sweep union it replaced
    per step, on random overlapping, touching and nested intervals in two files."""
    from milsurgery.memory import _RunningUnion, _union_bytes

    rng = np.random.default_rng(11)
    for _ in range(200):
        union, added = _RunningUnion(), []
        for _ in range(int(rng.integers(1, 30))):
            start = int(rng.integers(0, 200))
            span = ("ab"[int(rng.integers(0, 2))], start, start + int(rng.integers(1, 40)))
            union.add(*span)
            added.append(span)
            assert union.total == _union_bytes(added)


@pytest.mark.parametrize("name", ["model.mil", "metadata.json"])
@pytest.mark.parametrize("kind", ["fifo", "symlink out", "directory"])
def test_compiled_model_files_are_opened_like_package_files(plain, tmp_path, name, kind):
    """model.mil and metadata.json of a compiled model: contained, regular files, never a hang."""
    from compiled_layout import lay_out_compiled

    compiled = lay_out_compiled(plain, str(tmp_path / "m.mlmodelc"))
    target = os.path.join(compiled, name)
    os.replace(target, tmp_path / "outside")
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "symlink out":
        os.symlink(str(tmp_path / "outside"), target)
    else:
        os.mkdir(target)
    with time_limit(20):
        code = main(["inspect", compiled])
    assert code == 2
    with time_limit(20), pytest.raises((PackageError, FormatError)) as info:
        inspect_package(compiled)
    assert name in str(info.value)
    expected = {"fifo": "FIFO", "symlink out": "outside the package", "directory": "directory"}[kind]
    assert expected in str(info.value)


def test_check_reads_a_spec_file_without_blocking(tmp_path):
    """``check`` on a bare spec path that is a FIFO or a device: one error, no hang."""
    fifo = tmp_path / "model.mlmodel"
    os.mkfifo(fifo)
    with time_limit(20):
        assert main(["check", str(fifo)]) == 2
    with time_limit(20), pytest.raises(SpecError, match="FIFO"):
        check(str(fifo))


def test_a_directory_swapped_for_a_symlink_while_opening_is_refused(tmp_path, monkeypatch):
    """Between resolving a path (it was inside) and opening it, a directory on the way becomes a
    symlink to outside the package: the open is refused, the outside file never read."""
    import milsurgery.package as package_mod

    root = tmp_path / "root"
    (root / "weights").mkdir(parents=True)
    (root / "weights" / "weight.bin").write_bytes(b"inside")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "weight.bin").write_bytes(b"secret")
    real_inside = package_mod._inside

    def swap_after_check(path, root_path):
        ok = real_inside(path, root_path)
        if path.endswith("weight.bin"):
            os.rename(root / "weights", tmp_path / "moved")
            os.symlink(str(outside), root / "weights")
        return ok

    monkeypatch.setattr(package_mod, "_inside", swap_after_check)
    with pytest.raises(UnsafePathError, match="changed to a symlink while opening"):
        read_input(str(root), str(root / "weights" / "weight.bin"), 100)
    monkeypatch.setattr(package_mod, "_inside", real_inside)
    # resolved afresh, the symlink is seen for what it is
    with pytest.raises(UnsafePathError, match="outside the package"):
        read_input(str(root), str(root / "weights" / "weight.bin"), 100)
