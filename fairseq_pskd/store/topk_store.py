"""``TopKStore``: the store's API (create / open, read, write, flush, end_epoch, ...); the
format is in format.py, the memory maps in maps.py, the rows' way to the host in staging.py,
the writer thread in writer.py."""
from __future__ import annotations

import os
import weakref
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
import torch

from .errors import StoreError
from .format import FORMAT_VERSION, empty_buffers, estimate_bytes, replace_header
from .inputs import as_int_array, check_epoch, checked_run_id
from .lock import StoreLock
from .maps import StoreMaps
from .opening import create_store, open_or_create_store, open_store
from .staging import checked_write, stage_rows
from .summary import summarize
from .writer import DEFAULT_MAX_PENDING, WriteJob, Writer, shutdown_writer

__all__ = ["TopKStore"]


class TopKStore:
    """Top-k (index, probability) of the previous epoch's prediction for every target token.

    Use :meth:`create`, :meth:`open` or :meth:`open_or_create`; do not call the constructor.
    Epochs are 1-based. ``read(epoch, ...)`` returns what ``write_rows(epoch - 1, ...)`` stored.
    """

    FORMAT_VERSION = FORMAT_VERSION  # the one this code reads and writes (format.py)

    # ---------------------------------------------------------------- construction
    def __init__(self, path: str, header: Dict[str, Any], lengths: np.ndarray, readonly: bool,
                 max_pending: int = DEFAULT_MAX_PENDING, lock: Optional[StoreLock] = None):
        self._path = os.path.abspath(path)
        self._header = header
        self._readonly = bool(readonly)
        self._max_pending = int(max_pending)
        self._maps = StoreMaps(self._path, header, lengths, self._readonly)
        self._writer_holder: list = [None]
        self._finalizer = weakref.finalize(self, shutdown_writer, self._writer_holder)
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
        return create_store(cls, path, target_lengths, topk, vocab_size, lock, owner, dictionary)

    @classmethod
    def open(cls, path, target_lengths=None, topk: Optional[int] = None, vocab_size: Optional[int] = None,
             readonly: bool = False, lock: bool = True, owner: Optional[str] = None,
             dictionary: Optional[Sequence[str]] = None) -> "TopKStore":
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
        return open_store(cls, path, target_lengths, topk, vocab_size, readonly, lock, owner, dictionary)

    @classmethod
    def open_or_create(cls, path, target_lengths, topk: int, vocab_size: int, lock: bool = True,
                       owner: Optional[str] = None, dictionary: Optional[Sequence[str]] = None) -> "TopKStore":
        """Open the store in ``path`` if it has one (it must match), else create it.

        With ``lock``, the directory is locked first, so two processes that start at once do not
        both create (or one open what the other is still creating): the second one gets
        :class:`StoreLockedError`."""
        return open_or_create_store(cls, path, target_lengths, topk, vocab_size, lock, owner, dictionary)

    # ---------------------------------------------------------------- properties
    @property
    def path(self) -> str:
        return self._path

    @property
    def num_sentences(self) -> int:
        return self._maps.num_sentences

    @property
    def num_tokens(self) -> int:
        return self._maps.num_tokens

    @property
    def topk(self) -> int:
        return self._maps.topk

    @property
    def vocab_size(self) -> int:
        return self._maps.vocab_size

    @property
    def readonly(self) -> bool:
        return self._readonly

    @property
    def lengths(self) -> np.ndarray:
        """Stored target length of every sentence (read-only int32 array, memory-mapped)."""
        return self._maps.lengths

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

    @property
    def skip_nonfinite(self) -> bool:
        """False (default): writes refuse inf/NaN probabilities like any other bad value.
        True: they drop the sentences that hold them and count them (see write_rows)."""
        return self._skip_nonfinite

    @skip_nonfinite.setter
    def skip_nonfinite(self, value: bool) -> None:
        self._skip_nonfinite = bool(value)  # applies to later writes

    # ---------------------------------------------------------------- internals
    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"the PS-KD store at {self._path} is closed; open it again with TopKStore.open")

    def _raise_writer_error(self) -> None:
        w = self._writer_holder[0]
        if w is not None:
            w.raise_error(self._path)

    def _writer(self) -> Writer:
        w = self._writer_holder[0]
        if w is None:  # started lazily: read-only users never get a thread
            w = Writer(self._maps, self._max_pending)
            self._writer_holder[0] = w
        return w

    # ---------------------------------------------------------------- read
    def read(self, epoch: int, ids, lengths=None, max_len: Optional[int] = None,
             max_mass: Optional[float] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Priors for the batch: what epoch ``epoch - 1`` wrote for these sentences.

        Returns CPU tensors ``indices`` int32 (B, T, k), ``probs`` float16 (B, T, k) and
        ``has_prior`` bool (B,), T = ``max_len`` or ``lengths.max()``: the rows as they cross to
        a device (widen them there: int64 for ``gather``, float32 for the loss). Padding
        positions and sentences without a prior are zeros. If writes to the buffer being read
        are still queued (only when reading the buffer the current epoch writes, e.g. read(t + 1)
        right after a write of epoch t), they are applied first; the normal read(t) during epoch
        t reads the other buffer and never waits. Pass CPU ids/lengths: CUDA ones force a sync.
        ``lengths=None`` takes the stored lengths (the training set's own) after the id check.

        Rows read back are checked against what writes accept (indices in [0, vocab_size),
        probabilities in [0, 1]) and, with ``max_mass``, against a top-k of one distribution
        (each row's probabilities sum to at most ``max_mass``, e.g. 1 plus float16 rounding); a
        row that fails was changed on disk and raises StoreError naming the file and the sentence.
        """
        self._check_open()
        epoch = check_epoch(epoch)
        self._raise_writer_error()
        ids = as_int_array(ids, "ids")
        lengths = None if lengths is None else as_int_array(lengths, "lengths")
        self._maps.check_batch(ids, lengths, f"read(epoch={epoch})")
        if lengths is None:
            lengths = self._maps.lengths[ids].astype(np.int64)
        longest = int(lengths.max()) if lengths.size else 0
        width = longest if max_len is None else int(max_len)
        if width < longest:
            raise StoreError(f"read(epoch={epoch}): max_len={width} is shorter than the longest sentence in the "
                             f"batch ({longest}); pass max_len >= lengths.max() (the padded target width)")
        buffer = (epoch - 1) % 2
        w = self._writer_holder[0]
        if w is not None:
            w.wait(buffer)
            self._raise_writer_error()
        idx, prb, has = self._maps.gather(buffer, epoch - 1, ids, lengths, width, max_mass)
        return torch.from_numpy(idx), torch.from_numpy(prb), torch.from_numpy(has)

    # ---------------------------------------------------------------- write
    def write_rows(self, epoch: int, ids, lengths, indices, probs) -> None:
        """Store this epoch's top-k for a batch's real tokens (asynchronously; see writer.py).

        ``indices`` (N, k) integer and ``probs`` (N, k) floating point, N = ``lengths.sum()``:
        the rows of the batch's real target tokens, sentence by sentence, in the order of
        ``ids``; torch tensors on any device, or numpy arrays. They are narrowed on their device
        to int32 (or kept in the stored index dtype) and float16 and copied to the host without
        waiting for the device. Shape errors, and id/length errors for host ids and lengths,
        raise here. Value errors (index outside [0, vocab_size), probabilities not finite or
        outside [0, 1], id/length errors for device ids and lengths) are found on the writer
        thread; that batch is dropped (its stamps are not set) and the error is raised by the
        next flush() or read() of that buffer (both wait for the writer), or by a later write
        once the writer has reached the bad batch.

        With ``skip_nonfinite`` set, a sentence with an inf/NaN probability (an overflowing
        forward pass) is dropped instead, on the writer thread after the copy (no device
        sync): its rows are not written and its stamp in this buffer is cleared, so it reads
        back as "no prior"; the rest of the batch is written. ``skipped_nonfinite(epoch)``
        counts them. Finite values outside [0, 1] still raise.
        """
        self._write(epoch, ids, lengths, indices, probs, padded=False)

    def write(self, epoch: int, ids, lengths, indices, probs) -> None:
        """:meth:`write_rows` for a padded batch: ``indices``/``probs`` (B, T', k), T' >=
        ``lengths.max()``, positions >= length ignored. The real tokens' rows are taken on the
        tensors' device (nothing is read back when ``ids`` or ``lengths`` are on the host: the
        number of real tokens comes from them; with both on a device it is read back, one
        synchronisation)."""
        self._write(epoch, ids, lengths, indices, probs, padded=True)

    def _write(self, epoch: int, ids, lengths, indices, probs, padded: bool) -> None:
        self._check_open()
        epoch = check_epoch(epoch)
        self._raise_writer_error()
        if self._readonly:
            raise StoreError(f"the PS-KD store at {self._path} was opened readonly; open it with readonly=False to "
                             f"write (in data-parallel training every rank that trains must be able to write)")
        batch = checked_write(self._maps, f"write(epoch={epoch})", ids, lengths, indices, probs, padded)
        if batch is None:  # no sentence
            return
        ids, lengths, indices, probs, validated, fresh = batch
        writer = self._writer()
        *host, event, pinned = stage_rows(ids, lengths, indices, probs, self._maps.index_dtype, writer.pool,
                                          copy=not fresh)
        writer.submit(WriteJob(epoch % 2, epoch, *host, event, pinned, validated=validated,
                               skip_nonfinite=self._skip_nonfinite))

    def skipped_nonfinite(self, epoch: int) -> int:
        """Sentences this process's writes of ``epoch`` dropped for inf/NaN probabilities
        (``skip_nonfinite`` set), among the writes applied so far (all of them after ``flush()``)."""
        self._check_open()
        return int(self._maps.nonfinite.get(check_epoch(epoch), 0))

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
            self._maps.msync()

    def end_epoch(self, epoch: int, update_header: bool = True) -> None:
        """Flush, then (if ``update_header``) record that buffer ``epoch % 2`` holds ``epoch``.

        The header is informative (``inspect``); per-sentence stamps decide what is read.
        In data-parallel training call it with ``update_header=True`` on rank 0 only, after a
        barrier if the count of written sentences should include the other ranks.
        """
        epoch = check_epoch(epoch)
        self.flush()
        if not update_header:
            return
        if self._readonly:
            raise StoreError(f"end_epoch(update_header=True) on the readonly store at {self._path}; pass "
                             f"update_header=False on ranks that opened it readonly")
        header = dict(self._header)
        header["buffers"] = [dict(x) for x in header["buffers"]]
        header["buffers"][epoch % 2] = {"epoch": epoch, "sentences_written": self.sentences_written(epoch)}
        self._write_header(header)

    def reset(self, run_id: Optional[str] = None, save_dir: Optional[str] = None) -> None:
        """Forget every stored prior (zero all stamps): use when a new training run reuses a store dir.

        ``run_id`` and ``save_dir`` become the store's run (see :meth:`set_run_id`); None records none."""
        self._check_open()
        if self._readonly:
            raise StoreError(f"cannot reset the readonly store at {self._path}")
        self.flush()
        for b in (0, 1):
            self._maps.stamps[b][:] = 0
            self._maps.dirty[b] = True
        self._maps.msync()  # stamps zeroed on disk before the header says whose store it is
        header = dict(self._header, buffers=empty_buffers())
        self._write_header(dict(header, run_id=checked_run_id(run_id),
                                run_save_dir=checked_run_id(save_dir, "save_dir")))

    def set_run_id(self, run_id: Optional[str], save_dir: Optional[str] = None) -> None:
        """Record which training run the stored priors belong to: ``run_id`` (the criterion stores a
        uuid that its checkpoints carry too, and refuses to resume against another run's priors) and
        the run's ``save_dir`` (named to another run that finds the store)."""
        self._check_open()
        if self._readonly:
            raise StoreError(f"cannot set the run identity of the readonly store at {self._path}")
        self._write_header(dict(self._header, run_id=checked_run_id(run_id),
                                run_save_dir=checked_run_id(save_dir, "save_dir")))

    def _write_header(self, header: Dict[str, Any]) -> None:
        replace_header(self._path, header)
        self._header = header

    def sentences_written(self, epoch: int) -> int:
        """How many sentences hold rows written by ``epoch`` (their stamp in buffer ``epoch % 2``),
        i.e. how many have a prior in epoch ``epoch + 1``; counts what is applied so far."""
        self._check_open()
        epoch = check_epoch(epoch)
        return int(np.count_nonzero(np.asarray(self._maps.stamps[epoch % 2]) == epoch))

    def newest_epoch(self, epoch: Optional[int] = None) -> Optional[int]:
        """The latest epoch whose rows the store holds (the highest stamp in either buffer, or with
        ``epoch`` in buffer ``epoch % 2``, the one epoch ``epoch`` wrote; None: no prior there)."""
        self._check_open()
        buffers = (0, 1) if epoch is None else (check_epoch(epoch) % 2,)
        newest = max(int(np.asarray(self._maps.stamps[b]).max()) for b in buffers)
        return newest if newest > 0 else None

    def sentences_overwritten(self, epoch: int) -> int:
        """How many sentences' rows in buffer ``epoch % 2`` a later epoch has written (stamp >
        ``epoch``): their epoch-``epoch`` priors are gone, e.g. after a resume from a checkpoint
        older than the store's newest epoch."""
        self._check_open()
        epoch = check_epoch(epoch)
        return int(np.count_nonzero(np.asarray(self._maps.stamps[epoch % 2]) > epoch))

    def close(self) -> None:
        """Flush and release the maps and the writer thread. Idempotent."""
        if self._closed:
            return
        try:
            self.flush()
        finally:
            self._finalizer()  # stops the writer thread
            self._maps.release()
            if self._lock_finalizer is not None:
                self._lock_finalizer()  # unlocks, last: nothing of ours is in flight any more
            self._closed = True

    def __enter__(self) -> "TopKStore":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"TopKStore({self._path!r}, sentences={self.num_sentences}, tokens={self.num_tokens}, "
                f"topk={self.topk}, vocab={self.vocab_size})")

    # ---------------------------------------------------------------- summary
    def summary(self) -> Dict[str, Any]:
        """What ``inspect`` prints. Buffer epochs and counts come from the stamps (ground truth)."""
        self._check_open()
        return summarize(self._path, self._header, self._maps.stamps)
