"""Asynchronous writes: ``TopKStore.write`` stages a batch's tensors on the host and one
background thread scatters them into the memory maps, in order.

Staging is one non-blocking device->pinned copy plus a CUDA event for GPU tensors, a plain copy
for CPU tensors: the caller never waits for the device, the writer thread does. See
docs/STORE.md for the data-parallel design.
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .errors import StoreError

if TYPE_CHECKING:
    from .maps import _Core

#: Writes that may be queued before write() blocks; bounds host memory held by staged batches.
DEFAULT_MAX_PENDING = 8


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


@dataclass(slots=True, eq=False)
class _Job:
    """One staged write: host copies of a batch, applied to the maps by ``_Core.apply`` on the
    writer thread once ``event`` (the device->host copy, None for CPU tensors) has completed."""

    buffer: int
    epoch: int
    ids: Any  # numpy array, or a host tensor when the caller's ids were on the device
    lengths: Any
    indices: Any  # (B, T', k); None once applied
    probs: Any
    event: Any  # torch.cuda.Event, or None
    pinned: List[torch.Tensor]  # pool buffers to release once applied
    validated: bool  # ids/lengths already checked (CPU callers); else checked by apply
    skip_nonfinite: bool = False


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

    def raise_error(self, path: str) -> None:
        """Raise, as a StoreError, the first failed write not reported yet (the caller's next call
        is where an asynchronous write's error can be reported)."""
        e, more = self.take_error()
        if e is not None:
            also = f" ({more} later write(s) failed too and were dropped)" if more else ""
            if isinstance(e, StoreError):
                raise StoreError(f"an earlier asynchronous write failed{also}: {e}") from e
            raise StoreError(f"an earlier asynchronous write to {path} failed{also}: {type(e).__name__}: {e}; check the disk and the store directory") from e

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


def _stage_batch(indices, probs, ids, lengths, on_device: bool, pool: _PinnedPool):
    """Private host copies of a batch for the writer thread, made without waiting for the device.

    ``ids``/``lengths``: the checked numpy arrays, or, ``on_device``, the caller's device tensors
    (checked on the writer thread, after the copy). Returns the host ``indices``, ``probs``,
    ``ids`` and ``lengths``, the CUDA event recorded after the copy (None without CUDA tensors)
    and the pool buffers to release once it has landed.
    """
    pinned: List[torch.Tensor] = []
    event = None
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
            views, base = _stage_to_host([parts[i] for i in on_gpu], pool)
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream())
        if base is not None:
            pinned.append(base)
        host = [views[on_gpu.index(i)] if i in on_gpu else _host_copy(t, dtype)
                for i, (t, dtype) in enumerate(parts)]
        idx_h, prb_h = host[0], host[1]
        ids_h, len_h = (host[2], host[3]) if on_device else (ids, lengths)
    else:
        # CPU: one copy now, as the caller may reuse its tensors; probabilities narrowed
        # to the stored float16 in the same pass (values > 1, inf, nan stay detectable).
        idx_h = _host_copy(indices)
        prb_h = _host_copy(probs, torch.float16)
        ids_h, len_h = ids, lengths
    return idx_h, prb_h, ids_h, len_h, event, pinned
