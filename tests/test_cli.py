"""The command line's shape and wording: help, version, mistyped commands, --debug anywhere,
option order, completion, progress, summaries, and the rough edges a first user meets.

Packages are written by milsurgery.synth (no coremltools needed); sizes and file contents in
summaries are checked against the files on disk.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys

import pytest

import milsurgery
from milsurgery.cli import ProgressBar, build_parser, human_bytes, main
from milsurgery.errors import DestinationExistsError, UsageError
from milsurgery.synth import build_llm_like

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args, cwd=None, stdin=None):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "milsurgery", *args], capture_output=True, text=True, env=env, cwd=cwd)


@pytest.fixture(scope="module")
def pkgs(tmp_path_factory):
    """infer (seq 1) and prefill (seq 4) from the same weights, other (different weights), and
    llm: infer and prefill merged."""
    d = tmp_path_factory.mktemp("cli")
    paths = {name: str(d / f"{name}.mlpackage") for name in ("infer", "prefill", "other", "llm")}
    build_llm_like(paths["infer"], seq_lens=1, hidden=64, layers=2, seed=0)
    build_llm_like(paths["prefill"], seq_lens=4, hidden=64, layers=2, seed=0)
    build_llm_like(paths["other"], seq_lens=1, hidden=64, layers=2, seed=7)
    milsurgery.merge([f"{paths['infer']}:main=infer", f"{paths['prefill']}:main=prefill"], paths["llm"])
    return paths


def _subparsers(parser):
    return next(a for a in parser._actions if a.dest == "command").choices


# -- help, version, command names ---------------------------------------------------------------

def test_bare_command_prints_help():
    r = run()
    assert r.returncode == 0 and r.stderr == ""
    assert r.stdout.startswith("usage: milsurgery")
    for command in _subparsers(build_parser()):
        assert f"    {command} " in r.stdout, command


def test_version_short_and_long():
    short, long = run("-V"), run("--version")
    assert short.returncode == long.returncode == 0
    assert short.stdout == long.stdout == f"milsurgery {milsurgery.__version__}\n"


def test_mistyped_command_suggests_the_closest():
    r = run("mrege", "-o", "x.mlpackage", "a.mlpackage")
    assert r.returncode == 2
    assert r.stderr.splitlines()[-1].startswith("milsurgery: error: unknown command 'mrege' (did you mean 'merge'")
    r = run("zzzz")
    assert r.returncode == 2 and "did you mean" not in r.stderr and "commands: inspect, merge" in r.stderr


def test_every_command_option_and_argument_has_help_and_examples():
    how = "create it with cli.add_command(sub, name, summary, description, examples)"
    for name, sub in _subparsers(build_parser()).items():
        assert sub.description, f"command {name!r} has no description: {how}"
        assert sub.epilog and sub.epilog.startswith("examples:\n  milsurgery " + name), f"command {name!r} has no examples: {how}"
        for action in sub._actions:
            assert action.help, f"{name}: argument {action.dest!r} has no help text"
        for line in sub.epilog.splitlines()[1:]:  # every example parses
            words = line.split("#")[0].split()[1:]
            words = [w for w in words if w != ">" and not w.endswith((".bash", "_milsurgery"))]
            build_parser().parse_args(words)


def test_debug_is_accepted_anywhere(tmp_path):
    missing = str(tmp_path / "missing.mlpackage")
    plain = run("inspect", missing)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr and plain.stderr.count("\n") == 1
    for argv in (["--debug", "inspect", missing], ["inspect", "--debug", missing], ["inspect", missing, "--debug"]):
        r = run(*argv)
        assert r.returncode == 2 and "Traceback" in r.stderr, argv
        assert r.stderr.splitlines()[-1].startswith("milsurgery: error: ") and "missing.mlpackage" in r.stderr


def test_verify_takes_against_before_the_package(pkgs, capsys):
    against = [f"{pkgs['infer']}:main=infer", f"{pkgs['prefill']}:main=prefill"]
    assert main(["verify", pkgs["llm"], "--against", *against]) == 0
    first = capsys.readouterr().out
    assert main(["verify", "--against", *against, pkgs["llm"]]) == 0
    assert capsys.readouterr().out == first
    assert "infer: equivalent to " in first and "prefill: equivalent to " in first
    assert main(["verify", "--against", against[0]]) == 2
    assert "verify needs PKG" in capsys.readouterr().err


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_scripts(shell, tmp_path):
    pytest.importorskip("shtab")
    r = run("completion", shell)
    assert r.returncode == 0, r.stderr
    assert r.stdout == milsurgery.completion(shell)
    for command in _subparsers(build_parser()):
        assert command in r.stdout
    assert "against" in r.stdout and "no-duplicates" in r.stdout
    checker = shutil.which(shell)
    if checker:  # the shell itself parses the script without running it
        script = tmp_path / f"completion.{shell}"
        script.write_text(r.stdout)
        check = subprocess.run([checker, "-n", str(script)], capture_output=True, text=True)
        assert check.returncode == 0, check.stderr


def test_completion_of_an_unknown_shell():
    with pytest.raises(UsageError, match="no completion for shell 'tcsh'"):
        milsurgery.completion("tcsh")


# -- progress -----------------------------------------------------------------------------------

def test_progress_bar_figures_agree_with_its_percentage(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    stream = Tty()
    monkeypatch.setattr(sys, "stderr", stream)
    bar = ProgressBar(enabled=True)
    bar("copying", 512 * 2**20, 512 * 2**20)
    assert "100.0%" in stream.getvalue() and "512.0 MiB of 512.0 MiB" in stream.getvalue()


def test_verify_reports_progress_up_to_the_bytes_compared(pkgs):
    calls = []
    report = milsurgery.verify(pkgs["llm"], [f"{pkgs['infer']}:main=infer", f"{pkgs['prefill']}:main=prefill"],
                               progress=lambda phase, done, total: calls.append((phase, done, total)))
    compared = sum(c.bytes_compared for c in report.checks)
    assert calls and {p for p, _, _ in calls} == {"verifying"}
    assert calls[-1][1] == calls[-1][2] == compared > 0
    assert all(b[1] >= a[1] for a, b in zip(calls, calls[1:]))


def test_no_progress_off_a_tty(pkgs):
    r = run("verify", pkgs["llm"], "--against", f"{pkgs['infer']}:main=infer")
    assert r.returncode == 0 and r.stderr == ""


# -- summaries ----------------------------------------------------------------------------------

def _weight_bin(pkg):
    return os.path.join(pkg, "Data", "com.apple.CoreML", "weights", "weight.bin")


def test_human_bytes():
    assert [human_bytes(n) for n in (0, 1023, 1024, 977_168, 3 * 2**30)] == ["0 B", "1023 B", "1.0 KiB", "954.3 KiB", "3.0 GiB"]


def test_merge_summary_in_human_units_and_says_it_verified(pkgs, tmp_path):
    out = str(tmp_path / "m.mlpackage")
    r = run("merge", "-o", out, f"{pkgs['infer']}:main=infer", f"{pkgs['prefill']}:main=prefill", "--verify")
    assert r.returncode == 0, r.stderr
    size = os.path.getsize(_weight_bin(out))
    assert f"weight.bin {human_bytes(size)}: " in r.stdout and f"{size} bytes" not in r.stdout
    assert "verified: " in r.stdout and "2 functions equivalent to their sources" in r.stdout
    r = run("merge", "-o", str(tmp_path / "j.mlpackage"), f"{pkgs['infer']}:main=infer", f"{pkgs['prefill']}:main=prefill",
            "--verify", "--json")
    report = json.loads(r.stdout)
    assert report["bytes_written"] == report["weight_file_bytes"] == os.path.getsize(_weight_bin(str(tmp_path / "j.mlpackage")))
    assert report["verified"]["equivalent"] is True and len(report["verified"]["functions"]) == 2
    r = run("merge", "-o", str(tmp_path / "n.mlpackage"), f"{pkgs['infer']}:main=infer", "--json")
    assert json.loads(r.stdout)["verified"] is None  # not asked for: not claimed


def test_append_summary_says_what_was_appended_and_the_file_size(pkgs, tmp_path):
    pkg = str(tmp_path / "llm.mlpackage")
    shutil.copytree(pkgs["llm"], pkg)
    before = os.path.getsize(_weight_bin(pkg))
    r = run("append", pkg, f"{pkgs['infer']}:main=again")  # every blob is already there
    assert r.returncode == 0, r.stderr
    assert os.path.getsize(_weight_bin(pkg)) == before
    assert r.stdout.startswith(f"appended to {pkg}: 3 functions infer, prefill, again")
    assert f"weight.bin now {human_bytes(before)}: appended 0 blobs (0 B); 4 already stored (identical bytes), not written again" in r.stdout
    r = run("append", pkg, f"{pkgs['other']}:main=other", "--json")
    report = json.loads(r.stdout)
    after = os.path.getsize(_weight_bin(pkg))
    assert report["weight_file_bytes"] == after and report["bytes_written"] > 0 and after > before


def test_verify_names_the_input_that_differs(pkgs, capsys):
    # llm's prefill takes x of shape [1, 4, 64]; infer's source takes [1, 1, 64].
    report = milsurgery.verify(pkgs["llm"], [f"{pkgs['infer']}:main=prefill"])
    diffs = report.checks[0].differences
    assert "input 'x': multiArrayType fp16 [1, 4, 64] here, multiArrayType fp16 [1, 1, 64] in the source" in diffs
    assert main(["verify", pkgs["llm"], "--against", f"{pkgs['infer']}:main=prefill"]) == 1
    out = capsys.readouterr().out
    assert f"prefill: differs from {pkgs['infer']}:main" in out and "DIFFERS" not in out


def test_summaries_count_in_words():
    from milsurgery.verify import FunctionCheck, VerifyReport

    one = VerifyReport("p.mlpackage", [FunctionCheck("f", "s.mlpackage:main")])
    assert one.summary() == "p.mlpackage: 1 function equivalent to its source"


# -- names, outputs, errors ---------------------------------------------------------------------

@pytest.mark.parametrize("bad", ["bad name", "1st", "a-b", "é", ""])
def test_function_names_must_be_mil_identifiers(pkgs, tmp_path, bad, capsys):
    out = str(tmp_path / "r.mlpackage")
    with pytest.raises(UsageError, match="is not a MIL identifier"):
        milsurgery.rename(pkgs["llm"], {"infer": bad}, out)
    if bad:
        with pytest.raises(UsageError, match="is not a MIL identifier"):
            milsurgery.merge([f"{pkgs['infer']}:main={bad}"], out)
        with pytest.raises(UsageError, match="is not a MIL identifier"):
            milsurgery.extract(pkgs["llm"], [f"infer={bad}"], out)
        assert main(["rename", pkgs["llm"], f"infer={bad}", "-o", out]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"function name {bad!r} is not a MIL identifier" in err
    assert not os.path.exists(out)
    assert milsurgery.rename(pkgs["llm"], {"infer": "_decode2"}, out).functions == ["_decode2", "prefill"]


def test_output_without_mlpackage_suffix_warns(pkgs, tmp_path):
    r = run("extract", pkgs["llm"], "infer", "-o", str(tmp_path / "infer-only"))
    assert r.returncode == 0
    assert "infer-only does not end in .mlpackage" in r.stderr and r.stderr.startswith("milsurgery: warning: ")
    r = run("extract", pkgs["llm"], "infer", "-o", str(tmp_path / "ok.mlpackage"))
    assert r.returncode == 0 and r.stderr == ""


def test_python_errors_name_the_python_argument(pkgs, tmp_path):
    with pytest.raises(DestinationExistsError, match=r"force=True"):
        milsurgery.rename(pkgs["llm"], {"infer": "decode"}, pkgs["other"])
    with pytest.raises(UsageError, match=r"default="):
        milsurgery.remove(pkgs["llm"], ["infer"], str(tmp_path / "x.mlpackage"))
    with pytest.raises(UsageError, match=r"in_place=True"):
        milsurgery.shrink(pkgs["llm"])


# -- inspect ------------------------------------------------------------------------------------

def test_inspect_order_needs_memory(pkgs):
    r = run("inspect", pkgs["llm"], "--order", "prefill")
    assert r.returncode == 2 and "--order sets the load order of --memory" in r.stderr


def test_inspect_memory_order_keeps_functions_not_named(pkgs):
    r = run("inspect", pkgs["llm"], "--memory", "--order", "prefill", "--json")
    model = json.loads(r.stdout)["memory"]
    assert model["order"] == ["prefill", "infer"] and [f["name"] for f in model["functions"]] == ["prefill", "infer"]


def test_inspect_all_ops_lists_every_type(pkgs):
    info = milsurgery.inspect(pkgs["llm"])
    from milsurgery.inspect import render_text

    info["functions"][0]["op_types"] = {f"op{i}": 1 for i in range(11)}  # more than the 8 shown
    short, full = render_text(info), render_text(info, all_ops=True)
    assert "+3 more types (--all-ops lists them)" in short and "op10 1" not in short
    assert "op10 1" in full and "more types" not in full.split("function 'prefill'")[0]


def test_inspect_json_shapes_are_lists(pkgs):
    from milsurgery._proto import milsurgery_spec_pb2 as pb
    from milsurgery.inspect import feature_summary, shape_text

    info = json.loads(run("inspect", pkgs["llm"], "--json").stdout)
    assert info["schema"] == 2
    assert info["functions"][1]["inputs"][0]["shape"] == [1, 4, 64]
    fd = pb.FeatureDescription(name="ids")
    arr = fd.type.multiArrayType
    arr.dataType = 131104
    for lo, hi in ((1, 1), (1, 4096), (1, -1)):
        arr.shapeRange.sizeRanges.add(lowerBound=lo, upperBound=hi)
    f = feature_summary(fd)
    assert f["shape"] == [1, {"min": 1, "max": 4096}, {"min": 1, "max": None}]
    assert shape_text(f) == "[1, 1..4096, 1..inf]"


# -- demo ---------------------------------------------------------------------------------------

def test_demo_into_a_closed_pipe_and_keep(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    r = subprocess.run(f"{sys.executable} -m milsurgery.demo | head -1", shell=True, capture_output=True, text=True, env=env)
    assert r.returncode == 0 and "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr, r.stderr
    assert "temporary directory removed when the demo ends; --keep DIR keeps the packages" in r.stdout
    keep = tmp_path / "demo"
    r = subprocess.run([sys.executable, "-m", "milsurgery.demo", "--keep", str(keep)], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert milsurgery.verify(str(keep / "llm.mlpackage"), [f"{keep}/infer.mlpackage:main=infer", f"{keep}/prefill.mlpackage:main=prefill"]).equivalent


def test_merge_verify_reports_progress_of_both_phases(pkgs, tmp_path):
    calls = []
    milsurgery.merge([f"{pkgs['infer']}:main=infer", f"{pkgs['prefill']}:main=prefill"], str(tmp_path / "m.mlpackage"),
                     verify=True, progress=lambda phase, done, total: calls.append((phase, done, total)))
    phases = [p for p, _, _ in calls]
    assert phases[0] == "copying" and phases[-1] == "verifying" and set(phases) == {"copying", "verifying"}
    assert calls[-1][1] == calls[-1][2] > 0  # verification ends at 100%


def test_failed_command_with_odd_output_name_is_one_line(pkgs, tmp_path):
    r = run("merge", "-o", str(tmp_path / "out.bin"), f"{pkgs['infer']}:main=x", f"{pkgs['prefill']}:main=x")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "two functions" in r.stderr


def test_inspect_reports_progress_of_the_duplicate_search(tmp_path):
    import numpy as np

    import minipkg

    w = np.arange(4096, dtype=np.float16).reshape(64, 64)
    # three same-size blobs, two identical: the sampled pass sets the third aside, the two are compared
    pkg = minipkg.make(tmp_path / "d.mlpackage", {"main": [("float16", w), ("float16", w), ("float16", w + 1)]})
    calls = []
    info = milsurgery.inspect(pkg, progress=lambda phase, done, total: calls.append((phase, done, total)))
    assert info["duplicate_bytes"] == w.nbytes
    assert calls and calls[-1] == ("comparing", 2 * w.nbytes, 2 * w.nbytes)


def test_shrink_summary_says_what_it_recovered(tmp_path):
    import numpy as np

    import minipkg

    w = np.arange(4096, dtype=np.float16).reshape(64, 64)
    pkg = minipkg.make(tmp_path / "d.mlpackage", {"main": [("float16", w), ("float16", w)]}, extra_blobs=[("float16", w + 1)])
    before = os.path.getsize(_weight_bin(pkg))
    out = str(tmp_path / "s.mlpackage")
    r = run("shrink", pkg, "-o", out)
    assert r.returncode == 0, r.stderr
    after = os.path.getsize(_weight_bin(out))
    assert before - after == 2 * (64 + w.nbytes)  # one duplicate and one unreferenced record
    assert f"  weights {human_bytes(before)} before, {human_bytes(after)} after: {human_bytes(before - after)} recovered" in r.stdout
