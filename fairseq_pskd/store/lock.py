"""The store's ownership lock: an exclusive ``flock`` on ``DIR/lock`` held by the process that has
the store open for writing, so that two training runs never share a store (docs/STORE.md,
"Ownership lock")."""
from __future__ import annotations

import errno
import json
import logging
import os
import socket
import sys
import time
from typing import Any, Dict, Optional

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: stores are then not locked (warned)
    fcntl = None

from .errors import StoreError, StoreLockedError
from .format import LOCK_NAME

__all__ = ["StoreLock", "lock_holder", "lock_or_undo"]

# The package's logger: the name its warnings have always carried.
logger = logging.getLogger(__package__)

#: flock errors that mean "this filesystem does not do flock" (Lustre without -o flock: ENOSYS;
#: some FUSE/SMB mounts: EOPNOTSUPP/EINVAL; NFS without a working lock daemon: ENOLCK).
_NO_LOCKING = {errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOLCK, errno.EINVAL}
_BUSY = {errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES}
#: A lock found busy is tried again for this long before giving up: `inspect` takes a shared lock
#: for an instant to see whether the store is in use, which must not make a starting run fail.
_LOCK_RETRY_S = 1.0
_lock_fds: set = set()  # descriptors of the locks this process holds


def _close_lock_fds_in_child() -> None:
    # flock belongs to the open file, which fork shares: a forked child (a DataLoader worker)
    # would keep the store locked after its parent died. The child never uses the store's lock.
    for fd in list(_lock_fds):
        try:
            os.close(fd)
        except OSError:
            pass
    _lock_fds.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_lock_fds_in_child)


def _read_holder(lock_path: str, tries: int = 10) -> Optional[Dict[str, Any]]:
    """What the lock's holder wrote about itself (it writes right after locking: wait a little)."""
    for i in range(tries):
        try:
            with open(lock_path, "r", encoding="utf-8") as f:
                info = json.loads(f.read() or "null")
            if isinstance(info, dict):
                return info
        except (OSError, UnicodeDecodeError, ValueError):
            pass
        if i + 1 < tries:
            time.sleep(0.05)
    return None


def _warn_unlocked(directory: str, why: str) -> None:
    logger.warning(
        "PS-KD store at %s: cannot lock it (%s), so it is NOT protected against a second run that "
        "uses the same directory at the same time; make sure only one run uses it. (The filesystem "
        "does not support flock: e.g. Lustre mounted without -o flock, NFS without a lock daemon.)",
        directory, why)


class StoreLock:
    """An exclusive ``flock`` on ``DIR/lock``, held while a writable store is open.

    The kernel drops it when the descriptor is closed, however the process ends (``kill -9``
    included): there is never a stale lock to clean up. After locking, the holder writes who it
    is into the file, for the message another process gets. ``fd`` is None when the filesystem
    cannot lock (warned; the store is then used unprotected)."""

    def __init__(self, path: str, fd: Optional[int], created: bool):
        self.path = path
        self.fd = fd
        self.created = created  # this process made the lock file (a failed create removes it)

    @property
    def held(self) -> bool:
        return self.fd is not None

    @classmethod
    def acquire(cls, directory: str, owner: Optional[str] = None) -> "StoreLock":
        path = os.path.join(directory, LOCK_NAME)
        deadline = time.monotonic() + _LOCK_RETRY_S
        while True:
            created = not os.path.exists(path)
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise StoreError(f"cannot create the lock file {path}: {e.strerror or e}; fix the directory's "
                                 f"permissions or pass a writable --pskd-store-dir") from e
            if fcntl is None:  # pragma: no cover
                os.close(fd)
                _warn_unlocked(directory, "no flock on this platform")
                return cls(path, None, created)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno in _BUSY:
                    if time.monotonic() < deadline:
                        time.sleep(0.05)
                        continue
                    raise StoreLockedError(directory, _read_holder(path)) from None
                if e.errno in _NO_LOCKING:
                    _warn_unlocked(directory, f"flock: {e.strerror or e}")
                    return cls(path, None, created)
                raise StoreError(f"cannot lock {path}: {e.strerror or e}; pass a --pskd-store-dir on a local "
                                 f"filesystem") from e
            # A failed create removes the lock file it made: if that happened between our open and
            # our flock, we hold a lock on a file nobody else will open. Lock the one there now.
            try:
                st, fst = os.stat(path), os.fstat(fd)
                same = (st.st_dev, st.st_ino) == (fst.st_dev, fst.st_ino)
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            _lock_fds.add(fd)
            info = {"host": socket.gethostname(), "pid": os.getpid(),
                    "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "owner": owner,
                    "command": " ".join(sys.argv) if sys.argv and sys.argv[0] else sys.executable}
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, (json.dumps(info) + "\n").encode("utf-8"), 0)
            except OSError:  # the lock holds without the details
                pass
            return cls(path, fd, created)

    def release(self) -> None:
        """Idempotent; also called by the store's finalizer."""
        fd, self.fd = self.fd, None
        if fd is None:
            return
        _lock_fds.discard(fd)
        try:
            os.ftruncate(fd, 0)  # nobody holds it: no details to show
        except OSError:
            pass
        os.close(fd)


def lock_holder(directory) -> Optional[Dict[str, Any]]:
    """Who holds the store's lock now: the details its holder wrote ({} if none), or None when
    the store is not locked (or the filesystem cannot tell). Takes a shared lock for an instant."""
    path = os.path.join(os.fspath(directory), LOCK_NAME)
    if fcntl is None:  # pragma: no cover
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as e:
        return (_read_holder(path) or {}) if e.errno in _BUSY else None
    finally:
        os.close(fd)  # also drops the shared lock
    return None


def lock_or_undo(path, owner, made_dir) -> StoreLock:
    """The directory's ownership lock; on failure, remove the directory if this call made it."""
    try:
        return StoreLock.acquire(path, owner)
    except BaseException:
        if made_dir:
            try:
                os.rmdir(path)
            except OSError:
                pass
        raise
