"""experiment run: a rerun never resumes or re-scores checkpoints trained with other arguments;
every test sentence is decoded and calibrated; `score` decodes a raw test set through the run's
own preprocessing."""
import json
import shutil

import pytest
from conftest import MULTI30K_RAW, TINY_ARCH, TINY_TRAIN, epoch_stats, make_prepared, needs_multi30k

from fairseq_pskd import experiment


@pytest.fixture
def prepared(tmp_path, toy_data_bin):
    d = tmp_path / "prepared"
    d.mkdir()
    (d / "data-bin").symlink_to(toy_data_bin)
    (d / "prepare.json").write_text(json.dumps({"corpus": "toy", "src": "src", "tgt": "tgt",
                                                "data_bin": "data-bin"}))
    return d


def trained_run(tmp_path, recorded_in, args):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "checkpoint_last.pt").write_bytes(b"not reached")
    if recorded_in == "train_args.json":
        (out / "train_args.json").write_text(json.dumps(args))
    else:  # a run directory made before train_args.json was recorded
        (out / "results.json").write_text(json.dumps({"train_args": args}))
    return out


@pytest.mark.parametrize("recorded_in", ["train_args.json", "results.json"])
def test_rerun_with_other_arguments_is_refused(prepared, tmp_path, capsys, recorded_in):
    out = trained_run(tmp_path, recorded_in, ["--max-epoch", "12", "--pskd-alpha", "0.8"])
    code = experiment.main(["run", "--prepared", str(prepared), "--out", str(out), "--",
                            "--max-epoch", "12", "--pskd-alpha", "0.2"])
    err = capsys.readouterr().err
    assert code == 2
    assert "holds checkpoints trained with other arguments" in err
    assert "-0.8" in err and "+0.2" in err and "Use another --out" in err
    assert not (out / "train.log").exists()  # fairseq-train was never started


def test_same_arguments_pass_and_are_recorded(tmp_path):
    out = trained_run(tmp_path, "results.json", ["--max-epoch", "12"])
    experiment.check_same_training(out, out / "checkpoints", ["--max-epoch", "12"])
    assert json.loads((out / "train_args.json").read_text()) == ["--max-epoch", "12"]
    # a directory without checkpoints (training never got going) may start over with new ones
    fresh = tmp_path / "fresh"
    (fresh / "checkpoints").mkdir(parents=True)
    (fresh / "train_args.json").write_text(json.dumps(["--max-epoch", "3"]))
    experiment.check_same_training(fresh, fresh / "checkpoints", ["--max-epoch", "4"])
    assert json.loads((fresh / "train_args.json").read_text()) == ["--max-epoch", "4"]


@pytest.mark.e2e
def test_every_test_sentence_is_decoded_scored_and_calibrated(tmp_path, capsys):
    """29 test sentences (not a multiple of fairseq's default --required-batch-size-multiple 8,
    which would leave out 5 of them): all 29 are translated, scored and calibrated."""
    prepared, raw = make_prepared(tmp_path, n_test=29, seed=3)
    out = tmp_path / "run"
    code = experiment.main(["run", "--prepared", str(prepared), "--out", str(out), "--beam", "1",
                            "--cpu", "--", *TINY_ARCH, *TINY_TRAIN, "--max-epoch", "1",
                            "--criterion", "label_smoothed_cross_entropy"])
    assert code == 0
    hyp_ids = [line.split("\t")[0] for line in (out / "generate.test.txt").read_text().splitlines()
               if line.startswith("H-")]
    assert sorted(int(h[2:]) for h in hyp_ids) == list(range(29))
    result = json.loads((out / "results.json").read_text())["tests"]["test"]
    assert result["sentences"] == 29
    calib = json.loads((out / "calibration.test.json").read_text())
    n_target_tokens = sum(len(line.split()) + 1 for line in (raw / "test.tgt").read_text().splitlines())
    assert calib["num_sentences"] == 29 and calib["num_tokens"] == n_target_tokens  # + EOS each
    # the sentence-level confidence of the 29 translations, as `evaluate score` measures it
    scored = json.loads((out / "score.test.json").read_text())
    assert -1 <= result["sentence_spearman"] <= 1 and 0 <= result["sentence_aurc"] <= 1
    assert (result["sentence_spearman"], result["sentence_aurc"]) == \
        (scored["sentence_spearman"], scored["sentence_aurc"])
    assert len((out / "sentence.test.tsv").read_text().splitlines()) == 29

    # `lenpen` on the same run: each grid value decodes the validation split, the best one the test
    code = experiment.main(["lenpen", str(out), "--grid", "2,0.5", "--cpu"])
    assert code == 2  # the prepared data has no validation reference yet
    shutil.copy(raw / "valid.tgt", prepared / "ref" / "valid.tgt")
    assert experiment.main(["lenpen", str(out), "--grid", "2,0.5", "--cpu"]) == 0
    tuned = json.loads((out / "lenpen" / "results.json").read_text())
    valid_bleu = {v: json.loads((out / "lenpen" / f"valid.lenpen{v}" / "score.valid.json").read_text())["bleu"]
                  for v in ("0.5", "2")}
    assert tuned["lenpen_choice"]["bleu"] == valid_bleu
    assert tuned["lenpen"] == max((0.5, 2.0), key=lambda v: (valid_bleu[f"{v:g}"], -v))
    assert len((out / "lenpen" / "valid.lenpen2" / "hyp.valid.tgt").read_text().splitlines()) == 8
    assert len((out / "lenpen" / "hyp.test.tgt").read_text().splitlines()) == 29
    assert tuned["tests"]["test"]["sentences"] == 29
    assert (out / "lenpen" / "calibration.test.json").read_bytes() == (out / "calibration.test.json").read_bytes()
    capsys.readouterr()
    assert experiment.main(["table", str(out / "results.json"), str(out / "lenpen" / "results.json"),
                            "--markdown"]) == 0
    head, _, fixed, chosen = [dict(enumerate(c.strip() for c in line.strip("|").split("|")))
                              for line in capsys.readouterr().out.splitlines()[:4]]
    col = {name: i for i, name in head.items()}
    assert fixed[col["lenpen"]] == "1" and chosen[col["lenpen"]] == f"{tuned['lenpen']:g} (valid)"
    assert chosen[col["BLEU"]] == f"{tuned['tests']['test']['bleu']:.2f}"
    valid_nll = fixed[col["valid NLL"]]
    assert valid_nll != "-" and chosen[col["valid NLL"]] == valid_nll  # the run's training log
    assert fixed[col["sent rho"]] == f"{result['sentence_spearman']:.3f}"
    assert chosen[col["sent AURC x1000"]] == f"{1000 * tuned['tests']['test']['sentence_aurc']:.1f}"

    # a rerun that chooses another lenpen decodes the test set with it, never reusing a decode
    assert experiment.main(["lenpen", str(out), "--grid", "3", "--cpu"]) == 0
    assert json.loads((out / "lenpen" / "results.json").read_text())["lenpen"] == 3
    made_with = json.loads((out / "lenpen" / "test.lenpen3" / "generate.test.json").read_text())
    assert made_with == {"checkpoint": str(out / "checkpoints" / "checkpoint_last.pt"), "beam": 1,
                         "lenpen": 3.0}
    assert (out / "lenpen" / "hyp.test.tgt").read_bytes() == \
        (out / "lenpen" / "test.lenpen3" / "hyp.test.tgt").read_bytes()
    # and so does `run` with other decoding settings (training is complete: it returns at once)
    assert experiment.main(["run", "--prepared", str(prepared), "--out", str(out), "--beam", "2",
                            "--cpu", "--", *TINY_ARCH, *TINY_TRAIN, "--max-epoch", "1",
                            "--criterion", "label_smoothed_cross_entropy"]) == 0
    assert json.loads((out / "generate.test.json").read_text())["beam"] == 2


def hypotheses(generate_output):
    lines = [x.split("\t") for x in generate_output.read_text().splitlines() if x.startswith("H-")]
    return [h[2] for h in sorted(lines, key=lambda h: int(h[0][2:]))]


@pytest.mark.e2e
@needs_multi30k
def test_score_a_raw_test_set_through_the_run_preprocessing(m30k, tmp_path):
    """`experiment score` on the raw test_2017_mscoco files (461 sentences, not a multiple of
    8) gives exactly the hypotheses and scores of the same set binarised by the recipe
    (test2): the run's normalisation, tokenisation, sentencepiece model and dictionary are
    applied, and no sentence is lost."""
    prepared = m30k[0]
    out = tmp_path / "run"
    code = experiment.main(["run", "--prepared", str(prepared), "--out", str(out), "--beam", "2",
                            "--cpu", "--test-subsets", "test2", "--", *TINY_ARCH, *TINY_TRAIN,
                            "--max-tokens", "2000", "--max-update", "30", "--max-epoch", "1",
                            "--criterion", "label_smoothed_cross_entropy", "--lr", "5e-3"])
    assert code == 0
    code = experiment.main(["score", str(out), "--cpu", "--name", "mscoco",
                            "--src", str(MULTI30K_RAW / "test_2017_mscoco.de.gz"),
                            "--ref", str(MULTI30K_RAW / "test_2017_mscoco.en.gz")])
    assert code == 0
    scored = json.loads((out / "score-mscoco" / "results.json").read_text())
    binarised = json.loads((out / "results.json").read_text())["tests"]["test2"]
    assert scored["sentences"] == binarised["sentences"] == 461
    assert scored["beam"] == 2  # the run's decoding settings
    hyps = hypotheses(out / "score-mscoco" / "generate.test.txt")
    assert len(hyps) == 461 and len(set(hyps)) > 10  # a model that says more than one thing
    assert hyps == hypotheses(out / "generate.test2.txt")
    for key in ("bleu", "chrf", "bleu_signature"):
        assert scored[key] == binarised[key], key
    for key in ("ece", "nll", "aurc"):  # other batches: float sums in another order
        assert scored[key] == pytest.approx(binarised[key], rel=1e-6), key


def test_score_refuses_what_it_cannot_score(tmp_path, capsys):
    assert experiment.main(["score", str(tmp_path), "--src", "a", "--ref", "b"]) == 2
    assert "this needs a finished `experiment run` directory" in capsys.readouterr().err


@pytest.mark.e2e
def test_table_shows_length_valid_nll_and_paired_bootstrap(tmp_path, capsys):
    """table --paired-bs: sacreBLEU's p-value against the first run, the length ratio from the
    run's score file and the last validation nll_loss from its train.log."""
    prepared = tmp_path / "prepared"
    (prepared / "ref").mkdir(parents=True)
    refs = [f"a man number {i} rides a red bike down the hill" for i in range(60)]
    (prepared / "ref" / "test.en").write_text("".join(r + "\n" for r in refs))
    systems = {"base": refs, "worse": [" ".join(r.split()[:4]) for r in refs]}
    paths = []
    for name, hyps in systems.items():
        d = tmp_path / name
        d.mkdir()
        (d / "hyp.test.en").write_text("".join(h + "\n" for h in hyps))
        ratio = 1.0 if name == "base" else 0.4
        (d / "score.test.json").write_text(
            json.dumps({"bleu_detail": f"BLEU = 1 (BP = 1 ratio = {ratio} hyp_len = 1)"}))
        (d / "train.log").write_text(
            "2026-01-01 00:00:00 | INFO | valid | epoch 001 | loss 4 | nll_loss 3.5 | ppl 11\n"
            "2026-01-01 00:01:00 | INFO | valid | epoch 002 | loss 3 | nll_loss 2.75 | ppl 7\n")
        (d / "results.json").write_text(json.dumps({
            "name": name, "corpus": "toy", "src": "de", "tgt": "en", "prepared": str(prepared),
            "max_epoch": 2, "train_seconds": 60, "tests": {"test": {
                "bleu": 50.0, "chrf": 60.0, "ece": 0.05, "nll": 2.0, "aurc": 0.1}}}))
        paths.append(str(d / "results.json"))
    assert experiment.main(["table", *paths, "--paired-bs", "--markdown"]) == 0
    out = capsys.readouterr().out
    base_row, worse_row = [line for line in out.splitlines() if line.startswith("| base") or line.startswith("| worse")]
    assert "| 1.000 | 2.750 |" in base_row and "| 0.400 | 2.750 |" in worse_row
    assert "| 0.001 |" in worse_row  # 4-word prefixes against full sentences: p = 1/1001
    assert "paired bootstrap (1,000 resamples) of BLEU against base" in out


def test_table_means_over_seeds(tmp_path, capsys):
    """--mean-over-seeds: one row per system (name without -s<seed>) with the mean of its runs."""
    paths = []
    # the sentence-level measures of the baseline's runs; the PS-KD run was scored before they existed
    sentence = {"base-s1": {"sentence_spearman": 0.2, "sentence_aurc": 0.3},
                "base-s2": {"sentence_spearman": 0.4, "sentence_aurc": 0.5}}
    for name, bleu, ece in (("base-s1", 30.0, 0.06), ("base-s2", 32.0, 0.04), ("pskd-a0.1-s1", 33.0, 0.03)):
        d = tmp_path / name
        d.mkdir()
        (d / "results.json").write_text(json.dumps({
            "name": name, "corpus": "toy", "src": "de", "tgt": "en", "max_epoch": 2,
            "tests": {"test": {"bleu": bleu, "chrf": 50.0, "ece": ece, "nll": 2.0, "aurc": 0.1,
                               **sentence.get(name, {})}}}))
        paths.append(str(d / "results.json"))
    assert experiment.main(["table", *paths, "--mean-over-seeds", "--markdown"]) == 0
    out = capsys.readouterr().out.split("mean over the seeds")[1]
    assert "| base | test | 2 | 31.00 | 50.00 | 5.00 | 2.000 | 100.0 | 0.300 | 400.0 |  | - | - |" in out
    assert "| pskd-a0.1 | test | 1 | 33.00 | 50.00 | 3.00 | 2.000 | 100.0 | - | - | +2.00 |" in out


@pytest.mark.e2e
def test_updates_per_epoch_is_what_fairseq_train_does(prepared, baseline_run, capsys):
    """The count a schedule is derived from (quickstart --train-size) is the number of updates
    fairseq-train made in an epoch with the same arguments; --update-freq divides it."""
    _, log = baseline_run
    trained = epoch_stats(log.read_text())
    args = ["updates-per-epoch", "--prepared", str(prepared), "--", *TINY_ARCH, *TINY_TRAIN,
            "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1"]
    assert experiment.main(args) == 0
    count = int(capsys.readouterr().out.strip().splitlines()[-1])
    assert count == trained[1]["num_updates"] == trained[2]["num_updates"] - trained[1]["num_updates"]
    assert count > 3
    assert experiment.main(args + ["--update-freq", "3"]) == 0
    assert int(capsys.readouterr().out.strip().splitlines()[-1]) == -(-count // 3)


def test_training_time_sums_the_segments_of_a_resumed_run(tmp_path):
    """fairseq restarts its wall clock on resume: the reported training time adds each segment's
    last epoch wall time (an epoch an interruption cut short is redone, so it is not counted)."""
    def summary(epoch, wall):
        return (f"2026-01-01 00:00:00 | INFO | train | epoch {epoch:03d} | loss 4 | nll_loss 3 | "
                f"train_wall {wall - 5} | gb_free 0 | wall {wall}\n")
    log = tmp_path / "train.log"
    log.write_text(summary(1, 100) + summary(2, 210)        # killed in epoch 3
                   + "2026-01-01 00:09:00 | INFO | fairseq_cli.train | loaded checkpoint\n"
                   + summary(3, 95) + summary(4, 190)         # resumed at epoch 3
                   + summary(5, 80))                           # and once more at epoch 5
    assert experiment.training_wall_seconds(log) == 210 + 190 + 80
    # a segment killed after its first epoch, resumed: the start-up line separates the segments
    start = "2026-01-01 00:00:00 | INFO | fairseq_cli.train | {'_name': None, 'common': {}}\n"
    log.write_text(start + summary(1, 100) + start + summary(2, 120) + summary(3, 230))
    assert experiment.training_wall_seconds(log) == 100 + 230
    log.write_text("2026-01-01 00:00:00 | INFO | fairseq_cli.train | no epoch finished\n")
    assert experiment.training_wall_seconds(log) is None
