"""Creating a store's files: the directory, a free-space check, every array file preallocated to
its full size, the lengths file, and the header last (a directory without ``header.json`` is an
interrupted creation). A creation that fails removes what it made."""
from __future__ import annotations

import errno
import os
import shutil
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from .errors import StoreError
from .format import (
    HEADER_BYTES,
    HEADER_NAME,
    HEADER_TMP_SUFFIX,
    LENGTH_DTYPE,
    LENGTHS_NAME,
    array_files,
    delete_store_hint,
    human_bytes,
    lengths_file_bytes,
    looks_like_store,
    new_header,
    not_a_directory,
    store_file_names,
    write_json_atomic,
)
from .lock import StoreLock

__all__ = ["make_dir", "check_writable_dir", "check_can_create", "create_files"]


def make_dir(path) -> bool:
    """Create the store directory if missing; True if this call made it."""
    if os.path.isdir(path):
        return False
    try:
        os.makedirs(path)
        return True
    except FileExistsError:  # made by someone else meanwhile: the lock decides
        return False
    except OSError as e:
        raise StoreError(f"cannot create store directory {path}: {e.strerror or e}; pass a writable "
                         f"--pskd-store-dir") from e


def check_writable_dir(path: str) -> None:
    if not os.access(path, os.W_OK | os.X_OK):
        raise StoreError(f"store directory {path} is not writable; fix its permissions or pass a writable "
                         f"--pskd-store-dir")


def check_can_create(path: str) -> None:
    """Refuse a directory that holds a store or files that are not the store's."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise StoreError(not_a_directory(path))
    if os.path.exists(os.path.join(path, HEADER_NAME)) and looks_like_store(path):
        raise StoreError(f"{path} already holds a PS-KD store; open it with TopKStore.open / open_or_create, or "
                         + delete_store_hint(path))
    if os.path.isdir(path):
        others = sorted(set(os.listdir(path)) - set(store_file_names()))
        if os.path.exists(os.path.join(path, HEADER_NAME)):
            others = sorted(others + [HEADER_NAME])  # not the store's header (see above)
        if others:
            listed = ", ".join(others[:5]) + (" ..." if len(others) > 5 else "")
            raise StoreError(f"cannot create a store in {path}: the directory is not empty ({listed}); pass an "
                             f"empty or new --pskd-store-dir")
        # Only our own leftovers (an interrupted create): overwritten by create_files.


def _bytes_on_disk(path: str, num_sentences: int, num_tokens: int, topk: int,
                   vocab_size: int) -> Tuple[int, int]:
    """(bytes the store's files take on ``path``'s filesystem, its block size): each file
    rounded up to whole blocks, plus a margin for the filesystem's own metadata (extent
    trees), so that a free-space check that passes is not followed by ENOSPC in fallocate."""
    try:
        st = os.statvfs(path)
        block = int(st.f_frsize or st.f_bsize or 4096)
    except (OSError, AttributeError):
        block = 4096
    sizes = list(array_files(num_sentences, num_tokens, topk, vocab_size).values())
    # lengths, header, its temp copy, lock
    sizes += [lengths_file_bytes(num_sentences), HEADER_BYTES, HEADER_BYTES, 1]
    total = sum(-(-int(s) // block) * block for s in sizes)
    return total + total // 1000 + (1 << 20), block


def _preallocate(fd: int, size: int) -> None:
    """Reserve ``size`` bytes for ``fd`` (real blocks, so ENOSPC happens now, not in training)."""
    if size == 0:
        return
    try:
        os.posix_fallocate(fd, 0, size)
    except AttributeError:  # no posix_fallocate (macOS): sparse file, best effort
        os.ftruncate(fd, size)
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):  # fs without fallocate
            os.ftruncate(fd, size)
        else:
            raise


def create_files(path: str, lengths: np.ndarray, topk: int, vocab_size: int,
                 held: Optional[StoreLock], made_dir: bool,
                 dictionary_fp: Optional[str] = None) -> Tuple[Dict[str, Any], np.ndarray]:
    """Write a new store's files into ``path`` (which exists and, with ``held``, is locked by this
    process; checked again here for a store another process may have created meanwhile); returns
    its header and its memory-mapped lengths. On failure, removes what it made: the files, the
    lock file if ``held`` created it, the directory if ``made_dir``."""
    check_can_create(path)
    num_sentences, num_tokens = int(lengths.size), int(lengths.sum(dtype=np.int64))
    needed, block = _bytes_on_disk(path, num_sentences, num_tokens, topk, vocab_size)
    files = array_files(num_sentences, num_tokens, topk, vocab_size)
    created: List[str] = []

    def cleanup():
        for p in created + [os.path.join(path, HEADER_NAME + HEADER_TMP_SUFFIX)]:
            try:
                os.unlink(p)
            except OSError:
                pass
        if held is not None and held.created:  # leave the directory as it was
            try:
                os.unlink(held.path)
            except OSError:
                pass
        if made_dir:
            try:
                os.rmdir(path)
            except OSError:
                pass

    def free_bytes() -> int:
        try:
            return shutil.disk_usage(path).free
        except OSError:
            return -1

    try:
        free = free_bytes()
        if 0 <= free < needed:
            raise StoreError(
                f"not enough disk space for the PS-KD store in {path}: needs {needed} bytes ({human_bytes(needed)}: "
                f"its files in whole {block}-byte filesystem blocks, and a margin), {free} bytes "
                f"({human_bytes(free)}) free. Free space, use a smaller --pskd-topk, or pass a --pskd-store-dir on a "
                f"larger disk")
        for name, size in files.items():
            fp = os.path.join(path, name)
            fd = os.open(fp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            created.append(fp)
            try:
                _preallocate(fd, size)
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.EDQUOT):
                    free = free_bytes()
                    raise StoreError(
                        f"disk full while preallocating the PS-KD store in {path}: it needs {needed} bytes "
                        f"({human_bytes(needed)}), {free} bytes ({human_bytes(max(free, 0))}) free before cleanup. "
                        f"Free space, use a smaller --pskd-topk, or pass a --pskd-store-dir on a larger disk") from e
                raise StoreError(f"cannot preallocate {fp} ({size} bytes): {e.strerror or e}; pass a "
                                 f"--pskd-store-dir on a local, writable filesystem") from e
            finally:
                os.close(fd)
        lp = os.path.join(path, LENGTHS_NAME)
        created.append(lp)
        with open(lp, "wb") as f:
            np.save(f, lengths.astype(LENGTH_DTYPE, copy=False), allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        header = new_header(lengths, topk, vocab_size, dictionary_fp)
        hp = os.path.join(path, HEADER_NAME)
        created.append(hp)
        write_json_atomic(hp, header)  # last: its presence means the store is complete
        stored = np.load(lp, mmap_mode="r", allow_pickle=False)
    except PermissionError as e:
        cleanup()
        raise StoreError(f"cannot write the PS-KD store in {path}: {e.strerror or e}; pass a writable "
                         f"--pskd-store-dir") from e
    except BaseException:
        cleanup()
        raise
    return header, stored
