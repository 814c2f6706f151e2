"""The PS-KD loss: the soft-target cross-entropy against PS-KD's target q_t (criterion.py,
docs/METHOD.md), computed without materialising q. Pure functions of tensors: no fairseq state,
no store; the criterion feeds them the current log-probabilities and the priors."""
import torch
from fairseq.criterions.label_smoothed_cross_entropy import label_smoothed_nll_loss

#: What the mass outside the stored top-k, r = 1 - sum(top-k), means (see pskd_loss).
REMAINDERS = ("current", "uniform", "renormalize")


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
        # fairseq's own function, reduced the way it reduces: label_smoothed_cross_entropy's
        # loss bit for bit
        loss, nll_loss = label_smoothed_nll_loss(lprobs, target, epsilon, ignore_index=ignore_index,
                                                 reduce=reduce)
        if reduce:
            return loss, nll_loss, lprobs.new_zeros(())
        return loss.view(-1), nll_loss.view(-1), lprobs.new_zeros(target.shape)
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
        raise ValueError(f"unknown remainder mode {remainder!r}: use one of {', '.join(REMAINDERS)}")
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
