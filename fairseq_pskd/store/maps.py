"""The memory maps of a store's six buffer files, and the vectorised gather (read) and scatter
(write) between them and batches, with the checks of what is read and written.

A batch's rows cross this module in one form: index rows as int32 (or as the stored index dtype,
when a caller has them so), probability rows as float16. Reads return them padded to (B, T, k)
for the loss; writes take the real tokens' (N, k) rows. The maps hold indices as uint16 when the
vocabulary fits; that narrowing (and the widening back to int32 on read) is done here, in the
same pass that moves the rows."""
from __future__ import annotations

import mmap
import os
from typing import Any, Dict, Optional, Tuple

import numpy as np

from .errors import StoreError
from .format import PROB_DTYPE, STAMP_DTYPE, delete_store_hint, indices_name, probs_name, stamps_name

__all__ = ["READ_INDEX_DTYPE", "StoreMaps"]

#: The dtype of the index rows that reads return, whatever the maps hold (uint16 or int32):
#: what torch handles (it has no usable uint16) at half the bytes of int64.
READ_INDEX_DTYPE = np.dtype(np.int32)

# float16 bits: a value is in [0, 1] iff its bits are <= those of 1.0 (0x3C00) or it is -0.0
# (0x8000); NaN, inf, negative values and values above 1 are not (float16 arithmetic in numpy is slow)
_ONE_BITS, _MINUS_ZERO_BITS, _EXPONENT_BITS = 0x3C00, 0x8000, 0x7C00


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


def _outside_unit_interval(bits: np.ndarray) -> np.ndarray:
    """Where float16 values (given as their uint16 bits) are not within [0, 1]."""
    return (bits > _ONE_BITS) & (bits != _MINUS_ZERO_BITS)


class StoreMaps:
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
        nt, k, ns = self.num_tokens, self.topk, self.num_sentences
        self.indices = [np.memmap(os.path.join(path, indices_name(b)), dtype=self.index_dtype, mode=mode,
                                  shape=(nt, k)) for b in (0, 1)]
        self.probs = [np.memmap(os.path.join(path, probs_name(b)), dtype=PROB_DTYPE, mode=mode, shape=(nt, k))
                      for b in (0, 1)]
        self.stamps = [np.memmap(os.path.join(path, stamps_name(b)), dtype=STAMP_DTYPE, mode=mode, shape=(ns,))
                       for b in (0, 1)]
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
            raise StoreError(f"{what}: ids has {ids.shape[0]} entries but lengths has {lengths.shape[0]}; pass one "
                             f"target length per id")
        if ids.size == 0:
            return
        bad = (ids < 0) | (ids >= self.num_sentences)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise StoreError(
                f"{what}: sentence id {int(ids[i])} is out of range: the store at {self.path} holds "
                f"{self.num_sentences} sentences (ids 0..{self.num_sentences - 1}). Only training-set ids may be "
                f"stored; if the training set changed, " + delete_store_hint(self.path))
        if lengths is None:
            return
        stored = self.lengths[ids]
        bad = stored != lengths
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise StoreError(
                f"{what}: batch length does not match the stored length for sentence id {int(ids[i])}: batch says "
                f"{int(lengths[i])}, store says {int(stored[i])} ({int(bad.sum())} of {ids.size} sentences "
                f"differ). Pass the number of target tokens including eos and excluding padding; if the training "
                f"data changed, " + delete_store_hint(self.path))

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

    def store_rows(self, ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """The store row of each of a batch's real tokens, sentence by sentence (the order of
        the (N, k) rows that writes take)."""
        starts = np.cumsum(lengths) - lengths  # first row of each sentence in the batch's rows
        return np.arange(int(lengths.sum()), dtype=np.int64) + np.repeat(self.offsets[ids] - starts, lengths)

    # -- gather ------------------------------------------------------------------------
    def gather(self, buffer: int, want_stamp: int, ids: np.ndarray, lengths: np.ndarray, width: int,
               max_mass: Optional[float] = None) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(indices int32, probs float16, both (B, width, k), has (B,)) of the rows stamped
        ``want_stamp`` in ``buffer``; padding and sentences without them are zeros."""
        B, k = ids.shape[0], self.topk
        out_idx = np.zeros((B * width, k), dtype=READ_INDEX_DTYPE)
        out_p = np.zeros((B * width, k), dtype=PROB_DTYPE)
        has = np.zeros(B, dtype=bool)
        if want_stamp > 0 and B > 0:  # stamp 0 means "never written", not "epoch 0"
            has = np.asarray(self.stamps[buffer][ids]) == want_stamp
            if has.any():
                flat, pos = self.positions(ids, np.where(has, lengths, 0), width)
                # Only the touched pages of the maps are read.
                gi = np.take(self.index_rows[buffer], pos).view(self.index_dtype).reshape(-1, k)
                gp = np.take(self.prob_rows[buffer], pos).view(PROB_DTYPE).reshape(-1, k)
                self.check_read_rows(buffer, want_stamp, ids, flat, width, gi, gp, max_mass)
                np.put(_rows(out_idx), flat, _rows(gi.astype(READ_INDEX_DTYPE, copy=False)))
                np.put(_rows(out_p), flat, _rows(gp))
        return out_idx.reshape(B, width, k), out_p.reshape(B, width, k), has

    def check_read_rows(self, buffer, epoch, ids, flat, width, gi, gp, max_mass) -> None:
        """Refuse rows read back that write() could never have stored: the files changed on disk.

        A few reductions over the batch's rows, on the reading thread; the row-by-row search
        runs only when one of them fails.
        """
        if gi.size == 0:  # only empty sentences
            return
        bits = gp.view(np.uint16)
        signed = self.index_dtype.kind == "i"
        # bits <= 1.0's: within [0, 1]; -0.0 takes the slow path below
        if bits.max() <= _ONE_BITS and gi.max() < self.vocab_size and not (signed and gi.min() < 0) \
                and (max_mass is None or gp.sum(1, dtype=np.float32).max() <= max_mass):
            return
        gp32 = gp.astype(np.float32)
        bad_p = _outside_unit_interval(bits).any(1)  # NaN, inf, < 0 or > 1
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
            name = indices_name(buffer)
            j = int(np.flatnonzero((gi[r] >= self.vocab_size) | (gi[r] < 0))[0])
            what = f"vocabulary id {int(gi[r, j])}, outside [0, vocab_size={self.vocab_size})"
        elif bad_p[r]:
            name = probs_name(buffer)
            j = int(np.flatnonzero(_outside_unit_interval(bits[r]))[0])
            what = f"probability {float(gp32[r, j])}, not within [0, 1]"
        else:
            name = probs_name(buffer)
            what = f"set of top-{self.topk} probabilities summing to {float(gp32[r].sum()):.4f}, above {max_mass}"
        raise StoreError(
            f"{os.path.join(self.path, name)} is corrupt: the row epoch {epoch} wrote for sentence id {sid}, "
            f"target position {tok}, holds a {what} ({int(bad.sum())} bad rows in this batch); write() never "
            f"stores such values, so the file changed on disk (bit rot, a bad copy). The store is only a "
            f"cache of the last epoch's predictions: delete {self.path} and resume from the last checkpoint "
            f"(the resumed epoch then trains without priors, against the label-smoothed target alone, and "
            f"stores new ones for the next epoch), or put back an intact copy of the directory")

    # -- scatter (runs on the writer thread) -------------------------------------------
    def apply(self, job) -> None:
        """Write a staged batch (a ``writer.WriteJob``: the (N, k) rows of its real tokens) into its
        buffer: rows first, then stamps."""
        ids, lengths, vi, vp = job.ids, job.lengths, job.indices, job.probs
        what = f"write(epoch={job.epoch})"
        if not job.validated:  # ids/lengths came from the device: checked here, after the copy
            self.check_batch(ids, lengths, what)
            if int(lengths.sum()) != vi.shape[0]:
                raise StoreError(f"{what}: {vi.shape[0]} rows of indices/probs for {int(lengths.sum())} target "
                                 f"tokens; pass one row per real target token, sentence by sentence. This batch "
                                 f"was not written.")
        if ids.size == 0:
            return
        pos = self.store_rows(ids, lengths)
        skipped = ids[:0]
        if vi.size:
            bits = vp.view(np.uint16)
            bad = _outside_unit_interval(bits)
            nonfinite = (bits & _EXPONENT_BITS) == _EXPONENT_BITS  # all exponent bits set: inf or NaN
            # Non-finite values are what an overflowing forward pass gives (fairseq skips such
            # steps and goes on): when asked, drop those sentences instead of failing the run.
            # A finite value outside [0, 1] is a caller's mistake (logits) either way.
            refuse = bad & ~nonfinite if job.skip_nonfinite else bad
            if refuse.any():
                example = float(vp.reshape(-1)[np.flatnonzero(refuse)[0]])
                raise StoreError(
                    f"{what}: top-k probabilities must be finite and within [0, 1], got e.g. {example} "
                    f"({int(refuse.sum())} bad values); store probabilities (softmax), not logits or "
                    f"log-probabilities. This batch was not written.")
            if job.skip_nonfinite:
                row_bad = nonfinite.any(1)
                if row_bad.any():
                    sentence = np.repeat(np.arange(ids.shape[0]), lengths)  # batch sentence of each row
                    drop = np.zeros(ids.shape[0], dtype=bool)
                    drop[sentence[row_bad]] = True
                    keep = ~drop[sentence]
                    vi, vp, pos = vi[keep], vp[keep], pos[keep]
                    skipped, ids = ids[drop], ids[~drop]
        if vi.size:
            lo, hi = int(vi.min()), int(vi.max())
            if lo < 0 or hi >= self.vocab_size:
                raise StoreError(
                    f"{what}: top-k index values must be in [0, vocab_size={self.vocab_size}), got range "
                    f"[{lo}, {hi}]; the store was created for another vocabulary size or the indices are not "
                    f"vocabulary ids. Create the store with vocab_size = the model's output dimension "
                    f"({delete_store_hint(self.path)}). This batch was not written.")
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
