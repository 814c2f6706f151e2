"""PS-KD under data-parallel training: two CPU ranks (gloo) through the real fairseq
trainer, started with fairseq_pskd.launch.

The reference is one process with the same global batches: fairseq builds one list of batches
(--max-tokens 160 gives 13 on the toy corpus), shuffles it with the same seed whatever the world
size, and deals batch i to rank i % 2; with --update-freq 2 on 2 ranks, update u trains batches
4u..4u+3, exactly the batches one process trains with --update-freq 4. 13 = 4 * 3 + 1, so in the
last update of every epoch rank 1 has no batch and runs the trainer's dummy batch (ignore_grad).
--dropout 0: dropout masks are drawn per rank, so with dropout the two runs would differ by design.
What still differs is float arithmetic: DDP all-reduces (averages) the ranks' gradients, one
process accumulates them in one buffer, and fairseq rescales by world_size / sample_size; the
results agree to ~1e-5 in the parameters after 12 updates, hence the tolerances below.
"""
import os
import re
import shutil
import sys
import time

import numpy as np
import pytest
import torch
from conftest import epoch_stats, run, run_fairseq, start, train_args

import fairseq_pskd  # noqa: F401  (registers the criterion)
from fairseq_pskd import launch
from fairseq_pskd.distributed import pack_rows, unpack_rows
from fairseq_pskd.store import TopKStore, compact_rows

MAX_TOKENS = 160  # 13 batches of the 240-sentence toy corpus: see the module docstring
ONE_BATCH = 4000  # the whole toy corpus in one batch: fewer batches than ranks
LOSS_TOL = 2e-3  # logged losses have 3 decimals; measured difference: 0 at that precision
MASS_TOL = 1e-3  # pskd_topk_mass has 4 decimals
PARAM_TOL = 2e-4  # measured max |param difference| after 12 updates: 2.5e-5 (training moves them 8e-3)
PROB_TOL = 1e-3  # stored float16 top-k probabilities; measured: <= 1 float16 ulp (3e-5)
TIMEOUT = 240

INNER_RE = re.compile(r"\| train_inner \| epoch (\d+):\s+(\d+) / \d+ (.*)")
PRIORS_RE = re.compile(r"PS-KD epoch (\d+) priors: (\d+) of (\d+) training sentences stored in (\S+) "
                       r"\((\d+) ranks, (\w+) sync, (\d+) dummy batches skipped\)")


def inner_stats(log):
    """[(epoch, step, {metric: value})] from fairseq's per-update train_inner lines."""
    out = []
    for m in INNER_RE.finditer(log):
        fields = {}
        for part in m.group(3).split(","):
            k, _, v = part.strip().partition("=")
            try:
                fields[k] = float(v)
            except ValueError:
                pass
        out.append((int(m.group(1)), int(m.group(2)), fields))
    return out


def prior_lines(log):
    """{epoch: (written, num_sentences, store path, ranks, sync, dummy batches)}."""
    return {int(m.group(1)): (int(m.group(2)), int(m.group(3)), m.group(4), int(m.group(5)),
                              m.group(6), int(m.group(7))) for m in PRIORS_RE.finditer(log)}


def no_dropout_args(data_bin, save_dir, *extra, max_tokens=MAX_TOKENS, max_epoch=3):
    """conftest's train_args with this module's settings: --dropout 0 and --max-tokens ``max_tokens``
    (after TINY_TRAIN's, so they win), 3 epochs."""
    return train_args(data_bin, save_dir, "--dropout", "0", "--max-tokens", max_tokens, *extra, max_epoch=max_epoch)


# conftest has no runner for fairseq_pskd.launch: this one builds its command line and gives
# run() this module's TIMEOUT (a hung rendezvous fails in 4 minutes, not 10)
def launched(nproc, args, *launch_args, timeout=TIMEOUT, **kw):
    return run([sys.executable, "-m", "fairseq_pskd.launch", "--nproc", nproc, *launch_args, "--", *args],
               timeout=timeout, **kw)


def summary(path):
    with TopKStore.open(path, readonly=True) as s:
        return s.summary()


def by_epoch(summ):
    return {b["epoch"]: (b["sentences_written"], b["sentences_stale"], b["header_sentences_written"])
            for b in summ["buffers"]}


def store_arrays(path):
    """{(name, buffer): bytes} of the store's array files."""
    return {(n, b): open(os.path.join(path, f"{n}.{b}.bin"), "rb").read()
            for n in ("indices", "probs", "stamps") for b in (0, 1)}


def trained_ids(data_bin, max_tokens):
    """Sentence ids fairseq's batch sampler puts in some batch, and the number of batches."""
    from fairseq import options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    args = options.parse_args_and_arch(options.get_training_parser(), [
        str(data_bin), "--arch", "transformer", "--max-tokens", str(max_tokens)])
    cfg = convert_namespace_to_omegaconf(args)
    task = tasks.setup_task(cfg.task)
    task.load_dataset("train")
    itr = task.get_batch_iterator(
        dataset=task.dataset("train"), max_tokens=max_tokens, seed=1, disable_iterator_cache=True,
        required_batch_size_multiple=cfg.dataset.required_batch_size_multiple)  # as fairseq-train
    batches = itr.frozen_batches
    ids = np.concatenate([np.asarray(b) for b in batches])
    return ids, len(batches), len(task.dataset("train"))


# ---- runs (module scope: each runs once) ----------------------------------------------------

@pytest.fixture(scope="module")
def single_uf4(toy_data_bin, tmp_path_factory):
    save = tmp_path_factory.mktemp("single_uf4")
    return save, run_fairseq("train", *no_dropout_args(toy_data_bin, save, "--update-freq", 4),
                             timeout=TIMEOUT).stdout


@pytest.fixture(scope="module")
def ddp_shared(toy_data_bin, tmp_path_factory):
    save = tmp_path_factory.mktemp("ddp_shared")
    return save, launched(2, no_dropout_args(toy_data_bin, save, "--update-freq", 2)).stdout


@pytest.fixture(scope="module")
def ddp_two_nodes(toy_data_bin, tmp_path_factory):
    """Two 'nodes' (two launchers, --nnodes 2, one rank each) with node-local store directories
    (--pskd-store-dir .../local_disk_{node}/pskd) and --pskd-store-sync all_gather."""
    save = tmp_path_factory.mktemp("ddp_two_nodes")
    port = launch.free_port()
    args = no_dropout_args(toy_data_bin, save, "--update-freq", 2, "--pskd-store-sync", "all_gather",
                           "--pskd-store-dir", save / "local_disk_{node}" / "pskd")
    procs = [start([sys.executable, "-m", "fairseq_pskd.launch", "--nproc", 1, "--nnodes", 2, "--node-rank", node,
                    "--master-addr", "127.0.0.1", "--master-port", port, "--", *args]) for node in (0, 1)]
    try:
        logs = [p.communicate(timeout=TIMEOUT)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-6000:]
    return save, logs


# ---- premises --------------------------------------------------------------------------------

def test_ddp_batching_premise(toy_data_bin):
    ids, n_batches, n_sent = trained_ids(toy_data_bin, MAX_TOKENS)
    assert n_sent == 240 and sorted(ids.tolist()) == list(range(240))  # every sentence trained
    assert n_batches == 13, "13 = 4 * 3 + 1: rank 1 runs a dummy batch in each epoch's last update"
    ids, n_batches, n_sent = trained_ids(toy_data_bin, ONE_BATCH)
    assert n_batches == 1 and sorted(ids.tolist()) == list(range(240))  # rank 1: empty shard


# ---- shared store: 2 ranks x --update-freq 2 vs 1 process x --update-freq 4 -------------------

@pytest.mark.e2e
def test_ddp_shared_store_complete_after_every_epoch(ddp_shared):
    save, log = ddp_shared
    assert "training on 2 devices" in log and "distributed init (rank 1)" in log
    priors = prior_lines(log)
    # epoch boundaries 1->2 and 2->3: after the barrier rank 0 counts what all ranks wrote
    assert sorted(priors) == [1, 2], log[-3000:]
    for e in (1, 2):
        written, total, path, ranks, sync, dummies = priors[e]
        assert (written, total, ranks, sync) == (240, 240, 2, "shared")
        assert path == str(save / "pskd_store")
        assert dummies == 1, "rank 1 must have run (and skipped) one dummy batch per epoch"
    # after training: buffer 0 holds epoch 2, buffer 1 epoch 3, each for every sentence
    summ = summary(save / "pskd_store")
    assert by_epoch(summ) == {2: (240, 0, 240), 3: (240, 0, 240)}
    train = epoch_stats(log)
    assert sorted(train) == [1, 2, 3]
    assert train[1]["pskd_coverage"] == 0.0
    # every rank read exactly what the previous epoch wrote, for every token of every batch
    assert train[2]["pskd_coverage"] == 1.0 and train[3]["pskd_coverage"] == 1.0
    assert [train[e]["num_updates"] for e in (1, 2, 3)] == [4, 8, 12]


@pytest.mark.e2e
def test_ddp_shared_matches_single_process(ddp_shared, single_uf4):
    (ddp_save, ddp_log), (one_save, one_log) = ddp_shared, single_uf4
    a, b = epoch_stats(ddp_log), epoch_stats(one_log)
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for e in (1, 2, 3):
        assert a[e]["pskd_alpha"] == b[e]["pskd_alpha"]
        assert a[e]["pskd_coverage"] == b[e]["pskd_coverage"]
        assert a[e]["num_updates"] == b[e]["num_updates"]
        assert a[e]["bsz"] == b[e]["bsz"] and a[e]["wpb"] == b[e]["wpb"]  # the same global batches
        for key in ("loss", "nll_loss"):
            assert abs(a[e][key] - b[e][key]) <= LOSS_TOL, (e, key, a[e], b[e])
    for e in (2, 3):
        assert abs(a[e]["pskd_topk_mass"] - b[e]["pskd_topk_mass"]) <= MASS_TOL, (e, a[e], b[e])
    # not vacuous: training moved the losses far more than the tolerance
    assert a[1]["loss"] - a[3]["loss"] > 100 * LOSS_TOL
    ia, ib = inner_stats(ddp_log), inner_stats(one_log)
    assert len(ia) == len(ib) == 12
    for (ea, sa, fa), (eb, sb, fb) in zip(ia, ib):
        assert (ea, sa, fa["bsz"], fa["wpb"]) == (eb, sb, fb["bsz"], fb["wpb"])
        assert abs(fa["loss"] - fb["loss"]) <= LOSS_TOL, (ea, sa, fa, fb)
    # the model and the stored priors agree far below what training changes
    pa = torch.load(ddp_save / "checkpoint_last.pt", map_location="cpu", weights_only=False)["model"]
    pb = torch.load(one_save / "checkpoint_last.pt", map_location="cpu", weights_only=False)["model"]
    p1 = torch.load(one_save / "checkpoint1.pt", map_location="cpu", weights_only=False)["model"]
    assert pa.keys() == pb.keys()
    diff = max((pa[k].float() - pb[k].float()).abs().max().item() for k in pa)
    moved = max((p1[k].float() - pb[k].float()).abs().max().item() for k in pa)
    assert diff <= PARAM_TOL and moved > 10 * PARAM_TOL, (diff, moved)
    sa, sb = store_arrays(ddp_save / "pskd_store"), store_arrays(one_save / "pskd_store")
    for buf in (0, 1):
        assert sa[("stamps", buf)] == sb[("stamps", buf)]
        ia_ = np.frombuffer(sa[("indices", buf)], np.uint16)
        ib_ = np.frombuffer(sb[("indices", buf)], np.uint16)
        assert (ia_ == ib_).mean() >= 0.99
        qa = np.frombuffer(sa[("probs", buf)], np.float16).astype(np.float32)
        qb = np.frombuffer(sb[("probs", buf)], np.float16).astype(np.float32)
        assert qa.max() > 0.1 and np.abs(qa - qb).max() <= PROB_TOL


# ---- all_gather: two nodes, each with its own store directory ----------------------------------

@pytest.mark.e2e
def test_ddp_all_gather_node_local_stores_identical_and_complete(ddp_two_nodes, ddp_shared):
    save, (log0, log1) = ddp_two_nodes
    stores = [save / f"local_disk_{n}" / "pskd" for n in (0, 1)]
    assert not (save / "pskd_store").exists()
    assert f"PS-KD store (all_gather sync): {stores[0]}; this rank writes every rank's rows" in log0
    priors = prior_lines(log0)
    assert sorted(priors) == [1, 2]
    for e in (1, 2):
        assert priors[e][:2] == (240, 240) and priors[e][2] == str(stores[0])
        assert priors[e][3:] == (2, "all_gather", 1)
    for s in stores:  # each node's own copy holds every sentence, for both epochs kept
        assert by_epoch(summary(s)) == {2: (240, 0, 240), 3: (240, 0, 240)}
    # same bytes in both copies, and the same bytes as the shared-directory run: the sync mode
    # changes where rows are written, not what is computed
    n0, n1 = store_arrays(stores[0]), store_arrays(stores[1])
    assert n0 == n1
    assert n0 == store_arrays(ddp_shared[0] / "pskd_store")
    # losses: identical to the shared-mode run (same ranks, batches and arithmetic)
    a, b = epoch_stats(log0), epoch_stats(ddp_shared[1])
    assert sorted(a) == [1, 2, 3]
    for e in (1, 2, 3):
        for key in ("loss", "nll_loss", "pskd_alpha", "pskd_coverage", "num_updates"):
            assert a[e][key] == b[e][key], (e, key, a[e], b[e])
    assert a[2]["pskd_topk_mass"] == b[2]["pskd_topk_mass"]
    assert a[3]["pskd_topk_mass"] == b[3]["pskd_topk_mass"]
    assert a[2]["pskd_coverage"] == a[3]["pskd_coverage"] == 1.0
    assert [f["loss"] for *_, f in inner_stats(log0)] == [f["loss"] for *_, f in inner_stats(ddp_shared[1])]
    assert "Traceback" not in log1


# ---- an empty shard: fewer batches than ranks --------------------------------------------------

@pytest.mark.e2e
def test_ddp_empty_shard_dummy_batches(toy_data_bin, tmp_path):
    """One batch per epoch and two ranks: rank 1 trains only the trainer's dummy batch, which
    the criterion neither reads nor writes, yet joins every all_gather. One store directory for
    both ranks: rank 0 writes, rank 1 opens it read-only. legacy_ddp, --update-freq 1.
    --save-interval 2 (the store does not depend on it): its warning is said once, not per rank."""
    one = run_fairseq("train", *no_dropout_args(toy_data_bin, tmp_path / "one", max_tokens=ONE_BATCH),
                      timeout=TIMEOUT).stdout
    save = tmp_path / "ddp"
    log = launched(2, no_dropout_args(toy_data_bin, save, "--pskd-store-sync", "all_gather",
                                      "--ddp-backend", "legacy_ddp", "--save-interval", 2,
                                      max_tokens=ONE_BATCH)).stdout
    assert log.count("PS-KD: --save-interval 2 saves a checkpoint every 2 epochs") == 1
    priors = prior_lines(log)
    assert sorted(priors) == [1, 2]
    for e in (1, 2):
        assert priors[e][:2] == (240, 240) and priors[e][3:] == (2, "all_gather", 1), priors[e]
    assert by_epoch(summary(save / "pskd_store")) == {2: (240, 0, 240), 3: (240, 0, 240)}
    a, b = epoch_stats(log), epoch_stats(one)
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for e in (1, 2, 3):
        assert a[e]["num_updates"] == b[e]["num_updates"] == e
        assert a[e]["bsz"] == b[e]["bsz"] == 240
        assert a[e]["pskd_coverage"] == b[e]["pskd_coverage"] == (0.0 if e == 1 else 1.0)
        for key in ("loss", "nll_loss"):
            assert abs(a[e][key] - b[e][key]) <= LOSS_TOL, (e, key, a[e], b[e])
    for e in (2, 3):
        assert abs(a[e]["pskd_topk_mass"] - b[e]["pskd_topk_mass"]) <= MASS_TOL


# ---- misconfiguration fails on every rank, without hanging --------------------------------------

@pytest.mark.e2e
def test_ddp_shared_sync_refuses_per_rank_directories(toy_data_bin, tmp_path):
    t0 = time.time()
    proc = launched(2, no_dropout_args(toy_data_bin, tmp_path / "ckpt", "--pskd-store-dir",
                                       tmp_path / "store_{rank}", max_epoch=1), check=False, timeout=240)
    assert proc.returncode != 0
    assert "--pskd-store-sync shared needs one store directory for all ranks" in proc.stdout
    assert "need --pskd-store-sync all_gather" in proc.stdout
    assert not (tmp_path / "store_0").exists() and not (tmp_path / "store_1").exists()
    assert time.time() - t0 < 200


# ---- pieces, in process -------------------------------------------------------------------------

@pytest.mark.parametrize("vocab", [40000, 70000])
def test_distributed_pack_unpack_roundtrip(vocab):
    """The real tokens' rows go out compact and come back compact, in the store's dtypes (what
    TopKStore.write_rows takes): nothing is padded on the way."""
    g = torch.Generator().manual_seed(0)
    B, T, k = 3, 6, 4
    lengths = torch.tensor([6, 2, 4])
    ids = np.array([17, 3, 250000])
    top_idx = torch.randint(0, vocab, (B, T, k), generator=g, dtype=torch.int32)
    top_idx[0, 0] = torch.tensor([vocab - 1, 0, 32768, 65535 % vocab])  # around the int16 wrap
    top_p = torch.rand(B, T, k, generator=g).to(torch.float16)
    idx_rows, p_rows = compact_rows(top_idx, top_p, lengths, int(lengths.sum()))
    payload, n_sent, n_tok = pack_rows(ids, lengths, idx_rows, p_rows, vocab)
    assert payload.dtype == torch.uint8 and (n_sent, n_tok) == (3, 12)
    ib = 2 if vocab <= 65536 else 4
    assert payload.numel() == 3 * 12 + 12 * k * (ib + 2)  # ids + lengths + real tokens only
    i2, l2, idx2, p2 = unpack_rows(payload.numpy(), n_sent, n_tok, k, vocab)
    assert i2.tolist() == ids.tolist() and l2.tolist() == lengths.tolist()
    assert idx2.dtype == (np.uint16 if ib == 2 else np.int32) and p2.dtype == np.float16
    assert idx2.shape == p2.shape == (12, k)
    want = torch.cat([top_idx[r, :n] for r, n in enumerate(lengths.tolist())])
    assert (idx2.astype(np.int64) == want.numpy()).all()
    assert (p2 == torch.cat([top_p[r, :n] for r, n in enumerate(lengths.tolist())]).numpy()).all()
    empty, n_sent, n_tok = pack_rows(ids[:0], lengths[:0], idx_rows[:0], p_rows[:0], vocab)
    assert empty.numel() == 0 and (n_sent, n_tok) == (0, 0)


def test_distributed_launcher_arguments():
    opts, rest = launch.parse_launch_args(["--nproc", "2", "--", "data", "--cpu"])
    assert (opts.nproc, opts.nnodes, opts.node_rank, rest) == (2, 1, 0, ["data", "--cpu"])
    for bad in (["--nproc", "2", "data"],  # no '--'
                ["--nproc", "0", "--", "data"],
                ["--nproc", "1", "--nnodes", "2", "--node-rank", "0", "--", "data"],  # no port
                ["--nproc", "1", "--nnodes", "2", "--node-rank", "2", "--master-port", "1", "--", "d"]):
        with pytest.raises(SystemExit):
            launch.parse_launch_args(bad)


@pytest.mark.e2e
def test_ddp_resume_broadcasts_checkpoint_to_other_ranks(ddp_shared, toy_data_bin, tmp_path):
    """Resume a 2-rank run: rank 0 reads checkpoint_last.pt and fairseq broadcasts it to rank 1,
    which unpickles it weights-only (torch >= 2.6): the allow-list must cover that state. On a
    copy of the shared fixture's run, which the other tests read as it is."""
    save = tmp_path / "resumed"
    shutil.copytree(ddp_shared[0], save)
    log = launched(2, no_dropout_args(toy_data_bin, save, "--update-freq", 2, max_epoch=4)).stdout
    assert "Loaded checkpoint" in log and "(epoch 4 @" in log, log[-3000:]
    train = epoch_stats(log)
    assert sorted(train) == [4]
    assert train[4]["pskd_coverage"] == 1, train[4]
    assert by_epoch(summary(save / "pskd_store"))[4][0] == 240
