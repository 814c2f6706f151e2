"""loss.pskd_loss (the log-softmax path) against the dense reference of tests/_reference.py:
the loss and its gradient for every remainder, k = V and small k, the documented error bound of
the uniform remainder, label smoothing at a_t = 0, rows without a prior, padding, float16 priors."""
import pytest
import torch
from _reference import PAD, dense_loss, dense_prior, reference
from fairseq.criterions.label_smoothed_cross_entropy import label_smoothed_nll_loss

from fairseq_pskd.loss import pskd_loss


def make_case(n=37, vocab=23, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, vocab, generator=g) * 2
    target = torch.randint(2, vocab, (n,), generator=g)
    target[[3, 7, 20]] = PAD  # padding positions
    teacher = torch.softmax(torch.randn(n, vocab, generator=g) * 3, -1)
    mask = torch.rand(n, generator=g) > 0.25  # some tokens have no prior
    return logits, target, teacher, mask


def run_pskd(logits, target, alpha, eps, idx, probs, mask, remainder):
    x = logits.clone().requires_grad_(True)
    loss, nll, _ = pskd_loss(torch.log_softmax(x, -1), target, alpha, eps, idx, probs, mask,
                             remainder=remainder, ignore_index=PAD)
    loss.backward()
    return loss.detach(), nll.detach(), x.grad


def assert_matches(loss, grad, ref):
    """pskd_loss's loss and gradient (float32) against the float64 reference's (loss, grad)."""
    ref_loss, ref_grad = ref
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("remainder", ["uniform", "current", "renormalize"])
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("alpha", [0.3, 0.8, 1.0])
def test_full_k_matches_dense_reference(remainder, eps, alpha):
    logits, target, teacher, mask = make_case()
    vocab = logits.size(1)
    probs, idx = teacher.topk(vocab, -1)  # k = V: the stored prior is the whole distribution
    loss, _, grad = run_pskd(logits, target, alpha, eps, idx, probs, mask, remainder)
    assert_matches(loss, grad, dense_loss(logits, target, alpha, eps, teacher, mask))


@pytest.mark.parametrize("remainder", ["uniform", "current", "renormalize"])
@pytest.mark.parametrize("k", [1, 4, 8])
def test_small_k_is_exact_for_the_distribution_it_stands_for(remainder, k):
    """With k < V the loss is exactly the dense loss of the densified top-k (no hidden
    approximation); for "current" the gradient also matches a target built with a detached
    softmax, i.e. no gradient flows through the tail's shape."""
    logits, target, teacher, mask = make_case()
    probs, idx = teacher.topk(k, -1)
    loss, _, grad = run_pskd(logits, target, 0.8, 0.1, idx, probs, mask, remainder)
    assert_matches(loss, grad, reference(logits, target, 0.8, 0.1, idx, probs, mask, remainder))


@pytest.mark.parametrize("k", [1, 2, 4, 8, 16])
def test_small_k_error_bound_uniform(k):
    """The bound docs/METHOD.md states: per token, |L_k - L_full| <= a * r * (max - min of -log p
    over the tokens outside the top-k), r the mass outside the top-k; it vanishes as k -> V."""
    logits, target, teacher, mask = make_case(seed=3)
    mask[:] = True
    target[:] = torch.clamp(target, min=2)
    alpha = 0.8
    lprobs = torch.log_softmax(logits, -1)
    probs, idx = teacher.topk(k, -1)
    approx, _, _ = pskd_loss(lprobs, target, alpha, 0.0, idx, probs, mask, remainder="uniform",
                             reduce=False)
    full, _ = dense_loss(logits, target, alpha, 0.0, teacher, mask, reduce=False)
    outside = torch.ones_like(lprobs, dtype=torch.bool).scatter_(1, idx, False)
    neg_lp = -lprobs
    spread = (neg_lp.masked_fill(~outside, -1e9).max(-1).values
              - neg_lp.masked_fill(~outside, 1e9).min(-1).values)
    bound = alpha * (1 - probs.sum(-1)) * spread
    assert torch.all((approx.double() - full).abs() <= bound + 1e-5)


def test_alpha_zero_equals_label_smoothed_cross_entropy():
    logits, target, teacher, mask = make_case()
    probs, idx = teacher.topk(5, -1)
    for eps in (0.0, 0.1):
        loss, nll, grad = run_pskd(logits, target, 0.0, eps, idx, probs, mask, "uniform")
        x = logits.clone().requires_grad_(True)
        ref, ref_nll = label_smoothed_nll_loss(torch.log_softmax(x, -1), target, eps, ignore_index=PAD)
        ref.backward()
        # bit for bit: the same function, reduced the same way
        assert torch.equal(loss, ref.detach()) and torch.equal(nll, ref_nll.detach())
        assert torch.equal(grad, x.grad)


def test_no_prior_tokens_get_the_hard_target():
    logits, target, teacher, _ = make_case()
    probs, idx = teacher.topk(5, -1)
    none = torch.zeros(len(target), dtype=torch.bool)
    loss, _, mass = pskd_loss(torch.log_softmax(logits, -1), target, 0.9, 0.1, idx, probs, none,
                              remainder="uniform", ignore_index=PAD)
    ref, _ = label_smoothed_nll_loss(torch.log_softmax(logits, -1), target, 0.1, ignore_index=PAD)
    torch.testing.assert_close(loss, ref)
    assert mass.item() == 0.0


def test_padding_contributes_nothing():
    logits, target, teacher, mask = make_case()
    probs, idx = teacher.topk(4, -1)
    lprobs = torch.log_softmax(logits, -1)
    full, _, _ = pskd_loss(lprobs, target, 0.8, 0.1, idx, probs, mask, remainder="uniform",
                           ignore_index=PAD)
    keep = target.ne(PAD)
    only, _, _ = pskd_loss(lprobs[keep], target[keep], 0.8, 0.1, idx[keep], probs[keep], mask[keep],
                           remainder="uniform", ignore_index=PAD)
    torch.testing.assert_close(full, only)
    per_tok, _, _ = pskd_loss(lprobs, target, 0.8, 0.1, idx, probs, mask, remainder="uniform",
                              ignore_index=PAD, reduce=False)
    assert torch.all(per_tok[~keep] == 0)


@pytest.mark.parametrize("remainder", ["uniform", "current", "renormalize"])
def test_float16_priors_and_zero_probabilities_stay_finite(remainder):
    """fp16 priors (exact zeros from underflow, rounded sums above 1) against a near-impossible
    token (log-prob -1e4, what a float16 logit at its limit gives): no NaN or inf."""
    n, vocab = 6, 11
    logits = torch.randn(n, vocab)
    logits[:, 5] = -1e4
    x = logits.clone().requires_grad_(True)
    idx = torch.tensor([[5, 0, 2, 3]] * n)
    probs = torch.tensor([[1e-9, 0.6, 0.3, 0.1]] * n).half()  # 1e-9 underflows to 0 in fp16
    probs[0] = torch.tensor([0.0, 0.7, 0.2, 0.1004]).half()  # sums above 1 after rounding
    assert probs[1, 0].item() == 0.0 and probs[0].float().sum() > 1
    target = torch.tensor([2, 3, 4, 6, 7, PAD])
    mask = torch.ones(n, dtype=torch.bool)
    loss, nll, mass = pskd_loss(torch.log_softmax(x, -1), target, 0.8, 0.1, idx, probs, mask,
                                remainder=remainder, ignore_index=PAD)
    assert torch.isfinite(loss) and torch.isfinite(nll) and torch.isfinite(mass)
    loss.backward()
    assert torch.isfinite(x.grad).all()


def test_current_remainder_keeps_the_tail_shape_of_the_current_model():
    """The defining property: "current" asks the tail to hold the mass r and leaves its shape
    to the model. A model whose top-k equals the prior (so its tail already holds r) gets no
    gradient from the prior at all; the uniform tail would still pull its tail flat."""
    n, vocab, k = 5, 13, 3
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(n, vocab, generator=g)
    p = torch.softmax(logits, -1)
    probs, idx = p.topk(k, -1)  # the prior is the current model itself, cut to top-k
    target = torch.randint(2, vocab, (n,), generator=g)
    mask = torch.ones(n, dtype=torch.bool)
    # a = 1, no label smoothing: q = P~ = p exactly, so the gradient of CE(q, p) is p - q = 0
    _, _, grad = run_pskd(logits, target, 1.0, 0.0, idx, probs, mask, "current")
    torch.testing.assert_close(grad, torch.zeros_like(grad), atol=1e-6, rtol=0)
    # the uniform tail is not: it pulls the tail towards flat
    _, _, grad_u = run_pskd(logits, target, 1.0, 0.0, idx, probs, mask, "uniform")
    assert grad_u.abs().max() > 1e-3


def edge_case(underflow=False):
    """r = 0 in row 0 (the top-k holds all the mass), rows without prior (3) and padding (5);
    with ``underflow``, row 1's tail tokens have probabilities far below float32's smallest."""
    n, vocab = 6, 9
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(n, vocab, generator=g)
    if underflow:
        logits[1, 3:] = -200.0  # e^-200: 0 in float32, not in float64
    idx = torch.tensor([[0, 1, 2]] * n)
    probs = torch.tensor([[0.5, 0.3, 0.1]] * n)
    probs[0] = torch.tensor([0.5, 0.3, 0.2])  # r = 0
    target = torch.tensor([4, 5, 0, 6, 7, PAD])
    mask = torch.tensor([True, True, True, False, True, True])
    return logits, target, idx, probs, mask


def test_current_remainder_edge_cases_are_finite_and_exact():
    logits, target, idx, probs, mask = edge_case()
    loss, _, grad = run_pskd(logits, target, 0.8, 0.1, idx, probs, mask, "current")
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert dense_prior(idx, probs, logits.size(1), "current", logits)[0, 3:].sum() == 0  # r = 0
    assert_matches(loss, grad, reference(logits, target, 0.8, 0.1, idx, probs, mask, "current"))
    assert torch.all(grad[5] == 0)  # padding


def test_current_tail_that_underflows_in_float32_keeps_its_share():
    """The tail holds r even where every tail probability underflows in float32: its shape is
    the model's softmax over the tail, which is defined (here e^-200 each, equal shares)."""
    logits, target, idx, probs, mask = edge_case(underflow=True)
    loss, _, grad = run_pskd(logits, target, 0.8, 0.1, idx, probs, mask, "current")
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert_matches(loss, grad, reference(logits, target, 0.8, 0.1, idx, probs, mask, "current"))


def test_current_remainder_over_row_blocks(monkeypatch):
    """On CPU the tail is computed over blocks of rows (one reused buffer): blocks of 2 rows
    give the same loss and gradient as the dense target."""
    from fairseq_pskd import loss

    monkeypatch.setattr(loss._tail_weights, "__defaults__", (50,))  # 50 // 23 = 2 rows a block
    logits, target, teacher, mask = make_case()
    probs, idx = teacher.topk(4, -1)
    loss, _, grad = run_pskd(logits, target, 0.8, 0.1, idx, probs, mask, "current")
    assert_matches(loss, grad, reference(logits, target, 0.8, 0.1, idx, probs, mask, "current"))
