"""A drop-in for ``coremltools.utils.save_multifunction``: same call, milsurgery's merge.

A script that builds a ``coremltools.utils.MultiFunctionDescriptor`` (``add_function(model_path,
src_function_name, target_function_name)``, ``add_model(model_path)``, ``default_function_name``)
switches by calling :func:`save_multifunction` from here instead. The package is written by
:func:`milsurgery.merge.merge`: weights are copied file to file (never loaded into Python memory),
identical blobs are stored once (compared byte by byte), graphs and metadata are kept.

Without coremltools, :class:`MultiFunctionDescriptor` here keeps the same bookkeeping, reading
only each package's spec to list its functions.
"""

from __future__ import annotations

import os

from .assemble import Progress, WriteReport
from .errors import UsageError
from .merge import SourceSpec, check_function_name, merge
from .package import Package, package_path

__all__ = ["MultiFunctionDescriptor", "save_multifunction"]


class MultiFunctionDescriptor:
    """The functions of a multi-function package to build, as coremltools' class of that name.

    ``add_function`` and ``add_model`` open the package to check it (reading its spec and blob
    records, no weight bytes), as coremltools' does.
    """

    def __init__(self, model_path: str | os.PathLike | None = None):
        self.default_function_name: str | None = None
        self._name_to_source_function: dict[str, tuple[str, str]] = {}
        if model_path is not None:
            self.add_model(model_path)

    @staticmethod
    def _functions_of(model_path) -> list[str]:
        with Package(model_path) as pkg:
            return list(pkg.functions)

    def _functions(self) -> dict[str, tuple[str, str]]:
        """target name -> (package path, source function), in the order they were added."""
        return dict(self._name_to_source_function)

    def add_function(self, model_path, src_function_name: str, target_function_name: str) -> None:
        path = package_path(model_path)
        if src_function_name not in self._functions_of(path):
            raise UsageError(f"{path}: no function {src_function_name!r}")
        check_function_name(target_function_name)
        if target_function_name in self._name_to_source_function:
            raise UsageError(f"function {target_function_name!r} was already added")
        self._name_to_source_function[target_function_name] = (path, src_function_name)

    def add_model(self, model_path) -> None:
        for name in self._functions_of(model_path):
            self.add_function(model_path, name, name)

    def remove_function(self, function_name: str) -> None:
        if function_name not in self._name_to_source_function:
            raise UsageError(f"no function {function_name!r} was added")
        del self._name_to_source_function[function_name]


def _entries(desc) -> list[tuple[str, str, str]]:
    """(package path, source function, target name) for each function of ``desc``, in order."""
    table = desc._functions() if callable(getattr(desc, "_functions", None)) else getattr(desc, "_name_to_source_function", None)
    if not isinstance(table, dict):
        raise UsageError(
            f"{type(desc).__name__} is not a MultiFunctionDescriptor (coremltools' or milsurgery.coreml's)"
        )
    return [(package_path(src[0]), src[1], target) for target, src in table.items()]


def save_multifunction(
    desc,
    destination_path: str | os.PathLike,
    *,
    force: bool = True,
    verify: bool = False,
    sync: bool = True,
    progress: Progress | None = None,
) -> WriteReport:
    """Write the multi-function package ``desc`` describes to ``destination_path``.

    ``desc`` is a ``coremltools.utils.MultiFunctionDescriptor`` or this module's; its
    ``default_function_name`` must be set, as coremltools requires. Like coremltools, an existing
    ``destination_path`` is replaced (atomically; ``force=False`` refuses instead). Costs what
    :func:`milsurgery.merge.merge` costs: weight bytes are copied file to file, read once more
    only to compare blobs that may be identical. Returns merge's report.
    """
    entries = _entries(desc)
    if not entries:
        raise UsageError("the MultiFunctionDescriptor has no function")
    default = getattr(desc, "default_function_name", None)
    if default is None:
        raise UsageError("default_function_name must be set on the MultiFunctionDescriptor before saving it")
    if default not in [target for _, _, target in entries]:
        raise UsageError(
            f"default_function_name {default!r} is not one of the functions {[t for _, _, t in entries]}"
        )
    sources = [SourceSpec(path, src, target) for path, src, target in entries]
    return merge(sources, destination_path, default=default, force=force, verify=verify, sync=sync, progress=progress)
