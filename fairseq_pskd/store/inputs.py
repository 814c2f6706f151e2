"""Checks of what callers pass to the store (target lengths, ids, k and vocabulary, epochs, the
dictionary, top-k rows): a mistake is a StoreError that says what to pass instead.

torch is not imported here: a value can only be a tensor once the caller has imported torch, so
the store's numpy-only tools (``python -m fairseq_pskd.store inspect``) start without it."""
from __future__ import annotations

import sys
from typing import Optional, Sequence, Tuple

import numpy as np

from .errors import StoreError
from .format import LENGTH_DTYPE, STAMP_DTYPE, delete_store_hint, dictionary_fingerprint

__all__ = ["is_tensor", "as_int_array", "checked_lengths", "check_k_vocab", "check_epoch", "checked_run_id",
           "checked_dictionary_fingerprint", "check_top_k", "check_device_ids"]

_TARGET_SIZES = "pass the training set's target sizes (including eos)"


def is_tensor(x) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def as_int_array(x, name: str) -> np.ndarray:
    """ids / lengths (torch tensor on any device, numpy array or sequence) -> int64 numpy."""
    if is_tensor(x):
        if x.is_floating_point() or x.is_complex() or x.dtype == sys.modules["torch"].bool:
            raise StoreError(f"{name} must be an integer tensor, got dtype {x.dtype}; pass sample ids / target "
                             f"lengths as long tensors")
        x = x.detach().cpu().numpy()
    else:
        x = np.asarray(x)
        if x.size == 0:
            x = x.astype(np.int64)
        if not np.issubdtype(x.dtype, np.integer):
            raise StoreError(f"{name} must hold integers, got dtype {x.dtype}; pass sample ids / target lengths "
                             f"as integer arrays")
    if x.ndim != 1:
        raise StoreError(f"{name} must be 1-D (one entry per sentence in the batch), got shape {tuple(x.shape)}")
    return x.astype(np.int64, copy=False)


def checked_lengths(target_lengths) -> np.ndarray:
    """The training set's target lengths as a 1-D integer array, not copied when avoidable
    (4.5 M sentences are 36 MB as int64; fairseq's sizes arrays are already numpy)."""
    x = target_lengths
    if is_tensor(x):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.ndim != 1:
        raise StoreError(f"target_lengths must be 1-D (one length per training sentence), got shape "
                         f"{tuple(x.shape)}")
    if x.size == 0:
        raise StoreError("target_lengths is empty: the store needs one length per training sentence; "
                         + _TARGET_SIZES)
    if not np.issubdtype(x.dtype, np.integer):
        raise StoreError(f"target_lengths must hold integers, got dtype {x.dtype}; " + _TARGET_SIZES)
    lo, hi = int(x.min()), int(x.max())
    if lo < 0 or hi > np.iinfo(LENGTH_DTYPE).max:
        raise StoreError(f"target_lengths must be within [0, 2^31), got range [{lo}, {hi}]; " + _TARGET_SIZES)
    if int(x.sum(dtype=np.int64)) == 0:
        raise StoreError("target_lengths are all zero: there is no target token to store; " + _TARGET_SIZES)
    return x


def check_k_vocab(topk, vocab_size) -> Tuple[int, int]:
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


def check_epoch(epoch) -> int:
    if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or int(epoch) < 1:
        raise StoreError(f"epoch must be a 1-based integer, got {epoch!r}; pass fairseq's epoch number")
    if int(epoch) > np.iinfo(STAMP_DTYPE).max:
        raise StoreError(f"epoch {epoch} does not fit the int32 stamps")
    return int(epoch)


def checked_run_id(run_id, name: str = "run_id") -> Optional[str]:
    if run_id is not None and not isinstance(run_id, str):
        raise StoreError(f"{name} must be a string or None, got {run_id!r}")
    return run_id


def checked_dictionary_fingerprint(dictionary: Optional[Sequence[str]], vocab_size: Optional[int]) -> Optional[str]:
    """The fingerprint of ``dictionary`` (the target symbols in order), checked against ``vocab_size``."""
    if dictionary is None:
        return None
    symbols = list(dictionary)
    if vocab_size is not None and len(symbols) != int(vocab_size):
        raise StoreError(f"dictionary has {len(symbols)} symbols but vocab_size={int(vocab_size)}; pass the target "
                         f"dictionary's symbols (len(dictionary) == vocab_size)")
    return dictionary_fingerprint(symbols)


def check_top_k(what: str, indices, probs, topk: int, path: str, padded: bool) -> Tuple[int, ...]:
    """The shape of a write's ``indices`` and ``probs``: two arrays of the same shape, (B, T', k)
    when ``padded``, else (N, k); k = the store's ``topk``; integer ids, floating-point
    probabilities."""
    ndim, layout = (3, "(batch, target_len, k)") if padded else (2, "(tokens, k)")
    for name, t in (("indices", indices), ("probs", probs)):
        if not (is_tensor(t) or isinstance(t, np.ndarray)):
            raise StoreError(f"{what}: {name} must be a torch tensor or numpy array, got {type(t).__name__}")
        if t.ndim != ndim:
            raise StoreError(f"{what}: {name} must have shape {layout}, got {tuple(t.shape)}")
    if tuple(indices.shape) != tuple(probs.shape):
        raise StoreError(f"{what}: indices {tuple(indices.shape)} and probs {tuple(probs.shape)} must have the "
                         f"same shape")
    shape = tuple(int(s) for s in indices.shape)
    if shape[-1] != topk:
        raise StoreError(f"{what}: got top-{shape[-1]} but the store at {path} keeps top-{topk}; take topk={topk} "
                         f"(or " + delete_store_hint(path) + ")")
    if _is_float(indices) or not _is_float(probs):
        raise StoreError(f"{what}: indices must be integer and probs floating point (got {indices.dtype} and "
                         f"{probs.dtype}); did you swap them?")
    return shape


def check_device_ids(what: str, ids, lengths, batch_size: Optional[int] = None) -> None:
    """What can be checked of a write's ``ids``/``lengths`` when one of them is on a device, without
    a device sync: one entry per sentence of the batch (``batch_size``, or as many as ``ids``
    has), integers (their values are checked on the writer thread, after the copy)."""
    for name, t in (("ids", ids), ("lengths", lengths)):
        if batch_size is None and t.ndim == 1:
            batch_size = int(t.shape[0])
        if t.ndim != 1 or t.shape[0] != batch_size:
            raise StoreError(f"{what}: {name} must be 1-D with {batch_size} entries (one per sentence of the "
                             f"batch), got shape {tuple(t.shape)}")
        if is_tensor(t) and t.is_floating_point():
            raise StoreError(f"{what}: {name} must be an integer tensor, got {t.dtype}")


def _is_float(t) -> bool:
    if is_tensor(t):
        return t.is_floating_point()
    return np.issubdtype(t.dtype, np.floating)
