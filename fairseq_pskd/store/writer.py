"""Asynchronous writes: ``TopKStore.write_rows`` (and ``write``) stage a batch's rows on the host
(staging.py) and one background thread scatters them into the memory maps, in order.

The caller never waits for the device: the writer thread does, on the CUDA event of the batch's
non-blocking copy. See docs/STORE.md for the data-parallel design.
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, List, Optional, Tuple

import numpy as np
import torch

from .errors import StoreError
from .staging import PinnedPool

if TYPE_CHECKING:
    from .maps import StoreMaps

__all__ = ["DEFAULT_MAX_PENDING", "WriteJob", "Writer", "shutdown_writer"]

#: Writes that may be queued before write() blocks; bounds host memory held by staged batches.
DEFAULT_MAX_PENDING = 8


@dataclass(slots=True, eq=False)
class WriteJob:
    """One staged write: host copies of a batch's (N, k) rows, applied to the maps by
    ``StoreMaps.apply`` on the writer thread once ``event`` (the device->host copy, None for CPU
    tensors) has completed."""

    buffer: int
    epoch: int
    ids: np.ndarray  # int64 (B,)
    lengths: np.ndarray  # int64 (B,); the rows are theirs, sentence by sentence
    indices: Optional[np.ndarray]  # (N, k) int32 or the stored index dtype; None once applied
    probs: Optional[np.ndarray]  # (N, k) float16
    event: Any  # torch.cuda.Event, or None
    pinned: List[torch.Tensor]  # pool buffers to release once applied
    validated: bool  # ids/lengths already checked (host ones); else checked by apply
    skip_nonfinite: bool = False


class Writer:
    """One daemon thread that applies staged writes to the memory maps, in order.

    It holds no reference to the TopKStore, so a store that is dropped without close()
    is still garbage collected (its finalizer drains this writer).
    """

    def __init__(self, maps: "StoreMaps", max_pending: int):
        self.maps = maps
        self.queue: "queue.Queue[Optional[WriteJob]]" = queue.Queue(maxsize=max_pending)
        self.cond = threading.Condition()
        self.pending = [0, 0]  # jobs enqueued but not finished, per buffer
        self.error: Optional[BaseException] = None
        self.more_errors = 0  # failed writes after the first unreported one
        self.pool = PinnedPool(pin=True)
        self.thread = threading.Thread(target=self._run, name="pskd-store-writer", daemon=True)
        self.thread.start()

    def submit(self, job: WriteJob) -> None:
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
                self.maps.apply(job)
            except BaseException as e:  # handed to the caller at its next call
                with self.cond:
                    if self.error is None:
                        self.error = e
                    else:
                        self.more_errors += 1
            finally:
                job.ids = job.lengths = job.indices = job.probs = None  # views of pool buffers
                for base in job.pinned:
                    self.pool.release(base)
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

    def raise_error(self, path: str) -> None:
        """Raise, as a StoreError, the first failed write not reported yet (the caller's next call
        is where an asynchronous write's error can be reported)."""
        e, more = self.take_error()
        if e is not None:
            also = f" ({more} later write(s) failed too and were dropped)" if more else ""
            if isinstance(e, StoreError):
                raise StoreError(f"an earlier asynchronous write failed{also}: {e}") from e
            raise StoreError(f"an earlier asynchronous write to {path} failed{also}: {type(e).__name__}: {e}; "
                             f"check the disk and the store directory") from e

    def stop(self) -> None:
        if self.thread.is_alive():
            self.queue.put(None)
            self.thread.join()


def shutdown_writer(holder: list) -> None:
    """weakref.finalize target: at GC or interpreter exit, apply what is queued (no data loss on a
    forgotten close()); a killed process simply loses the queued batches, whose stamps were never
    set, so they read back as "no prior", never as wrong data."""
    w = holder[0]
    if w is not None:
        w.stop()
        holder[0] = None
