"""PS-KD criterion: label-smoothed cross-entropy against progressively refined targets.

Each training token is trained against

    q_t = (1 - a_t) * y_ls + a_t * P_{t-1}          a_t = a_T * t / T

where y_ls is fairseq's label-smoothed one-hot (exactly one-hot at --label-smoothing 0),
P_{t-1} is the model's own distribution for that token recorded during the previous
epoch's training forward pass (stored as its top-k, see store.py), and t is the 1-based
epoch. The loss is the soft-target cross-entropy -sum_v q_v log p_v. Tokens without a
prior (epoch 1, sentences not trained last epoch) are trained against y_ls alone.

The criterion knows nothing of file layouts (the store does) and nothing of fairseq's
trainer beyond documented methods of the task it is given, which it wraps: ``begin_epoch`` (the
epoch number, right after a resume too), ``train_step`` (tells a training batch from a
validation batch, and a dummy batch from a real one), ``begin_valid_epoch`` and
``state_dict`` (flush writes before validation and checkpoints), ``load_dataset`` (the
training set's collater, below) and ``get_batch_iterator`` (the train iterator's state, which
every checkpoint saves and a resume restores, carries the run's identity: see _claim_store).

Per training step the criterion adds no forward pass and no GPU synchronisation: the train
dataset's collater also puts the batch's sentence ids into the sample as a numpy array (fairseq
moves only tensors to the GPU), the store read for a batch starts on a helper thread as soon as
task.train_step receives it (overlapping the forward pass), the priors go to the device from
pinned memory without blocking, and the top-k is taken on the device and copied back
asynchronously by the store's writer (store.py). On CPU the helper thread also takes the top-k,
during the backward pass.

Data-parallel training (docs/DISTRIBUTED.md): --pskd-store-sync shared (default) = one store
directory for all ranks, each rank writes the sentences it trains (disjoint), and a barrier at
every epoch start orders all ranks' writes before anyone's reads; --pskd-store-sync all_gather =
each step's top-k rows are all-gathered and one rank per distinct directory writes all of them
(node-local stores, e.g. --pskd-store-dir /local/pskd_{node}).
"""
import atexit
import concurrent.futures
import logging
import math
import os
import uuid
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
from fairseq import utils
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.criterions.label_smoothed_cross_entropy import (
    LabelSmoothedCrossEntropyCriterionConfig,
    label_smoothed_nll_loss,
)
from fairseq.dataclass import ChoiceEnum
from fairseq.logging import metrics
from omegaconf import II

logger = logging.getLogger(__name__)

REMAINDER_CHOICES = ChoiceEnum(["uniform", "renormalize", "current"])
STORE_SYNC_CHOICES = ChoiceEnum(["shared", "all_gather"])


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
    pskd_store_sync: STORE_SYNC_CHOICES = field(
        default="shared",
        metadata={"help": "data-parallel training: 'shared' = all ranks use one store directory "
                          "(one node, or a shared filesystem with coherent mmap) and each writes "
                          "the sentences it trained; 'all_gather' = each step's top-k is "
                          "all-gathered and one rank per distinct directory writes every sentence "
                          "(node-local stores, no shared filesystem; see docs/DISTRIBUTED.md)"},
    )
    pskd_remainder: REMAINDER_CHOICES = field(
        # current: the lowest validation NLL at every a_T measured (docs/RESULTS.md)
        default="current",
        metadata={"help": "probability mass outside the stored top-k: 'uniform' spreads "
                          "1 - sum(top-k) evenly over the other tokens; 'current' spreads it "
                          "in proportion to the current model's own (detached) probabilities "
                          "of those tokens; 'renormalize' rescales the top-k to sum to 1"},
    )
    save_dir: str = II("checkpoint.save_dir")
    max_epoch: int = II("optimization.max_epoch")
    max_update: int = II("optimization.max_update")
    train_subset: str = II("dataset.train_subset")


def pskd_loss(lprobs, target, alpha, epsilon, prior_indices=None, prior_probs=None,
              prior_mask=None, remainder="uniform", ignore_index=None, reduce=True):
    """Soft-target cross-entropy of PS-KD, per token, in float32.

    Args:
        lprobs: (N, V) log-probabilities of the current model.
        target: (N,) gold token ids.
        alpha: a_t, the weight of the prior.
        epsilon: label smoothing of the hard target (as label_smoothed_nll_loss).
        prior_indices, prior_probs: (N, k) stored top-k of the previous epoch's
            distribution (None: no prior for any token).
        prior_mask: (N,) bool, True where the token has a prior.
        remainder: what the mass r = 1 - sum(prior_probs) means: "uniform" spreads it over
            the V - k other tokens; "current" spreads it over them in proportion to the
            current model's own probabilities pi = exp(lprobs), detached (the target asks
            the tail to hold r and leaves its shape to the model); "renormalize" drops it
            and rescales the top-k.
        ignore_index: padding index (those tokens contribute 0).

    Returns:
        (loss, nll_loss, topk_mass): summed over tokens when reduce, else per token (N,).
        topk_mass is the per-token stored mass sum(prior_probs) (0 without prior).
    """
    lprobs = lprobs.float()
    if prior_indices is None or alpha == 0:
        # exactly fairseq's label_smoothed_cross_entropy (same code, same rounding)
        loss, nll_loss = label_smoothed_nll_loss(lprobs, target, epsilon, ignore_index=ignore_index,
                                                 reduce=False)
        loss, nll_loss = loss.view(-1), nll_loss.view(-1)
        topk_mass = lprobs.new_zeros(target.shape)
    else:
        loss, nll_loss, topk_mass = _soft_target_loss(lprobs, target, alpha, epsilon, prior_indices,
                                                      prior_probs, prior_mask, remainder)
    if ignore_index is not None:
        pad = target.eq(ignore_index)
        loss = loss.masked_fill(pad, 0.0)
        nll_loss = nll_loss.masked_fill(pad, 0.0)
        topk_mass = topk_mass.masked_fill(pad, 0.0)
    if reduce:
        return loss.sum(), nll_loss.sum(), topk_mass.sum()
    return loss, nll_loss, topk_mass


def _soft_target_loss(lprobs, target, alpha, epsilon, prior_indices, prior_probs, prior_mask,
                      remainder):
    """Per-token -sum_v q_v log p_v without materialising q.

    Every term is a weight times the log-prob of a known column (the gold token, the k stored
    tokens) or a weight times a sum over the vocabulary: sum_v log p_v (label smoothing's
    eps / (V-1), the uniform remainder r / (V-k)) and, for the "current" remainder,
    sum_{v not in K} pi_v log p_v / sum_{v not in K} pi_v. So one gather of 1 + k columns
    plus one row sum, the same vocabulary-sized work as label smoothing (plus one weighted
    row sum for "current"), forward and backward.
    """
    n, vocab = lprobs.shape
    eps_i = epsilon / (vocab - 1)
    probs = prior_probs.float()
    k = probs.size(-1)
    zeros = lprobs.new_zeros(n)
    topk_mass = torch.where(prior_mask, probs.sum(-1), zeros)
    a = alpha * prior_mask.to(lprobs.dtype)
    # float16 top-k sums can exceed 1 by rounding: no negative remainder
    mass_left = (1.0 - topk_mass).clamp_min(0.0)
    tail = zeros  # the "current" remainder's weighted row sum (0 in the other modes)
    if remainder == "renormalize":
        weights = probs / topk_mass.clamp_min(1e-12).unsqueeze(-1)
        rest = zeros
    elif remainder == "uniform":
        rest = mass_left / (vocab - k) if vocab > k else zeros
        weights = probs - rest.unsqueeze(-1)  # the row-sum term counts the top-k columns too
    elif remainder == "current":
        weights, rest = probs, zeros
        tail = mass_left * _tail_mean_log_prob(lprobs, prior_indices)
    else:
        raise ValueError(f"unknown remainder mode {remainder!r}: use uniform, current or renormalize")
    columns = torch.cat([target.unsqueeze(1), prior_indices.long()], 1)
    coef = torch.cat([((1.0 - a) * (1.0 - epsilon - eps_i)).unsqueeze(1), a.unsqueeze(1) * weights], 1)
    coef_all = (1.0 - a) * eps_i + a * rest
    picked = lprobs.gather(1, columns)
    # where(), not a product: a zero weight on a -inf log-prob must give 0, not NaN
    weighted = torch.where(coef != 0, coef * picked, torch.zeros_like(picked)).sum(1)
    row_sum = lprobs.sum(-1)
    weighted = weighted + torch.where(coef_all != 0, coef_all * row_sum, zeros)
    weighted = weighted + torch.where(a != 0, a * tail, zeros)
    return -weighted, -picked[:, 0], topk_mass


def _tail_mean_log_prob(lprobs, prior_indices):
    """sum_{v not in K} pi_v log p_v / sum_{v not in K} pi_v per row, pi = exp(lprobs) detached.

    The tail's weights are zeroed at the stored columns K and normalised before the product
    (each <= 1), so a tail the model holds almost no mass on stays finite: 1 - sum_K pi would
    cancel catastrophically there. An empty tail (k = V, or all mass on K) gives 0.
    """
    return _TailMeanLogProb.apply(lprobs, prior_indices.long())


class _TailMeanLogProb(torch.autograd.Function):
    """Forward: t = sum_v w_v log p_v; backward: grad_lprobs = grad_t * w (w carries no
    gradient). w is recomputed in the backward pass instead of being saved, and on CPU both
    passes go over blocks of rows through one reused buffer: there, fresh vocabulary-sized
    tensors cost more in page faults than the arithmetic (benchmarks/throughput.py)."""

    @staticmethod
    def forward(ctx, lprobs, indices):
        ctx.save_for_backward(lprobs, indices)
        out = lprobs.new_empty(lprobs.size(0))
        for rows, w in _tail_weights(lprobs, indices):
            out[rows] = torch.bmm(w.unsqueeze(1), lprobs[rows].unsqueeze(2)).view(-1)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        lprobs, indices = ctx.saved_tensors
        grad = torch.empty_like(lprobs)
        for rows, w in _tail_weights(lprobs, indices):
            torch.mul(w, grad_out[rows].unsqueeze(1), out=grad[rows])
        return grad, None


def _tail_weights(lprobs, indices, block_elements=1 << 22):
    """(row slice, w) per block of rows: w = exp(lprobs) with the stored columns zeroed and
    normalised per row (an empty tail stays all zeros, never 0/0). One block on CUDA (no
    page faults there, and few kernel launches); about 16 MB blocks on CPU."""
    n, vocab = lprobs.shape
    step = n if lprobs.is_cuda else max(1, block_elements // vocab)
    buf = None
    with torch.no_grad():
        for start in range(0, n, step):
            rows = slice(start, min(n, start + step))
            lp = lprobs[rows]
            if buf is None or buf.size(0) != lp.size(0):
                buf = torch.empty_like(lp)
            w = torch.exp(lp, out=buf)
            w.scatter_(1, indices[rows], 0.0)
            w.div_(w.sum(-1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny))
            yield rows, w


# ---- data-parallel helpers ---------------------------------------------------------------
# All collectives run on fairseq's data-parallel group (the trainer's own group; with model
# parallelism that is the group of ranks that see different batches). Every one of them is
# called by every rank at the same point of training: begin_epoch (all ranks), the first
# begin_epoch's store opening, and, with --pskd-store-sync all_gather, every training
# forward pass including the trainer's dummy batches.

def _dp_group():
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    from fairseq.distributed import utils as distributed_utils

    return distributed_utils.get_data_parallel_group()


def _dist_info():
    """(rank, world size) in the data-parallel group; (0, 1) without torch.distributed."""
    group = _dp_group()
    if group is None:
        return 0, 1
    return torch.distributed.get_rank(group), torch.distributed.get_world_size(group)


def _barrier():
    group = _dp_group()
    if group is not None and torch.distributed.get_world_size(group) > 1:
        torch.distributed.barrier(group=group)


def _all_gather_object(obj):
    """[obj of rank 0, obj of rank 1, ...] (just [obj] without torch.distributed)."""
    group = _dp_group()
    if group is None or torch.distributed.get_world_size(group) == 1:
        return [obj]
    out = [None] * torch.distributed.get_world_size(group)
    torch.distributed.all_gather_object(out, obj, group=group)
    return out


def _raise_collectively(error, what):
    """Gather every rank's error (None = fine) and raise the same error on all ranks.

    A rank that raised alone would leave the others waiting in their next collective."""
    _raise_if_any(_all_gather_object(error), what)


def _raise_on_every_rank(error, what):
    """Raise ``error`` (an exception, or None on a rank that is fine): as it is in a single process;
    under data parallelism gathered, so that every rank stops (one rank alone would leave the
    others waiting in their next collective)."""
    if _dist_info()[1] == 1:
        if error is not None:
            raise error
        return
    _raise_collectively(None if error is None else f"{type(error).__name__}: {error}", what)


def _raise_if_any(errors, what):
    """Raise (on every rank that calls it with the same gathered list) if any rank failed."""
    failed = [(r, e) for r, e in enumerate(errors) if e is not None]
    if failed:
        detail = "\n".join(f"  rank {r}: {e}" for r, e in failed[:8])
        more = f"\n  ... and {len(failed) - 8} more ranks" if len(failed) > 8 else ""
        raise RuntimeError(f"PS-KD: {what} failed on {len(failed)} rank(s):\n{detail}{more}")


def _node_and_local_rank(infos, rank):
    """Node index and local rank of ``rank`` from every rank's {"host", "node", "local_rank"}.

    The launcher's environment wins (torchrun / fairseq_pskd.launch: GROUP_RANK or NODE_RANK
    and LOCAL_RANK; Slurm: SLURM_NODEID) when every rank has it; otherwise ranks are grouped
    by host name: node = order of first appearance, local rank = earlier ranks on the host."""
    if all(i["node"] is not None for i in infos):
        node = infos[rank]["node"]
    else:
        hosts = list(dict.fromkeys(i["host"] for i in infos))
        node = hosts.index(infos[rank]["host"])
    if all(i["local_rank"] is not None for i in infos):
        local = infos[rank]["local_rank"]
    else:
        local = sum(1 for i in infos[:rank] if i["host"] == infos[rank]["host"])
    return node, local


def _env_int(*names):
    for name in names:
        v = os.environ.get(name)
        if v not in (None, ""):
            try:
                return int(v)
            except ValueError:
                pass
    return None


def resolve_store_dir(template, rank, node, local_rank):
    """--pskd-store-dir with {rank}, {node} and {local_rank} filled in."""
    return os.path.abspath(os.path.expanduser(
        template.replace("{rank}", str(rank)).replace("{node}", str(node))
        .replace("{local_rank}", str(local_rank))))


def _index_bytes(vocab_size):
    return 2 if vocab_size <= 65536 else 4  # as the store's index dtype


def pack_rows(ids, lengths, top_idx, top_p, vocab_size):
    """One flat uint8 tensor: ids int64 (B), lengths int32 (B), the real tokens' top-k indices
    (N, k) as uint16/int32 and probabilities (N, k) float16; padding positions are left out."""
    B, T, k = top_idx.shape
    mask = torch.arange(T, device=top_idx.device).unsqueeze(0) < lengths.to(top_idx.device).unsqueeze(1)
    idx = top_idx[mask]  # (N, k), row-major: sentence by sentence, position by position
    prb = top_p[mask].to(torch.float16)
    idx = idx.to(torch.int16 if _index_bytes(vocab_size) == 2 else torch.int32)  # int16 keeps the uint16 bits
    parts = [ids.to(torch.int64).reshape(-1), lengths.to(torch.int32).reshape(-1),
             idx.contiguous().reshape(-1), prb.contiguous().reshape(-1)]
    dev = top_idx.device
    return torch.cat([p.to(dev).view(torch.uint8) for p in parts]), B, idx.size(0)


def unpack_rows(buf, n_sent, n_tok, k, vocab_size):
    """Inverse of pack_rows on a CPU uint8 numpy array: ids, lengths (int64), indices (int32), probs (float16)."""
    ib = _index_bytes(vocab_size)
    o = 0
    ids = np.frombuffer(buf, dtype="<i8", count=n_sent, offset=o).astype(np.int64); o += 8 * n_sent
    lengths = np.frombuffer(buf, dtype="<i4", count=n_sent, offset=o).astype(np.int64); o += 4 * n_sent
    idx = np.frombuffer(buf, dtype="<u2" if ib == 2 else "<i4", count=n_tok * k, offset=o)
    o += ib * n_tok * k
    prb = np.frombuffer(buf, dtype="<f2", count=n_tok * k, offset=o)
    return ids, lengths, idx.astype(np.int32).reshape(n_tok, k), prb.reshape(n_tok, k)


def all_gather_rows(ids, lengths, top_idx, top_p, vocab_size, k):
    """All-gather every rank's rows (a rank may contribute none: top_idx None).

    Two collectives: the (sentences, tokens) counts, then the packed rows padded to the largest
    rank's size. Returns, on every rank, CPU numpy (ids, lengths, indices (N, k), probs (N, k))
    of all ranks concatenated in rank order."""
    group = _dp_group()
    backend = str(torch.distributed.get_backend(group))
    if top_idx is not None:
        payload, n_sent, n_tok = pack_rows(ids, lengths, top_idx, top_p, vocab_size)
        dev = payload.device
    else:
        dev = torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend \
            and torch.cuda.is_available() else torch.device("cpu")
        payload, n_sent, n_tok = torch.zeros(0, dtype=torch.uint8, device=dev), 0, 0
    if dev.type == "cuda" and "nccl" not in backend:
        dev = torch.device("cpu")  # gloo: gather on the host
    payload = payload.to(dev)
    world = torch.distributed.get_world_size(group)
    counts = torch.tensor([n_sent, n_tok, payload.numel()], dtype=torch.int64, device=dev)
    all_counts = [torch.empty_like(counts) for _ in range(world)]
    torch.distributed.all_gather(all_counts, counts, group=group)
    all_counts = [c.tolist() for c in all_counts]
    width = max(c[2] for c in all_counts)
    padded = torch.zeros(width, dtype=torch.uint8, device=dev)
    padded[:payload.numel()] = payload
    gathered = [torch.empty_like(padded) for _ in range(world)]
    torch.distributed.all_gather(gathered, padded, group=group)
    parts = [unpack_rows(g[:c[2]].cpu().numpy(), c[0], c[1], k, vocab_size)
             for g, c in zip(gathered, all_counts)]
    return tuple(np.concatenate([p[i] for p in parts]) for i in range(4))


def pad_rows(lengths, rows):
    """(N, k) rows of real tokens -> (B, max length, k) zero-padded, as TopKStore.write takes."""
    B, k = lengths.shape[0], rows.shape[1]
    T = int(lengths.max()) if B else 0
    out = np.zeros((B, T, k), dtype=rows.dtype)
    out[np.arange(T)[None, :] < lengths[:, None]] = rows
    return out


# ---- host-side sentence ids ---------------------------------------------------------------

#: Largest sum of a stored top-k row read back: 1 plus float16 rounding of the k values.
MAX_PRIOR_MASS = 1.0 + 1e-2

HOST_IDS = "pskd_host_ids"  # sample key: the batch's sentence ids, int64 numpy, never on a device


class CollaterWithHostIds:
    """A dataset's collater that also puts the batch's ids into the sample as numpy.

    The store is addressed by sentence id on the host. fairseq moves every tensor of a sample
    to the GPU before the criterion sees it, and leaves numpy arrays where they are: without
    this copy, every step would read the ids back from the GPU (a synchronisation that stalls
    it). A class, not a closure, so DataLoader workers can pickle it."""

    def __init__(self, collater):
        self.collater = collater

    def __call__(self, samples):
        batch = self.collater(samples)
        ids = batch.get("id") if isinstance(batch, dict) else None
        if isinstance(ids, torch.Tensor):
            batch[HOST_IDS] = ids.numpy().astype(np.int64, copy=True)
        return batch


def add_host_ids(dataset):
    """Wrap ``dataset.collater`` (once) so its batches carry HOST_IDS; returns the dataset."""
    if dataset is not None and hasattr(dataset, "collater") \
            and not isinstance(dataset.collater, CollaterWithHostIds):
        dataset.collater = CollaterWithHostIds(dataset.collater)
    return dataset


def _nonfinite_warning(epoch, count):
    return (f"PS-KD epoch {epoch} priors: {count} sentences skipped for non-finite values (inf/NaN "
            f"log-probabilities in their training forward pass, e.g. an fp16 overflow); they keep "
            f"no prior, so epoch {epoch + 1} trains them against the label-smoothed target alone")


def _untrained_warning(epoch, count, total):
    return (f"PS-KD epoch {epoch}: {count} of the {total} training sentences were not trained in "
            f"this epoch, so epoch {epoch + 1} trains them against the label-smoothed target "
            f"alone. Causes: fairseq 0.12 leaves out the last sentences of every epoch when their "
            f"number is not a multiple of --required-batch-size-multiple (default 8; pass "
            f"--required-batch-size-multiple 1); a resume from a mid-epoch checkpoint trains "
            f"other batches than those before it unless --update-epoch-batch-itr True; "
            f"sentences longer than --max-positions are skipped with "
            f"--skip-invalid-size-inputs-valid-test")


def _refuse_what_the_store_cannot_serve(task):
    """Refuse, before training, the data options under which priors would be read for the wrong
    tokens: the store keeps row j of a sentence for its target position j (right padding), and
    expects the same training set (ids and lengths) every epoch."""
    cfg = getattr(task, "cfg", None)
    if cfg is None:
        return
    if getattr(cfg, "left_pad_target", False):
        raise ValueError(
            "--left-pad-target: PS-KD stores one prior per target position of a right-padded "
            "target (stored row j of a sentence is its target token j), so with left-padded targets "
            "the priors would land on the wrong tokens; drop --left-pad-target (fairseq's default "
            "is False)")
    data = getattr(cfg, "data", None)
    if isinstance(data, str) and os.pathsep in data:
        shards = [d for d in data.split(os.pathsep) if d]
        raise ValueError(
            f"PS-KD needs the same training set every epoch (epoch t trains every sentence against "
            f"what the model predicted for that sentence in epoch t-1), but the data path {data} is "
            f"sharded ({len(shards)} shards: fairseq trains shard (t-1) mod {len(shards)} in epoch "
            f"t), which changes it; binarise the shards into one data directory (one "
            f"fairseq-preprocess --trainpref over all the training text) and pass that")


def _to_device(t, device):
    """Host tensor -> device without blocking: through pinned memory on CUDA (torch's caching
    host allocator keeps the pinned block until the copy has run), a plain copy elsewhere."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


@register_criterion("pskd_label_smoothed_cross_entropy", dataclass=PSKDConfig)
class PSKDLabelSmoothedCrossEntropyCriterion(FairseqCriterion):
    # CPU training: take the top-k on the helper thread, beside the backward pass (False: on the
    # training thread; benchmarks/throughput.py --inline-topk compares the two)
    cpu_topk_on_helper = True
    def __init__(self, task, cfg: PSKDConfig):
        super().__init__(task)
        self.cfg = cfg
        self.sentence_avg = cfg.sentence_avg
        self.eps = cfg.label_smoothing
        self.ignore_prefix_size = cfg.ignore_prefix_size
        self.report_accuracy = cfg.report_accuracy
        self.alpha_T = cfg.pskd_alpha
        self.topk = cfg.pskd_topk
        self.remainder = str(cfg.pskd_remainder)
        if not 0.0 <= self.alpha_T <= 1.0:
            raise ValueError(f"--pskd-alpha must be in [0, 1], got {self.alpha_T}")
        if self.topk < 1:
            raise ValueError(f"--pskd-topk must be >= 1, got {self.topk}")
        vocab = len(task.target_dictionary)
        if self.topk > vocab:
            raise ValueError(f"--pskd-topk {self.topk} exceeds the target vocabulary ({vocab})")
        if self.remainder not in ("uniform", "current", "renormalize"):
            raise ValueError(f"--pskd-remainder must be uniform, current or renormalize, "
                             f"got {self.remainder}")
        if (cfg.max_epoch or 0) > 0:
            self.schedule = "epoch"
        elif (cfg.max_update or 0) > 0:
            self.schedule = "update"
        else:
            raise ValueError("PS-KD needs the training length T to grow a_t = a_T * t / T: "
                             "pass --max-epoch (as in the paper) or --max-update")
        self.store_sync = str(cfg.pskd_store_sync)
        if self.store_sync not in ("shared", "all_gather"):
            raise ValueError(f"--pskd-store-sync must be shared or all_gather, got {self.store_sync}")
        _refuse_what_the_store_cannot_serve(task)
        # may hold {rank} / {node} / {local_rank}; resolved when the store is opened
        self.store_dir = cfg.pskd_store_dir or os.path.join(cfg.save_dir, "pskd_store")
        self.store = None  # a TopKStore, opened at the first training epoch
        self.epoch: Optional[int] = None
        # epoch whose rows this process may still have to end (flush + header) in the store
        self._written_epoch: Optional[int] = None
        self._writes_rows = True  # this rank writes to its store (all_gather: one rank per directory)
        self._updates_header = True  # this rank rewrites its store's header at epoch ends
        self._dummy_batches = 0  # trainer dummy batches seen this epoch (neither read nor written)
        self._train_batch = None  # set by the task.train_step hook: {"ignore_grad", "update_num"}
        # one helper thread: reads a batch's priors during its forward pass and, on CPU, takes
        # the top-k and hands it to the store during the backward pass
        self._helper = None
        self._prefetch = None  # (sample, future of _read_host) for the batch in train_step
        self._cpu_write = None  # future of the last _topk_and_write on the helper (CPU only)
        self._warned_no_host_ids = False
        # Run identity: a uuid made at the first epoch of a new run, recorded in the store's header
        # and carried by every checkpoint (in the train iterator's state, which fairseq restores
        # on resume), so a resume refuses a store that another run has written meanwhile.
        self.run_id: Optional[str] = None
        self._checkpoint_loaded = False  # fairseq restored the train iterator from a checkpoint
        self._checkpoint_run_id: Optional[str] = None  # the run id that checkpoint carried
        self._alpha_log_pending = False  # --max-update schedule: log a_t at the epoch's first update
        self._hook_task(task)
        logger.info(
            "PS-KD: a_T=%s, k=%d, remainder=%s, schedule: %s, store: %s", self.alpha_T, self.topk,
            self.remainder,
            f"a_t = a_T * epoch / {cfg.max_epoch} (--max-epoch)" if self.schedule == "epoch"
            else f"a_t = a_T * update / {cfg.max_update} (--max-update, no --max-epoch)",
            self.store_dir)

    # ---- hooks on the task: fairseq tells only the task the epoch --------------------------

    def _hook_task(self, task):
        pskd = self
        begin_epoch, begin_valid_epoch = task.begin_epoch, task.begin_valid_epoch
        train_step, state_dict = task.train_step, task.state_dict
        load_dataset, get_batch_iterator = task.load_dataset, task.get_batch_iterator

        def pskd_load_dataset(split, *args, **kwargs):
            result = load_dataset(split, *args, **kwargs)
            if split == pskd.cfg.train_subset:
                add_host_ids(task.datasets.get(split))
            return result

        def pskd_get_batch_iterator(dataset, *args, **kwargs):
            epoch_itr = get_batch_iterator(dataset, *args, **kwargs)
            if dataset is not None and dataset is getattr(task, "datasets", {}).get(pskd.cfg.train_subset):
                pskd._carry_run_id(epoch_itr)
            return epoch_itr

        def pskd_begin_epoch(epoch, model):
            pskd.begin_epoch(epoch)
            return begin_epoch(epoch, model)

        def pskd_begin_valid_epoch(epoch, model):
            # every rank drains its writes before validation, i.e. before any checkpoint save
            pskd.flush()
            return begin_valid_epoch(epoch, model)

        def pskd_train_step(sample, model, criterion, optimizer, update_num, ignore_grad=False,
                            **kwargs):
            pskd._train_batch = {"ignore_grad": ignore_grad, "update_num": update_num}
            pskd._log_epoch_alpha(update_num)
            try:
                pskd._start_read(sample)
                return train_step(sample, model, criterion, optimizer, update_num,
                                  ignore_grad=ignore_grad, **kwargs)
            finally:
                pskd._train_batch = None
                pskd._drop_read()

        def pskd_state_dict():
            pskd.flush()  # a checkpoint never refers to priors still in flight
            return state_dict()

        task.load_dataset = pskd_load_dataset
        task.get_batch_iterator = pskd_get_batch_iterator
        add_host_ids(getattr(task, "datasets", {}).get(self.cfg.train_subset))  # already loaded
        task.begin_epoch = pskd_begin_epoch
        task.begin_valid_epoch = pskd_begin_valid_epoch
        task.train_step = pskd_train_step
        task.state_dict = pskd_state_dict
        atexit.register(self.close)

    def _carry_run_id(self, epoch_itr):
        """Make the train iterator's state (saved in every checkpoint as
        extra_state["train_iterator"], and handed back to load_state_dict on every rank when
        fairseq-train resumes) carry this run's identity. fairseq 0.12's trainer saves
        task.state_dict() but never gives it back on resume, so the task state cannot carry it."""
        if getattr(epoch_itr, "_pskd_carries_run_id", False):  # fairseq caches iterators
            return
        pskd = self
        state_dict, load_state_dict = epoch_itr.state_dict, epoch_itr.load_state_dict

        def pskd_state_dict():
            state = state_dict()
            if pskd.run_id is not None and isinstance(state, dict):
                state = dict(state, pskd_run_id=pskd.run_id)
            return state

        def pskd_load_state_dict(state):
            pskd._checkpoint_loaded = True
            pskd._checkpoint_run_id = state.get("pskd_run_id") if isinstance(state, dict) else None
            return load_state_dict(state)

        epoch_itr.state_dict = pskd_state_dict
        epoch_itr.load_state_dict = pskd_load_state_dict
        epoch_itr._pskd_carries_run_id = True

    def begin_epoch(self, epoch):
        """Called (through the task) before training epoch ``epoch`` (1-based) starts.

        Called by every rank with the same epoch, so the collectives here line up."""
        self._open_store()
        # An overflowing forward pass (inf/NaN log-probs, which fairseq skips and goes on) must
        # not end the run: the store drops those sentences after its copy, with no device sync
        # here, and counts them for the epoch summary below.
        self.store.skip_nonfinite = True
        prev = self._written_epoch
        if prev is None:  # this process's first epoch: a new run, or a resume
            self._claim_store(epoch)
        if prev is not None and prev < epoch:
            self._wait_cpu_write()
            self.store.flush()  # this rank's epoch-prev writes are applied and msynced
            counts = _all_gather_object((self._dummy_batches, self.store.skipped_nonfinite(prev)))
            dummies = sum(c[0] for c in counts)
            # shared: each rank dropped rows it trained itself; all_gather: every writer (rank 0
            # among them) saw every rank's rows
            nonfinite = sum(c[1] for c in counts) if self.store_sync == "shared" else counts[0][1]
            # every rank's epoch-prev writes are in the files before any rank reads them
            _barrier()
            if self._updates_header:
                self.store.end_epoch(prev, update_header=True)
            if self._updates_header and _dist_info()[0] == 0:
                buf = self.store.summary()["buffers"][prev % 2]
                written = buf["sentences_written"] if buf["epoch"] == prev else 0
                logger.info("PS-KD epoch %d priors: %d of %d training sentences stored in %s "
                            "(%d ranks, %s sync, %d dummy batches skipped)", prev, written,
                            self.store.num_sentences, self.store.path, _dist_info()[1],
                            self.store_sync, dummies)
                if nonfinite:  # the sentences missing from the count above, and why
                    logger.warning(_nonfinite_warning(prev, nonfinite))
                untrained = self.store.num_sentences - written - nonfinite
                if untrained > 0:
                    logger.warning(_untrained_warning(prev, untrained, self.store.num_sentences))
        self._dummy_batches = 0
        self.epoch = epoch
        self._written_epoch = epoch  # ended (flush, barrier, header) at the next epoch or at exit
        if self.schedule == "epoch":
            logger.info("PS-KD epoch %d: a_t = %.4f", epoch, self.alpha())
        else:  # a_t depends on the update count, which only the epoch's first train_step tells
            self._alpha_log_pending = True

    def _log_epoch_alpha(self, update_num):
        if self._alpha_log_pending and self.epoch is not None:
            self._alpha_log_pending = False
            # the epoch's first update in this process (after a mid-epoch resume, the first after it)
            logger.info("PS-KD epoch %d: a_t = %.4f from update %d of --max-update %d, growing by %.3g "
                        "per update", self.epoch, self.alpha(update_num), update_num + 1,
                        self.cfg.max_update, self.alpha_T / self.cfg.max_update)

    def _claim_store(self, epoch):
        """This process's first epoch: settle the run's identity and check the store against it.

        Epoch 1 is a new run (or one resumed inside epoch 1): priors left in the directory by an
        earlier run must not be read as this run's epoch-1 output, so the store is reset and
        becomes this run's. Forgetting them costs at most a mid-epoch-1 resume some epoch-2 priors
        (those tokens train against y_ls for one epoch; pskd_coverage shows it).

        A later epoch is a resume: the store must hold this run's priors (the identity in the
        checkpoint equals the store's), else the run stops instead of training on another run's."""
        from .store import StoreError

        ckpt = self._checkpoint_run_id
        if epoch == 1:
            # the same id on every rank: rank 0's
            self.run_id = _all_gather_object(ckpt or uuid.uuid4().hex)[0]
            if self._updates_header:
                self.store.reset(run_id=self.run_id)
            _barrier()
            return
        error = None
        if self._updates_header:
            theirs = self.store.run_id
            if ckpt is not None and theirs is not None and theirs != ckpt:
                error = StoreError(
                    f"the PS-KD store at {self.store.path} holds the priors of another training run "
                    f"(run {theirs}), not of the run this checkpoint belongs to (run {ckpt}): another "
                    f"run used this --pskd-store-dir after this run's last epoch, and training epoch "
                    f"{epoch} against its priors would distil that run's model into this one. Delete "
                    f"{self.store.path} (it is only a cache of the last epoch's predictions) or pass "
                    f"an empty --pskd-store-dir: the resumed epoch {epoch} then trains without priors "
                    f"(against the label-smoothed target alone) and stores new ones for epoch {epoch + 1}")
        _raise_on_every_rank(error, "checking the PS-KD store's run")
        self.run_id = _all_gather_object(ckpt or self.store.run_id or uuid.uuid4().hex)[0]
        if not self._updates_header:
            return
        if ckpt is None:
            logger.warning("PS-KD: %s, so the priors in %s cannot be checked to be this run's; they "
                           "are used as they are",
                           "the checkpoint carries no run identity (it was written by an older "
                           "fairseq-pskd)" if self._checkpoint_loaded else
                           f"epoch {epoch} starts without a restored checkpoint", self.store.path)
        if self.store.run_id != self.run_id:  # a new store, or one written before run identities
            self.store.set_run_id(self.run_id)
        if self.store.sentences_written(epoch - 1) == 0:
            logger.warning("PS-KD epoch %d: the store at %s holds no priors of epoch %d (a new or "
                           "emptied store), so this epoch trains against the label-smoothed target "
                           "alone (pskd_coverage 0) and stores new priors for epoch %d", epoch,
                           self.store.path, epoch - 1, epoch + 1)

    def flush(self):
        self._wait_cpu_write()
        if self.store is not None:
            self.store.flush()

    def close(self):
        # At exit (atexit) or by hand; no collectives here: the process group may be gone.
        self._drop_read()
        try:
            self._wait_cpu_write()
        finally:
            if self._helper is not None:
                self._helper.shutdown(wait=True)
                self._helper = None
        if self.store is not None:
            try:
                if self._written_epoch is not None:
                    self.store.end_epoch(self._written_epoch, update_header=self._updates_header)
                    nonfinite = self.store.skipped_nonfinite(self._written_epoch)
                    if nonfinite:  # the last epoch has no next begin_epoch to report it
                        logger.warning(_nonfinite_warning(self._written_epoch, nonfinite))
                    self._written_epoch = None
                self.store.close()
            finally:
                self.store = None

    def _open_store(self):
        """Open (rank 0 / one rank per directory: create) the store; collective on first call."""
        if self.store is not None:
            return
        from .store import StoreLockedError, TopKStore

        dataset = self.task.dataset(self.cfg.train_subset)
        lengths = getattr(dataset, "tgt_sizes", None)
        if lengths is None:
            raise ValueError(
                f"PS-KD needs per-sentence target lengths, but the '{self.cfg.train_subset}' "
                f"dataset ({type(dataset).__name__}) has no tgt_sizes; use a translation task")
        vocab = len(self.task.target_dictionary)
        rank, world = _dist_info()
        # The store is locked by the process that creates / updates its header (one per
        # directory), for as long as it is open: a second run that opens it stops at once with
        # the holder named. The other ranks of this run open it without the lock, after the
        # holder has it (they never open a store their run does not hold).
        holder = f"save dir {self.cfg.save_dir}" + (f", rank {rank} of {world}" if world > 1 else "")
        if world == 1:
            self.store_dir = resolve_store_dir(self.store_dir, 0, 0, 0)
            self.store = TopKStore.open_or_create(self.store_dir, lengths, self.topk, vocab,
                                                  owner=holder)
            return

        import socket

        infos = _all_gather_object({
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "node": _env_int("GROUP_RANK", "NODE_RANK", "SLURM_NODEID"),
            "local_rank": _env_int("LOCAL_RANK"),
            "nonce": uuid.uuid4().hex,
        })
        nonce = infos[0]["nonce"]
        template = self.store_dir
        dirs = [resolve_store_dir(template, r, *_node_and_local_rank(infos, r)) for r in range(world)]
        self.store_dir = dirs[rank]
        if self.store_sync == "shared":
            other = next((r for r in range(world) if dirs[r] != dirs[0]), None)
            if other is not None:  # the same on every rank: all raise
                raise ValueError(
                    f"--pskd-store-sync shared needs one store directory for all ranks, but "
                    f"--pskd-store-dir {template} gives rank 0 {dirs[0]} and rank {other} "
                    f"{dirs[other]}; per-node or per-rank directories need --pskd-store-sync all_gather")
            # rank 0 creates; every rank writes the rows of the sentences it trains
            owner = [0] * world
            self._writes_rows = True
        else:
            # one writer (the lowest rank) per distinct directory on a host; it writes every row
            key = [(infos[r]["host"], os.path.realpath(dirs[r])) for r in range(world)]
            owner = [key.index(key[r]) for r in range(world)]
            self._writes_rows = owner[rank] == rank
        self._updates_header = owner[rank] == rank
        creators = sorted(set(owner))

        # creators one after the other (two "different" directories that are one directory
        # after all must not race in create), then the other ranks open
        error = None
        for c in creators:
            if c == rank:
                try:
                    self.store = TopKStore.open_or_create(self.store_dir, lengths, self.topk, vocab,
                                                          owner=holder)
                except StoreLockedError as e:
                    mine = [r for r in creators if e.holder and (infos[r]["host"], infos[r]["pid"])
                            == (e.holder.get("host"), e.holder.get("pid"))]
                    error = f"{type(e).__name__}: {e}" if not mine else (
                        f"ranks {mine[0]} and {rank} (hosts {infos[mine[0]]['host']}, "
                        f"{infos[rank]['host']}) would both write {self.store_dir}: with "
                        f"--pskd-store-sync all_gather every node needs its own directory, e.g. "
                        f"--pskd-store-dir /local/scratch/pskd_{{node}} (on a filesystem shared "
                        f"by all nodes use --pskd-store-sync shared)")
                except Exception as e:  # reported on every rank below
                    error = f"{type(e).__name__}: {e}"
            _barrier()
        # the other ranks open only a store their run holds
        _raise_collectively(error, "opening the PS-KD store")
        if owner[rank] != rank:
            try:
                self.store = TopKStore.open(self.store_dir, lengths, self.topk, vocab,
                                            readonly=not self._writes_rows, lock=False)
            except Exception as e:
                error = (f"{type(e).__name__}: {e} (rank {rank} on {infos[rank]['host']} cannot "
                         f"open the store rank {owner[rank]} created at {dirs[owner[rank]]}; "
                         + ("with --pskd-store-sync shared the directory must be on a filesystem "
                            "shared by all nodes; without one use --pskd-store-sync all_gather "
                            "and a node-local --pskd-store-dir)" if self.store_sync == "shared"
                            else "is the directory readable?)"))
        _raise_collectively(error, "opening the PS-KD store")

        # Check that the ranks that should share a directory do, and that different writers do
        # not: each creator drops a probe file named after this run and itself.
        def probe(c):
            return os.path.join(self.store_dir, f".pskd-probe-{nonce}-{c}")

        error = None
        if owner[rank] == rank:
            try:
                os.close(os.open(probe(rank), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            except OSError as e:
                error = f"cannot create {probe(rank)}: {e}"
        _barrier()
        if error is None:
            if not os.path.exists(probe(owner[rank])):
                error = (f"rank {rank} on {infos[rank]['host']} sees a different {self.store_dir} "
                         f"than rank {owner[rank]} on {infos[owner[rank]]['host']}: "
                         + ("with --pskd-store-sync shared the store directory must be shared by "
                            "all nodes (a shared filesystem); otherwise use --pskd-store-sync "
                            "all_gather with a node-local --pskd-store-dir" if self.store_sync == "shared"
                            else "ranks on one host must see the same directory"))
            other = [c for c in creators if c != owner[rank] and os.path.exists(probe(c))]
            if other:
                error = (f"ranks {owner[rank]} and {other[0]} (hosts {infos[owner[rank]]['host']}, "
                         f"{infos[other[0]]['host']}) would both write {self.store_dir}: with "
                         f"--pskd-store-sync all_gather every node needs its own directory, e.g. "
                         f"--pskd-store-dir /local/scratch/pskd_{{node}} (on a filesystem shared "
                         f"by all nodes use --pskd-store-sync shared)")
        errors = _all_gather_object(error)
        if owner[rank] == rank:
            try:
                os.unlink(probe(rank))
            except OSError:
                pass
        _raise_if_any(errors, "checking the PS-KD store directories")
        logger.info("PS-KD store (%s sync): %s; this rank %s", self.store_sync, self.store_dir,
                    "writes the rows it trains" if self.store_sync == "shared"
                    else ("writes every rank's rows" if self._writes_rows else
                          f"reads the rows rank {owner[rank]} writes"))

    # ---- schedule --------------------------------------------------------------------------

    def alpha(self, update_num=None):
        if self.schedule == "epoch":
            t = min(self.epoch or 1, self.cfg.max_epoch)
            return self.alpha_T * t / self.cfg.max_epoch
        done = (update_num or 0) + 1
        return self.alpha_T * min(done, self.cfg.max_update) / self.cfg.max_update

    # ---- forward ---------------------------------------------------------------------------

    def forward(self, model, sample, reduce=True):
        net_output = model(**sample["net_input"])
        training = self._train_batch is not None and model.training and torch.is_grad_enabled()
        loss, nll_loss, stats = self.compute_loss(model, net_output, sample, reduce=reduce,
                                                  training=training)
        sample_size = sample["target"].size(0) if self.sentence_avg else sample["ntokens"]
        logging_output = {
            "loss": loss.data,
            "nll_loss": nll_loss.data,
            "ntokens": sample["ntokens"],
            "nsentences": sample["target"].size(0),
            "sample_size": sample_size,
            **stats,
        }
        if self.report_accuracy:
            n_correct, total = self.compute_accuracy(model, net_output, sample)
            logging_output["n_correct"] = utils.item(n_correct.data)
            logging_output["total"] = utils.item(total.data)
        return loss, sample_size, logging_output

    def get_lprobs_and_target(self, model, net_output, sample):
        lprobs = model.get_normalized_probs(net_output, log_probs=True)
        target = model.get_targets(sample, net_output)
        if self.ignore_prefix_size > 0:
            lprobs = lprobs[:, self.ignore_prefix_size:, :].contiguous()
            target = target[:, self.ignore_prefix_size:].contiguous()
        return lprobs, target

    def compute_loss(self, model, net_output, sample, reduce=True, training=False):
        # one log-softmax per step, shared by the loss and the top-k that is stored
        full_lprobs = model.get_normalized_probs(net_output, log_probs=True).float()  # (B, T, V)
        full_target = model.get_targets(sample, net_output)
        lprobs, target = full_lprobs, full_target
        if self.ignore_prefix_size > 0:
            lprobs = lprobs[:, self.ignore_prefix_size:, :].contiguous()
            target = target[:, self.ignore_prefix_size:].contiguous()
        if not training:
            # validation (and any no-grad use): the hard label-smoothed target, like
            # label_smoothed_cross_entropy, so --best-checkpoint-metric compares like with like
            loss, nll_loss, _ = pskd_loss(lprobs.view(-1, lprobs.size(-1)), target.view(-1),
                                          0.0, self.eps, ignore_index=self.padding_idx,
                                          reduce=reduce)
            return loss, nll_loss, {}
        if self.epoch is None:
            raise RuntimeError("PS-KD criterion used for training before task.begin_epoch(): "
                               "train with fairseq-train (or call task.begin_epoch yourself)")
        batch = self._train_batch
        alpha = self.alpha(batch["update_num"])
        dummy = batch["ignore_grad"]  # the trainer's cached dummy batch: no read, no write
        # on the device, for the store's writer to check against the store off the critical path
        lengths = full_target.ne(self.padding_idx).sum(1)
        n_tokens = target.ne(self.padding_idx).sum()
        prior_idx = prior_p = prior_mask = None
        if self._reads_prior(alpha, dummy):
            idx, p, has_prior = self._take_read(sample)
            if self.ignore_prefix_size > 0:
                idx = idx[:, self.ignore_prefix_size:]
                p = p[:, self.ignore_prefix_size:]
            dev = lprobs.device
            prior_idx = _to_device(idx, dev).reshape(-1, idx.size(-1))
            prior_p = _to_device(p, dev).reshape(-1, p.size(-1))
            prior_mask = _to_device(has_prior, dev).unsqueeze(1).expand_as(target).reshape(-1)
        loss, nll_loss, mass = pskd_loss(
            lprobs.view(-1, lprobs.size(-1)), target.view(-1), alpha, self.eps,
            prior_idx, prior_p, prior_mask, self.remainder, ignore_index=self.padding_idx,
            reduce=reduce)
        if dummy:
            self._dummy_batches += 1
        # all_gather: every rank joins the step's collective, a dummy batch with no rows
        if not dummy or self.store_sync == "all_gather":
            ids = torch.from_numpy(self._host_ids(sample)) if not dummy else sample["id"]
            self._write_priors(full_lprobs, ids, lengths, dummy=dummy)
        if prior_mask is not None:
            covered = (prior_mask & target.view(-1).ne(self.padding_idx)).sum()
        else:
            covered = n_tokens.new_zeros(())
        stats = {
            # additive across batches and workers; divided in reduce_metrics. The same keys on
            # every training batch, dummy ones included: under data-parallel training fairseq
            # all-reduces a dict built from each rank's keys (trainer._fast_stat_sync_sum).
            "pskd_ntokens": n_tokens.data,
            "pskd_alpha_sum": alpha * n_tokens.data,
            "pskd_covered": covered.data,
            "pskd_mass_sum": (mass.sum() if not reduce else mass).data,
        }
        return loss, nll_loss, stats

    # ---- reading priors: off the critical path ----------------------------------------------

    def _reads_prior(self, alpha, dummy):
        return alpha > 0 and not dummy and self.epoch is not None and self.epoch > 1

    def _host_ids(self, sample):
        ids = sample.get(HOST_IDS)
        if ids is not None:
            return ids
        if not self._warned_no_host_ids:  # e.g. a dataset loaded around task.load_dataset
            self._warned_no_host_ids = True
            logger.warning("PS-KD: training samples carry no host-side ids (%s); reading them "
                           "back from the device every step, which synchronises a GPU. Load the "
                           "train set with task.load_dataset after building the criterion, or "
                           "wrap its collater with fairseq_pskd.criterion.add_host_ids.", HOST_IDS)
        return sample["id"].cpu().numpy()

    def _read_host(self, ids, width):
        """The batch's priors as CPU tensors (indices, probs (B, width, k), has_prior (B,)).

        Lengths come from the store (the train set's own, checked when it was opened): the
        device-side lengths are checked against them by the writer, off the critical path. The
        rows read are checked too (a top-k of one distribution sums to at most 1, plus float16
        rounding): a store damaged on disk stops the run with the file and sentence named."""
        return self.store.read(self.epoch, ids, max_len=width, max_mass=MAX_PRIOR_MASS)

    def _start_read(self, sample):
        """Called by the train_step hook before the forward pass: read this batch's priors on
        the helper thread while the model runs (numpy's gathers release the GIL)."""
        self._drop_read()
        batch = self._train_batch
        if not isinstance(sample, dict) or HOST_IDS not in sample or "target" not in sample \
                or not self._reads_prior(self.alpha(batch["update_num"]), batch["ignore_grad"]):
            return
        self._prefetch = (sample, self._helper_thread().submit(
            self._read_host, sample[HOST_IDS], sample["target"].size(1)))

    def _take_read(self, sample):
        if self._prefetch is not None and self._prefetch[0] is sample:
            future = self._prefetch[1]
            self._prefetch = None
            return future.result()  # re-raises what the read raised
        return self._read_host(self._host_ids(sample), sample["target"].size(1))

    def _drop_read(self):
        """Forget a read the step did not use (fairseq skipped the batch, e.g. out of memory),
        after it has finished, so no read runs while the store changes epoch."""
        if self._prefetch is not None:
            concurrent.futures.wait([self._prefetch[1]])
            self._prefetch = None

    def _helper_thread(self):
        if self._helper is None:
            self._helper = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="pskd")
        return self._helper

    def _wait_cpu_write(self):
        """Wait for the top-k write handed to the helper thread; re-raise what it raised."""
        if self._cpu_write is not None:
            future, self._cpu_write = self._cpu_write, None
            future.result()

    def _topk(self, lprobs):
        """(indices int32, probabilities float16) of the k most probable tokens, as stored."""
        top_lp, top_idx = lprobs.topk(self.topk, dim=-1)
        return top_idx.to(torch.int32), top_lp.exp().to(torch.float16)

    def _topk_and_write(self, epoch, lprobs, ids, lengths):
        self.store.write(epoch, ids, lengths, *self._topk(lprobs))

    @torch.no_grad()
    def _write_priors(self, full_lprobs, ids, lengths, dummy=False):
        # The full target row, prefix included: the store is keyed by the dataset's target
        # lengths. Top-k on the device; only (B, T, k) crosses to the host.
        if self.store_sync == "shared" or _dist_info()[1] == 1:
            if dummy:
                return
            lprobs = full_lprobs.detach()
            if lprobs.device.type == "cpu" and self.cpu_topk_on_helper:
                # On CPU the top-k costs about as much as the loss (~100 ms of a ~800 ms update
                # of the quickstart's model at k = 8, docs/BENCHMARKS.md): the helper thread takes it while
                # this thread runs the backward pass, which holds lprobs alive anyway. One in
                # flight at a time, so no batch's log-probs outlive the next step.
                self._wait_cpu_write()
                self._cpu_write = self._helper_thread().submit(
                    self._topk_and_write, self.epoch, lprobs, ids, lengths)
            else:
                self._topk_and_write(self.epoch, lprobs, ids, lengths)
            return
        top_idx, top_p = (None, None) if dummy else self._topk(full_lprobs.detach())
        # all_gather: every rank's rows reach every rank; one rank per directory writes them
        all_ids, all_lengths, all_idx, all_p = all_gather_rows(
            ids, lengths, top_idx, top_p, self.store.vocab_size, self.topk)
        if self._writes_rows and all_ids.size:
            self.store.write(self.epoch, torch.from_numpy(all_ids), torch.from_numpy(all_lengths),
                             torch.from_numpy(pad_rows(all_lengths, all_idx)),
                             torch.from_numpy(pad_rows(all_lengths, all_p)))

    def compute_accuracy(self, model, net_output, sample):
        lprobs, target = self.get_lprobs_and_target(model, net_output, sample)
        lprobs, target = lprobs.view(-1, lprobs.size(-1)), target.view(-1)
        mask = target.ne(self.padding_idx)
        n_correct = torch.sum(lprobs.argmax(1).masked_select(mask).eq(target.masked_select(mask)))
        return n_correct, torch.sum(mask)

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        """Aggregate logging outputs from data parallel training."""
        def total(key):
            return utils.item(sum(log.get(key, 0) for log in logging_outputs))

        loss_sum, nll_loss_sum = total("loss"), total("nll_loss")
        ntokens, sample_size = total("ntokens"), total("sample_size")
        metrics.log_scalar("loss", loss_sum / sample_size / math.log(2), sample_size, round=3)
        metrics.log_scalar("nll_loss", nll_loss_sum / ntokens / math.log(2), ntokens, round=3)
        metrics.log_derived("ppl", lambda meters: utils.get_perplexity(meters["nll_loss"].avg))

        pskd_tokens = total("pskd_ntokens")
        if pskd_tokens > 0:  # training batches only; validation logs no PS-KD metrics
            covered = total("pskd_covered")
            metrics.log_scalar("pskd_alpha", total("pskd_alpha_sum") / pskd_tokens, pskd_tokens,
                               round=4)
            metrics.log_scalar("pskd_coverage", covered / pskd_tokens, pskd_tokens, round=4)
            if covered > 0:
                metrics.log_scalar("pskd_topk_mass", total("pskd_mass_sum") / covered, covered,
                                   round=4)

        n_total = total("total")
        if n_total > 0:
            metrics.log_scalar("total", n_total)
            metrics.log_scalar("n_correct", total("n_correct"))
            metrics.log_derived(
                "accuracy",
                lambda meters: round(meters["n_correct"].sum * 100.0 / meters["total"].sum, 3)
                if meters["total"].sum > 0 else float("nan"))

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True


@register_criterion("pskd", dataclass=PSKDConfig)
class PSKDCriterion(PSKDLabelSmoothedCrossEntropyCriterion):
    """``--criterion pskd``: the same criterion under its short name."""
