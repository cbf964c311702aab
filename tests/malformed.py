"""A corpus of malformed packages, generated from one small valid package (no checked-in binaries).

Each :class:`Case` damages a fresh copy of the base package in one way and says which
:class:`milsurgery.MilSurgeryError` subclass opening it must raise and which fragments the message
must hold (the file, and the offset or the field at fault). ``tests/test_malformed.py`` runs every
command over every case; this module can also write the corpus to a directory, e.g. as seeds for
``tests/fuzz_atheris.py`` or to try another reader on it::

    python tests/malformed.py OUTDIR

Some cases hold special files (FIFOs, symlinks to ``/dev/zero`` or out of the package): a tool
that reads the corpus must not open every file blindly (``open`` of a FIFO blocks).

The base package (built by :func:`make_base`) has two functions, ``a`` and ``b``, and three blobs:
a float16 4x4 matrix and a 5-element uint4 index tensor (3 bytes, 4 padding bits) used by ``a``,
and a float32 vector used by ``b``.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import minipkg  # noqa: E402

from milsurgery.blobfile import BlobFile  # noqa: E402
from milsurgery.errors import (  # noqa: E402
    BlobFileError,
    ManifestError,
    MilSurgeryError,
    PackageError,
    SpecError,
    UnsafePathError,
)
from milsurgery.formats import HEADER_SIZE, MANIFEST_NAME, RECORD_SIZE  # noqa: E402
from milsurgery.spec import iter_blob_refs, pb  # noqa: E402

WEIGHTS = os.path.join("Data", "com.apple.CoreML", "weights", "weight.bin")
SPEC = os.path.join("Data", "com.apple.CoreML", "model.mlmodel")
MANIFEST = MANIFEST_NAME

# Field offsets inside a 64-byte blob metadata record (see FORMATS.md).
SENTINEL_AT, DTYPE_AT, SIZE_AT, DATA_OFFSET_AT, PADDING_AT = 0, 4, 8, 16, 24


def make_base(path: str) -> str:
    """The valid package every case starts from."""
    rng = np.random.default_rng(7)
    return minipkg.make(
        path,
        {
            "a": [("float16", rng.standard_normal((4, 4)).astype(np.float16)), ("uint4", np.array([1, 2, 3, 4, 5]))],
            "b": [("float32", rng.standard_normal(8).astype(np.float32))],
        },
    )


def base_records(pkg: str) -> list[int]:
    """Record offsets of the base package's blobs, in file order."""
    with BlobFile(os.path.join(pkg, WEIGHTS)) as bf:
        return list(bf.blobs)


@dataclass
class Case:
    """One way to damage a package.

    ``damage(pkg, outside)`` edits the package directory ``pkg`` in place (``outside`` is a
    scratch directory next to it, for symlink targets). ``faulty`` is the package-relative path of
    the file the error must name (``""`` for the package directory itself) and ``expect`` further
    fragments the message must hold.
    """

    name: str
    damage: Callable[[str, str], None]
    error: type[MilSurgeryError]
    faulty: str
    expect: tuple[str, ...] = field(default_factory=tuple)


# -- editing helpers ---------------------------------------------------------------------------
def _patch(rel: str, offset: int, fmt: str, value) -> Callable[[str, str], None]:
    def damage(pkg: str, outside: str) -> None:
        with open(os.path.join(pkg, rel), "r+b") as f:
            f.seek(offset)
            f.write(struct.pack(fmt, value))

    return damage


def _truncate(rel: str, size: int) -> Callable[[str, str], None]:
    def damage(pkg: str, outside: str) -> None:
        os.truncate(os.path.join(pkg, rel), size)

    return damage


def _write(rel: str, data: bytes) -> Callable[[str, str], None]:
    def damage(pkg: str, outside: str) -> None:
        with open(os.path.join(pkg, rel), "wb") as f:
            f.write(data)

    return damage


def _delete(rel: str) -> Callable[[str, str], None]:
    def damage(pkg: str, outside: str) -> None:
        os.remove(os.path.join(pkg, rel))

    return damage


def _edit_manifest(edit: Callable[[dict], None]) -> Callable[[str, str], None]:
    def damage(pkg: str, outside: str) -> None:
        path = os.path.join(pkg, MANIFEST)
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
        edit(manifest)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(manifest, f)

    return damage


def _root_item(manifest: dict) -> dict:
    return manifest["itemInfoEntries"][manifest["rootModelIdentifier"]]


def _edit_spec(edit: Callable[[pb.Model], None]) -> Callable[[str, str], None]:
    def damage(pkg: str, outside: str) -> None:
        path = os.path.join(pkg, SPEC)
        model = pb.Model()
        with open(path, "rb") as f:
            model.ParseFromString(f.read())
        edit(model)
        with open(path, "wb") as f:
            f.write(model.SerializeToString())

    return damage


def _first_ref(model: pb.Model, function: str = "a", index: int = 0) -> pb.Value:
    return [r for r in iter_blob_refs(model) if r.function == function][index].value


def _set_ref(**fields) -> Callable[[pb.Model], None]:
    def edit(model: pb.Model) -> None:
        value = _first_ref(model)
        for k, v in fields.items():
            setattr(value.blobFileValue, k, v)

    return edit


def _set_tensor(data_type=None, dims=None) -> Callable[[pb.Model], None]:
    def edit(model: pb.Model) -> None:
        tensor = _first_ref(model).type.tensorType
        if data_type is not None:
            tensor.dataType = data_type
        if dims is not None:
            del tensor.dimensions[:]
            tensor.rank = len(dims)
            for d in dims:
                tensor.dimensions.add().constant.size = d

    return edit


def _symlink_weights_outside(pkg: str, outside: str) -> None:
    target = os.path.join(outside, "elsewhere.bin")
    shutil.copyfile(os.path.join(pkg, WEIGHTS), target)
    os.symlink(target, os.path.join(os.path.dirname(os.path.join(pkg, WEIGHTS)), "linked.bin"))
    _edit_spec(_set_ref(fileName="@model_path/weights/linked.bin"))(pkg, outside)


def _symlink_spec_outside(pkg: str, outside: str) -> None:
    spec = os.path.join(pkg, SPEC)
    target = os.path.join(outside, "elsewhere.mlmodel")
    shutil.move(spec, target)
    os.symlink(target, spec)


def _fifo(rel: str) -> Callable[[str, str], None]:
    """Replace a file by a FIFO nobody writes to: a reader that opens it blocking hangs."""

    def damage(pkg: str, outside: str) -> None:
        os.remove(os.path.join(pkg, rel))
        os.mkfifo(os.path.join(pkg, rel))

    return damage


def _symlink(rel: str, target: str) -> Callable[[str, str], None]:
    def damage(pkg: str, outside: str) -> None:
        os.remove(os.path.join(pkg, rel))
        os.symlink(target, os.path.join(pkg, rel))

    return damage


def _symlink_outside_copy(rel: str) -> Callable[[str, str], None]:
    """Move a file out of the package (into the scratch directory) and leave a symlink to it."""

    def damage(pkg: str, outside: str) -> None:
        target = os.path.join(outside, f"{os.path.basename(pkg)}-{os.path.basename(rel)}")
        shutil.move(os.path.join(pkg, rel), target)
        os.symlink(target, os.path.join(pkg, rel))

    return damage


def _weights_dir_outside(pkg: str, outside: str) -> None:
    """The whole weights/ directory moved outside the package, a symlink left in its place."""
    weights = os.path.dirname(os.path.join(pkg, WEIGHTS))
    target = os.path.join(outside, f"{os.path.basename(pkg)}-weights")
    shutil.move(weights, target)
    os.symlink(target, weights)


def _unlist_weights(pkg: str, outside: str) -> None:
    def edit(manifest: dict) -> None:
        root = manifest["rootModelIdentifier"]
        manifest["itemInfoEntries"] = {root: manifest["itemInfoEntries"][root]}

    _edit_manifest(edit)(pkg, outside)


def _chain(*steps: Callable[[str, str], None]) -> Callable[[str, str], None]:
    def damage(pkg: str, outside: str) -> None:
        for step in steps:
            step(pkg, outside)

    return damage


def _drop_function(described: bool) -> Callable[[pb.Model], None]:
    """Remove function ``b`` from the description (``described`` False) or from the program."""

    def edit(model: pb.Model) -> None:
        if described:
            keep = [e for e in model.mlProgram.functions if e.key != "b"]
            del model.mlProgram.functions[:]
            model.mlProgram.functions.extend(keep)
        else:
            keep = [f for f in model.description.functions if f.name != "b"]
            del model.description.functions[:]
            model.description.functions.extend(keep)

    return edit


def _not_ml_program(model: pb.Model) -> None:
    model.ClearField("mlProgram")


# -- the corpus --------------------------------------------------------------------------------
def cases(records: list[int]) -> list[Case]:
    """Every case, given the record offsets of the base package (``base_records``)."""
    r0, r1, r2 = records
    W, S, M = WEIGHTS, SPEC, MANIFEST
    out: list[Case] = []

    # weight.bin cut at every structural boundary: inside the header, at and inside each record,
    # and inside each blob's data.
    cuts = [("empty", 0), ("mid-header", HEADER_SIZE // 2), ("header-only", HEADER_SIZE)]
    for i, rec in enumerate(records):
        cuts += [
            (f"mid-record-{i}", rec + RECORD_SIZE // 2),
            (f"end-of-record-{i}", rec + RECORD_SIZE),
            (f"mid-data-{i}", rec + RECORD_SIZE + 1),
        ]
    for label, size in cuts:
        out.append(Case(f"weights-truncated-{label}", _truncate(W, size), BlobFileError, W, ("weight.bin",)))
    out.append(Case("weights-missing", _delete(W), PackageError, S, ("weight.bin", "does not exist")))
    out += [
        Case("weights-version-1", _patch(W, 4, "<I", 1), BlobFileError, W, ("offset 4", "version is 1")),
        Case("weights-bad-sentinel-first", _patch(W, r0, "<I", 0xDEADBEEE), BlobFileError, W,
             (f"offset {r0}", "sentinel")),
        Case("weights-bad-sentinel-later", _patch(W, r2, "<I", 0), BlobFileError, W, (f"offset {r2}", "sentinel")),
        Case("weights-unknown-dtype", _patch(W, r1 + DTYPE_AT, "<I", 99), BlobFileError, W,
             (f"offset {r1 + DTYPE_AT}", "dtype 99")),
        Case("weights-dtype-zero", _patch(W, r0 + DTYPE_AT, "<I", 0), BlobFileError, W, (f"offset {r0 + DTYPE_AT}",)),
        Case("weights-count-too-large", _patch(W, 0, "<I", 2**32 - 1), BlobFileError, W, ("offset 0", "4294967295")),
        Case("weights-data-offset-not-record-plus-64", _patch(W, r1 + DATA_OFFSET_AT, "<Q", r1 + RECORD_SIZE + 64),
             BlobFileError, W, (f"offset {r1 + DATA_OFFSET_AT}", "data offset")),
        Case("weights-overlapping-blobs", _patch(W, r1 + DATA_OFFSET_AT, "<Q", r0 + RECORD_SIZE + 8),
             BlobFileError, W, (f"offset {r1 + DATA_OFFSET_AT}", "overlaps")),
        Case("weights-size-swallows-next-record", _patch(W, r0 + SIZE_AT, "<Q", r1 - r0),
             BlobFileError, W, ("sentinel",)),
        Case("weights-size-overflows-64-bits", _patch(W, r2 + SIZE_AT, "<Q", 2**64 - 1), BlobFileError, W,
             (f"offset {r2 + SIZE_AT}", "past the end")),
        Case("weights-size-1e12", _patch(W, r0 + SIZE_AT, "<Q", 10**12), BlobFileError, W,
             (f"offset {r0 + SIZE_AT}", "past the end")),
        Case("weights-data-offset-overflows-64-bits", _patch(W, r0 + DATA_OFFSET_AT, "<Q", 2**64 - 32),
             BlobFileError, W, (f"offset {r0 + DATA_OFFSET_AT}",)),
        Case("weights-zero-size", _patch(W, r2 + SIZE_AT, "<Q", 0), BlobFileError, W, (f"offset {r2 + SIZE_AT}",)),
        Case("weights-padding-8-bits", _patch(W, r1 + PADDING_AT, "<Q", 8), BlobFileError, W,
             (f"offset {r1 + PADDING_AT}", "padding")),
        Case("weights-padding-inconsistent", _patch(W, r1 + PADDING_AT, "<Q", 3), BlobFileError, W,
             (f"offset {r1 + PADDING_AT}", "padding")),
        Case("weights-size-not-whole-elements", _patch(W, r2 + SIZE_AT, "<Q", 31), BlobFileError, W,
             (f"offset {r2 + SIZE_AT}",)),
        Case("weights-is-a-directory", lambda p, o: (os.remove(os.path.join(p, W)), os.mkdir(os.path.join(p, W))),
             PackageError, S, ("weight.bin",)),
    ]

    # blob references in the spec
    out += [
        Case("ref-offset-not-a-record", _edit_spec(_set_ref(offset=r0 + 8)), SpecError, S,
             (f"blob offset {r0 + 8}", "not a blob record", "function 'a'")),
        Case("ref-offset-past-end", _edit_spec(_set_ref(offset=10**9)), SpecError, S,
             ("blob offset 1000000000", "past the end", "function 'a'")),
        Case("ref-offset-2-to-63", _edit_spec(_set_ref(offset=2**63)), SpecError, S, (f"blob offset {2**63}",)),
        Case("ref-dotdot", _edit_spec(_set_ref(fileName="@model_path/weights/../../../Manifest.json")),
             UnsafePathError, S, ("function 'a'", "leaves")),
        Case("ref-absolute", _edit_spec(_set_ref(fileName="/etc/passwd")), UnsafePathError, S,
             ("function 'a'", "/etc/passwd")),
        Case("ref-outside-weights-dir", _edit_spec(_set_ref(fileName="@model_path/model.mlmodel")), UnsafePathError,
             S, ("function 'a'",)),
        Case("ref-symlink-out-of-package", _symlink_weights_outside, UnsafePathError, S, ("symlink",)),
        Case("ref-missing-file", _edit_spec(_set_ref(fileName="@model_path/weights/nope.bin")), PackageError, S,
             ("nope.bin", "does not exist")),
        Case("ref-dtype-disagrees", _edit_spec(_set_tensor(data_type=pb.FLOAT32)), SpecError, S,
             ("FLOAT32", "float16", f"offset {r0}")),
        Case("ref-element-count-disagrees", _edit_spec(_set_tensor(dims=[4, 5])), SpecError, S,
             ("20 elements", "16")),
        Case("ref-tensor-2-to-40-elements", _edit_spec(_set_tensor(dims=[2**20, 2**20])), SpecError, S,
             (f"{2**40} elements",)),
        Case("ref-unknown-tensor-dtype", _edit_spec(_set_tensor(data_type=12345)), SpecError, S, ("12345",)),
    ]

    # Manifest.json
    out += [
        Case("manifest-missing", _delete(M), ManifestError, M, ("missing",)),
        Case("manifest-not-json", _write(M, b"{\"fileFormatVersion\": \"1.0.0\", "), ManifestError, M,
             ("not valid JSON", "offset")),
        Case("manifest-not-utf8", _write(M, b"\xff\xfe{}"), ManifestError, M, ("not valid JSON",)),
        Case("manifest-not-an-object", _write(M, b"[1, 2]"), ManifestError, M, ("not a JSON object",)),
        Case("manifest-newer-format", _edit_manifest(lambda m: m.update(fileFormatVersion="2.0.0")), ManifestError,
             M, ("field fileFormatVersion", "2.0.0")),
        Case("manifest-version-not-a-string", _edit_manifest(lambda m: m.update(fileFormatVersion=1)),
             ManifestError, M, ("field fileFormatVersion",)),
        Case("manifest-no-root", _edit_manifest(lambda m: m.pop("rootModelIdentifier")), ManifestError, M,
             ("field rootModelIdentifier",)),
        Case("manifest-root-unknown", _edit_manifest(lambda m: m.update(rootModelIdentifier="X")), ManifestError, M,
             ("field rootModelIdentifier", "'X'")),
        Case("manifest-no-items", _edit_manifest(lambda m: m.pop("itemInfoEntries")), ManifestError, M,
             ("field itemInfoEntries",)),
        Case("manifest-item-leaves-data", _edit_manifest(lambda m: _root_item(m).update(path="../../outside")),
             UnsafePathError, M, ("itemInfoEntries", "leaves Data/")),
        Case("manifest-item-absolute", _edit_manifest(lambda m: _root_item(m).update(path="/etc/passwd")),
             UnsafePathError, M, ("itemInfoEntries", "/etc/passwd")),
        Case("manifest-root-spec-missing",
             _edit_manifest(lambda m: _root_item(m).update(path="com.apple.CoreML/nothing.mlmodel")), ManifestError,
             M, ("field rootModelIdentifier", "nothing.mlmodel")),
        Case("manifest-spec-symlink-out-of-package", _symlink_spec_outside, UnsafePathError, M, ("symlink",)),
    ]

    # model.mlmodel
    out += [
        Case("spec-empty", _write(S, b""), SpecError, S, ("empty",)),
        Case("spec-not-protobuf", _write(S, b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01"), SpecError, S,
             ("not a valid Model protobuf",)),
        Case("spec-truncated", lambda p, o: os.truncate(os.path.join(p, S), os.path.getsize(os.path.join(p, S)) // 2),
             SpecError, S, ("not a valid Model protobuf",)),
        Case("spec-not-ml-program", _edit_spec(_not_ml_program), SpecError, S, ("field mlProgram",)),
        Case("spec-version-too-old", _edit_spec(lambda m: setattr(m, "specificationVersion", 4)), SpecError, S,
             ("field specificationVersion",)),
        Case("spec-function-described-not-in-program", _edit_spec(_drop_function(described=True)), SpecError, S,
             ("'b'", "missing from the program")),
        Case("spec-function-in-program-not-described", _edit_spec(_drop_function(described=False)), SpecError, S,
             ("'b'", "not listed in description.functions")),
        Case("spec-default-not-a-function", _edit_spec(lambda m: setattr(m.description, "defaultFunctionName", "zz")),
             SpecError, S, ("defaultFunctionName", "'zz'")),
    ]

    # special files and escapes: no hang (FIFO), no unbounded read (/dev/zero reports size 0),
    # nothing read or written outside the package (a file or the weights directory symlinked out)
    out += [
        Case("manifest-fifo", _fifo(M), ManifestError, M, ("not a regular file", "FIFO")),
        Case("manifest-is-a-directory", lambda p, o: (os.remove(os.path.join(p, M)), os.mkdir(os.path.join(p, M))),
             ManifestError, M, ("not a regular file", "directory")),
        Case("manifest-symlink-dev-zero", _symlink(M, "/dev/zero"), UnsafePathError, M, ("outside the package",)),
        Case("manifest-symlink-out-of-package", _symlink_outside_copy(M), UnsafePathError, M,
             ("outside the package",)),
        Case("spec-fifo", _fifo(S), SpecError, S, ("not a regular file", "FIFO")),
        Case("spec-symlink-dev-zero", _symlink(S, "/dev/zero"), UnsafePathError, M, ("symlink",)),
        Case("weights-fifo", _fifo(W), PackageError, S, ("weight.bin", "not a regular file", "FIFO")),
        Case("weights-symlink-dev-zero", _symlink(W, "/dev/zero"), UnsafePathError, S, ("weight.bin", "symlink")),
        Case("weights-symlink-loop", _symlink(W, "weight.bin"), PackageError, S, ("weight.bin", "cannot open")),
        Case("weights-dir-symlink-out-of-package", _weights_dir_outside, UnsafePathError, M,
             ("itemInfoEntries", "symlink")),
        # the same with the weights directory not listed in Manifest.json: caught at the blob file
        Case("weights-dir-symlink-out-of-package-unlisted", _chain(_weights_dir_outside, _unlist_weights),
             UnsafePathError, S, ("weight.bin", "symlink")),
    ]
    return out


#: Cases whose damage is a special file or an escape: run again in a child process, under a time
#: limit and with its peak memory measured (tests/test_malformed.py).
SPECIAL_FILE_CASES = (
    "manifest-fifo",
    "manifest-is-a-directory",
    "manifest-symlink-dev-zero",
    "manifest-symlink-out-of-package",
    "spec-fifo",
    "spec-symlink-dev-zero",
    "weights-fifo",
    "weights-is-a-directory",
    "weights-symlink-dev-zero",
    "weights-symlink-loop",
    "weights-dir-symlink-out-of-package",
    "weights-dir-symlink-out-of-package-unlisted",
    "ref-symlink-out-of-package",
)


# -- hostile invocations -------------------------------------------------------------------------
# Careless or hostile command lines around good packages. Each runs in a fresh work directory
# laid out by :func:`make_work`:
#
#   WORK/proj/src.mlpackage   the source (the base package)
#   WORK/proj/notes.txt       an unrelated file beside it
#   WORK/proj/plain/          an unrelated directory (holding a file)
#   WORK/target.mlpackage     a package to append to (another copy of the base)
#   WORK/sub/                 an empty directory, the working directory of some cases
#
# Every case must end in one error line, exit 2, and leave WORK exactly as it was.


@dataclass
class OutputCase:
    """An output path no writer may use: ``prepare(work)`` returns ``(output path, cwd)``."""

    name: str
    prepare: Callable[[str], tuple[str, str]]
    error: type[MilSurgeryError]
    expect: tuple[str, ...]


@dataclass
class Invocation:
    """A whole command line: ``argv(work)`` returns ``(argv, cwd)``."""

    name: str
    argv: Callable[[str], tuple[list[str], str]]
    error: type[MilSurgeryError]
    expect: tuple[str, ...]


def make_work(work: str, base: str) -> str:
    os.makedirs(os.path.join(work, "proj", "plain"))
    os.makedirs(os.path.join(work, "sub"))
    shutil.copytree(base, os.path.join(work, "proj", "src.mlpackage"))
    shutil.copytree(base, os.path.join(work, "target.mlpackage"))
    with open(os.path.join(work, "proj", "notes.txt"), "w") as f:
        f.write("not a package\n")
    with open(os.path.join(work, "proj", "plain", "keep.txt"), "w") as f:
        f.write("keep me\n")
    return work


def work_source(work: str) -> str:
    return os.path.join(work, "proj", "src.mlpackage")


#: Every command that writes a new package, given a source and an output, with --force.
WRITERS: dict[str, Callable[[str, str], list[str]]] = {
    "merge": lambda src, out: ["merge", "--force", "-o", out, src],
    "shrink": lambda src, out: ["shrink", "--force", src, "-o", out],
    "extract": lambda src, out: ["extract", "--force", src, "a", "-o", out],
    "extract-single": lambda src, out: ["extract", "--force", src, "b", "--single", "-o", out],
    "remove": lambda src, out: ["remove", "--force", src, "b", "-o", out],
    "rename": lambda src, out: ["rename", "--force", src, "a=c", "-o", out],
}

_TOO_LONG = os.strerror(errno.ENAMETOOLONG)  # "File name too long"


def output_cases() -> list[OutputCase]:
    from milsurgery.errors import UsageError, WriteError

    j = os.path.join
    return [
        OutputCase("output-holds-the-source", lambda w: (j(w, "proj"), w), UsageError,
                   ("would replace the source",)),
        OutputCase("output-is-inside-the-source", lambda w: (j(w, "proj", "src.mlpackage", "Data"), w), UsageError,
                   ("lies inside the source",)),
        OutputCase("output-new-inside-the-source", lambda w: (j(w, "proj", "src.mlpackage", "new.mlpackage"), w),
                   UsageError, ("lies inside the source",)),
        OutputCase("output-empty", lambda w: ("", j(w, "sub")), UsageError, ("is empty",)),
        OutputCase("output-current-directory", lambda w: (".", j(w, "sub")), UsageError, ("current directory",)),
        OutputCase("output-ancestor-of-cwd", lambda w: ("..", j(w, "sub")), UsageError, ("current directory",)),
        OutputCase("output-plain-directory", lambda w: (j(w, "proj", "plain"), w), UsageError,
                   ("replaces only an existing .mlpackage",)),
        OutputCase("output-plain-file", lambda w: (j(w, "proj", "notes.txt"), w), UsageError,
                   ("replaces only an existing .mlpackage",)),
        OutputCase("output-holds-a-nul-character", lambda w: (j(w, "a\x00b.mlpackage"), w), UsageError,
                   ("not usable",)),
        OutputCase("output-name-too-long", lambda w: (j(w, "a" * 300 + ".mlpackage"), w), WriteError, (_TOO_LONG,)),
        OutputCase("output-path-too-long", lambda w: (j(w, *["d"] * 2100, "x.mlpackage"), w), WriteError,
                   (_TOO_LONG,)),
    ]


BAD_NAME = "a\udcff"  # what Python makes of the bytes b"a\xff" in a command line


def invocations() -> list[Invocation]:
    from milsurgery.errors import UsageError

    j = os.path.join
    out = lambda w: j(w, "out.mlpackage")  # noqa: E731
    src = work_source
    return [
        Invocation("name-not-utf8-rename", lambda w: (["rename", src(w), f"a={BAD_NAME}", "-o", out(w)], w),
                   UsageError, ("not valid UTF-8",)),
        Invocation("name-not-utf8-merge", lambda w: (["merge", "-o", out(w), f"{src(w)}:a={BAD_NAME}"], w),
                   UsageError, ("not valid UTF-8",)),
        Invocation("name-not-utf8-extract", lambda w: (["extract", src(w), f"b={BAD_NAME}", "-o", out(w)], w),
                   UsageError, ("not valid UTF-8",)),
        Invocation("name-not-utf8-extract-single",
                   lambda w: (["extract", "--single", src(w), f"b={BAD_NAME}", "-o", out(w)], w),
                   UsageError, ("not valid UTF-8",)),
        Invocation("name-not-utf8-append",
                   lambda w: (["append", j(w, "target.mlpackage"), f"{src(w)}:a={BAD_NAME}"], w),
                   UsageError, ("not valid UTF-8",)),
        Invocation("name-not-utf8-unknown-function", lambda w: (["extract", src(w), BAD_NAME, "-o", out(w)], w),
                   UsageError, ("no function",)),
        Invocation("name-not-utf8-default",
                   lambda w: (["merge", "--default", BAD_NAME, "-o", out(w), src(w)], w), UsageError,
                   ("default function",)),
        Invocation("name-not-utf8-remove", lambda w: (["remove", src(w), BAD_NAME, "-o", out(w)], w), UsageError,
                   ("no function",)),
        Invocation("append-into-missing-package",
                   lambda w: (["append", j(w, "nothing.mlpackage"), f"{src(w)}:a=z"], w), PackageError,
                   ("does not exist",)),
        Invocation("shrink-in-place-not-a-package",
                   lambda w: (["shrink", "--in-place", j(w, "proj", "plain")], w), ManifestError, ("missing",)),
    ]


def build(corpus_dir: str) -> list[tuple[Case, str]]:
    """Write every case as ``corpus_dir/NAME.mlpackage``; return (case, path) pairs."""
    os.makedirs(corpus_dir, exist_ok=True)
    base = make_base(os.path.join(corpus_dir, ".base.mlpackage"))
    outside = os.path.join(corpus_dir, ".outside")
    os.makedirs(outside, exist_ok=True)
    built = []
    for case in cases(base_records(base)):
        path = os.path.join(corpus_dir, f"{case.name}.mlpackage")
        shutil.copytree(base, path, symlinks=True)
        case.damage(path, outside)
        built.append((case, path))
    return built


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/malformed.py OUTDIR")
    for case, path in build(sys.argv[1]):
        print(f"{case.name:45s} {case.error.__name__}")
