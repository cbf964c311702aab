"""Property-based fuzzing of every file of a package: nothing but MilSurgeryError may escape.

Each test starts from a small valid package built once per module (two-function fp16,
two-function 4-bit palettized, single-function fp16), mutates one file of a fresh copy, and runs
what a user would run on it:

* ``BlobFile(weight.bin)`` (for weight mutations), ``Package(pkg)`` and ``inspect_package(pkg)``
  must succeed or raise a :class:`MilSurgeryError` whose message names the mutated file or the
  package;
* when the mutated package still opens, ``merge([pkg], out, verify=True)`` must succeed (its
  output must open, and every blob reference in it must hold the bytes the same reference holds
  in the source, program attributes included) or raise a :class:`MilSurgeryError` and leave no
  output and no partial directory behind;
* the mutated package's files are byte-identical after every command.

Mutations are lists of small, printable operations applied by the ``mutate_*`` functions below,
so a falsifying example printed by Hypothesis is a complete reproducer, e.g.::

    data = mutate_weights(seed_weight_bytes, seed_record_offsets, [("field", 0, 2, 2**64 - 1)])

Runs are deterministic (``derandomize=True``) and write no Hypothesis database. Set
``MILSURGERY_FUZZ_EXAMPLES=N`` for a longer run (N examples per test); ``tests/fuzz_atheris.py``
is the coverage-guided fuzzer for long runs.

The ``test_regression_*`` tests at the end pin, as deterministic reproducers, the faults these
fuzzers found (all fixed); each docstring says what used to go wrong.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from milsurgery import BlobFile, MilSurgeryError, Package, inspect_package, merge
from milsurgery._proto import milsurgery_spec_pb2 as pb
from milsurgery.errors import FormatError
from milsurgery.memory import memory_model
from milsurgery.surgery import append, extract, remove, rename, shrink
from milsurgery.synth import build_llm_like
from milsurgery.verify import verify

# --------------------------------------------------------------------------------------------
# settings

_EXAMPLES = int(os.environ.get("MILSURGERY_FUZZ_EXAMPLES", "0") or 0)


def fuzz_settings(examples: int):
    return settings(
        max_examples=_EXAMPLES or examples,
        deadline=None,
        database=None,  # write nothing into the repository
        derandomize=True,  # the same examples on every run: CI stays deterministic
        suppress_health_check=list(HealthCheck),
        print_blob=False,
    )


MANIFEST = "Manifest.json"
SPEC = "Data/com.apple.CoreML/model.mlmodel"
WEIGHTS = "Data/com.apple.CoreML/weights/weight.bin"
PKG_NAME = "fuzzed.mlpackage"
OUT_NAME = "merged.mlpackage"

SEEDS = {
    "fp16": dict(seq_lens={"a": 1, "b": 4}),
    "pal4": dict(seq_lens={"a": 1, "b": 4}, dtype="palettized4"),
    "single": dict(seq_lens=3),
}
SEED_KIND = st.sampled_from(sorted(SEEDS))


@dataclass(frozen=True)
class Seed:
    kind: str
    path: str
    files: dict  # relative path -> bytes
    records: tuple  # record offsets of weight.bin, in file order

    def __repr__(self) -> str:  # keeps Hypothesis' falsifying examples readable
        return f"<seed {self.kind}: build_llm_like(..., {SEEDS[self.kind]}), records {self.records}>"


class Seeds(dict):
    def __repr__(self) -> str:
        return "<seeds " + ", ".join(sorted(self)) + ">"


def long_text(char: str, n: int, prefix: str = "") -> tuple:
    """A long string, kept short in printed examples: ``("long", char, n, prefix)``."""
    return ("long", char, n, prefix)


def text(v):
    """Materialize ``long_text`` markers; anything else comes back as a fresh copy (a list or
    dict drawn from a vocabulary must not be shared between mutations or examples)."""
    if isinstance(v, tuple) and len(v) == 4 and v[0] == "long":
        return v[3] + v[1] * v[2]
    return copy.deepcopy(v)


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> dict[str, Seed]:
    root = tmp_path_factory.mktemp("fuzz-seeds")
    out = Seeds()
    for kind, kwargs in SEEDS.items():
        path = str(root / f"{kind}.mlpackage")
        build_llm_like(path, hidden=16, layers=2, shared_fraction=0.5, **kwargs)
        files = {}
        for rel in (MANIFEST, SPEC, WEIGHTS):
            with open(os.path.join(path, rel), "rb") as f:
                files[rel] = f.read()
        with BlobFile(os.path.join(path, WEIGHTS)) as bf:
            records = tuple(bf.blobs)
        out[kind] = Seed(kind, path, files, records)
    return out


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("fuzz-work"))


@contextlib.contextmanager
def mutated_package(seed: Seed, scratch: str, rel: str | None = None, data: bytes | None = None):
    """A fresh copy of ``seed`` (as ``<work>/fuzzed.mlpackage``) with ``rel`` replaced by ``data``."""
    work = tempfile.mkdtemp(prefix="ex-", dir=scratch)
    try:
        pkg = os.path.join(work, PKG_NAME)
        shutil.copytree(seed.path, pkg)
        if rel is not None:
            with open(os.path.join(pkg, rel), "wb") as f:
                f.write(data)
        yield work, pkg
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# what every command must do with a broken package


def tree_digest(path: str) -> dict[str, str]:
    """sha256 of every file (and the name of every directory) under ``path``."""
    out = {}
    for root, dirs, files in os.walk(path):
        for name in dirs:
            out[os.path.relpath(os.path.join(root, name), path) + "/"] = "dir"
        for name in files:
            full = os.path.join(root, name)
            with open(full, "rb") as f:
                out[os.path.relpath(full, path)] = hashlib.sha256(f.read()).hexdigest()
    return out


def assert_names_file(what: str, exc: MilSurgeryError, names) -> None:
    """A MilSurgeryError's message must name the file at fault (or at least the package)."""
    text = str(exc)
    assert any(n in text for n in names), (
        f"{what} raised {type(exc).__name__} whose message names none of {sorted(names)}: {text!r}"
    )
    if isinstance(exc, FormatError):
        assert exc.path and exc.path in text, f"{what}: FormatError.path {exc.path!r} not in {text!r}"


def attempt(what: str, fn, names):
    """Run ``fn``: return ``(result, None)`` or ``(None, error)`` for a MilSurgeryError that names
    a file. Any other exception propagates and fails the test (that is the bug being hunted)."""
    try:
        return fn(), None
    except MilSurgeryError as exc:
        with contextlib.suppress(Exception):  # note() only works inside a Hypothesis test
            note(f"{what}: {type(exc).__name__}: {exc}")
        assert_names_file(what, exc, names)
        return None, exc


def leftovers(work: str) -> list[str]:
    """Entries a command left beside the package other than the package itself."""
    return sorted(n for n in os.listdir(work) if n != PKG_NAME)


def check_blob_file(path: str) -> None:
    """``BlobFile`` either refuses the file or hands out every blob's values and chunks."""

    def read_all():
        with BlobFile(path) as bf:
            for blob in bf:
                bf.values(blob)
                sum(len(c) for c in bf.chunks(blob))
            return len(bf)

    attempt("BlobFile", read_all, {os.path.basename(path)})


def exercise(pkg: str, mutated: str, work: str) -> None:
    """Open, inspect and (if it opens) merge a mutated package; see the module docstring."""
    names = {os.path.basename(mutated), os.path.basename(pkg)}
    before = tree_digest(pkg)
    attempt("Package", lambda: Package(pkg).close(), names)
    assert tree_digest(pkg) == before, "Package() modified the package"
    info, _ = attempt("inspect_package", lambda: inspect_package(pkg), names)
    assert tree_digest(pkg) == before, "inspect_package() modified the package"
    if info is None:
        return
    out = os.path.join(work, OUT_NAME)
    _, err = attempt("merge", lambda: merge([pkg], out, verify=True), names | {OUT_NAME})
    assert tree_digest(pkg) == before, "merge() modified its source"
    if err is not None:
        assert not os.path.lexists(out), f"merge failed ({err}) but left {out}"
    else:
        try:
            inspect_package(out)
        except MilSurgeryError as exc:
            pytest.fail(f"merge succeeded but wrote a package that does not open: {exc}")
        assert_same_blobs(pkg, out)
        shutil.rmtree(out)
    assert leftovers(work) == [], f"merge left {leftovers(work)} beside its output"


def _ref_contents(pkg: Package, function: str) -> list[tuple]:
    out = []
    for r in pkg.function_refs(function):
        data = pkg.blob_files[r.ref.file_name].view(r.blob).tobytes()
        out.append((r.ref.location, r.blob.dtype.code, r.blob.padding_bits if r.blob.dtype.sub_byte else 0, data))
    return out


def assert_same_blobs(source: str, merged: str) -> None:
    """Every blob reference of ``merged`` (a merge of ``source`` alone) holds the bytes the same
    reference holds in ``source``: program attributes (function "") and every function."""
    with Package(source) as src, Package(merged) as out:
        for name in ["", *src.functions]:
            a, b = _ref_contents(src, name), _ref_contents(out, name)
            assert [x[0] for x in a] == [x[0] for x in b], f"function {name!r}: references differ"
            for x, y in zip(a, b):
                assert x == y, f"function {name!r} {x[0]}: merged blob differs from the source's"


# --------------------------------------------------------------------------------------------
# weight.bin mutations

HEADER_FIELDS = ((0, 4), (4, 4)) + tuple((8 + 8 * i, 8) for i in range(7))  # count, version, reserved
RECORD_FIELDS = ((0, 4), (4, 4), (8, 8), (16, 8), (24, 8)) + tuple((32 + 8 * i, 8) for i in range(4))
# sentinel, dtype, sizeInBytes, data offset, padding bits, 4 reserved

FIELD_MAGIC = [
    0, 1, 2, 3, 7, 8, 9, 11, 17, 18, 63, 64, 65, 127, 128, 0xDEADBEEF, 0xEFBEADDE, 0x7FFFFFFF,
    0x80000000, 0xFFFFFFFF, 2**32, 2**32 + 64, 2**40, 2**63 - 1, 2**63, 2**64 - 64, 2**64 - 1,
]

# A position: ("hdr", i) byte i of the storage header; ("rec", k, i) byte i of record k (mod the
# record count); ("abs", n) byte n mod the file length.
w_pos = st.one_of(
    st.tuples(st.just("hdr"), st.integers(0, 63)),
    st.tuples(st.just("rec"), st.integers(0, 7), st.integers(0, 63)),
    st.tuples(st.just("abs"), st.integers(0, 1 << 16)),
)
# A value: an int, ("eof", d) the current file length + d, ("rec", k, d) record k's offset + d.
w_value = st.one_of(
    st.sampled_from(FIELD_MAGIC),
    st.tuples(st.just("eof"), st.integers(-130, 130)),
    st.tuples(st.just("rec"), st.integers(0, 7), st.sampled_from([0, 1, 63, 64, 65, 128, -64])),
    st.integers(0, 2**64 - 1),
)
w_op = st.one_of(
    # field -1 = storage header, else record k; field index into HEADER_FIELDS / RECORD_FIELDS
    st.tuples(st.just("field"), st.integers(-1, 7), st.integers(0, 8), w_value),
    st.tuples(st.just("byte"), w_pos, st.integers(0, 255)),
    st.tuples(st.just("flip"), w_pos, st.integers(0, 7)),
    st.tuples(
        st.just("truncate"),
        st.one_of(
            st.tuples(st.just("eof"), st.integers(-200, -1)),
            st.tuples(st.just("rec"), st.integers(0, 7), st.integers(-1, 130)),
            st.tuples(st.just("abs"), st.integers(0, 4096)),
        ),
    ),
    st.tuples(st.just("append"), st.binary(min_size=1, max_size=200)),
    # append_record(dtype, data bytes, data-offset skew, padding bits, bump header count)
    st.tuples(
        st.just("append_record"), st.integers(0, 20), st.integers(0, 300), st.integers(-2, 2),
        st.integers(0, 9), st.booleans(),
    ),
    st.tuples(st.just("copy_record"), st.integers(0, 7), st.integers(0, 7)),
    st.tuples(st.just("dup_blob"), st.integers(0, 7), st.booleans()),
    st.tuples(st.just("delete"), w_pos, st.integers(1, 200)),
    st.tuples(st.just("insert"), w_pos, st.binary(min_size=1, max_size=70)),
)


def _position(pos, buf, records) -> int | None:
    if not buf:
        return None
    if pos[0] == "hdr":
        n = pos[1]
    elif pos[0] == "rec":
        n = records[pos[1] % len(records)] + pos[2]
    else:
        n = pos[1]
    return n % len(buf)


def _int_value(v, buf, records) -> int:
    if isinstance(v, tuple):
        if v[0] == "eof":
            return len(buf) + v[1]
        return records[v[1] % len(records)] + v[2]
    return v


def _put(buf: bytearray, offset: int, width: int, value: int) -> None:
    if 0 <= offset and offset + width <= len(buf):
        buf[offset : offset + width] = (value % (1 << (8 * width))).to_bytes(width, "little")


def _bump_count(buf: bytearray) -> None:
    if len(buf) >= 4:
        _put(buf, 0, 4, struct.unpack_from("<I", buf, 0)[0] + 1)


def _pad64(buf: bytearray) -> int:
    buf.extend(b"\0" * (-len(buf) % 64))
    return len(buf)


def mutate_weights(data: bytes, records, ops) -> bytes:
    """Apply weight.bin mutation ops (see ``w_op``) to ``data``; ``records`` are its record offsets."""
    buf = bytearray(data)
    for op in ops:
        kind = op[0]
        if kind == "field":
            _, where, index, value = op
            base = 0 if where < 0 else records[where % len(records)]
            fields = HEADER_FIELDS if where < 0 else RECORD_FIELDS
            off, width = fields[index % len(fields)]
            _put(buf, base + off, width, _int_value(value, buf, records))
        elif kind in ("byte", "flip"):
            n = _position(op[1], buf, records)
            if n is not None:
                buf[n] = op[2] if kind == "byte" else buf[n] ^ (1 << op[2])
        elif kind == "truncate":
            spec = op[1]
            if spec[0] == "eof":
                n = len(buf) + spec[1]
            elif spec[0] == "rec":
                n = records[spec[1] % len(records)] + spec[2]
            else:
                n = spec[1]
            del buf[max(n, 0) :]
        elif kind == "append":
            buf.extend(op[1])
        elif kind == "append_record":
            _, code, size, skew, padding, bump = op
            rec = _pad64(buf)
            buf.extend(struct.pack("<IIQQQ4Q", 0xDEADBEEF, code, size, rec + 64 + skew, padding, 0, 0, 0, 0))
            buf.extend(bytes((i * 37) & 0xFF for i in range(size)))
            if bump:
                _bump_count(buf)
        elif kind == "copy_record":
            src, dst = records[op[1] % len(records)], records[op[2] % len(records)]
            if src + 64 <= len(buf) and dst + 64 <= len(buf):
                buf[dst : dst + 64] = buf[src : src + 64]
        elif kind == "dup_blob":
            src = records[op[1] % len(records)]
            if src + 64 <= len(buf):
                size = min(struct.unpack_from("<Q", buf, src + 8)[0], len(buf) - src - 64)
                blob = bytes(buf[src : src + 64 + size])
                rec = _pad64(buf)
                buf.extend(blob)
                _put(buf, rec + 16, 8, rec + 64)
                if op[2]:
                    _bump_count(buf)
        elif kind == "delete":
            n = _position(op[1], buf, records)
            if n is not None:
                del buf[n : n + op[2]]
        elif kind == "insert":
            n = _position(op[1], buf, records)
            buf[n or 0 : n or 0] = op[2]
        else:  # pragma: no cover
            raise AssertionError(op)
    return bytes(buf)


@fuzz_settings(200)
@given(kind=SEED_KIND, ops=st.lists(w_op, min_size=1, max_size=4))
def test_weight_bin_mutations(seeds, scratch, kind, ops):
    seed = seeds[kind]
    data = mutate_weights(seed.files[WEIGHTS], seed.records, ops)
    with mutated_package(seed, scratch, WEIGHTS, data) as (work, pkg):
        check_blob_file(os.path.join(pkg, WEIGHTS))
        exercise(pkg, WEIGHTS, work)


# --------------------------------------------------------------------------------------------
# raw byte mutations (spec and manifest)

raw_op = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 1 << 16), st.integers(0, 7)),
    st.tuples(st.just("byte"), st.integers(0, 1 << 16), st.integers(0, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 1 << 16)),
    st.tuples(
        st.just("insert"),
        st.integers(0, 1 << 16),
        st.one_of(
            st.binary(min_size=1, max_size=64),
            st.sampled_from([b"\xef\xbb\xbf", b"\xff", b"\xc3", b"\x00", b"\xed\xa0\x80", b"{", b"[", b'"', b"\\"]),
        ),
    ),
    st.tuples(st.just("delete"), st.integers(0, 1 << 16), st.integers(1, 64)),
)


def mutate_bytes(data: bytes, ops) -> bytes:
    """Apply raw byte mutation ops (see ``raw_op``) to ``data``; positions wrap around."""
    buf = bytearray(data)
    for op in ops:
        kind = op[0]
        if kind == "truncate":
            del buf[op[1] % (len(buf) + 1) :]
            continue
        n = op[1] % (len(buf) + 1)
        if kind == "insert":
            buf[n:n] = op[2]
        elif kind == "delete":
            del buf[n : n + op[2]]
        elif n < len(buf):
            buf[n] = op[2] if kind == "byte" else buf[n] ^ (1 << op[2])
    return bytes(buf)


@fuzz_settings(150)
@given(kind=SEED_KIND, ops=st.lists(raw_op, min_size=1, max_size=4))
def test_spec_byte_mutations(seeds, scratch, kind, ops):
    seed = seeds[kind]
    data = mutate_bytes(seed.files[SPEC], ops)
    with mutated_package(seed, scratch, SPEC, data) as (work, pkg):
        exercise(pkg, SPEC, work)


@fuzz_settings(150)
@given(kind=SEED_KIND, ops=st.lists(raw_op, min_size=1, max_size=4))
def test_manifest_byte_mutations(seeds, scratch, kind, ops):
    seed = seeds[kind]
    data = mutate_bytes(seed.files[MANIFEST], ops)
    with mutated_package(seed, scratch, MANIFEST, data) as (work, pkg):
        exercise(pkg, MANIFEST, work)


# --------------------------------------------------------------------------------------------
# structured spec mutations: parse, change fields, serialize

INT_MAGIC = [
    0, 1, -1, 2, 5, 6, 8, 9, 10, 11, 12, 35, 37, 41, 42, 64, 128, 640, 1000, 65552, 2**31 - 1,
    -(2**31), 2**32, 2**40, 2**63 - 1, -(2**63), 2**64 - 1, 2**64 - 64,
]
STRINGS = [
    "", "main", "a", "b", "x", "]", "a]b", "[", "program.attributes[", "../x", "/etc/passwd",
    "@model_path/weights/weight.bin", "@model_path/weights/./weight.bin",
    "@model_path/weights/../weights/weight.bin", "@model_path/weights/../../Manifest.json",
    "@model_path/weights/", "@model_path/weights//weight.bin", "@model_path/weights/weight.bin/",
    "@model_path/weights/missing.bin", "@model_path/weights/weight.bin\x00",
    long_text("w", 300, "@model_path/weights/"), "@model_path/weights/\\weight.bin", "@model_path/weights",
    "@model_path/../Manifest.json", "CoreML8", "CoreML5", "CoreML99", "const", "val", "name",
    "\x00", "\u00e9", "\u65e5\u672c", long_text("x", 5000),
]
# Which (message, field) pairs a targeted "set" picks from; "any" is every scalar field.
TARGETS = {
    "any": None,
    "offset": {("BlobFileValue", "offset")},
    "fileName": {("BlobFileValue", "fileName")},
    "version": {("Model", "specificationVersion"), ("MILProgram", "version")},
    "dims": {("ConstantDimension", "size"), ("TensorType", "rank"), ("ArrayFeatureType", "shape"), ("Shape", "shape")},
    "dataType": {("TensorType", "dataType"), ("ArrayFeatureType", "dataType"), ("ImageFeatureType", "colorSpace")},
    "names": {
        ("FunctionEntry", "key"), ("FunctionDescription", "name"), ("ModelDescription", "defaultFunctionName"),
        ("BlockEntry", "key"), ("ValueEntry", "key"), ("ArgumentEntry", "key"), ("Function", "opset"),
        ("Operation", "type"), ("NamedValueType", "name"), ("Binding", "name"), ("Block", "outputs"),
        ("FeatureDescription", "name"),
    },
}
GRAFT_PLACES = [
    "program_attr", "function_attr", "block_attr", "op_attr", "op_input", "nested_block",
    "tensor_attr", "tuple", "block_input_type", "function_input_type",
]

s_int = st.one_of(st.sampled_from(INT_MAGIC), st.integers(-(2**64), 2**64))
s_str = st.sampled_from(STRINGS)
s_op = st.one_of(
    st.tuples(st.just("set"), st.sampled_from(sorted(TARGETS)), st.integers(0, 1 << 12), s_int, s_str),
    st.tuples(st.just("retarget"), st.integers(0, 31), st.integers(0, 7), st.sampled_from([0, 0, 1, -64, 64, 128])),
    st.tuples(st.just("graft"), st.integers(0, 31), st.sampled_from(GRAFT_PLACES), s_str),
    st.tuples(st.just("rename_function"), st.integers(0, 3), s_str),
    st.tuples(st.just("repeated"), st.integers(0, 1 << 12), st.sampled_from(["del_first", "del_last", "dup", "clear", "add"])),
    st.tuples(st.just("oneof"), st.integers(0, 1 << 12)),
    st.tuples(st.just("clear"), st.integers(0, 1 << 12)),
)


def _walk(msg, out: dict) -> None:
    """Collect mutation sites of ``msg`` and everything below it, in a fixed order."""
    for f in msg.DESCRIPTOR.fields:
        key = (msg.DESCRIPTOR.name, f.name)
        if f.message_type is not None:
            if f.is_repeated:
                out["repeated"].append((msg, f))
                for sub in getattr(msg, f.name):
                    _walk(sub, out)
            elif msg.HasField(f.name):
                out["set_msg"].append((msg, f))
                _walk(getattr(msg, f.name), out)
            elif f.containing_oneof is not None:
                out["oneof"].append((msg, f))
        else:
            out["scalar"].append((msg, f, key))
            if f.is_repeated:
                out["repeated"].append((msg, f))


def _sites(model) -> dict:
    out = {"scalar": [], "repeated": [], "set_msg": [], "oneof": []}
    _walk(model, out)
    return out


def _coerce(f, ival: int, sval: str):
    """A value of field ``f``'s type built from the drawn int or string."""
    t = f.cpp_type
    if t in (f.CPPTYPE_INT32, f.CPPTYPE_ENUM):
        return (ival + 2**31) % 2**32 - 2**31
    if t == f.CPPTYPE_INT64:
        return (ival + 2**63) % 2**64 - 2**63
    if t == f.CPPTYPE_UINT32:
        return ival % 2**32
    if t == f.CPPTYPE_UINT64:
        return ival % 2**64
    if t == f.CPPTYPE_BOOL:
        return bool(ival & 1)
    if t in (f.CPPTYPE_FLOAT, f.CPPTYPE_DOUBLE):
        return float(ival % 2**53) if ival >= 0 else float("nan")
    sval = text(sval)
    if f.type == f.TYPE_BYTES:
        return sval.encode("utf-8")
    return sval


def _blob_values(model) -> list:
    from milsurgery.spec import iter_blob_refs

    return [r.value for r in iter_blob_refs(model)]


def _first_block(model):
    fn = model.mlProgram.functions[0].value if model.mlProgram.functions else model.mlProgram.functions.add(key="main").value
    block = fn.block_specializations[0].value if fn.block_specializations else fn.block_specializations.add(key="CoreML8").value
    return fn, block


def _graft(model, value, place: str, key: str, index: int) -> None:
    fn, block = _first_block(model)
    ops = block.operations
    op = ops[index % len(ops)] if len(ops) else ops.add(type="const")
    if place == "program_attr":
        model.mlProgram.attributes.add(key=key).value.CopyFrom(value)
    elif place == "function_attr":
        fn.attributes.add(key=key).value.CopyFrom(value)
    elif place == "block_attr":
        block.attributes.add(key=key).value.CopyFrom(value)
    elif place == "op_attr":
        op.attributes.add(key=key).value.CopyFrom(value)
    elif place == "op_input":
        op.inputs.add(key=key).value.arguments.add().value.CopyFrom(value)
    elif place == "nested_block":
        nested = op.blocks.add()
        const = nested.operations.add(type="const")
        const.outputs.add(name=key or "nested").type.CopyFrom(value.type)
        const.attributes.add(key="val").value.CopyFrom(value)
        nested.outputs.append(key or "nested")
    elif place == "tensor_attr":
        target = op.outputs[0].type if op.outputs else op.outputs.add(name=key).type
        target.tensorType.attributes.add(key=key).value.CopyFrom(value)
    elif place == "tuple":
        holder = op.attributes.add(key=key).value
        holder.immediateValue.tuple.values.add().CopyFrom(value)
    elif place == "block_input_type":
        block.inputs.add(name=key).type.tensorType.attributes.add(key=key).value.CopyFrom(value)
    elif place == "function_input_type":
        fn.inputs.add(name=key).type.tensorType.attributes.add(key=key).value.CopyFrom(value)
    else:  # pragma: no cover
        raise AssertionError(place)


def _rename_function(model, index: int, new: str) -> None:
    entries = model.mlProgram.functions
    if not len(entries):
        return
    entry = entries[index % len(entries)]
    old = entry.key
    entry.key = new
    for d in model.description.functions:
        if d.name == old:
            d.name = new
    if model.description.defaultFunctionName == old:
        model.description.defaultFunctionName = new


def _repeated_action(msg, f, action: str) -> None:
    items = getattr(msg, f.name)
    n = len(items)
    if action == "clear" or (action.startswith("del") and n):
        if action == "clear":
            msg.ClearField(f.name)
        else:
            del items[0 if action == "del_first" else n - 1]
    elif action == "dup" and n:
        if f.message_type is not None:
            items.add().CopyFrom(items[0])
        else:
            items.append(items[0])
    elif action == "add":
        if f.message_type is not None:
            items.add()
        else:
            items.append(_coerce(f, 7, "added"))


def mutate_spec(data: bytes, records, ops) -> bytes:
    """Parse ``data`` as a Model, apply structured ops (see ``s_op``), serialize.

    ``records`` are the record offsets of the package's weight.bin (``retarget`` points a blob
    reference at one of them). An op that does not apply to the current model is skipped.
    """
    model = pb.Model.FromString(data)
    for op in ops:
        kind = op[0]
        try:
            if kind == "set":
                _, target, index, ival, sval = op
                wanted = TARGETS[target]
                sites = [(m, f) for m, f, key in _sites(model)["scalar"] if wanted is None or key in wanted]
                if not sites:
                    continue
                m, f = sites[index % len(sites)]
                value = _coerce(f, ival, sval)
                if f.is_repeated:
                    items = getattr(m, f.name)
                    if len(items):
                        items[ival % len(items)] = value
                    else:
                        items.append(value)
                else:
                    setattr(m, f.name, value)
            elif kind == "retarget":
                values = _blob_values(model)
                if values:
                    v = values[op[1] % len(values)]
                    v.blobFileValue.offset = max(records[op[2] % len(records)] + op[3], 0)
            elif kind == "graft":
                values = _blob_values(model)
                if values:
                    value = pb.Value()
                    value.CopyFrom(values[op[1] % len(values)])
                    _graft(model, value, op[2], text(op[3]), op[1])
            elif kind == "rename_function":
                _rename_function(model, op[1], text(op[2]))
            elif kind in ("repeated", "oneof", "clear"):
                sites = _sites(model)[{"repeated": "repeated", "oneof": "oneof", "clear": "set_msg"}[kind]]
                if not sites:
                    continue
                m, f = sites[op[1] % len(sites)]
                if kind == "repeated":
                    _repeated_action(m, f, op[2])
                elif kind == "oneof":
                    getattr(m, f.name).SetInParent()
                else:
                    m.ClearField(f.name)
            else:  # pragma: no cover
                raise AssertionError(op)
        except (ValueError, TypeError):
            continue  # the value does not fit the field (e.g. out of range): the op does not apply
    return model.SerializeToString()


@fuzz_settings(200)
@given(kind=SEED_KIND, ops=st.lists(s_op, min_size=1, max_size=5))
def test_spec_structured_mutations(seeds, scratch, kind, ops):
    seed = seeds[kind]
    data = mutate_spec(seed.files[SPEC], seed.records, ops)
    with mutated_package(seed, scratch, SPEC, data) as (work, pkg):
        exercise(pkg, SPEC, work)


# --------------------------------------------------------------------------------------------
# Manifest.json mutations at the JSON level

DEEP = "\u0000deep-nesting\u0000"  # replaced by 100000 nested arrays after serialization
BIGNUM = "\u0000big-number\u0000"  # replaced by a 5000-digit JSON number
JSON_VALUES = [
    None, True, 0, -1, 1.5, 10**30, "", [], {}, ["1.0.0"], {"path": "com.apple.CoreML/model.mlmodel"},
    "1.0.0", "1.0", "1", "0.9", "1.0.1", "1.1.0", "2.0.0", "1.0.0.0", "1.0.0-beta", " 1.0.0",
    "1.0.0\n", "\uff11.0.0", "\u0661.0.0", long_text("1", 5000),
    "com.apple.CoreML/model.mlmodel", "com.apple.CoreML/weights", "com.apple.CoreML/weights/weight.bin",
    "com.apple.CoreML", ".", "..", "../Manifest.json", "com.apple.CoreML/../../Manifest.json",
    "/etc/passwd", "\\etc\\passwd", "C:\\x", "com.apple.CoreML\\model.mlmodel",
    "com.apple.CoreML//model.mlmodel", "com.apple.CoreML/./model.mlmodel",
    "com.apple.CoreML/model.mlmodel\u0000", "\ud800", long_text("a", 5000), DEEP, BIGNUM,
]
j_value = st.sampled_from(JSON_VALUES)
j_op = st.one_of(
    st.tuples(st.just("set"), st.integers(0, 63), j_value),
    st.tuples(st.just("delete"), st.integers(1, 63)),
    st.tuples(st.just("rename_key"), st.integers(1, 63), st.sampled_from(["", "x", "path", "rootModelIdentifier", "\ud800"])),
    st.tuples(st.just("root_to"), st.integers(0, 3)),
    st.tuples(st.just("add_item"), st.sampled_from(["NEW", ""]), j_value),
)


def _json_paths(obj, prefix=()) -> list[tuple]:
    out = [prefix]
    if isinstance(obj, dict):
        for k in obj:
            out += _json_paths(obj[k], prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _json_paths(v, prefix + (i,))
    return out


def _json_get(obj, path):
    for k in path:
        obj = obj[k]
    return obj


def mutate_manifest(data: bytes, ops) -> bytes:
    """Parse ``data`` as JSON, apply ops (see ``j_op``), serialize (markers become raw JSON)."""
    doc = json.loads(data)
    for op in ops:
        kind = op[0]
        paths = _json_paths(doc)
        if kind == "set":
            path = paths[op[1] % len(paths)]
            if not path:
                doc = text(op[2])
            else:
                _json_get(doc, path[:-1])[path[-1]] = text(op[2])
        elif kind in ("delete", "rename_key"):
            paths = [p for p in paths if p and isinstance(_json_get(doc, p[:-1]), dict)]
            if not paths:
                continue
            path = paths[op[1] % len(paths)]
            parent = _json_get(doc, path[:-1])
            value = parent.pop(path[-1])
            if kind == "rename_key":
                parent[op[2]] = value
        elif kind == "root_to":
            if isinstance(doc, dict) and isinstance(doc.get("itemInfoEntries"), dict):
                keys = sorted(doc["itemInfoEntries"]) + ["MISSING"]
                doc["rootModelIdentifier"] = keys[op[1] % len(keys)]
        elif kind == "add_item":
            if isinstance(doc, dict) and isinstance(doc.get("itemInfoEntries"), dict):
                doc["itemInfoEntries"][op[1]] = {"author": "x", "description": "x", "name": "x", "path": text(op[2])}
        else:  # pragma: no cover
            raise AssertionError(op)
    out = json.dumps(doc, indent=4, sort_keys=False, ensure_ascii=True)
    out = out.replace(json.dumps(DEEP), "[" * 100000 + "]" * 100000)
    out = out.replace(json.dumps(BIGNUM), "1" * 5000)
    return out.encode("utf-8")


@fuzz_settings(150)
@given(kind=SEED_KIND, ops=st.lists(j_op, min_size=1, max_size=4))
def test_manifest_json_mutations(seeds, scratch, kind, ops):
    seed = seeds[kind]
    data = mutate_manifest(seed.files[MANIFEST], ops)
    with mutated_package(seed, scratch, MANIFEST, data) as (work, pkg):
        exercise(pkg, MANIFEST, work)


# --------------------------------------------------------------------------------------------
# every command, any file: a failed command leaves its source byte-identical

any_mutation = st.one_of(
    st.tuples(st.just(WEIGHTS), st.lists(w_op, min_size=1, max_size=3)),
    st.tuples(st.just(SPEC), st.lists(s_op, min_size=1, max_size=3)),
    st.tuples(st.just(SPEC), st.lists(raw_op, min_size=1, max_size=2)),
    st.tuples(st.just(MANIFEST), st.lists(j_op, min_size=1, max_size=3)),
)


def apply_mutation(seed: Seed, rel: str, ops) -> bytes:
    data = seed.files[rel]
    if rel == WEIGHTS:
        return mutate_weights(data, seed.records, ops)
    if rel == MANIFEST:
        return mutate_manifest(data, ops)
    if ops and ops[0][0] in ("set", "retarget", "graft", "rename_function", "repeated", "oneof", "clear"):
        return mutate_spec(data, seed.records, ops)
    return mutate_bytes(data, ops)


def _commands(pkg: str, seed: Seed, work: str):
    """(name, call, output path or None, edits the source in place) for every command."""
    out = lambda name: os.path.join(work, name)  # noqa: E731
    return [
        ("inspect", lambda: inspect_package(pkg), None, False),
        ("memory_model", lambda: memory_model(pkg), None, False),
        ("verify", lambda: verify(pkg, [seed.path]), None, False),
        ("merge", lambda: merge([pkg, f"{seed.path}:{_first_function(seed)}=seedfn"], out("m.mlpackage")),
         out("m.mlpackage"), False),
        ("shrink", lambda: shrink(pkg, out("s.mlpackage")), out("s.mlpackage"), False),
        ("extract", lambda: extract(pkg, [_first_function(seed)], out("e.mlpackage")), out("e.mlpackage"), False),
        ("extract_single", lambda: extract(pkg, [_first_function(seed)], out("e1.mlpackage"), single=True),
         out("e1.mlpackage"), False),
        ("remove", lambda: remove(pkg, ["b"], out("r.mlpackage")), out("r.mlpackage"), False),
        ("rename", lambda: rename(pkg, [f"{_first_function(seed)}=renamed"], out("n.mlpackage")),
         out("n.mlpackage"), False),
        ("shrink_in_place", lambda: shrink(pkg, in_place=True), None, True),
        ("append", lambda: append(pkg, [f"{seed.path}:{_first_function(seed)}=appended"]), None, True),
    ]


def _first_function(seed: Seed) -> str:
    return "main" if seed.kind == "single" else "a"


@fuzz_settings(100)
@given(kind=SEED_KIND, mutation=any_mutation)
def test_failed_commands_leave_sources_untouched(seeds, scratch, kind, mutation):
    seed = seeds[kind]
    rel, ops = mutation
    data = apply_mutation(seed, rel, ops)
    seed_before = tree_digest(seed.path)
    with mutated_package(seed, scratch, rel, data) as (work, pkg):
        names = {os.path.basename(rel), PKG_NAME, os.path.basename(seed.path)}
        for name, call, output, in_place in _commands(pkg, seed, work):
            before = tree_digest(pkg)
            names_here = names | ({os.path.basename(output)} if output else set())
            _, err = attempt(name, call, names_here)
            if err is not None or not in_place:
                assert tree_digest(pkg) == before, f"{name} ({'failed' if err else 'succeeded'}) changed the source"
            if err is not None and output is not None:
                assert not os.path.lexists(output), f"{name} failed but left {output}"
            partial = [n for n in os.listdir(work) if ".milsurgery-" in n]
            assert partial == [], f"{name} left {partial}"
    assert tree_digest(seed.path) == seed_before, "a command changed the unmutated second source"


# --------------------------------------------------------------------------------------------
# the harness itself: unmutated seeds pass every check


def test_unmutated_seeds_pass_every_check(seeds, scratch):
    for seed in seeds.values():
        with mutated_package(seed, scratch) as (work, pkg):
            check_blob_file(os.path.join(pkg, WEIGHTS))
            info = inspect_package(pkg)
            assert info["functions"]
            exercise(pkg, WEIGHTS, work)
            assert mutate_weights(seed.files[WEIGHTS], seed.records, []) == seed.files[WEIGHTS]
            assert pb.Model.FromString(mutate_spec(seed.files[SPEC], seed.records, [])) == pb.Model.FromString(seed.files[SPEC])
            assert json.loads(mutate_manifest(seed.files[MANIFEST], [])) == json.loads(seed.files[MANIFEST])


# --------------------------------------------------------------------------------------------
# Regressions: faults the fuzzers above found, as deterministic reproducers. Each docstring says
# what used to happen; each test states the behaviour the library owes: a MilSurgeryError naming
# the file (or a correct output), never another exception.


def expect_clean_error(fn, names) -> MilSurgeryError:
    """``fn`` must raise a MilSurgeryError naming one of ``names``."""
    with pytest.raises(MilSurgeryError) as info:
        fn()
    assert_names_file("call", info.value, names)
    return info.value


def _write(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def _edit_manifest(pkg: str, edit) -> None:
    path = os.path.join(pkg, MANIFEST)
    with open(path, "rb") as f:
        doc = json.loads(f.read())
    data = edit(doc)
    _write(path, data if isinstance(data, bytes) else json.dumps(doc, indent=4).encode())


def _edit_spec(pkg: str, edit) -> None:
    path = os.path.join(pkg, SPEC)
    with open(path, "rb") as f:
        model = pb.Model.FromString(f.read())
    edit(model)
    _write(path, model.SerializeToString())


def _blob_value(model, op_name: str):
    from milsurgery.spec import iter_blob_refs

    return next(r.value for r in iter_blob_refs(model) if r.op_name == op_name)


def _open_and_inspect(pkg: str) -> None:
    names = {PKG_NAME}
    expect_clean_error(lambda: Package(pkg).close(), names)
    expect_clean_error(lambda: inspect_package(pkg), names)


def test_regression_manifest_deeply_nested_json(seeds, scratch):
    """RecursionError from json.loads in Package._read_manifest (package.py)."""
    with mutated_package(seeds["fp16"], scratch, MANIFEST, b"[" * 100000 + b"]" * 100000) as (_, pkg):
        _open_and_inspect(pkg)


def test_regression_manifest_number_with_5000_digits(seeds, scratch):
    """ValueError (int max_str_digits) from json.loads in Package._read_manifest."""
    with mutated_package(seeds["fp16"], scratch, MANIFEST, b"1" * 5000) as (_, pkg):
        _open_and_inspect(pkg)


def test_regression_manifest_version_with_5000_digits(seeds, scratch):
    """ValueError (int max_str_digits) from int() in package._parse_version."""
    with mutated_package(seeds["fp16"], scratch) as (_, pkg):
        _edit_manifest(pkg, lambda m: m.__setitem__("fileFormatVersion", "1" * 5000))
        _open_and_inspect(pkg)


@pytest.mark.parametrize("bad", ["com.apple.CoreML/model.mlmodel\x00", "com.apple.CoreML/\ud800"], ids=["nul", "surrogate"])
def test_regression_manifest_item_path_unencodable(seeds, scratch, bad):
    """ValueError (embedded null byte) / UnicodeEncodeError from os.path.realpath in
    Package._item_path, for any itemInfoEntries path, root or not."""
    with mutated_package(seeds["fp16"], scratch) as (_, pkg):
        _edit_manifest(pkg, lambda m: m["itemInfoEntries"].__setitem__("NEW", {"path": bad}))
        _open_and_inspect(pkg)


def test_regression_spec_blob_file_name_with_nul(seeds, scratch):
    """ValueError (embedded null byte) from os.path.realpath in Package._weight_file."""
    with mutated_package(seeds["fp16"], scratch) as (_, pkg):
        _edit_spec(pkg, lambda m: setattr(_blob_value(m, "layer0_weight").blobFileValue, "fileName",
                                          "@model_path/weights/weight.bin\x00"))
        _open_and_inspect(pkg)


def test_regression_merge_program_attribute_key_with_bracket(seeds, scratch):
    """KeyError in assemble.build_model: the key of a program attribute holding a blob is parsed
    back out of the location text ``program.attributes[KEY]``, so a key containing ``]`` is cut
    short. Package and inspect accept the package; merge/shrink/extract/remove/rename crash."""
    with mutated_package(seeds["fp16"], scratch) as (work, pkg):
        _edit_spec(pkg, lambda m: m.mlProgram.attributes.add(key="a]b").value.CopyFrom(_blob_value(m, "layer0_weight")))
        inspect_package(pkg)
        out = os.path.join(work, OUT_NAME)
        try:
            merge([pkg], out)
        except MilSurgeryError as exc:
            assert_names_file("merge", exc, {PKG_NAME, OUT_NAME})
            assert not os.path.lexists(out)
        else:
            assert_same_blobs(pkg, out)


def test_regression_merge_function_named_empty_with_program_attribute_blob(seeds, scratch):
    """AssertionError "a copied function must walk like its source" in assemble.build_model:
    Package.function_refs("") mixes program-attribute references (function "") with those of a
    function really named "". Package and inspect accept the package."""

    def edit(m):
        m.mlProgram.attributes.add(key="k").value.CopyFrom(_blob_value(m, "layer0_weight"))
        m.mlProgram.functions[0].key = ""
        m.description.functions[0].name = ""
        m.description.defaultFunctionName = ""

    with mutated_package(seeds["fp16"], scratch) as (work, pkg):
        _edit_spec(pkg, edit)
        error = expect_clean_error(lambda: Package(pkg).close(), {PKG_NAME})
        assert "empty name" in str(error)  # now rejected at open: "" is nobody's function name
        out = os.path.join(work, OUT_NAME)
        expect_clean_error(lambda: merge([pkg], out), {PKG_NAME})
        assert not os.path.lexists(out)


def test_regression_merge_duplicate_program_attribute_keys_swaps_blobs(seeds, scratch):
    """Silent corruption: two program attributes with the same key, holding different blobs.
    assemble.build_model pairs references by location text, so both output references point at
    the second attribute's blob. merge(verify=True) succeeds: verify does not look at program
    attributes."""

    def edit(m):
        m.mlProgram.attributes.add(key="k").value.CopyFrom(_blob_value(m, "layer0_weight"))
        m.mlProgram.attributes.add(key="k").value.CopyFrom(_blob_value(m, "layer1_weight"))

    with mutated_package(seeds["fp16"], scratch) as (work, pkg):
        _edit_spec(pkg, edit)
        out = os.path.join(work, OUT_NAME)
        try:
            merge([pkg], out, verify=True)
        except MilSurgeryError as exc:  # refusing such a package is fine too
            assert_names_file("merge", exc, {PKG_NAME, OUT_NAME})
            assert not os.path.lexists(out)
        else:
            assert_same_blobs(pkg, out)


def test_regression_merge_verify_leaves_output_that_does_not_open(seeds, scratch):
    """merge(verify=True) wrote an output that does not open (same duplicate-key fault, blobs of
    different sizes): verify_or_remove raises the SpecError from Package(output) without removing
    the output, so a failed merge leaves a broken package behind."""

    def edit(m):
        m.mlProgram.attributes.add(key="k").value.CopyFrom(_blob_value(m, "layer0_weight"))
        m.mlProgram.attributes.add(key="k").value.CopyFrom(_blob_value(m, "layer0_bias"))

    with mutated_package(seeds["fp16"], scratch) as (work, pkg):
        _edit_spec(pkg, edit)
        out = os.path.join(work, OUT_NAME)
        try:
            merge([pkg], out, verify=True)
        except MilSurgeryError as exc:
            assert_names_file("merge", exc, {PKG_NAME, OUT_NAME})
            assert not os.path.lexists(out), f"merge failed ({exc}) but left {out}"
        else:
            assert_same_blobs(pkg, out)


@pytest.mark.parametrize("last_differs", [False, True])
def test_regression_verify_duplicate_map_entry(seeds, scratch, last_differs):
    """IndexError in verify._block_difference: an op whose attribute entries differ from the
    source's only by a repeated key (the dicts built from them are equal) leaves ``keys`` empty.
    Maps are compared as maps, where the last entry of a repeated key wins (as when protobuf
    parses a map): a repeated identical entry is the same map, a different last one is not."""

    def edit(m):
        op = m.mlProgram.functions[0].value.block_specializations[0].value.operations[0]
        extra = op.attributes.add()
        extra.CopyFrom(op.attributes[0])
        if last_differs:
            extra.value.docString = "changed"

    seed = seeds["fp16"]
    with mutated_package(seed, scratch) as (_, pkg):
        _edit_spec(pkg, edit)
        inspect_package(pkg)
        try:
            report = verify(pkg, [seed.path])
        except MilSurgeryError as exc:
            assert_names_file("verify", exc, {PKG_NAME, os.path.basename(seed.path)})
        else:
            assert report.equivalent != last_differs


def test_regression_verify_staged_output_that_does_not_open(seeds, scratch):
    """The verify step of merge(verify=True) (now verify.verify_staged, run on the staged package
    before it is moved into place) once let the error of an output that does not even open
    escape unexplained and left the output behind. It must raise a clean error naming the
    destination, with FormatError.path rewritten from the staging directory to it."""
    from milsurgery.assemble import Pick
    from milsurgery.verify import verify_staged

    seed = seeds["fp16"]
    with mutated_package(seed, scratch) as (work, staged):
        _write(os.path.join(staged, WEIGHTS), seed.files[WEIGHTS][:100])  # cut inside blob 0
        dest = os.path.join(work, OUT_NAME)
        with Package(seed.path) as src:
            picks = [Pick(src, name, name) for name in src.functions]
            exc = expect_clean_error(lambda: verify_staged(staged, dest, picks), {OUT_NAME})
        assert staged not in str(exc), f"the message names the staging directory: {exc}"
        assert isinstance(exc, FormatError) and exc.path.startswith(dest)