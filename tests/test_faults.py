"""Faults the store and the criterion must survive or report clearly: a training forward pass
with inf/NaN log-probabilities (what an fp16 overflow gives; fairseq skips such a step and goes
on), a store whose files were damaged on disk after they were written (bit rot, a bad
copy), read back by the store API and by a resumed fairseq-train, two runs that use one store at
the same time (the ownership lock), a run resumed against a store another run has written since
(the run identity), options the store cannot serve (left-padded targets, sharded data), and the
a_t the epoch log gives under --max-update."""
import errno
import json
import os
import shutil
import sys
import time

import numpy as np
import pytest
import torch
from conftest import LABEL_SMOOTHING, PSKD, REPO, epoch_stats, run_fairseq, start, train_args

from fairseq_pskd import store as store_mod
from fairseq_pskd.store import StoreError, TopKStore
from fairseq_pskd.store import lock as store_lock
from fairseq_pskd.store.staging import compact_rows
from fairseq_pskd.store.writer import WriteJob

K = 4
V = 1000


def softmax_topk(lengths, ids, seed, vocab=V, k=K):
    """(indices, probs) as the criterion stores them: the top-k of real distributions."""
    g = torch.Generator().manual_seed(seed)
    T = int(lengths[ids].max())
    lp = (3 * torch.randn(len(ids), T, vocab, generator=g)).log_softmax(-1)
    top_lp, top_idx = lp.topk(k, -1)
    return top_idx, top_lp.exp()


def lengths_and_store(path, n=20, vocab=V, seed=0):
    lengths = np.random.RandomState(seed).randint(2, 9, size=n).astype(np.int64)
    return lengths, TopKStore.create(path, lengths, K, vocab)


def written_store(tmp_path, vocab=V):
    """A closed store whose buffer 1 holds epoch 1's priors for every sentence."""
    lengths, s = lengths_and_store(tmp_path / "s", vocab=vocab)
    ids = np.arange(len(lengths))
    with s:
        s.write(1, ids, lengths, *softmax_topk(lengths, ids, seed=1))  # ids < 1000 <= vocab
        s.end_epoch(1)
    return tmp_path / "s", lengths


def corrupt(path, name, sentence, position, column, value):
    """Overwrite one stored value of ``sentence`` in ``name`` (probs.B.bin / indices.B.bin)."""
    with TopKStore.open(path, readonly=True) as s:
        row = int(np.asarray(s.lengths[:sentence], dtype=np.int64).sum()) + position
        num_tokens, k = s.num_tokens, s.topk
        dtype = np.dtype(s.summary()["index_dtype"]) if name.startswith("indices") else np.float16
    m = np.memmap(os.path.join(path, name), dtype=dtype, mode="r+", shape=(num_tokens, k))
    m[row, column] = value
    m.flush()
    del m


# ------------------------------------------------------------------------------ write side, store API

def test_nonfinite_rows_are_dropped_and_counted(tmp_path):
    lengths, s = lengths_and_store(tmp_path / "s")
    ids = np.arange(len(lengths))
    idx, p = softmax_topk(lengths, ids, seed=2)
    with s:
        s.write(1, ids, lengths, idx, p)  # every sentence written once (stamp 1)...
        s.flush()
        s.skip_nonfinite = True
        bad = p.clone()
        bad[3, 0, 0] = float("nan")
        bad[5, int(lengths[5]) - 1, 2] = float("inf")
        bad[6, int(lengths[6]), 0] = float("nan")  # padding: ignored
        s.write(1, ids, lengths, idx, bad)  # ...then again, with two sentences non-finite
        s.flush()  # nothing raised
        assert s.skipped_nonfinite(1) == 2 and s.skipped_nonfinite(2) == 0
        ri, rp, has = s.read(2, ids, lengths, max_mass=1.01)
        # the two keep no prior, not even the one written earlier in the epoch
        assert has.tolist() == [i not in (3, 5) for i in ids]
        assert torch.isfinite(rp).all()
        n6 = int(lengths[6])
        assert torch.equal(rp[6, :n6], p[6, :n6].half().float())
        s.end_epoch(1)
        assert s.summary()["buffers"][1]["sentences_written"] == len(ids) - 2

        # the CUDA path's job (ids/lengths from the device, checked after the copy) drops the same way
        rows = compact_rows(idx.to(torch.int32), bad.half(), torch.as_tensor(lengths), int(lengths.sum()))
        job = WriteJob(0, 2, ids, lengths, rows[0].numpy(), rows[1].numpy(), None, [], validated=False,
                       skip_nonfinite=True)
        s._maps.apply(job)
        assert s.skipped_nonfinite(2) == 2
        assert s.read(3, ids, lengths)[2].tolist() == [i not in (3, 5) for i in ids]

        # a finite value outside [0, 1] is still the caller's mistake (logits), skip or not
        s.write(2, ids, lengths, idx, torch.randn(p.shape) * 5)
        with pytest.raises(StoreError, match=r"must be finite and within \[0, 1\].*not logits"):
            s.flush()
        # without skip_nonfinite, inf/NaN is refused like any bad value (the store's default)
        s.skip_nonfinite = False
        s.write(2, ids, lengths, idx, bad)
        with pytest.raises(StoreError, match=r"must be finite and within \[0, 1\], got e.g. nan"):
            s.flush()


# ------------------------------------------------------------------------------ write side, fairseq-train

INJECT = """
from fairseq_cli.train import cli_main  # first: its logging set-up, as under python -m fairseq_cli.train

import torch
from fairseq.models.transformer import transformer_decoder

N, GRADIENT = {n}, {gradient}
calls = [0]
output_layer = transformer_decoder.TransformerDecoderBase.output_layer


def inject(self, features):
    out = output_layer(self, features)
    if self.training:
        calls[0] += 1
        if calls[0] == N:  # +inf logits for the first sentence of the N-th training forward pass
            if GRADIENT:  # NaN reaches the gradients too
                out = out + torch.zeros_like(out).index_fill_(0, torch.tensor([0]), float("inf"))
            else:  # only the forward pass: the values are replaced, the gradient stays finite
                out = out.clone()
                out[0] = float("inf")
            print("INJECTED inf logits into training forward", N, flush=True)
    return out


transformer_decoder.TransformerDecoderBase.output_layer = inject
cli_main()
"""


def train_with_injection(tmp_path, data_bin, gradient, max_epoch, criteria=("ls", "pskd")):
    """fairseq-train with label_smoothed_cross_entropy ("ls") and with pskd, side by side, each
    with inf logits in the 3rd training forward pass (epoch 1 of the toy corpus has 5 batches)."""
    script = tmp_path / "inject_train.py"
    script.write_text(INJECT.format(n=3, gradient=gradient))
    runs = {name: {"ls": LABEL_SMOOTHING, "pskd": PSKD}[name] for name in criteria}
    procs = {name: start([sys.executable, script, *train_args(data_bin, tmp_path / name, max_epoch=max_epoch,
                                                              criterion=criterion)])
             for name, criterion in runs.items()}  # both at once: most of a run is start-up
    out = {name: p.communicate(timeout=300)[0] for name, p in procs.items()}
    for name, log in out.items():
        assert "INJECTED inf logits" in log, (name, log[-3000:])
    return {name: (procs[name].returncode, out[name]) for name in runs}


@pytest.mark.e2e
def test_nonfinite_forward_pass_does_not_stop_training(toy_data_bin, tmp_path):
    """The step fairseq goes on after (loss nan, finite gradients) is not fatal to PS-KD: the
    sentence keeps no prior for that epoch, the summary counts it, the store holds no inf/NaN,
    and only the next epoch trains with coverage < 1."""
    runs = train_with_injection(tmp_path, toy_data_bin, gradient=False, max_epoch=3)
    (ls_rc, ls_log), (rc, log) = runs["ls"], runs["pskd"]
    assert ls_rc == rc == 0, log[-4000:]
    assert epoch_stats(ls_log)[1]["loss"] != epoch_stats(ls_log)[1]["loss"]  # the nan reached the loss
    assert "PS-KD epoch 1 priors: 239 of 240 training sentences stored" in log, log[-4000:]
    assert "PS-KD epoch 1 priors: 1 sentences skipped for non-finite values" in log
    assert ("PS-KD epoch 2 priors: 240 of 240" in log
            and "skipped for non-finite" not in log.split("PS-KD epoch 2 priors")[1])
    train = epoch_stats(log)
    assert sorted(train) == [1, 2, 3]
    assert train[1]["pskd_coverage"] == 0.0
    assert 0.95 < train[2]["pskd_coverage"] < 1.0, train[2]
    assert train[3]["pskd_coverage"] == 1.0, train[3]
    path = tmp_path / "pskd" / "pskd_store"
    with TopKStore.open(path, readonly=True) as s:
        for b in (0, 1):
            probs = np.memmap(os.path.join(path, f"probs.{b}.bin"), dtype=np.float16, mode="r",
                              shape=(s.num_tokens, s.topk))
            assert np.isfinite(probs).all()
            del probs
        assert {b["epoch"]: b["sentences_written"] for b in s.summary()["buffers"]} == {2: 240, 3: 240}


@pytest.mark.e2e
def test_nonfinite_gradients_fail_with_fairseq_own_error(toy_data_bin, tmp_path):
    """When the NaN reaches the gradients, fp32 fairseq stops with 'gradients are Nan/Inf' (exit
    status 1; label_smoothed_cross_entropy too, measured with the same injection): PS-KD stops
    the same way, with fairseq's error, not one of its own, and still reports the sentence."""
    (rc, log), = train_with_injection(tmp_path, toy_data_bin, gradient=True, max_epoch=1,
                                      criteria=("pskd",)).values()
    assert rc == 1, log[-4000:]
    assert "FloatingPointError: gradients are Nan/Inf" in log
    assert "StoreError" not in log and "terminate called" not in log
    assert "PS-KD epoch 1 priors: 1 sentences skipped for non-finite values" in log  # reported at exit


# ------------------------------------------------------------------------------ read side, store API

@pytest.mark.parametrize("value", [3.0, float("nan"), float("inf"), -0.5])
def test_corrupt_probability_is_refused_on_read(tmp_path, value):
    path, lengths = written_store(tmp_path)
    corrupt(path, "probs.1.bin", sentence=7, position=2, column=1, value=value)
    with TopKStore.open(path, readonly=True) as s:
        ids = np.array([2, 7, 11])
        with pytest.raises(StoreError) as e:
            s.read(2, ids)
        msg = str(e.value)
        assert f"{os.path.join(path, 'probs.1.bin')} is corrupt" in msg
        assert "sentence id 7, target position 2" in msg and "not within [0, 1]" in msg
        assert f"delete {path} and resume" in msg
        s.read(2, np.array([2, 11]))  # the other sentences read fine


def test_valid_rows_still_read_after_the_fast_check_fails(tmp_path):
    """-0.0 is a valid stored probability whose bits fail the quick bound: the row-by-row check
    lets it through."""
    path, lengths = written_store(tmp_path)
    corrupt(path, "probs.1.bin", sentence=3, position=0, column=3, value=-0.0)
    with TopKStore.open(path, readonly=True) as s:
        _, rp, has = s.read(2, np.arange(len(lengths)), max_mass=1.01)
        assert has.all() and rp[3, 0, 3] == 0


def test_top_k_mass_above_one_is_refused_with_max_mass(tmp_path):
    path, lengths = written_store(tmp_path)
    ids = np.arange(len(lengths))
    with TopKStore.open(path, readonly=True) as s:
        _, rp, has = s.read(2, ids, max_mass=1.01)  # real top-k rows pass, float16 rounding included
        assert has.all() and float(rp.sum(-1).max()) <= 1.01
    corrupt(path, "probs.1.bin", sentence=4, position=0, column=0, value=1.0)  # each value in [0, 1]
    with TopKStore.open(path, readonly=True) as s:
        s.read(2, ids)  # the store alone cannot tell: any value in [0, 1] is a valid write
        with pytest.raises(StoreError, match=r"probs\.1\.bin is corrupt: .*sentence id 4, target position 0, "
                                             r"holds a set of top-4 probabilities summing to 1\.\d+, above 1\.01"):
            s.read(2, ids, max_mass=1.01)


@pytest.mark.parametrize("vocab,value", [(V, 60000), (70000, -5)])
def test_out_of_range_index_is_refused_on_read(tmp_path, vocab, value):
    path, lengths = written_store(tmp_path, vocab=vocab)
    corrupt(path, "indices.1.bin", sentence=9, position=1, column=3, value=value)
    with TopKStore.open(path, readonly=True) as s:
        with pytest.raises(StoreError, match=rf"indices\.1\.bin is corrupt: .*sentence id 9, "
                                             rf"target position 1, holds a vocabulary id {value}, "
                                             rf"outside \[0, vocab_size={vocab}\).*delete"):
            s.read(2, np.arange(len(lengths)))


# ------------------------------------------------------------------------------ read side, fairseq-train

@pytest.fixture(scope="module")
def one_epoch(toy_data_bin, tmp_path_factory):
    """A finished 1-epoch PS-KD run: buffer 1 holds epoch 1's priors, read by epoch 2."""
    save = tmp_path_factory.mktemp("one_epoch")
    run_fairseq("train", *train_args(toy_data_bin, save, max_epoch=1))
    return save


@pytest.mark.e2e
@pytest.mark.parametrize("name,value,what", [("probs.1.bin", 3.0, "probability 3.0"),
                                             ("indices.1.bin", 60000, "vocabulary id 60000")])
def test_resume_with_a_corrupt_store_stops_with_a_clear_error(one_epoch, toy_data_bin, tmp_path, name, value, what):
    save = tmp_path / "ckpt"
    shutil.copytree(one_epoch, save)
    corrupt(save / "pskd_store", name, sentence=17, position=0, column=0, value=value)
    proc = run_fairseq("train", *train_args(toy_data_bin, save, max_epoch=2), check=False)
    log = proc.stdout
    assert "Loaded checkpoint" in log
    # exit status 1, not the SIGABRT that stock fairseq's data-buffer thread may cause at exit
    # after an error (fairseq_pskd/compat.py, benchmarks/exit_after_error.py)
    assert proc.returncode == 1, log[-4000:]
    assert "terminate called" not in log
    assert f"StoreError: {save / 'pskd_store' / name} is corrupt" in log, log[-4000:]
    assert f"sentence id 17, target position 0, holds a {what}" in log
    assert "lprobs.gather" not in log and "out of bounds" not in log  # not torch's error


# ------------------------------------------------------------------------------ ownership lock, store API

HOLDER = """
import os, sys, time
sys.path.insert(0, {repo!r})
from fairseq_pskd.store import TopKStore
s = TopKStore.open({path!r}, owner="the killed holder")  # writable: locked
child = os.fork()
if child == 0:  # like a DataLoader worker forked by fairseq: it inherits the open store
    time.sleep(120)
    os._exit(0)
print(os.getpid(), child, flush=True)
time.sleep(120)
"""


@pytest.mark.e2e
def test_lock_is_released_when_the_holder_is_killed(tmp_path):
    """A process that has the store open for writing locks it; another process is refused at once
    with the holder named, can still open it readonly, and opens it as soon as the holder is
    killed with SIGKILL (nothing to clean up), even though the holder's forked child lives on."""
    path, lengths = written_store(tmp_path)
    script = HOLDER.format(repo=str(REPO), path=str(path))
    proc = start([sys.executable, "-c", script], stderr=None)
    child = None
    try:
        pid, child = map(int, proc.stdout.readline().split())
        assert pid == proc.pid
        assert store_mod.lock_holder(path)["pid"] == proc.pid
        with pytest.raises(store_mod.StoreLockedError) as e:
            TopKStore.open(path)
        msg = str(e.value)
        assert f"the PS-KD store at {path} is in use by pid {proc.pid} on host" in msg, msg
        assert "the killed holder" in msg and "Two training runs must not share a store" in msg
        assert e.value.holder["pid"] == proc.pid
        with TopKStore.open(path, readonly=True) as s:  # readers are never locked out
            assert s.read(2, np.arange(3))[2].all() and not s.locked
        proc.kill()  # SIGKILL
        proc.wait(timeout=30)
        os.kill(child, 0)  # the forked child still runs...
        assert store_mod.lock_holder(path) is None  # ...and does not hold the lock
        with TopKStore.open(path, lengths, K, V) as s:
            assert s.locked and s.read(2, np.arange(len(lengths)))[2].all()  # the priors are intact
            assert store_mod.lock_holder(path)["pid"] == os.getpid()
            with pytest.raises(store_mod.StoreLockedError, match="already open for writing in this process"):
                TopKStore.open_or_create(path, lengths, K, V)
        assert store_mod.lock_holder(path) is None  # close() unlocks
    finally:
        for p in (proc.pid, child):
            if p:
                try:
                    os.kill(p, 9)
                except ProcessLookupError:
                    pass
        proc.wait(timeout=30)


@pytest.mark.parametrize("err", [errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP])
def test_filesystem_without_locks_warns_and_goes_on(tmp_path, monkeypatch, caplog, err):
    """flock unsupported (Lustre without -o flock: ENOSYS; NFS without lockd: ENOLCK): the store
    is used unprotected, with a warning that says so."""
    lengths = np.random.RandomState(0).randint(2, 9, size=20)

    def no_flock(fd, op):
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(store_lock.fcntl, "flock", no_flock)
    with caplog.at_level("WARNING", logger="fairseq_pskd.store"):
        with TopKStore.open_or_create(tmp_path / "s", lengths, K, V) as s:
            assert not s.locked
            s.write(1, np.arange(20), lengths, *softmax_topk(lengths, np.arange(20), seed=3))
            s.end_epoch(1)
    assert "cannot lock it" in caplog.text and "NOT protected against a second run" in caplog.text
    with TopKStore.open(tmp_path / "s") as s:  # and a second open goes on too
        assert s.read(2, np.arange(20))[2].all()


# ------------------------------------------------------------------------------ ownership lock, fairseq-train

HOLD_AFTER_OPEN = """
from fairseq_cli.train import cli_main  # first: its logging set-up, as under python -m fairseq_cli.train

import os, time
from fairseq_pskd import criterion

begin_epoch = criterion.PSKDLabelSmoothedCrossEntropyCriterion.begin_epoch


def hold(self, epoch):
    begin_epoch(self, epoch)  # opens (and locks) the store
    if epoch == 1:  # keep it open until the test says so: the other run is sure to meet it
        print("HOLDING THE STORE", flush=True)
        deadline = time.time() + 200
        while not os.path.exists({release!r}) and time.time() < deadline:
            time.sleep(0.1)


criterion.PSKDLabelSmoothedCrossEntropyCriterion.begin_epoch = hold
cli_main()
"""


@pytest.mark.e2e
def test_two_runs_started_at_once_on_one_store(toy_data_bin, tmp_path):
    """Two fairseq-train runs started together with the same --pskd-store-dir: the one that opens
    the store second stops at once (exit status 1, before any training step) naming the other's
    pid; the other trains to the end. The first holds the store in epoch 1 until the second has
    stopped (a pause added by the wrapper script), so which run wins may vary, the outcome not."""
    store = tmp_path / "shared_store"
    script = tmp_path / "hold.py"
    script.write_text(HOLD_AFTER_OPEN.format(release=str(tmp_path / "release")))
    procs = [start([sys.executable, script, *train_args(toy_data_bin, tmp_path / name, "--pskd-store-dir", store,
                                                        max_epoch=2)])
             for name in ("a", "b")]
    try:
        deadline = time.time() + 300
        while all(p.poll() is None for p in procs) and time.time() < deadline:
            time.sleep(0.2)
        loser = next(i for i, p in enumerate(procs) if p.poll() is not None)
        winner = 1 - loser
        assert procs[winner].poll() is None  # still training: it held the store all along
        (tmp_path / "release").touch()
        logs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        (tmp_path / "release").touch()
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    lost, won = logs[loser], logs[winner]
    assert procs[loser].returncode == 1, lost[-4000:]
    assert (f"StoreLockedError: the PS-KD store at {store} is in use by pid {procs[winner].pid} on "
            f"host") in lost, lost[-4000:]
    assert f"save dir {tmp_path / 'ab'[winner]}" in lost  # the holder's own description
    assert "train_inner" not in lost and "HOLDING THE STORE" not in lost  # stopped before training
    assert procs[winner].returncode == 0, won[-4000:]
    assert sorted(epoch_stats(won)) == [1, 2] and epoch_stats(won)[2]["pskd_coverage"] == 1.0
    assert store_mod.lock_holder(store) is None


# ------------------------------------------------------------------------------ run identity, fairseq-train

def header_run_id(store):
    with open(os.path.join(store, "header.json")) as f:
        return json.load(f)["run_id"]


@pytest.mark.e2e
def test_resume_refuses_a_store_another_run_has_written(toy_data_bin, tmp_path):
    """Run A trains 2 epochs. A new run B given A's store directory stops before training (exit
    status 1), naming A's save dir and last epoch, and leaves A's priors as they were. Once that
    store is deleted (what the message says), B trains 1 epoch there; A, resumed for epoch 3, then
    stops instead of training on B's priors, naming the store and what to do. Doing that (deleting
    the store again) resumes A: epoch 3 trains without priors (a warning says so) and stores A's
    own for epoch 4."""
    store = tmp_path / "store"
    run_a = train_args(toy_data_bin, tmp_path / "a", "--pskd-store-dir", store, max_epoch=2)
    run_fairseq("train", *run_a)
    id_a = header_run_id(store)
    ckpt = torch.load(tmp_path / "a" / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    assert len(id_a) == 32 and ckpt["extra_state"]["train_iterator"]["pskd_run_id"] == id_a

    run_b = train_args(toy_data_bin, tmp_path / "b", "--pskd-store-dir", store, max_epoch=1)
    proc = run_fairseq("train", *run_b, check=False)
    assert proc.returncode == 1, proc.stdout[-4000:]
    assert (f"StoreError: the PS-KD store at {store} holds the priors of another training run (run "
            f"{id_a}, save dir {tmp_path / 'a'}, priors up to epoch 2). This new run would reset them"
            ) in proc.stdout, proc.stdout[-4000:]
    assert f"Give this run its own --pskd-store-dir, or, if that run's priors are no longer needed, delete {store}" \
        in proc.stdout
    assert "train_inner" not in proc.stdout
    assert header_run_id(store) == id_a
    with TopKStore.open(store, readonly=True) as s:
        assert s.sentences_written(2) == 240 and s.run_save_dir == str(tmp_path / "a")

    shutil.rmtree(store)  # what the message says
    run_fairseq("train", *run_b)
    id_b = header_run_id(store)
    assert id_b not in (None, id_a)

    resume_a = train_args(toy_data_bin, tmp_path / "a", "--pskd-store-dir", store, max_epoch=3)
    proc = run_fairseq("train", *resume_a, check=False)
    log = proc.stdout
    assert "Loaded checkpoint" in log
    assert proc.returncode == 1, log[-4000:]
    assert (f"StoreError: the PS-KD store at {store} holds the priors of another training run (run "
            f"{id_b}, save dir {tmp_path / 'b'}, priors up to epoch 1), not of the run this checkpoint "
            f"belongs to (run {id_a})") in log, log[-4000:]
    assert f"Delete {store} (it is only a cache" in log and "or pass a new --pskd-store-dir" in log
    assert "train_inner" not in log.split("Loaded checkpoint")[1]  # no step trained on B's priors
    assert header_run_id(store) == id_b  # B's store left as it was

    shutil.rmtree(store)  # what the message says
    log = run_fairseq("train", *resume_a).stdout
    assert (f"PS-KD epoch 3: the store at {store} holds no priors of epoch 2 (a new or emptied store), "
            f"so this epoch trains against the label-smoothed target alone") in log, log[-4000:]
    train = epoch_stats(log)
    assert sorted(train) == [3] and train[3]["pskd_coverage"] == 0.0
    assert header_run_id(store) == id_a  # A's store again, with A's epoch-3 priors
    with TopKStore.open(store, readonly=True) as s:
        assert s.sentences_written(3) == 240


# ------------------------------------------------------------------------------ options the store cannot serve

@pytest.mark.e2e
def test_left_padded_targets_and_sharded_data_are_refused(toy_data_bin, tmp_path):
    """--left-pad-target (priors would land on the wrong positions) and sharded data a:b (the
    training set changes every epoch) stop fairseq-train before training, with the option named
    and what to do."""
    runs = {
        "left_pad": train_args(toy_data_bin, tmp_path / "lp", "--left-pad-target", max_epoch=2),
        "sharded": train_args(f"{toy_data_bin}{os.pathsep}{toy_data_bin}", tmp_path / "sh", max_epoch=2),
    }
    procs = {name: start([sys.executable, "-m", "fairseq_cli.train", *args])
             for name, args in runs.items()}  # both at once: all of each run is start-up
    logs = {name: p.communicate(timeout=300)[0] for name, p in procs.items()}
    for name, p in procs.items():
        assert p.returncode == 1, logs[name][-4000:]
        assert "train_inner" not in logs[name]
    assert ("ValueError: --left-pad-target: PS-KD stores one prior per target position of a "
            "right-padded target") in logs["left_pad"], logs["left_pad"][-4000:]
    assert "drop --left-pad-target" in logs["left_pad"]
    assert "ValueError: PS-KD needs the same training set every epoch" in logs["sharded"], logs["sharded"][-4000:]
    assert "(2 shards" in logs["sharded"] and "binarise the shards into one data directory" in logs["sharded"]
    assert not (tmp_path / "lp" / "pskd_store").exists() and not (tmp_path / "sh" / "pskd_store").exists()


# ------------------------------------------------------------------------------ a_t under --max-update

@pytest.mark.e2e
def test_epoch_log_gives_a_t_at_the_epoch_first_update(toy_data_bin, tmp_path):
    """With --max-update and no --max-epoch, a_t grows per update: the start-of-epoch log gives it
    at the epoch's first update (not at update 1 of the run), also after a resume."""
    def args(max_update):
        return train_args(toy_data_bin, tmp_path / "u", "--max-update", max_update, max_epoch=None)

    log = run_fairseq("train", *args(12)).stdout
    train = epoch_stats(log)
    assert sorted(train) == [1, 2, 3] and train[1]["num_updates"] == 5 and train[2]["num_updates"] == 10
    for epoch, first in ((1, 1), (2, 6), (3, 11)):
        line = f"PS-KD epoch {epoch}: a_t = {0.8 * first / 12:.4f} from update {first} of --max-update 12"
        assert line in log, (line, log[-4000:])
    # resumed inside epoch 3 (fairseq stopped it at update 12): the first update after the resume
    log = run_fairseq("train", *args(14)).stdout
    assert "PS-KD epoch 3: a_t = {:.4f} from update 13 of --max-update 14".format(0.8 * 13 / 14) in log, log[-4000:]
