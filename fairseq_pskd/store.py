"""Disk-backed top-k store of the previous epoch's predictions, for PS-KD.

PS-KD trains every target token against ``(1 - a) * y + a * P_{t-1}``, where ``P_{t-1}`` is
the model's own distribution for that token one epoch earlier. Keeping full distributions
is impossible (140 M tokens x 40 k vocab on WMT'14), so for every target token we keep the
top-k vocabulary indices and their probabilities, in memory-mapped files: the process only
holds the pages it touches, so resident memory does not grow with the corpus.

The layout follows fairseq's ``MMapIndexedDataset``: a small header, typed flat arrays, and
per-sentence offsets computed from the sizes at open time. One directory holds::

    header.json        format_version, shape, dtypes, lengths fingerprint, buffer epochs
    lengths.npy        int32 (num_sentences,)  target length of each sentence (incl. eos)
    indices.{0,1}.bin  uint16|int32 (num_tokens, k)  top-k vocab ids, one row per token
    probs.{0,1}.bin    float16 (num_tokens, k)       top-k probabilities
    stamps.{0,1}.bin   int32 (num_sentences,)        epoch that last wrote the sentence, 0 = never
    lock               flock held by the process that has the store open for writing

Two parity buffers: epoch ``t`` writes buffer ``t % 2`` and reads buffer ``(t - 1) % 2``, so
the priors a running epoch consumes are never overwritten by it (crash/resume safe). A
sentence's row in a buffer is valid for epoch ``e`` only if its stamp equals ``e``; stamps are
written after the data, so a stale or half-finished row is never mistaken for a fresh one.

Writes are asynchronous: ``write`` stages the tensors (one non-blocking device->pinned copy
plus a CUDA event for GPU tensors, a plain copy for CPU tensors) and hands them to one background
thread that scatters them into the memory maps. See docs/STORE.md for the format and the
data-parallel design.

Command line: ``python -m fairseq_pskd.store {inspect,estimate} ...``.

This module must not import fairseq (it is used by tools that run without it).
"""
from __future__ import annotations

import argparse
import errno
import glob
import hashlib
import json
import logging
import mmap
import os
import queue
import shutil
import socket
import struct
import sys
import threading
import time
import weakref
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: stores are then not locked (warned)
    fcntl = None

__all__ = ["StoreError", "StoreLockedError", "TopKStore", "lock_holder", "read_fairseq_sizes", "main"]

logger = logging.getLogger(__name__)


class StoreError(ValueError):
    """Bad input or a store that cannot be used; the message says what is wrong and what to do."""


class StoreLockedError(StoreError):
    """The store is open for writing in another live process; ``holder`` is what that process
    recorded about itself (host, pid, started, owner, command), or None if it recorded nothing."""

    def __init__(self, directory: str, holder: Optional[Dict[str, Any]]):
        self.directory = directory
        self.holder = holder
        super().__init__(_locked_message(directory, holder))

    def __reduce__(self):  # picklable (args hold the message, not the constructor's arguments)
        return self.__class__, (self.directory, self.holder)


# --------------------------------------------------------------------------------------
# File layout helpers
# --------------------------------------------------------------------------------------

HEADER_NAME = "header.json"
LENGTHS_NAME = "lengths.npy"
LOCK_NAME = "lock"
PROB_DTYPE = np.dtype("<f2")
STAMP_DTYPE = np.dtype("<i4")
LENGTH_DTYPE = np.dtype("<i4")
_HEADER_TMP_SUFFIX = ".tmp"
_HINT_DIR = "delete {path} (it is only a cache of last epoch's predictions) or pass another --pskd-store-dir"
#: Writes that may be queued before write() blocks; bounds host memory held by staged batches.
DEFAULT_MAX_PENDING = 8


def _index_dtype(vocab_size: int) -> np.dtype:
    # uint16 halves the largest array for every vocabulary fairseq NMT uses in practice.
    return np.dtype("<u2") if vocab_size <= 65536 else np.dtype("<i4")


def _array_files(num_sentences: int, num_tokens: int, topk: int, vocab_size: int) -> Dict[str, int]:
    """File name -> exact size in bytes, for the six preallocated buffer files."""
    ib = _index_dtype(vocab_size).itemsize
    files = {}
    for b in (0, 1):
        files[f"indices.{b}.bin"] = num_tokens * topk * ib
        files[f"probs.{b}.bin"] = num_tokens * topk * PROB_DTYPE.itemsize
        files[f"stamps.{b}.bin"] = num_sentences * STAMP_DTYPE.itemsize
    return files


def _store_file_names() -> List[str]:
    names = [HEADER_NAME, LENGTHS_NAME, HEADER_NAME + _HEADER_TMP_SUFFIX, LOCK_NAME]
    names += list(_array_files(1, 1, 1, 1).keys())
    return names


#: Header keys only a PS-KD store writes; two of them make a header.json the store's own.
_HEADER_KEYS = {"format_version", "num_sentences", "num_tokens", "topk", "vocab_size", "lengths_fingerprint", "buffers"}


def _looks_like_store(path: str) -> bool:
    """Whether ``path`` holds a PS-KD store or the remains of one (an array file, lengths.npy, or a
    header.json with the store's keys). Only then may a message advise deleting the directory:
    a mistyped path (the data directory, the home directory) must never get that advice."""
    names = [LENGTHS_NAME, HEADER_NAME + _HEADER_TMP_SUFFIX] + list(_array_files(1, 1, 1, 1).keys())
    if any(os.path.exists(os.path.join(path, n)) for n in names):
        return True
    try:
        with open(os.path.join(path, HEADER_NAME), "r", encoding="utf-8") as f:
            header = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(header, dict) and len(_HEADER_KEYS & set(header)) >= 2


def _not_a_store(path: str) -> str:
    return (f"{path} is not a PS-KD store (no {HEADER_NAME} and none of the store's files); pass the "
            f"store's directory (--pskd-store-dir; by default SAVE_DIR/pskd_store)")


def _delete_hint(path: str) -> str:
    """What to do about a store that cannot be used: delete it, but only if it is one."""
    if _looks_like_store(path):
        return _HINT_DIR.format(path=path)
    return f"{path} holds none of the store's files, so it is not a PS-KD store: check the path (--pskd-store-dir)"


# --------------------------------------------------------------------------------------
# Ownership lock
# --------------------------------------------------------------------------------------

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


def _locked_message(directory: str, holder: Optional[Dict[str, Any]]) -> str:
    if holder and (holder.get("pid"), holder.get("host")) == (os.getpid(), socket.gethostname()):
        return (f"the PS-KD store at {directory} is already open for writing in this process (another "
                f"TopKStore object holds its lock); close that one first, or open this one with readonly=True")
    if holder:
        who = f"pid {holder.get('pid')} on host {holder.get('host')} (since {holder.get('started')}"
        if holder.get("owner"):
            who += f"; {holder['owner']}"
        who += f"; command: {holder.get('command')})"
    else:
        who = "another process (it has not recorded which yet)"
    return (f"the PS-KD store at {directory} is in use by {who}. Two training runs must not share a "
            f"store: each would train on the other's predictions as if they were its own priors. Wait "
            f"until that run has ended, or give this run its own --pskd-store-dir (a template such as "
            f"/local/scratch/pskd_{{node}} gives every run on a node the same directory: put the run's "
            f"name in it). Nothing needs cleaning up: the lock ends with the process that holds it")


def _warn_unlocked(directory: str, why: str) -> None:
    logger.warning(
        "PS-KD store at %s: cannot lock it (%s), so it is NOT protected against a second run that "
        "uses the same directory at the same time; make sure only one run uses it. (The filesystem "
        "does not support flock: e.g. Lustre mounted without -o flock, NFS without a lock daemon.)",
        directory, why)


class _StoreLock:
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
    def acquire(cls, directory: str, owner: Optional[str] = None) -> "_StoreLock":
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
                raise StoreError(f"cannot lock {path}: {e.strerror or e}; pass a --pskd-store-dir on a local filesystem") from e
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


def _fingerprint(lengths: np.ndarray) -> str:
    """sha256 over the lengths as int64 little-endian (independent of the caller's dtype).

    Hashed in chunks so that opening a big store needs no full int64 copy in memory.
    """
    h = hashlib.sha256()
    step = 1 << 16  # 512 KiB of int64 at a time
    for i in range(0, lengths.shape[0], step):
        h.update(np.ascontiguousarray(lengths[i:i + step], dtype="<i8").tobytes())
    return h.hexdigest()


def _human(n: int) -> str:
    units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"]
    x = float(n)
    for u in units:
        if abs(x) < 1024 or u == units[-1]:
            return f"{x:.0f} {u}" if u == "B" else f"{x:.2f} {u}"
        x /= 1024
    return f"{n} B"  # pragma: no cover


def _fsync_dir(path: str) -> None:
    # Makes a rename durable; not every platform/filesystem allows opening a directory.
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


def _write_json_atomic(path: str, obj: Dict[str, Any]) -> None:
    """Write ``obj`` to ``path`` so that readers see either the old or the new file, never half."""
    tmp = path + _HEADER_TMP_SUFFIX
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def _as_numpy_1d_int(x, name: str) -> np.ndarray:
    """ids / lengths (torch tensor on any device, numpy array or sequence) -> int64 numpy."""
    if isinstance(x, torch.Tensor):
        if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
            raise StoreError(f"{name} must be an integer tensor, got dtype {x.dtype}; pass sample ids / target lengths as long tensors")
        x = x.detach().cpu().numpy()
    else:
        x = np.asarray(x)
        if x.size == 0:
            x = x.astype(np.int64)
        if not np.issubdtype(x.dtype, np.integer):
            raise StoreError(f"{name} must hold integers, got dtype {x.dtype}; pass sample ids / target lengths as integer arrays")
    if x.ndim != 1:
        raise StoreError(f"{name} must be 1-D (one entry per sentence in the batch), got shape {tuple(x.shape)}")
    return x.astype(np.int64, copy=False)


def _checked_lengths(target_lengths) -> np.ndarray:
    """The training set's target lengths as a 1-D integer array, not copied when avoidable
    (4.5 M sentences are 36 MB as int64; fairseq's sizes arrays are already numpy)."""
    x = target_lengths
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.ndim != 1:
        raise StoreError(f"target_lengths must be 1-D (one length per training sentence), got shape {tuple(x.shape)}")
    if x.size == 0:
        raise StoreError("target_lengths is empty: the store needs one length per training sentence; pass the training set's target sizes (including eos)")
    if not np.issubdtype(x.dtype, np.integer):
        raise StoreError(f"target_lengths must hold integers, got dtype {x.dtype}; pass the training set's target sizes (including eos)")
    lo, hi = int(x.min()), int(x.max())
    if lo < 0 or hi > np.iinfo(LENGTH_DTYPE).max:
        raise StoreError(f"target_lengths must be within [0, 2^31), got range [{lo}, {hi}]; pass the training set's target sizes (including eos)")
    if int(x.sum(dtype=np.int64)) == 0:
        raise StoreError("target_lengths are all zero: there is no target token to store; pass the training set's target sizes (including eos)")
    return x


# --------------------------------------------------------------------------------------
# Background writer
# --------------------------------------------------------------------------------------

class _PinnedPool:
    """Reusable page-locked host buffers for device->host copies.

    cudaHostAlloc is slow (milliseconds), so staging buffers are recycled instead of
    allocated per batch; at most ~(max_pending + 2) * 4 buffers are ever alive.
    """

    def __init__(self, pin: bool = True):
        self.pin = pin
        self._free: List[torch.Tensor] = []
        self._lock = threading.Lock()

    def acquire(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        numel = 1
        for s in shape:
            numel *= int(s)
        if numel == 0:
            return torch.empty(tuple(int(s) for s in shape), dtype=dtype), None
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        with self._lock:
            best = None
            for i, buf in enumerate(self._free):
                if buf.numel() >= nbytes and (best is None or buf.numel() < self._free[best].numel()):
                    best = i
            buf = self._free.pop(best) if best is not None else None
        if buf is None:
            cap = 1 << max(16, (nbytes - 1).bit_length())  # power of two: few distinct sizes
            buf = torch.empty(cap, dtype=torch.uint8, pin_memory=self.pin)
        return buf[:nbytes].view(dtype)[:numel].view(tuple(int(s) for s in shape)), buf

    def release(self, base: torch.Tensor) -> None:
        with self._lock:
            self._free.append(base)


class _Job:
    __slots__ = ("buffer", "epoch", "ids", "lengths", "indices", "probs", "event", "pinned", "validated",
                 "skip_nonfinite")

    def __init__(self, buffer, epoch, ids, lengths, indices, probs, event, pinned, validated,
                 skip_nonfinite=False):
        self.buffer = buffer
        self.epoch = epoch
        self.ids = ids
        self.lengths = lengths
        self.indices = indices
        self.probs = probs
        self.event = event
        self.pinned = pinned
        self.validated = validated
        self.skip_nonfinite = skip_nonfinite


def _advise_random(m: np.memmap) -> None:
    """Access is one sentence at a time in shuffled order: turn off the kernel's read-ahead.

    Only matters when the store is larger than the page cache (then read-ahead would read
    ~32x the bytes used); best effort, as np.memmap keeps its mmap in a private attribute.
    """
    mm = getattr(m, "_mmap", None)
    if mm is not None and hasattr(mm, "madvise") and hasattr(mmap, "MADV_RANDOM"):
        try:
            mm.madvise(mmap.MADV_RANDOM)
        except (OSError, ValueError):
            pass


def _rows(a: np.ndarray) -> np.ndarray:
    """View a C-contiguous (N, k) array as N opaque k * itemsize-byte elements (no copy)."""
    a = np.ascontiguousarray(a)
    return a.view(np.dtype((np.void, a.shape[1] * a.dtype.itemsize))).reshape(a.shape[0])


def _to_np(x) -> np.ndarray:
    return x.numpy() if isinstance(x, torch.Tensor) else x


class _Writer:
    """One daemon thread that applies staged writes to the memory maps, in order.

    It holds no reference to the TopKStore, so a store that is dropped without close()
    is still garbage collected (its finalizer drains this writer).
    """

    def __init__(self, core: "_Core", max_pending: int):
        self.core = core
        self.queue: "queue.Queue[Optional[_Job]]" = queue.Queue(maxsize=max_pending)
        self.cond = threading.Condition()
        self.pending = [0, 0]  # jobs enqueued but not finished, per buffer
        self.error: Optional[BaseException] = None
        self.more_errors = 0  # failed writes after the first unreported one
        self.pool = _PinnedPool(pin=True)
        self.thread = threading.Thread(target=self._run, name="pskd-store-writer", daemon=True)
        self.thread.start()

    def submit(self, job: _Job) -> None:
        with self.cond:
            self.pending[job.buffer] += 1
        self.queue.put(job)  # blocks when max_pending jobs wait: bounded host memory

    def _run(self) -> None:
        while True:
            job = self.queue.get()
            if job is None:
                return
            try:
                if job.event is not None:
                    job.event.synchronize()  # the non-blocking device->host copy has landed
                self.core.apply(job)
            except BaseException as e:  # handed to the caller at its next call
                with self.cond:
                    if self.error is None:
                        self.error = e
                    else:
                        self.more_errors += 1
            finally:
                for base in job.pinned:
                    self.pool.release(base)
                job.indices = job.probs = None
                with self.cond:
                    self.pending[job.buffer] -= 1
                    self.cond.notify_all()

    def wait(self, buffer: Optional[int] = None) -> None:
        """Block until pending writes (to ``buffer``, or to any buffer) are applied."""
        with self.cond:
            if buffer is None:
                self.cond.wait_for(lambda: self.pending[0] == 0 and self.pending[1] == 0)
            else:
                self.cond.wait_for(lambda: self.pending[buffer] == 0)

    def take_error(self) -> Tuple[Optional[BaseException], int]:
        with self.cond:
            e, self.error = self.error, None
            n, self.more_errors = self.more_errors, 0
        return e, n

    def stop(self) -> None:
        if self.thread.is_alive():
            self.queue.put(None)
            self.thread.join()


def _shutdown_writer(holder: list) -> None:
    # weakref.finalize target: at GC or interpreter exit, apply what is queued (no data loss
    # on a forgotten close()); a killed process simply loses the queued batches, whose
    # stamps were never set, so they read back as "no prior", never as wrong data.
    w = holder[0]
    if w is not None:
        w.stop()
        holder[0] = None


# --------------------------------------------------------------------------------------
# Core: the memory maps and the vectorised gather/scatter
# --------------------------------------------------------------------------------------

class _Core:
    """Memory maps + offsets. Shared by the store (reads) and the writer thread (writes)."""

    def __init__(self, path: str, header: Dict[str, Any], lengths: np.ndarray, readonly: bool):
        self.path = path
        self.num_sentences = int(header["num_sentences"])
        self.num_tokens = int(header["num_tokens"])
        self.topk = int(header["topk"])
        self.vocab_size = int(header["vocab_size"])
        self.index_dtype = np.dtype(header["index_dtype"]).newbyteorder("<")
        # int32, normally memory-mapped from lengths.npy: file-backed, not anonymous memory.
        self.lengths = lengths
        # Exclusive cumsum, like MMapIndexedDataset's pointers: row of token j of sentence i.
        # The only per-sentence anonymous memory the store holds (8 bytes per sentence).
        self.offsets = np.zeros(self.num_sentences, dtype=np.int64)
        self.offsets[1:] = self.lengths[:-1]  # widen in place, then an in-place cumsum:
        np.cumsum(self.offsets[1:], out=self.offsets[1:])  # no temporary int64 copy
        self.offsets.flags.writeable = False
        mode = "r" if readonly else "r+"
        nt, k = self.num_tokens, self.topk
        self.indices = [np.memmap(os.path.join(path, f"indices.{b}.bin"), dtype=self.index_dtype, mode=mode, shape=(nt, k)) for b in (0, 1)]
        self.probs = [np.memmap(os.path.join(path, f"probs.{b}.bin"), dtype=PROB_DTYPE, mode=mode, shape=(nt, k)) for b in (0, 1)]
        self.stamps = [np.memmap(os.path.join(path, f"stamps.{b}.bin"), dtype=STAMP_DTYPE, mode=mode, shape=(self.num_sentences,)) for b in (0, 1)]
        self.dirty = [False, False]
        for m in self.indices + self.probs:
            _advise_random(m)
        # The same files seen as one opaque element per token row (k * itemsize bytes):
        # np.take / np.put on 1-D row arrays are 5-10x faster than 2-D fancy indexing.
        self.index_rows = [_rows(m) for m in self.indices]
        self.prob_rows = [_rows(m) for m in self.probs]
        # epoch -> sentences write() dropped for inf/NaN (skip_nonfinite); only the writer adds
        self.nonfinite = {}

    # -- validation shared by read/write ------------------------------------------------
    def check_batch(self, ids: np.ndarray, lengths: Optional[np.ndarray], what: str) -> None:
        """Ids in range and, unless lengths is None, lengths equal to the stored ones."""
        if lengths is not None and ids.shape != lengths.shape:
            raise StoreError(f"{what}: ids has {ids.shape[0]} entries but lengths has {lengths.shape[0]}; pass one target length per id")
        if ids.size == 0:
            return
        bad = (ids < 0) | (ids >= self.num_sentences)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise StoreError(
                f"{what}: sentence id {int(ids[i])} is out of range: the store at {self.path} holds {self.num_sentences} "
                f"sentences (ids 0..{self.num_sentences - 1}). Only training-set ids may be stored; if the training set "
                f"changed, " + _HINT_DIR.format(path=self.path))
        if lengths is None:
            return
        stored = self.lengths[ids]
        bad = stored != lengths
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise StoreError(
                f"{what}: batch length does not match the stored length for sentence id {int(ids[i])}: batch says "
                f"{int(lengths[i])}, store says {int(stored[i])} ({int(bad.sum())} of {ids.size} sentences differ). "
                f"Pass the number of target tokens including eos and excluding padding; if the training data changed, "
                + _HINT_DIR.format(path=self.path))

    def positions(self, ids: np.ndarray, lengths: np.ndarray, width: int) -> Tuple[np.ndarray, np.ndarray]:
        """Real tokens of a padded (B, width) batch: their flat index in the batch, and their row in the store.

        Token t of batch row r is batch element r * width + t and store row offsets[ids[r]] + t;
        padding (t >= lengths[r]) is left out.
        """
        B = ids.shape[0]
        mask = np.arange(width, dtype=np.int64)[None, :] < lengths[:, None]
        flat = np.flatnonzero(mask)
        shift = self.offsets[ids] - np.arange(B, dtype=np.int64) * width
        return flat, flat + np.repeat(shift, lengths)

    # -- gather ------------------------------------------------------------------------
    def gather(self, buffer: int, want_stamp: int, ids: np.ndarray, lengths: np.ndarray, width: int,
               max_mass: Optional[float] = None):
        B, k = ids.shape[0], self.topk
        out_idx = np.zeros((B * width, k), dtype=np.int64)
        out_p = np.zeros((B * width, k), dtype=np.float32)
        has = np.zeros(B, dtype=bool)
        if want_stamp > 0 and B > 0:  # stamp 0 means "never written", not "epoch 0"
            has = np.asarray(self.stamps[buffer][ids]) == want_stamp
            if has.any():
                flat, pos = self.positions(ids, np.where(has, lengths, 0), width)
                # Only the touched pages of the maps are read.
                gi = np.take(self.index_rows[buffer], pos).view(self.index_dtype).reshape(-1, k)
                gp = np.take(self.prob_rows[buffer], pos).view(PROB_DTYPE).reshape(-1, k)
                gp32 = gp.astype(np.float32)
                self.check_rows(buffer, want_stamp, ids, flat, width, gi, gp, gp32, max_mass)
                np.put(_rows(out_idx), flat, _rows(gi.astype(np.int64)))
                np.put(_rows(out_p), flat, _rows(gp32))
        return out_idx.reshape(B, width, k), out_p.reshape(B, width, k), has

    def check_rows(self, buffer, epoch, ids, flat, width, gi, gp, gp32, max_mass) -> None:
        """Refuse rows read back that write() could never have stored: the files changed on disk.

        A few reductions over the batch's rows, on the reading thread; the row-by-row search
        runs only when one of them fails.
        """
        if gi.size == 0:  # only empty sentences
            return
        bits = gp.view(np.uint16)
        signed = self.index_dtype.kind == "i"
        # float16 bits <= 0x3C00 (1.0): within [0, 1]; -0.0 (0x8000) takes the slow path below
        if bits.max() <= 0x3C00 and gi.max() < self.vocab_size and not (signed and gi.min() < 0) \
                and (max_mass is None or gp32.sum(1).max() <= max_mass):
            return
        bad_p = ((bits > 0x3C00) & (bits != 0x8000)).any(1)  # NaN, inf, < 0 or > 1 (see apply)
        bad_i = (gi >= self.vocab_size).any(1)
        if signed:
            bad_i |= (gi < 0).any(1)
        bad_m = gp32.sum(1) > max_mass if max_mass is not None else np.zeros_like(bad_p)
        bad = bad_p | bad_i | bad_m
        if not bad.any():
            return
        r = int(np.flatnonzero(bad)[0])
        sid, tok = int(ids[flat[r] // width]), int(flat[r] % width)
        if bad_i[r]:
            name = f"indices.{buffer}.bin"
            j = int(np.flatnonzero((gi[r] >= self.vocab_size) | (gi[r] < 0))[0])
            what = f"vocabulary id {int(gi[r, j])}, outside [0, vocab_size={self.vocab_size})"
        elif bad_p[r]:
            name = f"probs.{buffer}.bin"
            j = int(np.flatnonzero((bits[r] > 0x3C00) & (bits[r] != 0x8000))[0])
            what = f"probability {float(gp32[r, j])}, not within [0, 1]"
        else:
            name = f"probs.{buffer}.bin"
            what = f"set of top-{self.topk} probabilities summing to {float(gp32[r].sum()):.4f}, above {max_mass}"
        raise StoreError(
            f"{os.path.join(self.path, name)} is corrupt: the row epoch {epoch} wrote for sentence id {sid}, "
            f"target position {tok}, holds a {what} ({int(bad.sum())} bad rows in this batch); write() never "
            f"stores such values, so the file changed on disk (bit rot, a bad copy). The store is only a "
            f"cache of the last epoch's predictions: delete {self.path} and resume from the last checkpoint "
            f"(the resumed epoch then trains without priors, against the label-smoothed target alone, and "
            f"stores new ones for the next epoch), or put back an intact copy of the directory")

    # -- scatter (runs on the writer thread) -------------------------------------------
    def apply(self, job: _Job) -> None:
        ids, lengths = _to_np(job.ids), _to_np(job.lengths)
        what = f"write(epoch={job.epoch})"
        if not job.validated:  # ids/lengths came from the device: checked here, after the copy
            self.check_batch(ids, lengths, what)
            if lengths.size and int(lengths.max()) > job.indices.shape[1]:
                raise StoreError(f"{what}: indices/probs have {job.indices.shape[1]} target positions but the longest sentence has {int(lengths.max())}; pass the full padded (B, T, k) tensors. This batch was not written.")
        if ids.size == 0:
            return
        idx, prb = _to_np(job.indices), _to_np(job.probs)
        B, width, k = idx.shape
        flat, pos = self.positions(ids, lengths, width)
        # (N, k): real tokens only, padding is ignored
        vi = np.take(np.ascontiguousarray(idx).reshape(B * width, k), flat, axis=0)
        vp = np.take(np.ascontiguousarray(prb).reshape(B * width, k), flat, axis=0).astype(PROB_DTYPE, copy=False)
        skipped = ids[:0]
        if vi.size:
            # On the float16 bits (float16 arithmetic in numpy is slow): a value is in [0, 1]
            # iff its bits are <= those of 1.0 (0x3C00) or it is -0.0 (0x8000); NaN/inf are above.
            bits = vp.view(np.uint16)
            bad = (bits > 0x3C00) & (bits != 0x8000)
            nonfinite = (bits & 0x7C00) == 0x7C00  # all exponent bits set: inf or NaN
            # Non-finite values are what an overflowing forward pass gives (fairseq skips such
            # steps and goes on): when asked, drop those sentences instead of failing the run.
            # A finite value outside [0, 1] is a caller's mistake (logits) either way.
            refuse = bad & ~nonfinite if job.skip_nonfinite else bad
            if refuse.any():
                raise StoreError(
                    f"{what}: top-k probabilities must be finite and within [0, 1], got e.g. {float(vp.reshape(-1)[np.flatnonzero(refuse)[0]])} "
                    f"({int(refuse.sum())} bad values); store probabilities (softmax), not logits or log-probabilities. "
                    f"This batch was not written.")
            if job.skip_nonfinite:
                row_bad = nonfinite.any(1)
                if row_bad.any():
                    sentence = np.repeat(np.arange(B), lengths)  # batch row of each real token
                    drop = np.zeros(B, dtype=bool)
                    drop[sentence[row_bad]] = True
                    keep = ~drop[sentence]
                    vi, vp, pos = vi[keep], vp[keep], pos[keep]
                    skipped, ids = ids[drop], ids[~drop]
        if vi.size:
            lo, hi = int(vi.min()), int(vi.max())
            if lo < 0 or hi >= self.vocab_size:
                raise StoreError(
                    f"{what}: top-k index values must be in [0, vocab_size={self.vocab_size}), got range [{lo}, {hi}]; "
                    f"the store was created for another vocabulary size or the indices are not vocabulary ids. "
                    f"Create the store with vocab_size = the model's output dimension ({_HINT_DIR.format(path=self.path)}). "
                    f"This batch was not written.")
        b = job.buffer
        np.put(self.index_rows[b], pos, _rows(vi.astype(self.index_dtype, copy=False)))
        np.put(self.prob_rows[b], pos, _rows(vp))
        # Data before stamp: a reader that sees the stamp sees the data (same page cache).
        self.stamps[b][ids] = job.epoch
        # A dropped sentence keeps no row in this buffer, not even one written earlier this epoch.
        self.stamps[b][skipped] = 0
        self.dirty[b] = True
        if skipped.size:
            self.nonfinite[job.epoch] = self.nonfinite.get(job.epoch, 0) + int(skipped.size)

    def msync(self, buffers=(0, 1)) -> None:
        for b in buffers:
            if self.dirty[b]:
                self.dirty[b] = False
                self.indices[b].flush()
                self.probs[b].flush()
                self.stamps[b].flush()

    def release(self) -> None:
        # Drop the maps; numpy unmaps when the last view goes away.
        self.indices = self.probs = self.stamps = self.index_rows = self.prob_rows = None


# --------------------------------------------------------------------------------------
# Public store
# --------------------------------------------------------------------------------------

def _make_dir(path) -> bool:
    """Create the store directory if missing; True if this call made it."""
    if os.path.isdir(path):
        return False
    try:
        os.makedirs(path)
        return True
    except FileExistsError:  # made by someone else meanwhile: the lock decides
        return False
    except OSError as e:
        raise StoreError(f"cannot create store directory {path}: {e.strerror or e}; pass a writable --pskd-store-dir") from e


def _lock_or_undo(path, owner, made_dir):
    """The directory's ownership lock; on failure, remove the directory if this call made it."""
    try:
        return _StoreLock.acquire(path, owner)
    except BaseException:
        if made_dir:
            try:
                os.rmdir(path)
            except OSError:
                pass
        raise


class TopKStore:
    """Top-k (index, probability) of the previous epoch's prediction for every target token.

    Use :meth:`create`, :meth:`open` or :meth:`open_or_create`; do not call the constructor.
    Epochs are 1-based. ``read(epoch, ...)`` returns what ``write(epoch - 1, ...)`` stored.
    """

    FORMAT_VERSION = 1

    # ---------------------------------------------------------------- construction
    def __init__(self, path: str, header: Dict[str, Any], lengths: np.ndarray, readonly: bool, max_pending: int = DEFAULT_MAX_PENDING,
                 lock: Optional[_StoreLock] = None):
        self._path = os.path.abspath(path)
        self._header = header
        self._readonly = bool(readonly)
        self._max_pending = int(max_pending)
        self._core = _Core(self._path, header, lengths, self._readonly)
        self._writer_holder: list = [None]
        self._finalizer = weakref.finalize(self, _shutdown_writer, self._writer_holder)
        self._lock = lock
        # a store dropped without close() unlocks when it is collected (the writer is drained first:
        # finalizers run in reverse order of registration)
        self._lock_finalizer = weakref.finalize(self, lock.release) if lock is not None else None
        self._closed = False
        self._skip_nonfinite = False

    @staticmethod
    def estimate_bytes(num_sentences: int, num_tokens: int, topk: int, vocab_size: int) -> int:
        """Disk bytes a store needs: both buffers' arrays + lengths file + header (rounded up)."""
        num_sentences, num_tokens, topk, vocab_size = int(num_sentences), int(num_tokens), int(topk), int(vocab_size)
        arrays = sum(_array_files(num_sentences, num_tokens, topk, vocab_size).values())
        lengths_file = 128 + num_sentences * LENGTH_DTYPE.itemsize  # np.save header is 128 bytes for 1-D
        return arrays + lengths_file + 4096  # header.json fits one filesystem block

    @staticmethod
    def _bytes_on_disk(path: str, num_sentences: int, num_tokens: int, topk: int, vocab_size: int) -> Tuple[int, int]:
        """(bytes the store's files take on ``path``'s filesystem, its block size): each file
        rounded up to whole blocks, plus a margin for the filesystem's own metadata (extent
        trees), so that a free-space check that passes is not followed by ENOSPC in fallocate."""
        try:
            st = os.statvfs(path)
            block = int(st.f_frsize or st.f_bsize or 4096)
        except (OSError, AttributeError):
            block = 4096
        sizes = list(_array_files(num_sentences, num_tokens, topk, vocab_size).values())
        sizes += [128 + num_sentences * LENGTH_DTYPE.itemsize, 4096, 4096, 1]  # lengths, header, its temp copy, lock
        total = sum(-(-int(s) // block) * block for s in sizes)
        return total + total // 1000 + (1 << 20), block

    @classmethod
    def create(cls, path, target_lengths, topk: int, vocab_size: int, lock: bool = True,
               owner: Optional[str] = None) -> "TopKStore":
        """Create a new store in ``path`` (made if missing; must not already hold a store).

        Every array file is preallocated to its full size with ``posix_fallocate`` so that a
        full disk fails here, at start-up, and not hours into training. The header is written
        last: a directory without ``header.json`` is an interrupted creation.

        ``lock``: hold the directory's ownership lock while the store is open (see :meth:`open`);
        ``owner`` is a short description of the user (e.g. its save dir) recorded with it.
        """
        path = os.path.abspath(os.fspath(path))
        lengths = _checked_lengths(target_lengths)
        topk, vocab_size = cls._check_k_vocab(topk, vocab_size)
        cls._check_can_create(path)
        made_dir = _make_dir(path)
        if not os.access(path, os.W_OK | os.X_OK):
            raise StoreError(f"store directory {path} is not writable; fix its permissions or pass a writable --pskd-store-dir")
        held = _lock_or_undo(path, owner, made_dir) if lock else None
        try:
            return cls._create_locked(path, lengths, topk, vocab_size, held, made_dir)
        except BaseException:
            if held is not None:
                held.release()
            raise

    @staticmethod
    def _check_can_create(path: str) -> None:
        """Refuse a directory that holds a store or files that are not the store's."""
        if os.path.exists(os.path.join(path, HEADER_NAME)) and _looks_like_store(path):
            raise StoreError(f"{path} already holds a PS-KD store; open it with TopKStore.open / open_or_create, or " + _HINT_DIR.format(path=path))
        if os.path.isdir(path):
            others = sorted(set(os.listdir(path)) - set(_store_file_names()))
            if os.path.exists(os.path.join(path, HEADER_NAME)):
                others = sorted(others + [HEADER_NAME])  # not the store's header (see above)
            if others:
                raise StoreError(f"cannot create a store in {path}: the directory is not empty ({', '.join(others[:5])}{' ...' if len(others) > 5 else ''}); pass an empty or new --pskd-store-dir")
            # Only our own leftovers (an interrupted create): overwritten below.

    @classmethod
    def _create_locked(cls, path: str, lengths: np.ndarray, topk: int, vocab_size: int,
                       held: Optional[_StoreLock], made_dir: bool) -> "TopKStore":
        """create() once the directory exists and (with ``held``) is locked by this process."""
        cls._check_can_create(path)  # again, under the lock: another process may have created one
        num_sentences, num_tokens = int(lengths.size), int(lengths.sum(dtype=np.int64))
        index_dtype = _index_dtype(vocab_size)
        needed, block = cls._bytes_on_disk(path, num_sentences, num_tokens, topk, vocab_size)
        files = _array_files(num_sentences, num_tokens, topk, vocab_size)
        created: List[str] = []

        def cleanup():
            for p in created + [os.path.join(path, HEADER_NAME + _HEADER_TMP_SUFFIX)]:
                try:
                    os.unlink(p)
                except OSError:
                    pass
            if held is not None and held.created:  # leave the directory as it was
                try:
                    os.unlink(held.path)
                except OSError:
                    pass
            if made_dir:
                try:
                    os.rmdir(path)
                except OSError:
                    pass

        def free_bytes() -> int:
            try:
                return shutil.disk_usage(path).free
            except OSError:
                return -1

        try:
            free = free_bytes()
            if 0 <= free < needed:
                raise StoreError(
                    f"not enough disk space for the PS-KD store in {path}: needs {needed} bytes ({_human(needed)}: its files "
                    f"in whole {block}-byte filesystem blocks, and a margin), {free} bytes ({_human(free)}) free. Free space, "
                    f"use a smaller --pskd-topk, or pass a --pskd-store-dir on a larger disk")
            for name, size in files.items():
                fp = os.path.join(path, name)
                fd = os.open(fp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
                created.append(fp)
                try:
                    _preallocate(fd, size)
                except OSError as e:
                    if e.errno in (errno.ENOSPC, errno.EDQUOT):
                        free = free_bytes()
                        raise StoreError(
                            f"disk full while preallocating the PS-KD store in {path}: it needs {needed} bytes ({_human(needed)}), "
                            f"{free} bytes ({_human(max(free, 0))}) free before cleanup. Free space, use a smaller --pskd-topk, "
                            f"or pass a --pskd-store-dir on a larger disk") from e
                    raise StoreError(f"cannot preallocate {fp} ({size} bytes): {e.strerror or e}; pass a --pskd-store-dir on a local, writable filesystem") from e
                finally:
                    os.close(fd)
            lp = os.path.join(path, LENGTHS_NAME)
            created.append(lp)
            with open(lp, "wb") as f:
                np.save(f, lengths.astype(LENGTH_DTYPE, copy=False), allow_pickle=False)
                f.flush()
                os.fsync(f.fileno())
            header = {
                "format_version": cls.FORMAT_VERSION,
                "num_sentences": num_sentences,
                "num_tokens": num_tokens,
                "topk": topk,
                "vocab_size": vocab_size,
                "index_dtype": index_dtype.name,
                "prob_dtype": PROB_DTYPE.name,
                "stamp_dtype": STAMP_DTYPE.name,
                "lengths_fingerprint": _fingerprint(lengths),
                "buffers": [{"epoch": None, "sentences_written": 0}, {"epoch": None, "sentences_written": 0}],
                "run_id": None,
            }
            hp = os.path.join(path, HEADER_NAME)
            created.append(hp)
            _write_json_atomic(hp, header)  # last: its presence means the store is complete
            stored = np.load(lp, mmap_mode="r", allow_pickle=False)
        except PermissionError as e:
            cleanup()
            raise StoreError(f"cannot write the PS-KD store in {path}: {e.strerror or e}; pass a writable --pskd-store-dir") from e
        except BaseException:
            cleanup()
            raise
        return cls(path, header, stored, readonly=False, lock=held)

    @classmethod
    def open(cls, path, target_lengths=None, topk: Optional[int] = None, vocab_size: Optional[int] = None, readonly: bool = False,
             lock: bool = True, owner: Optional[str] = None, _held: Optional[_StoreLock] = None) -> "TopKStore":
        """Open an existing store, validating header and file sizes.

        ``target_lengths``, ``topk`` and ``vocab_size``, when given, must match the store.

        Opened for writing with ``lock`` (the default), the store is locked against every other
        process until it is closed (an exclusive ``flock`` on ``DIR/lock``; the kernel drops it when
        the process ends, ``kill -9`` included); a second process gets :class:`StoreLockedError`
        naming the holder. ``owner`` is a short description recorded with the lock (e.g. the save
        dir). Readonly opens never lock. ``lock=False`` is for the other processes of the run
        that holds the lock (data-parallel ranks that write into the same store).
        """
        path = os.path.abspath(os.fspath(path))
        if not os.path.isdir(path):
            raise StoreError(f"no PS-KD store at {path}: the directory does not exist; create one with TopKStore.create / open_or_create or pass the right --pskd-store-dir")
        hp = os.path.join(path, HEADER_NAME)
        if not os.path.exists(hp):
            if _looks_like_store(path):
                raise StoreError(f"{path} has no {HEADER_NAME}: its creation was interrupted; " + _HINT_DIR.format(path=path))
            raise StoreError(_not_a_store(path))
        if not readonly and not os.access(path, os.W_OK):
            raise StoreError(f"the PS-KD store at {path} is not writable; fix permissions, open it with readonly=True, or pass another --pskd-store-dir")
        held = _held
        if held is None and lock and not readonly:
            held = _StoreLock.acquire(path, owner)  # before reading anything: a writer may be mid-update
        try:
            store = cls._open_checked(path, target_lengths, topk, vocab_size, readonly, held)
        except BaseException:
            if held is not None and _held is None:
                held.release()
            raise
        return store

    @classmethod
    def _open_checked(cls, path: str, target_lengths, topk, vocab_size, readonly: bool,
                      held: Optional[_StoreLock]) -> "TopKStore":
        hint = _delete_hint(path)
        hp = os.path.join(path, HEADER_NAME)
        try:
            with open(hp, "r", encoding="utf-8") as f:
                header = json.load(f)
        except FileNotFoundError as e:  # removed since open() looked
            raise StoreError(f"{path} has no {HEADER_NAME}; " + hint) from e
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise StoreError(f"{hp} is unreadable or corrupt ({e}); " + hint) from e
        header = cls._check_header(header, hp, hint)

        lp = os.path.join(path, LENGTHS_NAME)
        try:
            stored = np.load(lp, mmap_mode="r", allow_pickle=False)
        except FileNotFoundError as e:
            raise StoreError(f"{lp} is missing; the store is incomplete: " + hint) from e
        except (OSError, ValueError, EOFError) as e:
            raise StoreError(f"{lp} is truncated or corrupt ({e}); " + hint) from e
        if stored.ndim != 1 or stored.shape[0] != header["num_sentences"] or not np.issubdtype(stored.dtype, np.integer):
            raise StoreError(f"{lp} holds {stored.dtype} {stored.shape}, header says int ({header['num_sentences']},); the store is corrupt: " + hint)
        if _fingerprint(stored) != header["lengths_fingerprint"] or int(stored.sum(dtype=np.int64)) != header["num_tokens"]:
            raise StoreError(f"{lp} does not match the fingerprint in {HEADER_NAME}; the store is corrupt: " + hint)

        expected = _array_files(header["num_sentences"], header["num_tokens"], header["topk"], header["vocab_size"])
        for name, size in expected.items():
            fp = os.path.join(path, name)
            try:
                actual = os.path.getsize(fp)
            except OSError:
                raise StoreError(f"{fp} is missing; the store is incomplete: " + hint) from None
            if actual != size:
                what = "truncated" if actual < size else "larger than expected"
                raise StoreError(f"{fp} is {what}: {actual} bytes, the header needs {size}; the store is corrupt: " + hint)

        if target_lengths is not None:
            given = _checked_lengths(target_lengths)
            if given.size != header["num_sentences"] or _fingerprint(given) != header["lengths_fingerprint"]:
                detail = f"store: {header['num_sentences']} sentences / {header['num_tokens']} target tokens; given: {given.size} sentences / {int(given.sum(dtype=np.int64))} target tokens"
                if given.size == header["num_sentences"]:
                    first = int(np.flatnonzero(given != stored)[0])
                    detail += f"; first differing sentence id {first} (store {int(stored[first])}, given {int(given[first])})"
                raise StoreError(f"the PS-KD store at {path} was built for another dataset (target lengths differ: {detail}); " + hint)
        if topk is not None and int(topk) != header["topk"]:
            raise StoreError(f"the PS-KD store at {path} keeps topk={header['topk']} but topk={int(topk)} was requested; use topk={header['topk']} or " + hint)
        if vocab_size is not None and int(vocab_size) != header["vocab_size"]:
            raise StoreError(f"the PS-KD store at {path} was built for vocab_size={header['vocab_size']} but vocab_size={int(vocab_size)} was requested (another dictionary?); " + hint)
        try:
            return cls(path, header, stored, readonly=readonly, lock=held)
        except PermissionError as e:
            raise StoreError(f"cannot open the PS-KD store at {path} for writing: {e.strerror or e}; fix permissions, open it with readonly=True, or pass another --pskd-store-dir") from e

    @classmethod
    def open_or_create(cls, path, target_lengths, topk: int, vocab_size: int, lock: bool = True,
                       owner: Optional[str] = None) -> "TopKStore":
        """Open the store in ``path`` if it has one (it must match), else create it.

        With ``lock``, the directory is locked first, so two processes that start at once do not
        both create (or one open what the other is still creating): the second one gets
        :class:`StoreLockedError`."""
        path = os.path.abspath(os.fspath(path))
        if not lock:
            if os.path.exists(os.path.join(path, HEADER_NAME)):
                return cls.open(path, target_lengths=target_lengths, topk=topk, vocab_size=vocab_size, lock=False)
            return cls.create(path, target_lengths, topk, vocab_size, lock=False)
        lengths = _checked_lengths(target_lengths)  # before anything is made on disk
        topk, vocab_size = cls._check_k_vocab(topk, vocab_size)
        if not (os.path.exists(os.path.join(path, HEADER_NAME)) and _looks_like_store(path)):
            cls._check_can_create(path)  # a foreign directory gets no lock file
        made_dir = _make_dir(path)
        held = _lock_or_undo(path, owner, made_dir)
        try:
            if os.path.exists(os.path.join(path, HEADER_NAME)):
                return cls.open(path, target_lengths=lengths, topk=topk, vocab_size=vocab_size, _held=held)
            if not os.access(path, os.W_OK | os.X_OK):
                raise StoreError(f"store directory {path} is not writable; fix its permissions or pass a writable --pskd-store-dir")
            return cls._create_locked(path, lengths, topk, vocab_size, held, made_dir)
        except BaseException:
            held.release()
            raise

    @staticmethod
    def _check_k_vocab(topk, vocab_size) -> Tuple[int, int]:
        try:
            topk, vocab_size = int(topk), int(vocab_size)
        except (TypeError, ValueError):
            raise StoreError(f"topk and vocab_size must be integers, got {topk!r} and {vocab_size!r}") from None
        if topk < 1:
            raise StoreError(f"topk must be >= 1, got {topk}")
        if vocab_size < 1 or vocab_size > np.iinfo(np.int32).max:
            raise StoreError(f"vocab_size must be in [1, 2^31), got {vocab_size}; pass len(target dictionary)")
        if topk > vocab_size:
            raise StoreError(f"topk={topk} exceeds vocab_size={vocab_size}; use a smaller topk")
        return topk, vocab_size

    @classmethod
    def _check_header(cls, header: Any, hp: str, hint: str) -> Dict[str, Any]:
        if not isinstance(header, dict):
            raise StoreError(f"{hp} is corrupt (not a JSON object); " + hint)
        version = header.get("format_version")
        if version != cls.FORMAT_VERSION:
            raise StoreError(f"{hp} has format_version {version!r}; this fairseq-pskd reads version {cls.FORMAT_VERSION} only. The store was written by another fairseq-pskd version; " + hint)
        for key in ("num_sentences", "num_tokens", "topk", "vocab_size"):
            v = header.get(key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise StoreError(f"{hp} is corrupt: {key} = {v!r} is not a positive integer; " + hint)
        if header.get("index_dtype") != _index_dtype(header["vocab_size"]).name or header.get("prob_dtype") != PROB_DTYPE.name:
            raise StoreError(f"{hp} is corrupt: dtypes {header.get('index_dtype')!r}/{header.get('prob_dtype')!r} do not match vocab_size {header['vocab_size']}; " + hint)
        if not isinstance(header.get("lengths_fingerprint"), str):
            raise StoreError(f"{hp} is corrupt: lengths_fingerprint missing; " + hint)
        bufs = header.get("buffers")
        if not (isinstance(bufs, list) and len(bufs) == 2 and all(isinstance(b, dict) for b in bufs)):
            raise StoreError(f"{hp} is corrupt: 'buffers' must be a list of two objects; " + hint)
        # optional: stores written before run identities have none (read as None)
        if not isinstance(header.get("run_id"), (str, type(None))):
            raise StoreError(f"{hp} is corrupt: run_id = {header.get('run_id')!r} is not a string; " + hint)
        return header

    # ---------------------------------------------------------------- properties
    @property
    def path(self) -> str:
        return self._path

    @property
    def num_sentences(self) -> int:
        return self._core.num_sentences

    @property
    def num_tokens(self) -> int:
        return self._core.num_tokens

    @property
    def topk(self) -> int:
        return self._core.topk

    @property
    def vocab_size(self) -> int:
        return self._core.vocab_size

    @property
    def readonly(self) -> bool:
        return self._readonly

    @property
    def skip_nonfinite(self) -> bool:
        """False (default): write() refuses inf/NaN probabilities like any other bad value.
        True: it drops the sentences that hold them and counts them (see write)."""
        return self._skip_nonfinite

    @skip_nonfinite.setter
    def skip_nonfinite(self, value: bool) -> None:
        self._skip_nonfinite = bool(value)  # applies to later write() calls

    @property
    def lengths(self) -> np.ndarray:
        """Stored target length of every sentence (read-only int32 array, memory-mapped)."""
        return self._core.lengths

    @property
    def run_id(self) -> Optional[str]:
        """Identity of the training run whose priors the store holds (None: not recorded), as
        this process last read or wrote the header."""
        return self._header.get("run_id")

    @property
    def locked(self) -> bool:
        """Whether this process holds the store's ownership lock (see :meth:`open`)."""
        return self._lock is not None and self._lock.held

    # ---------------------------------------------------------------- internals
    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"the PS-KD store at {self._path} is closed; open it again with TopKStore.open")

    def _raise_writer_error(self) -> None:
        w = self._writer_holder[0]
        if w is None:
            return
        e, more = w.take_error()
        if e is not None:
            also = f" ({more} later write(s) failed too and were dropped)" if more else ""
            if isinstance(e, StoreError):
                raise StoreError(f"an earlier asynchronous write failed{also}: {e}") from e
            raise StoreError(f"an earlier asynchronous write to {self._path} failed{also}: {type(e).__name__}: {e}; check the disk and the store directory") from e

    def _writer(self) -> _Writer:
        w = self._writer_holder[0]
        if w is None:  # started lazily: read-only users never get a thread
            w = _Writer(self._core, self._max_pending)
            self._writer_holder[0] = w
        return w

    @staticmethod
    def _check_epoch(epoch) -> int:
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or int(epoch) < 1:
            raise StoreError(f"epoch must be a 1-based integer, got {epoch!r}; pass fairseq's epoch number")
        if int(epoch) > np.iinfo(STAMP_DTYPE).max:
            raise StoreError(f"epoch {epoch} does not fit the int32 stamps")
        return int(epoch)

    # ---------------------------------------------------------------- read
    def read(self, epoch: int, ids, lengths=None, max_len: Optional[int] = None,
             max_mass: Optional[float] = None):
        """Priors for the batch: what epoch ``epoch - 1`` wrote for these sentences.

        Returns CPU tensors ``indices`` int64 (B, T, k), ``probs`` float32 (B, T, k) and
        ``has_prior`` bool (B,), T = ``max_len`` or ``lengths.max()``. Padding positions and
        sentences without a prior are zeros. If writes to the buffer being read are still
        queued (only when reading the buffer the current epoch writes, e.g. read(t + 1)
        right after write(t)), they are applied first; the normal read(t) during epoch t
        reads the other buffer and never waits. Pass CPU ids/lengths: CUDA ones force a sync.
        ``lengths=None`` takes the stored lengths (the training set's own) after the id check.

        Rows read back are checked against what ``write`` accepts (indices in
        [0, vocab_size), probabilities in [0, 1]) and, with ``max_mass``, against a top-k of
        one distribution (each row's probabilities sum to at most ``max_mass``, e.g. 1 plus
        float16 rounding); a row that fails was changed on disk and raises StoreError naming
        the file and the sentence.
        """
        self._check_open()
        epoch = self._check_epoch(epoch)
        self._raise_writer_error()
        ids = _as_numpy_1d_int(ids, "ids")
        lengths = None if lengths is None else _as_numpy_1d_int(lengths, "lengths")
        self._core.check_batch(ids, lengths, f"read(epoch={epoch})")
        if lengths is None:
            lengths = self._core.lengths[ids].astype(np.int64)
        longest = int(lengths.max()) if lengths.size else 0
        if max_len is None:
            width = longest
        else:
            width = int(max_len)
            if width < longest:
                raise StoreError(f"read(epoch={epoch}): max_len={width} is shorter than the longest sentence in the batch ({longest}); pass max_len >= lengths.max() (the padded target width)")
        buffer = (epoch - 1) % 2
        w = self._writer_holder[0]
        if w is not None:
            w.wait(buffer)
            self._raise_writer_error()
        idx, prb, has = self._core.gather(buffer, epoch - 1, ids, lengths, width, max_mass)
        return torch.from_numpy(idx), torch.from_numpy(prb), torch.from_numpy(has)

    # ---------------------------------------------------------------- write
    def write(self, epoch: int, ids, lengths, indices, probs) -> None:
        """Store this epoch's top-k for the batch (asynchronously; see module docstring).

        ``indices`` (B, T', k) int and ``probs`` (B, T', k) float, T' >= lengths.max(), on
        any device. Positions >= length are ignored. Shape errors, and id/length errors for
        CPU ids, raise here. Value errors (index outside [0, vocab_size), probabilities not
        finite or outside [0, 1], id/length errors for CUDA ids) are found on the writer
        thread; that batch is dropped (its stamps are not set) and the error is raised by the
        next flush() or read() of that buffer (both wait for the writer), or by a later
        write() once the writer has reached the bad batch.

        With ``skip_nonfinite`` set, a sentence with an inf/NaN probability (an overflowing
        forward pass) is dropped instead, on the writer thread after the copy (no device
        sync): its rows are not written and its stamp in this buffer is cleared, so it reads
        back as "no prior"; the rest of the batch is written. ``skipped_nonfinite(epoch)``
        counts them. Finite values outside [0, 1] still raise.
        """
        self._check_open()
        epoch = self._check_epoch(epoch)
        self._raise_writer_error()
        if self._readonly:
            raise StoreError(f"the PS-KD store at {self._path} was opened readonly; open it with readonly=False to write (in data-parallel training every rank that trains must be able to write)")
        what = f"write(epoch={epoch})"
        for name, t in (("indices", indices), ("probs", probs)):
            if not isinstance(t, (torch.Tensor, np.ndarray)):
                raise StoreError(f"{what}: {name} must be a torch tensor or numpy array, got {type(t).__name__}")
            if t.ndim != 3:
                raise StoreError(f"{what}: {name} must have shape (batch, target_len, k), got {tuple(t.shape)}")
        if tuple(indices.shape) != tuple(probs.shape):
            raise StoreError(f"{what}: indices {tuple(indices.shape)} and probs {tuple(probs.shape)} must have the same shape")
        B, width, k = (int(s) for s in indices.shape)
        if k != self.topk:
            raise StoreError(f"{what}: got top-{k} but the store at {self._path} keeps top-{self.topk}; take topk={self.topk} (or " + _HINT_DIR.format(path=self._path) + ")")
        if _is_float(indices) or not _is_float(probs):
            raise StoreError(f"{what}: indices must be integer and probs floating point (got {indices.dtype} and {probs.dtype}); did you swap them?")

        on_device = any(isinstance(t, torch.Tensor) and t.device.type != "cpu" for t in (ids, lengths))
        if not on_device:
            ids_np = _as_numpy_1d_int(ids, "ids")
            len_np = _as_numpy_1d_int(lengths, "lengths")
            if ids_np.shape[0] != B:
                raise StoreError(f"{what}: {ids_np.shape[0]} ids for a batch of {B} rows; pass one id per row of indices/probs")
            self._core.check_batch(ids_np, len_np, what)
            if len_np.size and int(len_np.max()) > width:
                raise StoreError(f"{what}: indices/probs have {width} target positions but the longest sentence has {int(len_np.max())}; pass the full padded (B, T, k) tensors")
            if B == 0:
                return
        else:
            for name, t in (("ids", ids), ("lengths", lengths)):
                if not isinstance(t, torch.Tensor) or t.ndim != 1 or t.shape[0] != B:
                    raise StoreError(f"{what}: {name} must be a 1-D tensor of {B} entries (one per row of indices/probs)")
                if t.is_floating_point():
                    raise StoreError(f"{what}: {name} must be an integer tensor, got {t.dtype}")

        pinned: List[torch.Tensor] = []
        event = None
        writer = self._writer()
        cuda = [t for t in (indices, probs, ids, lengths) if isinstance(t, torch.Tensor) and t.is_cuda]
        if cuda:
            # Narrow on the device (int32 / float16 halve the copy; vocabulary ids and
            # probabilities fit them) and copy everything that is on the device as ONE
            # asynchronous transfer into a pinned host buffer, on the producer's stream; the
            # writer thread waits on the event, the caller never does. inf/NaN survive the
            # narrowing, so the writer finds them after the copy: skip_nonfinite costs no sync.
            parts = [(indices, torch.int32), (probs, torch.float16)]
            if on_device:
                parts += [(ids, torch.int64), (lengths, torch.int64)]
            on_gpu = [i for i, (t, _) in enumerate(parts) if isinstance(t, torch.Tensor) and t.is_cuda]
            with torch.cuda.device(cuda[0].device):
                views, base = _stage_to_host([parts[i] for i in on_gpu], writer.pool)
                event = torch.cuda.Event()
                event.record(torch.cuda.current_stream())
            if base is not None:
                pinned.append(base)
            host = [views[on_gpu.index(i)] if i in on_gpu else _host_copy(t, dtype)
                    for i, (t, dtype) in enumerate(parts)]
            idx_h, prb_h = host[0], host[1]
            ids_h, len_h = (host[2], host[3]) if on_device else (ids_np, len_np)
        else:
            # CPU: one copy now, as the caller may reuse its tensors; probabilities narrowed
            # to the stored float16 in the same pass (values > 1, inf, nan stay detectable).
            idx_h = _host_copy(indices)
            prb_h = _host_copy(probs, torch.float16)
            ids_h, len_h = ids_np, len_np
        writer.submit(_Job((epoch % 2), epoch, ids_h, len_h, idx_h, prb_h, event, pinned,
                           validated=not on_device, skip_nonfinite=self._skip_nonfinite))

    def skipped_nonfinite(self, epoch: int) -> int:
        """Sentences this process's ``write(epoch, ...)`` calls dropped for inf/NaN probabilities
        (``skip_nonfinite`` set), among the writes applied so far (all of them after ``flush()``)."""
        self._check_open()
        return int(self._core.nonfinite.get(self._check_epoch(epoch), 0))

    # ---------------------------------------------------------------- sync / lifecycle
    def flush(self, sync: bool = True) -> None:
        """Wait for all queued writes, re-raise a writer error, and msync the written maps.

        After the wait, every process that maps the files on this machine sees the rows
        (they share the page cache). ``sync=True`` (the default) also writes the dirty pages
        to disk (msync), which is what makes them survive a machine crash and is needed
        before another node reads them; it costs up to the size of a buffer in disk writes.
        """
        self._check_open()
        w = self._writer_holder[0]
        if w is not None:
            w.wait()
            self._raise_writer_error()
        if sync and not self._readonly:
            self._core.msync()

    def end_epoch(self, epoch: int, update_header: bool = True) -> None:
        """Flush, then (if ``update_header``) record that buffer ``epoch % 2`` holds ``epoch``.

        The header is informative (``inspect``); per-sentence stamps decide what is read.
        In data-parallel training call it with ``update_header=True`` on rank 0 only, after a
        barrier if the count of written sentences should include the other ranks.
        """
        epoch = self._check_epoch(epoch)
        self.flush()
        if not update_header:
            return
        if self._readonly:
            raise StoreError(f"end_epoch(update_header=True) on the readonly store at {self._path}; pass update_header=False on ranks that opened it readonly")
        b = epoch % 2
        count = self.sentences_written(epoch)
        header = dict(self._header)
        bufs = [dict(x) for x in header["buffers"]]
        bufs[b] = {"epoch": epoch, "sentences_written": count}
        header["buffers"] = bufs
        self._write_header(header)

    def reset(self, run_id: Optional[str] = None) -> None:
        """Forget every stored prior (zero all stamps): use when a new training run reuses a store dir.

        ``run_id`` becomes the store's run identity (see :meth:`set_run_id`); None records none."""
        self._check_open()
        if self._readonly:
            raise StoreError(f"cannot reset the readonly store at {self._path}")
        self.flush()
        for b in (0, 1):
            self._core.stamps[b][:] = 0
            self._core.dirty[b] = True
        self._core.msync()  # stamps zeroed on disk before the header says whose store it is
        header = dict(self._header)
        header["buffers"] = [{"epoch": None, "sentences_written": 0}, {"epoch": None, "sentences_written": 0}]
        header["run_id"] = self._checked_run_id(run_id)
        self._write_header(header)

    def set_run_id(self, run_id: Optional[str]) -> None:
        """Record which training run the stored priors belong to (the criterion stores a uuid that
        its checkpoints carry too, and refuses to resume against another run's priors)."""
        self._check_open()
        if self._readonly:
            raise StoreError(f"cannot set the run identity of the readonly store at {self._path}")
        header = dict(self._header)
        header["run_id"] = self._checked_run_id(run_id)
        self._write_header(header)

    @staticmethod
    def _checked_run_id(run_id) -> Optional[str]:
        if run_id is not None and not isinstance(run_id, str):
            raise StoreError(f"run_id must be a string or None, got {run_id!r}")
        return run_id

    def _write_header(self, header: Dict[str, Any]) -> None:
        hp = os.path.join(self._path, HEADER_NAME)
        try:
            _write_json_atomic(hp, header)
        except OSError as e:
            raise StoreError(f"cannot update {hp}: {e.strerror or e}; check the store directory (the previous header is unchanged)") from e
        self._header = header

    def sentences_written(self, epoch: int) -> int:
        """How many sentences hold rows written by ``epoch`` (their stamp in buffer ``epoch % 2``),
        i.e. how many have a prior in epoch ``epoch + 1``; counts what is applied so far."""
        self._check_open()
        epoch = self._check_epoch(epoch)
        return int(np.count_nonzero(np.asarray(self._core.stamps[epoch % 2]) == epoch))

    def close(self) -> None:
        """Flush and release the maps and the writer thread. Idempotent."""
        if self._closed:
            return
        try:
            self.flush()
        finally:
            self._finalizer()  # stops the writer thread
            self._core.release()
            if self._lock_finalizer is not None:
                self._lock_finalizer()  # unlocks, last: nothing of ours is in flight any more
            self._closed = True

    def __enter__(self) -> "TopKStore":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TopKStore({self._path!r}, sentences={self.num_sentences}, tokens={self.num_tokens}, topk={self.topk}, vocab={self.vocab_size})"

    # ---------------------------------------------------------------- summary
    def summary(self) -> Dict[str, Any]:
        """What ``inspect`` prints. Buffer epochs and counts come from the stamps (ground truth)."""
        self._check_open()
        h = self._header
        files = [HEADER_NAME, LENGTHS_NAME] + list(_array_files(1, 1, 1, 1).keys())
        disk = alloc = 0
        for name in files:
            st = os.stat(os.path.join(self._path, name))
            disk += st.st_size
            alloc += getattr(st, "st_blocks", 0) * 512
        buffers = []
        for b in (0, 1):
            stamps = np.asarray(self._core.stamps[b])
            latest = int(stamps.max())
            written = int(np.count_nonzero(stamps == latest)) if latest > 0 else 0
            stale = int(np.count_nonzero((stamps > 0) & (stamps != latest)))
            buffers.append({
                "buffer": b,
                "epoch": latest if latest > 0 else None,
                "sentences_written": written,
                "sentences_stale": stale,
                "header_epoch": h["buffers"][b].get("epoch"),
                "header_sentences_written": h["buffers"][b].get("sentences_written"),
            })
        return {
            "path": self._path,
            "format_version": h["format_version"],
            "num_sentences": self.num_sentences,
            "num_tokens": self.num_tokens,
            "topk": self.topk,
            "vocab_size": self.vocab_size,
            "index_dtype": h["index_dtype"],
            "prob_dtype": h["prob_dtype"],
            "lengths_fingerprint": h["lengths_fingerprint"],
            "run_id": h.get("run_id"),
            "disk_bytes": disk,
            "disk_human": _human(disk),
            "allocated_bytes": alloc,
            "buffers": buffers,
        }


def _is_float(t) -> bool:
    if isinstance(t, torch.Tensor):
        return t.is_floating_point()
    return np.issubdtype(t.dtype, np.floating)


_NP_DTYPE = {torch.float16: np.float16, torch.int32: np.int32, torch.int64: np.int64}


def _host_copy(t, dtype: Optional[torch.dtype] = None):
    """A private CPU numpy copy of ``t`` (the caller may overwrite its tensor afterwards)."""
    if isinstance(t, torch.Tensor):
        return t.detach().to("cpu", dtype=dtype or t.dtype, copy=True).numpy()
    return np.array(t, dtype=_NP_DTYPE[dtype] if dtype is not None else None, copy=True)


def _stage_to_host(parts, pool: "_PinnedPool"):
    """Copy several device tensors to the host in one non-blocking transfer.

    ``parts``: [(tensor, dtype)], all on one device. Each tensor is narrowed to ``dtype`` on the
    device and flattened to bytes; the bytes are concatenated (largest item size first, so every
    part starts at a multiple of its item size) and copied with ``non_blocking=True`` into one
    buffer from ``pool``. Returns the host views, in the order of ``parts`` and with their
    shapes, and the pool buffer to release once the copy has landed (None if nothing to copy).
    The caller records the event that says when.
    """
    order = sorted(range(len(parts)), key=lambda i: -torch.empty((), dtype=parts[i][1]).element_size())
    flat = [parts[i][0].detach().to(parts[i][1]).reshape(-1).view(torch.uint8) for i in order]
    total = sum(f.numel() for f in flat)
    views: List[Optional[torch.Tensor]] = [None] * len(parts)
    if total == 0:
        for i in order:
            views[i] = torch.empty(parts[i][0].shape, dtype=parts[i][1])
        return views, None
    host, base = pool.acquire((total,), torch.uint8)
    host.copy_(torch.cat(flat) if len(flat) > 1 else flat[0], non_blocking=True)
    offset = 0
    for i, f in zip(order, flat):
        views[i] = host[offset:offset + f.numel()].view(parts[i][1]).view(parts[i][0].shape)
        offset += f.numel()
    return views, base


def _preallocate(fd: int, size: int) -> None:
    """Reserve ``size`` bytes for ``fd`` (real blocks, so ENOSPC happens now, not in training)."""
    if size == 0:
        return
    try:
        os.posix_fallocate(fd, 0, size)
    except AttributeError:  # no posix_fallocate (macOS): sparse file, best effort
        os.ftruncate(fd, size)
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):  # fs without fallocate
            os.ftruncate(fd, size)
        else:
            raise


# --------------------------------------------------------------------------------------
# fairseq binarized data (read without importing fairseq)
# --------------------------------------------------------------------------------------

_MMIDX_MAGIC = b"MMIDIDX\x00\x00"


def read_fairseq_sizes(idx_path: str) -> np.ndarray:
    """Sentence sizes (int32) from a fairseq ``MMapIndexedDataset`` ``.idx`` file.

    Layout (fairseq/data/indexed_dataset.py): magic ``MMIDIDX\\0\\0``, version <Q (1), dtype
    code <B, len <Q, then sizes int32[len] and pointers int64[len]. Megatron's variant adds
    doc_count <Q after len; both are accepted. Sizes of a target side include eos.
    """
    try:
        with open(idx_path, "rb") as f:
            head = f.read(34)
        total = os.path.getsize(idx_path)
    except OSError as e:
        raise StoreError(f"cannot read {idx_path}: {e.strerror or e}; pass the fairseq-preprocess output directory") from e
    if head[:9] != _MMIDX_MAGIC:
        raise StoreError(f"{idx_path} is not a fairseq mmap index (bad magic); binarize with fairseq-preprocess --dataset-impl mmap")
    if len(head) < 26:
        raise StoreError(f"{idx_path} is truncated")
    (version,) = struct.unpack("<Q", head[9:17])
    if version != 1:
        raise StoreError(f"{idx_path} has index version {version}, only 1 is known")
    (n,) = struct.unpack("<Q", head[18:26])
    if total == 26 + 12 * n:
        offset = 26
    else:
        doc = struct.unpack("<Q", head[26:34])[0] if len(head) >= 34 else -1
        if total == 34 + 12 * n + 8 * doc:
            offset = 34
        else:
            raise StoreError(f"{idx_path}: size {total} does not fit {n} entries; the file is truncated or not a fairseq index")
    return np.fromfile(idx_path, dtype="<i4", count=n, offset=offset)


def _find_idx(data_bin: str, split: str, lang: str) -> str:
    pattern = os.path.join(data_bin, f"{split}.*-*.{lang}.idx")
    # SPLIT.SRC-TGT.LANG.idx where LANG is the target side of the pair (fairseq-preprocess naming).
    hits = sorted(p for p in glob.glob(pattern) if os.path.basename(p)[len(split) + 1:].split(".")[0].endswith("-" + lang))
    if not hits and os.path.exists(os.path.join(data_bin, f"{split}.{lang}.idx")):
        hits = [os.path.join(data_bin, f"{split}.{lang}.idx")]
    if not hits:
        raise StoreError(f"no {split}.SRC-TGT.{lang}.idx in {data_bin}; pass the fairseq-preprocess --destdir, the split and the target language")
    if len(hits) > 1:
        raise StoreError(f"several index files match in {data_bin}: {', '.join(os.path.basename(h) for h in hits)}; pass --idx FILE instead")
    return hits[0]


def _dict_size(data_bin: str, lang: str) -> Optional[int]:
    p = os.path.join(data_bin, f"dict.{lang}.txt")
    if not os.path.exists(p):
        return None
    with open(p, "r", encoding="utf-8") as f:
        n = sum(1 for line in f if line.strip())
    return n + 4  # fairseq Dictionary adds <s>, <pad>, </s>, <unk> before the file's entries


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------

class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors: "error: ..." and exit 2, like ours
        self.print_usage(sys.stderr)
        self.exit(2, f"error: {message}\n")


def _build_parser() -> argparse.ArgumentParser:
    p = _ArgumentParser(
        prog="python -m fairseq_pskd.store",
        description="Inspect a PS-KD top-k store, or estimate the disk space one needs.",
    )
    sub = p.add_subparsers(dest="command", metavar="{inspect,estimate}", parser_class=_ArgumentParser)
    sub.required = True
    pi = sub.add_parser("inspect", help="print a store's header and per-buffer state as JSON",
                        description="Print a store's header and per-buffer state as JSON (epochs and counts from the stamps).")
    pi.add_argument("dir", metavar="DIR", help="store directory (--pskd-store-dir)")
    pe = sub.add_parser("estimate", help="print the disk space a store needs",
                        description="Print the disk space a store needs: num_tokens * k * (index bytes + 2) * 2 buffers, plus small per-sentence arrays. "
                                    "Give --tokens/--sentences, or --data-bin/--split/--lang to read them from fairseq binarized data.")
    pe.add_argument("--tokens", type=int, help="number of target tokens in the training set, eos included")
    pe.add_argument("--sentences", type=int, help="number of training sentences (default: tokens / 30, stated in the output)")
    pe.add_argument("--data-bin", metavar="DIR", help="fairseq-preprocess output directory; tokens and sentences are read from SPLIT.SRC-TGT.LANG.idx")
    pe.add_argument("--idx", metavar="FILE", help="a fairseq .idx file to read sizes from (instead of --data-bin/--split/--lang)")
    pe.add_argument("--split", default="train", help="split to read with --data-bin (default: train)")
    pe.add_argument("--lang", help="target language with --data-bin (e.g. de)")
    pe.add_argument("--topk", type=int, required=True, help="k, the number of (index, probability) pairs kept per token")
    pe.add_argument("--vocab-size", type=int, help="target vocabulary size (decides uint16 vs int32 indices); default with --data-bin: from dict.LANG.txt")
    pe.add_argument("--json", action="store_true", help="print JSON instead of text")
    return p


def _cmd_inspect(args) -> int:
    if not args.dir.strip():
        raise StoreError("inspect needs a store directory (got an empty path); pass the --pskd-store-dir of a run")
    with TopKStore.open(args.dir, readonly=True) as store:
        out = store.summary()
        out["locked_by"] = lock_holder(store.path)  # None: no process has it open for writing
        print(json.dumps(out, indent=2))
    return 0


def _cmd_estimate(args) -> int:
    notes = []
    tokens, sentences, vocab = args.tokens, args.sentences, args.vocab_size
    if args.data_bin or args.idx:
        if args.idx:
            idx = args.idx
        else:
            if not args.lang:
                raise StoreError("--data-bin needs --lang (the target language, e.g. de)")
            idx = _find_idx(args.data_bin, args.split, args.lang)
        sizes = read_fairseq_sizes(idx)
        tokens, sentences = int(sizes.astype(np.int64).sum()), int(sizes.size)
        notes.append(f"sizes from {idx}")
        if vocab is None and args.data_bin and args.lang:
            vocab = _dict_size(args.data_bin, args.lang)
            if vocab is not None:
                notes.append(f"vocab_size from dict.{args.lang}.txt (+4 specials)")
    if tokens is None:
        raise StoreError("give --tokens N (or --data-bin DIR --lang LANG, or --idx FILE)")
    if vocab is None:
        raise StoreError("give --vocab-size V (the target dictionary size)")
    if tokens < 1 or args.topk < 1 or vocab < 1:
        raise StoreError("--tokens, --topk and --vocab-size must be positive")
    if args.topk > vocab:
        raise StoreError(f"--topk {args.topk} exceeds the vocabulary size {vocab}: a top-k cannot hold more tokens "
                         f"than the vocabulary has (the criterion refuses it too); pass --topk <= {vocab}")
    if sentences is None:
        sentences = max(1, tokens // 30)
        notes.append(f"--sentences not given: assumed tokens/30 = {sentences}")
    if sentences < 1:
        raise StoreError("--sentences must be positive")
    total = TopKStore.estimate_bytes(sentences, tokens, args.topk, vocab)
    ib = _index_dtype(vocab).itemsize
    per_epoch = tokens * args.topk * (ib + PROB_DTYPE.itemsize)
    out = {
        "num_sentences": sentences,
        "num_tokens": tokens,
        "topk": args.topk,
        "vocab_size": vocab,
        "index_dtype": _index_dtype(vocab).name,
        "bytes": total,
        "human": _human(total),
        "bytes_written_per_epoch": per_epoch,
        "notes": notes,
    }
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"PS-KD top-k store: {sentences} sentences, {tokens} target tokens, k={args.topk}, vocab {vocab} ({out['index_dtype']} indices)")
        print(f"disk needed: {total} bytes ({total / 1e9:.2f} GB, {_human(total)})  [2 buffers x {tokens} x {args.topk} x ({ib} + 2) bytes + per-sentence arrays]")
        print(f"written per epoch: {per_epoch} bytes ({per_epoch / 1e9:.2f} GB, {_human(per_epoch)})")
        for n in notes:
            print(f"note: {n}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _build_parser().parse_args(argv)
    try:
        return {"inspect": _cmd_inspect, "estimate": _cmd_estimate}[args.command](args)
    except StoreError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
