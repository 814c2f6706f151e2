"""How a ``TopKStore`` comes to be: ``create`` (checks, directory, lock, files), ``open`` (checks,
lock, validation of every file) and ``open_or_create`` (the lock first, so that two processes
that start at once do not both create). Each step that fails undoes what this call did: the lock
it took, the directory it made. The files themselves are made in create.py and checked in
open_checks.py; the lock is lock.py's."""
from __future__ import annotations

import logging
import os
from typing import Optional, Sequence

from .create import check_can_create, check_writable_dir, create_files, make_dir
from .errors import StoreError
from .format import HEADER_NAME, looks_like_store, replace_header
from .inputs import check_k_vocab, checked_dictionary_fingerprint, checked_lengths
from .lock import StoreLock, lock_or_undo
from .open_checks import check_openable, read_checked

__all__ = ["create_store", "open_store", "open_or_create_store"]

logger = logging.getLogger(__package__)


def create_store(cls, path, target_lengths, topk: int, vocab_size: int, lock: bool = True,
                 owner: Optional[str] = None, dictionary: Optional[Sequence[str]] = None):
    """``cls.create``: a new store in ``path`` (see ``TopKStore.create``)."""
    path = os.path.abspath(os.fspath(path))
    lengths = checked_lengths(target_lengths)
    topk, vocab_size = check_k_vocab(topk, vocab_size)
    dictionary_fp = checked_dictionary_fingerprint(dictionary, vocab_size)
    check_can_create(path)
    made_dir = make_dir(path)
    check_writable_dir(path)
    held = lock_or_undo(path, owner, made_dir) if lock else None
    try:
        header, stored = create_files(path, lengths, topk, vocab_size, held, made_dir, dictionary_fp)
        return cls(path, header, stored, readonly=False, lock=held)
    except BaseException:
        if held is not None:
            held.release()
        raise


def open_store(cls, path, target_lengths=None, topk: Optional[int] = None, vocab_size: Optional[int] = None,
               readonly: bool = False, lock: bool = True, owner: Optional[str] = None,
               dictionary: Optional[Sequence[str]] = None, held: Optional[StoreLock] = None):
    """``cls.open``: the existing store in ``path``, once every file checks out (see
    ``TopKStore.open``). ``held``: the directory's lock, already taken by the caller (which
    releases it if this fails)."""
    path = os.path.abspath(os.fspath(path))
    check_openable(path, readonly)
    taken = None
    if held is None and lock and not readonly:
        held = taken = StoreLock.acquire(path, owner)  # before reading anything: a writer may be mid-update
    try:
        dictionary_fp = checked_dictionary_fingerprint(dictionary, vocab_size)
        header, stored = read_checked(path, target_lengths, topk, vocab_size, dictionary_fp)
        if dictionary_fp is not None and header.get("dictionary_fingerprint") is None and not readonly:
            # a store written before stores recorded their dictionary records the one it is opened for;
            # said, because what it holds cannot be checked against it
            header = dict(header, dictionary_fingerprint=dictionary_fp)
            replace_header(path, header)
            logger.warning(
                "the PS-KD store at %s recorded no target dictionary (it was written before stores did): its "
                "priors are taken to be over this run's dictionary (%d symbols), which it records from now on. "
                "If the data were binarised again since the store was written, delete the store", path,
                header["vocab_size"])
        try:
            return cls(path, header, stored, readonly=readonly, lock=held)
        except PermissionError as e:
            raise StoreError(
                f"cannot open the PS-KD store at {path} for writing: {e.strerror or e} ({e.filename or path}). "
                f"Make its files writable by this user (a file marked immutable needs `chattr -i`), or pass "
                f"another --pskd-store-dir") from e
    except BaseException:
        if taken is not None:
            taken.release()
        raise


def open_or_create_store(cls, path, target_lengths, topk: int, vocab_size: int, lock: bool = True,
                         owner: Optional[str] = None, dictionary: Optional[Sequence[str]] = None):
    """``cls.open_or_create``: the store in ``path`` if it has one, else a new one (see
    ``TopKStore.open_or_create``)."""
    path = os.path.abspath(os.fspath(path))
    header_path = os.path.join(path, HEADER_NAME)
    if not lock:
        if os.path.exists(header_path):
            return open_store(cls, path, target_lengths, topk, vocab_size, lock=False, dictionary=dictionary)
        return create_store(cls, path, target_lengths, topk, vocab_size, lock=False, dictionary=dictionary)
    lengths = checked_lengths(target_lengths)  # before anything is made on disk
    topk, vocab_size = check_k_vocab(topk, vocab_size)
    dictionary_fp = checked_dictionary_fingerprint(dictionary, vocab_size)
    if not (os.path.exists(header_path) and looks_like_store(path)):
        check_can_create(path)  # a foreign directory gets no lock file
    made_dir = make_dir(path)
    held = lock_or_undo(path, owner, made_dir)
    try:
        if os.path.exists(header_path):
            return open_store(cls, path, lengths, topk, vocab_size, dictionary=dictionary, held=held)
        check_writable_dir(path)
        header, stored = create_files(path, lengths, topk, vocab_size, held, made_dir, dictionary_fp)
        return cls(path, header, stored, readonly=False, lock=held)
    except BaseException:
        held.release()
        raise
