"""The public Python API: every CLI command has a function of the same name in the facade."""

from __future__ import annotations

import milsurgery
from milsurgery.cli import build_parser


def test_every_command_is_a_public_function():
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    names = {"inspect": "inspect_package"}
    for command in commands:
        name = names.get(command, command)
        assert name in milsurgery.__all__, command
        assert callable(getattr(milsurgery, name)), command


def test_all_names_exist():
    assert sorted(set(milsurgery.__all__) - set(dir(milsurgery))) == []
