"""``completion``: shell completion scripts generated from the command line parser.

Needs the optional ``shtab`` package (``pip install 'milsurgery[completion]'``). No file I/O.
"""

from __future__ import annotations

from .errors import UsageError

__all__ = ["completion", "SHELLS"]

SHELLS = ("bash", "zsh", "fish")


def completion(shell: str) -> str:
    """The completion script for ``shell`` (bash, zsh or fish) as text."""
    if shell not in SHELLS:
        raise UsageError(f"no completion for shell {shell!r} (one of {', '.join(SHELLS)})")
    try:
        import shtab
    except ImportError:
        raise UsageError("shell completion needs shtab: pip install 'milsurgery[completion]'") from None
    from .cli import build_parser

    return shtab.complete(build_parser(), shell=shell)
