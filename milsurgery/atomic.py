"""Atomic file-system steps for in-place edits.

* :func:`exchange_paths` swaps two directory entries in one step (Linux ``renameat2`` with
  ``RENAME_EXCHANGE``, macOS ``renamex_np`` with ``RENAME_SWAP``), so a package path always names
  a complete package, the old or the new one, whenever the process is killed.
* :func:`replace_file` writes a file beside its destination, flushes it and renames it over the
  destination.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import tempfile

from .errors import UsageError, WriteError

__all__ = ["exchange_paths", "replace_file", "fsync_dir", "exchange_supported"]

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2  # linux/fs.h
_RENAME_SWAP = 2  # macOS stdio.h


def _libc():
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name, use_errno=True) if name else None


def _exchange_fn():
    libc = _libc()
    if libc is None:
        return None
    if sys.platform.startswith("linux") and hasattr(libc, "renameat2"):
        fn = libc.renameat2
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        return lambda a, b: fn(_AT_FDCWD, a, _AT_FDCWD, b, _RENAME_EXCHANGE)
    if sys.platform == "darwin" and hasattr(libc, "renamex_np"):
        fn = libc.renamex_np
        fn.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_uint]
        return lambda a, b: fn(a, b, _RENAME_SWAP)
    return None


def exchange_supported() -> bool:
    return _exchange_fn() is not None


def exchange_paths(a: str, b: str) -> None:
    """Atomically swap the directory entries ``a`` and ``b`` (both must exist)."""
    fn = _exchange_fn()
    if fn is None:
        raise UsageError(
            "in-place replacement needs an atomic directory exchange (Linux renameat2 or macOS "
            "renamex_np), which this system lacks; write to a new path with -o instead"
        )
    if fn(os.fsencode(a), os.fsencode(b)) != 0:
        err = ctypes.get_errno()
        raise WriteError(f"{b}: atomic exchange with {a} failed: {os.strerror(err)}")
    fsync_dir(os.path.dirname(os.path.abspath(b)))


def fsync_dir(path: str) -> None:
    """Flush a directory's entries (renames, creations) to disk, where the OS allows it."""
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


def replace_file(path: str, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically: temp file beside it, fsync, rename."""
    directory, name = os.path.split(path)
    try:
        mode = os.stat(path).st_mode & 0o7777
    except OSError:
        mode = 0o644
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.milsurgery-new-", dir=directory)
    except OSError as exc:
        raise WriteError(f"{path}: cannot create a file beside it: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)  # mkstemp makes the file private; keep the old mode
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise WriteError(f"{path}: replacing the file failed: {exc.strerror}") from None
    fsync_dir(directory)
