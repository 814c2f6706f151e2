"""The criterion inside a real fairseq task and model, in process: what it stores, what it reads,
what it trains against, and that validation never touches the store."""
import threading

import numpy as np
import pytest
import torch
from _reference import dense_loss, dense_prior
from conftest import TINY_ARCH, USER_DIR
from fairseq import options, tasks
from fairseq.criterions.label_smoothed_cross_entropy import label_smoothed_nll_loss
from fairseq.dataclass.utils import convert_namespace_to_omegaconf

import fairseq_pskd  # noqa: F401  (registers the criterion)
from fairseq_pskd.task_hooks import HOST_IDS


class BackwardOnly:
    """The part of a fairseq optimizer that task.train_step uses."""

    def backward(self, loss):
        loss.backward()


def build(data_bin, save_dir, *extra):
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, [
        str(data_bin), "--user-dir", USER_DIR, *TINY_ARCH, "--dropout", "0", "--cpu",
        "--save-dir", str(save_dir), "--max-epoch", "4", "--max-tokens", "400", "--seed", "1",
        "--criterion", "pskd", *map(str, extra)])
    cfg = convert_namespace_to_omegaconf(args)
    torch.manual_seed(1)
    task = tasks.setup_task(cfg.task)
    task.load_dataset("train")
    task.load_dataset("valid")
    model = task.build_model(cfg.model)
    criterion = task.build_criterion(cfg.criterion)
    return task, model, criterion


def batches(task, split="train", epoch=1):
    itr = task.get_batch_iterator(dataset=task.dataset(split), max_tokens=400, seed=1,
                                  epoch=epoch).next_epoch_itr(shuffle=False)
    return list(itr)


@pytest.mark.parametrize("prefix,remainder", [(0, "uniform"), (1, "uniform"), (1, "current")])
def test_priors_written_read_and_trained_against(toy_data_bin, tmp_path, prefix, remainder):
    task, model, crit = build(toy_data_bin, tmp_path, "--pskd-alpha", "0.8", "--pskd-topk", "4",
                              "--label-smoothing", "0.1", "--ignore-prefix-size", prefix,
                              "--pskd-remainder", remainder)
    opt = BackwardOnly()
    pad = task.target_dictionary.pad()
    model.train()

    task.begin_epoch(1, model)
    first = batches(task)
    expected = {}  # sentence id -> (top-4 indices, probs) the model gave in epoch 1
    for i, sample in enumerate(first):
        _, _, log = task.train_step(sample, model, crit, opt, update_num=i)
        assert log["pskd_covered"] == 0  # epoch 1 has no prior
        with torch.no_grad():
            lp = model.get_normalized_probs(model(**sample["net_input"]), log_probs=True)
        top_lp, top_idx = lp.topk(4, -1)
        for row, sid in enumerate(sample["id"].tolist()):
            n = int(sample["target"][row].ne(pad).sum())
            expected[sid] = (top_idx[row, :n], top_lp[row, :n].exp())
        model.zero_grad()

    task.begin_epoch(2, model)
    assert crit.alpha() == pytest.approx(0.8 * 2 / 4)
    sample = batches(task)[0]
    ids = sample["id"]
    lengths = sample["target"].ne(pad).sum(1)
    idx, probs, has = crit.store.read(2, ids, lengths, max_len=sample["target"].size(1))
    assert has.all()
    for row, sid in enumerate(ids.tolist()):
        n = int(lengths[row])
        # no dropout, no update in between: the stored prior is the model's own top-k (fp16)
        torch.testing.assert_close(idx[row, :n].long(), expected[sid][0].long())
        torch.testing.assert_close(probs[row, :n].float(), expected[sid][1].half().float(), rtol=0, atol=1e-3)
        assert torch.all(probs[row, n:] == 0)

    loss, _, log = task.train_step(sample, model, crit, opt, update_num=len(first))
    with torch.no_grad():
        lp = model.get_normalized_probs(model(**sample["net_input"]), log_probs=True).float()
    tgt = sample["target"][:, prefix:]
    lp = lp[:, prefix:].reshape(-1, lp.size(-1))
    prior = dense_prior(idx[:, prefix:].reshape(-1, 4), probs[:, prefix:].reshape(-1, 4), lp.size(-1),
                        remainder, lp)
    ref, _ = dense_loss(lp, tgt.reshape(-1), 0.4, 0.1, prior, has.unsqueeze(1).expand_as(tgt).reshape(-1),
                        pad=pad)
    torch.testing.assert_close(loss.detach().double(), ref, rtol=1e-5, atol=1e-4)
    n_tok = int(tgt.ne(pad).sum())
    assert int(log["pskd_covered"]) == n_tok == int(log["pskd_ntokens"])
    crit.close()


def test_validation_never_touches_the_store(toy_data_bin, tmp_path):
    task, model, crit = build(toy_data_bin, tmp_path, "--pskd-alpha", "0.8", "--label-smoothing", "0.1")
    task.begin_epoch(2, model)  # an epoch whose prior read would be live
    calls = []
    real_read, real_write = crit.store.read, crit.store.write
    crit.store.read = lambda *a, **k: calls.append("read") or real_read(*a, **k)
    crit.store.write = lambda *a, **k: calls.append("write") or real_write(*a, **k)
    pad = task.target_dictionary.pad()
    for sample in batches(task, "valid"):
        loss, _, log = task.valid_step(sample, model, crit)
        with torch.no_grad():
            lp = model.get_normalized_probs(model(**sample["net_input"]), log_probs=True)
        ref, ref_nll = label_smoothed_nll_loss(lp.view(-1, lp.size(-1)), sample["target"].view(-1),
                                               0.1, ignore_index=pad)
        torch.testing.assert_close(loss, ref)
        torch.testing.assert_close(log["nll_loss"], ref_nll)
        assert not any(k.startswith("pskd_") for k in log)
    # a training-mode forward outside train_step (e.g. a user's eval in train mode) does not either
    model.train()
    with torch.no_grad():
        crit(model, batches(task, "valid")[0])
    assert calls == []
    crit.close()


def test_dummy_batch_neither_reads_nor_writes(toy_data_bin, tmp_path):
    task, model, crit = build(toy_data_bin, tmp_path, "--pskd-alpha", "0.8")
    task.begin_epoch(1, model)
    sample = batches(task)[0]
    task.train_step(sample, model, crit, BackwardOnly(), update_num=0, ignore_grad=True)
    crit.flush()
    summary = crit.store.summary()
    assert all(b["sentences_written"] == 0 for b in summary["buffers"]), summary
    task.train_step(sample, model, crit, BackwardOnly(), update_num=0)
    crit.flush()
    written = crit.store.summary()["buffers"][1]["sentences_written"]
    assert written == sample["id"].numel()
    crit.close()


def test_update_schedule_when_no_max_epoch(toy_data_bin, tmp_path):
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, [
        str(toy_data_bin), "--user-dir", USER_DIR, *TINY_ARCH, "--cpu", "--save-dir", str(tmp_path),
        "--max-update", "10", "--criterion", "pskd", "--pskd-alpha", "0.5"])
    cfg = convert_namespace_to_omegaconf(args)
    task = tasks.setup_task(cfg.task)
    crit = task.build_criterion(cfg.criterion)
    assert crit.schedule == "update"
    assert crit.alpha(update_num=4) == pytest.approx(0.5 * 5 / 10)
    assert crit.alpha(update_num=9) == pytest.approx(0.5)


@pytest.mark.parametrize("bad,message", [
    (["--pskd-alpha", "1.5"], "--pskd-alpha must be in"),
    (["--pskd-topk", "0"], "--pskd-topk must be"),
    (["--pskd-topk", "100000"], "exceeds the target vocabulary"),
])
def test_bad_options_are_refused(toy_data_bin, tmp_path, bad, message):
    with pytest.raises(ValueError, match=message):
        build(toy_data_bin, tmp_path, *bad)


def test_new_run_forgets_priors_left_in_a_reused_store_dir(toy_data_bin, tmp_path):
    """A fresh run (epoch 1) in a directory that holds an earlier run's store must not read
    that run's epoch-1 priors in its epoch 2."""
    task, model, crit = build(toy_data_bin, tmp_path, "--pskd-alpha", "0.8")
    task.begin_epoch(1, model)
    sample = batches(task)[0]
    task.train_step(sample, model, crit, BackwardOnly(), update_num=0)
    crit.close()  # the earlier run wrote epoch-1 priors for one batch

    task, model, crit = build(toy_data_bin, tmp_path, "--pskd-alpha", "0.8")  # same store dir
    task.begin_epoch(1, model)  # a new run: trains nothing in epoch 1 here
    task.begin_epoch(2, model)
    pad = task.target_dictionary.pad()
    _, _, has = crit.store.read(2, sample["id"], sample["target"].ne(pad).sum(1))
    assert not has.any()
    crit.close()


# ---- no device synchronisation in the training step ------------------------------------------

class MetaModel:
    """The two model methods compute_loss uses, for a network output on the 'meta' device.

    Meta tensors have shapes but no values: any read of a value back to the host (.cpu(),
    .item(), .tolist(), bool(t), a host copy) raises. On a GPU each of those is a
    synchronisation that stalls it; here it is an error, so the tests below can see one."""

    training = True  # a training forward pass

    def get_normalized_probs(self, net_output, log_probs):
        return torch.log_softmax(net_output[0].float(), dim=-1)

    def get_targets(self, sample, net_output):
        return sample["target"]


def trained_one_epoch(data_bin, save_dir, *extra):
    """A criterion whose store holds epoch-1 priors for every training batch; epoch 2 begun."""
    task, model, crit = build(data_bin, save_dir, "--pskd-alpha", "0.8", "--pskd-topk", "4", *extra)
    model.train()
    task.begin_epoch(1, model)
    for i, sample in enumerate(batches(task)):
        task.train_step(sample, model, crit, BackwardOnly(), update_num=i)
    task.begin_epoch(2, model)
    return task, model, crit


def record_reads(crit):
    """[thread name, returned] of each of the store's reads from now on: a read on the helper
    thread ("pskd") is one started before the forward pass; all returned: none left running."""
    reads, real_read = [], crit.store.read

    def read(*args, **kwargs):
        call = [threading.current_thread().name, False]
        reads.append(call)
        try:
            return real_read(*args, **kwargs)
        finally:
            call[1] = True

    crit.store.read = read
    return reads


def on_meta(sample):
    from fairseq import utils
    return utils.apply_to_sample(lambda t: t.to("meta"), sample)  # as fairseq's move_to_cuda


def test_train_batches_carry_host_ids_that_survive_the_move_to_the_device(toy_data_bin, tmp_path):
    task, model, crit = build(toy_data_bin, tmp_path)
    for sample in batches(task):
        assert sample[HOST_IDS].dtype == np.int64
        np.testing.assert_array_equal(sample[HOST_IDS], sample["id"].numpy())
        moved = on_meta(sample)
        assert moved["id"].device.type == "meta"
        assert isinstance(moved[HOST_IDS], np.ndarray)  # left on the host
    # validation batches are not touched (the criterion never reads priors for them)
    assert all(HOST_IDS not in s for s in batches(task, "valid"))
    # a train set loaded after the criterion was built (fairseq-train's order) is wrapped too
    task.load_dataset("train")
    assert all(HOST_IDS in s for s in batches(task))
    crit.close()


@pytest.mark.parametrize("prefetch", [True, False])
def test_training_step_reads_nothing_back_from_the_device(toy_data_bin, tmp_path, prefetch):
    task, model, crit = trained_one_epoch(toy_data_bin, tmp_path)
    writes = []
    crit.store.write = lambda *args: writes.append(args)  # the store's CUDA path stages itself
    reads = record_reads(crit)
    sample = on_meta(batches(task)[0])
    vocab = len(task.target_dictionary)
    logits = torch.empty(*sample["target"].shape, vocab, device="meta", requires_grad=True)
    crit.start_train_step(sample, update_num=30, ignore_grad=False)  # the train_step hook's call
    if not prefetch:
        crit.priors.drop_read()  # compute_loss then reads by itself
    loss, _ = crit.compute_loss(MetaModel(), (logits,), sample)
    loss.backward()  # the backward pass needs no host value either
    assert loss.device.type == "meta" and crit.pskd_stats["pskd_covered"].device.type == "meta"
    (epoch, ids, lengths, top_idx, top_p), = writes
    assert epoch == 2 and ids.device.type == "cpu"  # ids from the host copy
    assert lengths.device.type == top_idx.device.type == top_p.device.type == "meta"
    # started before the forward pass, on the helper thread (without prefetch: that read dropped,
    # then one by compute_loss itself); none left running
    threads = [name.startswith("pskd") for name, _ in reads]
    assert threads == ([True] if prefetch else [True, False]) and all(done for _, done in reads)

    # without the host-side ids the criterion must read them from the device: on a GPU that is
    # a synchronisation; here it raises, which shows this test can see one
    del sample[HOST_IDS]
    with pytest.raises((NotImplementedError, RuntimeError)):
        crit.compute_loss(MetaModel(), (logits,), sample)
    crit.end_train_step()
    crit.close()


def test_prefetched_priors_are_the_batch_own(toy_data_bin, tmp_path):
    """The read started by the train_step hook returns exactly what a direct read returns,
    is used only for the sample it was started for, and is dropped when the step fails."""
    task, model, crit = trained_one_epoch(toy_data_bin, tmp_path)
    first, second = batches(task)[:2]
    crit.priors.start_read(first)
    got = crit.priors.take_read(first)
    pad = task.target_dictionary.pad()

    def direct(sample):
        return crit.store.read(2, sample["id"], sample["target"].ne(pad).sum(1),
                               max_len=sample["target"].size(1))

    for a, b in zip(got, direct(first)):
        torch.testing.assert_close(a, b)
    assert got[2].all()
    crit.priors.start_read(first)
    got = crit.priors.take_read(second)  # another sample: its own read, not the prefetched one
    for a, b in zip(got, direct(second)):
        torch.testing.assert_close(a, b)
    crit.priors.drop_read()

    class Boom(RuntimeError):
        pass

    def failing_forward(**kwargs):
        raise Boom("out of memory")

    model.forward = failing_forward
    reads = record_reads(crit)
    with pytest.raises(Boom):
        task.train_step(second, model, crit, BackwardOnly(), update_num=31)
    assert len(reads) == 1 and reads[0][1]  # started for the step, waited for and dropped, not left running
    assert HOST_IDS in second
    crit.close()


def test_a_batch_id_outside_the_store_gets_the_store_error(toy_data_bin, tmp_path):
    from fairseq_pskd.store import StoreError
    task, model, crit = trained_one_epoch(toy_data_bin, tmp_path)
    sample = batches(task)[0]
    sample[HOST_IDS] = sample[HOST_IDS] + 10_000  # as if the training set had changed
    with pytest.raises(StoreError, match="out of range"):
        task.train_step(sample, model, crit, BackwardOnly(), update_num=30)
    crit.close()


# ---- the task hooks ----------------------------------------------------------------------------

def test_a_second_criterion_on_the_same_task_takes_the_hooks_over(toy_data_bin, tmp_path):
    """Building a criterion again on a task does not chain a second set of hooks: the task's
    methods stay the ones wrapped once, and they call the newest criterion only."""
    task, model, first = build(toy_data_bin, tmp_path, "--pskd-alpha", "0.8")
    wrapped = (task.train_step, task.begin_epoch, task.state_dict, task.get_batch_iterator)
    second = task.build_criterion(first.cfg)
    assert (task.train_step, task.begin_epoch, task.state_dict, task.get_batch_iterator) == wrapped
    model.train()
    task.begin_epoch(1, model)
    assert second.epoch == 1 and first.epoch is None and first.store is None
    sample = batches(task)[0]
    _, _, log = task.train_step(sample, model, second, BackwardOnly(), update_num=0)
    assert log["pskd_ntokens"] > 0
    second.close()


def test_a_training_forward_outside_train_step_is_refused(toy_data_bin, tmp_path):
    """A training-mode forward with gradients that did not come through task.train_step would
    otherwise train plain label smoothing without a word."""
    task, model, crit = build(toy_data_bin, tmp_path, "--pskd-alpha", "0.8")
    model.train()
    task.begin_epoch(1, model)
    with pytest.raises(RuntimeError, match="did not come through task.train_step"):
        crit(model, batches(task)[0])
    crit.close()


def test_a_model_with_its_own_normalization_keeps_the_log_softmax_path(toy_data_bin, tmp_path, caplog):
    """--pskd-loss auto takes the loss from the logits only when get_normalized_probs is their
    log_softmax (checked by value on the first batch): a model that normalizes its own way (here
    a temperature) trains on get_normalized_probs, as label_smoothed_cross_entropy would, with
    the top-k stored from those probabilities; --pskd-loss logits is refused for it."""
    import logging

    def temperature(net_output, log_probs, sample=None):
        return torch.log_softmax(net_output[0].float() / 2.0, -1)

    for path, own, expect in (("auto", True, False), ("auto", False, True), ("logits", True, None)):
        task, model, crit = build(toy_data_bin, tmp_path / f"{path}-{own}", "--pskd-alpha", "0.8",
                                  "--pskd-topk", "4", "--pskd-loss", path)
        if own:
            model.get_normalized_probs = temperature
        model.train()
        task.begin_epoch(1, model)
        sample = batches(task)[0]
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="fairseq_pskd.criterion"):
            if expect is None:
                with pytest.raises(ValueError, match="--pskd-loss logits needs a model whose normalized"):
                    task.train_step(sample, model, crit, BackwardOnly(), update_num=0)
                crit.close()
                continue
            task.train_step(sample, model, crit, BackwardOnly(), update_num=0)
        assert crit._from_logits is expect
        said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("PS-KD loss:")]
        assert len(said) == 1 and ("get_normalized_probs" in said[0]) is own
        # the stored top-k: of get_normalized_probs (the temperature's) when it is not log_softmax
        crit.flush()
        lengths = sample["target"].ne(1).sum(1)
        _, p, has = crit.store.read(2, sample["id"].numpy(), lengths.numpy())
        assert has.all()
        with torch.no_grad():  # dropout 0: the model of the training step, before its update
            net_output = model(**sample["net_input"])
        top = (temperature(net_output, True) if own else torch.log_softmax(net_output[0], -1)).topk(4, -1)[0].exp()
        first = int(lengths[0])
        assert torch.allclose(p[0, :first].float(), top[0, :first].half().float(), atol=1e-3)
        crit.close()
