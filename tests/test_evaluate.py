"""fairseq_pskd.evaluate: calibration metrics against hand-computed values, BLEU/chrF scoring
of fairseq-generate output, teacher-forced calibration of a real tiny model, checkpoint
averaging that fairseq-generate can load."""
import json
import math
import os
import re
import subprocess
import sys
from collections import OrderedDict

import numpy as np
import pytest
import torch
from conftest import USER_DIR, run, run_fairseq

import fairseq_pskd  # noqa: F401  (torch>=2.6 loads fairseq checkpoints)
from fairseq_pskd import calibration as cal
from fairseq_pskd import evaluate as ev
from fairseq_pskd.plots import parse_log

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# the evaluate CLI as a user runs it (separate process, program-mode logging)
EVALUATE = [sys.executable, "-m", "fairseq_pskd.evaluate"]


# ----------------------------------------------------------------------------- metrics

# 5 tokens, 10 bins. By hand:
#   bin (0.9,1]: 0.95 ok, 0.92 wrong -> acc 0.5, conf 0.935, |gap| 0.435, weight 2/5 -> 0.174
#   bin (0.7,0.8]: 0.75 ok           -> |1 - 0.75| = 0.25,  weight 1/5          -> 0.05
#   bin (0.3,0.4]: 0.35 ok           -> |1 - 0.35| = 0.65,  weight 1/5          -> 0.13
#   bin (0.1,0.2]: 0.15 wrong        -> |0 - 0.15| = 0.15,  weight 1/5          -> 0.03
#   ECE = 0.384; the other 6 bins are empty.
#   Risk-coverage, most confident first (ok, wrong, ok, ok, wrong): 0, 1/2, 1/3, 1/4, 2/5
#   AURC = (1/2 + 1/3 + 1/4 + 2/5) / 5 = 89/300
#   Optimal order (ok, ok, ok, wrong, wrong): 0, 0, 0, 1/4, 2/5 -> 0.65 / 5 = 0.13 = 39/300
#   E-AURC = 50/300 = 1/6
CONF = [0.95, 0.92, 0.75, 0.35, 0.15]
CORRECT = [True, False, True, True, False]


def test_hand_computed_example():
    assert cal.expected_calibration_error(CONF, CORRECT, n_bins=10) == pytest.approx(0.384, abs=1e-12)
    assert cal.aurc(CONF, CORRECT) == pytest.approx(89 / 300, abs=1e-12)
    assert cal.optimal_aurc(CORRECT) == pytest.approx(0.13, abs=1e-12)
    assert cal.excess_aurc(CONF, CORRECT) == pytest.approx(1 / 6, abs=1e-12)
    coverage, risk = cal.risk_coverage_curve(CONF, CORRECT)
    np.testing.assert_allclose(coverage, [0.2, 0.4, 0.6, 0.8, 1.0])
    np.testing.assert_allclose(risk, [0, 1 / 2, 1 / 3, 1 / 4, 2 / 5])
    # one bin: |accuracy - mean confidence| = |3/5 - 3.12/5|
    assert cal.expected_calibration_error(CONF, CORRECT, n_bins=1) == pytest.approx(0.024, abs=1e-12)


def test_reliability_bins_and_empty_bins():
    bins = cal.reliability_bins(CONF, CORRECT, n_bins=10)
    assert bins["counts"].tolist() == [0, 1, 0, 1, 0, 0, 0, 1, 0, 2]
    assert bins["total"] == 5
    np.testing.assert_allclose(bins["edges"], np.linspace(0, 1, 11))
    empty = bins["counts"] == 0
    assert np.isnan(bins["accuracy"][empty]).all() and np.isnan(bins["confidence"][empty]).all()
    np.testing.assert_allclose(bins["accuracy"][~empty], [0.0, 1.0, 1.0, 0.5])
    np.testing.assert_allclose(bins["confidence"][~empty], [0.15, 0.35, 0.75, 0.935])
    # right-closed bins: 0.5 belongs to (0.4, 0.5], 1.0 to the last bin, 0.0 to the first
    edge = cal.reliability_bins([0.0, 0.5, 1.0], [1, 1, 1], n_bins=10)["counts"]
    assert edge.tolist() == [1, 0, 0, 0, 1, 0, 0, 0, 0, 1]
    # metrics JSON: empty bins are null, not NaN
    m = cal.calibration_metrics(CONF, CORRECT, nll_sum=5.0, n_bins=10)
    assert m["reliability"]["accuracy"][0] is None
    json.dumps(m, allow_nan=False)
    assert m["nll"] == pytest.approx(1.0) and m["num_tokens"] == 5 and m["bins"] == 10


def test_perfectly_calibrated_data_has_zero_ece():
    # each bin: confidence c for 1000 tokens of which exactly 1000*c are right
    conf, correct = [], []
    for c in (0.05, 0.15, 0.35, 0.55, 0.85, 0.95):
        k = round(1000 * c)
        conf += [c] * 1000
        correct += [True] * k + [False] * (1000 - k)
    assert cal.expected_calibration_error(conf, correct) == pytest.approx(0.0, abs=1e-12)
    # and statistically: correct ~ Bernoulli(confidence)
    rng = np.random.default_rng(0)
    p = rng.uniform(0, 1, 200_000)
    assert cal.expected_calibration_error(p, rng.uniform(0, 1, p.size) < p) < 0.01
    # while an over-confident model is not: always right 50% of the time at confidence 0.9
    assert cal.expected_calibration_error([0.9] * 10, [True, False] * 5) == pytest.approx(0.4)


def test_perfect_and_worst_ranking():
    rng = np.random.default_rng(1)
    correct = rng.uniform(size=500) < 0.7
    # every correct token more confident than every error
    conf = np.where(correct, 0.6, 0.1) + rng.uniform(0, 0.3, correct.size)
    assert cal.aurc(conf, correct) == pytest.approx(cal.optimal_aurc(correct), abs=1e-12)
    assert cal.excess_aurc(conf, correct) == pytest.approx(0.0, abs=1e-12)
    # closed form of the optimum, (1/n) sum_k k/(n-e+k), against the curve of the ideal order
    n, e = correct.size, int((~correct).sum())
    assert cal.optimal_aurc(correct) == pytest.approx(sum(k / (n - e + k) for k in range(1, e + 1)) / n)
    # reversed ranking is strictly worse
    assert cal.aurc(-conf, correct) > cal.aurc(conf, correct) + 0.1
    # worst case by hand: the one error first -> risks 1, 1/2, 1/3, 1/4
    assert cal.aurc([0.9, 0.8, 0.7, 0.6], [False, True, True, True]) == pytest.approx(25 / 48)
    # degenerate: all right / all wrong
    assert cal.aurc([0.5, 0.4], [True, True]) == 0 and cal.optimal_aurc([True, True]) == 0
    assert cal.aurc([0.5, 0.4], [False, False]) == 1 and cal.excess_aurc([0.5, 0.4], [False, False]) == 0


def test_metrics_accept_torch_and_reject_bad_input():
    assert cal.expected_calibration_error(torch.tensor(CONF), torch.tensor(CORRECT)) == pytest.approx(0.384)
    assert cal.aurc(torch.tensor(CONF), torch.tensor(CORRECT)) == pytest.approx(89 / 300)
    with pytest.raises(ValueError):
        cal.expected_calibration_error([], [])
    with pytest.raises(ValueError):
        cal.aurc([0.5, 0.6], [True])
    with pytest.raises(ValueError):
        cal.reliability_bins(CONF, CORRECT, n_bins=0)


# ----------------------------------------------------------------------------- score

GEN = """S-2\tw1 w2
T-2\tThe cat sat on the mat.
H-2\t-0.51\tThe cat sat on a mat .
D-2\t-0.51\tThe cat sat on a mat .
P-2\t-0.1 -0.2 -0.3 -0.4 -0.5 -0.6 -0.7 -0.8
S-0\tw3
H-0\t-0.20\tHello , I don 't know !
D-0\t-0.20\tHello , I don 't know !
P-0\t-0.2 -0.2 -0.2 -0.2 -0.2 -0.2 -0.2 -0.2
H-3\t-0.90\t" Where are you going ? " she asked .
P-3\t-1.5 -0.3 -0.9 -0.9 -0.9 -0.9 -0.9 -0.9 -0.9 -0.9 -0.9
H-1\t-0.33\tThis is ( probably ) a test : yes .
P-1\t-0.33 -0.33 -0.33 -0.33 -0.33 -0.33 -0.33 -0.33 -0.33 -0.33
Generate test with beam=5: BLEU4 = 12.34
"""
REFS = ["Hello, I don't know!", "This is (probably) the test: yes.", "The cat sat on the mat.",
        "\"Where are you going?\" she asked."]


def expected_scores(hyps_tok, refs):
    """What score must report, computed here directly with sacremoses and sacrebleu."""
    import sacrebleu
    from sacremoses import MosesDetokenizer
    md = MosesDetokenizer(lang="en")
    detok = [md.detokenize(h.split(), unescape=False) for h in hyps_tok]
    return detok, sacrebleu.corpus_bleu(detok, [refs]), sacrebleu.corpus_chrf(detok, [refs])


@pytest.fixture
def gen_files(tmp_path):
    gen = tmp_path / "gen.txt"
    gen.write_text(GEN)
    ref = tmp_path / "test.en"
    ref.write_text("\n".join(REFS) + "\n")
    return gen, ref


def test_score_sorts_detokenises_and_matches_sacrebleu(gen_files, tmp_path, capsys):
    gen, ref = gen_files
    hyps_sorted = ["Hello , I don 't know !", "This is ( probably ) a test : yes .",
                   "The cat sat on a mat .", "\" Where are you going ? \" she asked ."]
    detok, bleu, chrf = expected_scores(hyps_sorted, REFS)
    assert detok[0] == "Hello, I don't know!"  # the detokeniser did undo the tokenisation
    out_json = tmp_path / "s.json"
    assert ev.main(["score", "--generate-output", gen, "--ref", ref, "--json", out_json,
                    "--detok-output", tmp_path / "hyp.detok"]) == 0
    res = json.loads(out_json.read_text())
    assert res["n"] == 4 and res["detok_lang"] == "en"  # language taken from test.en
    assert res["bleu"] == pytest.approx(bleu.score, abs=1e-9)
    assert res["chrf"] == pytest.approx(chrf.score, abs=1e-9)
    assert 0 < res["bleu"] < 100
    assert (tmp_path / "hyp.detok").read_text().splitlines() == detok
    from sacrebleu.metrics import BLEU, CHRF
    b_metric, c_metric = BLEU(), CHRF()
    b_metric.corpus_score(detok, [REFS]), c_metric.corpus_score(detok, [REFS])
    assert res["bleu_signature"] == str(b_metric.get_signature())
    assert res["chrf_signature"] == str(c_metric.get_signature())
    assert res["bleu_signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a|")
    # sentence level: the mean positional score of each hypothesis against its sentence chrF
    mean_p = [-0.2, -0.33, (-0.1 - 0.2 - 0.3 - 0.4 - 0.5 - 0.6 - 0.7 - 0.8) / 8, (-1.5 - 0.3 - 9 * 0.9) / 11]
    from sacrebleu import sentence_chrf
    sent_chrf = [sentence_chrf(h, [r]).score for h, r in zip(detok, REFS)]
    assert res["sentence_spearman"] == pytest.approx(cal.spearman(mean_p, sent_chrf))
    assert res["sentence_aurc"] == pytest.approx(cal.sentence_confidence(mean_p, sent_chrf)["sentence_aurc"])
    printed = capsys.readouterr().out
    assert f"sentence level: Spearman {res['sentence_spearman']:.3f}" in printed
    assert f"BLEU|{res['bleu_signature']} = {bleu.score:.2f}" in printed
    assert f"chrF2|{res['chrf_signature']} = {chrf.score:.2f}" in printed

    # --no-detok scores the tokenised text: 13a does not rejoin "don 't", so BLEU is lower
    assert ev.main(["score", "--generate-output", gen, "--ref", ref, "--no-detok",
                    "--json", out_json]) == 0
    raw = json.loads(out_json.read_text())
    import sacrebleu
    assert raw["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps_sorted, [REFS]).score)
    assert raw["bleu"] < res["bleu"]

    # --hyp: plain detokenised hypotheses, used as they are
    (tmp_path / "plain.txt").write_text("\n".join(detok) + "\n")
    assert ev.main(["score", "--hyp", tmp_path / "plain.txt", "--ref", ref, "--json", out_json]) == 0
    assert json.loads(out_json.read_text())["bleu"] == pytest.approx(bleu.score, abs=1e-9)


def test_sentence_confidence_by_hand():
    # the best-scored translation is the best one: rho 1; risks 0, 1/2, 1 -> mean risks 0, 1/4, 1/2
    assert cal.sentence_confidence([3, 2, 1], [100, 50, 0]) == pytest.approx(
        {"sentence_spearman": 1.0, "sentence_aurc": 0.25})
    # ranked the wrong way round: rho -1; mean risks 1, 3/4, 1/2
    assert cal.sentence_confidence([1, 2, 3], [100, 50, 0]) == pytest.approx(
        {"sentence_spearman": -1.0, "sentence_aurc": 0.75})
    # ties take their mean rank: ranks (1.5, 1.5, 3) against (1, 2, 3)
    assert cal.spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(1.5 / math.sqrt(3))
    # a monotone transform of the score changes nothing
    rng = np.random.default_rng(0)
    score, chrf = rng.normal(size=200), rng.uniform(0, 100, 200)
    assert cal.sentence_confidence(np.exp(score), chrf) == pytest.approx(cal.sentence_confidence(score, chrf))
    assert math.isnan(cal.spearman([1, 1, 1], [1, 2, 3]))
    stats = pytest.importorskip("scipy.stats")
    tied = np.round(score, 1)
    assert cal.spearman(tied, chrf) == pytest.approx(stats.spearmanr(tied, chrf).statistic, abs=1e-12)
    for bad in (([1, 2], [50]), ([float("nan"), 1], [50, 50]), ([1, 2], [50, 101]), ([], [])):
        with pytest.raises(ValueError):
            cal.sentence_confidence(*bad)


def test_score_needs_positional_scores_of_every_hypothesis(gen_files, tmp_path, capsys):
    gen, ref = gen_files
    lines = gen.read_text().splitlines(keepends=True)
    gen.write_text("".join(x for x in lines if not x.startswith("P-0")))
    assert ev.main(["score", "--generate-output", gen, "--ref", ref]) == 2
    assert "P- lines (positional scores) for 3 of its 4 hypotheses" in capsys.readouterr().err
    # output without any P- lines (not fairseq-generate's) is scored without the sentence level
    gen.write_text("".join(x for x in lines if not x.startswith("P-")))
    out_json = tmp_path / "s.json"
    assert ev.main(["score", "--generate-output", gen, "--ref", ref, "--json", out_json]) == 0
    assert "no sentence-level confidence" in capsys.readouterr().err
    assert "sentence_spearman" not in json.loads(out_json.read_text())


def test_read_generate_hypotheses_nbest_and_empty(tmp_path):
    gen = tmp_path / "g.txt"
    gen.write_text("H-1\t-0.1\tbest one\nH-1\t-0.9\tsecond best\nH-0\t-2.0\n"
                   "H-2\t-0.3\t\nS-3\tnot a hypothesis\n")
    hyps, ids = ev.read_generate_hypotheses(gen)
    assert ids == [0, 1, 2] and hyps == ["", "best one", ""]


@pytest.mark.e2e
def test_score_errors_exit_2_without_traceback(gen_files, tmp_path):
    gen, ref = gen_files
    longer = tmp_path / "five.en"
    longer.write_text("\n".join(REFS + ["one more"]) + "\n")
    proc = run([*EVALUATE, "score", "--generate-output", gen, "--ref", longer], check=False, timeout=300,
               stderr=subprocess.PIPE)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: 4 hypotheses in {gen} but 5 reference lines in {longer}; fairseq-generate leaves "
        f"out the last sentences of a set whose size is not a multiple of "
        f"--required-batch-size-multiple (default 8): decode with --required-batch-size-multiple 1")
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    # in-process the same checks return 2
    assert ev.main(["score", "--generate-output", gen, "--ref", tmp_path / "missing.en"]) == 2
    assert ev.main(["score", "--hyp", gen, "--ref", ref]) == 2  # 11 lines vs 4
    noext = tmp_path / "reference"
    noext.write_text("\n".join(REFS) + "\n")
    assert ev.main(["score", "--generate-output", gen, "--ref", noext]) == 2  # language unknown
    with pytest.raises(SystemExit) as exc:  # usage errors: argparse, also status 2
        ev.main(["score", "--ref", ref])
    assert exc.value.code == 2


# ----------------------------------------------------------------------------- tiny model

@pytest.mark.e2e
def test_calibration_end_to_end(toy_data_bin, baseline_run, tmp_path):
    from fairseq.data import Dictionary, data_utils

    save, log = baseline_run
    out_json, png = tmp_path / "cal.json", tmp_path / "rel.png"
    proc = run([*EVALUATE, "calibration", "--data-bin", toy_data_bin, "--path", save / "checkpoint2.pt",
                "--subset", "test", "--bins", 10, "--batch-size", 5, "--json", out_json, "--png", png, "--cpu"],
               timeout=300, stderr=subprocess.PIPE)  # check=True: fails with the output's tail unless exit 0
    res = json.loads(out_json.read_text())

    # the number of non-pad target tokens, independently from the binarised test targets
    # (each sentence carries its EOS)
    tgt_dict = Dictionary.load(str(toy_data_bin / "dict.tgt.txt"))
    targets = data_utils.load_indexed_dataset(str(toy_data_bin / "test.src-tgt.tgt"), tgt_dict)
    assert len(targets) == 24
    n_tokens = sum(len(targets[i]) for i in range(len(targets)))
    assert all(targets[i][-1] == tgt_dict.eos() for i in range(len(targets)))
    assert res["num_tokens"] == n_tokens and res["num_sentences"] == 24
    assert sum(res["reliability"]["counts"]) == n_tokens and res["bins"] == 10
    assert 0 <= res["ece"] <= 1 and 0 <= res["accuracy"] <= 1 and res["nll"] > 0
    assert res["eaurc"] >= -1e-12 and res["aurc"] == pytest.approx(res["optimal_aurc"] + res["eaurc"])
    assert res["device"] == "cpu"
    assert "ECE" in proc.stdout and "(10 equal-width bins)" in proc.stdout
    data = png.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 10_000

    # teacher forcing is what fairseq's validation does: on the valid split, the NLL must be
    # the valid nll_loss fairseq logged for epoch 2 (base 2, rounded to 3 decimals)
    valid_json = tmp_path / "valid.json"
    assert ev.main(["calibration", "--data-bin", str(toy_data_bin), "--path", str(save / "checkpoint2.pt"),
                    "--subset", "valid", "--json", str(valid_json), "--cpu"]) == 0
    logged = parse_log(log)["valid"][2]["nll_loss"]
    assert json.loads(valid_json.read_text())["nll"] / math.log(2) == pytest.approx(logged, abs=1.5e-3)


def test_calibration_missing_checkpoint_is_an_error(toy_data_bin, tmp_path, capsys):
    assert ev.main(["calibration", "--data-bin", str(toy_data_bin), "--path", str(tmp_path / "nope.pt")]) == 2
    assert capsys.readouterr().err.startswith("error: checkpoint not found")


@pytest.mark.e2e
def test_average_two_epochs_and_generate(toy_data_bin, baseline_run, tmp_path):
    save, _ = baseline_run
    out = tmp_path / "avg.pt"
    assert ev.main(["average", "--inputs", save, "--num-epoch-checkpoints", 2, "--output", out]) == 0
    c1, c2, avg = (torch.load(p, map_location="cpu") for p in (save / "checkpoint1.pt",
                                                               save / "checkpoint2.pt", out))
    assert list(avg["model"]) == list(c2["model"])
    n_float = 0
    for k, v in avg["model"].items():
        assert v.dtype == c2["model"][k].dtype
        if v.is_floating_point():
            n_float += 1
            torch.testing.assert_close(v, (c1["model"][k] + c2["model"][k]) / 2)
    assert n_float > 10
    assert not torch.equal(c1["model"]["decoder.embed_tokens.weight"], c2["model"]["decoder.embed_tokens.weight"])
    # everything else is the newest checkpoint's
    assert avg["extra_state"]["train_iterator"]["epoch"] == c2["extra_state"]["train_iterator"]["epoch"]
    assert avg["optimizer_history"] == c2["optimizer_history"]

    gen = run_fairseq("generate", toy_data_bin, "--user-dir", USER_DIR, "--path", out,
                      "--gen-subset", "test", "--beam", 2, "--batch-size", 8, "--cpu")
    hyps = re.findall(r"^H-(\d+)\t", gen.stdout, flags=re.M)
    assert sorted(map(int, hyps)) == list(range(24))

    # and the generate output scores: references from its T- lines
    gen_txt = tmp_path / "gen.txt"
    gen_txt.write_text(gen.stdout)
    refs = dict((int(i), t) for i, t in re.findall(r"^T-(\d+)\t(.*)$", gen.stdout, flags=re.M))
    ref = tmp_path / "test.tgt"
    ref.write_text("".join(refs[i] + "\n" for i in range(24)))
    res_json = tmp_path / "s.json"
    assert ev.main(["score", "--generate-output", str(gen_txt), "--ref", str(ref), "--no-detok",
                    "--json", str(res_json)]) == 0
    assert json.loads(res_json.read_text())["n"] == 24


def test_average_checkpoints_dtypes_shared_and_rest(tmp_path):
    shared1 = torch.tensor([1.0, 2.0])
    states = [
        {"model": OrderedDict(w=torch.tensor([1.0, 3.0], dtype=torch.float16), a=shared1, b=shared1,
                              n=torch.tensor([3])), "extra_state": {"epoch": 7}},
        {"model": OrderedDict(w=torch.tensor([2.0, 6.0], dtype=torch.float16), a=torch.tensor([3.0, 4.0]),
                              b=torch.tensor([3.0, 4.0]), n=torch.tensor([4])), "extra_state": {"epoch": 6}},
    ]
    paths = []
    for i, s in enumerate(states):
        paths.append(str(tmp_path / f"c{i}.pt"))
        torch.save(s, paths[-1])
    avg = ev.average_checkpoints(paths)
    assert avg["model"]["w"].dtype == torch.float16
    assert avg["model"]["w"].tolist() == [1.5, 4.5]
    # a and b share storage in the first checkpoint: each must still be the plain mean
    assert avg["model"]["a"].tolist() == [2.0, 3.0] and avg["model"]["b"].tolist() == [2.0, 3.0]
    assert avg["model"]["n"].tolist() == [3]  # integer buffers: floor division, as fairseq
    assert avg["extra_state"] == {"epoch": 7}  # the rest from the first (newest) input

    # directory selection: newest first, upper bound respected, too few is an error
    for e in (1, 2, 3, 10):
        torch.save(states[0], tmp_path / f"checkpoint{e}.pt")
    names = [os.path.basename(p) for p in ev.last_n_checkpoints(str(tmp_path), 2)]
    assert names == ["checkpoint10.pt", "checkpoint3.pt"]
    names = [os.path.basename(p) for p in ev.last_n_checkpoints(str(tmp_path), 2, upper_bound=3)]
    assert names == ["checkpoint3.pt", "checkpoint2.pt"]
    assert ev.main(["average", "--inputs", str(tmp_path), "--num-epoch-checkpoints", "5",
                    "--output", str(tmp_path / "x.pt")]) == 2
    torch.save({"model": OrderedDict(other=torch.zeros(1))}, tmp_path / "odd.pt")
    assert ev.main(["average", "--inputs", paths[0], str(tmp_path / "odd.pt"),
                    "--output", str(tmp_path / "x.pt")]) == 2
    assert not (tmp_path / "x.pt").exists()
