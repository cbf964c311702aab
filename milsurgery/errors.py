"""The exception hierarchy: every failure milsurgery reports derives from :class:`MilSurgeryError`.

Messages name the file, and where it applies the byte offset, the spec field or the function, so a
user can find the fault without a debugger. The CLI prints ``milsurgery: error: <message>`` and
exits 2 for any of them.
"""

from __future__ import annotations

import os

__all__ = [
    "MilSurgeryError",
    "FormatError",
    "BlobFileError",
    "SpecError",
    "ManifestError",
    "MilTextError",
    "PackageError",
    "UnsafePathError",
    "UsageError",
    "DestinationExistsError",
    "PackageLockedError",
    "WriteError",
    "InvalidModelError",
]


class MilSurgeryError(Exception):
    """Base class of every error milsurgery raises on purpose."""


class FormatError(MilSurgeryError):
    """A file does not follow the format it claims to be in."""

    def __init__(self, path: str | os.PathLike, message: str, offset: int | None = None):
        self.path = os.fspath(path)
        self.offset = offset
        where = self.path if offset is None else f"{self.path} at offset {offset}"
        super().__init__(f"{where}: {message}")


class BlobFileError(FormatError):
    """weight.bin (MIL blob storage) is malformed."""


class SpecError(FormatError):
    """model.mlmodel is malformed, not an ML program, or inconsistent with its weights."""


class ManifestError(FormatError):
    """Manifest.json is missing, malformed or points outside the package."""


class MilTextError(FormatError):
    """model.mil (MIL as text) is malformed: the message names the file, line and column."""

    def __init__(self, path: str | os.PathLike, line: int, column: int, message: str):
        self.line, self.column = line, column
        MilSurgeryError.__init__(self, f"{os.fspath(path)}" + (f": line {line}, column {column}" if line else "") + f": {message}")
        self.path, self.offset = os.fspath(path), None


class PackageError(MilSurgeryError):
    """A package is not usable for the requested operation (missing files, wrong layout)."""


class UnsafePathError(PackageError):
    """A path recorded in a package would leave the package (``..``, absolute, symlink)."""


class UsageError(MilSurgeryError):
    """The caller asked for something inconsistent (unknown function, name clash, bad argument)."""


class DestinationExistsError(UsageError):
    """The output path exists and overwriting was not requested."""


class PackageLockedError(UsageError):
    """Another process is editing the package in place and the caller chose not to wait."""


class WriteError(MilSurgeryError):
    """Writing the output failed (disk full, permission denied...); nothing was left behind."""


class InvalidModelError(MilSurgeryError):
    """A package about to be written breaks rules Core ML applies to a spec (see
    :mod:`milsurgery.check`); it was not published. An internal error: milsurgery should never
    produce one."""

    def __init__(self, path: str | os.PathLike, violations: list):
        self.path = os.fspath(path)
        self.violations = list(violations)
        listed = "; ".join(str(v) for v in self.violations)
        super().__init__(
            f"{self.path}: internal error: the package written breaks Core ML's rules (a milsurgery "
            f"bug, unless a source breaks them too), so it was not kept: {listed}"
        )
