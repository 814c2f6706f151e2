"""Sizes of fairseq binarized data, read from fairseq-preprocess output without importing fairseq
(``estimate --data-bin`` runs where fairseq is not installed). The one reader of fairseq's
``.idx`` header in the package: data preparation (prepare/binarize.py) counts sentences with it
too."""
from __future__ import annotations

import glob
import os
import struct
from typing import Optional, Tuple

import numpy as np

from .errors import StoreError

__all__ = ["index_layout", "read_fairseq_sizes", "find_index_file", "dictionary_size"]

_MMIDX_MAGIC = b"MMIDIDX\x00\x00"


def index_layout(idx_path: str) -> Tuple[int, int]:
    """(byte offset of the sizes, number of sentences) of a fairseq ``MMapIndexedDataset`` ``.idx``
    file, once its header checks out.

    Layout (fairseq/data/indexed_dataset.py): magic ``MMIDIDX\\0\\0``, version <Q (1), dtype
    code <B, len <Q, then sizes int32[len] and pointers int64[len]. Megatron's variant adds
    doc_count <Q after len and doc_idx int64[doc_count] at the end; both are accepted. The file
    size must be exactly what the header implies (a truncated file is refused).
    """
    try:
        with open(idx_path, "rb") as f:
            head = f.read(34)
        total = os.path.getsize(idx_path)
    except OSError as e:
        raise StoreError(f"cannot read {idx_path}: {e.strerror or e}; pass the fairseq-preprocess output "
                         f"directory") from e
    if head[:9] != _MMIDX_MAGIC:
        raise StoreError(f"{idx_path} is not a fairseq mmap index (bad magic); binarize with fairseq-preprocess "
                         f"--dataset-impl mmap")
    if len(head) < 26:
        raise StoreError(f"{idx_path} is truncated")
    (version,) = struct.unpack("<Q", head[9:17])
    if version != 1:
        raise StoreError(f"{idx_path} has index version {version}, only 1 is known")
    (n,) = struct.unpack("<Q", head[18:26])
    if total == 26 + 12 * n:
        return 26, n
    doc = struct.unpack("<Q", head[26:34])[0] if len(head) >= 34 else -1
    if total == 34 + 12 * n + 8 * doc:
        return 34, n
    raise StoreError(f"{idx_path}: size {total} does not fit {n} entries; the file is truncated or not a fairseq "
                     f"index")


def read_fairseq_sizes(idx_path: str) -> np.ndarray:
    """Sentence sizes (int32) from a fairseq ``.idx`` file (see :func:`index_layout`). Sizes of a
    target side include eos."""
    offset, n = index_layout(idx_path)
    return np.fromfile(idx_path, dtype="<i4", count=n, offset=offset)


def find_index_file(data_bin: str, split: str, lang: str) -> str:
    """The ``.idx`` file of ``split``'s ``lang`` side in a fairseq-preprocess output directory."""
    pattern = os.path.join(data_bin, f"{split}.*-*.{lang}.idx")
    # SPLIT.SRC-TGT.LANG.idx where LANG is the target side of the pair (fairseq-preprocess naming).
    hits = sorted(p for p in glob.glob(pattern)
                  if os.path.basename(p)[len(split) + 1:].split(".")[0].endswith("-" + lang))
    if not hits and os.path.exists(os.path.join(data_bin, f"{split}.{lang}.idx")):
        hits = [os.path.join(data_bin, f"{split}.{lang}.idx")]
    if not hits:
        raise StoreError(f"no {split}.SRC-TGT.{lang}.idx in {data_bin}; pass the fairseq-preprocess --destdir, the "
                         f"split and the target language")
    if len(hits) > 1:
        names = ", ".join(os.path.basename(h) for h in hits)
        raise StoreError(f"several index files match in {data_bin}: {names}; pass --idx FILE instead")
    return hits[0]


def dictionary_size(data_bin: str, lang: str) -> Optional[int]:
    """The size of fairseq's dictionary for ``lang`` (None without ``dict.LANG.txt``)."""
    p = os.path.join(data_bin, f"dict.{lang}.txt")
    if not os.path.exists(p):
        return None
    with open(p, "r", encoding="utf-8") as f:
        n = sum(1 for line in f if line.strip())
    return n + 4  # fairseq Dictionary adds <s>, <pad>, </s>, <unk> before the file's entries
