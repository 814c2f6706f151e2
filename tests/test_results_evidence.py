"""The committed evidence under results/ re-scores to the numbers docs/RESULTS.md reports.

Each run directory holds results.json (what `experiment run` reported), train_args.json, the
training log and the test hypotheses. Without the references these tests check that the files of
a run agree with each other; with the real Multi30k data (MULTI30K_RAW) they re-score every
hypothesis file with sacreBLEU, as a reader would, and compare with the reported BLEU and chrF.
"""
import functools
import json
from pathlib import Path

import pytest
from conftest import MULTI30K_RAW, epoch_stats, needs_multi30k

RESULTS = Path(__file__).resolve().parent.parent / "results"
RUNS = sorted(p.parent for p in RESULTS.glob("*/*/results.json"))
# `experiment lenpen` of a run: the run's test sets decoded at the length penalty chosen on valid
TUNED = sorted(p.parent for p in RESULTS.glob("*/*/lenpen/results.json"))
# experiment run's test subset -> the raw Multi30k file its references come from
MULTI30K_TEST_FILES = {"test": "test_2016_flickr"}


def _id(run):
    return str(run.relative_to(RESULTS))


def test_there_is_evidence_to_check():
    assert len(RUNS) >= 7, RUNS


@pytest.mark.parametrize("run", RUNS, ids=_id)
def test_run_files_agree(run):
    result = json.loads((run / "results.json").read_text())
    assert result["name"] == run.name
    # the arguments the run was trained with are the ones reported with its scores
    assert json.loads((run / "train_args.json").read_text()) == result["train_args"]
    score = json.loads((run / "score.test.json").read_text())
    reported = result["tests"]["test"]
    assert reported["bleu"] == score["bleu"] and reported["chrf"] == score["chrf"]
    hyps = (run / "hyp.test.en").read_text(encoding="utf-8").splitlines()
    assert len(hyps) == score["n"] == 1000          # no sentence lost in decoding
    # the log is the whole run: one validation line per epoch up to the reported budget
    valid = epoch_stats((run / "train.log").read_text(), "valid")
    assert sorted(valid) == list(range(1, result["max_epoch"] + 1))
    assert all("nll_loss" in valid[epoch] for epoch in valid)
    check_sentence_level(run, reported)


def check_sentence_level(run, reported):
    """A run scored with the sentence-level measures keeps what they are computed from (each
    hypothesis's score and sentence chrF): they re-compute to the reported figures."""
    if reported.get("sentence_spearman") is None:
        return  # scored before the measure existed
    from fairseq_pskd.calibration import sentence_confidence

    rows = [line.split("\t") for line in (run / "sentence.test.tsv").read_text().splitlines()]
    assert len(rows) == 1000
    again = sentence_confidence([float(s) for s, _ in rows], [float(c) for _, c in rows])
    assert again["sentence_spearman"] == pytest.approx(reported["sentence_spearman"], abs=1e-12)
    assert again["sentence_aurc"] == pytest.approx(reported["sentence_aurc"], abs=1e-12)


@pytest.mark.parametrize("tuned", TUNED, ids=_id)
def test_lenpen_choice_agrees_with_its_run(tuned):
    run = json.loads((tuned.parent / "results.json").read_text())
    result = json.loads((tuned / "results.json").read_text())
    assert result["name"] == run["name"] and result["train_args"] == run["train_args"]
    assert result["checkpoint"] == run["checkpoint"] and result["beam"] == run["beam"]
    grid = {float(v): bleu for v, bleu in result["lenpen_choice"]["bleu"].items()}
    assert result["lenpen"] == max(grid, key=lambda v: (round(grid[v], 6), -v))  # best on valid
    score = json.loads((tuned / "score.test.json").read_text())
    assert result["tests"]["test"]["bleu"] == score["bleu"] and score["n"] == 1000
    # calibration is teacher-forced: the run's own
    for key in ("ece", "nll", "aurc"):
        assert result["tests"]["test"][key] == run["tests"]["test"][key]
    check_sentence_level(tuned, result["tests"]["test"])


@functools.lru_cache(maxsize=None)
def references():
    """(the test set's references, sacreBLEU's BLEU and chrF with them processed once): what
    sacrebleu.corpus_bleu and corpus_chrf compute, without processing the references again for
    every run."""
    import sacrebleu

    from fairseq_pskd.prepare import text

    raw = MULTI30K_RAW / f"{MULTI30K_TEST_FILES['test']}.en.gz"
    refs = [text.squash_whitespace(line) for line in text.read_lines(raw)]
    return refs, sacrebleu.BLEU(references=[refs]), sacrebleu.CHRF(references=[refs])


@needs_multi30k
@pytest.mark.parametrize("run", RUNS + TUNED, ids=_id)
def test_hypotheses_rescore_to_reported_bleu(run):
    import sacrebleu

    refs, bleu_metric, chrf_metric = references()
    hyps = (run / "hyp.test.en").read_text(encoding="utf-8").splitlines()
    score = json.loads((run / "score.test.json").read_text())
    bleu = bleu_metric.corpus_score(hyps, None)
    chrf = chrf_metric.corpus_score(hyps, None)
    assert bleu.score == pytest.approx(score["bleu"], abs=1e-9)
    assert chrf.score == pytest.approx(score["chrf"], abs=1e-9)
    if (run / "sentence.test.tsv").exists():  # the sentence chrF the sentence level ranks by
        kept = [float(line.split("\t")[1]) for line in (run / "sentence.test.tsv").read_text().splitlines()]
        assert kept == pytest.approx([sacrebleu.sentence_chrf(h, [r]).score for h, r in zip(hyps, refs)], abs=1e-9)
