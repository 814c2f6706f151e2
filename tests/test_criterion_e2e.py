"""PS-KD end to end through fairseq-train on CPU: the schedule, the coverage, an
abrupt kill during epoch 3 and a resume that reproduces the uninterrupted run, and the
equivalence with label_smoothed_cross_entropy at --pskd-alpha 0."""
import json
import re
import signal
import sys

import pytest
from conftest import LABEL_SMOOTHING, PSKD, TINY_ARCH, epoch_stats, run, run_fairseq, train_args, train_until_killed

pytestmark = pytest.mark.e2e

# Stock fairseq otherwise reuses the epoch-1 batch iterator in an uninterrupted run but builds a
# new one (other batches) after a resume, so even label_smoothed_cross_entropy would not
# reproduce its losses across a resume.
SAME_BATCHES = ["--update-epoch-batch-itr", "True"]


def pskd_args(data_bin, save_dir, max_epoch=4, *extra):
    """train_args of PS-KD with the same batches every epoch, also after a resume."""
    return train_args(data_bin, save_dir, *SAME_BATCHES, *extra, max_epoch=max_epoch)


@pytest.fixture(scope="module")
def uninterrupted(toy_data_bin, tmp_path_factory):
    save = tmp_path_factory.mktemp("pskd_full")
    proc = run_fairseq("train", *pskd_args(toy_data_bin, save))
    return save, proc.stdout


def test_schedule_and_coverage(uninterrupted):
    _, log = uninterrupted
    train = epoch_stats(log)
    assert sorted(train) == [1, 2, 3, 4]
    assert [train[e]["pskd_alpha"] for e in (1, 2, 3, 4)] == [0.2, 0.4, 0.6, 0.8]
    assert train[1]["pskd_coverage"] == 0.0
    for e in (2, 3, 4):
        assert train[e]["pskd_coverage"] >= 0.99, train[e]
        assert 0.0 < train[e]["pskd_topk_mass"] <= 1.001
    assert "pskd_topk_mass" not in train[1]  # no prior, no mass to report
    valid = epoch_stats(log, "valid")
    assert sorted(valid) == [1, 2, 3, 4]
    assert not any(k.startswith("pskd") for v in valid.values() for k in v)
    assert "schedule: a_t = a_T * epoch / 4 (--max-epoch)" in log


def test_store_inspect_after_training(uninterrupted):
    save, _ = uninterrupted
    out = run([sys.executable, "-m", "fairseq_pskd.store", "inspect", save / "pskd_store"], stderr=None)
    summary = json.loads(out.stdout)
    assert summary["topk"] == 4 and summary["num_sentences"] == 240
    by_epoch = {b["epoch"]: b["sentences_written"] for b in summary["buffers"]}
    assert by_epoch == {3: 240, 4: 240}


def test_validation_loss_is_label_smoothed(uninterrupted, toy_data_bin):
    """The logged valid loss is what label_smoothed_cross_entropy gives on the same checkpoint,
    so --best-checkpoint-metric loss compares like with like across criteria."""
    import math

    import torch
    from fairseq import checkpoint_utils
    from fairseq.criterions.label_smoothed_cross_entropy import LabelSmoothedCrossEntropyCriterion

    import fairseq_pskd  # noqa: F401

    save, log = uninterrupted
    valid = epoch_stats(log, "valid")
    models, _cfg, task = checkpoint_utils.load_model_ensemble_and_task(
        [str(save / "checkpoint_last.pt")], arg_overrides={"data": str(toy_data_bin)})
    task.load_dataset("valid")
    ls = LabelSmoothedCrossEntropyCriterion(task, sentence_avg=False, label_smoothing=0.1)
    itr = task.get_batch_iterator(dataset=task.dataset("valid"), max_tokens=400).next_epoch_itr(
        shuffle=False)
    loss = nll = ntok = 0.0
    with torch.no_grad():
        for sample in itr:
            _, _, out = task.valid_step(sample, models[0], ls)
            loss += float(out["loss"])
            nll += float(out["nll_loss"])
            ntok += out["ntokens"]
    assert abs(loss / ntok / math.log(2) - valid[4]["loss"]) <= 6e-4
    assert abs(nll / ntok / math.log(2) - valid[4]["nll_loss"]) <= 6e-4


def test_kill_during_epoch_3_and_resume_reproduces(uninterrupted, toy_data_bin, tmp_path):
    _, full_log = uninterrupted
    full = epoch_stats(full_log)
    save = tmp_path / "ckpt"
    # kill -9 at the second logged update of epoch 3
    returncode, killed_log = train_until_killed(pskd_args(toy_data_bin, save), r"epoch 003:\s+2 /")
    assert returncode == -signal.SIGKILL, killed_log[-2000:]
    assert sorted(epoch_stats(killed_log)) == [1, 2], "killed run must die inside epoch 3"

    resumed = run_fairseq("train", *pskd_args(toy_data_bin, save))
    assert "Loaded checkpoint" in resumed.stdout
    # the resumed run says it found its priors
    assert "PS-KD epoch 3 (resumed): priors of epoch 2 found for 240 of 240 sentences" in resumed.stdout
    again = epoch_stats(resumed.stdout)
    assert sorted(again) == [3, 4]
    for e in (3, 4):
        for key in ("loss", "nll_loss", "pskd_alpha", "pskd_coverage", "pskd_topk_mass"):
            assert again[e][key] == full[e][key], (e, key, again[e], full[e])


def test_alpha_zero_is_label_smoothed_cross_entropy(toy_data_bin, baseline_run, tmp_path):
    """The session's baseline (label_smoothed_cross_entropy, 2 epochs) and the same run with
    PS-KD at --pskd-alpha 0 log the same losses."""
    ls = baseline_run[1].read_text()
    pk = run_fairseq("train", *train_args(toy_data_bin, tmp_path / "pk", max_epoch=2, criterion=[
        "--criterion", "pskd_label_smoothed_cross_entropy", "--pskd-alpha", 0]))
    assert "--pskd-alpha 0: label_smoothed_cross_entropy's own function" in pk.stdout
    for kind in ("train", "valid"):
        a, b = epoch_stats(ls, kind), epoch_stats(pk.stdout, kind)
        assert sorted(a) == sorted(b) == [1, 2]
        for e in a:
            assert a[e]["loss"] == b[e]["loss"] and a[e]["nll_loss"] == b[e]["nll_loss"], (kind, e)


@pytest.mark.parametrize("prefix", [0, 1])
def test_loss_from_logits_trains_as_the_log_softmax_path(uninterrupted, toy_data_bin, tmp_path, prefix):
    """The default (--pskd-loss auto: the one-pass loss from the logits on this model) and the
    log-softmax path give the same training losses, epoch by epoch, over 4 epochs (priors from
    epoch 2 on), also with --ignore-prefix-size."""
    runs = {}
    for path in ("auto", "log_softmax"):
        if path == "auto" and prefix == 0:
            runs[path] = uninterrupted[1]
            continue
        extra = ["--pskd-loss", path] + (["--ignore-prefix-size", str(prefix)] if prefix else [])
        runs[path] = run_fairseq("train", *pskd_args(toy_data_bin, tmp_path / path, 4, *extra)).stdout
    assert "PS-KD loss: from the decoder's logits in one pass (--pskd-loss auto)" in runs["auto"]
    assert "PS-KD loss: from get_normalized_probs (--pskd-loss log_softmax)" in runs["log_softmax"]
    new, old = epoch_stats(runs["auto"]), epoch_stats(runs["log_softmax"])
    assert sorted(new) == sorted(old) == [1, 2, 3, 4]
    for epoch in new:
        for key in ("loss", "nll_loss", "pskd_coverage", "pskd_topk_mass"):
            if key in old[epoch]:
                assert new[epoch][key] == pytest.approx(old[epoch][key], abs=1e-4), (epoch, key)
    assert new[4]["pskd_coverage"] == 1


def test_adaptive_softmax_takes_the_log_softmax_path(toy_data_bin, tmp_path):
    """An adaptive softmax (--adaptive-softmax-cutoff): its output is not one logit per word, so
    --pskd-loss auto takes get_normalized_probs, said once, and --pskd-loss logits is refused.
    fairseq 0.12's adaptive softmax then fails in the backward pass with any criterion that
    trains on get_normalized_probs (its get_log_prob adds in place to a log_softmax output, which
    torch's autograd refuses): label_smoothed_cross_entropy fails the same way, shown here, so
    PS-KD behaves as the criterion it replaces (fairseq trains adaptive softmax with
    --criterion adaptive_loss)."""
    arch = [a for a in TINY_ARCH if a != "--share-all-embeddings"]

    def adaptive(name, criterion, *extra):
        return train_args(toy_data_bin, tmp_path / name, "--adaptive-softmax-cutoff", "20", *extra,
                          max_epoch=2, criterion=criterion, arch=arch)

    inplace = "modified by an inplace operation"
    proc = run_fairseq("train", *adaptive("auto", PSKD), check=False)
    assert proc.stdout.count("PS-KD loss: from TransformerModel.get_normalized_probs (an adaptive softmax") == 1
    ls = run_fairseq("train", *adaptive("ls", LABEL_SMOOTHING), check=False)
    assert ls.returncode != 0 and inplace in ls.stdout
    assert proc.returncode != 0 and inplace in proc.stdout
    refused = run_fairseq("train", *adaptive("logits", PSKD, "--pskd-loss", "logits"), check=False)
    assert refused.returncode != 0
    assert "--pskd-loss logits needs a model whose normalized probabilities" in refused.stdout


def test_store_from_another_dataset_is_refused(uninterrupted, tmp_path):
    """Pointing a run at a store built for another corpus fails before training, and says what to do."""
    from conftest import binarize, make_toy_corpus
    save, _ = uninterrupted
    other = binarize(make_toy_corpus(tmp_path / "raw", n_train=100, seed=5), tmp_path / "bin")
    proc = run_fairseq("train", *pskd_args(other, tmp_path / "ckpt", 1, "--pskd-store-dir",
                                           save / "pskd_store"), check=False)
    assert proc.returncode != 0
    assert "another dataset" in proc.stdout or "fingerprint" in proc.stdout, proc.stdout[-3000:]


def test_remainder_modes_through_fairseq_train(uninterrupted, toy_data_bin, tmp_path):
    """--pskd-remainder current (the default) and uniform train through the CLI: the same
    epoch 1 (no prior yet), then different losses from epoch 2 on (the tail's shape is the
    model's, not flat), with finite losses and full coverage."""
    _, current_log = uninterrupted
    assert "remainder=current" in current_log
    proc = run_fairseq("train", *pskd_args(toy_data_bin, tmp_path / "uni", 4,
                                           "--pskd-remainder", "uniform"))
    assert "remainder=uniform" in proc.stdout
    cur, uni = epoch_stats(current_log), epoch_stats(proc.stdout)
    assert sorted(cur) == sorted(uni) == [1, 2, 3, 4]
    assert cur[1]["loss"] == uni[1]["loss"]
    for e in (2, 3, 4):
        assert cur[e]["pskd_coverage"] >= 0.99
        assert cur[e]["loss"] == cur[e]["loss"] and cur[e]["loss"] != uni[e]["loss"], (e, cur[e], uni[e])


def test_sentences_an_epoch_leaves_out_are_counted(tmp_path):
    """fairseq 0.12 leaves out the last n mod 8 training sentences of every epoch (batch sizes
    are rounded to --required-batch-size-multiple): the epoch summary says how many and what
    to pass; with --required-batch-size-multiple 1 every sentence is trained and nothing is said."""
    from conftest import binarize, make_toy_corpus

    data = binarize(make_toy_corpus(tmp_path / "raw", n_train=100, seed=4), tmp_path / "bin")
    log = run_fairseq("train", *pskd_args(data, tmp_path / "a", 2)).stdout
    assert "PS-KD epoch 1 priors: 96 of 100 training sentences stored" in log
    assert "PS-KD epoch 1: 4 of the 100 training sentences were not trained" in log
    assert "--required-batch-size-multiple 1" in log
    log = run_fairseq("train", *pskd_args(data, tmp_path / "b", 2,
                                          "--required-batch-size-multiple", "1")).stdout
    assert "PS-KD epoch 1 priors: 100 of 100 training sentences stored" in log
    assert "were not trained" not in log


def test_mid_epoch_resume_without_update_epoch_batch_itr_warns(uninterrupted, toy_data_bin, tmp_path):
    """A kill after a mid-epoch checkpoint, resumed without --update-epoch-batch-itr True: fairseq
    rebuilds the epoch's batches differently, so the batches it skips are not the ones trained
    before the kill and some sentences go untrained in that epoch. The next epoch's start says
    how many and which flag prevents it (with the flag, as in `uninterrupted`, nothing is said)."""
    assert "were not trained" not in uninterrupted[1]
    save = tmp_path / "ckpt"
    args = [a for a in pskd_args(toy_data_bin, save, 3) if a not in ("--update-epoch-batch-itr", "True")]
    args += ["--save-interval-updates", "2"]  # mid-epoch checkpoints
    # kill -9 at the 4th update of epoch 2, after the checkpoint at its 3rd
    returncode, killed_log = train_until_killed(args, r"epoch 002:\s+4 /")
    assert returncode == -signal.SIGKILL and "checkpoint_2_8.pt" in killed_log, killed_log[-3000:]
    resumed = run_fairseq("train", *args).stdout
    assert "Loaded checkpoint" in resumed and "epoch 2 @ 8 updates" in resumed
    m = re.search(r"PS-KD epoch 2: (\d+) of the 240 training sentences were not trained", resumed)
    assert m and int(m.group(1)) > 0, resumed[-4000:]
    assert "--update-epoch-batch-itr True" in resumed
