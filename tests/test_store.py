"""Tests for fairseq_pskd.store.TopKStore (disk-backed top-k priors) and its CLI."""
import errno
import json
import logging
import os
import re
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import REPO, run

from fairseq_pskd.store import StoreError, TopKStore, read_fairseq_sizes
from fairseq_pskd.store.staging import PinnedPool, compact_rows, stage_rows, stage_to_host
from fairseq_pskd.store.writer import WriteJob

# the store's command line, as a user runs it
STORE_CLI = [sys.executable, "-m", "fairseq_pskd.store"]
K = 4
V = 1000


def make_lengths(n=40, seed=0, lo=1, hi=12):
    return np.random.RandomState(seed).randint(lo, hi, size=n).astype(np.int64)


def make_batch(lengths, ids, k=K, vocab=V, seed=0, width=None, as_half=True):
    """Random (indices, probs) of shape (B, T', k); probs exactly representable in float16."""
    g = torch.Generator().manual_seed(seed)
    T = int(width if width is not None else lengths[ids].max())
    idx = torch.randint(0, vocab, (len(ids), T, k), generator=g)
    p = torch.rand(len(ids), T, k, generator=g)
    if as_half:
        p = p.half().float()
    return idx, p


def expected(idx, p, lengths, ids, width):
    """What read() must return for rows written with (idx, p): int32 / float16, padding zeroed."""
    B = len(ids)
    ei = torch.zeros(B, width, idx.shape[2], dtype=torch.int32)
    ep = torch.zeros(B, width, idx.shape[2], dtype=torch.float16)
    for r, i in enumerate(ids):
        n = int(lengths[i])
        ei[r, :n] = idx[r, :n]
        ep[r, :n] = p[r, :n]
    return ei, ep


@pytest.fixture
def lengths():
    return make_lengths()


@pytest.fixture
def store(tmp_path, lengths):
    s = TopKStore.create(tmp_path / "store", lengths, K, V)
    yield s
    s.close()


def write_epoch(s, epoch, lengths, ids, seed):
    ids = np.asarray(ids)
    idx, p = make_batch(lengths, ids, seed=seed)
    s.write(epoch, torch.as_tensor(ids), torch.as_tensor(lengths[ids]), idx, p)
    return idx, p


def assert_reads(s, epoch, lengths, ids, idx, p):
    ids = np.asarray(ids)
    width = int(lengths[ids].max())
    ri, rp, has = s.read(epoch, ids, lengths[ids])
    ei, ep = expected(idx, p, lengths, ids, width)
    assert has.all()
    assert ri.dtype == torch.int32 and rp.dtype == torch.float16 and has.dtype == torch.bool
    assert torch.equal(ri, ei)
    assert torch.equal(rp, ep)


# ------------------------------------------------------------------------------ basics

def test_round_trip_bit_for_bit(store, lengths):
    ids = np.arange(len(lengths))
    idx, p = write_epoch(store, 1, lengths, ids, seed=1)
    store.flush()
    assert_reads(store, 2, lengths, ids, idx, p)
    # The float16 bit patterns are stored as given.
    ri, rp, _ = store.read(2, ids[:3], lengths[:3])
    assert np.array_equal(rp.numpy().astype(np.float16).view(np.uint16),
                          expected(idx[:3], p[:3], lengths, ids[:3], rp.shape[1])[1]
                          .numpy().astype(np.float16).view(np.uint16))
    # max_len pads with zeros, positions >= length are zeros
    ri, rp, has = store.read(2, ids[:5], lengths[:5], max_len=20)
    assert ri.shape == (5, 20, K) and rp.shape == (5, 20, K)
    for r in range(5):
        assert ri[r, lengths[r]:].abs().sum() == 0 and rp[r, lengths[r]:].abs().sum() == 0


def test_properties_and_header(store, lengths):
    assert store.num_sentences == len(lengths)
    assert store.num_tokens == int(lengths.sum())
    assert store.topk == K and store.vocab_size == V
    h = json.load(open(os.path.join(store.path, "header.json")))
    assert h["format_version"] == TopKStore.FORMAT_VERSION == 1
    assert h["index_dtype"] == "uint16" and h["prob_dtype"] == "float16"
    assert h["buffers"] == [{"epoch": None, "sentences_written": 0}] * 2
    assert len(h["lengths_fingerprint"]) == 64
    for b in (0, 1):
        assert os.path.getsize(os.path.join(store.path, f"indices.{b}.bin")) == store.num_tokens * K * 2
        assert os.path.getsize(os.path.join(store.path, f"probs.{b}.bin")) == store.num_tokens * K * 2
        assert os.path.getsize(os.path.join(store.path, f"stamps.{b}.bin")) == store.num_sentences * 4
    # estimate_bytes covers what was created
    on_disk = sum(os.path.getsize(os.path.join(store.path, f)) for f in os.listdir(store.path))
    est = TopKStore.estimate_bytes(store.num_sentences, store.num_tokens, K, V)
    assert on_disk <= est <= on_disk + 4096 + 128


def test_epoch_one_has_no_prior(store, lengths):
    ids = np.arange(5)
    ri, rp, has = store.read(1, ids, lengths[ids])
    assert not has.any() and ri.abs().sum() == 0 and rp.abs().sum() == 0


def test_parity_across_epochs(store, lengths):
    ids = np.arange(len(lengths))
    written = {}
    for epoch in range(1, 6):
        if epoch > 1:  # what epoch-1 wrote, even while this epoch writes the other buffer
            assert_reads(store, epoch, lengths, ids, *written[epoch - 1])
        written[epoch] = write_epoch(store, epoch, lengths, ids, seed=epoch)
        store.flush()
        if epoch > 1:  # writing epoch t did not touch epoch t-1's priors
            assert_reads(store, epoch, lengths, ids, *written[epoch - 1])
        store.end_epoch(epoch)
        assert_reads(store, epoch + 1, lengths, ids, *written[epoch])
    h = json.load(open(os.path.join(store.path, "header.json")))
    assert h["buffers"][1] == {"epoch": 5, "sentences_written": len(lengths)}
    assert h["buffers"][0] == {"epoch": 4, "sentences_written": len(lengths)}


def test_stamps_unwritten_and_stale(store, lengths):
    n = len(lengths)
    written = np.arange(0, n, 2)
    idx, p = write_epoch(store, 1, lengths, written, seed=3)
    store.end_epoch(1)
    ids = np.arange(n)
    ri, rp, has = store.read(2, ids, lengths)
    assert has.numpy().tolist() == [i % 2 == 0 for i in range(n)]
    assert ri[1::2].abs().sum() == 0 and rp[1::2].abs().sum() == 0
    ei, ep = expected(idx, p, lengths, written, ri.shape[1])
    assert torch.equal(ri[0::2], ei) and torch.equal(rp[0::2], ep)
    # epoch 3 rewrites only sentence 0 into buffer 1: sentence 2's epoch-1 row there is stale
    write_epoch(store, 2, lengths, [0], seed=4)
    write_epoch(store, 3, lengths, [0], seed=5)
    store.flush()
    _, _, has = store.read(4, np.array([0, 2]), lengths[[0, 2]])
    assert has.tolist() == [True, False]
    s = store.summary()
    assert s["buffers"][1]["epoch"] == 3 and s["buffers"][1]["sentences_written"] == 1
    assert s["buffers"][1]["sentences_stale"] == len(written) - 1
    assert s["buffers"][1]["header_epoch"] == 1


def test_background_write_complete_after_flush(tmp_path):
    lengths = make_lengths(n=3000, seed=7, hi=40)
    with TopKStore.create(tmp_path / "s", lengths, K, V) as s:
        perm = np.random.RandomState(0).permutation(len(lengths))
        batches = [perm[i:i + 50] for i in range(0, len(perm), 50)]
        data = []
        for j, ids in enumerate(batches):  # more batches than the queue holds
            idx, p = make_batch(lengths, ids, seed=100 + j)
            s.write(1, torch.from_numpy(ids), torch.from_numpy(lengths[ids]), idx.clone(), p.clone())
            data.append((ids, idx, p))
        s.flush()
        assert s.sentences_written(1) == len(lengths)
        for ids, idx, p in data[::7]:
            assert_reads(s, 2, lengths, ids, idx, p)


def test_write_copies_caller_tensors(store, lengths):
    ids = np.arange(6)
    idx, p = make_batch(lengths, ids, seed=9)
    keep_i, keep_p = idx.clone(), p.clone()
    store.write(1, ids, lengths[ids], idx, p)
    idx.zero_()  # the caller reuses its buffers right away
    p.fill_(0.5)
    store.flush()
    assert_reads(store, 2, lengths, ids, keep_i, keep_p)


def test_read_waits_for_pending_writes_to_its_buffer(store, lengths):
    ids = np.arange(len(lengths))
    idx, p = write_epoch(store, 1, lengths, ids, seed=11)
    # no flush: read(2) reads buffer 1, which the queued write targets
    assert_reads(store, 2, lengths, ids, idx, p)


def test_numpy_inputs_and_empty_batch(store, lengths):
    ids = np.array([3, 1, 3])  # duplicates are fine (same row written twice)
    idx, p = make_batch(lengths, ids, seed=12)
    idx[2], p[2] = idx[0], p[0]
    store.write(1, ids.astype(np.int32), lengths[ids].astype(np.int32), idx.numpy(), p.numpy().astype(np.float16))
    store.flush()
    assert_reads(store, 2, lengths, ids, idx, p)
    e = np.array([], dtype=np.int64)
    store.write(1, e, e, np.zeros((0, 0, K), np.int64), np.zeros((0, 0, K), np.float32))
    ri, rp, has = store.read(2, e, e)
    assert ri.shape == (0, 0, K) and has.shape == (0,)


def test_vocab_above_uint16_uses_int32(tmp_path):
    lengths = make_lengths(n=10, seed=2)
    vocab = 100_000
    with TopKStore.create(tmp_path / "s", lengths, 3, vocab) as s:
        h = json.load(open(os.path.join(s.path, "header.json")))
        assert h["index_dtype"] == "int32"
        assert os.path.getsize(os.path.join(s.path, "indices.0.bin")) == s.num_tokens * 3 * 4
        ids = np.arange(10)
        idx, p = make_batch(lengths, ids, k=3, vocab=vocab, seed=5)
        idx[0, 0] = torch.tensor([vocab - 1, 65536, 70000])
        s.write(1, ids, lengths, idx, p)
        s.end_epoch(1)
    with TopKStore.open(tmp_path / "s", lengths, 3, vocab, readonly=True) as s:
        ri, rp, has = s.read(2, ids, lengths)
        ei, ep = expected(idx, p, lengths, ids, ri.shape[1])
        assert torch.equal(ri, ei) and torch.equal(rp, ep)
        assert ri[0, 0].tolist() == [vocab - 1, 65536, 70000]
    # exactly 65536 still fits uint16 (ids 0..65535)
    with TopKStore.create(tmp_path / "u", lengths, 3, 65536) as s:
        assert s.summary()["index_dtype"] == "uint16"


def test_open_or_create_and_reopen(tmp_path, lengths):
    p = tmp_path / "s"
    with TopKStore.open_or_create(p, lengths, K, V) as s:
        ids = np.arange(len(lengths))
        idx, pr = write_epoch(s, 1, lengths, ids, seed=21)
        s.end_epoch(1)
    with TopKStore.open_or_create(p, lengths, K, V) as s:
        assert_reads(s, 2, lengths, ids, idx, pr)
    with TopKStore.open(p) as s:  # no expectations given: header only
        assert s.num_sentences == len(lengths)


def test_pinned_pool_reuses_buffers():
    pool = PinnedPool(pin=False)
    v1, b1 = pool.acquire((3, 5, 4), torch.int32)
    assert v1.shape == (3, 5, 4) and v1.dtype == torch.int32
    pool.release(b1)
    v2, b2 = pool.acquire((2, 2, 4), torch.float16)
    assert b2.data_ptr() == b1.data_ptr()  # recycled, not reallocated
    assert v2.shape == (2, 2, 4) and v2.dtype == torch.float16


@pytest.mark.parametrize("shape", [(3, 5, 4), (1, 7, 3), (0, 4, 2)])
def test_stage_to_host_is_one_copy_into_one_buffer(shape):
    """What write() does with CUDA tensors (run here on CPU tensors with an unpinned pool):
    everything narrowed, packed and copied in one transfer; each view reads back its tensor."""
    g = torch.Generator().manual_seed(0)
    indices = torch.randint(0, V, shape, generator=g)  # int64, narrowed to int32
    probs = torch.rand(shape, generator=g)  # float32, narrowed to float16
    ids = torch.randint(0, 100, shape[:1], generator=g)
    lengths = torch.randint(1, 9, shape[:1], generator=g).to(torch.int32)  # widened to int64
    parts = [(indices, torch.int32), (probs, torch.float16), (ids, torch.int64), (lengths, torch.int64)]
    pool = PinnedPool(pin=False)
    views, base = stage_to_host(parts, pool)
    for (t, dtype), v in zip(parts, views):
        assert v.dtype == dtype and v.shape == t.shape
        assert torch.equal(v, t.to(dtype))
    if indices.numel():
        start, end = base.data_ptr(), base.data_ptr() + base.numel()
        assert all(start <= v.data_ptr() < end for v in views)  # one host buffer for all four
        assert sum(v.numel() * v.element_size() for v in views) <= base.numel()
    else:
        assert base is None


# ------------------------------------------------------------------------------ crash / resume

@pytest.mark.e2e
def test_reopen_after_crash_mid_epoch(tmp_path, lengths):
    """A process killed mid-epoch 2: epoch 1's priors intact, epoch-2 rows already applied usable."""
    path = str(tmp_path / "s")
    TopKStore.create(path, lengths, K, V).close()
    script = textwrap.dedent(f"""
        import os, sys, numpy as np, torch
        sys.path.insert(0, {str(REPO)!r})
        from fairseq_pskd.store import TopKStore
        lengths = np.array({lengths.tolist()})
        s = TopKStore.open({path!r}, lengths, {K}, {V})
        def batch(ids, seed):
            g = torch.Generator().manual_seed(seed)
            T = int(lengths[ids].max())
            return (torch.randint(0, {V}, (len(ids), T, {K}), generator=g),
                    torch.rand(len(ids), T, {K}, generator=g).half().float())
        all_ids = np.arange(len(lengths))
        s.write(1, all_ids, lengths, *batch(all_ids, 1))
        s.end_epoch(1)
        first = np.arange(0, 10)
        s.write(2, first, lengths[first], *batch(first, 2))
        s.flush()                                  # applied (like batches long before a crash)
        s.write(2, np.arange(10, 20), lengths[10:20], *batch(np.arange(10, 20), 3))
        os._exit(3)                                # killed: no end_epoch, no close, maybe in flight
    """)
    r = run([sys.executable, "-c", script], check=False, timeout=120, stderr=subprocess.PIPE)
    assert r.returncode == 3, r.stderr
    all_ids = np.arange(len(lengths))
    idx1, p1 = make_batch(lengths, all_ids, seed=1)
    idx2, p2 = make_batch(lengths, np.arange(10), seed=2)
    with TopKStore.open(path, lengths, K, V) as s:
        h = json.load(open(os.path.join(path, "header.json")))
        assert h["buffers"][1]["epoch"] == 1 and h["buffers"][0]["epoch"] is None
        assert_reads(s, 2, lengths, all_ids, idx1, p1)               # resume epoch 2: priors intact
        assert_reads(s, 3, lengths, np.arange(10), idx2, p2)         # flushed epoch-2 rows
        _, _, has = s.read(3, all_ids, lengths)
        assert has[:10].all() and not has[20:].any()                 # never-written rows: no prior
        # resume: epoch 2 continues and finishes; later batches overwrite/extend
        idx2b, p2b = write_epoch(s, 2, lengths, all_ids, seed=22)
        s.end_epoch(2)
        assert_reads(s, 3, lengths, all_ids, idx2b, p2b)
        assert_reads(s, 2, lengths, all_ids, idx1, p1)


def test_dropped_store_still_applies_queued_writes(tmp_path, lengths):
    s = TopKStore.create(tmp_path / "s", lengths, K, V)
    ids = np.arange(len(lengths))
    idx, p = write_epoch(s, 1, lengths, ids, seed=31)
    del s  # no end_epoch/close: the finalizer drains the writer
    import gc
    gc.collect()
    with TopKStore.open(tmp_path / "s", lengths, K, V) as s2:
        assert_reads(s2, 2, lengths, ids, idx, p)


# ------------------------------------------------------------------------------ bad input

def test_open_other_dataset(tmp_path, lengths):
    TopKStore.create(tmp_path / "s", lengths, K, V).close()
    other = lengths.copy()
    other[5] += 1
    with pytest.raises(StoreError, match=r"another dataset.*first differing sentence id 5.*--pskd-store-dir"):
        TopKStore.open(tmp_path / "s", other, K, V)
    with pytest.raises(StoreError, match=r"another dataset.*39 sentences"):
        TopKStore.open_or_create(tmp_path / "s", lengths[:-1], K, V)


def test_open_other_k_or_vocab(tmp_path, lengths):
    TopKStore.create(tmp_path / "s", lengths, K, V).close()
    with pytest.raises(StoreError, match=r"topk=4 but topk=8 .*delete"):
        TopKStore.open(tmp_path / "s", lengths, 8, V)
    with pytest.raises(StoreError, match=r"vocab_size=1000 but vocab_size=1008 .*delete"):
        TopKStore.open_or_create(tmp_path / "s", lengths, K, 1008)


def test_open_other_dictionary_of_the_same_size(tmp_path, lengths, caplog):
    """The store records its target dictionary's fingerprint: the same symbols in another order
    (same size) are refused; a store that recorded none (written before it did) takes the first
    one it is opened for writing with, says so once, and refuses others from then on."""
    symbols = [f"w{i}" for i in range(V)]
    reordered = [symbols[1], symbols[0], *symbols[2:]]
    TopKStore.create(tmp_path / "s", lengths, K, V, dictionary=symbols).close()
    with TopKStore.open(tmp_path / "s", lengths, K, V, dictionary=symbols) as s:
        assert s.dictionary_fingerprint is not None
    with pytest.raises(StoreError, match=r"built for another target dictionary: both have 1000 symbols, but in "
                                         r"another order or with other words.*delete"):
        TopKStore.open_or_create(tmp_path / "s", lengths, K, V, dictionary=reordered)
    with pytest.raises(StoreError, match=r"dictionary has 999 symbols but vocab_size=1000"):
        TopKStore.open(tmp_path / "s", lengths, K, V, dictionary=symbols[:-1])

    TopKStore.create(tmp_path / "old", lengths, K, V).close()  # no dictionary recorded
    with caplog.at_level(logging.WARNING, logger="fairseq_pskd.store"):
        with TopKStore.open(tmp_path / "old", lengths, K, V, dictionary=reordered) as s:
            assert s.dictionary_fingerprint is not None
        with TopKStore.open(tmp_path / "old", lengths, K, V, dictionary=reordered):
            pass
    adopted = [r.getMessage() for r in caplog.records if "recorded no target dictionary" in r.getMessage()]
    assert len(adopted) == 1 and "over this run's dictionary (1000 symbols)" in adopted[0]  # said once: now recorded
    with pytest.raises(StoreError, match=r"another target dictionary"):
        TopKStore.open(tmp_path / "old", lengths, K, V, dictionary=symbols)


@pytest.mark.e2e
def test_run_save_dir_newest_epoch_and_overwritten_rows(tmp_path, lengths):
    """What a resume needs to know: whose priors (run id, save dir), up to which epoch, and how
    many of an epoch's rows a later epoch overwrote (epoch 4 writes the buffer epoch 2 wrote)."""
    with TopKStore.create(tmp_path / "s", lengths, K, V) as s:
        assert s.newest_epoch() is None and s.run_save_dir is None
        s.reset(run_id="a" * 32, save_dir="/runs/a")
        assert (s.run_id, s.run_save_dir) == ("a" * 32, "/runs/a")
        every = np.arange(len(lengths))
        for epoch, ids in ((1, every), (2, every), (3, every), (4, every[:10])):
            s.write(epoch, ids, lengths[ids], *make_batch(lengths, ids))
            s.end_epoch(epoch)
        assert s.newest_epoch() == 4 and s.newest_epoch(2) == 4 and s.newest_epoch(3) == 3
        assert s.sentences_overwritten(2) == 10 and s.sentences_written(2) == len(lengths) - 10
        assert s.sentences_overwritten(3) == 0 and s.sentences_overwritten(4) == 0
        s.set_run_id("b" * 32, save_dir="/runs/b")
    summary = json.loads(run([*STORE_CLI, "inspect", tmp_path / "s"], stderr=subprocess.PIPE).stdout)
    assert (summary["run_id"], summary["run_save_dir"]) == ("b" * 32, "/runs/b")
    assert "dictionary_fingerprint" in summary


@pytest.mark.parametrize("name", ["probs.1.bin", "indices.0.bin", "stamps.0.bin"])
def test_truncated_or_missing_file(tmp_path, lengths, name):
    TopKStore.create(tmp_path / "s", lengths, K, V).close()
    f = tmp_path / "s" / name
    size = f.stat().st_size
    os.truncate(f, size - 2)
    with pytest.raises(StoreError, match=rf"{name} is truncated: {size - 2} bytes, the header needs {size}.*delete"):
        TopKStore.open(tmp_path / "s")
    f.unlink()
    with pytest.raises(StoreError, match=rf"{name} is missing.*delete"):
        TopKStore.open(tmp_path / "s")


def test_lengths_file_corrupt(tmp_path, lengths):
    TopKStore.create(tmp_path / "s", lengths, K, V).close()
    f = tmp_path / "s" / "lengths.npy"
    os.truncate(f, f.stat().st_size - 8)
    with pytest.raises(StoreError, match=r"lengths.npy is truncated or corrupt.*delete"):
        TopKStore.open(tmp_path / "s")
    f.unlink()
    with pytest.raises(StoreError, match=r"lengths.npy is missing"):
        TopKStore.open(tmp_path / "s")


def test_header_missing_corrupt_or_unknown_version(tmp_path, lengths):
    TopKStore.create(tmp_path / "s", lengths, K, V).close()
    hp = tmp_path / "s" / "header.json"
    good = hp.read_text()
    hp.write_text(good[: len(good) // 2])
    with pytest.raises(StoreError, match=r"header.json is unreadable or corrupt.*delete"):
        TopKStore.open(tmp_path / "s")
    h = json.loads(good)
    h["format_version"] = 2
    hp.write_text(json.dumps(h))
    with pytest.raises(StoreError, match=r"format_version 2; this fairseq-pskd reads version 1.*delete"):
        TopKStore.open(tmp_path / "s")
    h["format_version"] = 1
    h["topk"] = "four"
    hp.write_text(json.dumps(h))
    with pytest.raises(StoreError, match=r"topk = 'four' is not a positive integer"):
        TopKStore.open(tmp_path / "s")
    hp.unlink()
    with pytest.raises(StoreError, match=r"has no header.json.*interrupted"):
        TopKStore.open(tmp_path / "s")
    with pytest.raises(StoreError, match=r"does not exist"):
        TopKStore.open(tmp_path / "nope")


def test_create_refuses_existing_store_or_foreign_files(tmp_path, lengths):
    TopKStore.create(tmp_path / "s", lengths, K, V).close()
    with pytest.raises(StoreError, match=r"already holds a PS-KD store"):
        TopKStore.create(tmp_path / "s", lengths, K, V)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(StoreError, match=r"not empty \(notes.txt\)"):
        TopKStore.create(tmp_path / "other", lengths, K, V)
    # leftovers of an interrupted create (no header) are replaced
    (tmp_path / "s" / "header.json").unlink()
    TopKStore.create(tmp_path / "s", lengths, K, V).close()


def test_create_bad_arguments(tmp_path, lengths):
    with pytest.raises(StoreError, match="topk must be >= 1"):
        TopKStore.create(tmp_path / "a", lengths, 0, V)
    with pytest.raises(StoreError, match="exceeds vocab_size"):
        TopKStore.create(tmp_path / "a", lengths, 20, 10)
    with pytest.raises(StoreError, match="target_lengths is empty"):
        TopKStore.create(tmp_path / "a", [], K, V)
    with pytest.raises(StoreError, match=r"within \[0, 2\^31\)"):
        TopKStore.create(tmp_path / "a", [3, -1], K, V)
    with pytest.raises(StoreError, match="must be 1-D"):
        TopKStore.create(tmp_path / "a", np.ones((2, 2), int), K, V)
    assert not (tmp_path / "a").exists()


def test_unwritable_directory(tmp_path, lengths):
    f = tmp_path / "regular_file"
    f.write_text("x")
    with pytest.raises(StoreError, match=r"cannot create store directory .*writable --pskd-store-dir"):
        TopKStore.create(f / "store", lengths, K, V)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores permission bits")
def test_unwritable_directory_permissions(tmp_path, lengths):
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o555)
    try:
        with pytest.raises(StoreError, match=r"not writable"):
            TopKStore.create(d, lengths, K, V)
        with pytest.raises(StoreError, match=r"cannot create store directory"):
            TopKStore.create(d / "sub", lengths, K, V)
    finally:
        d.chmod(0o755)


def test_full_disk_fallocate(tmp_path, lengths, monkeypatch):
    calls = []

    def no_space(fd, offset, length):
        calls.append(length)
        if len(calls) == 3:  # fail part-way: earlier files exist and must be removed
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_space)
    with pytest.raises(StoreError, match=r"disk full .*needs \d+ bytes .*\d+ bytes .*free.*larger disk"):
        TopKStore.create(tmp_path / "s", lengths, K, V)
    assert not (tmp_path / "s").exists()  # the directory we made is gone too
    (tmp_path / "pre").mkdir()
    calls.clear()
    with pytest.raises(StoreError, match="disk full"):
        TopKStore.create(tmp_path / "pre", lengths, K, V)
    assert os.listdir(tmp_path / "pre") == []  # a directory we did not make stays, empty


def test_not_enough_free_space_checked_first(tmp_path, lengths, monkeypatch):
    import shutil
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 100, 100))
    with pytest.raises(StoreError, match=r"not enough disk space .*needs \d+ bytes .*100 bytes .* free"):
        TopKStore.create(tmp_path / "s", lengths, K, V)
    assert not (tmp_path / "s").exists()


def test_ids_out_of_range(store, lengths):
    n = len(lengths)
    with pytest.raises(StoreError, match=rf"sentence id {n} is out of range.*holds {n} sentences"):
        store.read(2, [0, n], [lengths[0], 3])
    with pytest.raises(StoreError, match=r"sentence id -1 is out of range"):
        store.read(2, [-1], [3])
    idx, p = make_batch(lengths, np.array([0]), seed=1)
    with pytest.raises(StoreError, match=rf"sentence id {n + 5} is out of range"):
        store.write(1, [n + 5], [lengths[0]], idx, p)


def test_batch_lengths_mismatch(store, lengths):
    ids = np.array([0, 1, 2])
    bad = lengths[ids].copy()
    bad[1] += 1
    with pytest.raises(StoreError, match=rf"batch length does not match the stored length for sentence id 1: "
                                         rf"batch says {bad[1]}, store says {lengths[1]}"):
        store.read(2, ids, bad)
    idx, p = make_batch(lengths, ids, seed=1, width=int(bad.max()))
    with pytest.raises(StoreError, match=r"batch length does not match.*including eos"):
        store.write(1, ids, bad, idx, p)
    with pytest.raises(StoreError, match=r"ids has 3 entries but lengths has 2"):
        store.read(2, ids, lengths[:2])
    with pytest.raises(StoreError, match=r"max_len=1 is shorter"):
        store.read(2, ids, lengths[ids], max_len=1)


def test_write_shape_errors(store, lengths):
    ids = np.array([0, 1])
    idx, p = make_batch(lengths, ids, k=K + 1, seed=1)
    with pytest.raises(StoreError, match=rf"got top-{K + 1} but the store .* keeps top-{K}"):
        store.write(1, ids, lengths[ids], idx, p)
    idx, p = make_batch(lengths, ids, seed=1)
    with pytest.raises(StoreError, match=r"target positions but the longest sentence"):
        store.write(1, ids, lengths[ids], idx[:, :1], p[:, :1])
    with pytest.raises(StoreError, match=r"did you swap them"):
        store.write(1, ids, lengths[ids], p, idx)
    with pytest.raises(StoreError, match=r"2 ids for a batch of 1 rows"):
        store.write(1, ids, lengths[ids], idx[:1], p[:1])
    with pytest.raises(StoreError, match=r"epoch must be a 1-based integer"):
        store.write(0, ids, lengths[ids], idx, p)


def test_index_values_out_of_vocab_raised_by_next_call(store, lengths):
    ids = np.array([0, 1])
    idx, p = make_batch(lengths, ids, seed=1)
    idx[1, 0, 0] = V  # out of vocabulary
    store.write(1, ids, lengths[ids], idx, p)
    with pytest.raises(StoreError, match=rf"earlier asynchronous write failed.*must be in \[0, vocab_size={V}\), "
                                         rf"got range \[\d+, {V}\].*not written"):
        store.flush()
    _, _, has = store.read(2, ids, lengths[ids])
    assert not has.any()  # the bad batch left no trace
    idx[1, 0, 0] = -3
    store.write(1, ids, lengths[ids], idx, p)
    with pytest.raises(StoreError, match=r"got range \[-3,"):
        store.read(2, ids, lengths[ids])
    # padding positions are ignored, so garbage there is fine
    idx, p = make_batch(lengths, ids, seed=1, width=int(lengths[ids].max()) + 2)
    idx[:, -1] = 10**6
    store.write(1, ids, lengths[ids], idx, p)
    store.flush()  # error was consumed; this one is fine
    p[0, 0, 0] = float("nan")
    store.write(1, ids, lengths[ids], idx, p)
    store._writer_holder[0].wait()  # a write() sees the error once the writer has reached it
    with pytest.raises(StoreError, match=r"probabilities must be finite"):
        store.write(1, ids, lengths[ids], idx, p.nan_to_num())
    store.flush()  # the rejected write was not queued; nothing more to report


def test_readonly_store_refuses_writes(tmp_path, lengths):
    TopKStore.create(tmp_path / "s", lengths, K, V).close()
    with TopKStore.open(tmp_path / "s", readonly=True) as s:
        idx, p = make_batch(lengths, np.array([0]), seed=1)
        with pytest.raises(StoreError, match="opened readonly"):
            s.write(1, [0], lengths[:1], idx, p)
        s.end_epoch(1, update_header=False)  # fine: nothing to record
        with pytest.raises(StoreError, match="update_header=False"):
            s.end_epoch(1)


def test_closed_store(tmp_path, lengths):
    s = TopKStore.create(tmp_path / "s", lengths, K, V)
    s.close()
    s.close()  # idempotent
    with pytest.raises(StoreError, match="is closed"):
        s.read(2, [0], lengths[:1])


# ------------------------------------------------------------------------------ header

def test_header_update_is_atomic(store, lengths, monkeypatch):
    ids = np.arange(len(lengths) - 3)
    write_epoch(store, 1, lengths, ids, seed=1)
    store.end_epoch(1)
    files = set(os.listdir(store.path))
    assert not any(f.endswith(".tmp") for f in files)
    h = json.load(open(os.path.join(store.path, "header.json")))
    assert h["buffers"][1] == {"epoch": 1, "sentences_written": len(ids)}
    before = open(os.path.join(store.path, "header.json")).read()

    def broken_replace(a, b):
        raise OSError(errno.EIO, "I/O error")

    write_epoch(store, 2, lengths, ids, seed=2)
    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(StoreError, match=r"cannot update .*header.json.*previous header is unchanged"):
        store.end_epoch(2)
    monkeypatch.undo()
    assert open(os.path.join(store.path, "header.json")).read() == before
    assert set(os.listdir(store.path)) == files  # temp file removed
    store.end_epoch(2, update_header=False)
    assert open(os.path.join(store.path, "header.json")).read() == before


def test_reset_forgets_priors(store, lengths):
    ids = np.arange(len(lengths))
    write_epoch(store, 1, lengths, ids, seed=1)
    store.end_epoch(1)
    store.reset()
    _, _, has = store.read(2, ids, lengths)
    assert not has.any()
    assert store.summary()["buffers"][1]["header_epoch"] is None


# ------------------------------------------------------------------------------ fairseq .idx

def write_fairseq_idx(path, sizes):
    sizes = np.asarray(sizes, dtype=np.int32)
    with open(path, "wb") as f:
        f.write(b"MMIDIDX\x00\x00")
        f.write(struct.pack("<Q", 1))
        f.write(struct.pack("<B", 8))  # uint16 tokens
        f.write(struct.pack("<Q", len(sizes)))
        f.write(sizes.tobytes())
        f.write(np.concatenate([[0], np.cumsum(sizes[:-1]) * 2]).astype(np.int64).tobytes())


def test_read_fairseq_sizes(tmp_path):
    p = tmp_path / "train.en-de.de.idx"
    write_fairseq_idx(p, [5, 7, 1])
    assert read_fairseq_sizes(str(p)).tolist() == [5, 7, 1]
    os.truncate(p, p.stat().st_size - 4)
    with pytest.raises(StoreError, match="truncated"):
        read_fairseq_sizes(str(p))
    p.write_bytes(b"TNTIDX\x00\x00" + b"\x00" * 40)
    with pytest.raises(StoreError, match="bad magic"):
        read_fairseq_sizes(str(p))


# ------------------------------------------------------------------------------ CLI

@pytest.mark.e2e
def test_store_imports_no_fairseq():
    """The store (and its command line) serves tools that run without fairseq: importing it
    imports no fairseq module, and of fairseq_pskd only the store package (plus compat.py, which
    the parent package installs whenever torch is imported)."""
    code = ("import sys, fairseq_pskd.store.cli; print(sorted(m for m in sys.modules if m.split('.')[0] == 'fairseq'"
            " or m.startswith('fairseq_pskd.') and m.split('.')[1] not in ('store', 'compat')))")
    r = run([sys.executable, "-c", code], timeout=120, stderr=subprocess.PIPE)  # check=True: exit 0, else the tail
    assert r.stdout.strip() == "[]", r.stdout


@pytest.mark.e2e
@pytest.mark.parametrize("command", [["--help"], ["inspect", "STORE"], ["estimate", "--tokens", "1000",
                                                                        "--topk", "8", "--vocab-size", "100"]])
def test_cli_imports_no_torch(tmp_path, lengths, command):
    """inspect, estimate and --help are numpy only: python -X importtime lists no torch module
    (importing torch alone takes 1-3 s on a 2-core machine, the CLI's whole start-up used to)."""
    with TopKStore.create(tmp_path / "s", lengths, K, V) as s:
        write_epoch(s, 1, lengths, np.arange(7), seed=1)
        s.end_epoch(1)
    args = [str(tmp_path / "s") if a == "STORE" else a for a in command]
    r = run([sys.executable, "-X", "importtime", "-m", "fairseq_pskd.store", *args], timeout=120,
            stderr=subprocess.PIPE)  # check=True: exit 0, else the output's tail (stderr: its last 3000)
    imported = [line.rsplit("|", 1)[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")]
    assert "numpy" in imported and "fairseq_pskd.store.cli" in imported
    assert [m for m in imported if m.split(".")[0] == "torch"] == []
    if command[0] == "inspect":  # the same summary as an open store gives
        with TopKStore.open(tmp_path / "s", readonly=True) as s:
            assert json.loads(r.stdout) == {**s.summary(), "locked_by": None}


@pytest.mark.e2e
def test_cli_inspect(tmp_path, lengths):
    with TopKStore.create(tmp_path / "s", lengths, K, V) as s:
        write_epoch(s, 1, lengths, np.arange(7), seed=1)
        s.end_epoch(1)
    r = run([*STORE_CLI, "inspect", tmp_path / "s"], timeout=120, stderr=subprocess.PIPE)  # check=True: exit 0
    out = json.loads(r.stdout)
    assert out["format_version"] == 1 and out["num_sentences"] == len(lengths)
    assert out["num_tokens"] == int(lengths.sum()) and out["topk"] == K and out["vocab_size"] == V
    assert out["disk_bytes"] >= 2 * int(lengths.sum()) * K * 4
    assert [(b["epoch"], b["sentences_written"]) for b in out["buffers"]] == [(None, 0), (1, 7)]


@pytest.mark.e2e
def test_cli_estimate_and_errors(tmp_path):
    d = tmp_path / "data-bin"
    d.mkdir()
    sizes = [10, 20, 30, 40]
    write_fairseq_idx(d / "train.en-de.de.idx", sizes)
    write_fairseq_idx(d / "train.en-de.en.idx", [1, 1, 1, 1])
    (d / "dict.de.txt").write_text("".join(f"w{i} 1\n" for i in range(100)))
    # in-process: same code path as `python -m`, without the interpreter start-up
    import contextlib
    import io

    from fairseq_pskd.store import main
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["estimate", "--data-bin", str(d), "--lang", "de", "--topk", "8", "--json"]) == 0
    out = json.loads(buf.getvalue())
    assert out["num_tokens"] == 100 and out["num_sentences"] == 4 and out["vocab_size"] == 104
    assert out["bytes"] == TopKStore.estimate_bytes(4, 100, 8, 104)
    # subprocess: text output and an error exit
    r = run([*STORE_CLI, "estimate", "--tokens", "140000000", "--sentences", "4500000", "--topk", "8",
             "--vocab-size", "40000"], timeout=120, stderr=subprocess.PIPE)  # check=True: exit 0
    assert f"{TopKStore.estimate_bytes(4_500_000, 140_000_000, 8, 40000)} bytes" in r.stdout
    assert "GiB" in r.stdout



def test_cli_errors_exit_2_without_traceback(tmp_path, capsys):
    # in-process: the code path of `python -m` (run for real by the tests above), without an
    # interpreter start-up and a torch import per call
    from fairseq_pskd.store import main
    assert main(["inspect", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "does not exist" in err and "Traceback" not in err
    assert main(["estimate", "--tokens", "100", "--topk", "8"]) == 2
    assert "error: give --vocab-size" in capsys.readouterr().err
    assert main(["estimate", "--data-bin", str(tmp_path), "--lang", "de", "--topk", "8", "--vocab-size", "9"]) == 2
    assert "no train.SRC-TGT.de.idx" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["estimate", "--tokens", "lots", "--topk", "8"])
    assert e.value.code == 2
    assert "error: argument --tokens: invalid int value" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2


def test_cli_never_advises_deleting_what_is_not_a_store(tmp_path, capsys):
    """inspect of a directory that is not a store (a data directory, "", one with someone else's
    header.json) says so and never says to delete it; a real store's leftovers still get that advice."""
    from fairseq_pskd.store import main
    data = tmp_path / "data-bin"
    data.mkdir()
    write_fairseq_idx(data / "train.en-de.de.idx", [3, 4])
    (data / "dict.de.txt").write_text("w 1\n")
    assert main(["inspect", str(data)]) == 2
    err = capsys.readouterr().err
    assert f"error: {data} is not a PS-KD store (no header.json and none of the store's files)" in err, err
    assert main(["inspect", ""]) == 2
    err += capsys.readouterr().err
    assert "error: inspect needs a store directory (got an empty path)" in err
    other = tmp_path / "other"
    other.mkdir()
    (other / "header.json").write_text(json.dumps({"name": "someone else's", "version": 3}))
    assert main(["inspect", str(other)]) == 2
    msg = capsys.readouterr().err
    assert f"{other} holds none of the store's files, so it is not a PS-KD store" in msg, msg
    err += msg
    assert "delete" not in err.lower() and "Traceback" not in err
    # a writable open / create refuses both without leaving a lock file behind
    for d in (data, other):
        before = sorted(os.listdir(d))
        with pytest.raises(StoreError) as e:
            TopKStore.open_or_create(d, [3, 4], K, V)
        assert "not empty" in str(e.value) and "delete" not in str(e.value)
        assert sorted(os.listdir(d)) == before
    # an interrupted creation (the store's files, no header) is the store's: deleting it is the advice
    TopKStore.create(tmp_path / "s", [3, 4], K, V).close()
    os.unlink(tmp_path / "s" / "header.json")
    assert main(["inspect", str(tmp_path / "s")]) == 2
    assert f"has no header.json: its creation was interrupted; delete {tmp_path / 's'}" in capsys.readouterr().err


def test_cli_estimate_refuses_topk_above_the_vocabulary(capsys):
    from fairseq_pskd.store import main
    assert main(["estimate", "--tokens", "1000", "--topk", "200", "--vocab-size", "100"]) == 2
    err = capsys.readouterr().err
    assert "error: --topk 200 exceeds the vocabulary size 100" in err and "pass --topk <= 100" in err
    assert main(["estimate", "--tokens", "1000", "--topk", "100", "--vocab-size", "100", "--json"]) == 0


def test_free_space_check_counts_filesystem_blocks(tmp_path, lengths, monkeypatch):
    """Free space that covers the files' byte sizes but not the whole blocks they take (64 KiB
    blocks here) gets the clear message before any file is written, not ENOSPC from fallocate."""
    import shutil
    exact = TopKStore.estimate_bytes(len(lengths), int(lengths.sum()), K, V)
    fake = os.statvfs_result((65536, 65536, 10**6, 10**6, 10**6, 10**6, 10**6, 10**6, 0, 255))
    monkeypatch.setattr(os, "statvfs", lambda p: fake)
    monkeypatch.setattr(shutil, "disk_usage",
                        lambda p: shutil._ntuple_diskusage(10**12, 10**12 - exact - 10, exact + 10))
    with pytest.raises(StoreError, match=r"not enough disk space .*needs (\d+) bytes "
                                         r".*whole 65536-byte filesystem blocks.*"
                                         rf"{exact + 10} bytes .* free") as e:
        TopKStore.create(tmp_path / "s", lengths, K, V)
    needed = int(re.search(r"needs (\d+) bytes", str(e.value)).group(1))
    assert needed >= 10 * 65536 > exact  # 6 arrays, lengths, header, its temp copy, lock: whole blocks
    assert not (tmp_path / "s").exists()
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**12, 10**12 - needed, needed))
    TopKStore.create(tmp_path / "s", lengths, K, V).close()  # exactly enough: created


# ------------------------------------------------------------------------------ more write paths

def test_prob_dtypes_and_range(store, lengths):
    ids = np.array([0, 1])
    idx, p = make_batch(lengths, ids, seed=41)
    # bfloat16 / float32 inputs are narrowed to float16 on the host copy
    store.write(1, ids, lengths[ids], idx, p.to(torch.bfloat16))
    store.flush()
    _, rp, has = store.read(2, ids, lengths[ids])
    ei, ep = expected(idx, p.to(torch.bfloat16).to(torch.float16).float(), lengths, ids, rp.shape[1])
    assert has.all() and torch.equal(rp, ep)
    p2 = p.clone()
    p2[0, 0, 0] = -0.0  # a signed zero is still a probability
    p2[1, 0, 0] = 1.0
    store.write(1, ids, lengths[ids], idx, p2)
    store.flush()
    p2[0, 0, 1] = 1.5
    p3 = p2.clone()
    p3[0, 0, 1] = -0.25
    w = store._writer_holder[0]
    with w.cond:  # hold the writer's lock (re-entrant) so both bad batches are queued before either fails
        store.write(1, ids, lengths[ids], idx, p2)
        store.write(1, ids, lengths[ids], idx, p3)
    with pytest.raises(StoreError, match=r"1 later write\(s\) failed too.*within \[0, 1\], got e.g. 1.5 "):
        store.flush()
    store.flush(sync=False)  # reported once
    store.write(1, ids, lengths[ids], idx, p3)
    with pytest.raises(StoreError, match=r"got e.g. -0.25 "):
        store.flush()


def test_close_stops_writer_thread(tmp_path, lengths):
    import threading
    with TopKStore.create(tmp_path / "s", lengths, K, V) as s:
        write_epoch(s, 1, lengths, np.arange(3), seed=1)
        assert any(t.name == "pskd-store-writer" for t in threading.enumerate())
    assert not any(t.name == "pskd-store-writer" for t in threading.enumerate())
    with TopKStore.open(tmp_path / "s", readonly=True) as s:  # readers never start one
        s.read(2, [0], lengths[:1])
        assert s._writer_holder[0] is None
        assert s.lengths.tolist() == lengths.tolist()


def test_deferred_validation_of_device_ids(store, lengths):
    """Device ids/lengths are checked on the writer thread (job.validated=False); same checks."""
    ids = np.array([0, 1])
    idx, p = make_batch(lengths, ids, seed=51)
    rows = compact_rows(idx.to(torch.int32), p.half(), torch.as_tensor(lengths[ids]), int(lengths[ids].sum()))

    def job(ids_, lens_, idx_rows=rows[0], p_rows=rows[1]):
        return WriteJob(1, 1, np.asarray(ids_), np.asarray(lens_), idx_rows.numpy(), p_rows.numpy(), None, [],
                        validated=False)

    store._maps.apply(job(ids, lengths[ids]))
    _, _, has = store.read(2, ids, lengths[ids])
    assert has.all()
    with pytest.raises(StoreError, match="batch length does not match"):
        store._maps.apply(job(ids, lengths[ids] + 1))
    with pytest.raises(StoreError, match="out of range"):
        store._maps.apply(job([0, 10**6], lengths[ids]))
    with pytest.raises(StoreError, match=r"rows of indices/probs for \d+ target tokens"):
        store._maps.apply(job(ids, lengths[ids], rows[0][:-1], rows[1][:-1]))


# ------------------------------------------------------------------------------ compact rows

def compact(idx, p, lengths, ids):
    """The real tokens' (N, k) rows of a padded batch, sentence by sentence (reference)."""
    n = [int(lengths[i]) for i in ids]
    return (torch.cat([idx[r, :m] for r, m in enumerate(n)]), torch.cat([p[r, :m] for r, m in enumerate(n)]))


def test_write_rows_takes_compact_rows_in_their_stored_dtypes(store, lengths):
    ids = np.array([5, 0, 9, 3])
    idx, p = make_batch(lengths, ids, seed=61, width=int(lengths[ids].max()) + 3)
    ri, rp = compact(idx, p, lengths, ids)
    store.write_rows(1, ids, lengths[ids], ri, rp)  # int64 / float32 tensors: narrowed on their device
    store.flush()
    assert_reads(store, 2, lengths, ids, idx, p)
    # numpy rows already in the stored dtypes (uint16 / float16), as the all_gather path has them
    store.write_rows(2, ids, lengths[ids], ri.numpy().astype(np.uint16), rp.numpy().astype(np.float16))
    store.flush()
    assert_reads(store, 3, lengths, ids, idx, p)
    with pytest.raises(StoreError, match=rf"{len(ri) - 1} rows of indices/probs for {len(ri)} target tokens"):
        store.write_rows(1, ids, lengths[ids], ri[1:], rp[1:])
    with pytest.raises(StoreError, match=r"must have shape \(tokens, k\)"):
        store.write_rows(1, ids, lengths[ids], idx, p)
    with pytest.raises(StoreError, match="got top-3"):
        store.write_rows(1, ids, lengths[ids], ri[:, :3], rp[:, :3])


@pytest.mark.parametrize("lengths_of_batch", [[3, 0, 5, 1], [1], [0, 0]])
def test_compact_rows_are_the_real_tokens_sentence_by_sentence(lengths_of_batch):
    """compact_rows (the device path's compaction, here on CPU tensors) gives exactly the real
    tokens' rows; lengths that do not sum to the token count give wrong rows, never an
    out-of-range index (the writer refuses that batch when it checks the lengths)."""
    lens = np.array(lengths_of_batch)
    B, T, k = len(lens), max(int(lens.max()), 1) + 2, 3
    idx = torch.arange(B * T * k).reshape(B, T, k)
    p = torch.rand(B, T, k)
    ri, rp = compact_rows(idx, p, torch.as_tensor(lens), int(lens.sum()))
    ei, ep = compact(idx, p, lens, range(B))
    assert torch.equal(ri, ei) and torch.equal(rp, ep)
    wrong = torch.as_tensor(lens) + 7  # more tokens than the batch's width
    ri, rp = compact_rows(idx, p, wrong, int(lens.sum()))
    assert ri.shape == (int(lens.sum()), k)
    # nothing is read back from the device: it runs on the meta device, where any read raises
    meta = compact_rows(idx.to("meta"), p.to("meta"), torch.as_tensor(lens).to("meta"), int(lens.sum()))
    assert meta[0].device.type == "meta" and meta[0].shape == (int(lens.sum()), k)


def test_stage_rows_narrows_on_the_device_and_copies_cpu_rows_once():
    """What write_rows hands the writer, here for CPU tensors: int32 indices (or the stored dtype
    when they already have it), float16 probabilities, private copies unless told they are fresh."""
    pool = PinnedPool(pin=False)
    ids, lens = np.array([2, 7]), np.array([2, 1])
    idx = torch.tensor([[1, 2], [3, 4], [5, 65535]])
    p = torch.rand(3, 2)
    got = stage_rows(ids, lens, idx, p, np.dtype("<u2"), pool)
    h_ids, h_lens, h_idx, h_p, event, pinned = got
    assert h_idx.dtype == np.int32 and h_p.dtype == np.float16 and event is None and pinned == []
    assert h_idx.tolist() == idx.tolist() and np.array_equal(h_p, p.half().numpy())
    idx.zero_()  # the caller reuses its tensors: the staged rows are a copy
    assert h_idx[2, 1] == 65535 and h_ids.tolist() == [2, 7]
    kept = torch.tensor([[1, 2], [3, 4], [5, 6]], dtype=torch.uint16)
    assert stage_rows(ids, lens, kept, p.half(), np.dtype("<u2"), pool)[2].dtype == np.uint16
    assert stage_rows(ids, lens, kept, p.half(), np.dtype("<i4"), pool)[2].dtype == np.int32
    fresh = p.half()
    assert np.shares_memory(stage_rows(ids, lens, kept, fresh, np.dtype("<u2"), pool, copy=False)[3], fresh.numpy())
