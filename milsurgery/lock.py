"""Locking a package for an in-place edit (``append``, ``shrink --in-place``).

An editor takes an exclusive advisory lock (``flock``) on the package directory itself before it
reads anything, and holds it until its edit is complete: a second editor of the same package
waits for the first to finish (or, asked not to wait, is refused), then reads what the first one
wrote. Nothing is created in or beside the package. Readers take no lock: every edit publishes
with one atomic step (a rename or a directory exchange), so a reader sees the old package or the
new one. A writer replacing the package with ``--force`` takes the lock for its rename, so it
waits for an in-place edit under way instead of discarding it halfway.

``shrink --in-place`` replaces the directory: an editor that was waiting on the old directory
notices, once it holds the lock, that the path now names another directory, and locks that one
instead. Costs: one ``open`` and one ``flock`` per attempt; no I/O on the package's files.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

from .errors import PackageError, PackageLockedError, UsageError

try:
    import fcntl
except ImportError:  # not a POSIX system
    fcntl = None

__all__ = ["edit_lock", "PackageLockedError"]


def _open_dir(path: str) -> int:
    try:
        return os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise PackageError(f"{path}: package does not exist") from None
    except NotADirectoryError:
        raise PackageError(f"{path}: package is not a directory") from None
    except (OSError, ValueError) as exc:
        raise PackageError(f"{path}: cannot open the package: {getattr(exc, 'strerror', None) or exc}") from None


@contextmanager
def edit_lock(path: str | os.PathLike, *, wait: bool = True, poll: float = 0.05) -> Iterator[str]:
    """Hold an exclusive edit lock on the package directory ``path`` for the ``with`` block.

    ``path`` is resolved first (a symlink to a package locks, and the block edits, the real
    package); the block receives the resolved path. With ``wait`` the call blocks until other
    editors are done (a signal still interrupts it); without, it raises
    :class:`PackageLockedError` at once if another process holds the lock.
    """
    try:
        real = os.path.realpath(os.fspath(path))
    except ValueError as exc:  # a NUL character
        raise PackageError(f"{os.fspath(path)!r}: package path is not usable ({exc})") from None
    if fcntl is None:
        raise UsageError("in-place edits need flock, which this system lacks; write to a new path with -o instead")
    while True:
        fd = _open_dir(real)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if not wait:
                        raise PackageLockedError(
                            f"{real}: another process is editing this package; try again when it is done"
                        ) from None
                    time.sleep(poll)
                except OSError as exc:
                    raise PackageError(f"{real}: cannot lock the package: {exc.strerror}") from None
            held = os.fstat(fd)
            try:
                now = os.stat(real)
            except FileNotFoundError:
                now = None
            if now is not None and (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino):
                try:
                    yield real
                finally:
                    fcntl.flock(fd, fcntl.LOCK_UN)
                return
            # The directory was exchanged while this process waited: lock the one there now.
        finally:
            os.close(fd)
