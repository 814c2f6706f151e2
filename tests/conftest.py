"""Shared test fixtures and helpers: a tiny synthetic parallel corpus, binarised in process
with fairseq's preprocessing, the one builder of fairseq-train arguments for the tiny model, and
the one runner of subprocesses (the real fairseq command-line tools with --user-dir fairseq_pskd,
scripts, python -m ...).

Tests that start a subprocess carry the ``e2e`` marker (pytest.ini); ``-m "not e2e"`` selects the
fast in-process tier. A test without the marker that starts one fails, saying so (see
pytest_runtest_protocol below)."""
import os
import random
import re
import signal
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
# The PS-KD criterion as the end-to-end tests train it.
PSKD = ["--criterion", "pskd", "--pskd-alpha", "0.8", "--pskd-topk", "4"]
LABEL_SMOOTHING = ["--criterion", "label_smoothed_cross_entropy"]


def train_args(data_bin, save_dir, *extra, max_epoch=4, criterion=PSKD, arch=TINY_ARCH):
    """fairseq-train's arguments: the tiny model (``arch``) on ``data_bin`` with --user-dir
    fairseq_pskd, TINY_TRAIN, ``criterion`` (PSKD: a_T 0.8, k = 4; or LABEL_SMOOTHING) at
    --label-smoothing 0.1, --max-epoch ``max_epoch`` (None: left out, e.g. for --max-update),
    --save-dir ``save_dir``, then ``extra``."""
    epochs = [] if max_epoch is None else ["--max-epoch", max_epoch]
    return [data_bin, "--user-dir", USER_DIR, *arch, *TINY_TRAIN, *criterion, "--label-smoothing", "0.1",
            *epochs, "--save-dir", save_dir, *extra]


# ---- subprocesses ---------------------------------------------------------------------------

def start(cmd, env=None, stderr=subprocess.STDOUT, **popen):
    """Popen(cmd) with text output on a pipe (stderr merged into it unless ``stderr`` says
    otherwise), in os.environ with PYTHONUNBUFFERED=1, OMP_NUM_THREADS=1 and ``env`` on top (a
    value None removes that variable). For runs side by side; run() waits for one."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    full_env = {k: v for k, v in full_env.items() if v is not None}
    return subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=stderr, text=True,
                            env=full_env, **popen)


def run(cmd, check=True, timeout=600, input=None, **start_kw):
    """start(cmd, ...), waited for: a CompletedProcess (stdout: the output, stderr merged into it
    unless start's ``stderr`` says otherwise); with ``check``, an AssertionError with the output's
    tail unless it exits with 0."""
    if input is not None:
        start_kw.setdefault("stdin", subprocess.PIPE)
    with start(cmd, **start_kw) as proc:
        try:
            out, err = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise
    done = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(done.args)} failed ({done.returncode}):\n"
                             f"{(out or '')[-6000:]}{(err or '')[-3000:]}")
    return done


def run_fairseq(tool, *args, **run_kw):
    """fairseq_cli.<tool> ARGS in a subprocess: run()'s CompletedProcess, output merged."""
    return run([sys.executable, "-m", f"fairseq_cli.{tool}", *args], **run_kw)


def train_until_killed(args, pattern, timeout=300):
    """fairseq-train ARGS, killed with SIGKILL at the first log line matching ``pattern``;
    returns (return code, the log up to the kill)."""
    proc = start([sys.executable, "-m", "fairseq_cli.train", *args])
    seen, deadline = [], time.time() + timeout
    with proc:
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
    """fairseq-preprocess of ``raw``/{train,valid,test}.{src,tgt} into ``dest`` (one joined
    dictionary), in this process: fairseq_cli.preprocess.main, as the command line runs it."""
    from fairseq import options
    from fairseq_cli import preprocess

    args = options.get_preprocessing_parser().parse_args([
        "--source-lang", "src", "--target-lang", "tgt", "--trainpref", str(raw / "train"),
        "--validpref", str(raw / "valid"), "--testpref", str(raw / "test"), "--destdir", str(dest),
        "--joined-dictionary", "--workers", "1"])
    before = list(preprocess.logger.handlers)
    try:
        preprocess.main(args)
    finally:  # main adds a handler writing DEST/preprocess.log, each call
        for handler in [h for h in preprocess.logger.handlers if h not in before]:
            preprocess.logger.removeHandler(handler)
            handler.close()
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
    and checkpoint_last.pt, the training log's path). Tests read it; none may change it (copy
    the save dir to train on from it)."""
    save = tmp_path_factory.mktemp("baseline_run")
    proc = run_fairseq("train", *train_args(toy_data_bin, save, max_epoch=2, criterion=LABEL_SMOOTHING))
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
    """scripts/prepare-multi30k.sh ARGV in a subprocess, outside any virtual environment it
    would otherwise pick: (CompletedProcess with stdout and stderr apart, seconds)."""
    t0 = time.time()
    proc = run(["bash", REPO / "scripts" / "prepare-multi30k.sh", *argv], check=False, timeout=900,
               env={"VIRTUAL_ENV": None}, stderr=subprocess.PIPE)
    return proc, time.time() - t0


@pytest.fixture(scope="session")
def m30k(tmp_path_factory):
    """Multi30k De-En prepared once per session: (OUT, CompletedProcess, seconds)."""
    out = tmp_path_factory.mktemp("multi30k") / "out"
    proc, seconds = run_prepare_multi30k("--out", out, "--raw", MULTI30K_RAW)
    assert proc.returncode == 0, proc.stderr[-5000:]
    print(f"\nMulti30k prepare took {seconds:.1f}s")
    return out, proc, seconds


# ---- the e2e marker, enforced -------------------------------------------------------------

_SPAWNED = pytest.StashKey[list]()


def _project_process(args):
    """Whether Popen ``args`` starts what the e2e marker stands for: a Python (fairseq's tools,
    python -m, a script), a shell, a fairseq-* command or a file of this repository; not a
    system tool that a library runs for itself (ldconfig, fc-list, uname)."""
    argv = [args] if isinstance(args, (str, bytes, os.PathLike)) else list(args)
    first = os.fsdecode(argv[0]).strip() if argv else ""
    if not first:
        return False
    prog = os.path.basename(first.split()[0])  # a shell=True command line: its program
    return (first == sys.executable or re.fullmatch(r"python[0-9.]*", prog) is not None
            or prog in ("bash", "sh") or prog.startswith("fairseq-") or first.startswith(str(REPO)))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """A test not marked e2e that starts a subprocess (in its body or its fixtures' set-up)
    fails at that call, so the fast tier (-m "not e2e") stays in process. Fixtures shared with
    e2e tests are set up by whichever test comes first: run the fast tier alone to check."""
    if item.get_closest_marker("e2e") is not None:
        return (yield)
    spawned = item.stash.setdefault(_SPAWNED, [])
    popen_init = subprocess.Popen.__init__

    def guarded_init(self, args, *a, **kw):
        if _project_process(args):
            spawned.append(args)
            pytest.fail(f"{item.nodeid} starts a subprocess ({_command(args)}) but is not marked "
                        "e2e: mark the test @pytest.mark.e2e (a whole module: pytestmark = "
                        "pytest.mark.e2e)", pytrace=False)
        popen_init(self, args, *a, **kw)

    subprocess.Popen.__init__ = guarded_init
    try:
        return (yield)
    finally:
        subprocess.Popen.__init__ = popen_init


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """The failure above, also where the code under test caught it (or a thread ate it)."""
    report = yield
    spawned = item.stash.get(_SPAWNED, None)
    if spawned:
        if report.passed:
            report.outcome = "failed"
            report.longrepr = (f"{item.nodeid} starts a subprocess ({_command(spawned[0])}) but is not "
                               "marked e2e: mark it @pytest.mark.e2e")
        spawned.clear()  # reported once
    return report


def _command(args):
    argv = [args] if isinstance(args, (str, bytes, os.PathLike)) else args
    return " ".join(os.fsdecode(a) if isinstance(a, bytes) else str(a) for a in argv)[:300]
