"""Resuming PS-KD runs through the real fairseq-train: every resume keeps its priors or says
exactly why not, and no run takes (or resets) another run's priors (docs/STORE.md, "Failure
modes"). Kills are SIGKILL at a log line, or inside fairseq's checkpoint copy."""
import re
import shutil
import signal
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import LABEL_SMOOTHING, epoch_stats, run, run_fairseq, train_args, train_until_killed

from fairseq_pskd.checkpoints import checkpoint_suffix, restore_file_error
from fairseq_pskd.store import TopKStore

pytestmark = pytest.mark.e2e

N = 240  # training sentences of the toy corpus


def pskd(data_bin, save, max_epoch, *extra):
    """train_args of PS-KD (a_T 0.8, k = 4) for ``max_epoch`` epochs."""
    return train_args(data_bin, save, *extra, max_epoch=max_epoch)


def refused(args, *expected):
    """fairseq-train ARGS stops with exit status 1 before a training step, saying each of ``expected``."""
    proc = run_fairseq("train", *args, check=False)
    assert proc.returncode == 1, proc.stdout[-4000:]
    for text in expected:
        assert text in proc.stdout, (text, proc.stdout[-4000:])
    assert "train_inner" not in proc.stdout.split("Loaded checkpoint")[-1]
    return proc.stdout


# ------------------------------------------------------------------ --save-interval > 1: a resume from further back

def test_save_interval_2_killed_in_epoch_4_says_which_priors_are_gone(toy_data_bin, tmp_path):
    """Checkpoints every 2 epochs; killed in epoch 4, the rerun resumes from epoch 2's checkpoint.
    Epoch 4 had already overwritten part of the buffer epoch 3 reads: the redone epoch 3 says at
    its start how many priors it found and how many epoch 4 overwrote (they add up to every
    sentence), and the start-up log warned once about --save-interval."""
    save = tmp_path / "run"
    args = pskd(toy_data_bin, save, 4, "--save-interval", "2")
    code, killed = train_until_killed(args, r"epoch 004:\s+4 /")
    assert code == -signal.SIGKILL and sorted(epoch_stats(killed)) == [1, 2, 3], killed[-3000:]
    assert killed.count("PS-KD: --save-interval 2 saves a checkpoint every 2 epochs") == 1

    log = run_fairseq("train", *args).stdout
    # epoch 2's checkpoint (fairseq names the epoch it starts next)
    assert re.search(r"Loaded checkpoint \S+checkpoint_last\.pt \(epoch 3 @ 10 updates\)", log), log[-3000:]
    m = re.search(r"PS-KD epoch 3 \(resumed\): priors of epoch 2 found for (\d+) of 240 sentences; (\d+) were "
                  r"overwritten by epoch 4 of this run, which trained after the checkpoint it resumed from", log)
    assert m, log[-4000:]
    found, lost = int(m.group(1)), int(m.group(2))
    assert lost > 0 and found + lost == N
    assert "keep --save-interval 1" in log
    # said when epoch 3 starts, before its first step
    assert m.start() < log.index("epoch 003:")
    train = epoch_stats(log)
    assert sorted(train) == [3, 4]
    assert 0 < train[3]["pskd_coverage"] < 1 and train[4]["pskd_coverage"] == 1.0


# ------------------------------------------------------------------ checkpoints not written by this run

def store_run(store):
    with TopKStore.open(store, readonly=True) as s:
        return s.run_id, s.run_save_dir, s.newest_epoch()


def test_warm_start_from_a_label_smoothing_checkpoint_never_adopts_a_store(toy_data_bin, baseline_run,
                                                                          tmp_path):
    """--restore-file of a label-smoothing checkpoint (the session's baseline's) with a
    --pskd-store-dir that holds another run's priors stops (exit status 1), naming that run; with
    a new store directory the same warm start trains, its first epoch against the label-smoothed
    target alone."""
    ls = baseline_run[0]
    store = tmp_path / "a_store"
    run_fairseq("train", *pskd(toy_data_bin, tmp_path / "a", 2, "--pskd-store-dir", store))
    id_a, dir_a, newest = store_run(store)
    assert (dir_a, newest) == (str(tmp_path / "a"), 2)

    warm = pskd(toy_data_bin, tmp_path / "warm", 3, "--restore-file", ls / "checkpoint2.pt", "--reset-optimizer")
    refused([*warm, "--pskd-store-dir", store],
            "Loaded checkpoint",
            f"StoreError: this run starts at epoch 3 from a checkpoint that carries no PS-KD run identity (it "
            f"was not written by a PS-KD training run of this version, e.g. a label-smoothing checkpoint given "
            f"as --restore-file; fairseq reloads --restore-file on every rerun, so to resume a warm-started run "
            f"drop --restore-file), but the PS-KD store at {store} holds the priors of a training run (run "
            f"{id_a}, save dir {tmp_path / 'a'}, priors up to epoch 2)",
            "Pass a new --pskd-store-dir")
    assert store_run(store) == (id_a, dir_a, 2)  # left as it was

    log = run_fairseq("train", *warm).stdout  # the default store: SAVE_DIR/pskd_store, new
    assert "holds no priors of epoch 2 (a new or emptied store)" in log
    train = epoch_stats(log)
    assert sorted(train) == [3] and train[3]["pskd_coverage"] == 0.0


def test_same_size_dictionary_in_another_order_is_refused_on_resume(toy_data_bin, tmp_path):
    """The data binarized again with a target dictionary of the same size in another order: the
    stored indices would name other words, so the resume stops, and says why."""
    save = tmp_path / "run"
    run_fairseq("train", *pskd(toy_data_bin, save, 2))
    other = tmp_path / "data-bin"
    shutil.copytree(toy_data_bin, other)
    for side in ("src", "tgt"):  # a joined dictionary, as the toy data has (--share-all-embeddings)
        lines = (other / f"dict.{side}.txt").read_text().splitlines(keepends=True)
        lines[0], lines[1] = lines[1], lines[0]
        (other / f"dict.{side}.txt").write_text("".join(lines))
    refused(pskd(other, save, 3), "Loaded checkpoint",
            f"StoreError: the PS-KD store at {save / 'pskd_store'} was built for another target dictionary: both "
            f"have", "in another order or with other words")
    log = run_fairseq("train", *pskd(toy_data_bin, save, 3)).stdout  # the right data resumes
    assert epoch_stats(log)[3]["pskd_coverage"] == 1.0


# ------------------------------------------------------------------ a kill while fairseq copies a checkpoint

KILL_IN_COPY = """
import os, shutil, signal, sys
mode, src_name = os.environ["KILL_MODE"], os.environ["KILL_SRC"]
copyfile = shutil.copyfile

def killing_copyfile(src, dst, *args, **kwargs):
    if os.path.basename(src) != src_name or not os.path.basename(dst).startswith("checkpoint_last"):
        return copyfile(src, dst, *args, **kwargs)
    if mode == "half":  # half of the bytes reach the destination
        with open(src, "rb") as f, open(dst, "wb") as g:
            g.write(f.read(os.path.getsize(src) // 2))
    if mode == "copied":  # all of them, then nothing more
        copyfile(src, dst, *args, **kwargs)
    print(f"KILLED IN COPY {mode}: {src} -> {dst}", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)

shutil.copyfile = killing_copyfile
sys.argv = ["fairseq-train", *sys.argv[1:]]
from fairseq_cli.train import cli_main
cli_main()
"""


def train_killed_in_copy(tmp_path, args, mode, src_name):
    hook = tmp_path / "kill_in_copy.py"
    hook.write_text(KILL_IN_COPY)
    proc = run([sys.executable, hook, *args], check=False, env={"KILL_MODE": mode, "KILL_SRC": src_name})
    assert proc.returncode == -signal.SIGKILL and "KILLED IN COPY" in proc.stdout, proc.stdout[-3000:]
    return proc.stdout


@pytest.mark.parametrize("mode", ["start", "half", "copied"])
def test_kill_while_checkpoint_last_is_copied_resumes(toy_data_bin, tmp_path, mode):
    """Killed while fairseq copies checkpoint2.pt to checkpoint_last.pt (before a byte, half way,
    after the last byte, before the rename): with the plugin the copy is atomic, so
    checkpoint_last.pt is still epoch 1's, whole, and the same command trains to the end with
    every prior."""
    save = tmp_path / "run"
    train_killed_in_copy(tmp_path, pskd(toy_data_bin, save, 3), mode, "checkpoint2.pt")
    ckpt = torch.load(save / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    assert ckpt["extra_state"]["train_iterator"]["epoch"] == 2  # epoch 1's (it names the epoch it starts next)
    log = run_fairseq("train", *pskd(toy_data_bin, save, 3)).stdout
    train = epoch_stats(log)
    assert max(train) == 3 and all(train[e]["pskd_coverage"] == 1.0 for e in train if e > 1), log[-3000:]


def test_kill_in_copy_with_label_smoothing_resumes_with_the_plugin_loaded(toy_data_bin, tmp_path):
    """The atomic copy comes with --user-dir, whatever the criterion."""
    save = tmp_path / "ls"
    args = train_args(toy_data_bin, save, max_epoch=3, criterion=LABEL_SMOOTHING)
    train_killed_in_copy(tmp_path, args, "half", "checkpoint2.pt")
    assert sorted(epoch_stats(run_fairseq("train", *args).stdout)) in ([2, 3], [3])


@pytest.mark.parametrize("cut", ["empty", "half"])
def test_damaged_checkpoint_last_stops_with_the_command_that_repairs_it(toy_data_bin, tmp_path, cut):
    """A checkpoint_last.pt cut short (what stock fairseq's copy leaves after a kill, or a full
    disk) stops the rerun before fairseq reads it, with the exact command that resumes from the
    newest intact checkpoint; that command works."""
    save = tmp_path / "run"
    run_fairseq("train", *pskd(toy_data_bin, save, 2))
    last = save / "checkpoint_last.pt"
    data = last.read_bytes()
    last.write_bytes(b"" if cut == "empty" else data[:len(data) // 2])
    command = f"cp {save / 'checkpoint2.pt'} {last}"
    refused(pskd(toy_data_bin, save, 3), f"the checkpoint to resume from, {last}, is damaged",
            f"Resume from the newest intact checkpoint, checkpoint2.pt: {command}")
    run(command.split())
    log = run_fairseq("train", *pskd(toy_data_bin, save, 3)).stdout
    assert sorted(epoch_stats(log)) == [3] and epoch_stats(log)[3]["pskd_coverage"] == 1.0


def test_symlinked_checkpoint_last_stays_a_link_to_the_new_checkpoint(toy_data_bin, tmp_path):
    """A checkpoint_last.pt that is a symbolic link (to another disk, say) stays one: the atomic
    copy replaces the file it points to, as fairseq's plain copy writes through it."""
    save, elsewhere = tmp_path / "run", tmp_path / "other_disk"
    run_fairseq("train", *pskd(toy_data_bin, save, 1))
    elsewhere.mkdir()
    last, target = save / "checkpoint_last.pt", elsewhere / "checkpoint_last.pt"
    shutil.move(last, target)
    last.symlink_to(target)
    run_fairseq("train", *pskd(toy_data_bin, save, 2))
    assert last.is_symlink() and last.resolve() == target.resolve()
    ckpt = torch.load(target, map_location="cpu", weights_only=False)
    assert ckpt["extra_state"]["train_iterator"]["epoch"] == 3  # epoch 2's (it names the epoch it starts next)
    assert sorted(p.name for p in elsewhere.iterdir()) == ["checkpoint_last.pt"]  # no temporary file left


@pytest.mark.parametrize("backend,sharded,suffix", [
    ("c10d", False, ""), ("c10d", True, "-a"), ("fully_sharded", False, "-a"),
    ("fully_sharded", True, ""), ("fully_sharded", True, "-a")])
def test_checkpoint_suffix_is_the_one_fairseq_loads(backend, sharded, suffix):
    """The suffix the damage check reads is fairseq's own (Trainer.checkpoint_suffix), FSDP's
    per-rank shard included."""
    from fairseq.trainer import Trainer
    trainer = SimpleNamespace(
        cfg=SimpleNamespace(distributed_training=SimpleNamespace(ddp_backend=backend, use_sharded_state=sharded),
                            checkpoint=SimpleNamespace(checkpoint_suffix=suffix)),
        is_fsdp=backend == "fully_sharded", data_parallel_rank=3)
    assert checkpoint_suffix(suffix, backend, sharded, 3) == Trainer.checkpoint_suffix.fget(trainer)


def test_damaged_shard_names_the_same_ranks_intact_shard(tmp_path):
    """With FSDP's sharded state each rank resumes from its own checkpoint_last-shardR.pt: a
    damaged one is found, and the fix names that rank's newest intact shard, not another rank's."""
    good = tmp_path / "good.pt"
    torch.save({"x": torch.zeros(8)}, good)
    for name in ("checkpoint2-shard0.pt", "checkpoint1-shard1.pt", "checkpoint_last-shard0.pt"):
        shutil.copyfile(good, tmp_path / name)
    (tmp_path / "checkpoint_last-shard1.pt").write_bytes(good.read_bytes()[:100])
    suffix = checkpoint_suffix("", "fully_sharded", True, 1)
    error = restore_file_error(str(tmp_path), "checkpoint_last.pt", suffix)
    assert error is not None and "checkpoint_last-shard1.pt, is damaged (truncated" in str(error)
    assert f"cp {tmp_path / 'checkpoint1-shard1.pt'} {tmp_path / 'checkpoint_last-shard1.pt'}" in str(error)
    assert restore_file_error(str(tmp_path), "checkpoint_last.pt", checkpoint_suffix("", "fully_sharded", True, 0)) \
        is None


# ------------------------------------------------------------------ options and paths, said as a user meets them

@pytest.mark.parametrize("store_dir,expected", [
    ("", "--pskd-store-dir is empty: pass a directory, or leave the option out"),
    ("{save}/pskd_{{foo}}", "{foo} is not a placeholder it fills in; it fills in {rank}, {node} and {local_rank}"),
    ("{save}/pskd_{{rank:>3}}", "{rank:>3} is not a placeholder it fills in"),
    ("{file}", "is a file, not a directory: --pskd-store-dir names a directory"),
])
def test_bad_store_dir_is_refused_with_what_to_pass(toy_data_bin, tmp_path, store_dir, expected):
    save = tmp_path / "run"
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory\n")
    out = refused(pskd(toy_data_bin, save, 1, "--pskd-store-dir", store_dir.format(save=save, file=a_file)),
                  expected)
    assert "permissions" not in out.split(expected)[-1][:300]
    assert not (save / "pskd_store").exists()


def test_braces_in_the_save_dir_are_not_taken_for_placeholders(toy_data_bin, tmp_path):
    """Only --pskd-store-dir is a template: the default store, SAVE_DIR/pskd_store, may sit in a
    save dir whose name has braces."""
    save = tmp_path / "run_{lr=1e-3}"
    log = run_fairseq("train", *pskd(toy_data_bin, save, 1)).stdout
    assert sorted(epoch_stats(log)) == [1] and (save / "pskd_store" / "header.json").exists()


def test_inspect_of_a_file_says_it_is_not_a_directory(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x\n")
    proc = run([sys.executable, "-m", "fairseq_pskd.store", "inspect", a_file], check=False,
               stderr=subprocess.PIPE)
    assert proc.returncode == 2 and f"error: {a_file} is a file, not a directory" in proc.stderr, proc.stderr


def test_immutable_store_file_gets_advice_for_the_command_line(toy_data_bin, tmp_path):
    save = tmp_path / "run"
    run_fairseq("train", *pskd(toy_data_bin, save, 1))
    target = save / "pskd_store" / "indices.0.bin"
    if run(["chattr", "+i", target], check=False).returncode != 0:
        pytest.skip("chattr +i is not permitted here")
    try:
        out = refused(pskd(toy_data_bin, save, 2), f"cannot open the PS-KD store at {save / 'pskd_store'} for writing",
                      "a file marked immutable needs `chattr -i`")
        assert "readonly=True" not in out
    finally:
        run(["chattr", "-i", target])
