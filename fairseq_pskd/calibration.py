"""Calibration and selective-prediction metrics of token predictions: reliability bins, ECE,
AURC / E-AURC, and the reliability diagram; of whole translations: how a sentence score ranks
them by their sentence chrF (docs/EVALUATION.md gives the definitions).

Plain numpy, no fairseq and no torch, so other code can reuse them; matplotlib is imported only
by ``plot_reliability``. ``python -m fairseq_pskd.evaluate calibration`` computes them for a
checkpoint with teacher forcing.
"""
import math
from pathlib import Path

import numpy as np

DEFAULT_BINS = 10  # PS-KD reference code (utils/metric.py) uses bin_size=0.1


# --------------------------------------------------------------------------------------
# Calibration / selective-prediction metrics (pure numpy)
# --------------------------------------------------------------------------------------

def _as_numpy(x, dtype):
    if hasattr(x, "detach"):  # torch tensor, without importing torch here
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype).reshape(-1)


def _check_inputs(confidence, correct):
    confidence = _as_numpy(confidence, np.float64)
    correct = _as_numpy(correct, bool)
    if confidence.shape != correct.shape:
        raise ValueError(f"confidence has {confidence.size} values but correct has {correct.size}")
    if confidence.size == 0:
        raise ValueError("no predictions to evaluate")
    return confidence, correct


def reliability_bins(confidence, correct, n_bins=DEFAULT_BINS):
    """Equal-width confidence bins over [0, 1].

    Bin ``i`` holds the predictions with ``edges[i] < confidence <= edges[i+1]`` (the
    PS-KD / Guo et al. convention); confidence 0 goes to the first bin and values
    outside [0, 1] (rounding) are clipped into the end bins.

    Returns a dict of numpy arrays: ``edges`` (n_bins+1), ``counts``, ``accuracy`` and
    ``confidence`` (per-bin means; NaN for empty bins), and ``total``.
    """
    if int(n_bins) < 1:
        raise ValueError("n_bins must be >= 1")
    n_bins = int(n_bins)
    confidence, correct = _check_inputs(confidence, correct)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # searchsorted(side="left") counts the inner edges strictly below the value, which
    # gives exactly the right-closed bins (lo, hi], using the same edges we report.
    idx = np.searchsorted(edges[1:-1], confidence, side="left")
    counts = np.bincount(idx, minlength=n_bins).astype(np.int64)
    sum_conf = np.bincount(idx, weights=confidence, minlength=n_bins)
    sum_correct = np.bincount(idx, weights=correct.astype(np.float64), minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = np.where(counts > 0, sum_correct / counts, np.nan)
        conf = np.where(counts > 0, sum_conf / counts, np.nan)
    return {"edges": edges, "counts": counts, "accuracy": acc, "confidence": conf,
            "total": int(confidence.size)}


def expected_calibration_error(confidence, correct, n_bins=DEFAULT_BINS):
    """ECE = sum_b |B_b|/N * |acc(B_b) - conf(B_b)| over equal-width bins (a fraction, not %).

    Empty bins contribute nothing.
    """
    return _ece_from_bins(reliability_bins(confidence, correct, n_bins))


def _ece_from_bins(bins):
    counts = np.asarray(bins["counts"], dtype=np.float64)
    filled = counts > 0
    gaps = np.abs(np.asarray(bins["accuracy"], dtype=np.float64)[filled]
                  - np.asarray(bins["confidence"], dtype=np.float64)[filled])
    return float(np.sum(counts[filled] * gaps) / counts.sum())


def risk_coverage_curve(confidence, correct):
    """Selective risk at each coverage i/n, keeping the i most confident predictions.

    Ties in confidence keep their input order (stable sort), so the curve is deterministic.
    Returns ``(coverage, risk)``, both of length n.
    """
    confidence, correct = _check_inputs(confidence, correct)
    return _risk_coverage(confidence, (~correct).astype(np.float64))


def _risk_coverage(confidence, risk):
    """(coverage, mean risk of the i most confident) for i = 1..n; ties keep their order."""
    order = np.argsort(-confidence, kind="stable")
    kept = np.arange(1, confidence.size + 1)
    return kept / confidence.size, np.cumsum(risk[order]) / kept


def aurc(confidence, correct):
    """Area under the risk-coverage curve: the mean of the selective risks at coverages
    1/n, 2/n, ..., 1 (Geifman et al. 2019; PS-KD reference code). Lower is better."""
    return float(np.mean(risk_coverage_curve(confidence, correct)[1]))


def optimal_aurc(correct):
    """AURC of a perfect confidence ranking (every correct prediction ranked above every
    error): (1/n) * sum_{k=1..e} k / (n - e + k) for e errors out of n. This is the exact
    finite-sample optimum the PS-KD code subtracts (not the r + (1-r)ln(1-r) limit)."""
    correct = _as_numpy(correct, bool)
    if correct.size == 0:
        raise ValueError("no predictions to evaluate")
    n, e = correct.size, int(np.sum(~correct))
    k = np.arange(1, e + 1, dtype=np.float64)
    return float(np.sum(k / (n - e + k)) / n)


def excess_aurc(confidence, correct):
    """E-AURC = AURC - optimal AURC: the part of AURC due to a bad ranking rather than to
    the error rate itself. 0 for a perfect ranking."""
    return aurc(confidence, correct) - optimal_aurc(correct)


def spearman(x, y):
    """Spearman's rank correlation of x and y (ties get their mean rank); nan when either is
    constant."""
    x, y = _as_numpy(x, np.float64), _as_numpy(y, np.float64)
    if x.shape != y.shape or x.ndim != 1 or x.size < 2:
        raise ValueError(f"spearman needs two 1-d arrays of one length >= 2, got {x.shape} and {y.shape}")
    rx, ry = _mean_ranks(x), _mean_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = math.sqrt(float(np.sum(rx * rx) * np.sum(ry * ry)))
    return float(np.sum(rx * ry) / denom) if denom > 0 else float("nan")


def _mean_ranks(v):
    order = np.argsort(v, kind="stable")
    ranks = np.empty(v.size, dtype=np.float64)
    ranks[order] = np.arange(1, v.size + 1)
    _, inverse, counts = np.unique(v, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return (sums / counts)[inverse]


def sentence_confidence(score, chrf):
    """How well a per-sentence model score tells good translations from bad ones, as a user who
    trusts the high-scoring ones (and sends the rest to a post-editor) meets it.

    ``score``: one confidence per hypothesis (e.g. its length-normalised log-probability);
    ``chrf``: its sentence-level chrF (0-100). Returns the Spearman correlation of the two
    (higher is better) and the sentence-level AURC: the mean risk, risk = 1 - chrF / 100, of the
    i highest-scoring hypotheses, averaged over i = 1..n (lower is better).
    """
    score, chrf = _as_numpy(score, np.float64), _as_numpy(chrf, np.float64)
    if score.shape != chrf.shape or score.ndim != 1 or score.size == 0:
        raise ValueError(f"one score per chrF needed, got {score.shape} and {chrf.shape}")
    if not (np.all(np.isfinite(score)) and np.all((chrf >= 0) & (chrf <= 100))):
        raise ValueError("scores must be finite and chrF within [0, 100]")
    risk = 1.0 - chrf / 100.0
    return {
        "sentence_spearman": spearman(score, chrf) if score.size > 1 else float("nan"),
        "sentence_aurc": float(np.mean(_risk_coverage(score, risk)[1])),
    }


def calibration_metrics(confidence, correct, nll_sum=None, n_bins=DEFAULT_BINS):
    """All token-level metrics of one evaluation, as plain floats (fractions, not %)."""
    confidence, correct = _check_inputs(confidence, correct)
    bins = reliability_bins(confidence, correct, n_bins)
    ece = _ece_from_bins(bins)
    a, opt = aurc(confidence, correct), optimal_aurc(correct)
    out = {
        "num_tokens": int(confidence.size),
        "bins": int(n_bins),
        "ece": ece,
        "accuracy": float(np.mean(correct)),
        "mean_confidence": float(np.mean(confidence)),
        "aurc": a,
        "optimal_aurc": opt,
        "eaurc": a - opt,
    }
    if nll_sum is not None:
        out["nll"] = float(nll_sum) / confidence.size
        out["ppl"] = float(math.exp(min(out["nll"], 700.0)))
    out["reliability"] = {
        "edges": bins["edges"].tolist(),
        "counts": bins["counts"].tolist(),
        # JSON has no NaN: empty bins are null
        "accuracy": [None if np.isnan(v) else float(v) for v in bins["accuracy"]],
        "confidence": [None if np.isnan(v) else float(v) for v in bins["confidence"]],
    }
    return out


# --------------------------------------------------------------------------------------
# Reliability diagram
# --------------------------------------------------------------------------------------

def plot_reliability(bins, path, title=None, ece=None):
    """Reliability diagram (per-bin accuracy vs confidence, gap to the diagonal) above a
    histogram of the confidences; ``bins`` as returned by ``reliability_bins``."""
    from .plots import pyplot

    plt = pyplot()

    edges = np.asarray(bins["edges"], dtype=float)
    counts = np.asarray(bins["counts"], dtype=float)
    acc = np.array([np.nan if v is None else v for v in bins["accuracy"]], dtype=float)
    conf = np.array([np.nan if v is None else v for v in bins["confidence"]], dtype=float)
    width = np.diff(edges)
    left = edges[:-1]
    filled = counts > 0
    if ece is None:
        ece = _ece_from_bins({"counts": counts, "accuracy": acc, "confidence": conf})

    fig, (ax, hist) = plt.subplots(2, 1, figsize=(5.5, 7), sharex=True,
                                   gridspec_kw={"height_ratios": [3, 1.3]})
    ax.bar(left[filled], acc[filled], width=width[filled], align="edge",
           color="tab:blue", edgecolor="black", linewidth=0.6, label="accuracy")
    # the gap is drawn from the accuracy up (or down) to the bin's mean confidence
    ax.bar(left[filled], conf[filled] - acc[filled], bottom=acc[filled], width=width[filled],
           align="edge", color="tab:red", alpha=0.3, edgecolor="tab:red", hatch="//",
           linewidth=0.6, label="gap to mean confidence")
    ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(f"{title + chr(10) if title else ''}ECE = {100 * ece:.2f}% ({len(counts)} bins)")
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)

    total = counts.sum()
    hist.bar(left, counts / total if total else counts, width=width, align="edge",
             color="tab:gray", edgecolor="black", linewidth=0.6)
    mean_conf = float(np.nansum(conf * counts) / total) if total else float("nan")
    mean_acc = float(np.nansum(acc * counts) / total) if total else float("nan")
    hist.axvline(mean_acc, color="tab:blue", linestyle="-", label=f"accuracy {mean_acc:.3f}")
    hist.axvline(mean_conf, color="tab:red", linestyle="--", label=f"avg confidence {mean_conf:.3f}")
    hist.set_xlabel("confidence (max softmax probability)")
    hist.set_ylabel("fraction of tokens")
    hist.legend(loc="best", fontsize=8)
    hist.grid(alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
