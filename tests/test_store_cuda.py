"""The store's CUDA write path: one packed non-blocking copy, no synchronisation in the caller,
the rows read back exactly. Needs a GPU: skipped elsewhere (CI); benchmarks/gpu_check.sh runs it."""
import numpy as np
import pytest
import torch

from fairseq_pskd.store import StoreError, TopKStore
from test_store import K, V, expected, make_batch, make_lengths

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("ids_on", ["cuda", "cpu"])
def test_cuda_rows_written_without_sync_and_read_back(tmp_path, ids_on):
    lengths = make_lengths(n=64)
    ids = np.random.RandomState(1).permutation(64)[:24]
    idx, p = make_batch(lengths, ids, seed=3, width=int(lengths.max()) + 2)
    ids_t = torch.from_numpy(ids).to(ids_on)
    lengths_t = torch.from_numpy(lengths[ids]).cuda()  # as the criterion: measured on the device
    with TopKStore.create(tmp_path / "s", lengths, K, V) as store:
        torch.cuda.set_sync_debug_mode("error")  # any host<->GPU synchronisation raises
        try:
            for _ in range(3):  # the pinned buffers are recycled from the second write on
                store.write(1, ids_t, lengths_t, idx.cuda(), p.cuda())
        finally:
            torch.cuda.set_sync_debug_mode("default")
        store.flush()
        got_idx, got_p, has = store.read(2, ids, lengths[ids], max_len=idx.shape[1])
    assert has.all()
    want_idx, want_p = expected(idx, p, lengths, ids, idx.shape[1])
    torch.testing.assert_close(got_idx, want_idx)
    torch.testing.assert_close(got_p, want_p)


def test_cuda_ids_that_do_not_match_the_store_are_refused_at_flush(tmp_path):
    lengths = make_lengths(n=16)
    ids = np.arange(4)
    idx, p = make_batch(lengths, ids)
    wrong = torch.from_numpy(lengths[ids] + 1).cuda()
    with TopKStore.create(tmp_path / "s", lengths, K, V) as store:
        store.write(1, torch.from_numpy(ids).cuda(), wrong, idx.cuda(), p.cuda())
        with pytest.raises(StoreError, match="does not match the stored length"):
            store.flush()
        _, _, has = store.read(2, ids, lengths[ids])
        assert not has.any()  # the batch was dropped, never half-written
