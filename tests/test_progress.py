"""Progress lines of a training run: one per finished epoch, from fairseq-train's own log lines,
with seconds per epoch from fairseq's wall clock and ETAs of the run and of every run of a
recipe; through the real `experiment run` on a toy corpus."""
import json
import re

import pytest
from conftest import TINY_ARCH, TINY_TRAIN, epoch_stats, make_prepared

from fairseq_pskd import experiment
from fairseq_pskd.progress import TRAIN_START, EpochProgress, duration, eta

START = "2026-01-01 00:00:00 | INFO | fairseq_cli.train | {'_name': None}\n"


def valid(epoch, nll):
    return (f"2026-01-01 | INFO | valid | epoch {epoch:03d} | valid on 'valid' subset | loss 4 | "
            f"nll_loss {nll} | ppl 9\n")


def train(epoch, wall):
    return f"2026-01-01 | INFO | train | epoch {epoch:03d} | loss 4 | nll_loss 3 | train_wall 1 | wall {wall}\n"


def test_one_line_per_epoch_with_eta():
    p = EpochProgress("baseline", max_epoch=12)
    assert p.feed(START) is None and p.feed(valid(1, 6.5)) is None
    assert p.feed("2026-01-01 | INFO | train_inner | epoch 001:     10 / 130 loss=9, wall=20\n") is None
    assert p.feed(train(1, 120)) == "[baseline] epoch 1/12  valid nll 6.500  2m00s/epoch  ETA 22 min"
    p.feed(valid(2, 5.25))
    assert p.feed(train(2, 230)) == "[baseline] epoch 2/12  valid nll 5.250  1m55s/epoch  ETA 19 min"
    # killed and resumed at epoch 3: fairseq's wall clock starts again, and so does the timing
    p.feed(START)
    assert p.feed(train(3, 100)).endswith("  1m40s/epoch  ETA 15 min")  # no validation: no nll
    assert p.feed(train(12, 1000)).endswith("epoch 12/12  1m40s/epoch  ETA <1 min")
    # without --max-epoch: no total and no ETA
    assert EpochProgress("x").feed(train(4, 40)) == "[x] epoch 4  40s/epoch"  # its segment's first
    assert duration(3 * 3600 + 5 * 60 + 20) == "3 h 05 min" and eta(20) == "<1 min" and eta(31) == "1 min"


def test_overall_eta_of_two_lanes(tmp_path):
    """Each run records when its lane finishes; a line ends with the latest of all lanes."""
    now = [1000.0]
    lanes = tmp_path / "eta"
    a = EpochProgress("a-s1", max_epoch=10, queued_epochs=20, eta_dir=lanes, clock=lambda: now[0])
    b = EpochProgress("b-s1", max_epoch=10, eta_dir=lanes, clock=lambda: now[0])
    # lane a: 9 epochs of this run + 20 queued, 60 s each = 29 min; lane b: 9 epochs of 120 s = 18 min
    assert a.feed(train(1, 60)).endswith("ETA 9 min  (all runs: ETA 29 min)")
    assert b.feed(train(1, 120)).endswith("ETA 18 min  (all runs: ETA 29 min)")
    now[0] += 600
    assert b.feed(train(2, 240)).endswith("(all runs: ETA 19 min)")  # lane a's finish, 10 min on
    (lanes / "garbage.json").write_text("{not json")  # a file being replaced: skipped
    assert json.loads((lanes / "b-s1.json").read_text())["finish"] == 1600 + 8 * 120
    assert b.feed(train(3, 360)).endswith("(all runs: ETA 19 min)")


@pytest.mark.e2e  # experiment run starts fairseq-train and fairseq-generate
def test_experiment_run_prints_a_progress_line_per_epoch(tmp_path, capsys):
    prepared, raw = make_prepared(tmp_path, n_test=8, seed=4)
    out, progress = tmp_path / "run", tmp_path / "progress.txt"
    assert experiment.main(["run", "--prepared", str(prepared), "--out", str(out), "--beam", "1", "--cpu",
                            "--progress", str(progress), "--name", "toy", "--", *TINY_ARCH, *TINY_TRAIN,
                            "--max-epoch", "3", "--criterion", "label_smoothed_cross_entropy"]) == 0
    lines = progress.read_text().splitlines()
    assert [line.split("  ")[0] for line in lines] == ["[toy] epoch 1/3", "[toy] epoch 2/3", "[toy] epoch 3/3"]
    log = (out / "train.log").read_text()
    assert TRAIN_START in log and "[toy] epoch" not in log  # the log holds fairseq's lines only
    stats, valid_stats = epoch_stats(log), epoch_stats(log, "valid")
    for epoch, line in enumerate(lines, 1):
        per_epoch = stats[epoch]["wall"] / epoch  # one start of fairseq-train
        m = re.search(r"valid nll ([0-9.]+)  (?:(\d+)m)?(\d+)s/epoch  ETA (.+)$", line)
        assert m, line
        assert float(m.group(1)) == valid_stats[epoch]["nll_loss"]
        assert abs(int(m.group(2) or 0) * 60 + int(m.group(3)) - per_epoch) <= 0.5
        assert m.group(4) == eta((3 - epoch) * per_epoch)
    assert experiment.main(["table", str(out / "results.json"), "--reading"]) == 2
    assert "--reading compares two runs" in capsys.readouterr().err
