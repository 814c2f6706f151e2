"""The on-disk layout of a store: the one place that decides file names, dtypes, file sizes and
the header (docs/STORE.md, "On-disk format").

The layout follows fairseq's ``MMapIndexedDataset``: a small header, typed flat arrays, and
per-sentence offsets computed from the sizes at open time. One directory holds::

    header.json        format_version, shape, dtypes, lengths and dictionary fingerprints,
                       buffer epochs, the run whose priors it holds (id, save dir)
    lengths.npy        int32 (num_sentences,)  target length of each sentence (incl. eos)
    indices.{0,1}.bin  uint16|int32 (num_tokens, k)  top-k vocab ids, one row per token
    probs.{0,1}.bin    float16 (num_tokens, k)       top-k probabilities
    stamps.{0,1}.bin   int32 (num_sentences,)        epoch that last wrote the sentence, 0 = never
    lock               flock held by the process that has the store open for writing

Two parity buffers: epoch ``t`` writes buffer ``t % 2`` and reads buffer ``(t - 1) % 2``, so
the priors a running epoch consumes are never overwritten by it (crash/resume safe). A
sentence's row in a buffer is valid for epoch ``e`` only if its stamp equals ``e``; stamps are
written after the data, so a stale or half-finished row is never mistaken for a fresh one.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from .errors import StoreError

__all__ = [
    "FORMAT_VERSION", "HEADER_NAME", "LENGTHS_NAME", "LOCK_NAME", "PROB_DTYPE", "STAMP_DTYPE", "LENGTH_DTYPE",
    "HEADER_TMP_SUFFIX", "HEADER_BYTES", "index_dtype", "indices_name", "probs_name", "stamps_name", "array_files",
    "array_file_names", "estimate_bytes", "lengths_file_bytes", "store_file_names", "looks_like_store",
    "not_a_store", "not_a_directory", "delete_store_hint", "unusable_store_hint", "disk_usage",
    "lengths_fingerprint", "dictionary_fingerprint", "empty_buffers", "new_header", "check_header", "human_bytes",
    "write_json_atomic", "replace_header",
]

#: The only version this code reads and writes; a store of another version is refused at open.
FORMAT_VERSION = 1
HEADER_NAME = "header.json"
LENGTHS_NAME = "lengths.npy"
LOCK_NAME = "lock"
PROB_DTYPE = np.dtype("<f2")
STAMP_DTYPE = np.dtype("<i4")
LENGTH_DTYPE = np.dtype("<i4")
HEADER_TMP_SUFFIX = ".tmp"


def index_dtype(vocab_size: int) -> np.dtype:
    """The dtype of the stored vocabulary ids for a vocabulary of ``vocab_size`` entries."""
    # uint16 halves the largest array for every vocabulary fairseq NMT uses in practice.
    return np.dtype("<u2") if vocab_size <= 65536 else np.dtype("<i4")


def indices_name(buffer: int) -> str:
    return f"indices.{buffer}.bin"


def probs_name(buffer: int) -> str:
    return f"probs.{buffer}.bin"


def stamps_name(buffer: int) -> str:
    return f"stamps.{buffer}.bin"


def array_files(num_sentences: int, num_tokens: int, topk: int, vocab_size: int) -> Dict[str, int]:
    """File name -> exact size in bytes, for the six preallocated buffer files."""
    ib = index_dtype(vocab_size).itemsize
    files = {}
    for b in (0, 1):
        files[indices_name(b)] = num_tokens * topk * ib
        files[probs_name(b)] = num_tokens * topk * PROB_DTYPE.itemsize
        files[stamps_name(b)] = num_sentences * STAMP_DTYPE.itemsize
    return files


def array_file_names() -> List[str]:
    """The six buffer files' names."""
    return list(array_files(1, 1, 1, 1).keys())


def estimate_bytes(num_sentences: int, num_tokens: int, topk: int, vocab_size: int) -> int:
    """Disk bytes a store needs: both buffers' arrays + lengths file + header (rounded up)."""
    num_sentences, num_tokens = int(num_sentences), int(num_tokens)
    topk, vocab_size = int(topk), int(vocab_size)
    arrays = sum(array_files(num_sentences, num_tokens, topk, vocab_size).values())
    return arrays + lengths_file_bytes(num_sentences) + HEADER_BYTES


def lengths_file_bytes(num_sentences: int) -> int:
    return 128 + num_sentences * LENGTH_DTYPE.itemsize  # np.save header is 128 bytes for 1-D


#: What header.json is counted as in disk estimates: it fits one filesystem block.
HEADER_BYTES = 4096


def store_file_names() -> List[str]:
    return [HEADER_NAME, LENGTHS_NAME, HEADER_NAME + HEADER_TMP_SUFFIX, LOCK_NAME] + array_file_names()


#: Header keys only a PS-KD store writes; two of them make a header.json the store's own.
_HEADER_KEYS = {"format_version", "num_sentences", "num_tokens", "topk", "vocab_size", "lengths_fingerprint",
                "buffers"}


def looks_like_store(path: str) -> bool:
    """Whether ``path`` holds a PS-KD store or the remains of one (an array file, lengths.npy, or a
    header.json with the store's keys). Only then may a message advise deleting the directory:
    a mistyped path (the data directory, the home directory) must never get that advice."""
    names = [LENGTHS_NAME, HEADER_NAME + HEADER_TMP_SUFFIX] + array_file_names()
    if any(os.path.exists(os.path.join(path, n)) for n in names):
        return True
    try:
        with open(os.path.join(path, HEADER_NAME), "r", encoding="utf-8") as f:
            header = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(header, dict) and len(_HEADER_KEYS & set(header)) >= 2


def not_a_store(path: str) -> str:
    return (f"{path} is not a PS-KD store (no {HEADER_NAME} and none of the store's files); pass the "
            f"store's directory (--pskd-store-dir; by default SAVE_DIR/pskd_store)")


def not_a_directory(path: str) -> str:
    return (f"{path} is a file, not a directory: --pskd-store-dir names a directory (made if missing) that holds "
            f"the store's files; pass another path")


def delete_store_hint(path: str) -> str:
    """The advice for a store that cannot be used: deleting it is safe."""
    return f"delete {path} (it is only a cache of last epoch's predictions) or pass another --pskd-store-dir"


def unusable_store_hint(path: str) -> str:
    """What to do about a store that cannot be used: delete it, but only if it is one."""
    if looks_like_store(path):
        return delete_store_hint(path)
    return (f"{path} holds none of the store's files, so it is not a PS-KD store: check the path "
            f"(--pskd-store-dir)")


def disk_usage(path: str) -> Tuple[int, int]:
    """(bytes, allocated bytes) of the store's files in ``path``: header, lengths and arrays."""
    disk = alloc = 0
    for name in [HEADER_NAME, LENGTHS_NAME] + array_file_names():
        st = os.stat(os.path.join(path, name))
        disk += st.st_size
        alloc += getattr(st, "st_blocks", 0) * 512
    return disk, alloc


def lengths_fingerprint(lengths: np.ndarray) -> str:
    """sha256 over the lengths as int64 little-endian (independent of the caller's dtype).

    Hashed in chunks so that opening a big store needs no full int64 copy in memory.
    """
    h = hashlib.sha256()
    step = 1 << 16  # 512 KiB of int64 at a time
    for i in range(0, lengths.shape[0], step):
        h.update(np.ascontiguousarray(lengths[i:i + step], dtype="<i8").tobytes())
    return h.hexdigest()


def dictionary_fingerprint(symbols) -> str:
    """sha256 over the target dictionary's symbols in their order (what a stored index means):
    a dictionary of the same size in another order, or with other words, has another one."""
    text = json.dumps([str(s) for s in symbols], ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def empty_buffers() -> List[Dict[str, Any]]:
    """The header's ``buffers`` of a store that holds no prior."""
    return [{"epoch": None, "sentences_written": 0}, {"epoch": None, "sentences_written": 0}]


def new_header(lengths: np.ndarray, topk: int, vocab_size: int,
                dictionary_fp: Optional[str] = None) -> Dict[str, Any]:
    """The header of a new store for the training set's target ``lengths`` (and, when known, the
    fingerprint of the target dictionary its indices name)."""
    return {
        "format_version": FORMAT_VERSION,
        "num_sentences": int(lengths.size),
        "num_tokens": int(lengths.sum(dtype=np.int64)),
        "topk": topk,
        "vocab_size": vocab_size,
        "index_dtype": index_dtype(vocab_size).name,
        "prob_dtype": PROB_DTYPE.name,
        "stamp_dtype": STAMP_DTYPE.name,
        "lengths_fingerprint": lengths_fingerprint(lengths),
        "buffers": empty_buffers(),
        "dictionary_fingerprint": dictionary_fp,
        "run_id": None,
        "run_save_dir": None,
    }


def check_header(header: Any, hp: str, hint: str) -> Dict[str, Any]:
    """``header`` (read from ``hp``) if it is one this code can use; else a StoreError ending in
    ``hint``."""
    if not isinstance(header, dict):
        raise StoreError(f"{hp} is corrupt (not a JSON object); " + hint)
    version = header.get("format_version")
    if version != FORMAT_VERSION:
        raise StoreError(f"{hp} has format_version {version!r}; this fairseq-pskd reads version {FORMAT_VERSION} "
                         f"only. The store was written by another fairseq-pskd version; " + hint)
    for key in ("num_sentences", "num_tokens", "topk", "vocab_size"):
        v = header.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise StoreError(f"{hp} is corrupt: {key} = {v!r} is not a positive integer; " + hint)
    dtypes = header.get("index_dtype"), header.get("prob_dtype")
    if dtypes != (index_dtype(header["vocab_size"]).name, PROB_DTYPE.name):
        raise StoreError(f"{hp} is corrupt: dtypes {dtypes[0]!r}/{dtypes[1]!r} do not match vocab_size "
                         f"{header['vocab_size']}; " + hint)
    if not isinstance(header.get("lengths_fingerprint"), str):
        raise StoreError(f"{hp} is corrupt: lengths_fingerprint missing; " + hint)
    bufs = header.get("buffers")
    if not (isinstance(bufs, list) and len(bufs) == 2 and all(isinstance(b, dict) for b in bufs)):
        raise StoreError(f"{hp} is corrupt: 'buffers' must be a list of two objects; " + hint)
    # optional: stores written before these keys existed have none (read as None)
    for key in ("run_id", "run_save_dir", "dictionary_fingerprint"):
        if not isinstance(header.get(key), (str, type(None))):
            raise StoreError(f"{hp} is corrupt: {key} = {header.get(key)!r} is not a string; " + hint)
    return header


def human_bytes(n: int) -> str:
    """``n`` bytes for a message: "512 B", "1.50 GiB"."""
    units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"]
    x = float(n)
    for u in units:
        if abs(x) < 1024 or u == units[-1]:
            return f"{x:.0f} {u}" if u == "B" else f"{x:.2f} {u}"
        x /= 1024
    return f"{n} B"  # pragma: no cover


def _fsync_dir(path: str) -> None:
    # Makes a rename durable; not every platform/filesystem allows opening a directory.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json_atomic(path: str, obj: Dict[str, Any]) -> None:
    """Write ``obj`` to ``path`` so that readers see either the old or the new file, never half."""
    tmp = path + HEADER_TMP_SUFFIX
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def replace_header(path: str, header: Dict[str, Any]) -> None:
    """Replace the header of the store in ``path`` atomically; a StoreError if that fails (the
    previous header is then unchanged)."""
    hp = os.path.join(path, HEADER_NAME)
    try:
        write_json_atomic(hp, header)
    except OSError as e:
        raise StoreError(f"cannot update {hp}: {e.strerror or e}; check the store directory (the previous "
                         f"header is unchanged)") from e
