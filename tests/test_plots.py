"""fairseq_pskd.plots: parsing fairseq training logs (simple and json formats) and drawing
the per-epoch curves."""
import json

import pytest

from fairseq_pskd.plots import default_labels, main, parse_lines, parse_log, plot_curves

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# As fairseq-train --log-format simple writes it, with noise around the epoch lines: per-update
# train_inner lines, other loggers, a config dict, and a resumed run that repeats epoch 2.
SIMPLE = """\
2024-01-01 10:00:00 | INFO | fairseq_cli.train | {'_name': None, 'common': {'log_format': 'simple'}}
2024-01-01 10:00:01 | INFO | train_inner | epoch 001:      1 / 5 loss=7.3, nll_loss=7.2, ppl=152.05, pskd_alpha=0
2024-01-01 10:00:02 | INFO | valid | epoch 001 | valid on 'valid' subset | loss 6.547 | nll_loss 6.462 | ppl 88.15 | bleu 0.02 | wps 0 | num_updates 5
2024-01-01 10:00:02 | INFO | fairseq_cli.train | end of epoch 1 (average epoch stats below)
2024-01-01 10:00:02 | INFO | train | epoch 001 | loss 7.008 | nll_loss 6.966 | ppl 125.02 | pskd_alpha 0 | pskd_coverage 0 | num_updates 5 | lr 0.001 | wall 2
2024-01-01 10:00:03 | INFO | valid | epoch 002 | valid on 'valid' subset | loss 9.9 | nll_loss 9.9 | ppl 9.9 | bleu 9.9
2024-01-01 10:00:03 | INFO | train | epoch 002 | loss 9.9 | nll_loss 9.9 | pskd_alpha 9.9 | pskd_coverage 9.9
2024-01-01 10:00:04 | INFO | fairseq.checkpoint_utils | Loaded checkpoint checkpoint1.pt (epoch 2 @ 5 updates)
2024-01-01 10:00:05 | INFO | valid | epoch 002 | valid on 'valid' subset | loss 6.16 | nll_loss 6.047 | ppl 66.13 | bleu 0.08 | best_loss 6.16
2024-01-01 10:00:05 | INFO | train | epoch 002 | loss 6.468 | nll_loss 6.385 | ppl 83.56 | pskd_alpha 0.4 | pskd_coverage 0.98 | num_updates 10
2024-01-01 10:00:06 | INFO | valid | epoch 003 | valid on 'valid' subset | loss 5.945 | nll_loss 5.815 | ppl 56.29 | bleu 12.3
2024-01-01 10:00:06 | INFO | train | epoch 003 | loss 5.58 | nll_loss 5.507 | ppl 45.49 | pskd_alpha 0.6 | pskd_coverage 0.99 | num_updates 15
2024-01-01 10:00:06 | INFO | fairseq_cli.train | done training in 4.0 seconds
"""


def json_line(tag, record):
    return f"2024-01-01 10:00:00 | INFO | {tag} | {json.dumps(record)}\n"


JSON = (
    "2024-01-01 10:00:00 | INFO | fairseq_cli.train | {'_name': None}\n"
    + json_line("train_inner", {"epoch": 1, "update": 0.2, "loss": "7.271", "num_updates": "1"})
    + json_line("valid", {"epoch": 1, "valid_loss": "6.547", "valid_nll_loss": "6.462",
                          "valid_bleu": "1.5", "valid_num_updates": "5"})
    + json_line("train", {"epoch": 1, "train_loss": "7.008", "train_nll_loss": "6.966",
                          "train_pskd_alpha": "0.2", "train_pskd_coverage": "0.5",
                          "train_train_wall": "3", "train_wall": "4"})
    + json_line("valid", {"epoch": 2, "valid_loss": "6.16", "valid_bleu": "2.5"})
    + json_line("train", {"epoch": 2, "train_loss": "6.468", "train_pskd_alpha": "0.4",
                          "train_pskd_coverage": "0.75"})
)


def test_parse_simple_format(tmp_path):
    log = tmp_path / "simple.log"
    log.write_text(SIMPLE)
    d = parse_log(log)
    assert set(d) == {"train", "valid"}  # train_inner and other loggers ignored
    assert sorted(d["train"]) == [1, 2, 3] and sorted(d["valid"]) == [1, 2, 3]
    assert d["train"][3] == {"loss": 5.58, "nll_loss": 5.507, "ppl": 45.49, "pskd_alpha": 0.6,
                             "pskd_coverage": 0.99, "num_updates": 15.0}
    assert d["train"][1]["wall"] == 2.0 and d["train"][1]["pskd_alpha"] == 0.0
    # the resumed run's epoch 2 replaces the abandoned one
    assert d["train"][2]["loss"] == 6.468 and d["valid"][2]["bleu"] == 0.08
    assert d["valid"][1] == {"loss": 6.547, "nll_loss": 6.462, "ppl": 88.15, "bleu": 0.02,
                             "wps": 0.0, "num_updates": 5.0}
    assert d["valid"][3]["bleu"] == 12.3


def test_parse_json_format():
    d = parse_lines(JSON.splitlines())
    assert set(d) == {"train", "valid"}
    assert d["train"][1] == {"loss": 7.008, "nll_loss": 6.966, "pskd_alpha": 0.2,
                             "pskd_coverage": 0.5, "train_wall": 3.0, "wall": 4.0}
    assert d["valid"][1] == {"loss": 6.547, "nll_loss": 6.462, "bleu": 1.5, "num_updates": 5.0}
    assert d["valid"][2] == {"loss": 6.16, "bleu": 2.5}
    assert d["train"][2]["pskd_coverage"] == 0.75


def test_parse_hydra_train_log():
    """fairseq-hydra-train logs the same lines through hydra's formatter (tests/test_install.py
    reads a real one this way)."""
    d = parse_lines([
        "[2026-12-02 13:00:01,250][fairseq_cli.train][INFO] - begin training epoch 2",
        "[2026-12-02 13:00:02,500][train_inner][INFO] - epoch 002:      2 / 3 loss=5.9, ppl=59.4",
        "[2026-12-02 13:00:03,000][valid][INFO] - epoch 002 | valid on 'valid' subset | loss 6.1 | nll_loss 5.9",
        "[2026-12-02 13:00:03,100][train][INFO] - epoch 002 | loss 5.93 | pskd_alpha 0.8 | pskd_coverage 1",
    ])
    assert d == {"train": {2: {"loss": 5.93, "pskd_alpha": 0.8, "pskd_coverage": 1.0}},
                 "valid": {2: {"loss": 6.1, "nll_loss": 5.9}}}


def test_other_validation_subsets_and_empty_log():
    d = parse_lines(["x | INFO | test | epoch 004 | valid on 'test' subset | loss 3.5 | bleu 20.1"])
    assert d == {"test": {4: {"loss": 3.5, "bleu": 20.1}}}
    assert parse_lines(["nothing here", "a | INFO | fairseq_cli.train | end of epoch 3"]) == {}


def test_plot_png_and_cli(tmp_path, capsys):
    simple, js = tmp_path / "baseline.log", tmp_path / "pskd.log"
    simple.write_text(SIMPLE)
    js.write_text(JSON)
    out = tmp_path / "curves.png"
    panels = plot_curves([simple, js], out)
    assert panels == ["nll_loss", "loss", "bleu", "pskd_alpha", "pskd_coverage"]
    data = out.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 20_000

    # a log without PS-KD metrics or BLEU: only the loss panel
    plain = tmp_path / "plain.log"
    plain.write_text("".join(line + "\n" for line in SIMPLE.splitlines()
                             if "| train |" in line or "| valid |" in line)
                     .replace("| bleu", "| xbleu").replace("pskd_", "other_"))
    assert plot_curves([plain], tmp_path / "plain.png") == ["nll_loss", "loss"]
    # the end of a run: epoch 3 only (the JSON log ends at epoch 2 and draws nothing)
    assert plot_curves([simple, js], tmp_path / "end.png", first_epoch=3) == [
        "nll_loss", "loss", "bleu", "pskd_alpha", "pskd_coverage"]
    assert plot_curves([js], tmp_path / "end.png", first_epoch=2) == [
        "loss", "bleu", "pskd_alpha", "pskd_coverage"]  # epoch 2 has no nll_loss
    with pytest.raises(ValueError, match="from epoch 4 on"):
        plot_curves([simple, js], tmp_path / "none.png", first_epoch=4)

    cli_out = tmp_path / "cli.png"
    assert main([str(simple), str(js), "--out", str(cli_out), "--labels", "baseline", "pskd"]) == 0
    assert cli_out.read_bytes()[:8] == PNG_MAGIC
    assert "nll_loss, loss, bleu, pskd_alpha, pskd_coverage" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:  # label count must match
        main([str(simple), str(js), "--out", str(cli_out), "--labels", "one"])
    assert exc.value.code == 2
    empty = tmp_path / "empty.log"
    empty.write_text("no epochs\n")
    assert main([str(empty), "--out", str(tmp_path / "e.png")]) == 2
    assert main([str(tmp_path / "missing.log"), "--out", str(tmp_path / "m.png")]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "missing.log" in last


def test_default_labels_name_the_runs():
    assert default_labels(["w/baseline.log", "w/pskd.log"]) == ["baseline", "pskd"]
    # experiment run writes RUN/train.log: the run directories name the curves
    assert default_labels(["r/baseline-s1/train.log", "r/pskd-a0.1-s1/train.log", {}]) == [
        "baseline-s1", "pskd-a0.1-s1", "run 3"]
