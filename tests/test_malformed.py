"""Every command over every malformed package (tests/malformed.py).

For each case and command: the Python API raises the case's MilSurgeryError subclass; the CLI
exits 2 printing one line ``milsurgery: error: ...`` that names the faulty file and the offset or
field; no output (nor a temporary directory) is left; the malformed package and the good package
used alongside it are byte-identical afterwards.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import malformed
from milsurgery import MilSurgeryError, open_package
from milsurgery.cli import main
from milsurgery.package import PARTIAL_MARKER


def snapshot(path: str) -> dict[str, tuple]:
    """Every directory, file and symlink under ``path``: kind plus bytes or link target."""
    out = {}
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            full = os.path.join(root, name)
            rel = os.path.relpath(full, path)
            if os.path.islink(full):
                out[rel] = ("link", os.readlink(full))
            elif os.path.isdir(full):
                out[rel] = ("dir",)
            else:
                with open(full, "rb") as f:
                    out[rel] = ("file", f.read())
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("malformed")
    built = malformed.build(str(root / "corpus"))
    good = malformed.make_base(str(root / "good.mlpackage"))
    return {case.name: (case, path) for case, path in built}, good


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
    with pytest.raises(MilSurgeryError) as info:
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
    before = {p: snapshot(p) for p in (bad, good)}
    listing = sorted(os.listdir(parent)), sorted(os.listdir(os.path.dirname(good)))

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
    assert {p: snapshot(p) for p in (bad, good)} == before


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
