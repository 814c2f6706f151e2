"""The dense reference of the PS-KD loss, written out over the whole vocabulary in float64 (the
definition in docs/METHOD.md, "Per token"): the tests of loss.pskd_loss, loss.pskd_loss_from_logits
and of the criterion inside fairseq compare with it.

    q = (1 - a) * y_ls + a * P~        loss = -sum_v q_v log p_v, q held constant

y_ls is fairseq's label-smoothed one-hot and P~ the distribution a stored top-k (K, its
probabilities P_K, r = 1 - sum P_K) stands for, in each ``--pskd-remainder`` mode:

* ``uniform``: r / (V - k) on each token outside K;
* ``current``: r * pi_v / sum_{u not in K} pi_u on each token v outside K, pi the current
  model's softmax, detached. The tail's softmax is taken from the tail's own maximum, so it
  holds r whenever one token outside K has a finite logit, however small its probability (no
  float32 underflow here); only a tail without a finite logit (k = V) keeps none;
* ``renormalize``: nothing outside K, P_K rescaled to sum to 1.
"""
import torch

PAD = 1  # fairseq's padding index

REMAINDERS = ("current", "uniform", "renormalize")


def dense_prior(idx, probs, vocab, remainder, logits=None):
    """(N, V) float64: the distribution the stored top-k ``idx``, ``probs`` (N, k) stands for;
    "current" needs the current model's ``logits`` (N, V) (log-probabilities do as well)."""
    idx, probs = idx.long(), probs.double()  # as the store returns them: int32, float16
    n, k = idx.shape
    mass = probs.sum(-1)
    left = (1.0 - mass).clamp_min(0.0)  # float16 top-k sums can exceed 1
    in_k = torch.zeros(n, vocab, dtype=torch.bool).scatter_(1, idx, True)
    zeros = torch.zeros(n, vocab, dtype=torch.float64)
    if remainder == "uniform":
        tail = torch.where(in_k, zeros, (left / max(vocab - k, 1)).unsqueeze(1).expand(n, vocab))
    elif remainder == "current":
        z = logits.detach().double().masked_fill(in_k, float("-inf"))
        has_tail = torch.isfinite(z).any(-1, keepdim=True)
        shape = torch.softmax(z.masked_fill(~has_tail, 0.0), -1)  # 0 on K; a row without tail: unused
        tail = torch.where(has_tail, left.unsqueeze(1) * shape, zeros)
    elif remainder == "renormalize":
        tail = zeros
        probs = probs / mass.clamp_min(1e-12).unsqueeze(1)
    else:
        raise ValueError(f"unknown remainder {remainder!r}")
    return tail.scatter(1, idx, probs)


def dense_target(target, vocab, alpha, eps, prior=None, mask=None):
    """q (N, V) float64: (1 - a) * y_ls + a * ``prior``, a = ``alpha`` on the rows where ``mask``
    is True and 0 elsewhere (and everywhere without a prior)."""
    n = target.size(0)
    y = torch.full((n, vocab), eps / (vocab - 1), dtype=torch.float64)
    y[torch.arange(n), target] = 1.0 - eps
    if prior is None:
        return y
    has = torch.ones(n, dtype=torch.float64) if mask is None else mask.double()
    a = alpha * has.unsqueeze(1)
    return (1 - a) * y + a * prior.double()


def dense_loss(logits, target, alpha, eps, prior=None, mask=None, pad=PAD, reduce=True):
    """(loss, gradient with respect to ``logits``), float64: -sum_v q_v log_softmax(logits)_v per
    token, 0 at padding, summed when ``reduce`` (the gradient is the sum's); q from dense_target,
    held constant. ``logits`` may be log-probabilities (their log_softmax is themselves)."""
    z = logits.detach().double().requires_grad_(True)
    q = dense_target(target, z.size(1), alpha, eps, prior, mask)
    lprobs = torch.log_softmax(z, -1)
    # where(), not a product: a zero weight on a -inf log-prob gives 0, not NaN
    per_token = -torch.where(q != 0, q * lprobs, torch.zeros_like(lprobs)).sum(-1)
    if pad is not None:
        per_token = per_token.masked_fill(target.eq(pad), 0.0)
    per_token.sum().backward()
    loss = per_token.sum() if reduce else per_token
    return loss.detach(), z.grad


def reference(logits, target, alpha, eps, idx, probs, mask, remainder, pad=PAD, reduce=True):
    """dense_loss against the distribution the stored top-k stands for (``idx`` None: no prior,
    label smoothing alone)."""
    prior = None if idx is None else dense_prior(idx, probs, logits.size(1), remainder, logits)
    return dense_loss(logits, target, alpha, eps, prior, mask, pad=pad, reduce=reduce)
