"""milsurgery: low-level surgery on Core ML ML-program packages.

Works on the files directly: parses ``.mlpackage`` specs and ``weight.bin`` blob files with
memory maps, merges functions into one multi-function program, coalesces identical weight blobs
byte-exactly, and copies weight bytes file to file so memory stays flat.
"""

from .assemble import Pick, WriteReport, write_package
from .blobfile import Blob, BlobFile, BlobWriter
from .check import CheckReport, check
from .errors import (
    BlobFileError,
    DestinationExistsError,
    FormatError,
    InvalidModelError,
    ManifestError,
    MilSurgeryError,
    PackageError,
    SpecError,
    UnsafePathError,
    UsageError,
    WriteError,
)
from .inspect import inspect_package
from .memory import memory_model
from .merge import merge, parse_source
from .package import Package, open_package
from .surgery import append, extract, remove, rename, shrink
from .verify import VerificationFailed, VerifyReport, verify

__version__ = "0.1.0"

__all__ = [
    "Blob",
    "BlobFile",
    "BlobFileError",
    "BlobWriter",
    "CheckReport",
    "DestinationExistsError",
    "FormatError",
    "InvalidModelError",
    "ManifestError",
    "MilSurgeryError",
    "Package",
    "PackageError",
    "Pick",
    "SpecError",
    "UnsafePathError",
    "UsageError",
    "VerificationFailed",
    "VerifyReport",
    "WriteError",
    "WriteReport",
    "append",
    "check",
    "extract",
    "inspect_package",
    "memory_model",
    "merge",
    "open_package",
    "parse_source",
    "remove",
    "rename",
    "shrink",
    "verify",
    "write_package",
]
