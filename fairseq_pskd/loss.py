"""The PS-KD loss: the soft-target cross-entropy against PS-KD's target q_t (criterion.py,
docs/METHOD.md), computed without materialising q. Pure functions of tensors: no fairseq state,
no store; the criterion feeds them the current log-probabilities and the priors."""
import torch
from fairseq.criterions.label_smoothed_cross_entropy import label_smoothed_nll_loss

#: What the mass outside the stored top-k, r = 1 - sum(top-k), means (see pskd_loss).
REMAINDERS = ("current", "uniform", "renormalize")


def pskd_loss(lprobs, target, alpha, epsilon, prior_indices=None, prior_probs=None,
              prior_mask=None, remainder="current", ignore_index=None, reduce=True):
    """Soft-target cross-entropy of PS-KD, per token, in float32.

    Args:
        lprobs: (N, V) log-probabilities of the current model.
        target: (N,) gold token ids.
        alpha: a_t, the weight of the prior.
        epsilon: label smoothing of the hard target (as label_smoothed_nll_loss).
        prior_indices, prior_probs: (N, k) stored top-k of the previous epoch's
            distribution (None: no prior for any token).
        prior_mask: (N,) bool, True where the token has a prior.
        remainder: what the mass r = 1 - sum(prior_probs) means: "current" (the default, as
            --pskd-remainder's) spreads it over the V - k other tokens in proportion to the
            current model's own probabilities pi = exp(lprobs), detached (the target asks
            the tail to hold r and leaves its shape to the model); "uniform" spreads it
            evenly over them; "renormalize" drops it and rescales the top-k.
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
    weighted = _nonzero_product(coef, picked).sum(1)
    row_sum = lprobs.sum(-1)
    weighted = weighted + _nonzero_product(coef_all, row_sum)
    weighted = weighted + _nonzero_product(a, tail)
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
            # in place into w's buffer: a batched matrix-vector product is 6 times slower on CPU
            out[rows] = w.mul_(lprobs[rows]).sum(-1)
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
    normalised per row, taken relative to the tail's own maximum so that a tail whose
    probabilities underflow in float32 keeps its shape (as in pskd_loss_from_logits); a tail
    with no finite log-probability stays all zeros, never 0/0. One block on CUDA (no page
    faults there, and few kernel launches); about 16 MB blocks on CPU."""
    n, vocab = lprobs.shape
    step = n if lprobs.is_cuda else max(1, block_elements // vocab)
    buf = None
    with torch.no_grad():
        for start in range(0, n, step):
            rows = slice(start, min(n, start + step))
            lp = lprobs[rows]
            if buf is None or buf.size(0) != lp.size(0):
                buf = torch.empty_like(lp)
            w = buf.copy_(lp)
            w.scatter_(1, indices[rows], float("-inf"))
            top = w.amax(-1, keepdim=True)
            w.sub_(top.nan_to_num_(neginf=0.0)).exp_()  # an empty tail: exp(-inf) = 0
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
    row_sum = epsilon > 0 or remainder == "uniform"  # decided here: no host sync per block
    loss, nll, lse = _SoftTargetFromLogits.apply(logits, target, idx, c_gold, c_all, coef_k, c_left, keep,
                                                 row_sum)
    topk_mass = topk_mass.masked_fill(~keep, 0.0)
    if reduce:
        return loss.sum(), nll.sum(), topk_mass.sum(), lse
    return loss, nll, topk_mass, lse


def _row_blocks(logits, block_elements=None):
    """Row slices of about 1 MB of float32 on CPU, so that the passes over a block run in the
    core's cache (benchmarks/loss_bench.py --block-elements: 0.56 of label smoothing's time at
    k = 8, against 0.64 with 16 MB blocks and 0.71 with 256 KB; docs/BENCHMARKS.md); 256 MB on
    CUDA (few kernel launches)."""
    n, vocab = logits.shape
    if block_elements is None:
        block_elements = 1 << 26 if logits.is_cuda else 1 << 18
    step = max(1, block_elements // vocab)
    return [slice(s, min(n, s + step)) for s in range(0, n, step)]


def _nonzero_product(coef, x):
    """coef * x, 0 where coef is 0 (a zero weight on a -inf logit gives 0, not NaN)."""
    return torch.where(coef != 0, coef * x, torch.zeros_like(x))


def _sync_free(device):
    """Whether the loss must not read anything back to the host (a GPU; meta tensors too)."""
    return device.type != "cpu"


# A tail holding less than this share of the softmax is summed again with its own maximum: its
# terms would otherwise underflow in float32 (e^-87) before they are normalised.
_TINY_TAIL = 1e-25


def _tail_from_its_own_max(zs, idx):
    """(log of the tail's sum of exp(zs) relative to its max, the tail max, mean over the tail
    of zs weighted by the tail's softmax) for rows of shifted logits ``zs``, the stored columns
    ``idx`` excluded; rows without a tail give -inf, 0, 0."""
    t = zs.scatter(1, idx, float("-inf"))
    m_t = t.amax(1, keepdim=True)
    has = torch.isfinite(m_t)
    m_t = torch.where(has, m_t, torch.zeros_like(m_t))
    w = t.sub_(m_t).exp_()
    s_t = w.sum(1, keepdim=True)
    mean_zs = w.mul_(zs).sum(1, keepdim=True) / s_t.clamp_min(1.0)
    log_s_t = torch.where(has, s_t.log(), torch.full_like(s_t, float("-inf")))
    return log_s_t, m_t, torch.where(has, mean_zs, torch.zeros_like(mean_zs))


class _SoftTargetFromLogits(torch.autograd.Function):
    """Per row: loss = -sum_v q_v (z_v - lse), with q_v = c_all everywhere, + c_gold at the gold
    column, + coef_k at the stored columns K, and ("current", c_left given) + c_left * w_v
    outside K, w = the softmax of z over the columns outside K; nll = lse - z_gold; rows with
    keep False give 0 and no gradient. A tail whose probabilities underflow in float32 gets its
    softmax from its own maximum (_TINY_TAIL), so it still holds its share of q, exactly."""

    @staticmethod
    def forward(ctx, logits, target, idx, c_gold, c_all, coef_k, c_left, keep, row_sum):
        n, vocab = logits.shape
        f32 = dict(dtype=torch.float32, device=logits.device)
        loss, nll, lse = torch.empty(n, **f32), torch.empty(n, **f32), torch.empty(n, **f32)
        lse_tail = torch.empty(n, **f32) if c_left is not None else None
        shifted = work = None
        on_cpu = not _sync_free(logits.device)
        with torch.no_grad():
            for rows in _row_blocks(logits):
                z = logits[rows]
                if shifted is None or shifted.size(0) != z.size(0):
                    shifted, work = torch.empty(z.shape, **f32), torch.empty(z.shape, **f32)
                m = z.amax(1, keepdim=True).float()
                m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
                zs = torch.sub(z, m, out=shifted)  # z - max in float32: what log_softmax does first
                e = torch.exp(zs, out=work)
                lse_s = e.sum(1, keepdim=True).log()  # log-sum-exp of the shifted row
                gold = zs.gather(1, target[rows].unsqueeze(1)) - lse_s
                total = _nonzero_product(c_gold[rows].unsqueeze(1), gold).squeeze(1)
                if row_sum:  # sum_v log p_v
                    log_p_sum = zs.sum(1, keepdim=True) - vocab * lse_s
                    total = total + _nonzero_product(c_all[rows].unsqueeze(1), log_p_sum).squeeze(1)
                if idx.size(1):
                    picked = zs.gather(1, idx[rows]) - lse_s
                    total = total + _nonzero_product(coef_k[rows], picked).sum(1)
                if c_left is not None and not on_cpu:
                    # every row's tail from its own maximum: choosing the rows that need it
                    # would cost a host sync per step
                    log_s_t, m_t, mean_zs = _tail_from_its_own_max(zs, idx[rows])
                    log_s_t = log_s_t + m_t
                elif c_left is not None:
                    # the tail's softmax: exp(zs) outside K, normalised before the product
                    e.scatter_(1, idx[rows], 0.0)
                    s_t = e.sum(1, keepdim=True)
                    log_s_t = s_t.log()
                    tiny = (s_t < _TINY_TAIL).squeeze(1)
                    redo = tiny.nonzero().squeeze(1) if torch.any(tiny) else None  # CPU: no sync
                    if redo is not None:  # rare: a model all but certain of the stored tokens
                        r_log, r_max, r_mean = _tail_from_its_own_max(zs[redo], idx[rows][redo])
                    # sum over the tail of exp(zs) * zs, in place (zs is not needed after this;
                    # a batched matrix-vector product is 6 times slower on CPU)
                    mean_zs = zs.mul_(e).sum(1, keepdim=True) / s_t.clamp_min(1e-38)
                    if redo is not None:
                        log_s_t[redo], mean_zs[redo] = r_log + r_max, r_mean
                if c_left is not None:
                    has_tail = torch.isfinite(log_s_t)
                    mean_log_p = torch.where(has_tail, mean_zs - lse_s, torch.zeros_like(mean_zs))
                    total = total + _nonzero_product(c_left[rows].unsqueeze(1), mean_log_p).squeeze(1)
                    lse_tail[rows] = (m + log_s_t).squeeze(1)
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
        with torch.no_grad():
            # outside the stored columns the gradient is scale * exp(z - base) - c_all: base the
            # row's log-sum-exp (exp(z - base) = p) and scale sum(q) - c_left / tail mass; for a
            # tail too small for float32, base its own log-sum-exp (exp(z - base) = its softmax w,
            # p = tail mass * w) and scale sum(q) * tail mass - c_left
            base, scale = lse, q_sum
            if c_left is not None:
                log_tail_mass = lse_tail - lse  # -inf: no tail
                tail_mass = log_tail_mass.exp()
                tiny = (tail_mass < _TINY_TAIL) & torch.isfinite(log_tail_mass)
                base = torch.where(tiny, lse_tail, lse)
                scale = torch.where(tiny, q_sum * tail_mass - c_left,
                                    q_sum - c_left / tail_mass.clamp_min(_TINY_TAIL))
            scale, c_all_g, c_gold_g = scale * g, c_all * g, c_gold * g
            buf = None
            for rows in _row_blocks(logits):
                z = logits[rows]
                if buf is None or buf.size(0) != z.size(0):
                    buf = torch.empty(z.shape, dtype=torch.float32, device=logits.device)
                e = torch.sub(z, base[rows].unsqueeze(1), out=buf).exp_()
                e.mul_(scale[rows].unsqueeze(1)).sub_(c_all_g[rows].unsqueeze(1))
                if idx.size(1):
                    # the stored columns: (sum(q) * p_v - c_all - coef_k) * g, p_v the full softmax
                    p_k = (z.gather(1, idx[rows]).float() - lse[rows].unsqueeze(1)).exp()
                    at_k = q_sum[rows].unsqueeze(1) * p_k - c_all[rows].unsqueeze(1) - coef_k[rows]
                    e.scatter_(1, idx[rows], at_k * g[rows].unsqueeze(1))
                e.scatter_add_(1, target[rows].unsqueeze(1), -c_gold_g[rows].unsqueeze(1))
                grad[rows].copy_(e)
        return grad, None, None, None, None, None, None, None, None
