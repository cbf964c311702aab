"""Faults while writing: disk full, racing runs, a killed merge, absurd sizes.

* Disk full is simulated with RLIMIT_FSIZE (writes past the limit fail with EFBIG; the CLI ignores
  SIGXFSZ so they become a clean error) during merge, shrink (to a new path and in place) and
  append: exit 2, one line, no output, sources and the appended-to package byte-identical.
* Two merges racing to one destination never leave a mixed package.
* A SIGKILLed merge leaves no destination and a clearly named temporary directory, which the
  next run for that destination removes (and which a live run's directory is safe from).
* Headers and specs claiming absurd sizes are rejected without allocating them.
"""

from __future__ import annotations

import errno
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest

from milsurgery import DestinationExistsError, WriteError, open_package
from milsurgery.formats import HEADER_SIZE, RECORD_SIZE
from milsurgery.package import PARTIAL_MARKER, StagedPackage
from milsurgery.synth import build_llm_like
from test_malformed import snapshot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WEIGHTS = os.path.join("Data", "com.apple.CoreML", "weights", "weight.bin")
SPEC = os.path.join("Data", "com.apple.CoreML", "model.mlmodel")


def run_cli(*args, fsize: int | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    def limit():
        if fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    return subprocess.run([sys.executable, "-m", "milsurgery", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, preexec_fn=limit, cwd=ROOT)


def leftovers(directory) -> list[str]:
    return [n for n in os.listdir(directory) if PARTIAL_MARKER in n or "milsurgery-" in n]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Two single-function packages with different weights (~130 KiB each)."""
    d = tmp_path_factory.mktemp("faults")
    a = str(d / "a.mlpackage")
    b = str(d / "b.mlpackage")
    build_llm_like(a, seq_lens=1, hidden=128, layers=4, seed=1)
    build_llm_like(b, seq_lens=4, hidden=128, layers=4, seed=2)
    return a, b


def weights_size(pkg) -> int:
    return os.path.getsize(os.path.join(pkg, WEIGHTS))


# -- disk full -------------------------------------------------------------------------------------
@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="needs RLIMIT_FSIZE / SIGXFSZ")
@pytest.mark.parametrize("where", ["header", "first-blob", "middle", "last-bytes"])
def test_disk_full_during_merge(sources, tmp_path, where):
    a, b = sources
    out = tmp_path / "out.mlpackage"
    assert run_cli("merge", "-o", out, f"{a}:main=infer", f"{b}:main=prefill").returncode == 0
    total = weights_size(out)  # what the merge writes when it has room
    shutil.rmtree(out)
    fsize = {"header": 16, "first-blob": HEADER_SIZE + RECORD_SIZE + 100, "middle": total // 2,
             "last-bytes": total - 1}[where]
    before = {p: snapshot(p) for p in sources}
    proc = run_cli("merge", "-o", out, f"{a}:main=infer", f"{b}:main=prefill", fsize=fsize)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("milsurgery: error: "), proc.stderr
    assert os.strerror(errno.EFBIG) in lines[0] and "weight.bin" in lines[0]
    assert not out.exists() and leftovers(tmp_path) == []
    assert {p: snapshot(p) for p in sources} == before
    # with room to write, the same command succeeds
    assert run_cli("merge", "-o", out, f"{a}:main=infer", f"{b}:main=prefill").returncode == 0


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="needs RLIMIT_FSIZE / SIGXFSZ")
@pytest.mark.parametrize("in_place", [False, True], ids=["to-new-path", "in-place"])
def test_disk_full_during_shrink(sources, tmp_path, in_place):
    pkg = tmp_path / "src.mlpackage"
    shutil.copytree(sources[0], pkg)
    before = snapshot(pkg)
    out = tmp_path / "out.mlpackage"
    args = ["shrink", pkg, "--in-place"] if in_place else ["shrink", pkg, "-o", out]
    proc = run_cli(*args, fsize=weights_size(pkg) // 2)
    assert proc.returncode == 2 and os.strerror(errno.EFBIG) in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1
    assert not out.exists() and leftovers(tmp_path) == []
    assert snapshot(pkg) == before


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="needs RLIMIT_FSIZE / SIGXFSZ")
@pytest.mark.parametrize("room", [1, 20_000, 100_000])
def test_disk_full_during_append_leaves_the_package_byte_identical(sources, tmp_path, room):
    a, b = sources
    pkg = tmp_path / "target.mlpackage"
    shutil.copytree(a, pkg)
    before_target, before_source = snapshot(pkg), snapshot(b)
    proc = run_cli("append", pkg, f"{b}:main=prefill", fsize=weights_size(pkg) + room)
    assert proc.returncode == 2 and os.strerror(errno.EFBIG) in proc.stderr, proc.stderr
    assert snapshot(pkg) == before_target
    assert snapshot(b) == before_source
    assert leftovers(pkg / "Data" / "com.apple.CoreML") == []
    with open_package(pkg) as opened:
        assert opened.functions == ["main"]


def test_append_failing_at_the_spec_undoes_the_appended_blobs(sources, tmp_path, monkeypatch):
    """The spec is the last step: if replacing it fails, weight.bin gets its old count and size."""
    from milsurgery import surgery

    a, b = sources
    pkg = tmp_path / "target.mlpackage"
    shutil.copytree(a, pkg)
    before = snapshot(pkg)

    def no_space(path, data):
        raise WriteError(f"{path}: replacing the file failed: {os.strerror(errno.ENOSPC)}")

    monkeypatch.setattr(surgery, "replace_file", no_space)
    with pytest.raises(WriteError, match="No space left"):
        surgery.append(pkg, [f"{b}:main=prefill"])
    assert snapshot(pkg) == before


def test_spec_write_failing_at_commit_leaves_nothing(sources, tmp_path, monkeypatch):
    """ENOSPC while writing the spec or manifest (after every weight byte is written)."""
    import milsurgery.package as package

    real_fsync = os.fsync
    calls = {"n": 0}

    def failing_fsync(fd):
        calls["n"] += 1
        if calls["n"] == 2:  # the first is weight.bin's; the second is the spec's
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    from milsurgery import merge

    out = tmp_path / "out.mlpackage"
    monkeypatch.setattr(package.os, "fsync", failing_fsync)
    with pytest.raises(WriteError, match="No space left"):
        merge([sources[0], f"{sources[1]}:main=other"], out)
    assert not out.exists() and leftovers(tmp_path) == []


# -- races and kills -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def four(tmp_path_factory, sources):
    d = tmp_path_factory.mktemp("race")
    c, e = str(d / "c.mlpackage"), str(d / "e.mlpackage")
    build_llm_like(c, seq_lens=1, hidden=128, layers=4, seed=3)
    build_llm_like(e, seq_lens=4, hidden=128, layers=4, seed=4)
    return (*sources, c, e)


def _equivalent(out, x, y) -> bool:
    proc = run_cli("verify", out, "--against", f"{x}:main=f1", f"{y}:main=f2")
    assert proc.returncode in (0, 1), proc.stderr
    return proc.returncode == 0


@pytest.mark.parametrize("force", [False, True], ids=["no-force", "force"])
def test_racing_merges_never_mix(four, tmp_path, force):
    a, b, c, e = four
    extra = ["--force"] if force else []
    for attempt in range(6):
        out = tmp_path / f"out{attempt}.mlpackage"
        cmds = [[sys.executable, "-m", "milsurgery", "merge", "--quiet", *extra, "-o", str(out), f"{x}:main=f1",
                 f"{y}:main=f2"] for x, y in ((a, b), (c, e))]
        procs = [subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, cwd=ROOT) for cmd in cmds]
        results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
        codes = sorted(rc for rc, _ in results)
        if force:
            assert all(rc in (0, 2) for rc in codes) and 0 in codes, results
        else:
            assert codes == [0, 2], results
            loser = next(err for rc, err in results if rc == 2)
            assert "already exists" in loser or "appeared while" in loser, loser
        assert _equivalent(out, a, b) != _equivalent(out, c, e)
        assert leftovers(tmp_path) == []


def test_destination_appearing_during_write_is_refused(sources, tmp_path):
    out = tmp_path / "out.mlpackage"
    staged = StagedPackage(out)
    shutil.copytree(sources[0], out)  # another run finished first
    with open_package(sources[0]) as pkg:
        with pytest.raises(DestinationExistsError):
            staged.commit(pkg.model)
    assert snapshot(out) == snapshot(sources[0]) and leftovers(tmp_path) == []


@pytest.fixture(scope="module")
def big_pair(tmp_path_factory):
    """Two 32 MiB packages with different weights: a merge takes long enough to be killed."""
    d = tmp_path_factory.mktemp("kill")
    a, b = str(d / "a.mlpackage"), str(d / "b.mlpackage")
    build_llm_like(a, seq_lens=1, hidden=1024, layers=16, seed=1)
    build_llm_like(b, seq_lens=4, hidden=1024, layers=16, seed=2)
    return a, b


def test_killed_merge_leaves_a_named_partial_that_the_next_run_removes(big_pair, tmp_path):
    a, b = big_pair
    out = tmp_path / "out.mlpackage"
    before = {p: snapshot(p) for p in big_pair}
    cmd = [sys.executable, "-m", "milsurgery", "merge", "--quiet", "-o", str(out), f"{a}:main=f1", f"{b}:main=f2"]
    for _attempt in range(5):
        proc = subprocess.Popen(cmd, cwd=ROOT)
        partial = None
        deadline = time.monotonic() + 60
        while partial is None and proc.poll() is None and time.monotonic() < deadline:
            found = [n for n in os.listdir(tmp_path) if PARTIAL_MARKER in n]
            weights = [os.path.join(tmp_path, n, WEIGHTS) for n in found]
            if weights and os.path.exists(weights[0]) and os.path.getsize(weights[0]) > 1 << 20:
                partial = found[0]
        proc.kill()
        proc.wait()
        if partial is not None:
            break
        shutil.rmtree(out, ignore_errors=True)
    else:
        pytest.fail("merge finished before it could be killed five times in a row")
    assert not out.exists()
    assert partial == f".out.mlpackage{PARTIAL_MARKER}{proc.pid}-{partial.split('-')[-1]}"
    assert [n for n in os.listdir(tmp_path) if PARTIAL_MARKER in n] == [partial]

    # A live run's directory is left alone; the dead run's is removed by the next run.
    live = tmp_path / f".out.mlpackage{PARTIAL_MARKER}{os.getpid()}-keep"
    live.mkdir()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    assert sorted(n for n in os.listdir(tmp_path) if PARTIAL_MARKER in n) == [live.name]
    assert _equivalent(out, a, b)
    assert {p: snapshot(p) for p in big_pair} == before


# -- absurd sizes ----------------------------------------------------------------------------------
ABSURD = r"""
import json, os, struct, sys
from milsurgery import MilSurgeryError, open_package, BlobFile
from milsurgery.spec import parse_spec, pb

results = {}
for name, path, kind in json.loads(sys.argv[1]):
    try:
        (BlobFile if kind == "blob" else open_package)(path)
        results[name] = "accepted"
    except MilSurgeryError as exc:
        results[name] = type(exc).__name__ + ": " + str(exc)
with open("/proc/self/status") as f:
    hwm = next(int(l.split()[1]) for l in f if l.startswith("VmHWM:"))
print(json.dumps({"results": results, "vmhwm_kib": hwm}))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="peak RSS read from /proc")
def test_absurd_sizes_are_rejected_without_allocation(sources, tmp_path):
    import json
    import struct

    cases = []
    # a 1 TB sparse weight.bin whose header claims 2**32-1 blobs: the first is a valid 1 TB
    # blob (walked past without reading it), the second record is zeros
    big = tmp_path / "big.bin"
    with open(big, "wb") as f:
        f.write(struct.pack("<II7Q", 2**32 - 1, 2, *[0] * 7))
        f.write(struct.pack("<IIQQQ4Q", 0xDEADBEEF, 1, 10**12 - 256, 128, 0, 0, 0, 0, 0))
    try:
        os.truncate(big, 10**12)
    except OSError:
        pytest.skip("this file system cannot hold a sparse 1 TB file")
    cases.append(("billions-of-blobs-1e12-bytes", str(big), "blob"))
    # a spec file larger than any real spec, and a manifest larger than any real manifest
    for name, rel, size in (("huge-spec", SPEC, 2**31), ("huge-manifest", "Manifest.json", 2**30)):
        pkg = tmp_path / f"{name}.mlpackage"
        shutil.copytree(sources[0], pkg)
        os.truncate(pkg / rel, size)
        cases.append((name, str(pkg), "package"))
    proc = subprocess.run([sys.executable, "-c", ABSURD, json.dumps(cases)], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    res = out["results"]
    assert res["billions-of-blobs-1e12-bytes"].startswith("BlobFileError") and f"at offset {10**12 - 128}" in res[
        "billions-of-blobs-1e12-bytes"]
    assert res["huge-spec"].startswith("SpecError") and "too large" in res["huge-spec"]
    assert res["huge-manifest"].startswith("ManifestError") and "larger than" in res["huge-manifest"]
    assert out["vmhwm_kib"] < 200 * 1024, out  # the process's whole peak, interpreter and numpy included
