"""End to end through the real fairseq CLIs with --user-dir fairseq_pskd: the session's baseline
(2 epochs of label_smoothed_cross_entropy through fairseq-train), resumed for a third from
checkpoint_last.pt, generate from the checkpoint, interactive from the baseline's."""
import re
import shutil
import sys

import pytest
import torch
from conftest import LABEL_SMOOTHING, USER_DIR, epoch_stats, run, run_fairseq, train_args

import fairseq_pskd  # noqa: F401  (the allow-list lets torch.load read fairseq checkpoints)

pytestmark = pytest.mark.e2e


def test_train_resume_generate(toy_data_bin, baseline_run, tmp_path):
    trained, log = baseline_run
    assert sorted(epoch_stats(log.read_text())) == [1, 2]
    save = tmp_path / "ckpt"
    shutil.copytree(trained, save)  # the session's baseline stays as it is
    updates_after_2 = torch.load(save / "checkpoint_last.pt")["optimizer_history"][-1]["num_updates"]
    assert updates_after_2 > 0

    resumed = run_fairseq("train", *train_args(toy_data_bin, save, max_epoch=3, criterion=LABEL_SMOOTHING))
    assert "Loaded checkpoint" in resumed.stdout and "(epoch 3 @" in resumed.stdout
    assert sorted(epoch_stats(resumed.stdout)) == [3], "resume must train exactly the next epoch"
    ckpt = torch.load(save / "checkpoint_last.pt")  # weights-only load works with the plugin imported
    assert ckpt["optimizer_history"][-1]["num_updates"] > updates_after_2
    # an end-of-epoch checkpoint records the epoch to start next
    assert ckpt["extra_state"]["train_iterator"]["epoch"] == 4

    gen = run_fairseq("generate", toy_data_bin, "--user-dir", USER_DIR,
                      "--path", save / "checkpoint_last.pt", "--gen-subset", "test",
                      "--beam", 2, "--batch-size", 8, "--cpu")
    hyps = re.findall(r"^H-(\d+)\t", gen.stdout, flags=re.M)
    assert len(hyps) == 24 and len(set(hyps)) == 24, gen.stdout[-2000:]
    assert "BLEU4" in gen.stdout


def test_interactive_loads_checkpoint(toy_data_bin, baseline_run):
    save, _ = baseline_run
    proc = run([sys.executable, "-m", "fairseq_cli.interactive", toy_data_bin, "--user-dir", USER_DIR,
                "--path", save / "checkpoint_last.pt", "--source-lang", "src", "--target-lang", "tgt",
                "--beam", "2", "--cpu"], input="w1 w2 w3\n", timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert re.search(r"^H-0\t", proc.stdout, flags=re.M), proc.stdout[-3000:]
