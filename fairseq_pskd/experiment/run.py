"""``run``: train one model (resuming), average its last checkpoints if asked, then decode,
score and calibrate its test sets into RUN_DIR/results.json."""
import difflib
import json
import os
import platform
import re
import shlex
import sys
import time
from pathlib import Path

from .. import __version__
from ..progress import TRAIN_START, EpochProgress
from .common import USER_DIR, ExperimentError, fairseq_train_args, is_fresh, log, read_manifest, run_logged
from .decode import evaluate_test_set
from .table import format_table

__all__ = ["hardware", "check_same_training", "training_wall_seconds", "run"]


def hardware():
    """A short description of where this ran (CPU model and cores, GPU if any)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    desc = f"{os.cpu_count()} x {cpu}"
    try:
        import torch
        if torch.cuda.is_available():
            desc = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}; {desc}"
    except ImportError:  # pragma: no cover
        pass
    return desc


def check_same_training(out: Path, ckpt_dir: Path, train_args):
    """A rerun resumes (or, when finished, just re-scores) the checkpoints in OUT, so it must
    use the arguments they were trained with: fairseq itself would resume them under new
    ones and the results would describe a run that never happened. Records the arguments."""
    recorded = out / "train_args.json"
    now = [str(a) for a in train_args]
    before = None
    if recorded.exists():
        before = json.loads(recorded.read_text())
    elif (out / "results.json").exists():  # runs made before train_args.json existed
        before = json.loads((out / "results.json").read_text()).get("train_args")
    if before is not None and before != now and (ckpt_dir / "checkpoint_last.pt").exists():
        changed = [d[0] + d[2:] for d in difflib.ndiff(before, now) if d[:1] in "+-"]
        raise ExperimentError(
            f"{out} holds checkpoints trained with other arguments (- before, + now: "
            f"{' '.join(changed)}); a rerun would resume them. Use another --out for the new "
            f"arguments, or delete {out} to train it again from scratch")
    recorded.write_text(json.dumps(now) + "\n")


def _max_epoch_of(train_args):
    for i, a in enumerate(train_args):
        if a == "--max-epoch" and i + 1 < len(train_args):
            return int(train_args[i + 1])
        if a.startswith("--max-epoch="):
            return int(a.split("=", 1)[1])
    return None


_EPOCH_WALL = re.compile(r"\| wall (\d+(?:\.\d+)?)\b")


def training_wall_seconds(log_path):
    """Seconds fairseq-train spent on a run, from the `wall` of its epoch summaries in log_path.

    fairseq restarts its wall clock when it resumes from checkpoint_last.pt, so the last `wall`
    of each segment of an appended log is summed (work an interruption threw away is not
    counted). None when the log has no epoch summary with a wall time.
    """
    segments, new_segment = [], True  # the last wall time of each segment
    with open(log_path, errors="replace") as f:
        for line in f:
            m = _EPOCH_WALL.search(line) if "| train | epoch" in line else None
            if m:
                wall = float(m.group(1))
                # a wall clock that went back is a restart whose start-up line is not in the log
                if new_segment or wall < segments[-1]:
                    segments.append(wall)
                else:
                    segments[-1] = wall
                new_segment = False
            elif TRAIN_START in line:  # fairseq-train started again
                new_segment = True
    return sum(segments) if segments else None


def run(args):
    prepared, out = Path(args.prepared).resolve(), Path(args.out).resolve()
    manifest = read_manifest(prepared)
    src, tgt = args.src or manifest["src"], args.tgt or manifest["tgt"]
    data_bin = prepared / manifest.get("data_bin", "data-bin")
    ckpt_dir = out / "checkpoints"
    out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    train_args = fairseq_train_args(args)
    if not train_args:
        raise ExperimentError("no fairseq-train arguments given (put them after --)")
    check_same_training(out, ckpt_dir, train_args)
    t0 = time.time()

    # 1. train (fairseq resumes from checkpoint_last.pt; a finished run returns at once)
    train_cmd = [py, "-m", "fairseq_cli.train", data_bin, "--user-dir", USER_DIR,
                 "--source-lang", src, "--target-lang", tgt, "--save-dir", ckpt_dir,
                 "--no-progress-bar", "--log-format", "simple", *train_args]
    progress_out = sys.stdout if args.progress == "-" else open(args.progress, "a", buffering=1)
    try:
        progress = EpochProgress(args.name or out.name, _max_epoch_of(train_args), progress_out,
                                 queued_epochs=args.queued_epochs, eta_dir=args.eta_dir)
        run_logged(train_cmd, out / "train.log", env, on_line=progress.feed)
    finally:
        if progress_out is not sys.stdout:
            progress_out.close()
    train_seconds = training_wall_seconds(out / "train.log") or time.time() - t0
    last = ckpt_dir / "checkpoint_last.pt"
    if not last.exists():
        raise ExperimentError(f"training wrote no {last}")

    # 2. checkpoint to evaluate: the last one, or the average of the last N epochs
    ckpt = last
    if args.average_last > 1:
        ckpt = ckpt_dir / f"average_last{args.average_last}.pt"
        if not is_fresh(ckpt, last):
            run_logged([py, "-m", "fairseq_pskd.evaluate", "average", "--inputs", ckpt_dir,
                        "--num-epoch-checkpoints", args.average_last, "--output", ckpt],
                       out / "eval.log", env)

    results = {
        "name": args.name or out.name, "corpus": manifest.get("corpus"), "src": src, "tgt": tgt,
        "prepared": str(prepared),
        "train_pairs": manifest.get("splits", {}).get("train", {}).get("pairs"),
        "checkpoint": str(ckpt), "average_last": args.average_last,
        "beam": args.beam, "lenpen": args.lenpen, "max_epoch": _max_epoch_of(train_args),
        "train_args": train_args, "train_command": " ".join(map(shlex.quote, map(str, train_cmd))),
        "hardware": hardware(), "fairseq_pskd": __version__, "tests": {},
    }
    for subset in args.test_subsets.split(","):
        ref = prepared / "ref" / f"{subset}.{tgt}"
        if not ref.exists():
            raise ExperimentError(f"reference {ref} not found")
        results["tests"][subset] = evaluate_test_set(data_bin, src, tgt, ckpt, subset, ref, out, args,
                                                     env, title=f"{results['name']} ({subset})")
    previous = out / "results.json"
    results["train_seconds"] = round(train_seconds, 1)
    # this invocation's wall time (a rerun that only re-decodes reports seconds); train_seconds
    # is the whole run's training
    results["total_seconds"] = round(time.time() - t0, 1)
    tmp = previous.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, previous)
    log(f"results: {previous}")
    print(format_table([results]))
    return 0
