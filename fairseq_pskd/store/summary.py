"""What ``python -m fairseq_pskd.store inspect`` prints, from the files alone (numpy, no torch).

``TopKStore.summary()`` gives the same dictionary for an open store; both build it here."""
from __future__ import annotations

import os
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

from .format import STAMP_DTYPE, disk_usage, human_bytes, stamps_name
from .open_checks import check_openable, read_checked

__all__ = ["inspect", "stamp_summary", "summarize"]


def stamp_summary(stamps) -> Tuple[Optional[int], int, int]:
    """(the latest epoch that wrote to a buffer, None if none; how many sentences it wrote; how
    many hold rows of an earlier epoch), from the buffer's stamps: the ground truth."""
    stamps = np.asarray(stamps)
    latest = int(stamps.max())
    written = int(np.count_nonzero(stamps == latest)) if latest > 0 else 0
    stale = int(np.count_nonzero((stamps > 0) & (stamps != latest)))
    return (latest if latest > 0 else None), written, stale


def summarize(path: str, header: Dict[str, Any], stamps: Sequence) -> Dict[str, Any]:
    """The summary of the store in ``path`` with this (checked) ``header`` and the stamps of its
    two buffers."""
    disk, alloc = disk_usage(path)
    buffers = []
    for b in (0, 1):
        latest, written, stale = stamp_summary(stamps[b])
        buffers.append({
            "buffer": b,
            "epoch": latest,
            "sentences_written": written,
            "sentences_stale": stale,
            "header_epoch": header["buffers"][b].get("epoch"),
            "header_sentences_written": header["buffers"][b].get("sentences_written"),
        })
    return {
        "path": path,
        "format_version": header["format_version"],
        "num_sentences": int(header["num_sentences"]),
        "num_tokens": int(header["num_tokens"]),
        "topk": int(header["topk"]),
        "vocab_size": int(header["vocab_size"]),
        "index_dtype": header["index_dtype"],
        "prob_dtype": header["prob_dtype"],
        "lengths_fingerprint": header["lengths_fingerprint"],
        "dictionary_fingerprint": header.get("dictionary_fingerprint"),
        "run_id": header.get("run_id"),
        "run_save_dir": header.get("run_save_dir"),
        "disk_bytes": disk,
        "disk_human": human_bytes(disk),
        "allocated_bytes": alloc,
        "buffers": buffers,
    }


def inspect(path) -> Dict[str, Any]:
    """The summary of the store in ``path``, opened read-only with the checks of
    ``TopKStore.open`` (header, file sizes, lengths), without locking it."""
    path = os.path.abspath(os.fspath(path))
    check_openable(path, readonly=True)
    header, _lengths = read_checked(path, None, None, None)
    n = int(header["num_sentences"])
    stamps = [np.memmap(os.path.join(path, stamps_name(b)), dtype=STAMP_DTYPE, mode="r", shape=(n,))
              for b in (0, 1)]
    return summarize(path, header, stamps)
