"""milsurgery: low-level surgery on Core ML ML-program packages.

Works on the files directly: parses ``.mlpackage`` specs and ``weight.bin`` blob files with
memory maps, merges functions into one multi-function program, coalesces identical weight blobs
byte-exactly, and copies weight bytes file to file so memory stays flat.
"""

from .assemble import Pick, WriteReport, write_package
from .blobfile import Blob, BlobFile, BlobWriter
from .completion import completion
from .check import CheckReport, check
from .compiled import CompiledModel, open_model
from .diff import DiffReport, diff
from .compress import CompressReport, compress
from .errors import (
    BlobFileError,
    DestinationExistsError,
    FormatError,
    InvalidModelError,
    ManifestError,
    MilSurgeryError,
    MilTextError,
    PackageError,
    PackageLockedError,
    SpecError,
    UnsafePathError,
    UsageError,
    WriteError,
)
from . import coreml, inspect
from .inspect import inspect_package
from .memory import memory_model
from .merge import merge, parse_source
from .lock import edit_lock
from .miltext import parse_program, print_program
from .package import Package, open_package, read_input
from .show import show
from .surgery import append, extract, remove, rename, shrink
from .verify import VerificationFailed, VerifyReport, verify

__version__ = "0.1.0"

# Near-duplicate adoption and constexpr evaluation need numpy: imported on first use, so the
# exact commands start without it.
_LAZY = {
    "AdoptReport": "adopt",
    "Thresholds": "thresholds",
    "Weight": "dequant",
    "compare_weights": "measure",
    "dequantize": "dequant",
    "find_weights": "dequant",
    "iter_values": "dequant",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'milsurgery' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{module}", __name__), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "AdoptReport",
    "Blob",
    "BlobFile",
    "BlobFileError",
    "BlobWriter",
    "CheckReport",
    "CompiledModel",
    "CompressReport",
    "DestinationExistsError",
    "DiffReport",
    "FormatError",
    "InvalidModelError",
    "ManifestError",
    "MilSurgeryError",
    "MilTextError",
    "Package",
    "PackageError",
    "PackageLockedError",
    "Pick",
    "SpecError",
    "Thresholds",
    "UnsafePathError",
    "UsageError",
    "VerificationFailed",
    "VerifyReport",
    "Weight",
    "WriteError",
    "WriteReport",
    "append",
    "check",
    "compare_weights",
    "completion",
    "compress",
    "dequantize",
    "diff",
    "edit_lock",
    "extract",
    "find_weights",
    "inspect",
    "inspect_package",
    "iter_values",
    "memory_model",
    "merge",
    "open_model",
    "open_package",
    "parse_program",
    "parse_source",
    "print_program",
    "read_input",
    "remove",
    "rename",
    "show",
    "shrink",
    "verify",
    "write_package",
]
