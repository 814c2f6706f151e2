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


# ---- the loss from the logits, in one pass over each row ----------------------------------------

def pskd_loss_from_logits(logits, target, alpha, epsilon, prior_indices=None, prior_probs=None,
                          prior_mask=None, remainder="current", ignore_index=None, reduce=True):
    """pskd_loss of log_softmax(logits), without the (N, V) log-probabilities.

    Every q_v of PS-KD's target is closed-form given softmax(z) and the stored top-k, and the
    gradient of -sum_v q_v log p_v with respect to the logits z is ``sum(q) * softmax(z) - q``
    (q is a constant of the step: the "current" tail's shape is detached, as in pskd_loss). So
    the forward pass goes once over each row (max, log-sum-exp, the row sum, the tail's sums)
    and the backward pass once more, writing the logits' gradient in their dtype; both work in
    float32 over blocks of rows through reused buffers, and what is kept for the backward pass
    is the logits (which autograd holds anyway), the per-row log-sum-exp and small (N,) and
    (N, k) tensors.

    Args: as pskd_loss, with ``logits`` (N, V) of any float dtype instead of log-probabilities;
    ``prior_indices`` None trains every token against label smoothing alone.

    Returns:
        (loss, nll_loss, topk_mass, lse): loss, nll_loss and topk_mass as pskd_loss (float32);
        lse (N,) float32, the log-sum-exp of each row of the logits (log p_v = z_v - lse), for
        the top-k that is stored.
    """
    n, vocab = logits.shape
    if remainder not in REMAINDERS:
        raise ValueError(f"unknown remainder mode {remainder!r}: use one of {', '.join(REMAINDERS)}")
    f32 = dict(dtype=torch.float32, device=logits.device)
    eps_i = epsilon / (vocab - 1)
    keep = target.ne(ignore_index) if ignore_index is not None else torch.ones(n, dtype=torch.bool,
                                                                             device=logits.device)
    if prior_indices is None or alpha == 0:
        a = torch.zeros(n, **f32)
        idx = torch.zeros(n, 0, dtype=torch.long, device=logits.device)
        coef_k = torch.zeros(n, 0, **f32)
        topk_mass = mass_left = torch.zeros(n, **f32)
        rest = 0.0
        tail = False
    else:
        probs = prior_probs.float()
        idx = prior_indices.long()
        k = probs.size(-1)
        topk_mass = torch.where(prior_mask, probs.sum(-1), torch.zeros(n, **f32))
        a = alpha * prior_mask.float()
        mass_left = (1.0 - topk_mass).clamp_min(0.0)  # float16 top-k sums can exceed 1
        rest, tail = 0.0, remainder == "current"
        if remainder == "renormalize":
            weights = probs / topk_mass.clamp_min(1e-12).unsqueeze(-1)
        elif remainder == "uniform":
            rest = mass_left / (vocab - k) if vocab > k else torch.zeros(n, **f32)
            weights = probs - rest.unsqueeze(-1)  # the all-columns term counts the top-k too
        else:
            weights = probs
        coef_k = a.unsqueeze(-1) * weights
    c_gold = (1.0 - a) * (1.0 - epsilon - eps_i)
    c_all = (1.0 - a) * eps_i + a * rest
    c_left = a * mass_left if tail else None  # the "current" tail's mass, spread like softmax(z)
    if idx.size(1) and prior_mask is not None:
        # rows without a prior get distinct placeholder columns (their weights are 0): the stored
        # columns and the tail then partition every row
        idx = torch.where(prior_mask.unsqueeze(1), idx, torch.arange(idx.size(1), device=idx.device))
    loss, nll, lse = _SoftTargetFromLogits.apply(logits, target, idx, c_gold, c_all, coef_k, c_left, keep)
    topk_mass = topk_mass.masked_fill(~keep, 0.0)
    if reduce:
        return loss.sum(), nll.sum(), topk_mass.sum(), lse
    return loss, nll, topk_mass, lse


def _row_blocks(logits, block_elements=None):
    """Row slices of about 16 MB of float32 on CPU (fresh vocabulary-sized tensors cost more
    in page faults there than the arithmetic), 256 MB on CUDA."""
    n, vocab = logits.shape
    if block_elements is None:
        block_elements = 1 << 26 if logits.is_cuda else 1 << 22
    step = max(1, block_elements // vocab)
    return [slice(s, min(n, s + step)) for s in range(0, n, step)]


def _nonzero_product(coef, x):
    """coef * x, 0 where coef is 0 (a zero weight on a -inf logit gives 0, not NaN)."""
    return torch.where(coef != 0, coef * x, torch.zeros_like(x))


class _SoftTargetFromLogits(torch.autograd.Function):
    """Per row: loss = -sum_v q_v (z_v - lse), with q_v = c_all everywhere, + c_gold at the gold
    column, + coef_k at the stored columns K, and ("current", c_left given) + c_left * w_v
    outside K, w = the softmax of z over the columns outside K; nll = lse - z_gold; rows with
    keep False give 0 and no gradient. The tail's softmax has its own max and log-sum-exp, so a
    tail whose probabilities underflow in float32 still gets its share of q, exactly."""

    @staticmethod
    def forward(ctx, logits, target, idx, c_gold, c_all, coef_k, c_left, keep):
        n, vocab = logits.shape
        f32 = dict(dtype=torch.float32, device=logits.device)
        loss, nll, lse = torch.empty(n, **f32), torch.empty(n, **f32), torch.empty(n, **f32)
        lse_tail = torch.empty(n, **f32) if c_left is not None else None
        shifted = work = None
        with torch.no_grad():
            for rows in _row_blocks(logits):
                z = logits[rows]
                if shifted is None or shifted.size(0) != z.size(0):
                    shifted, work = torch.empty(z.shape, **f32), torch.empty(z.shape, **f32)
                zs = shifted.copy_(z)  # float32, whatever the logits dtype
                m = zs.amax(1, keepdim=True)
                m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
                zs.sub_(m)  # z - max: what log_softmax subtracts first
                gold_s = zs.gather(1, target[rows].unsqueeze(1))
                picked_s = zs.gather(1, idx[rows]) if idx.size(1) else None
                row_sum_s = zs.sum(1, keepdim=True) if torch.any(c_all[rows] != 0) else None
                if c_left is None:
                    s = torch.exp(zs, out=work).sum(1, keepdim=True)
                else:  # the tail's own softmax; the row's sum is the tail's plus the stored columns'
                    t = work.copy_(zs).scatter_(1, idx[rows], float("-inf"))
                    m_t = t.amax(1, keepdim=True)
                    has_tail = torch.isfinite(m_t)
                    m_t = torch.where(has_tail, m_t, torch.zeros_like(m_t))
                    w = t.sub_(m_t).exp_()
                    s_t = w.sum(1, keepdim=True)
                    s = torch.exp(m_t) * s_t + picked_s.exp().sum(1, keepdim=True)
                lse_s = s.log()  # log-sum-exp of the shifted row
                gold = gold_s - lse_s
                total = _nonzero_product(c_gold[rows].unsqueeze(1), gold).squeeze(1)
                if row_sum_s is not None:  # sum_v log p_v
                    total = total + _nonzero_product(c_all[rows].unsqueeze(1), row_sum_s - vocab * lse_s).squeeze(1)
                if picked_s is not None:
                    total = total + _nonzero_product(coef_k[rows], picked_s - lse_s).sum(1)
                if c_left is not None:
                    # sum_{v not in K} w_v log p_v, the weights normalised before the product
                    mean_log_p = torch.bmm(w.unsqueeze(1), zs.unsqueeze(2)).view(-1, 1) / s_t.clamp_min(1.0) - lse_s
                    mean_log_p = torch.where(has_tail, mean_log_p, torch.zeros_like(mean_log_p))
                    total = total + _nonzero_product(c_left[rows].unsqueeze(1), mean_log_p).squeeze(1)
                    lse_tail[rows] = torch.where(has_tail, m + m_t + s_t.log(),
                                                 torch.full_like(m, float("-inf"))).squeeze(1)
                loss[rows] = -total
                nll[rows] = -gold.squeeze(1)
                lse[rows] = (m + lse_s).squeeze(1)
        loss.masked_fill_(~keep, 0.0)
        nll.masked_fill_(~keep, 0.0)
        # q's total mass per row: the gradient is sum(q) * softmax(z) - q
        q_sum = c_gold + c_all * vocab + coef_k.sum(1)
        if c_left is not None:
            c_left = torch.where(torch.isfinite(lse_tail), c_left, torch.zeros_like(c_left))  # no tail: no share
            q_sum = q_sum + c_left
        ctx.save_for_backward(logits, lse, lse_tail, target, idx, c_gold, c_all, coef_k, c_left, q_sum, keep)
        ctx.mark_non_differentiable(nll, lse)
        return loss, nll, lse

    @staticmethod
    def backward(ctx, grad_loss, _grad_nll, _grad_lse):
        logits, lse, lse_tail, target, idx, c_gold, c_all, coef_k, c_left, q_sum, keep = ctx.saved_tensors
        grad = torch.empty_like(logits)
        g = grad_loss.float() * keep.float()
        buf = None
        with torch.no_grad():
            if c_left is not None:
                # p = tail_mass * w outside K (w: the tail's softmax); tail_mass may underflow to 0
                tail_mass = torch.where(torch.isfinite(lse_tail), (lse_tail - lse).exp(), torch.zeros_like(lse))
                scale = q_sum * tail_mass - c_left
                base = torch.where(torch.isfinite(lse_tail), lse_tail, lse)  # an empty tail: any finite
            else:
                scale, base = q_sum, lse
            for rows in _row_blocks(logits):
                z = logits[rows]
                if buf is None or buf.size(0) != z.size(0):
                    buf = torch.empty(z.shape, dtype=torch.float32, device=logits.device)
                e = buf.copy_(z).sub_(base[rows].unsqueeze(1)).exp_()  # softmax(z), or w outside K
                e.mul_(scale[rows].unsqueeze(1)).sub_(c_all[rows].unsqueeze(1))
                if idx.size(1):
                    # the stored columns: sum(q) * p_v - c_all - coef_k, p_v from the full softmax
                    p_k = (logits[rows].gather(1, idx[rows]).float() - lse[rows].unsqueeze(1)).exp()
                    at_k = q_sum[rows].unsqueeze(1) * p_k - c_all[rows].unsqueeze(1) - coef_k[rows]
                    e.scatter_(1, idx[rows], at_k)
                e.scatter_add_(1, target[rows].unsqueeze(1), -c_gold[rows].unsqueeze(1))
                e.mul_(g[rows].unsqueeze(1))
                grad[rows].copy_(e)
        return grad, None, None, None, None, None, None, None
