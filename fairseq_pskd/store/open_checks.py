"""Checks of an existing store's files at open: the header, the lengths file against the header's
fingerprint, every array file's size, and what the caller expects (dataset, k, vocabulary).
Each refusal says what is wrong and, for a store, that deleting it is safe."""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional, Tuple

import numpy as np

from .errors import StoreError
from .format import (
    HEADER_NAME,
    LENGTHS_NAME,
    array_files,
    check_header,
    delete_store_hint,
    lengths_fingerprint,
    looks_like_store,
    not_a_directory,
    not_a_store,
    unusable_store_hint,
)
from .inputs import checked_lengths

__all__ = ["check_openable", "read_checked"]


def check_openable(path: str, readonly: bool) -> None:
    """Refuse what is not a store before anything is locked or read: a missing directory, one
    without a header (an interrupted creation, or not a store at all), or an unwritable one."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise StoreError(not_a_directory(path))
    if not os.path.isdir(path):
        raise StoreError(f"no PS-KD store at {path}: the directory does not exist; pass the store's directory "
                         f"(--pskd-store-dir; by default SAVE_DIR/pskd_store)")
    hp = os.path.join(path, HEADER_NAME)
    if not os.path.exists(hp):
        if looks_like_store(path):
            raise StoreError(f"{path} has no {HEADER_NAME}: its creation was interrupted; "
                             + delete_store_hint(path))
        raise StoreError(not_a_store(path))
    if not readonly and not os.access(path, os.W_OK):
        raise StoreError(f"the PS-KD store at {path} is not writable by this user; fix the directory's "
                         f"permissions or pass another --pskd-store-dir")


def read_checked(path: str, target_lengths, topk, vocab_size,
                 dictionary_fp: Optional[str] = None) -> Tuple[Dict[str, Any], np.ndarray]:
    """The header and the memory-mapped lengths of the store in ``path``, once every file checks
    out; ``target_lengths``, ``topk``, ``vocab_size`` and ``dictionary_fp`` (the target
    dictionary's fingerprint), when not None, must match the store (a store that recorded no
    dictionary, written before it did, matches any)."""
    hint = unusable_store_hint(path)
    hp = os.path.join(path, HEADER_NAME)
    try:
        with open(hp, "r", encoding="utf-8") as f:
            header = json.load(f)
    except FileNotFoundError as e:  # removed since open() looked
        raise StoreError(f"{path} has no {HEADER_NAME}; " + hint) from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StoreError(f"{hp} is unreadable or corrupt ({e}); " + hint) from e
    header = check_header(header, hp, hint)

    lp = os.path.join(path, LENGTHS_NAME)
    try:
        stored = np.load(lp, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError as e:
        raise StoreError(f"{lp} is missing; the store is incomplete: " + hint) from e
    except (OSError, ValueError, EOFError) as e:
        raise StoreError(f"{lp} is truncated or corrupt ({e}); " + hint) from e
    n = header["num_sentences"]
    if stored.ndim != 1 or stored.shape[0] != n or not np.issubdtype(stored.dtype, np.integer):
        raise StoreError(f"{lp} holds {stored.dtype} {stored.shape}, header says int ({n},); the store is "
                         f"corrupt: " + hint)
    if lengths_fingerprint(stored) != header["lengths_fingerprint"] \
            or int(stored.sum(dtype=np.int64)) != header["num_tokens"]:
        raise StoreError(f"{lp} does not match the fingerprint in {HEADER_NAME}; the store is corrupt: " + hint)

    expected = array_files(header["num_sentences"], header["num_tokens"], header["topk"], header["vocab_size"])
    for name, size in expected.items():
        fp = os.path.join(path, name)
        try:
            actual = os.path.getsize(fp)
        except OSError:
            raise StoreError(f"{fp} is missing; the store is incomplete: " + hint) from None
        if actual != size:
            what = "truncated" if actual < size else "larger than expected"
            raise StoreError(f"{fp} is {what}: {actual} bytes, the header needs {size}; the store is corrupt: "
                             + hint)

    if target_lengths is not None:
        _check_same_dataset(path, header, stored, checked_lengths(target_lengths), hint)
    if topk is not None and int(topk) != header["topk"]:
        raise StoreError(f"the PS-KD store at {path} keeps topk={header['topk']} but topk={int(topk)} was "
                         f"requested; use topk={header['topk']} or " + hint)
    if vocab_size is not None and int(vocab_size) != header["vocab_size"]:
        raise StoreError(f"the PS-KD store at {path} was built for vocab_size={header['vocab_size']} but "
                         f"vocab_size={int(vocab_size)} was requested (another dictionary?); " + hint)
    recorded = header.get("dictionary_fingerprint")
    if dictionary_fp is not None and recorded is not None and dictionary_fp != recorded:
        raise StoreError(
            f"the PS-KD store at {path} was built for another target dictionary: both have "
            f"{header['vocab_size']} symbols, but in another order or with other words (dictionary fingerprint "
            f"{recorded[:12]}... in the store, {dictionary_fp[:12]}... given), so its stored indices would "
            f"name other words (was the data binarized again?); " + hint)
    return header, stored


def _check_same_dataset(path: str, header: Dict[str, Any], stored: np.ndarray, given: np.ndarray,
                        hint: str) -> None:
    """Refuse target lengths other than those the store was built for (another training set)."""
    if given.size == header["num_sentences"] and lengths_fingerprint(given) == header["lengths_fingerprint"]:
        return
    detail = (f"store: {header['num_sentences']} sentences / {header['num_tokens']} target tokens; given: "
              f"{given.size} sentences / {int(given.sum(dtype=np.int64))} target tokens")
    if given.size == header["num_sentences"]:
        first = int(np.flatnonzero(given != stored)[0])
        detail += f"; first differing sentence id {first} (store {int(stored[first])}, given {int(given[first])})"
    raise StoreError(f"the PS-KD store at {path} was built for another dataset (target lengths differ: {detail}); "
                     + hint)
