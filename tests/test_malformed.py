"""Every command over every malformed package (tests/malformed.py).

For each case and command: the Python API raises the case's MilSurgeryError subclass; the CLI
exits 2 printing one line ``milsurgery: error: ...`` that names the faulty file and the offset or
field; no output (nor a temporary directory) is left; the malformed package and the good package
used alongside it are byte-identical afterwards.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from contextlib import contextmanager

import pytest

import malformed
from milsurgery import MilSurgeryError, open_package
from milsurgery.cli import main
from milsurgery.package import PARTIAL_MARKER


def snapshot(path: str) -> dict[str, tuple]:
    """Every directory, file, symlink and special file under ``path``: kind plus bytes, link
    target or mode (special files are never opened: a FIFO would block)."""
    out = {}
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            full = os.path.join(root, name)
            rel = os.path.relpath(full, path)
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(full))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir",)
            elif stat.S_ISREG(st.st_mode):
                with open(full, "rb") as f:
                    out[rel] = ("file", f.read())
            else:
                out[rel] = ("special", stat.S_IFMT(st.st_mode))
    return out


class TimeLimit(BaseException):
    """Raised in the test's own thread when a command runs past its time limit (a BaseException,
    so no ``except Exception`` or ``except OSError`` in the code under test can swallow it)."""


@contextmanager
def time_limit(seconds: int):
    """Interrupt the block after ``seconds`` (SIGALRM): a hang fails the test instead of the run."""

    def fire(signum, frame):
        raise TimeLimit(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("malformed")
    built = malformed.build(str(root / "corpus"))
    good = malformed.make_base(str(root / "good.mlpackage"))
    return {case.name: (case, path) for case, path in built}, good


def outside_of(corpus) -> str:
    """The scratch directory beside the corpus that symlinks of some cases point into."""
    cases, _good = corpus
    _case, path = next(iter(cases.values()))
    return os.path.join(os.path.dirname(path), ".outside")


CASES = [c.name for c in malformed.cases([64, 192, 320])]  # names only; offsets come from the base


def test_base_records_match_the_names_used_for_collection(tmp_path):
    base = malformed.make_base(str(tmp_path / "base.mlpackage"))
    assert malformed.base_records(base) == [64, 192, 320]
    with open_package(base) as pkg:  # the base itself is valid
        assert pkg.functions == ["a", "b"]


def test_corpus_is_large_and_names_are_unique():
    assert len(CASES) >= 35
    assert len(set(CASES)) == len(CASES)


@pytest.mark.parametrize("name", CASES)
def test_open_raises_the_precise_error(corpus, name):
    cases, _good = corpus
    case, path = cases[name]
    with pytest.raises(MilSurgeryError) as info, time_limit(30):
        open_package(path)
    assert isinstance(info.value, case.error), f"{type(info.value).__name__}: {info.value}"
    message = str(info.value)
    assert os.path.join(path, case.faulty) in message
    for fragment in case.expect:
        assert fragment in message


#: Each command with the malformed package in every role it can take (as the package operated on,
#: as a source, as a later source next to a good one). ``out`` is a path that must not appear.
COMMANDS = {
    "inspect": lambda bad, good, out: ["inspect", bad],
    "inspect-json-memory": lambda bad, good, out: ["inspect", "--json", "--memory", bad],
    "merge": lambda bad, good, out: ["merge", "-o", out, bad],
    "merge-second-source": lambda bad, good, out: ["merge", "--quiet", "-o", out, f"{good}:a=g", f"{bad}:a"],
    "merge-verify": lambda bad, good, out: ["merge", "--verify", "-o", out, f"{good}:a=g", bad],
    "shrink": lambda bad, good, out: ["shrink", bad, "-o", out],
    "shrink-in-place": lambda bad, good, out: ["shrink", bad, "--in-place"],
    "merge-adopt": lambda bad, good, out: ["merge", "--adopt", "--quiet", "-o", out, f"{good}:a=g", f"{bad}:a"],
    "shrink-adopt-dry-run": lambda bad, good, out: ["shrink", bad, "--adopt", "--dry-run"],
    "extract": lambda bad, good, out: ["extract", bad, "a", "-o", out],
    "extract-single": lambda bad, good, out: ["extract", bad, "b", "--single", "-o", out],
    "remove": lambda bad, good, out: ["remove", bad, "b", "-o", out],
    "rename": lambda bad, good, out: ["rename", bad, "a=c", "-o", out],
    "verify-package": lambda bad, good, out: ["verify", bad, "--against", good],
    "verify-source": lambda bad, good, out: ["verify", good, "--against", bad],
    "append-into": lambda bad, good, out: ["append", bad, f"{good}:a=g"],
    "append-from": lambda bad, good, out: ["append", good, f"{bad}:a=g"],
    "compress": lambda bad, good, out: ["compress", bad, "-o", out, "--palettize", "4", "--mode", "uniform", "--workers", "1"],
}


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("name", CASES)
def test_cli_fails_cleanly_and_touches_nothing(corpus, name, command, capsys):
    cases, good = corpus
    case, bad = cases[name]
    parent = os.path.dirname(bad)
    out = os.path.join(parent, f"out-{name}-{command}.mlpackage")
    outside = outside_of(corpus)
    before = {p: snapshot(p) for p in (bad, good, outside)}
    listing = sorted(os.listdir(parent)), sorted(os.listdir(os.path.dirname(good)))

    with time_limit(60):
        rc = main(COMMANDS[command](bad, good, out))

    captured = capsys.readouterr()
    assert rc == 2, captured.err
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("milsurgery: error: "), captured.err
    assert os.path.join(bad, case.faulty) in lines[0]
    for fragment in case.expect:
        assert fragment in lines[0]
    assert not os.path.lexists(out)
    assert (sorted(os.listdir(parent)), sorted(os.listdir(os.path.dirname(good)))) == listing
    assert not [n for n in listing[0] + listing[1] if PARTIAL_MARKER in n]
    assert {p: snapshot(p) for p in (bad, good, outside)} == before  # nothing outside was written either


@pytest.mark.parametrize("name", CASES)
def test_check_never_calls_a_malformed_package_valid(corpus, name, capsys):
    """``check`` exits 1 (a rule of Core ML's is broken) or 2 (one line naming the faulty file),
    never 0, and touches nothing."""
    cases, _good = corpus
    case, bad = cases[name]
    before = snapshot(bad)
    rc = main(["check", bad])
    captured = capsys.readouterr()
    assert rc in (1, 2), captured
    if rc == 2:
        lines = captured.err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("milsurgery: error: ") and os.path.join(bad, case.faulty) in lines[0]
    else:
        assert "violation" in captured.out
    assert snapshot(bad) == before


@pytest.mark.parametrize("name", ["weights-bad-sentinel-later", "manifest-not-json", "ref-symlink-out-of-package"])
def test_cli_process_exits_2_without_traceback(corpus, name):
    cases, good = corpus
    _case, bad = cases[name]
    proc = subprocess.run([sys.executable, "-m", "milsurgery", "merge", "-o", bad + ".out", good, bad],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert not os.path.lexists(bad + ".out")


def test_corpus_script_writes_every_case(tmp_path):
    proc = subprocess.run([sys.executable, malformed.__file__, str(tmp_path / "c")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    written = sorted(n[: -len(".mlpackage")] for n in os.listdir(tmp_path / "c") if not n.startswith("."))
    assert written == sorted(CASES)


# -- hostile part: special files in a child process, with a time limit and peak memory ------------
# Every command role of COMMANDS runs in one child process per case; a child that hangs is killed
# at the time limit, and one that tries to read without bound is stopped by an address-space
# limit (so a regression fails the test instead of exhausting the machine).
ROLES_CHILD = r"""
import contextlib, io, json, sys
sys.path.insert(0, sys.argv[1])
from test_malformed import COMMANDS
from milsurgery.cli import main

bad, good, out_dir = sys.argv[2:5]
results = {}
for command, argv in COMMANDS.items():
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(argv(bad, good, f"{out_dir}/out-{command}.mlpackage"))
    results[command] = [rc, err.getvalue()]
with open("/proc/self/status") as f:
    hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
print(json.dumps({"results": results, "vmhwm_kib": hwm}))
"""

CHILD_SECONDS = 90
CHILD_ADDRESS_SPACE = 4 << 30


def _limit_address_space():
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (CHILD_ADDRESS_SPACE, CHILD_ADDRESS_SPACE))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="peak RSS read from /proc")
@pytest.mark.parametrize("name", malformed.SPECIAL_FILE_CASES)
def test_special_files_every_role_bounded_in_time_and_memory(corpus, name, tmp_path):
    cases, good = corpus
    case, bad = cases[name]
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PYTHONPATH=os.path.dirname(tests_dir))
    proc = subprocess.run(
        [sys.executable, "-c", ROLES_CHILD, tests_dir, bad, good, str(tmp_path)],
        capture_output=True, text=True, timeout=CHILD_SECONDS, env=env, preexec_fn=_limit_address_space,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    for command, (rc, err) in report["results"].items():
        assert rc == 2, (command, err)
        line = err.strip()
        assert "\n" not in line and line.startswith("milsurgery: error: "), (command, err)
        assert os.path.join(bad, case.faulty) in line, (command, line)
        assert all(fragment in line for fragment in case.expect), (command, line)
    assert os.listdir(tmp_path) == []  # no output, no partial directory
    assert report["vmhwm_kib"] < 200 * 1024, report["vmhwm_kib"]  # the child's whole peak RSS


# -- hostile part: careless invocations ----------------------------------------------------------
@pytest.fixture(scope="module")
def base_package(tmp_path_factory):
    return malformed.make_base(str(tmp_path_factory.mktemp("hostile-base") / "base.mlpackage"))


def _run_in(cwd: str, argv: list[str], capsys) -> tuple[int, list[str]]:
    here = os.getcwd()
    os.chdir(cwd)
    try:
        with time_limit(60):
            rc = main(argv)
    finally:
        os.chdir(here)
    captured = capsys.readouterr()
    assert captured.out == ""
    return rc, captured.err.splitlines()


def _assert_refused(work, rc, lines, error, expect, before):
    assert rc == 2, lines
    assert len(lines) == 1 and lines[0].startswith("milsurgery: error: "), lines
    for fragment in expect:
        assert fragment in lines[0], lines[0]
    assert snapshot(work) == before  # sources, siblings, the working directory: all untouched
    leftovers = [r for r in before if PARTIAL_MARKER in r]
    assert leftovers == []


OUTPUT_CASES = {c.name: c for c in malformed.output_cases()}


@pytest.mark.parametrize("writer", list(malformed.WRITERS))
@pytest.mark.parametrize("name", list(OUTPUT_CASES))
def test_output_path_refused_by_every_writer(base_package, tmp_path, name, writer, capsys):
    case = OUTPUT_CASES[name]
    work = malformed.make_work(str(tmp_path / "work"), base_package)
    out, cwd = case.prepare(work)
    before = snapshot(work)
    rc, lines = _run_in(cwd, malformed.WRITERS[writer](malformed.work_source(work), out), capsys)
    _assert_refused(work, rc, lines, case.error, case.expect, before)
    with pytest.raises(case.error), time_limit(60):  # the Python API raises the same class
        here = os.getcwd()
        os.chdir(cwd)
        try:
            from milsurgery import merge

            merge([malformed.work_source(work)], out, force=True)
        finally:
            os.chdir(here)


INVOCATIONS = {c.name: c for c in malformed.invocations()}


@pytest.mark.parametrize("name", list(INVOCATIONS))
def test_hostile_invocation_fails_cleanly(base_package, tmp_path, name, capsys):
    case = INVOCATIONS[name]
    work = malformed.make_work(str(tmp_path / "work"), base_package)
    argv, cwd = case.argv(work)
    before = snapshot(work)
    rc, lines = _run_in(cwd, argv, capsys)
    _assert_refused(work, rc, lines, case.error, case.expect, before)


def test_non_utf8_name_in_a_real_command_line_exits_2_without_traceback(base_package, tmp_path):
    """The bytes b"\\xff" in argv, as a shell passes them (not a Python string)."""
    work = malformed.make_work(str(tmp_path / "work"), base_package)
    src = malformed.work_source(work)
    before = snapshot(work)
    argv = [os.fsencode(a) for a in (sys.executable, "-m", "milsurgery", "rename", src)]
    argv += [b"a=\xff", b"-o", os.fsencode(os.path.join(work, "out.mlpackage"))]
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run(argv, capture_output=True, timeout=120, env=env)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count(b"\n") == 1 and b"Traceback" not in proc.stderr
    assert b"not valid UTF-8" in proc.stderr
    assert snapshot(work) == before
