"""learning_curve: runs placed by the training-set size their fairseq-train log loaded, means
over seeds per size and system, differences to the baseline of the same size, the PNG."""
import json

import pytest

from fairseq_pskd import learning_curve as lc

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fake_run(root, size, name, bleu, ece, nll, tuned_bleu=None, rho=0.3):
    d = root / f"n{size}" / name
    d.mkdir(parents=True)
    (d / "train.log").write_text(
        f"2026-01-01 | INFO | fairseq.data.data_utils | loaded 1,014 examples from: x/valid.de-en.de\n"
        f"2026-01-01 | INFO | fairseq.data.data_utils | loaded {size:,} examples from: x/train.de-en.de\n"
        "2026-01-01 | INFO | valid | epoch 001 | loss 4 | nll_loss 3.5 | ppl 11\n")
    (d / "score.test.json").write_text(json.dumps({"bleu_detail": "BLEU = 1 (BP = 1 ratio = 0.950 hyp_len = 1)"}))
    test = {"bleu": bleu, "chrf": 50.0, "ece": ece, "nll": nll, "aurc": 0.1, "sentence_spearman": rho,
            "sentence_aurc": 0.4}
    result = {"name": name, "corpus": "toy", "src": "de", "tgt": "en", "max_epoch": 1, "tests": {"test": test}}
    (d / "results.json").write_text(json.dumps(result))
    if tuned_bleu is not None:
        (d / "lenpen").mkdir()
        (d / "lenpen" / "results.json").write_text(json.dumps(
            {**result, "lenpen": 1.4, "lenpen_choice": {"bleu": {}}, "tests": {"test": {**test, "bleu": tuned_bleu}}}))
    return d


def test_learning_curve_rows_and_plot(tmp_path, capsys):
    dirs = [fake_run(tmp_path, 1000, "baseline-s1", 20.0, 0.10, 3.0, 21.0),
            fake_run(tmp_path, 1000, "baseline-s2", 22.0, 0.08, 3.2, 23.0),
            fake_run(tmp_path, 1000, "pskd-a0.4-s1", 23.0, 0.05, 2.9, 24.0, rho=0.5),
            fake_run(tmp_path, 1000, "pskd-a0.4-s2", 23.0, 0.03, 3.0, 23.0, rho=0.4),
            fake_run(tmp_path, 8000, "baseline-s1", 30.0, 0.06, 2.0, 30.5),
            fake_run(tmp_path, 8000, "pskd-a0.4-s1", 29.0, 0.04, 2.1)]  # no lenpen yet
    assert lc.training_pairs(dirs[0]) == 1000 and lc.training_pairs(dirs[-1]) == 8000
    rows = lc.summarize(lc.collect(dirs))
    assert [(r["size"], r["system"], r["seeds"]) for r in rows] == [
        (1000, "baseline", [1, 2]), (1000, "pskd-a0.4", [1, 2]), (8000, "baseline", [1]), (8000, "pskd-a0.4", [1])]
    small = rows[1]
    assert small["bleu_fixed"] == 23.0 and small["d_bleu_fixed"] == pytest.approx(2.0)
    assert small["d_bleu_tuned"] == pytest.approx(23.5 - 22.0)
    assert small["d_ece"] == pytest.approx(0.04 - 0.09) and small["d_nll"] == pytest.approx(2.95 - 3.1)
    assert small["sentence_spearman"] == pytest.approx(0.45) and small["length"] == pytest.approx(0.95)
    assert small["per_seed"][1]["d_bleu_tuned"] == pytest.approx(3.0)
    assert rows[3]["bleu_tuned"] is None and rows[3]["d_bleu_tuned"] is None  # not chosen: not made up
    table = lc.format_rows(rows, markdown=True).splitlines()
    assert table[3].startswith("| 1,000 | pskd-a0.4 | 1,2 | 23.00 | +2.00 | 23.50 | +1.50 |")
    png = tmp_path / "curve.png"
    assert lc.main([*map(str, dirs), "--png", str(png)]) == 0
    assert png.read_bytes()[:8] == PNG_MAGIC
    # a size without its baseline cannot be compared; a directory not named SYSTEM-sSEED is refused
    assert lc.main([str(dirs[2])]) == 2
    assert "no baseline runs with 1000 training pairs" in capsys.readouterr().err
    odd = tmp_path / "odd"
    odd.mkdir()
    assert lc.main([str(odd)]) == 2 and "named SYSTEM-sSEED" in capsys.readouterr().err
