"""``TopKStore``: the store's API (create / open, read, write, flush, end_epoch, ...); the
format is in format.py, the memory maps in maps.py, the writer thread in writer.py."""
from __future__ import annotations

import os
import weakref
from typing import Any, Dict, Optional, Sequence

import numpy as np
import torch

from .create import _check_can_create, _check_writable_dir, _create_files, _make_dir
from .errors import StoreError
from .format import (FORMAT_VERSION, HEADER_NAME, _empty_buffers, _looks_like_store, _write_json_atomic,
                     dictionary_fingerprint, estimate_bytes)
from .inputs import (_as_numpy_1d_int, _check_device_ids, _check_epoch, _check_k_vocab, _check_topk_tensors,
                     _checked_lengths, _checked_run_id)
from .lock import _lock_or_undo, _StoreLock
from .maps import _Core
from .open_checks import _check_openable, _read_checked
from .summary import summarize
from .writer import DEFAULT_MAX_PENDING, _Job, _shutdown_writer, _stage_batch, _Writer


class TopKStore:
    """Top-k (index, probability) of the previous epoch's prediction for every target token.

    Use :meth:`create`, :meth:`open` or :meth:`open_or_create`; do not call the constructor.
    Epochs are 1-based. ``read(epoch, ...)`` returns what ``write(epoch - 1, ...)`` stored.
    """

    FORMAT_VERSION = FORMAT_VERSION  # the one this code reads and writes (format.py)

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
        return estimate_bytes(num_sentences, num_tokens, topk, vocab_size)

    @classmethod
    def create(cls, path, target_lengths, topk: int, vocab_size: int, lock: bool = True,
               owner: Optional[str] = None, dictionary: Optional[Sequence[str]] = None) -> "TopKStore":
        """Create a new store in ``path`` (made if missing; must not already hold a store).

        Every array file is preallocated to its full size with ``posix_fallocate`` so that a
        full disk fails here, at start-up, and not hours into training. The header is written
        last: a directory without ``header.json`` is an interrupted creation.

        ``lock``: hold the directory's ownership lock while the store is open (see :meth:`open`);
        ``owner`` is a short description of the user (e.g. its save dir) recorded with it.
        ``dictionary``: the target dictionary's symbols in order (what the stored indices name);
        its fingerprint is recorded, and a later :meth:`open` with another one is refused.
        """
        path = os.path.abspath(os.fspath(path))
        lengths = _checked_lengths(target_lengths)
        topk, vocab_size = _check_k_vocab(topk, vocab_size)
        dictionary_fp = _dictionary_fp(dictionary, vocab_size)
        _check_can_create(path)
        made_dir = _make_dir(path)
        _check_writable_dir(path)
        held = _lock_or_undo(path, owner, made_dir) if lock else None
        try:
            return cls._create_locked(path, lengths, topk, vocab_size, held, made_dir, dictionary_fp)
        except BaseException:
            if held is not None:
                held.release()
            raise

    @classmethod
    def _create_locked(cls, path: str, lengths: np.ndarray, topk: int, vocab_size: int,
                       held: Optional[_StoreLock], made_dir: bool,
                       dictionary_fp: Optional[str] = None) -> "TopKStore":
        """create() once the directory exists and (with ``held``) is locked by this process."""
        _check_can_create(path)  # again, under the lock: another process may have created one
        header, stored = _create_files(path, lengths, topk, vocab_size, held, made_dir, dictionary_fp)
        return cls(path, header, stored, readonly=False, lock=held)

    @classmethod
    def open(cls, path, target_lengths=None, topk: Optional[int] = None, vocab_size: Optional[int] = None, readonly: bool = False,
             lock: bool = True, owner: Optional[str] = None, dictionary: Optional[Sequence[str]] = None,
             _held: Optional[_StoreLock] = None) -> "TopKStore":
        """Open an existing store, validating header and file sizes.

        ``target_lengths``, ``topk``, ``vocab_size`` and ``dictionary`` (the target dictionary's
        symbols in order), when given, must match the store. A store written before stores
        recorded their dictionary records this one when opened for writing.

        Opened for writing with ``lock`` (the default), the store is locked against every other
        process until it is closed (an exclusive ``flock`` on ``DIR/lock``; the kernel drops it when
        the process ends, ``kill -9`` included); a second process gets :class:`StoreLockedError`
        naming the holder. ``owner`` is a short description recorded with the lock (e.g. the save
        dir). Readonly opens never lock. ``lock=False`` is for the other processes of the run
        that holds the lock (data-parallel ranks that write into the same store).
        """
        path = os.path.abspath(os.fspath(path))
        _check_openable(path, readonly)
        held = _held
        if held is None and lock and not readonly:
            held = _StoreLock.acquire(path, owner)  # before reading anything: a writer may be mid-update
        try:
            store = cls._open_checked(path, target_lengths, topk, vocab_size, readonly, held,
                                      _dictionary_fp(dictionary, vocab_size))
        except BaseException:
            if held is not None and _held is None:
                held.release()
            raise
        return store

    @classmethod
    def _open_checked(cls, path: str, target_lengths, topk, vocab_size, readonly: bool,
                      held: Optional[_StoreLock], dictionary_fp: Optional[str] = None) -> "TopKStore":
        header, stored = _read_checked(path, target_lengths, topk, vocab_size, dictionary_fp)
        try:
            store = cls(path, header, stored, readonly=readonly, lock=held)
        except PermissionError as e:
            raise StoreError(
                f"cannot open the PS-KD store at {path} for writing: {e.strerror or e} ({e.filename or path}). "
                f"Make its files writable by this user (a file marked immutable needs `chattr -i`), or pass "
                f"another --pskd-store-dir") from e
        if dictionary_fp is not None and header.get("dictionary_fingerprint") is None and not readonly:
            store._write_header(dict(header, dictionary_fingerprint=dictionary_fp))
        return store

    @classmethod
    def open_or_create(cls, path, target_lengths, topk: int, vocab_size: int, lock: bool = True,
                       owner: Optional[str] = None, dictionary: Optional[Sequence[str]] = None) -> "TopKStore":
        """Open the store in ``path`` if it has one (it must match), else create it.

        With ``lock``, the directory is locked first, so two processes that start at once do not
        both create (or one open what the other is still creating): the second one gets
        :class:`StoreLockedError`."""
        path = os.path.abspath(os.fspath(path))
        if not lock:
            if os.path.exists(os.path.join(path, HEADER_NAME)):
                return cls.open(path, target_lengths=target_lengths, topk=topk, vocab_size=vocab_size, lock=False,
                                dictionary=dictionary)
            return cls.create(path, target_lengths, topk, vocab_size, lock=False, dictionary=dictionary)
        lengths = _checked_lengths(target_lengths)  # before anything is made on disk
        topk, vocab_size = _check_k_vocab(topk, vocab_size)
        dictionary_fp = _dictionary_fp(dictionary, vocab_size)
        if not (os.path.exists(os.path.join(path, HEADER_NAME)) and _looks_like_store(path)):
            _check_can_create(path)  # a foreign directory gets no lock file
        made_dir = _make_dir(path)
        held = _lock_or_undo(path, owner, made_dir)
        try:
            if os.path.exists(os.path.join(path, HEADER_NAME)):
                return cls.open(path, target_lengths=lengths, topk=topk, vocab_size=vocab_size, dictionary=dictionary,
                                _held=held)
            _check_writable_dir(path)
            return cls._create_locked(path, lengths, topk, vocab_size, held, made_dir, dictionary_fp)
        except BaseException:
            held.release()
            raise

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
    def run_save_dir(self) -> Optional[str]:
        """The save dir of the training run whose priors the store holds (None: not recorded)."""
        return self._header.get("run_save_dir")

    @property
    def dictionary_fingerprint(self) -> Optional[str]:
        """Fingerprint of the target dictionary the stored indices name (None: not recorded)."""
        return self._header.get("dictionary_fingerprint")

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
        if w is not None:
            w.raise_error(self._path)

    def _writer(self) -> _Writer:
        w = self._writer_holder[0]
        if w is None:  # started lazily: read-only users never get a thread
            w = _Writer(self._core, self._max_pending)
            self._writer_holder[0] = w
        return w

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
        epoch = _check_epoch(epoch)
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
        """Store this epoch's top-k for the batch (asynchronously; see writer.py).

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
        epoch = _check_epoch(epoch)
        self._raise_writer_error()
        if self._readonly:
            raise StoreError(f"the PS-KD store at {self._path} was opened readonly; open it with readonly=False to write (in data-parallel training every rank that trains must be able to write)")
        what = f"write(epoch={epoch})"
        B, width = _check_topk_tensors(what, indices, probs, self.topk, self._path)

        on_device = any(isinstance(t, torch.Tensor) and t.device.type != "cpu" for t in (ids, lengths))
        if not on_device:
            ids = _as_numpy_1d_int(ids, "ids")
            lengths = _as_numpy_1d_int(lengths, "lengths")
            if ids.shape[0] != B:
                raise StoreError(f"{what}: {ids.shape[0]} ids for a batch of {B} rows; pass one id per row of indices/probs")
            self._core.check_batch(ids, lengths, what)
            if lengths.size and int(lengths.max()) > width:
                raise StoreError(f"{what}: indices/probs have {width} target positions but the longest sentence has {int(lengths.max())}; pass the full padded (B, T, k) tensors")
            if B == 0:
                return
        else:
            _check_device_ids(what, ids, lengths, B)

        writer = self._writer()
        idx_h, prb_h, ids_h, len_h, event, pinned = _stage_batch(indices, probs, ids, lengths, on_device, writer.pool)
        writer.submit(_Job((epoch % 2), epoch, ids_h, len_h, idx_h, prb_h, event, pinned,
                           validated=not on_device, skip_nonfinite=self._skip_nonfinite))

    def skipped_nonfinite(self, epoch: int) -> int:
        """Sentences this process's ``write(epoch, ...)`` calls dropped for inf/NaN probabilities
        (``skip_nonfinite`` set), among the writes applied so far (all of them after ``flush()``)."""
        self._check_open()
        return int(self._core.nonfinite.get(_check_epoch(epoch), 0))

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
        epoch = _check_epoch(epoch)
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

    def reset(self, run_id: Optional[str] = None, save_dir: Optional[str] = None) -> None:
        """Forget every stored prior (zero all stamps): use when a new training run reuses a store dir.

        ``run_id`` and ``save_dir`` become the store's run (see :meth:`set_run_id`); None records none."""
        self._check_open()
        if self._readonly:
            raise StoreError(f"cannot reset the readonly store at {self._path}")
        self.flush()
        for b in (0, 1):
            self._core.stamps[b][:] = 0
            self._core.dirty[b] = True
        self._core.msync()  # stamps zeroed on disk before the header says whose store it is
        header = dict(self._header)
        header["buffers"] = _empty_buffers()
        header["run_id"] = _checked_run_id(run_id)
        header["run_save_dir"] = _checked_run_id(save_dir, "save_dir")
        self._write_header(header)

    def set_run_id(self, run_id: Optional[str], save_dir: Optional[str] = None) -> None:
        """Record which training run the stored priors belong to: ``run_id`` (the criterion stores a
        uuid that its checkpoints carry too, and refuses to resume against another run's priors) and
        the run's ``save_dir`` (named to another run that finds the store)."""
        self._check_open()
        if self._readonly:
            raise StoreError(f"cannot set the run identity of the readonly store at {self._path}")
        header = dict(self._header)
        header["run_id"] = _checked_run_id(run_id)
        header["run_save_dir"] = _checked_run_id(save_dir, "save_dir")
        self._write_header(header)

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
        epoch = _check_epoch(epoch)
        return int(np.count_nonzero(np.asarray(self._core.stamps[epoch % 2]) == epoch))

    def newest_epoch(self, epoch: Optional[int] = None) -> Optional[int]:
        """The latest epoch whose rows the store holds (the highest stamp in either buffer, or with
        ``epoch`` in buffer ``epoch % 2``, the one epoch ``epoch`` wrote; None: no prior there)."""
        self._check_open()
        buffers = (0, 1) if epoch is None else (_check_epoch(epoch) % 2,)
        newest = max(int(np.asarray(self._core.stamps[b]).max()) for b in buffers)
        return newest if newest > 0 else None

    def sentences_overwritten(self, epoch: int) -> int:
        """How many sentences' rows in buffer ``epoch % 2`` a later epoch has written (stamp >
        ``epoch``): their epoch-``epoch`` priors are gone, e.g. after a resume from a checkpoint
        older than the store's newest epoch."""
        self._check_open()
        epoch = _check_epoch(epoch)
        return int(np.count_nonzero(np.asarray(self._core.stamps[epoch % 2]) > epoch))

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
        return summarize(self._path, self._header, self._core.stamps)


def _dictionary_fp(dictionary: Optional[Sequence[str]], vocab_size: Optional[int]) -> Optional[str]:
    """The fingerprint of ``dictionary`` (the target symbols in order), checked against ``vocab_size``."""
    if dictionary is None:
        return None
    symbols = list(dictionary)
    if vocab_size is not None and len(symbols) != int(vocab_size):
        raise StoreError(f"dictionary has {len(symbols)} symbols but vocab_size={int(vocab_size)}; pass the target "
                         f"dictionary's symbols (len(dictionary) == vocab_size)")
    return dictionary_fingerprint(symbols)
