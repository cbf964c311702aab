"""``show``: a model's program as text, in the syntax Core ML's compiler writes to model.mil.

Works on a ``.mlpackage`` or a compiled ``.mlmodelc``. Opening reads the spec (or model.mil) and
the 64-byte blob records; printing reads nothing more: blob values print as references
(``BLOBFILE(path = ..., offset = ...)``), so memory does not grow with the weights' size.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from .compiled import open_model
from .errors import UsageError
from .miltext import print_program

__all__ = ["show"]


def show(
    path: str | os.PathLike,
    functions: Sequence[str] | None = None,
    *,
    ops: Sequence[str] | None = None,
    values: bool = True,
) -> str:
    """The program of ``path`` as model.mil text.

    ``functions`` limits it to those functions (an unknown name is a :class:`UsageError`);
    ``ops`` to ops of those types (ops holding nested blocks stay, so the nesting shows);
    ``values=False`` elides immediates of more than 16 elements.
    """
    with open_model(path) as pkg:
        wanted = list(functions) if functions else None
        for name in wanted or []:
            if name not in pkg.functions:
                raise UsageError(f"{pkg.path}: no function {name!r} (it has {pkg.functions})")
        return print_program(pkg.model, functions=wanted, ops=set(ops) if ops else None, values=values)
