"""End to end through the real fairseq CLIs with --user-dir fairseq_pskd: train 2 epochs,
resume a third from checkpoint_last.pt, generate from the checkpoint (issue 2)."""
import re

import torch

import fairseq_pskd  # noqa: F401  (the allow-list lets torch.load read fairseq checkpoints)

from conftest import TINY_ARCH, TINY_TRAIN, USER_DIR, epoch_stats, run_fairseq


def test_train_resume_generate(toy_data_bin, tmp_path):
    save = tmp_path / "ckpt"
    common = [toy_data_bin, "--user-dir", USER_DIR, *TINY_ARCH, *TINY_TRAIN,
              "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1",
              "--save-dir", save]

    first = run_fairseq("train", *common, "--max-epoch", 2)
    assert sorted(epoch_stats(first.stdout)) == [1, 2]
    assert (save / "checkpoint_last.pt").exists()
    updates_after_2 = torch.load(save / "checkpoint_last.pt")["optimizer_history"][-1]["num_updates"]
    assert updates_after_2 > 0

    resumed = run_fairseq("train", *common, "--max-epoch", 3)
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
    import subprocess, sys, os
    proc = subprocess.run(
        [sys.executable, "-m", "fairseq_cli.interactive", toy_data_bin, "--user-dir", USER_DIR,
         "--path", save / "checkpoint_last.pt", "--source-lang", "src", "--target-lang", "tgt",
         "--beam", "2", "--cpu"],
        input="w1 w2 w3\n", stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert re.search(r"^H-0\t", proc.stdout, flags=re.M), proc.stdout[-3000:]
