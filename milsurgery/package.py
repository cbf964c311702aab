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

import contextlib
import errno
import json
import os
import re
import shutil
import stat
import tempfile
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ._proto import milsurgery_spec_pb2 as pb
from .blobfile import Blob, BlobFile
from .errors import (
    BlobFileError,
    DestinationExistsError,
    ManifestError,
    MilSurgeryError,
    PackageError,
    SpecError,
    UnsafePathError,
    UsageError,
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
from .lock import edit_lock
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

__all__ = [
    "Package",
    "ResolvedRef",
    "StagedPackage",
    "open_package",
    "open_input",
    "read_input",
    "check_destination",
    "locate_spec",
    "PARTIAL_MARKER",
]

#: Part of the name of every temporary directory milsurgery creates beside a destination.
PARTIAL_MARKER = ".milsurgery-partial-"

#: How often opening a package is tried while its directory keeps being swapped under the reader.
_OPEN_ATTEMPTS = 5


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


def package_path(obj) -> str:
    """The path of a package given as a path, or as a ``coremltools.models.MLModel`` of an ML
    program (its ``package_path``: where it was loaded from, or the package it saves). No I/O."""
    if isinstance(obj, (str, os.PathLike)):
        return os.fspath(obj)
    if type(obj).__name__ == "MLModel" and hasattr(obj, "package_path"):
        if not obj.package_path:
            raise UsageError(f"{obj!r:.80}: this MLModel is not an ML-program package (.mlpackage)")
        return os.fspath(obj.package_path)
    raise UsageError(f"expected a package path or a coremltools MLModel, got {type(obj).__name__}")


_O_READ = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)


def open_input(root: str | os.PathLike, path: str | os.PathLike, *, fault: Callable[[str], Exception] | None = None) -> int:
    """Open ``path``, a file that must lie inside the directory ``root``, and return its descriptor.

    This is the one way milsurgery opens a file it reads from a package (Manifest.json, the spec,
    weight files, a compiled model's files). ``path`` is resolved (symlinks followed) and must stay
    inside ``root``'s real path, else :class:`UnsafePathError`; the resolved path is opened without
    following a symlink and without blocking (a FIFO does not hang), and the descriptor must be a
    regular file (not a device, FIFO, socket or directory). It is opened component by component
    from ``root`` with no symlink followed, so a directory swapped for a symlink after the check
    is refused too (:class:`UnsafePathError`). Other faults are raised as ``fault(message)``
    (default: :class:`PackageError` naming ``path``). Costs an ``lstat`` and an ``open`` per path
    component; reads nothing. The caller closes the descriptor.
    """
    path = os.fspath(path)
    if fault is None:
        fault = lambda message: PackageError(f"{path}: {message}")  # noqa: E731
    try:
        real = os.path.realpath(path)
        root_real = os.path.realpath(os.fspath(root))
    except (OSError, ValueError) as exc:
        raise fault(f"cannot resolve the path: {getattr(exc, 'strerror', None) or exc}") from None
    if not _inside(real, root_real):
        raise UnsafePathError(f"{path}: resolves outside the package {root_real} (symlink), to {real}")
    try:
        fd = _open_beneath(root_real, real)
    except _Swapped:
        raise UnsafePathError(f"{path}: a directory on the way changed to a symlink while opening") from None
    except FileNotFoundError:
        raise fault("does not exist") from None
    except OSError as exc:
        raise fault(f"cannot open: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise fault(f"cannot open: {exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise fault(f"is not a regular file (it is {_file_kind(st.st_mode)})")
        if hasattr(os, "O_NONBLOCK"):
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


class _Swapped(Exception):
    """A directory component of a resolved path is no longer a directory (a symlink now)."""


_WALK = os.open in os.supports_dir_fd and hasattr(os, "O_DIRECTORY") and hasattr(os, "O_NOFOLLOW")


def _open_beneath(root_real: str, real: str) -> int:
    """Open ``real`` (a resolved path inside the resolved ``root_real``) one component at a time
    from ``root_real``, none followed if it is a symlink: a directory swapped for a symlink
    between resolving and opening raises :class:`_Swapped` instead of leading out of the root."""
    rel = os.path.relpath(real, root_real)
    if not _WALK or rel == os.curdir:
        return os.open(real, _O_READ | getattr(os, "O_NOFOLLOW", 0))
    parts = rel.split(os.sep)
    dirs = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    dfd = os.open(root_real, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
    try:
        for part in parts[:-1]:
            try:
                nfd = os.open(part, dirs, dir_fd=dfd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):  # realpath saw a directory here
                    raise _Swapped(part) from None
                raise
            os.close(dfd)
            dfd = nfd
        return os.open(parts[-1], _O_READ | os.O_NOFOLLOW, dir_fd=dfd)
    finally:
        os.close(dfd)


def _file_kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISLNK, "a symlink"),
    ):
        if test(mode):
            return name
    return f"of mode 0o{stat.S_IFMT(mode):o}"


def read_input(
    root: str | os.PathLike,
    path: str | os.PathLike,
    cap: int,
    *,
    fault: Callable[[str], Exception] | None = None,
) -> bytes:
    """The bytes of ``path``, opened as :func:`open_input` does, refusing a file over ``cap`` bytes.

    At most ``cap + 1`` bytes are read, whatever the file's size claims to be, so a file that
    grows or lies about its size cannot make this read more. Faults as in :func:`open_input`.
    """
    path = os.fspath(path)
    if fault is None:
        fault = lambda message: PackageError(f"{path}: {message}")  # noqa: E731
    fd = open_input(root, path, fault=fault)
    try:
        if os.fstat(fd).st_size > cap:  # refused without reading; a size of 0 proves nothing
            raise fault(f"is too large: larger than {cap} bytes")
        chunks = []
        got = 0
        while got <= cap:
            chunk = os.read(fd, min(cap + 1 - got, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
    except OSError as exc:
        raise fault(f"cannot read: {exc.strerror}") from None
    finally:
        os.close(fd)
    if got > cap:
        raise fault(f"is too large: larger than {cap} bytes")
    return b"".join(chunks)


class Package:
    """An opened, validated ``.mlpackage``.

    Attributes: ``path``, ``manifest`` (dict), ``spec_path``, ``weights_dir``, ``model`` (the
    parsed spec, :class:`milsurgery.spec.pb.Model`), ``blob_files`` (fileName as written in the
    spec -> :class:`BlobFile`), ``refs`` (every blob reference, resolved), ``functions`` (names in
    description order) and ``descriptions`` (name -> FunctionDescription).
    Opening reads Manifest.json, the spec and the 64-byte blob records; no weight bytes.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.path.abspath(package_path(path))
        self.blob_files: dict[str, BlobFile] = {}
        # Set here too, not only by _open_once: a subclass (a compiled model) opens its own way.
        self._by_identity: dict[tuple[int, int], BlobFile] = {}
        self._functions_cache: dict[str, pb.Function] | None = None
        self._refs_by_function: dict[str, list[ResolvedRef]] | None = None
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    # -- opening ---------------------------------------------------------------------------------
    def _open(self) -> None:
        # An in-place edit swaps the package directory in one step (shrink --in-place): a reader
        # that opened parts of the old and parts of the new directory sees that the directory
        # changed under it and opens again, so it holds the old package or the new one.
        for attempt in range(_OPEN_ATTEMPTS):
            before = self._identity()
            try:
                self._open_once()
            except MilSurgeryError:
                if attempt + 1 < _OPEN_ATTEMPTS and self._identity() != before:
                    self.close()
                    self.blob_files = {}
                    continue
                raise
            if self._identity() == before or attempt + 1 == _OPEN_ATTEMPTS:
                return
            self.close()
            self.blob_files = {}

    def _identity(self) -> tuple[int, int]:
        try:
            st = os.stat(self.path)
        except OSError as exc:
            what = "does not exist" if isinstance(exc, FileNotFoundError) else f"cannot be read ({exc.strerror})"
            raise PackageError(f"{self.path}: package {what}") from None
        except ValueError as exc:
            raise PackageError(f"{self.path!r}: package path is not usable ({exc})") from None
        if not stat.S_ISDIR(st.st_mode):
            raise PackageError(f"{self.path}: package is not a directory")
        return (st.st_dev, st.st_ino)

    def _open_once(self) -> None:
        self._by_identity: dict[tuple[int, int], BlobFile] = {}
        self._functions_cache: dict[str, pb.Function] | None = None
        self._refs_by_function: dict[str, list[ResolvedRef]] | None = None
        self._locate_spec()
        self.weights_dir = os.path.join(os.path.dirname(self.spec_path), WEIGHTS_NAME)
        spec_path = self.spec_path
        data = read_input(
            self.path, spec_path, MAX_SPEC_BYTES, fault=lambda message: SpecError(spec_path, f"spec file {message}")
        )
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
        if not os.path.lexists(path):
            raise ManifestError(path, "missing: not an .mlpackage")
        data = read_input(self.path, path, MAX_MANIFEST_BYTES, fault=lambda message: ManifestError(path, message))
        try:
            manifest = json.loads(data.decode("utf-8"))
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
        if not os.path.lexists(path):  # what else is wrong with it is found when it is read
            raise ManifestError(
                self.manifest_path,
                f"field rootModelIdentifier: spec {os.path.relpath(path, self.path)} is missing",
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
        if not _inside(os.path.realpath(full), self._root_real):
            raise UnsafePathError(f"{where}: blob file {name!r} resolves outside the package (symlink)")
        fd = open_input(
            self.path, full, fault=lambda message: PackageError(f"{where}: blob file {name!r} {message} ({full})")
        )
        # One file named two ways (``weights/./weight.bin``, a hard link, a symlink inside the
        # package) is one BlobFile: its blobs are counted, shared and copied once.
        st = os.fstat(fd)
        found = self._by_identity.get((st.st_dev, st.st_ino))
        if found is not None:
            os.close(fd)
        else:
            found = self._by_identity[(st.st_dev, st.st_ino)] = BlobFile(full, fd=fd)
        self.blob_files[name] = found
        return found

    @property
    def weight_files(self) -> list[BlobFile]:
        """The distinct weight files the spec references (each once, however it is named)."""
        out: list[BlobFile] = []
        for bf in self.blob_files.values():
            if all(bf is not o for o in out):
                out.append(bf)
        return out

    def weight_file_name(self, bf: BlobFile) -> str:
        """The first name the spec uses for the weight file ``bf``."""
        return next(name for name, f in self.blob_files.items() if f is bf)

    def blob_key(self, r: ResolvedRef) -> tuple[str, int]:
        """``(file name, record offset)`` naming the physical blob ``r`` points at: references
        through two names of one file get the same key (the file's first name)."""
        names = self.__dict__.setdefault("_first_names", {})
        name = names.get(id(r.file))
        if name is None:
            name = names[id(r.file)] = self.weight_file_name(r.file)
        return (name, r.blob.record_offset)

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
        if self._functions_cache is None:
            self._functions_cache = program_functions(self.model)
        found = self._functions_cache.get(name)
        if found is None:
            raise KeyError(name)
        return found

    def function_refs(self, name: str) -> list[ResolvedRef]:
        if self._refs_by_function is None:
            by: dict[str, list[ResolvedRef]] = {}
            for r in self.refs:
                by.setdefault(r.ref.function, []).append(r)
            self._refs_by_function = by
        return list(self._refs_by_function.get(name, ()))

    def __enter__(self) -> Package:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for bf in self.blob_files.values():
            bf.close()  # closing twice (one file, two names) is harmless

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


def remove_entry(path: str) -> None:
    """Remove ``path`` whatever it is (directory tree, file, symlink: the link, not its target);
    nothing if it does not exist. Errors are ignored: this is cleanup."""
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)
    except (OSError, ValueError):
        pass


def remove_stale_partials(dest: str) -> list[str]:
    """Remove temporary entries of earlier runs for ``dest`` whose process is gone (directories,
    and whatever else an interrupted run left under such a name, e.g. an exchanged symlink)."""
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
            remove_entry(os.path.join(parent, entry))
            removed.append(entry)
    return removed


def _resolved_dest(path: str) -> str:
    """``path`` with its parent directory's symlinks resolved (the entry itself is kept)."""
    parent, name = os.path.split(path)
    return os.path.join(os.path.realpath(parent), name)


def check_destination(
    dest: str | os.PathLike, sources: Sequence[str | os.PathLike] = (), *, force: bool = False
) -> str:
    """Refuse an output path that a write could not use without destroying something; return it
    absolute.

    Refused: an empty path; the current directory or an ancestor of it; a path that is, holds,
    or lies inside one of ``sources``; an existing path unless ``force`` is given, and with
    ``force`` anything but an existing ``.mlpackage`` (a directory holding Manifest.json): force
    replaces a package, never another file or directory. Costs a few ``stat`` calls.
    """
    text = os.fspath(dest)
    if not isinstance(text, str):
        text = os.fsdecode(text)
    if not text.strip():
        raise UsageError(f"output path {text!r} is empty")
    if "\x00" in text:
        raise UsageError(f"output path {text!r} contains a NUL character")
    full = os.path.abspath(text)
    forms = {_resolved_dest(full), os.path.realpath(full)}
    try:
        cwd = os.path.realpath(os.getcwd())
    except OSError:
        cwd = None
    for form in forms:
        if cwd is not None and _inside(cwd, form):
            raise UsageError(f"{full}: the output would replace the current directory or one holding it; refusing")
        for src in sources:
            src_real = os.path.realpath(os.fspath(src))
            if _inside(src_real, form):
                raise UsageError(f"{full}: the output would replace the source {src_real} (it is or holds it)")
            if _inside(form, src_real):
                raise UsageError(f"{full}: the output lies inside the source {src_real}; sources are never modified")
    if os.path.lexists(full):
        if not force:
            raise DestinationExistsError(f"{full}: already exists (replace it with --force, in Python force=True)")
        if not (os.path.isdir(full) and os.path.lexists(os.path.join(full, MANIFEST_NAME))):
            kind = "a directory without Manifest.json" if os.path.isdir(full) else "not a directory"
            raise UsageError(
                f"{full}: --force replaces only an existing .mlpackage (a directory holding "
                f"{MANIFEST_NAME}); this is {kind}, left as it is"
            )
    return full


class StagedPackage:
    """A package being written: a temporary directory beside ``dest``, renamed into place by
    :meth:`commit`, removed by :meth:`abort` (or on an exception inside a ``with`` block).

    ``dest`` must not exist unless ``force`` is true; with ``force`` an existing package is
    replaced only after the new one is complete. ``dest`` is checked by
    :func:`check_destination` against ``sources`` (the packages the new one is built from). With ``sync`` (the default) every file and
    directory is flushed to disk (fsync) before the rename, so the package survives a power loss
    once it has appeared; without it, other programs still see it appear whole, but a crash of the
    system soon after may leave it incomplete on disk.
    """

    def __init__(
        self,
        dest: str | os.PathLike,
        *,
        force: bool = False,
        sync: bool = True,
        sources: Sequence[str | os.PathLike] = (),
    ):
        self.dest = check_destination(dest, sources, force=force)
        self.force = force
        self.sync = sync
        parent = os.path.dirname(self.dest)
        try:
            parent_is_dir = stat.S_ISDIR(os.stat(parent).st_mode)
        except FileNotFoundError:
            parent_is_dir = False
        except OSError as exc:  # e.g. a path longer than the system allows
            raise WriteError(f"{self.dest}: cannot use the parent directory: {exc.strerror}") from None
        if not parent_is_dir:
            raise WriteError(f"{self.dest}: parent directory {parent} does not exist")
        remove_stale_partials(self.dest)
        self.tmp = None
        try:
            self.tmp = tempfile.mkdtemp(
                prefix=f".{os.path.basename(self.dest)}{PARTIAL_MARKER}{os.getpid()}-", dir=parent
            )
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(self.tmp, 0o777 & ~umask)  # mkdtemp makes it private; a package is not
            self.data_dir = os.path.join(self.tmp, DATA_DIR, *SPEC_ITEM_PATH.split("/")[:-1])
            self.weights_dir = os.path.join(self.tmp, DATA_DIR, *WEIGHTS_ITEM_PATH.split("/"))
            self.spec_path = os.path.join(self.tmp, DATA_DIR, *SPEC_ITEM_PATH.split("/"))
            os.makedirs(self.weights_dir)
        except (OSError, ValueError) as exc:
            if self.tmp is not None:
                shutil.rmtree(self.tmp, ignore_errors=True)
            why = getattr(exc, "strerror", None) or str(exc)
            raise WriteError(f"{self.dest}: cannot create the package's temporary directory beside it: {why}") from None
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
        locked = contextlib.ExitStack()
        if self.force and os.path.isdir(self.dest):
            # An in-place edit of the package being replaced finishes first (its lock is held
            # across the rename); editors waiting behind it then edit the replacement.
            try:
                locked.enter_context(edit_lock(self.dest))
            except MilSurgeryError:
                pass  # gone or unlockable: nothing is editing it in place
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
        finally:
            locked.close()
        if old_dir is not None:
            shutil.rmtree(old_dir, ignore_errors=True)
        if self.sync:
            _fsync_dir(os.path.dirname(self.dest))
        self.done = True

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.done = True
