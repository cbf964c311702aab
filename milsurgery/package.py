"""``.mlpackage`` directories: open and validate one, and write a new one atomically.

Opening validates Manifest.json, parses the spec, opens every weight file the spec references and
checks every blob reference (file inside the package's weights directory, offset of a real record,
blob dtype and size matching the tensor type that references it). After that, code trusts what
it holds.

New packages are built in a temporary directory beside the destination
(``.NAME.milsurgery-partial-PID-XXXX``) and renamed into place at the end, so the destination
appears complete or not at all.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from ._proto import milsurgery_spec_pb2 as pb
from .blobfile import Blob, BlobFile
from .errors import (
    BlobFileError,
    DestinationExistsError,
    ManifestError,
    PackageError,
    SpecError,
    UnsafePathError,
    WriteError,
)
from .formats import (
    DATA_DIR,
    MANIFEST_FORMAT_VERSION,
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    MAX_SPEC_BYTES,
    MODEL_PATH_PREFIX,
    SPEC_AUTHOR,
    SPEC_DESCRIPTION,
    SPEC_ITEM_PATH,
    SPEC_NAME,
    WEIGHTS_DESCRIPTION,
    WEIGHTS_ITEM_PATH,
    WEIGHTS_NAME,
)
from .spec import (
    BlobRef,
    blob_dtype_for,
    default_function,
    function_descriptions,
    iter_blob_refs,
    parse_spec,
    program_functions,
    tensor_element_count,
    values_in_value,
)

__all__ = ["Package", "ResolvedRef", "StagedPackage", "open_package", "locate_spec", "PARTIAL_MARKER"]

#: Part of the name of every temporary directory milsurgery creates beside a destination.
PARTIAL_MARKER = ".milsurgery-partial-"


@dataclass
class ResolvedRef:
    """A blob reference together with the blob it points at."""

    ref: BlobRef
    file: BlobFile
    blob: Blob


def _parse_version(text: str) -> tuple[int, ...] | None:
    if not isinstance(text, str) or not re.fullmatch(r"\d{1,9}(\.\d{1,9}){0,2}", text):
        return None
    return tuple(int(p) for p in text.split("."))


def _unusable_name(text: str) -> str | None:
    """Why ``text`` cannot name a file on this system, or None."""
    if "\x00" in text:
        return "contains a NUL character"
    try:
        os.fsencode(text)
    except UnicodeEncodeError:
        return "cannot be encoded as a file name"
    return None


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


class Package:
    """An opened, validated ``.mlpackage``.

    Attributes: ``path``, ``manifest`` (dict), ``spec_path``, ``weights_dir``, ``model`` (the
    parsed spec, :class:`milsurgery.spec.pb.Model`), ``blob_files`` (fileName as written in the
    spec -> :class:`BlobFile`), ``refs`` (every blob reference, resolved), ``functions`` (names in
    description order) and ``descriptions`` (name -> FunctionDescription).
    Opening reads Manifest.json, the spec and the 64-byte blob records; no weight bytes.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.path.abspath(os.fspath(path))
        self.blob_files: dict[str, BlobFile] = {}
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    # -- opening ---------------------------------------------------------------------------------
    def _open(self) -> None:
        self._locate_spec()
        self.weights_dir = os.path.join(os.path.dirname(self.spec_path), WEIGHTS_NAME)
        try:
            st = os.stat(self.spec_path)
            if st.st_size > MAX_SPEC_BYTES:
                raise SpecError(self.spec_path, f"spec is {st.st_size} bytes, too large to be a model spec")
            with open(self.spec_path, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise SpecError(self.spec_path, f"cannot read spec: {exc.strerror}") from None
        self.spec_size = len(data)
        self.model: pb.Model = parse_spec(data, self.spec_path)
        self.descriptions = function_descriptions(self.model)
        self.functions = list(self.descriptions)
        self.default_function = default_function(self.model)
        self.refs = [self._resolve(ref) for ref in iter_blob_refs(self.model)]

    def _locate_spec(self) -> None:
        """Read and validate Manifest.json; set ``manifest`` and ``spec_path``."""
        if not os.path.isdir(self.path):
            what = "does not exist" if not os.path.exists(self.path) else "is not a directory"
            raise PackageError(f"{self.path}: package {what}")
        self._root_real = os.path.realpath(self.path)
        self.manifest_path = os.path.join(self.path, MANIFEST_NAME)
        self.manifest = self._read_manifest()
        self.spec_path = self._spec_path_from_manifest()

    def _read_manifest(self) -> dict:
        path = self.manifest_path
        try:
            if os.path.getsize(path) > MAX_MANIFEST_BYTES:
                raise ManifestError(path, f"larger than {MAX_MANIFEST_BYTES} bytes")
            with open(path, "rb") as f:
                manifest = json.loads(f.read().decode("utf-8"))
        except FileNotFoundError:
            raise ManifestError(path, "missing: not an .mlpackage") from None
        except OSError as exc:
            raise ManifestError(path, f"cannot read: {exc.strerror}") from None
        except (ValueError, RecursionError) as exc:
            # JSONDecodeError and UnicodeDecodeError are ValueErrors; so is an integer too long to
            # convert. Nesting deeper than the interpreter's recursion limit is a RecursionError.
            pos = getattr(exc, "pos", getattr(exc, "start", None))
            what = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
            raise ManifestError(path, f"not valid JSON ({what})", pos) from None
        if not isinstance(manifest, dict):
            raise ManifestError(path, "top level is not a JSON object")
        version = manifest.get("fileFormatVersion")
        parsed = _parse_version(version)
        if parsed is None:
            raise ManifestError(path, f"field fileFormatVersion: {version!r} is not a version number")
        if parsed > _parse_version(MANIFEST_FORMAT_VERSION):
            raise ManifestError(
                path,
                f"field fileFormatVersion: {version} is newer than {MANIFEST_FORMAT_VERSION}, "
                "the newest this tool (and Core ML) reads",
            )
        items = manifest.get("itemInfoEntries")
        if not isinstance(items, dict) or not all(isinstance(v, dict) for v in items.values()):
            raise ManifestError(path, "field itemInfoEntries: missing or not an object of objects")
        for key, item in items.items():
            if not isinstance(item.get("path"), str) or not item["path"]:
                raise ManifestError(path, f"field itemInfoEntries[{key}].path: missing or not a string")
            self._item_path(key, item["path"])  # validates that it stays inside Data/
        root = manifest.get("rootModelIdentifier")
        if not isinstance(root, str) or root not in items:
            raise ManifestError(
                path, f"field rootModelIdentifier: {root!r} does not name an entry of itemInfoEntries"
            )
        return manifest

    def _item_path(self, key: str, rel: str) -> str:
        data_dir = os.path.join(self.path, DATA_DIR)
        problem = _unusable_name(rel)
        if problem:
            raise ManifestError(self.manifest_path, f"field itemInfoEntries[{key}].path: {rel!r} {problem}")
        parts = rel.replace("\\", "/").split("/")
        if os.path.isabs(rel) or rel.startswith(("/", "\\")) or ".." in parts:
            raise UnsafePathError(
                f"{self.manifest_path}: field itemInfoEntries[{key}].path: {rel!r} leaves {DATA_DIR}/"
            )
        full = os.path.join(data_dir, *parts)
        if not _inside(os.path.realpath(full), os.path.join(self._root_real, DATA_DIR)):
            raise UnsafePathError(
                f"{self.manifest_path}: field itemInfoEntries[{key}].path: {rel!r} resolves "
                f"outside the package (symlink)"
            )
        return full

    def _spec_path_from_manifest(self) -> str:
        root = self.manifest["rootModelIdentifier"]
        path = self._item_path(root, self.manifest["itemInfoEntries"][root]["path"])
        if not os.path.isfile(path):
            raise ManifestError(
                self.manifest_path,
                f"field rootModelIdentifier: spec {os.path.relpath(path, self.path)} is missing "
                "or not a file",
            )
        return path

    def _weight_file(self, ref: BlobRef) -> BlobFile:
        name = ref.file_name
        found = self.blob_files.get(name)
        if found is not None:
            return found
        where = f"{self.spec_path}: {ref.describe()}"
        problem = _unusable_name(name)
        if problem:
            raise SpecError(self.spec_path, f"{ref.describe()}: blob file name {name!r} {problem}")
        if not name.startswith(MODEL_PATH_PREFIX):
            raise UnsafePathError(
                f"{where}: blob file {name!r} is not under {MODEL_PATH_PREFIX!r}, the package's "
                "weights directory"
            )
        rel = name[len(MODEL_PATH_PREFIX) :]
        parts = rel.split("/")
        if not rel or os.path.isabs(rel) or ".." in parts or "\\" in rel or "" in parts:
            raise UnsafePathError(f"{where}: blob file {name!r} leaves the package's weights directory")
        full = os.path.join(self.weights_dir, *parts)
        if not _inside(os.path.realpath(full), os.path.realpath(self.weights_dir)):
            raise UnsafePathError(f"{where}: blob file {name!r} resolves outside the package (symlink)")
        if not os.path.isfile(full):
            raise PackageError(f"{where}: blob file {name!r} does not exist ({full})")
        self.blob_files[name] = BlobFile(full)
        return self.blob_files[name]

    def resolve(self, ref: BlobRef) -> ResolvedRef:
        """The blob a reference into this package's spec points at (checked like at open)."""
        return self._resolve(ref)

    def other_items(self) -> list[str]:
        """Paths (as in Manifest.json) of items besides the spec and the weights directory:
        what a command writing a new package from this one does not carry over."""
        root = self.manifest["rootModelIdentifier"]
        weights = os.path.realpath(self.weights_dir)
        out = []
        for key, item in self.manifest["itemInfoEntries"].items():
            if key == root or os.path.realpath(self._item_path(key, item["path"])) == weights:
                continue
            out.append(item["path"])
        return out

    def value_refs(self, value: pb.Value, where: str) -> list[ResolvedRef]:
        """The blobs referenced from ``value`` (a Value of this package's spec, e.g. a program
        attribute) and the Values nested in it; ``where`` names it in messages."""
        return [
            self._resolve(BlobRef("", "", "", loc, v))
            for loc, v in values_in_value(value, where)
            if v.WhichOneof("value") == "blobFileValue"
        ]

    def _resolve(self, ref: BlobRef) -> ResolvedRef:
        bf = self._weight_file(ref)
        blob = bf.blobs.get(ref.offset)
        if blob is None:
            beyond = ref.offset >= bf.file_size
            raise SpecError(
                self.spec_path,
                f"{ref.describe()}: blob offset {ref.offset} "
                + (f"is past the end of {bf.path} ({bf.file_size} bytes)" if beyond else f"is not a blob record in {bf.path}"),
            )
        want = blob_dtype_for(ref.value)
        if want is None or want.code != blob.dtype.code:
            tt = ref.value.type.tensorType.dataType if ref.value.type.HasField("tensorType") else None
            wanted = pb.DataType.Name(tt) if tt in pb.DataType.values() else repr(tt)
            raise SpecError(
                self.spec_path,
                f"{ref.describe()}: tensor type {wanted} does not match blob dtype "
                f"{blob.dtype.name} at offset {ref.offset} of {bf.path}",
            )
        n = tensor_element_count(ref.value.type.tensorType)
        if n is not None and n != blob.element_count:
            raise SpecError(
                self.spec_path,
                f"{ref.describe()}: tensor type holds {n} elements but the blob at offset "
                f"{ref.offset} of {bf.path} holds {blob.element_count}",
            )
        return ResolvedRef(ref, bf, blob)

    # -- queries -------------------------------------------------------------------------------
    def function(self, name: str) -> pb.Function:
        found = program_functions(self.model).get(name)
        if found is None:
            raise KeyError(name)
        return found

    def function_refs(self, name: str) -> list[ResolvedRef]:
        return [r for r in self.refs if r.ref.function == name]

    def __enter__(self) -> Package:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for bf in self.blob_files.values():
            bf.close()

    def __repr__(self) -> str:
        return f"Package({self.path!r}, functions={self.functions})"


def locate_spec(path: str | os.PathLike) -> str:
    """The spec file of the package at ``path``, found through its Manifest.json (validated as
    when opening). Reads only Manifest.json: for callers that must read a spec that opening the
    package would refuse."""
    pkg = Package.__new__(Package)
    pkg.path = os.path.abspath(os.fspath(path))
    pkg.blob_files = {}
    pkg._locate_spec()
    return pkg.spec_path


def open_package(path: str | os.PathLike) -> Package:
    """Open and validate a ``.mlpackage``; raises a :class:`MilSurgeryError` subclass on faults."""
    return Package(path)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def manifest_for(spec_id: str | None = None, weights_id: str | None = None) -> dict:
    """A Manifest.json object for a package holding a spec and a weights directory."""
    spec_id = spec_id or str(uuid.uuid4()).upper()
    weights_id = weights_id or str(uuid.uuid4()).upper()
    return {
        "fileFormatVersion": MANIFEST_FORMAT_VERSION,
        "itemInfoEntries": {
            spec_id: {
                "author": SPEC_AUTHOR,
                "description": SPEC_DESCRIPTION,
                "name": SPEC_NAME,
                "path": SPEC_ITEM_PATH,
            },
            weights_id: {
                "author": SPEC_AUTHOR,
                "description": WEIGHTS_DESCRIPTION,
                "name": WEIGHTS_NAME,
                "path": WEIGHTS_ITEM_PATH,
            },
        },
        "rootModelIdentifier": spec_id,
    }


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_partials(dest: str) -> list[str]:
    """Remove temporary directories of earlier runs for ``dest`` whose process is gone."""
    parent, name = os.path.split(dest)
    removed = []
    prefix = f".{name}{PARTIAL_MARKER}"
    try:
        names = os.listdir(parent or ".")
    except OSError:
        return removed
    for entry in names:
        if not entry.startswith(prefix):
            continue
        pid = entry[len(prefix) :].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
            removed.append(entry)
    return removed


class StagedPackage:
    """A package being written: a temporary directory beside ``dest``, renamed into place by
    :meth:`commit`, removed by :meth:`abort` (or on an exception inside a ``with`` block).

    ``dest`` must not exist unless ``force`` is true; with ``force`` an existing package is
    replaced only after the new one is complete. With ``sync`` (the default) every file and
    directory is flushed to disk (fsync) before the rename, so the package survives a power loss
    once it has appeared; without it, other programs still see it appear whole, but a crash of the
    system soon after may leave it incomplete on disk.
    """

    def __init__(self, dest: str | os.PathLike, *, force: bool = False, sync: bool = True):
        self.dest = os.path.abspath(os.fspath(dest))
        self.force = force
        self.sync = sync
        parent = os.path.dirname(self.dest)
        if os.path.lexists(self.dest) and not force:
            raise DestinationExistsError(f"{self.dest}: already exists (use --force to replace it)")
        if not os.path.isdir(parent):
            raise WriteError(f"{self.dest}: parent directory {parent} does not exist")
        remove_stale_partials(self.dest)
        try:
            self.tmp = tempfile.mkdtemp(
                prefix=f".{os.path.basename(self.dest)}{PARTIAL_MARKER}{os.getpid()}-", dir=parent
            )
        except OSError as exc:
            raise WriteError(f"{self.dest}: cannot create a temporary directory: {exc.strerror}") from None
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.tmp, 0o777 & ~umask)  # mkdtemp makes it private; a package is not
        self.data_dir = os.path.join(self.tmp, DATA_DIR, *SPEC_ITEM_PATH.split("/")[:-1])
        self.weights_dir = os.path.join(self.tmp, DATA_DIR, *WEIGHTS_ITEM_PATH.split("/"))
        self.spec_path = os.path.join(self.tmp, DATA_DIR, *SPEC_ITEM_PATH.split("/"))
        os.makedirs(self.weights_dir)
        self.done = False

    def weight_path(self, name: str) -> str:
        return os.path.join(self.weights_dir, name)

    def __enter__(self) -> StagedPackage:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if not self.done:
            self.abort()

    def commit(
        self, model: pb.Model, manifest: dict | None = None, check: Callable[[str], None] | None = None
    ) -> None:
        """Write spec and manifest, flush everything, and move the package into place.

        ``check``, if given, is called with the staged directory once it holds the complete
        package, before anything at ``dest`` is touched: an exception from it removes the staged
        package and propagates, so a replaced destination survives a failed check.
        """
        try:
            with open(self.spec_path, "wb") as f:
                f.write(model.SerializeToString())
                f.flush()
                if self.sync:
                    os.fsync(f.fileno())
            with open(os.path.join(self.tmp, MANIFEST_NAME), "w", encoding="utf-8") as f:
                json.dump(manifest or manifest_for(), f, indent=4, sort_keys=True)
                f.flush()
                if self.sync:
                    os.fsync(f.fileno())
            for d in (self.weights_dir, self.data_dir, os.path.join(self.tmp, DATA_DIR), self.tmp):
                if self.sync:
                    _fsync_dir(d)
        except OSError as exc:
            self.abort()
            raise WriteError(f"{self.dest}: writing the package failed: {exc.strerror}") from None
        if check is not None:
            try:
                check(self.tmp)
            except BaseException:
                self.abort()
                raise
        parent = os.path.dirname(self.dest)
        old_dir = moved = None
        try:
            if os.path.lexists(self.dest):
                if not self.force:
                    raise DestinationExistsError(f"{self.dest}: appeared while the package was being written")
                old_dir = tempfile.mkdtemp(prefix=f".{os.path.basename(self.dest)}.milsurgery-old-", dir=parent)
                moved = os.path.join(old_dir, "previous")
                os.rename(self.dest, moved)
            os.rename(self.tmp, self.dest)
        except BaseException as exc:
            if moved is not None and not os.path.lexists(self.dest):
                os.rename(moved, self.dest)  # put the replaced package back
            self.abort()
            if old_dir is not None:
                shutil.rmtree(old_dir, ignore_errors=True)
            if isinstance(exc, OSError) and exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                raise DestinationExistsError(
                    f"{self.dest}: appeared while the package was being written (another run?); "
                    "nothing was written"
                ) from None
            if isinstance(exc, OSError):
                raise WriteError(
                    f"{self.dest}: moving the new package into place failed: {exc.strerror}"
                ) from None
            raise
        if old_dir is not None:
            shutil.rmtree(old_dir, ignore_errors=True)
        if self.sync:
            _fsync_dir(os.path.dirname(self.dest))
        self.done = True

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.done = True
