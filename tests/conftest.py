"""Shared test fixtures: a tiny synthetic parallel corpus, binarised with fairseq-preprocess,
and helpers that run the real fairseq command-line tools with --user-dir fairseq_pskd."""
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
USER_DIR = str(REPO / "fairseq_pskd")

# A transformer small enough to train an epoch of the toy corpus in about a second on CPU.
TINY_ARCH = [
    "--arch", "transformer",
    "--encoder-layers", "1", "--decoder-layers", "1",
    "--encoder-embed-dim", "32", "--decoder-embed-dim", "32",
    "--encoder-ffn-embed-dim", "64", "--decoder-ffn-embed-dim", "64",
    "--encoder-attention-heads", "2", "--decoder-attention-heads", "2",
    "--share-all-embeddings",
]
TINY_TRAIN = [
    "--optimizer", "adam", "--lr", "1e-3", "--max-tokens", "400",
    "--no-progress-bar", "--log-format", "simple", "--log-interval", "1",
    "--cpu", "--seed", "1", "--num-workers", "0",
]


def run_fairseq(tool, *args, check=True, env=None, timeout=600):
    """Run fairseq_cli.<tool> in a subprocess; return CompletedProcess with merged output."""
    cmd = [sys.executable, "-m", f"fairseq_cli.{tool}", *map(str, args)]
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **(env or {}))
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=full_env, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-6000:]}")
    return proc


def train_until_killed(args, pattern, timeout=300):
    """fairseq-train ARGS, killed with SIGKILL at the first log line matching ``pattern``;
    returns (return code, the log up to the kill)."""
    import re
    import signal

    cmd = [sys.executable, "-m", "fairseq_cli.train", *map(str, args)]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    seen, deadline = [], time.time() + timeout
    for line in proc.stdout:
        seen.append(line)
        if re.search(pattern, line) or time.time() > deadline:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    return proc.returncode, "".join(seen)


def epoch_stats(log, kind="train"):
    """{epoch: {metric: value}} of a fairseq-train log's end-of-epoch summaries of ``kind``
    ("train", "valid"), with the package's own parser (fairseq_pskd.plots)."""
    from fairseq_pskd.plots import parse_lines

    return parse_lines(log.splitlines()).get(kind, {})


def make_toy_corpus(directory: Path, n_train=240, n_valid=24, n_test=24, vocab=40, seed=0):
    """A learnable toy task: the target is the source reversed, with a word mapping."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    words = [f"w{i}" for i in range(vocab)]
    mapping = {w: f"v{i}" for i, w in enumerate(words)}
    for split, n in (("train", n_train), ("valid", n_valid), ("test", n_test)):
        with open(directory / f"{split}.src", "w") as fs, open(directory / f"{split}.tgt", "w") as ft:
            for _ in range(n):
                sent = rng.choices(words, k=rng.randint(3, 9))
                fs.write(" ".join(sent) + "\n")
                ft.write(" ".join(mapping[w] for w in reversed(sent)) + "\n")
    return directory


def binarize(raw: Path, dest: Path):
    run_fairseq("preprocess", "--source-lang", "src", "--target-lang", "tgt",
                "--trainpref", raw / "train", "--validpref", raw / "valid", "--testpref", raw / "test",
                "--destdir", dest, "--joined-dictionary", "--workers", "1")
    return dest


def make_prepared(root: Path, n_test=24, seed=0):
    """A toy corpus laid out as scripts/prepare-*.sh writes one (data-bin/, ref/test.tgt,
    prepare.json), for `experiment run --prepared`; returns (prepared dir, raw dir)."""
    import json
    import shutil

    raw = make_toy_corpus(root / "raw", n_train=64, n_valid=8, n_test=n_test, seed=seed)
    prepared = root / "prepared"
    binarize(raw, prepared / "data-bin")
    (prepared / "ref").mkdir()
    shutil.copy(raw / "test.tgt", prepared / "ref" / "test.tgt")
    (prepared / "prepare.json").write_text(json.dumps({"corpus": "toy", "src": "src", "tgt": "tgt",
                                                      "data_bin": "data-bin"}))
    return prepared, raw


@pytest.fixture(scope="session")
def toy_data_bin(tmp_path_factory):
    """Binarised toy corpus (train/valid/test), built once per test session."""
    root = tmp_path_factory.mktemp("toy")
    make_toy_corpus(root / "raw")
    return binarize(root / "raw", root / "data-bin")


@pytest.fixture(scope="session")
def baseline_run(toy_data_bin, tmp_path_factory):
    """The tiny transformer trained 2 epochs with label_smoothed_cross_entropy (label smoothing
    0.1) through fairseq-train, once per session: (save dir with checkpoint1.pt, checkpoint2.pt
    and checkpoint_last.pt, the training log's path). Tests read it; none may change it."""
    save = tmp_path_factory.mktemp("baseline_run")
    proc = run_fairseq("train", toy_data_bin, "--user-dir", USER_DIR, *TINY_ARCH, *TINY_TRAIN,
                       "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1",
                       "--max-epoch", 2, "--save-dir", save)
    log = save / "train.log"
    log.write_text(proc.stdout)
    return save, log


# ---- the real Multi30k data ---------------------------------------------------------------

# a local copy of Multi30k's data/task1/raw files (the .gz files of its repository)
MULTI30K_RAW = Path(os.environ.get("MULTI30K_RAW") or "multi30k-raw-not-given")
needs_multi30k = pytest.mark.skipif(
    not (MULTI30K_RAW / "train.de.gz").is_file(),
    reason=f"real Multi30k data not found at {MULTI30K_RAW} (set MULTI30K_RAW to a local copy "
           "of its data/task1/raw files)")


def run_prepare_multi30k(*argv):
    """scripts/prepare-multi30k.sh ARGV in a subprocess; returns (CompletedProcess, seconds)."""
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    t0 = time.time()
    proc = subprocess.run(["bash", str(REPO / "scripts" / "prepare-multi30k.sh"), *map(str, argv)],
                          capture_output=True, text=True, env=env, timeout=900)
    return proc, time.time() - t0


@pytest.fixture(scope="session")
def m30k(tmp_path_factory):
    """Multi30k De-En prepared once per session: (OUT, CompletedProcess, seconds)."""
    out = tmp_path_factory.mktemp("multi30k") / "out"
    proc, seconds = run_prepare_multi30k("--out", out, "--raw", MULTI30K_RAW)
    assert proc.returncode == 0, proc.stderr[-5000:]
    print(f"\nMulti30k prepare took {seconds:.1f}s")
    return out, proc, seconds
