"""The public Python API: every CLI command has a function of the same name in the facade."""

from __future__ import annotations

import os

import milsurgery
from milsurgery.cli import build_parser


def test_every_command_is_a_public_function():
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    for command in commands:
        assert command in milsurgery.__all__, command
        assert callable(getattr(milsurgery, command)), command


def test_inspect_is_the_function_and_still_the_module(tmp_path):
    """``milsurgery.inspect(path)`` is ``inspect_package(path)``; ``import milsurgery.inspect``
    still gives the module with its helpers."""
    import importlib

    import numpy as np

    import minipkg

    pkg = minipkg.make(tmp_path / "a.mlpackage", {"main": [("float16", np.ones((4, 4), np.float16))]})
    module = importlib.import_module("milsurgery.inspect")
    assert milsurgery.inspect is module and callable(module.render_text)
    assert milsurgery.inspect(pkg) == milsurgery.inspect_package(pkg)
    assert milsurgery.inspect(pkg)["functions"][0]["name"] == "main"


def test_all_names_exist():
    assert sorted(set(milsurgery.__all__) - set(dir(milsurgery))) == []


def test_the_weight_path_does_not_import_numpy(tmp_path):
    """Opening, merging (compare and copy) and inspecting never need numpy: it is imported only
    where values are encoded or decoded, so it does not add to every command's start-up time."""
    import subprocess
    import sys

    import numpy as np

    import minipkg

    w = np.arange(4096, dtype=np.float16).reshape(64, 64)
    a = minipkg.make(tmp_path / "a.mlpackage", {"main": [("float16", w), ("float16", w + 1)]})
    b = minipkg.make(tmp_path / "b.mlpackage", {"main": [("float16", w), ("float16", w + 2)]})
    code = (
        "import sys\n"
        "from milsurgery.cli import main\n"
        "assert main(['merge', '-o', sys.argv[3], '--quiet', sys.argv[1] + ':main=x', sys.argv[2] + ':main=y']) == 0\n"
        "assert main(['inspect', sys.argv[3]]) == 0\n"
        "print('numpy' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, a, b, str(tmp_path / "out.mlpackage")], capture_output=True, text=True, check=True
    )
    assert done.stdout.strip().splitlines()[-1] == "False"
    assert os.path.isdir(tmp_path / "out.mlpackage")
