"""PS-KD criterion: label-smoothed cross-entropy against progressively refined targets.

Each training token is trained against q_t = (1 - a_t) * y_ls + a_t * P_{t-1}, a_t = a_T * t / T
(docs/METHOD.md): y_ls is fairseq's label-smoothed one-hot, P_{t-1} the model's own top-k
prediction for that token recorded during the previous epoch's training forward pass, t the
1-based epoch. Tokens without a prior (epoch 1, sentences not trained last epoch) and every
validation batch are trained / scored against y_ls alone, exactly as label_smoothed_cross_entropy.

Where the pieces live: the loss (loss.py, pure functions), the priors of the run, read and
written off the critical path (priors.py), the task methods it hooks to learn the epoch and the
training step (task_hooks.py), data-parallel code (distributed.py, store_opening.py), the on-disk
store (store/). This class holds the configuration, the a_t schedule and the per-batch glue.
"""
import atexit
import logging
import os
from dataclasses import dataclass, field
from typing import Optional

import torch
from fairseq import utils
from fairseq.criterions import register_criterion
from fairseq.criterions.label_smoothed_cross_entropy import (
    LabelSmoothedCrossEntropyCriterion,
    LabelSmoothedCrossEntropyCriterionConfig,
)
from fairseq.dataclass import ChoiceEnum
from fairseq.logging import metrics
from omegaconf import II

from .checkpoints import checkpoint_suffix, restore_file_error
from .distributed import check_store_dir_template, dist_info, raise_on_every_rank
from .loss import REMAINDERS, pskd_loss, pskd_loss_from_logits
from .priors import Priors, to_device
from .task_hooks import TaskHooks, refuse_unservable_data

logger = logging.getLogger(__name__)

STORE_SYNCS = ("shared", "all_gather")  # docs/DISTRIBUTED.md
LOSS_PATHS = ("auto", "logits", "log_softmax")


def normalizes_by_log_softmax(model, net_output):
    """Whether ``model.get_normalized_probs(net_output, log_probs=True)`` is
    ``log_softmax(net_output[0])``, fairseq's default, on this (first) batch: not with an
    adaptive softmax (its output is not one logit per vocabulary entry), nor for a model that
    normalizes its own way (a temperature, a mixture): checked by value, so a model that
    overrides get_normalized_probs but still takes the log_softmax qualifies."""
    decoder = getattr(model, "decoder", None)
    if getattr(decoder, "adaptive_softmax", None) is not None:
        return False
    logits = net_output[0]
    if not torch.is_tensor(logits) or not logits.is_floating_point():
        return False
    with torch.no_grad():
        lprobs = model.get_normalized_probs(net_output, log_probs=True)
        return (lprobs.shape == logits.shape
                and torch.allclose(lprobs.float(), torch.log_softmax(logits.float(), -1), atol=1e-4, rtol=0))


@dataclass
class PSKDConfig(LabelSmoothedCrossEntropyCriterionConfig):
    pskd_alpha: float = field(
        default=0.8,
        metadata={"help": "a_T, the weight of the previous-epoch prediction in the last "
                          "epoch; a_t = a_T * t / T grows linearly (0 = label_smoothed_cross_entropy)"},
    )
    pskd_topk: int = field(
        default=8,
        metadata={"help": "k: how many of the most probable tokens of each previous-epoch "
                          "distribution are stored per target token"},
    )
    pskd_store_dir: Optional[str] = field(
        default=None,
        metadata={"help": "directory of the top-k store (default: <save-dir>/pskd_store, so "
                          "the priors travel with the checkpoints). May contain {node}, "
                          "{local_rank} and {rank} (e.g. /local/scratch/pskd_{node}) for "
                          "node-local stores with --pskd-store-sync all_gather"},
    )
    pskd_store_sync: ChoiceEnum(list(STORE_SYNCS)) = field(
        default="shared",
        metadata={"help": "data-parallel training: 'shared' = all ranks use one store directory "
                          "(one node, or a shared filesystem with coherent mmap) and each writes "
                          "the sentences it trained; 'all_gather' = each step's top-k is "
                          "all-gathered and one rank per distinct directory writes every sentence "
                          "(node-local stores, no shared filesystem; see docs/DISTRIBUTED.md)"},
    )
    pskd_remainder: ChoiceEnum(list(REMAINDERS)) = field(
        # current: the lowest validation NLL at every a_T measured (docs/RESULTS.md)
        default="current",
        metadata={"help": "probability mass outside the stored top-k: 'uniform' spreads "
                          "1 - sum(top-k) evenly over the other tokens; 'current' spreads it "
                          "in proportion to the current model's own (detached) probabilities "
                          "of those tokens; 'renormalize' rescales the top-k to sum to 1"},
    )
    pskd_loss: ChoiceEnum(list(LOSS_PATHS)) = field(
        default="auto",
        metadata={"help": "how the training loss is computed: 'logits' in one pass over the "
                          "decoder's logits (cheaper than label smoothing's log_softmax; needs a "
                          "model whose normalized probabilities are their log_softmax), "
                          "'log_softmax' from the model's get_normalized_probs (any model), "
                          "'auto' the first where the model allows it (said in the log)"},
    )
    save_dir: str = II("checkpoint.save_dir")
    save_interval: int = II("checkpoint.save_interval")
    no_save: bool = II("checkpoint.no_save")
    restore_file: str = II("checkpoint.restore_file")
    checkpoint_suffix: str = II("checkpoint.checkpoint_suffix")
    ddp_backend: str = II("distributed_training.ddp_backend")
    use_sharded_state: bool = II("distributed_training.use_sharded_state")
    max_epoch: int = II("optimization.max_epoch")
    max_update: int = II("optimization.max_update")
    train_subset: str = II("dataset.train_subset")


@register_criterion("pskd_label_smoothed_cross_entropy", dataclass=PSKDConfig)
class PSKDLabelSmoothedCrossEntropyCriterion(LabelSmoothedCrossEntropyCriterion):
    """label_smoothed_cross_entropy with the previous epoch's top-k as part of the target.

    fairseq's code does the rest: forward (which adds the pskd_* logging outputs to it),
    compute_accuracy, the validation loss and the loss/accuracy metrics; compute_loss adds the
    priors on training batches and reduce_metrics the pskd_* metrics."""

    def __init__(self, task, cfg: PSKDConfig):
        super().__init__(task, cfg.sentence_avg, cfg.label_smoothing,
                         ignore_prefix_size=cfg.ignore_prefix_size,
                         report_accuracy=cfg.report_accuracy)
        self.cfg = cfg
        self.alpha_T = cfg.pskd_alpha
        self.topk = cfg.pskd_topk
        self.remainder = str(cfg.pskd_remainder)
        self.train_subset = cfg.train_subset
        if not 0.0 <= self.alpha_T <= 1.0:
            raise ValueError(f"--pskd-alpha must be in [0, 1], got {self.alpha_T}")
        if self.topk < 1:
            raise ValueError(f"--pskd-topk must be >= 1, got {self.topk}")
        vocab = len(task.target_dictionary)
        if self.topk > vocab:
            raise ValueError(f"--pskd-topk {self.topk} exceeds the target vocabulary ({vocab})")
        if self.remainder not in REMAINDERS:
            raise ValueError(f"--pskd-remainder must be one of {', '.join(REMAINDERS)}, "
                             f"got {self.remainder}")
        if (cfg.max_epoch or 0) > 0:
            self.schedule = "epoch"
        elif (cfg.max_update or 0) > 0:
            self.schedule = "update"
        else:
            raise ValueError("PS-KD needs the training length T to grow a_t = a_T * t / T: "
                             "pass --max-epoch (as in the paper) or --max-update")
        sync = str(cfg.pskd_store_sync)
        if sync not in STORE_SYNCS:
            raise ValueError(f"--pskd-store-sync must be one of {', '.join(STORE_SYNCS)}, got {sync}")
        self.loss_path = str(cfg.pskd_loss)
        if self.loss_path not in LOSS_PATHS:
            raise ValueError(f"--pskd-loss must be one of {', '.join(LOSS_PATHS)}, got {self.loss_path}")
        self._from_logits = None  # decided at the first training batch, from the model
        refuse_unservable_data(task)
        if cfg.pskd_store_dir is not None:
            check_store_dir_template(cfg.pskd_store_dir)
        # before fairseq loads it: a damaged checkpoint_last.pt gets the command that repairs it,
        # on every rank (a rank that stopped alone would leave the others in the load's broadcast)
        suffix = checkpoint_suffix(cfg.checkpoint_suffix, str(cfg.ddp_backend), cfg.use_sharded_state, dist_info()[0])
        raise_on_every_rank(restore_file_error(cfg.save_dir, cfg.restore_file, suffix),
                            "checking the checkpoint to resume from")
        self.priors = Priors(cfg.pskd_store_dir or os.path.join(cfg.save_dir, "pskd_store"),
                             self.topk, sync, cfg.save_dir)
        self._train_batch = None  # {"ignore_grad", "update_num"} inside task.train_step
        self._alpha_log_pending = False  # --max-update schedule: log a_t at the epoch's first update
        self.pskd_stats = {}  # the pskd_* logging outputs of the last training compute_loss
        TaskHooks.install(task, self)
        atexit.register(self.close)
        logger.info(
            "PS-KD: a_T=%s, k=%d, remainder=%s, schedule: %s, store: %s", self.alpha_T, self.topk,
            self.remainder,
            f"a_t = a_T * epoch / {cfg.max_epoch} (--max-epoch)" if self.schedule == "epoch"
            else f"a_t = a_T * update / {cfg.max_update} (--max-update, no --max-epoch)",
            self.priors.store_dir)

    @property
    def epoch(self) -> Optional[int]:
        """The training epoch begun last (1-based; None before the first)."""
        return self.priors.epoch

    @property
    def store(self):
        """The run's TopKStore (None before the first training epoch)."""
        return self.priors.store

    # ---- called through the task (task_hooks.py) -------------------------------------------

    def begin_epoch(self, epoch):
        """Before training epoch ``epoch`` (1-based); every rank, the same epoch."""
        if self.priors.store is None:
            self._warn_about_checkpoint_interval()
        dictionary = self.task.target_dictionary
        self.priors.begin_epoch(epoch, self.task.dataset(self.train_subset), len(dictionary),
                                getattr(dictionary, "symbols", None))
        if self.schedule == "epoch":
            logger.info("PS-KD epoch %d: a_t = %.4f", epoch, self.alpha())
        else:  # a_t depends on the update count, which only the epoch's first train_step tells
            self._alpha_log_pending = True

    def _warn_about_checkpoint_interval(self):
        """--save-interval N > 1: a run killed in an epoch without a checkpoint resumes N-1 or more
        epochs back, and the store keeps only the last two epochs' priors (docs/STORE.md)."""
        interval = self.cfg.save_interval or 1
        # once per run, not once per rank: every rank logs warnings (fairseq quiets only info)
        other_rank = torch.distributed.is_initialized() and torch.distributed.get_rank() != 0
        if interval > 1 and not self.cfg.no_save and not other_rank:
            logger.warning(
                "PS-KD: --save-interval %d saves a checkpoint every %d epochs, but the store keeps the "
                "priors of the last two epochs only: a run killed in an epoch that follows one without "
                "a checkpoint resumes from an older one, and the epoch it redoes finds part of its "
                "priors overwritten (said when it starts; those sentences train against the "
                "label-smoothed target alone for that epoch). --save-interval 1 avoids it "
                "(--no-epoch-checkpoints keeps just checkpoint_last.pt)", interval, interval)

    def start_train_step(self, sample, update_num, ignore_grad):
        """task.train_step begins: the next forward pass is a training one. ``ignore_grad``
        marks the trainer's dummy batch (neither read nor written)."""
        self._train_batch = {"ignore_grad": ignore_grad, "update_num": update_num}
        if self._alpha_log_pending and self.epoch is not None:
            self._alpha_log_pending = False
            # the epoch's first update in this process (after a mid-epoch resume, the first after it)
            logger.info("PS-KD epoch %d: a_t = %.4f from update %d of --max-update %d, growing by "
                        "%.3g per update", self.epoch, self.alpha(update_num), update_num + 1,
                        self.cfg.max_update, self.alpha_T / self.cfg.max_update)
        if self._reads_prior(self.alpha(update_num), ignore_grad):
            self.priors.start_read(sample)

    def end_train_step(self):
        self._train_batch = None
        self.priors.drop_read()

    def flush(self):
        self.priors.flush()

    def close(self):
        self.priors.close()

    # ---- schedule --------------------------------------------------------------------------

    def alpha(self, update_num=None):
        if self.schedule == "epoch":
            t = min(self.epoch or 1, self.cfg.max_epoch)
            return self.alpha_T * t / self.cfg.max_epoch
        done = (update_num or 0) + 1
        return self.alpha_T * min(done, self.cfg.max_update) / self.cfg.max_update

    def _reads_prior(self, alpha, dummy):
        return alpha > 0 and not dummy and self.epoch is not None and self.epoch > 1

    # ---- loss ------------------------------------------------------------------------------

    def forward(self, model, sample, reduce=True):
        self.pskd_stats = {}
        loss, sample_size, logging_output = super().forward(model, sample, reduce=reduce)
        logging_output.update(self.pskd_stats)
        return loss, sample_size, logging_output

    def compute_loss(self, model, net_output, sample, reduce=True):
        training = model.training and torch.is_grad_enabled()
        if training and self._train_batch is None:
            raise RuntimeError(
                "PS-KD: a training forward pass (model.train(), gradients on) that did not come "
                "through task.train_step: the criterion would not know the batch and would train "
                "plain label smoothing. Train with fairseq-train, or call task.train_step on the "
                "task this criterion was built on (its hooks: fairseq_pskd/task_hooks.py)")
        if not training:
            # validation (and any no-grad use): the hard label-smoothed target, exactly
            # label_smoothed_cross_entropy, so --best-checkpoint-metric compares like with like
            return super().compute_loss(model, net_output, sample, reduce=reduce)
        if self.epoch is None:
            raise RuntimeError("PS-KD criterion used for training before task.begin_epoch(): "
                               "train with fairseq-train (or call task.begin_epoch yourself)")
        if self._from_logits is None:
            self._from_logits = self._choose_loss_path(model, net_output)
        full_target = model.get_targets(sample, net_output)
        target = full_target
        if self.ignore_prefix_size > 0:
            target = target[:, self.ignore_prefix_size:].contiguous()
        batch = self._train_batch
        alpha = self.alpha(batch["update_num"])
        dummy = batch["ignore_grad"]  # the trainer's cached dummy batch: no read, no write
        # on the device: the store takes the rows of these many tokens per sentence (its writer
        # checks them against the store, off the critical path)
        lengths = full_target.ne(self.padding_idx).sum(1)
        n_tokens = target.ne(self.padding_idx).sum()
        prefix = self.ignore_prefix_size
        if self._from_logits:
            # the loss from the logits in one pass (loss.py); the prefix rows stay in, weighted
            # 0 like padding, so the log-sum-exp of every row is there for the stored top-k
            full_scores, lse = net_output[0], None
            loss_target = full_target
            if prefix > 0:
                loss_target = full_target.clone()
                loss_target[:, :prefix] = self.padding_idx
        else:
            # one log-softmax per step, shared by the loss and the top-k that is stored
            full_scores, lse = model.get_normalized_probs(net_output, log_probs=True).float(), None
            loss_target = target
        scores = full_scores if self._from_logits or prefix == 0 else full_scores[:, prefix:, :].contiguous()
        prior_idx = prior_p = prior_mask = None
        if self._reads_prior(alpha, dummy):
            idx, p, has_prior = self.priors.take_read(sample)  # int32 / float16, as stored
            if prefix > 0 and not self._from_logits:
                idx, p = idx[:, prefix:], p[:, prefix:]
            dev = scores.device
            # across to the device in the read's dtypes, widened there (gather takes int64)
            prior_idx = to_device(idx, dev).reshape(-1, idx.size(-1)).long()
            prior_p = to_device(p, dev).reshape(-1, p.size(-1)).float()
            prior_mask = to_device(has_prior, dev).unsqueeze(1).expand_as(loss_target).reshape(-1)
        vocab = scores.size(-1)
        if self._from_logits:
            loss, nll_loss, mass, lse = pskd_loss_from_logits(
                scores.reshape(-1, vocab), loss_target.reshape(-1), alpha, self.eps, prior_idx,
                prior_p, prior_mask, self.remainder, ignore_index=self.padding_idx, reduce=reduce)
            lse = lse.view(full_target.shape)
        else:
            loss, nll_loss, mass = pskd_loss(
                scores.view(-1, vocab), loss_target.view(-1), alpha, self.eps,
                prior_idx, prior_p, prior_mask, self.remainder, ignore_index=self.padding_idx,
                reduce=reduce)
        # the priors decide what a batch writes (a dummy batch: nothing, but under all_gather
        # it still joins the step's collective)
        self.priors.write(sample, full_scores, lengths, dummy=dummy, lse=lse)
        if prior_mask is not None:
            covered = (prior_mask & loss_target.reshape(-1).ne(self.padding_idx)).sum()
        else:
            covered = n_tokens.new_zeros(())
        self.pskd_stats = {
            # additive across batches and workers; divided in reduce_metrics. The same keys on
            # every training batch, dummy ones included: under data-parallel training fairseq
            # all-reduces a dict built from each rank's keys (trainer._fast_stat_sync_sum).
            "pskd_ntokens": n_tokens.data,
            "pskd_alpha_sum": alpha * n_tokens.data,
            "pskd_covered": covered.data,
            "pskd_mass_sum": (mass.sum() if not reduce else mass).data,
        }
        return loss, nll_loss

    def _choose_loss_path(self, model, net_output):
        """True: the loss from the logits (pskd_loss_from_logits); False: from the model's
        normalized probabilities (pskd_loss). --pskd-alpha 0 keeps label_smoothed_cross_entropy's
        own function, bit for bit. Said once in the log."""
        fits = normalizes_by_log_softmax(model, net_output)
        if self.loss_path == "logits" and not fits:
            raise ValueError(f"--pskd-loss logits needs a model whose normalized probabilities "
                             f"are the log_softmax of its decoder's output; {type(model).__name__} "
                             "has an adaptive softmax or its own get_normalized_probs: use "
                             "--pskd-loss log_softmax (or auto)")
        from_logits = self.loss_path == "logits" or (self.loss_path == "auto" and fits and self.alpha_T > 0)
        if from_logits:
            logger.info("PS-KD loss: from the decoder's logits in one pass (--pskd-loss %s)", self.loss_path)
        elif self.loss_path == "auto" and not fits:
            logger.info("PS-KD loss: from %s.get_normalized_probs (an adaptive softmax or its own "
                        "normalization: the one-pass loss from the logits does not apply)",
                        type(model).__name__)
        else:
            logger.info("PS-KD loss: from get_normalized_probs (--pskd-loss %s%s)", self.loss_path,
                        ", --pskd-alpha 0: label_smoothed_cross_entropy's own function" if self.alpha_T == 0 else "")
        return from_logits

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        """fairseq's label-smoothing metrics, then a_t, the share of tokens trained against a
        prior (pskd_coverage) and the stored top-k mass of those tokens (pskd_topk_mass)."""
        super().reduce_metrics(logging_outputs)

        def total(key):
            return utils.item(sum(log.get(key, 0) for log in logging_outputs))

        pskd_tokens = total("pskd_ntokens")
        if pskd_tokens > 0:  # training batches only; validation logs no PS-KD metrics
            covered = total("pskd_covered")
            metrics.log_scalar("pskd_alpha", total("pskd_alpha_sum") / pskd_tokens, pskd_tokens,
                               round=4)
            metrics.log_scalar("pskd_coverage", covered / pskd_tokens, pskd_tokens, round=4)
            if covered > 0:
                metrics.log_scalar("pskd_topk_mass", total("pskd_mass_sum") / covered, covered,
                                   round=4)


@register_criterion("pskd", dataclass=PSKDConfig)
class PSKDCriterion(PSKDLabelSmoothedCrossEntropyCriterion):
    """``--criterion pskd``: the same criterion under its short name."""
