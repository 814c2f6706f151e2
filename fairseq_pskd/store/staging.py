"""A batch's top-k rows on their way from the caller's tensors to the writer thread: compacted to
the real tokens' (N, k) rows on their device, narrowed there to the dtypes they cross in (int32
indices, or the stored index dtype when they already have it; float16 probabilities), and copied
to the host without waiting for the device.

From a CUDA device every tensor of the batch goes to the host in one non-blocking copy into a
page-locked buffer, and a CUDA event says when it has landed (the writer thread waits on it, the
caller never does); CPU tensors are copied once, as the caller may reuse them. The same functions
run on CPU tensors, which is how the tests cover the CUDA path on a machine without a GPU."""
from __future__ import annotations

import threading
from typing import TYPE_CHECKING, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .errors import StoreError
from .inputs import as_int_array, check_device_ids, check_top_k, is_tensor

if TYPE_CHECKING:
    from .maps import StoreMaps

__all__ = ["PinnedPool", "checked_write", "compact_rows", "index_travel_dtype", "stage_rows", "stage_to_host"]

# the stored index dtypes as torch's (torch.uint16 exists from torch 2.3 on)
_TORCH_INDEX_DTYPE = {np.dtype("<u2"): getattr(torch, "uint16", None), np.dtype("<i4"): torch.int32}


class PinnedPool:
    """Reusable page-locked host buffers for device->host copies.

    cudaHostAlloc is slow (milliseconds), so staging buffers are recycled instead of
    allocated per batch; at most ~(max_pending + 2) buffers are ever alive.
    """

    def __init__(self, pin: bool = True):
        self.pin = pin
        self._free: List[torch.Tensor] = []
        self._lock = threading.Lock()

    def acquire(self, shape: Sequence[int], dtype: torch.dtype) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(a tensor of ``shape`` and ``dtype`` in a pool buffer, that buffer to release once the
        tensor is no longer used; None for an empty tensor, which takes no buffer)."""
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


def checked_write(maps: "StoreMaps", what: str, ids, lengths, indices, probs, padded: bool):
    """What a write hands to :func:`stage_rows`, once what can be checked without the device is:
    (ids, lengths, the batch's (N, k) rows, whether ids and lengths are checked, whether the rows
    are fresh tensors of the store's own), or None for a batch without sentences.

    Host ids and lengths come back as checked int64 numpy, device ones as they are (their values
    are checked by the writer, after the copy). ``padded``: ``indices``/``probs`` are (B, T', k)
    and their real tokens' rows are taken here, on their device (:func:`compact_rows`).
    """
    shape = check_top_k(what, indices, probs, maps.topk, maps.path, padded)
    on_device = [is_tensor(t) and t.device.type != "cpu" for t in (ids, lengths)]
    if not on_device[0]:
        ids = as_int_array(ids, "ids")
        if padded and ids.shape[0] != shape[0]:
            raise StoreError(f"{what}: {ids.shape[0]} ids for a batch of {shape[0]} rows; pass one id per row of "
                             f"indices/probs")
    if not on_device[1]:
        lengths = as_int_array(lengths, "lengths")
    if any(on_device):
        check_device_ids(what, ids, lengths, shape[0] if padded else None)
        if not on_device[0]:
            maps.check_batch(ids, None, what)
    else:
        maps.check_batch(ids, lengths, what)
    if isinstance(lengths, np.ndarray):
        known = lengths
    elif isinstance(ids, np.ndarray):
        known = maps.lengths[ids]  # device lengths of host ids: the stored lengths are theirs
    else:
        known = None
    if not padded:
        if known is lengths and int(lengths.sum()) != shape[0]:
            raise StoreError(f"{what}: {shape[0]} rows of indices/probs for {int(lengths.sum())} target tokens; "
                             f"pass one row per real target token, sentence by sentence")
        return (ids, lengths, indices, probs, not any(on_device), False) if len(ids) else None
    if not shape[0]:
        return None
    if known is not None:
        num_tokens, longest = int(known.sum()), int(known.max())
    else:  # ids and lengths on the device
        num_tokens, longest = torch.stack([lengths.sum(), lengths.max()]).tolist()
    if longest > shape[1]:
        raise StoreError(f"{what}: indices/probs have {shape[1]} target positions but the longest sentence has "
                         f"{longest}; pass the full padded (B, T, k) tensors")
    rows = compact_rows(torch.as_tensor(indices), torch.as_tensor(probs), lengths, num_tokens)
    return (ids, lengths, *rows, not any(on_device), True)


def _on(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device`` without blocking: from pinned memory onto a CUDA device."""
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def compact_rows(indices: torch.Tensor, probs: torch.Tensor, lengths,
                 num_tokens: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The real tokens' rows of a padded (B, T, k) batch, sentence by sentence: two (N, k) tensors
    on the batch's device, N = ``num_tokens``.

    ``num_tokens`` is the sum of ``lengths`` as the caller knows it on the host (from the store's
    lengths of host-side ids), so nothing is read back from the device. Device ``lengths`` that do
    not sum to it give wrong rows, never an out-of-range index; the writer then refuses the
    batch when it checks those lengths against the store.
    """
    B, T, k = indices.shape
    device = indices.device
    if num_tokens == 0 or B == 0 or T == 0:
        return indices.reshape(B * T, k)[:0], probs.reshape(B * T, k)[:0]
    lengths = _on(torch.as_tensor(lengths), device).to(torch.int64)
    ends = torch.cumsum(lengths, 0)
    token = torch.arange(num_tokens, device=device)
    row = torch.searchsorted(ends, token, right=True).clamp_(max=B - 1)
    flat = row * T + (token - (ends - lengths).index_select(0, row)).clamp_(0, T - 1)
    return indices.reshape(B * T, k).index_select(0, flat), probs.reshape(B * T, k).index_select(0, flat)


def index_travel_dtype(indices: torch.Tensor, stored: np.dtype) -> torch.dtype:
    """The dtype index rows cross to the host in: the stored one if they have it already, else
    int32 (which the writer checks against the vocabulary before narrowing to a uint16 map)."""
    kept = _TORCH_INDEX_DTYPE.get(np.dtype(stored).newbyteorder("<"))
    return kept if indices.dtype == kept else torch.int32


def stage_to_host(parts, pool: PinnedPool):
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


def _host_array(t, dtype: torch.dtype, copy: bool) -> np.ndarray:
    """A CPU tensor (or numpy array) as a numpy array of ``dtype``: a private copy with ``copy``
    (the caller may overwrite its tensor afterwards), else converted only if it must be."""
    t = torch.as_tensor(t)
    return t.detach().to("cpu", dtype=dtype, copy=copy).numpy()


def stage_rows(ids, lengths, indices, probs, stored_index_dtype: np.dtype, pool: PinnedPool, copy: bool = True):
    """Host copies of a batch's (N, k) rows and, where they are device tensors, its ids and
    lengths, for the writer thread, made without waiting for the device.

    ``ids``/``lengths``: checked numpy arrays, or device tensors (checked by the writer, after the
    copy). ``copy=False``: CPU rows are the caller's to give away (e.g. just compacted), so they
    are not copied again. Returns the numpy ``ids``, ``lengths``, ``indices``, ``probs``, the
    CUDA event recorded after the copy (None without CUDA tensors) and the pool buffers to
    release once it has landed.
    """
    indices, probs = torch.as_tensor(indices), torch.as_tensor(probs)
    parts = [(indices, index_travel_dtype(indices, stored_index_dtype)), (probs, torch.float16),
             (ids, torch.int64), (lengths, torch.int64)]
    on_gpu = [i for i, (t, _) in enumerate(parts) if isinstance(t, torch.Tensor) and t.is_cuda]
    pinned: List[torch.Tensor] = []
    event = None
    views = {}
    if on_gpu:
        # One asynchronous transfer of everything on the device into a pinned host buffer, on
        # the producer's stream; inf/NaN survive the narrowing to float16, so the writer finds
        # them after the copy and skipping them costs no synchronisation.
        with torch.cuda.device(parts[on_gpu[0]][0].device):
            got, base = stage_to_host([parts[i] for i in on_gpu], pool)
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream())
        if base is not None:
            pinned.append(base)
        views = {i: v.numpy() for i, v in zip(on_gpu, got)}
    host = []
    for i, (t, dtype) in enumerate(parts):
        if i in views:
            host.append(views[i])
        elif i >= 2 and isinstance(t, np.ndarray):
            host.append(t.copy())  # checked host ids/lengths: B numbers, the caller may reuse them
        else:
            host.append(_host_array(t, dtype, copy))
    return host[2], host[3], host[0], host[1], event, pinned
