"""Every command the README shows is executed here, so the documentation cannot rot.

How the README is read:

- ```` ```sh ```` blocks hold commands, one per line (a trailing ``# ...`` is a comment; ``# exit
  N`` says the command is expected to exit with N instead of 0). ```` ```python ```` blocks are
  run as scripts. ```` ```text ```` blocks (synopses) and untagged blocks (sample output) are not
  run.
- Commands run in README order, in one directory, through ``bash``, with ``milsurgery``,
  ``python`` and ``python3`` on ``PATH`` running this checkout; so a later command can use what an
  earlier one wrote (``llm.mlpackage`` from recipe 1 is inspected in recipe 3).
- The directory starts with the input packages the README names, built by :data:`FIXTURES`.
  A README example that needs a new input name adds one entry there.
- Installation commands (``pip install``, ``python3 -m venv``) are not run, except what follows
  them on the line (``... && .venv/bin/python -m milsurgery.demo`` runs the demo); the test
  command block is what CI runs. Benchmark commands are run by their own tests on small sizes:
  :data:`COVERED_ELSEWHERE` names the test file for each script, and this test checks that it
  exists.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")

#: bench scripts shown in the README -> the test that runs them (on small inputs).
COVERED_ELSEWHERE = {
    "bench/merge_bench.py": "tests/test_merge_bench.py",
    "bench/make_experiments.py": "tests/test_make_experiments.py",
    "bench/load_memory.py": "tests/test_load_memory_harness.py",
    "bench/scale_bench.py": "tests/test_hostile.py",
    "bench/show_bench.py": "tests/test_bench_smoke.py",
    "bench/compress_bench.py": "tests/test_bench_smoke.py",
    "bench/adopt_bench.py": "tests/test_bench_smoke.py",
}

#: bench scripts shown in the README that no test runs yet, with the reason; each is a gap.
NOT_RUN = {
}


def _llm(seq_len: int, seed: int = 0):
    def build(path: str, _work: str) -> None:
        import ct_models

        ct_models.llm_like(path, seq_len=seq_len, seed=seed)

    return build


def _combined(path: str, work: str) -> None:
    """What coremltools' save_multifunction writes for infer and prefill."""
    import ct_models

    ct_models.multifunction(path, {
        "infer": (os.path.join(work, "infer.mlpackage"), "main"),
        "prefill": (os.path.join(work, "prefill.mlpackage"), "main"),
    })


#: Input packages the README's commands name, built in this order before they run.
FIXTURES = {
    "infer.mlpackage": _llm(seq_len=1),
    "prefill.mlpackage": _llm(seq_len=64),
    "adapter.mlpackage": _llm(seq_len=1, seed=1),
    "combined.mlpackage": _combined,
}


def readme_blocks(text: str) -> list[tuple[str, str, int]]:
    """(language, body, line number of the opening fence) of every fenced block."""
    blocks, lang, body, start = [], None, [], 0
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            if lang is None:
                lang, body, start = line[3:].strip(), [], number
            else:
                blocks.append((lang, "\n".join(body), start))
                lang = None
        elif lang is not None:
            body.append(line)
    return blocks


def plan(text: str) -> list[tuple[str, str, int, int]]:
    """(kind "sh" or "python", code, expected exit status, README line) of everything to run;
    raises AssertionError for an sh line this test does not know how to treat."""
    steps = []
    test_command = text.split("<!-- test-command -->", 1)[1].split("```sh\n", 1)[1].split("\n```", 1)[0].strip()
    for lang, body, start in readme_blocks(text):
        if lang == "python":
            steps.append(("python", body, 0, start))
            continue
        if lang != "sh":
            continue
        for offset, line in enumerate(body.splitlines(), 1):
            command, _, comment = line.partition("  #")
            command = command.strip()
            if not command or line.strip() == test_command:
                continue
            expect = re.match(r"\s*exit (\d+)", comment)
            if "pip install" in command or command.startswith("python3 -m venv"):
                runnable = [p.strip() for p in command.split("&&") if "pip install" not in p and "-m venv" not in p]
                if not runnable:
                    continue
                command = " && ".join(runnable)
            scripts = [s for s in (*COVERED_ELSEWHERE, *NOT_RUN) if s in command]
            if scripts:
                continue
            command = command.replace(".venv/bin/python", "python")
            assert command.split()[0] in ("milsurgery", "python", "python3"), f"README line {start + offset}: {command}"
            steps.append(("sh", command, int(expect.group(1)) if expect else 0, start + offset))
    return steps


def test_readme_lists_only_known_commands():
    with open(README) as f:
        text = f.read()
    steps = plan(text)
    assert any(code.startswith("milsurgery merge") for kind, code, _, _ in steps)
    assert any(kind == "python" for kind, _, _, _ in steps)
    for script, test in COVERED_ELSEWHERE.items():
        if script in text:
            assert os.path.isfile(os.path.join(ROOT, test)), f"{script} is shown in the README; {test} should run it"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    pytest.importorskip("coremltools")
    work = tmp_path_factory.mktemp("readme")
    bin_dir = work / ".bin"
    bin_dir.mkdir()
    for name, module in (("milsurgery", " -m milsurgery"), ("python", ""), ("python3", "")):
        shim = bin_dir / name
        shim.write_text(f'#!/bin/sh\nexec "{sys.executable}"{module} "$@"\n')
        shim.chmod(shim.stat().st_mode | stat.S_IXUSR)
    for name, build in FIXTURES.items():
        build(str(work / name), str(work))
    return work


def test_every_readme_command_runs(workdir):
    with open(README) as f:
        steps = plan(f.read())
    env = dict(
        os.environ,
        PATH=f"{workdir / '.bin'}{os.pathsep}{os.environ['PATH']}",
        PYTHONPATH=ROOT + os.pathsep + os.path.join(ROOT, "tests"),
    )
    timings = []
    for kind, code, expect, line in steps:
        started = time.perf_counter()
        if kind == "python":
            argv = [sys.executable, "-c", code]
        else:
            argv = ["bash", "-euo", "pipefail", "-c", code]
        run = subprocess.run(argv, cwd=workdir, env=env, capture_output=True, text=True)
        assert run.returncode == expect, (
            f"README line {line}: {code}\nexit {run.returncode} (expected {expect})\n{run.stdout[-2000:]}{run.stderr[-2000:]}"
        )
        assert "Traceback" not in run.stderr, f"README line {line}: {code}\n{run.stderr}"
        timings.append((time.perf_counter() - started, line))
    print("slowest README steps (s, line):", sorted(timings, reverse=True)[:5])
    # Everything the commands wrote opens with coremltools' loader and its C++ blob reader.
    import checks

    written = sorted(p for p in os.listdir(workdir) if p.endswith(".mlpackage") and p not in FIXTURES)
    assert {"llm.mlpackage", "combined-small.mlpackage", "llm-from-script.mlpackage"} <= set(written)
    for name in written:
        pkg = str(workdir / name)
        assert checks.ct_load_program(pkg).functions, name
        assert checks.ct_read_referenced_blobs(pkg) > 0, name


def test_plan_reads_expected_exit_status_and_refuses_unknown_lines():
    text = (
        "<!-- test-command -->\n```sh\npython3 -m venv .venv && .venv/bin/python -m pytest -q\n```\n"
        "```sh\nmilsurgery diff a.mlpackage b.mlpackage  # exit 1\nmilsurgery inspect a.mlpackage  # a comment\n```\n"
        "```text\nmilsurgery inspect PKG [--json]\n```\n"
    )
    assert [(kind, code, expect) for kind, code, expect, _ in plan(text)] == [
        ("sh", "milsurgery diff a.mlpackage b.mlpackage", 1),
        ("sh", "milsurgery inspect a.mlpackage", 0),
    ]
    with pytest.raises(AssertionError, match="README line 13: rm -rf x"):
        plan(text + "```sh\nrm -rf x\n```\n")
