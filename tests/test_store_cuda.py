"""The store's CUDA write path: the real tokens' rows taken on the device, one packed non-blocking
copy, no synchronisation in the caller, the rows read back exactly. Needs a GPU: skipped
elsewhere (CI); benchmarks/gpu_check.sh runs it. The same functions run on CPU tensors in
test_store.py (compact_rows, stage_rows, stage_to_host with an unpinned pool)."""
import numpy as np
import pytest
import torch
from test_store import K, V, expected, make_batch, make_lengths

from fairseq_pskd.store import StoreError, TopKStore, compact_rows

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("call", ["write", "write_rows"])
def test_cuda_rows_written_without_sync_and_read_back(tmp_path, call):
    lengths = make_lengths(n=64)
    ids = np.random.RandomState(1).permutation(64)[:24]
    idx, p = make_batch(lengths, ids, seed=3, width=int(lengths.max()) + 2)
    lengths_t = torch.from_numpy(lengths[ids]).cuda()  # as the criterion: measured on the device
    if call == "write":  # the criterion's shared path: host ids, padded rows on the device
        args = (torch.from_numpy(ids), lengths_t, idx.cuda(), p.cuda())
    else:  # ids, lengths and compact rows all on the device
        rows = compact_rows(idx.cuda(), p.cuda(), lengths_t, int(lengths[ids].sum()))
        args = (torch.from_numpy(ids).cuda(), lengths_t, *rows)
    with TopKStore.create(tmp_path / "s", lengths, K, V) as store:
        torch.cuda.set_sync_debug_mode("error")  # any host<->GPU synchronisation raises
        try:
            for _ in range(3):  # the pinned buffers are recycled from the second write on
                getattr(store, call)(1, *args)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        store.flush()
        got_idx, got_p, has = store.read(2, ids, lengths[ids], max_len=idx.shape[1])
    assert has.all()
    want_idx, want_p = expected(idx, p, lengths, ids, idx.shape[1])
    torch.testing.assert_close(got_idx, want_idx)
    torch.testing.assert_close(got_p, want_p)
    # what the criterion does with them: across to the device as they are, widened there
    idx_dev = got_idx.pin_memory().cuda(non_blocking=True).long()
    p_dev = got_p.pin_memory().cuda(non_blocking=True).float()
    torch.testing.assert_close(idx_dev.cpu(), want_idx.long())
    torch.testing.assert_close(p_dev.cpu(), want_p.float())


@pytest.mark.parametrize("ids_on", ["cuda", "cpu"])
def test_cuda_lengths_that_do_not_match_the_store_are_refused_at_flush(tmp_path, ids_on):
    lengths = make_lengths(n=16)
    ids = np.arange(4)
    idx, p = make_batch(lengths, ids, width=int(lengths[ids].max()) + 1)
    wrong = torch.from_numpy(lengths[ids] + 1).cuda()
    with TopKStore.create(tmp_path / "s", lengths, K, V) as store:
        store.write(1, torch.from_numpy(ids).to(ids_on), wrong, idx.cuda(), p.cuda())
        with pytest.raises(StoreError, match="does not match the stored length"):
            store.flush()
        _, _, has = store.read(2, ids, lengths[ids])
        assert not has.any()  # the batch was dropped, never half-written
