"""The PS-KD loss from the logits in one pass (loss.pskd_loss_from_logits) against the float64
dense reference that builds q explicitly (tests/_reference.py): the loss and its gradient with
respect to the logits, for every remainder, k = V and small k, stored zeros, float16 top-k sums
above 1, a tail whose probabilities underflow, float16 and bfloat16 logits, padding, rows
without a prior; and what it keeps for the backward pass."""
import fairseq  # noqa: F401  (the package registers its criterion once fairseq is imported)
import pytest
import torch
from _reference import PAD, reference

from fairseq_pskd import loss as loss_mod
from fairseq_pskd.loss import pskd_loss, pskd_loss_from_logits


def case(n=41, vocab=29, k=5, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, vocab, generator=g) * 3).to(dtype)
    target = torch.randint(2, vocab, (n,), generator=g)
    target[[2, 9, 30]] = PAD
    teacher = torch.softmax(torch.randn(n, vocab, generator=g) * 3, -1)
    probs, idx = teacher.topk(k, -1)
    mask = torch.rand(n, generator=g) > 0.3
    return logits, target, idx, probs.half(), mask


def fused(logits, target, alpha, eps, idx, probs, mask, remainder):
    x = logits.clone().requires_grad_(True)
    loss, nll, mass, lse = pskd_loss_from_logits(x, target, alpha, eps, idx, probs, mask,
                                                 remainder=remainder, ignore_index=PAD)
    loss.backward()
    return loss.detach(), x.grad, nll, mass, lse


def check(logits, target, alpha, eps, idx, probs, mask, remainder, atol=2e-4, grad_atol=2e-6):
    ref_loss, ref_grad = reference(logits, target, alpha, eps, idx, probs, mask, remainder)
    loss, grad, nll, mass, lse = fused(logits, target, alpha, eps, idx, probs, mask, remainder)
    assert grad.dtype == logits.dtype and grad.shape == logits.shape
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert float(loss) == pytest.approx(float(ref_loss), abs=atol, rel=1e-6)
    assert torch.allclose(grad.double(), ref_grad, atol=grad_atol, rtol=0), \
        float((grad.double() - ref_grad).abs().max())
    keep = target.ne(PAD)
    z = logits.double()
    assert torch.allclose(lse.double(), torch.logsumexp(z, -1), atol=1e-5)
    gold_nll = -(torch.log_softmax(z, -1).gather(1, target.unsqueeze(1)).squeeze(1)) * keep
    assert float(nll) == pytest.approx(float(gold_nll.sum()), abs=atol)
    return loss, grad


@pytest.mark.parametrize("remainder", ["current", "uniform", "renormalize"])
@pytest.mark.parametrize("k", [1, 5, 29])  # k = V: the whole distribution is stored
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_loss_and_gradient_match_the_dense_reference(remainder, k, eps):
    logits, target, idx, probs, mask = case(k=k)
    check(logits, target, 0.7, eps, idx, probs, mask, remainder)


@pytest.mark.parametrize("remainder", ["current", "uniform", "renormalize"])
def test_equals_the_log_softmax_path(remainder):
    """The criterion's two paths train the same model: pskd_loss of log_softmax(z)."""
    logits, target, idx, probs, mask = case(seed=3)
    loss, grad, *_ = fused(logits, target, 0.4, 0.1, idx, probs, mask, remainder)
    x = logits.clone().requires_grad_(True)
    old, _, _ = pskd_loss(torch.log_softmax(x, -1), target, 0.4, 0.1, idx, probs, mask, remainder=remainder,
                          ignore_index=PAD)
    old.backward()
    assert float(loss) == pytest.approx(float(old), rel=1e-6)
    assert torch.allclose(grad, x.grad, atol=1e-6)


def test_no_prior_is_label_smoothing():
    logits, target, *_ = case(seed=4)
    loss, grad = check(logits, target, 0.7, 0.1, None, None, None, "current")
    from fairseq.criterions.label_smoothed_cross_entropy import label_smoothed_nll_loss
    x = logits.clone().requires_grad_(True)
    ls, _ = label_smoothed_nll_loss(torch.log_softmax(x, -1), target, 0.1, ignore_index=PAD)
    ls.backward()
    assert float(loss) == pytest.approx(float(ls), rel=1e-6) and torch.allclose(grad, x.grad, atol=1e-6)
    # rows without a prior among rows with one: those rows get label smoothing's gradient
    logits, target, idx, probs, mask = case(seed=5)
    mask[:] = False
    _, grad_masked, *_ = fused(logits, target, 0.7, 0.1, idx, probs, mask, "current")
    _, grad_none, *_ = fused(logits, target, 0.7, 0.1, None, None, None, "current")
    assert torch.allclose(grad_masked, grad_none, atol=1e-7)


@pytest.mark.parametrize("remainder", ["current", "uniform", "renormalize"])
def test_stored_zeros_and_float16_sums_above_one(remainder):
    logits, target, idx, probs, mask = case(k=4, seed=6)
    probs = probs.float()
    probs[:5, 2:] = 0.0  # stored zeros (a prior with fewer than k tokens of mass)
    probs[5:12] = torch.tensor([0.5, 0.3, 0.15, 0.0625])  # sums to 1.0125 in float16 rounding
    check(logits, target, 0.9, 0.1, idx, probs.half(), mask, remainder)


def test_current_tail_that_underflows_stays_exact():
    """All mass on the stored columns: the tail's probabilities underflow in float32; its weights
    are normalised before use, so the loss and the gradient stay finite and exact."""
    logits, target, idx, probs, mask = case(k=3, seed=7)
    logits[:, :] = -60.0
    logits.scatter_(1, idx, 60.0)  # softmax outside K: about e^-120, 0 in float32 after exp
    check(logits, target, 0.8, 0.1, idx, probs, mask, "current", atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("remainder", ["current", "uniform"])
def test_half_precision_logits(dtype, remainder):
    """fp16 / bf16 logits: float32 inside, the gradient written in the logits' dtype (its error
    is that dtype's rounding of the exact gradient)."""
    logits, target, idx, probs, mask = case(seed=8, dtype=dtype)
    ulp = {torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    check(logits, target, 0.6, 0.1, idx, probs, mask, remainder, grad_atol=ulp)


def test_blocks_of_rows_give_the_same_result(monkeypatch):
    logits, target, idx, probs, mask = case(n=50, seed=9)
    whole = fused(logits, target, 0.5, 0.1, idx, probs, mask, "current")
    blocks = loss_mod._row_blocks
    monkeypatch.setattr(loss_mod, "_row_blocks", lambda z: blocks(z, block_elements=7 * z.size(1)))
    assert len(loss_mod._row_blocks(logits)) == 8
    split = fused(logits, target, 0.5, 0.1, idx, probs, mask, "current")
    assert float(whole[0]) == pytest.approx(float(split[0]), rel=1e-7)
    assert torch.equal(whole[1], split[1])


def test_keeps_no_vocabulary_sized_float32_tensor():
    """For the backward pass: the logits themselves (autograd holds them anyway), then per-row
    and (N, k) tensors only."""
    logits, target, idx, probs, mask = case(n=64, vocab=500, k=8, seed=10, dtype=torch.float16)
    x = logits.clone().requires_grad_(True)
    loss, *_ = pskd_loss_from_logits(x, target, 0.5, 0.1, idx, probs, mask, remainder="current",
                                     ignore_index=PAD)
    node = loss.grad_fn
    while node is not None and not type(node).__name__.startswith("_SoftTargetFromLogits"):
        node = node.next_functions[0][0]
    assert node is not None
    saved = [t for t in node.saved_tensors if t is not None]
    big = [t for t in saved if t.numel() >= 64 * 500]
    assert len(big) == 1 and big[0].dtype == torch.float16 and big[0].data_ptr() == x.data_ptr()
    assert all(t.numel() <= 64 * 8 for t in saved if t is not big[0])


@pytest.mark.parametrize("underflow", [False, True])
def test_the_sync_free_tail_of_the_gpu_path(monkeypatch, underflow):
    """On a GPU every row's tail is summed from its own maximum (choosing the rows that need it
    would read back to the host): the same code, run here on the CPU, is exact too."""
    monkeypatch.setattr(loss_mod, "_sync_free", lambda device: True)
    logits, target, idx, probs, mask = case(k=3, seed=11)
    if underflow:
        logits[:, :] = -60.0
        logits.scatter_(1, idx, 60.0)
    check(logits, target, 0.8, 0.1, idx, probs, mask, "current", atol=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (benchmarks/gpu_check.sh runs it)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("remainder", ["current", "uniform", "renormalize"])
def test_on_cuda_as_on_the_cpu(dtype, remainder):
    """The same function on a GPU (the tail of every row from its own maximum, one block):
    the loss and gradient of the CPU run, to the dtype's rounding."""
    logits, target, idx, probs, mask = case(n=300, vocab=1000, k=8, seed=12, dtype=dtype)
    cpu = fused(logits, target, 0.6, 0.1, idx, probs, mask, remainder)
    gpu = fused(logits.cuda(), target.cuda(), 0.6, 0.1, idx.cuda(), probs.cuda(), mask.cuda(), remainder)
    assert float(gpu[0]) == pytest.approx(float(cpu[0]), rel=1e-5)
    ulp = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    assert torch.allclose(gpu[1].cpu().float(), cpu[1].float(), atol=ulp)
