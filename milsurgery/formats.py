"""Byte layouts and enumerations of the Core ML files milsurgery reads and writes.

This module is the single source of truth for magic numbers; every other module imports from here.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

# --- MIL blob storage (weight.bin), version 2 -------------------------------------------------
STORAGE_VERSION = 2
HEADER_SIZE = 64
RECORD_SIZE = 64
ALIGNMENT = 64
SENTINEL = 0xDEADBEEF

#: storage header: count (u32), version (u32), 7 reserved u64
HEADER_STRUCT = struct.Struct("<II7Q")
#: metadata record: sentinel (u32), dtype (u32), sizeInBytes (u64), data offset (u64),
#: padding_size_in_bits (u64), 4 reserved u64
RECORD_STRUCT = struct.Struct("<IIQQQ4Q")
assert HEADER_STRUCT.size == HEADER_SIZE and RECORD_STRUCT.size == RECORD_SIZE

#: The file name the Core ML writer uses for weights, relative to the package's weights directory.
WEIGHT_FILE_NAME = "weight.bin"
#: How a spec names a file inside the package's weights directory.
MODEL_PATH_PREFIX = "@model_path/weights/"
DEFAULT_WEIGHT_REF = MODEL_PATH_PREFIX + WEIGHT_FILE_NAME


def align(n: int, to: int = ALIGNMENT) -> int:
    """Round ``n`` up to a multiple of ``to``."""
    return (n + to - 1) // to * to


@dataclass(frozen=True)
class BlobDType:
    """One entry of the blob dtype table."""

    code: int  # u32 in the record
    name: str
    bits: int  # bits per element
    numpy: str | None  # numpy dtype string for byte-sized types, None when numpy has no equivalent
    proto: int  # milsurgery.spec.DataType value of the tensor that references it

    @property
    def sub_byte(self) -> bool:
        return self.bits < 8


# Blob dtype (u32 in the record) -> facts. Values are only ever appended to this list by Apple.
# proto numbers: MIL DataType enum (FLOAT16 10, FLOAT32 11, BFLOAT16 13, INT8 21, INT16 22,
# INT32 23, INT4 25, UINT8 31, UINT16 32, UINT32 33, UINT4 35, UINT2 36, UINT1 37, UINT6 38,
# UINT3 39, FLOAT8E4M3FN 40, FLOAT8E5M2 41).
BLOB_DTYPES: dict[int, BlobDType] = {
    d.code: d
    for d in (
        BlobDType(1, "float16", 16, "<f2", 10),
        BlobDType(2, "float32", 32, "<f4", 11),
        BlobDType(3, "uint8", 8, "u1", 31),
        BlobDType(4, "int8", 8, "i1", 21),
        BlobDType(5, "bfloat16", 16, None, 13),
        BlobDType(6, "int16", 16, "<i2", 22),
        BlobDType(7, "uint16", 16, "<u2", 32),
        BlobDType(8, "int4", 4, None, 25),
        BlobDType(9, "uint1", 1, None, 37),
        BlobDType(10, "uint2", 2, None, 36),
        BlobDType(11, "uint4", 4, None, 35),
        BlobDType(12, "uint3", 3, None, 39),
        BlobDType(13, "uint6", 6, None, 38),
        BlobDType(14, "int32", 32, "<i4", 23),
        BlobDType(15, "uint32", 32, "<u4", 33),
        BlobDType(16, "float8_e4m3fn", 8, None, 40),
        BlobDType(17, "float8_e5m2", 8, None, 41),
    )
}
BLOB_DTYPE_BY_NAME = {d.name: d for d in BLOB_DTYPES.values()}
BLOB_DTYPE_BY_PROTO = {d.proto: d for d in BLOB_DTYPES.values()}

# --- Model spec -----------------------------------------------------------------------------------
#: Lowest spec version that can hold several functions and states (iOS 18 / macOS 15).
MULTIFUNCTION_SPEC_VERSION = 9
#: ML programs first appeared in spec version 6 (iOS 15 / macOS 12).
MIN_MLPROGRAM_SPEC_VERSION = 6
#: MIL opset name per spec version.
OPSET_FOR_SPEC = {6: "CoreML5", 7: "CoreML6", 8: "CoreML7", 9: "CoreML8", 10: "CoreML9"}
#: Lowest spec version that accepts an opset name (the inverse of OPSET_FOR_SPEC).
SPEC_FOR_OPSET = {"CoreML5": 6, "CoreML6": 7, "CoreML7": 8, "CoreML8": 9, "CoreML9": 10}
#: Name of the only function of a single-function model.
MAIN_FUNCTION = "main"

# --- Package ---------------------------------------------------------------------------------
MANIFEST_NAME = "Manifest.json"
DATA_DIR = "Data"
MANIFEST_FORMAT_VERSION = "1.0.0"
SPEC_AUTHOR = "com.apple.CoreML"
SPEC_NAME = "model.mlmodel"
SPEC_ITEM_PATH = "com.apple.CoreML/model.mlmodel"
SPEC_DESCRIPTION = "CoreML Model Specification"
WEIGHTS_NAME = "weights"
WEIGHTS_ITEM_PATH = "com.apple.CoreML/weights"
WEIGHTS_DESCRIPTION = "CoreML Model Weights"

# --- Resource bounds --------------------------------------------------------------------------
#: Largest spec milsurgery parses; real specs of multi-GB LLMs are a few MB.
MAX_SPEC_BYTES = 1 << 30
#: Largest Manifest.json milsurgery parses.
MAX_MANIFEST_BYTES = 1 << 20

# --- Provenance -------------------------------------------------------------------------------
#: ``userDefined`` metadata key recording near-duplicate adoption (JSON: count, bytes, anchor,
#: thresholds); its presence means the package is not a byte-faithful merge of its sources.
ADOPTED_METADATA_KEY = "milsurgery.adopted"
