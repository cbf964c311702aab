"""Concurrent in-place edits of one package, in real processes (``python -m milsurgery``).

* Four appends and a ``shrink --in-place`` started together, two rounds: every run waits for
  the edit lock, so each reports success, and the package ends holding exactly the functions of
  the runs that reported success, each equal to its source (checked by hand-decoding the records
  and with coremltools' C++ blob reader); readers opening the package meanwhile always get a
  whole package.
* A second editor that does not wait is refused with one line; a lock holder killed with SIGKILL
  leaves no stale lock.
* An editor waiting while the package directory is exchanged (what ``shrink --in-place`` does)
  edits the new directory, not the old one.

Every child runs under a timeout, so a deadlock fails the test instead of hanging the run.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from checks import assert_function_equivalent, ct_read_referenced_blobs
from milsurgery import open_package, verify
from milsurgery.atomic import exchange_paths, exchange_supported
from milsurgery.lock import PackageLockedError, edit_lock
from milsurgery.package import PARTIAL_MARKER
from milsurgery.synth import build_llm_like
from test_malformed import snapshot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT)
TIMEOUT = 120
N_APPENDS = 4
ROUNDS = 2

pytestmark = pytest.mark.skipif(not exchange_supported(), reason="needs an atomic directory exchange")


def cli(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "milsurgery", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    try:
        _out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail(f"{proc.args} still running after {TIMEOUT} s (deadlock?)")
    return proc.returncode, err


@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    """A base package (function main) and N_APPENDS sources with different weights."""
    d = tmp_path_factory.mktemp("races")
    base = str(d / "base.mlpackage")
    build_llm_like(base, seq_lens=1, hidden=256, layers=4, seed=100)
    sources = []
    for i in range(N_APPENDS):
        path = str(d / f"src{i}.mlpackage")
        build_llm_like(path, seq_lens=2, hidden=256, layers=4, seed=i)
        sources.append(path)
    return base, sources


def test_concurrent_appends_and_shrinks_end_consistent(packages, tmp_path):
    base, sources = packages
    target = str(tmp_path / "t.mlpackage")
    shutil.copytree(base, target)
    expected = {"main": (base, "main")}
    for rnd in range(ROUNDS):
        stop = threading.Event()
        reader_errors: list[str] = []
        opened = [0]

        def reader():
            while not stop.is_set():
                try:
                    with open_package(target) as pkg:
                        assert "main" in pkg.functions
                    opened[0] += 1
                except Exception as exc:  # any failure is what this test looks for
                    reader_errors.append(f"{type(exc).__name__}: {exc}")

        thread = threading.Thread(target=reader)
        thread.start()
        try:
            procs = {}
            for i, src in enumerate(sources):
                procs[f"r{rnd}_{i}"] = cli("append", target, f"{src}:main=r{rnd}_{i}")
            shrink = cli("shrink", "--in-place", target)
            results = {name: finish(p) for name, p in procs.items()}
            shrink_rc, shrink_err = finish(shrink)
        finally:
            stop.set()
            thread.join(TIMEOUT)
        assert shrink_rc == 0, shrink_err
        for name, (rc, err) in results.items():
            assert rc == 0, (name, err)  # a second editor waits; it is not refused
            expected[name] = (sources[int(name.split("_")[1])], "main")
        assert reader_errors == [], reader_errors[:3]
        assert opened[0] > 0

        with open_package(target) as pkg:  # opens and validates every reference
            assert sorted(pkg.functions) == sorted(expected)
        report = verify(target, [f"{src}:{fn}={name}" for name, (src, fn) in expected.items()])
        assert report.equivalent, report.summary()
        assert not [n for n in os.listdir(tmp_path) if PARTIAL_MARKER in n or "milsurgery-" in n]
    for name, (src, fn) in expected.items():  # independent of milsurgery's reader
        assert_function_equivalent(target, name, src, fn)
    assert ct_read_referenced_blobs(target) > 0  # coremltools' C++ reader agrees on every blob


def _hold_lock(path: str) -> subprocess.Popen:
    """A child holding the package's edit lock until its stdin is closed."""
    code = (
        "import sys\nfrom milsurgery.lock import edit_lock\n"
        f"with edit_lock({path!r}):\n    print('locked', flush=True)\n    sys.stdin.read()\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=ENV)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_editor_that_does_not_wait_is_refused_and_a_killed_holder_leaves_no_lock(packages, tmp_path):
    base, _sources = packages
    target = str(tmp_path / "t.mlpackage")
    shutil.copytree(base, target)
    holder = _hold_lock(target)
    try:
        with pytest.raises(PackageLockedError, match="another process is editing"):
            with edit_lock(target, wait=False):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(TIMEOUT)
    with edit_lock(target, wait=False) as real:  # the kernel dropped the dead holder's lock
        assert real == os.path.realpath(target)


def test_waiting_editor_follows_an_exchanged_directory(packages, tmp_path):
    base, sources = packages
    target = str(tmp_path / "t.mlpackage")
    replacement = str(tmp_path / "replacement.mlpackage")
    shutil.copytree(base, target)
    shutil.copytree(base, replacement)
    holder = _hold_lock(target)
    try:
        waiting = cli("append", target, f"{sources[0]}:main=late")
        time.sleep(1.0)  # let it start and block on the lock
        assert waiting.poll() is None, waiting.communicate()
        exchange_paths(replacement, target)  # as shrink --in-place does while it holds the lock
        old = snapshot(replacement)  # the directory the waiter first locked, now moved aside
    finally:
        holder.stdin.close()
        holder.wait(TIMEOUT)
    rc, err = finish(waiting)
    assert rc == 0, err
    with open_package(target) as pkg:
        assert pkg.functions == ["main", "late"]
    assert snapshot(replacement) == old  # the old directory was not edited
    assert_function_equivalent(target, "late", sources[0], "main")


def test_cli_no_wait_is_refused_with_one_line_and_the_package_untouched(packages, tmp_path):
    base, sources = packages
    target = str(tmp_path / "t.mlpackage")
    shutil.copytree(base, target)
    before = snapshot(target)
    holder = _hold_lock(target)
    try:
        for argv in (["append", "--no-wait", target, f"{sources[0]}:main=x"], ["shrink", "--in-place", "--no-wait", target]):
            rc, err = finish(cli(*argv))
            assert rc == 2, err
            assert err.count("\n") == 1 and err.startswith("milsurgery: error: ") and "another process is editing" in err
    finally:
        holder.stdin.close()
        holder.wait(TIMEOUT)
    assert snapshot(target) == before


def test_force_replacement_waits_for_an_in_place_edit(packages, tmp_path):
    base, sources = packages
    target = str(tmp_path / "t.mlpackage")
    shutil.copytree(base, target)
    holder = _hold_lock(target)
    try:
        replacing = cli("merge", "--force", "--quiet", "-o", target, f"{sources[1]}:main=other")
        time.sleep(1.5)  # it builds the new package, then waits for the lock to rename it in
        assert replacing.poll() is None, replacing.communicate()
        with open_package(target) as pkg:
            assert pkg.functions == ["main"]  # not replaced while the edit is under way
    finally:
        holder.stdin.close()
        holder.wait(TIMEOUT)
    rc, err = finish(replacing)
    assert rc == 0, err
    with open_package(target) as pkg:
        assert pkg.functions == ["other"]
    assert sorted(os.listdir(tmp_path)) == ["t.mlpackage"]
