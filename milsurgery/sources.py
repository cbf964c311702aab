"""Source specs: ``PATH[:FUNC[=NEW]]`` arguments, parsed and opened into picks.

Used by every command that takes functions from other models (``merge``, ``append``, ``verify
--against``). A source is a ``.mlpackage`` or a compiled ``.mlmodelc`` (see
:func:`milsurgery.compiled.open_model`). Opening a source reads its spec and blob records only.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass

from .assemble import Pick
from .compiled import open_model
from .errors import UsageError
from .package import Package, package_path

__all__ = ["SourceSpec", "parse_source", "resolve_sources", "check_function_name"]

#: A MIL identifier, the form coremltools gives every function, op and variable name.
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def check_function_name(name: str) -> str:
    """Return ``name`` if it is a MIL identifier (a letter or ``_``, then letters, digits or ``_``);
    raise :class:`UsageError` naming it otherwise."""
    if isinstance(name, str):
        try:
            name.encode("utf-8")
        except UnicodeEncodeError as exc:  # undecodable bytes from a command line (lone surrogates)
            raise UsageError(f"function name {name!r} is not valid UTF-8 at character {exc.start}") from None
    if not isinstance(name, str) or not _IDENTIFIER.fullmatch(name):
        raise UsageError(
            f"function name {name!r} is not a MIL identifier (a letter or _, then letters, digits or _)"
        )
    return name


@dataclass(frozen=True)
class SourceSpec:
    """``PATH[:FUNC[=NEW]]``: a package, optionally one of its functions and a new name."""

    path: str
    function: str | None = None
    new_name: str | None = None

    def __str__(self) -> str:
        text = self.path
        if self.function is not None:
            text += f":{self.function}"
            if self.new_name is not None:
                text += f"={self.new_name}"
        return text


def parse_source(text: str | os.PathLike | SourceSpec) -> SourceSpec:
    """Parse ``PATH[:FUNC[=NEW]]``. A path that itself contains ``:`` is taken whole if it exists.

    Also takes a coremltools ``MLModel`` of a package (all its functions) and a tuple
    ``(path or MLModel, FUNC)`` or ``(path or MLModel, FUNC, NEW)``."""
    if isinstance(text, SourceSpec):
        return text
    if type(text).__name__ == "MLModel":  # a coremltools model: every function of its package
        return SourceSpec(package_path(text))
    if isinstance(text, tuple) and len(text) in (2, 3):  # (package or MLModel, FUNC[, NEW])
        return SourceSpec(package_path(text[0]), text[1], check_function_name(text[2]) if len(text) == 3 else None)
    text = os.fspath(text)
    if not isinstance(text, str) or not text:
        raise UsageError(f"source must be a non-empty path, got {text!r}")
    path, sep, func = text.rpartition(":")
    if "\x00" in (path if sep else text):
        raise UsageError(f"source {text!r}: a path cannot hold a NUL character")
    if not sep or os.path.exists(text) or not path:
        return SourceSpec(text)
    func, eq, new = func.partition("=")
    if not func or (eq and not new):
        raise UsageError(f"source {text!r}: expected PATH[:FUNC[=NEW]]")
    if eq:
        try:
            check_function_name(new)
        except UsageError as exc:
            raise UsageError(f"source {text!r}: {exc}") from None
    return SourceSpec(path, func, new if eq else None)


def resolve_sources(
    specs: Iterable[str | os.PathLike | SourceSpec], opened: dict[str, Package]
) -> list[Pick]:
    """Open each distinct source once (adding it to ``opened``) and list the picked functions."""
    picks: list[Pick] = []
    for spec in map(parse_source, specs):
        if spec.new_name is not None:
            check_function_name(spec.new_name)
        key = os.path.realpath(spec.path)
        pkg = opened.get(key)
        if pkg is None:
            pkg = opened[key] = open_model(spec.path)
        if spec.function is None:
            picks.extend(Pick(pkg, name, name) for name in pkg.functions)
        elif spec.function not in pkg.functions:
            raise UsageError(f"{pkg.path}: no function {spec.function!r} (it has {pkg.functions})")
        else:
            picks.append(Pick(pkg, spec.function, spec.new_name or spec.function))
    return picks
