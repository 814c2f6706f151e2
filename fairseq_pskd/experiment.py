"""One experiment, end to end: train, (average), generate, score, calibrate; and the table.

    python -m fairseq_pskd.experiment run --prepared DATA --out RUN_DIR [--average-last N]
        [--beam 5 --lenpen 1.0] [--test-subsets test,test1] [--cpu] -- FAIRSEQ-TRAIN-ARGS...
    python -m fairseq_pskd.experiment score RUN_DIR --src RAW.SRC --ref RAW.TGT [--cpu]
    python -m fairseq_pskd.experiment lenpen RUN_DIR [--grid 0.6,0.8,...,2.0,2.5,3.0]
    python -m fairseq_pskd.experiment table RUN_DIR/results.json ... [--markdown] [--paired-bs]
                                                                      [--mean-over-seeds]
    python -m fairseq_pskd.experiment updates-per-epoch --prepared DATA -- FAIRSEQ-TRAIN-ARGS...

``DATA`` is what scripts/prepare-*.sh wrote (data-bin/, ref/, prepare.json). Every recipe
(the CPU quickstart, examples/*) goes through ``run``, so baseline and PS-KD are trained,
decoded and scored by the same code. Steps are idempotent: fairseq-train resumes from
checkpoint_last.pt (and returns at once when training is complete); the later steps are
skipped when their output exists and is newer than the checkpoint they read (a decode also
when made with the same beam and length penalty). A rerun must
give the same fairseq-train arguments (recorded in RUN_DIR/train_args.json): otherwise it stops
with an error instead of resuming, or re-scoring, checkpoints trained with other ones.
``score`` decodes and scores any raw test set with a finished run, through the same
preprocessing, checkpoint and decoding settings (output in RUN_DIR/score-NAME). ``lenpen``
chooses a run's length penalty on validation data and decodes its test sets with it (output in
RUN_DIR/lenpen, a results.json that ``table`` reads like any run's).
"""
import argparse
import difflib
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

from . import __version__
from .progress import TRAIN_START, EpochProgress

USER_DIR = str(Path(__file__).resolve().parent)


class ExperimentError(Exception):
    """A user-facing error: printed as ``error: <message>``, exit status 2."""


def log(msg):
    print(f"[experiment] {msg}", flush=True)


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


def _run(cmd, log_path, env=None, on_line=None):
    """Run a command, teeing its output to log_path (and each line to ``on_line``); raise with
    the log's tail on failure."""
    log(f"$ {' '.join(shlex.quote(str(c)) for c in cmd)}")
    with open(log_path, "a") as out:
        proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=env)
        for line in proc.stdout:
            out.write(line)
            out.flush()
            if on_line is not None:
                on_line(line)
            if "| train |" in line or "| valid |" in line or "error" in line.lower():
                sys.stdout.write("    " + line.split("| INFO | ", 1)[-1])
                sys.stdout.flush()
        proc.wait()
    if proc.returncode != 0:
        with open(log_path) as f:
            tail = "".join(f.readlines()[-25:])
        raise ExperimentError(f"{Path(str(cmd[0])).name} {cmd[1] if len(cmd) > 1 else ''} failed "
                              f"(exit {proc.returncode}); last lines of {log_path}:\n{tail}")


def _train_args(args):
    """The fairseq-train arguments given after ``--`` (argparse keeps the ``--``)."""
    train_args = list(args.train_args)
    return train_args[1:] if train_args[:1] == ["--"] else train_args


def _fresh(output: Path, *inputs: Path) -> bool:
    return output.exists() and all(output.stat().st_mtime >= i.stat().st_mtime for i in inputs)


def _read_manifest(prepared: Path):
    manifest = prepared / "prepare.json"
    if not manifest.exists():
        raise ExperimentError(f"{manifest} not found: prepare the data first "
                              "(scripts/prepare-multi30k.sh or scripts/prepare-iwslt15.sh)")
    return json.loads(manifest.read_text())


def _check_same_training(out: Path, ckpt_dir: Path, train_args):
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


_EPOCH_WALL = re.compile(r"\| wall (\d+(?:\.\d+)?)\b")


def run(args):
    prepared, out = Path(args.prepared).resolve(), Path(args.out).resolve()
    manifest = _read_manifest(prepared)
    src, tgt = args.src or manifest["src"], args.tgt or manifest["tgt"]
    data_bin = prepared / manifest.get("data_bin", "data-bin")
    ckpt_dir = out / "checkpoints"
    out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    train_args = _train_args(args)
    if not train_args:
        raise ExperimentError("no fairseq-train arguments given (put them after --)")
    _check_same_training(out, ckpt_dir, train_args)
    t0 = time.time()

    # 1. train (fairseq resumes from checkpoint_last.pt; a finished run returns at once)
    train_cmd = [py, "-m", "fairseq_cli.train", data_bin, "--user-dir", USER_DIR,
                 "--source-lang", src, "--target-lang", tgt, "--save-dir", ckpt_dir,
                 "--no-progress-bar", "--log-format", "simple", *train_args]
    progress_out = sys.stdout if args.progress == "-" else open(args.progress, "a", buffering=1)
    try:
        progress = EpochProgress(args.name or out.name, _max_epoch_of(train_args), progress_out,
                                 queued_epochs=args.queued_epochs, eta_dir=args.eta_dir)
        _run(train_cmd, out / "train.log", env, on_line=progress.feed)
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
        if not _fresh(ckpt, last):
            _run([py, "-m", "fairseq_pskd.evaluate", "average", "--inputs", ckpt_dir,
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
        results["tests"][subset] = _evaluate(data_bin, src, tgt, ckpt, subset, ref, out, args,
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


def _decode_and_score(data_bin, src, tgt, ckpt, subset, ref, out, args, env):
    """Beam-search ``subset`` of ``data_bin`` with ``ckpt`` (args.beam, args.lenpen) and score
    the detokenised output against the raw reference ``ref``; outputs go to ``out`` (skipped
    when made from the same checkpoint, unchanged since, and settings). Returns the score dict
    of evaluate.py."""
    py = sys.executable
    device = ["--cpu"] if args.cpu else []
    # 1. beam search; --post-process sentencepiece gives Moses-tokenised text
    gen = out / f"generate.{subset}.txt"
    # what the decode was made with: a rerun with another checkpoint, beam or lenpen redoes it
    stamp, made_with = out / f"generate.{subset}.json", {
        "checkpoint": str(ckpt), "beam": args.beam, "lenpen": args.lenpen}
    if not (_fresh(gen, ckpt) and stamp.exists() and json.loads(stamp.read_text()) == made_with):
        out.mkdir(parents=True, exist_ok=True)
        stamp.unlink(missing_ok=True)
        tmp = gen.with_suffix(".tmp")
        with open(tmp, "w") as f:
            log(f"generating {subset} (beam {args.beam}, lenpen {args.lenpen})")
            proc = subprocess.run(
                [py, "-m", "fairseq_cli.generate", str(data_bin), "--user-dir", USER_DIR,
                 "--source-lang", src, "--target-lang", tgt, "--path", str(ckpt),
                 "--gen-subset", subset, "--beam", str(args.beam), "--lenpen", str(args.lenpen),
                 "--batch-size", str(args.batch_size), "--post-process", "sentencepiece",
                 # fairseq 0.12 drops the last sentences of a set whose size is not a
                 # multiple of this (default 8; docs/EVALUATION.md): decode every one
                 "--required-batch-size-multiple", "1", *device],
                stdout=f, stderr=subprocess.PIPE, text=True, env=env)
        if proc.returncode != 0:
            raise ExperimentError(f"fairseq-generate failed:\n{proc.stderr[-3000:]}")
        os.replace(tmp, gen)
        stamp.write_text(json.dumps(made_with) + "\n")
    # 2. detokenised sacrebleu BLEU / chrF against the raw reference
    score = out / f"score.{subset}.json"
    # a score made before the sentence-level confidence existed is made again (seconds)
    if not _fresh(score, gen) or SENTENCE_KEYS[0] not in json.loads(score.read_text()):
        _run([py, "-m", "fairseq_pskd.evaluate", "score", "--generate-output", gen, "--ref", ref,
              "--detok-lang", tgt, "--detok-output", out / f"hyp.{subset}.{tgt}", "--json", score,
              "--sentence-output", out / f"sentence.{subset}.tsv"],
             out / "eval.log", env)
    return json.loads(score.read_text())


# per test set: how well the length-normalised model score ranks the translations by their
# sentence chrF (calibration.sentence_confidence)
SENTENCE_KEYS = ("sentence_spearman", "sentence_aurc")


def _evaluate(data_bin, src, tgt, ckpt, subset, ref, out, args, env, title):
    """Decode and score ``subset`` (_decode_and_score), then measure calibration; outputs go to
    ``out`` (skipped when newer than ckpt)."""
    s = _decode_and_score(data_bin, src, tgt, ckpt, subset, ref, out, args, env)
    # 3. teacher-forced calibration: ECE, NLL, AURC, reliability diagram (decoding plays no part)
    calib = out / f"calibration.{subset}.json"
    if not _fresh(calib, ckpt):
        _run([sys.executable, "-m", "fairseq_pskd.evaluate", "calibration", "--data-bin", data_bin,
              "--path", ckpt, "--subset", subset, "--bins", args.bins,
              "--png", out / f"reliability.{subset}.png", "--title", title,
              "--json", calib, *(["--cpu"] if args.cpu else [])], out / "eval.log", env)
    c = json.loads(calib.read_text())
    return {
        "bleu": s["bleu"], "chrf": s["chrf"], "bleu_signature": s["bleu_signature"],
        "chrf_signature": s["chrf_signature"], "ece": c["ece"], "nll": c["nll"],
        "aurc": c["aurc"], "eaurc": c.get("eaurc"), "accuracy": c.get("accuracy"),
        "bins": args.bins, "sentences": s["n"], **{k: s.get(k) for k in SENTENCE_KEYS},
    }


def _finished_run(run_arg):
    """(run directory, its results.json, prepared directory, manifest) of a finished run."""
    run_dir = Path(run_arg).resolve()
    results_path = run_dir / "results.json"
    if not results_path.exists():
        raise ExperimentError(f"{results_path} not found: this needs a finished "
                              "`experiment run` directory")
    results = json.loads(results_path.read_text())
    prepared = _prepared_of(results)
    manifest = _read_manifest(prepared)
    if not Path(results["checkpoint"]).exists():
        raise ExperimentError(f"the run's checkpoint {results['checkpoint']} is gone")
    return run_dir, results, prepared, manifest


def lenpen(args):
    """Choose the length penalty on validation data, then decode the test sets with it.

    Beam search's length penalty changes how long the translations are, and BLEU's brevity
    penalty punishes a system that is too short whatever its n-gram precision: two systems
    compared at one fixed lenpen can differ by their length alone. Each value of the grid decodes
    the validation subset; the one with the best BLEU (the smallest on ties) decodes the run's
    test subsets into RUN/lenpen/, a results directory that `table` reads like a run's (the
    calibration is the run's own: teacher-forced, decoding plays no part in it).
    """
    run_dir, results, prepared, manifest = _finished_run(args.run)
    src, tgt = results["src"], results["tgt"]
    data_bin = prepared / manifest.get("data_bin", "data-bin")
    ckpt = Path(results["checkpoint"])
    out = run_dir / "lenpen"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    args.beam = results["beam"]
    grid = sorted({float(f"{v:g}") for v in args.grid})  # one value per decode directory name
    ref = prepared / "ref" / f"{args.valid_subset}.{tgt}"
    if not ref.exists():
        raise ExperimentError(f"reference {ref} not found: --valid-subset names a split the "
                              "prepared data has no reference for")
    bleu = {}
    for value in grid:
        args.lenpen = value
        scored = _decode_and_score(data_bin, src, tgt, ckpt, args.valid_subset, ref,
                                   out / f"{args.valid_subset}.lenpen{value:g}", args, env)
        bleu[value] = scored["bleu"]
        log(f"lenpen {value:g}: BLEU {scored['bleu']:.2f} on {args.valid_subset} "
            f"({scored['bleu_detail'].split('(')[-1].rstrip(')')})")
    best = max(grid, key=lambda v: (round(bleu[v], 6), -v))
    if len(grid) > 1 and best in (grid[0], grid[-1]):
        log(f"warning: the best length penalty, {best:g}, is at the end of the grid: a value "
            "beyond it may be better (--grid)")
    args.lenpen = best
    tuned = {**results, "lenpen": best, "tests": {},
             "lenpen_choice": {"subset": args.valid_subset, "beam": args.beam,
                               "bleu": {f"{v:g}": bleu[v] for v in grid}}}
    for subset, old in results["tests"].items():
        test_ref = prepared / "ref" / f"{subset}.{tgt}"
        # decoded in a directory of its lenpen (a rerun that chooses another one never reuses
        # this decode), then put where `table` reads a run's hypotheses and scores
        at = out / f"{subset}.lenpen{best:g}"
        s = _decode_and_score(data_bin, src, tgt, ckpt, subset, test_ref, at, args, env)
        for name in (f"hyp.{subset}.{tgt}", f"score.{subset}.json", f"sentence.{subset}.tsv"):
            (out / name).write_bytes((at / name).read_bytes())
        tuned["tests"][subset] = {**old, "bleu": s["bleu"], "chrf": s["chrf"],
                                  "bleu_signature": s["bleu_signature"],
                                  "chrf_signature": s["chrf_signature"], "sentences": s["n"],
                                  **{k: s.get(k) for k in SENTENCE_KEYS}}
        calib = run_dir / f"calibration.{subset}.json"
        if calib.exists():
            (out / calib.name).write_bytes(calib.read_bytes())
    (out / "results.json").write_text(json.dumps(tuned, indent=2) + "\n")
    print(f"{results['name']}: lenpen {best:g} chosen on {args.valid_subset} "
          f"(BLEU {', '.join(f'{v:g}: {bleu[v]:.2f}' for v in grid)})")
    for subset, t in tuned["tests"].items():
        print(f"{subset}: BLEU {t['bleu']:.2f} (lenpen {results['lenpen']:g}: "
              f"{results['tests'][subset]['bleu']:.2f}), chrF {t['chrf']:.2f}")
    log(f"results: {out / 'results.json'}")
    return 0


def score(args):
    """Score a finished run on any raw parallel text: the run's own preprocessing (the
    prepared data's normalisation, Moses tokenisation, sentencepiece model and dictionary),
    its checkpoint and decoding settings; BLEU/chrF and calibration."""
    from .prepare import binarize, subword, text
    from .prepare.errors import PrepareError

    run_dir, results, prepared, manifest = _finished_run(args.run)
    src, tgt = results["src"], results["tgt"]
    data_bin = prepared / manifest.get("data_bin", "data-bin")
    ckpt = Path(results["checkpoint"])
    try:
        src_lines, ref_lines = text.read_lines(args.src), text.read_lines(args.ref)
    except PrepareError as e:
        raise ExperimentError(str(e)) from None
    if not src_lines or len(src_lines) != len(ref_lines):
        raise ExperimentError(f"{args.src} has {len(src_lines)} lines and {args.ref} "
                              f"{len(ref_lines)}: they must be parallel and not empty")
    name = args.name or Path(args.src).name.split(".")[0]
    out = Path(args.out).resolve() if args.out else run_dir / f"score-{name}"
    enc, bin_dir = out / "encoded", out / "data-bin"
    out.mkdir(parents=True, exist_ok=True)
    for old in ("generate.test.txt", "score.test.json", "calibration.test.json"):
        (out / old).unlink(missing_ok=True)  # from an earlier score into OUT: never reused
    # the preprocessing of scripts/prepare-*.sh (prepare/pipeline.py), as its manifest records
    normalize = manifest.get("text", {}).get("normalize_punctuation", True)
    sp = subword.load(prepared / manifest["spm"]["model"])
    for lang, lines in ((src, src_lines), (tgt, ref_lines)):
        tok = text.tokenize_lines(lines, lang, normalize=normalize, label=f"{name}.{lang}")
        text.write_lines(enc / f"test.{lang}", subword.encode(sp, tok))
    text.write_lines(out / f"ref.{tgt}", map(text.squash_whitespace, ref_lines))
    if bin_dir.exists():
        import shutil
        shutil.rmtree(bin_dir)
    cmd = binarize.find_preprocess() + [
        "--source-lang", src, "--target-lang", tgt, "--testpref", str(enc / "test"),
        "--destdir", str(bin_dir), "--srcdict", str(data_bin / f"dict.{src}.txt"),
        "--tgtdict", str(data_bin / f"dict.{tgt}.txt"), "--workers", "1"]
    _run(cmd, out / "preprocess.log")
    args.beam, args.lenpen = results["beam"], results["lenpen"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    title = f"{results['name']} ({name})"
    scored = _evaluate(bin_dir, src, tgt, ckpt, "test", out / f"ref.{tgt}", out, args, env, title)
    report = {"run": str(run_dir), "name": results["name"], "test_set": name,
              "src": str(Path(args.src).resolve()), "ref": str(Path(args.ref).resolve()),
              "checkpoint": str(ckpt), "beam": args.beam, "lenpen": args.lenpen, **scored}
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"{results['name']} on {name} ({scored['sentences']} sentences, beam {args.beam}, "
          f"lenpen {args.lenpen}):")
    print(f"BLEU = {scored['bleu']:.2f}  {scored['bleu_signature']}")
    print(f"chrF = {scored['chrf']:.2f}  {scored['chrf_signature']}")
    print(f"ECE {100 * scored['ece']:.2f}% ({args.bins} bins), NLL {scored['nll']:.3f}, "
          f"AURC x1000 {1000 * scored['aurc']:.1f}")
    log(f"results: {out / 'results.json'}")
    return 0


def _prepared_of(results):
    """The prepared-data directory a run trained on (recorded; older runs: from its command)."""
    if results.get("prepared"):
        return Path(results["prepared"])
    cmd = shlex.split(results.get("train_command", ""))
    if "fairseq_cli.train" in cmd and cmd.index("fairseq_cli.train") + 1 < len(cmd):
        return Path(cmd[cmd.index("fairseq_cli.train") + 1]).parent
    raise ExperimentError("the run's results.json names no prepared data directory")


COLUMNS = [("run", "{name}"), ("data", "{corpus} {src}->{tgt}"), ("test", "{subset}"),
           ("epochs", "{max_epoch}"), ("lenpen", "{lenpen_shown}"),
           ("BLEU", "{bleu:.2f}"), ("p", "{p}"), ("chrF", "{chrf:.2f}"),
           ("ECE %", "{ece_pct:.2f}"), ("NLL", "{nll:.3f}"), ("AURC x1000", "{aurc_k:.1f}"),
           ("sent rho", "{sent_rho}"), ("sent AURC x1000", "{sent_aurc}"), ("length", "{length}"),
           ("valid NLL", "{valid_nll}"), ("train min", "{train_min:.1f}")]


def _rows(results_list):
    for r in results_list:
        extra = r.get("_table", {})
        for subset, t in r["tests"].items():
            e = extra.get(subset, {})
            yield {**r, **t, "subset": subset, "ece_pct": 100 * t["ece"], "aurc_k": 1000 * t["aurc"],
                   "train_min": r.get("train_seconds", 0) / 60, "p": e.get("p", ""),
                   "length": e.get("length", "-"), "valid_nll": extra.get("valid_nll", "-"),
                   "lenpen_shown": _lenpen_shown(r), **_sentence_shown(t)}


def _sentence_shown(t):
    """The sentence-level columns of one test set ("-" for runs scored before they existed)."""
    rho, aurc = (t.get(k) for k in SENTENCE_KEYS)
    return {"sent_rho": "-" if rho is None else f"{rho:.3f}",
            "sent_aurc": "-" if aurc is None else f"{1000 * aurc:.1f}"}


def _shown_name(results, name=None):
    """A run's name (or ``name``), marked when `lenpen` chose its length penalty."""
    return (name or results["name"]) + (" (lenpen on valid)" if results.get("lenpen_choice") else "")


def _lenpen_shown(results):
    """The run's length penalty; "(valid)" when `lenpen` chose it on validation data."""
    if "lenpen" not in results:
        return "-"
    return f"{results['lenpen']:g}" + (" (valid)" if results.get("lenpen_choice") else "")


def _table_extras(results, run_dir):
    """What a table shows beside results.json, read from the run directory when it is there:
    sacreBLEU's hypothesis/reference length ratio per test set, the last validation nll_loss."""
    extras = {}
    for subset in results["tests"]:
        score_json = run_dir / f"score.{subset}.json"
        if score_json.exists():
            m = re.search(r"ratio = ([0-9.]+)", json.loads(score_json.read_text()).get("bleu_detail", ""))
            if m:
                extras[subset] = {"length": f"{float(m.group(1)):.3f}"}
    # a RUN/lenpen directory shares its run's training log
    train_log = run_dir / ("../train.log" if results.get("lenpen_choice") else "train.log")
    if train_log.exists():
        from .plots import parse_log

        valid = parse_log(train_log).get("valid", {})
        if valid and "nll_loss" in valid[max(valid)]:
            extras["valid_nll"] = f"{valid[max(valid)]['nll_loss']:.3f}"
    return extras


def _paired_bootstrap(results, run_dirs, resamples=1000):
    """sacreBLEU's paired bootstrap p-value of each run's BLEU against the first run's, per test
    set, on the detokenised hypotheses in the run directories."""
    base = results[0]
    for subset in base["tests"]:
        ref = _prepared_of(base) / "ref" / f"{subset}.{base['tgt']}"
        hyps = [d / f"hyp.{subset}.{r['tgt']}" for r, d in zip(results, run_dirs)]
        if not ref.exists() or not all(h.exists() for h in hyps) \
                or not all(subset in r["tests"] for r in results):
            raise ExperimentError(f"--paired-bs needs {ref} and every run's hyp.{subset}.* file")
        proc = subprocess.run([sys.executable, "-m", "sacrebleu", str(ref), "-i", *map(str, hyps),
                               "-m", "bleu", "--paired-bs", "--paired-bs-n", str(resamples),
                               "-f", "json"], capture_output=True, text=True)
        if proc.returncode != 0:
            raise ExperimentError(f"sacrebleu --paired-bs failed:\n{proc.stderr[-2000:]}")
        for r, system in zip(results[1:], json.loads(proc.stdout)[1:]):
            r["_table"].setdefault(subset, {})["p"] = f"{system['BLEU']['p_value']:.3f}"


def format_table(results_list, markdown=False):
    rows = [[fmt.format(**row) for _, fmt in COLUMNS] for row in _rows(results_list)]
    head = [h for h, _ in COLUMNS]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    fmt = "  ".join("{:<%d}" % w for w in widths)
    return "\n".join([fmt.format(*head), fmt.format(*("-" * w for w in widths))]
                     + [fmt.format(*r) for r in rows])


_SEED_SUFFIX = re.compile(r"-s\d+$")
MEAN_COLUMNS = [("BLEU", "bleu", 1, "{:.2f}"), ("chrF", "chrf", 1, "{:.2f}"), ("ECE %", "ece", 100, "{:.2f}"),
                ("NLL", "nll", 1, "{:.3f}"), ("AURC x1000", "aurc", 1000, "{:.1f}"),
                ("sent rho", "sentence_spearman", 1, "{:.3f}"),
                ("sent AURC x1000", "sentence_aurc", 1000, "{:.1f}")]


def format_means(results_list, markdown=False):
    """Per system (a run's name without its "-s<seed>" suffix) and test set: the mean of each
    score over the system's runs, how many runs that is, and the mean BLEU's difference to the
    first system's (dBLEU) on the same test set at the same kind of length penalty."""
    groups = {}
    for r in results_list:
        for subset, t in r["tests"].items():
            # the runs at a chosen lenpen are not averaged with the same runs at lenpen 1
            key = (_shown_name(r, _SEED_SUFFIX.sub("", r["name"])), subset)
            groups.setdefault(key, []).append((r, t))
    head = ["system", "test", "runs"] + [h for h, *_ in MEAN_COLUMNS] + ["dBLEU", "length", "valid NLL"]
    rows, first_bleu = [], {}
    for (system, subset), runs in groups.items():
        row = [system, subset, str(len(runs))]
        # None: a run scored before the measure existed (the sentence-level ones)
        mean = {key: None if any(t.get(key) is None for _, t in runs)
                else sum(t[key] for _, t in runs) / len(runs) for _, key, *_ in MEAN_COLUMNS}
        row += ["-" if mean[key] is None else fmt.format(scale * mean[key])
                for _, key, scale, fmt in MEAN_COLUMNS]
        kind = (subset, bool(runs[0][0].get("lenpen_choice")))
        row.append(f"{mean['bleu'] - first_bleu[kind]:+.2f}" if kind in first_bleu else "")
        first_bleu.setdefault(kind, mean["bleu"])
        for values in ([r.get("_table", {}).get(subset, {}).get("length") for r, _ in runs],
                       [r.get("_table", {}).get("valid_nll") for r, _ in runs]):
            row.append(f"{sum(map(float, values)) / len(values):.3f}" if all(values) else "-")
        rows.append(row)
    if markdown:
        return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                         + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    fmt = "  ".join("{:<%d}" % w for w in widths)
    return "\n".join([fmt.format(*head), fmt.format(*("-" * w for w in widths))]
                     + [fmt.format(*r) for r in rows])


def table(args):
    results = []
    for path in args.results:
        p = Path(path)
        if not p.exists():
            raise ExperimentError(f"{p} not found: run `python -m fairseq_pskd.experiment run` first")
        results.append(json.loads(p.read_text()))
        results[-1]["_table"] = _table_extras(results[-1], p.parent)
        ckpt = Path(results[-1].get("checkpoint", ""))
        if results[-1].get("lenpen_choice") and ckpt.is_file() and not _fresh(p, ckpt):
            print(f"warning: {p} is older than its checkpoint {ckpt}: rerun `python -m "
                  f"fairseq_pskd.experiment lenpen {p.parent.parent}`", file=sys.stderr)
    if args.paired_bs and len(results) > 1:
        _paired_bootstrap(results, [Path(p).parent for p in args.results])
    print(format_table(results, markdown=args.markdown))
    if args.mean_over_seeds:
        print("\nmean over the seeds of each system (run name without its -s<seed> suffix)")
        print(format_means(results, markdown=args.markdown))
        print("dBLEU: mean BLEU minus the first system's, on the same test set at the same kind "
              "of length penalty")
    if args.paired_bs and len(results) > 1:
        print(f"\np: sacreBLEU paired bootstrap (1,000 resamples) of BLEU against {results[0]['name']}")
    if len(results) == 2:
        a, b = results
        for subset in a["tests"]:
            if subset in b["tests"]:
                ta, tb = a["tests"][subset], b["tests"][subset]
                print(f"\n{_shown_name(b)} - {_shown_name(a)} on {subset}: BLEU {tb['bleu'] - ta['bleu']:+.2f}, "
                      f"chrF {tb['chrf'] - ta['chrf']:+.2f}, ECE {100 * (tb['ece'] - ta['ece']):+.2f} pts, "
                      f"NLL {tb['nll'] - ta['nll']:+.3f}, AURC x1000 {1000 * (tb['aurc'] - ta['aurc']):+.1f}")
        if args.reading and "test" in a["tests"] and "test" in b["tests"]:
            from .reading import reading

            p = b.get("_table", {}).get("test", {}).get("p")
            print("\n" + "\n".join(reading(a, b, "test", p)))
    elif args.reading:
        raise ExperimentError("--reading compares two runs: give exactly two results.json files")
    return 0


def updates_per_epoch(args):
    """Print how many updates an epoch of ``run --prepared DATA -- ARGS`` makes (schedule.py)."""
    from .schedule import updates_per_epoch as count

    prepared = Path(args.prepared).resolve()
    manifest = _read_manifest(prepared)
    train_args = _train_args(args)
    argv = [prepared / manifest.get("data_bin", "data-bin"), "--user-dir", USER_DIR,
            "--source-lang", manifest["src"], "--target-lang", manifest["tgt"], *train_args]
    print(count(argv))
    return 0


def _floats(text):
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fairseq_pskd.experiment", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="train, generate, score and calibrate one model")
    p.add_argument("--prepared", required=True, help="directory written by scripts/prepare-*.sh")
    p.add_argument("--out", required=True, help="run directory (checkpoints, logs, results.json)")
    p.add_argument("--name", help="name of the run in tables (default: the run directory's name)")
    p.add_argument("--src", help="source language (default: from prepare.json)")
    p.add_argument("--tgt", help="target language (default: from prepare.json)")
    p.add_argument("--average-last", type=int, default=1, metavar="N",
                   help="evaluate the average of the last N epoch checkpoints (default 1: the last)")
    p.add_argument("--beam", type=int, default=5)
    p.add_argument("--lenpen", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=128, help="sentences per decoding batch")
    p.add_argument("--bins", type=int, default=10, help="equal-width ECE bins (default 10)")
    p.add_argument("--test-subsets", default="test", help="comma-separated fairseq split names")
    p.add_argument("--cpu", action="store_true", help="decode and calibrate on the CPU")
    p.add_argument("--progress", default="-", metavar="FILE",
                   help="where to write one progress line per finished epoch (default -: stdout)")
    p.add_argument("--queued-epochs", type=int, default=0, metavar="N",
                   help="epochs of the runs that follow this one (for the overall ETA)")
    p.add_argument("--eta-dir", metavar="DIR",
                   help="a directory the runs of one recipe share, to print the ETA of them all")
    p.add_argument("train_args", nargs=argparse.REMAINDER,
                   help="-- then the fairseq-train arguments (model, optimiser, criterion, epochs)")
    sc = sub.add_parser("score", help="score a finished run on raw parallel text (any test set)")
    sc.add_argument("run", help="run directory of a finished `experiment run`")
    sc.add_argument("--src", required=True, help="raw source text, one sentence per line (.gz ok)")
    sc.add_argument("--ref", required=True, help="raw reference text, parallel to --src")
    sc.add_argument("--name", help="name of the test set (default: the --src file name's stem)")
    sc.add_argument("--out", help="output directory (default: RUN/score-NAME)")
    sc.add_argument("--batch-size", type=int, default=128, help="sentences per decoding batch")
    sc.add_argument("--bins", type=int, default=10, help="equal-width ECE bins (default 10)")
    sc.add_argument("--cpu", action="store_true", help="decode and calibrate on the CPU")
    lp = sub.add_parser("lenpen", help="choose a finished run's length penalty on validation "
                                       "data and decode its test sets with it (into RUN/lenpen)")
    lp.add_argument("run", help="run directory of a finished `experiment run`")
    lp.add_argument("--grid", type=_floats, default=[0.6, 0.8, 1.0, 1.2, 1.4, 1.6, 1.8, 2.0, 2.5, 3.0],
                    help="comma-separated length penalties to try (default 0.6,0.8,...,2.0,"
                         "2.5,3.0; a negative one as --grid=-0.5,...)")
    lp.add_argument("--valid-subset", default="valid", help="split to choose on (default valid)")
    lp.add_argument("--batch-size", type=int, default=128, help="sentences per decoding batch")
    lp.add_argument("--cpu", action="store_true", help="decode on the CPU")
    t = sub.add_parser("table", help="print the results table of finished runs")
    t.add_argument("results", nargs="+", help="results.json files")
    t.add_argument("--markdown", action="store_true")
    t.add_argument("--paired-bs", action="store_true",
                   help="p-value of each run's BLEU against the first run's (sacreBLEU paired "
                        "bootstrap, 1,000 resamples; needs the runs' hyp.* files)")
    t.add_argument("--reading", action="store_true",
                   help="two runs of the quickstart's main job: say which differences on test exceed "
                        "the run-to-run variation measured in docs/RESULTS.md")
    t.add_argument("--mean-over-seeds", action="store_true",
                   help="also the mean scores per system over its seeds (runs named NAME-s1, "
                        "NAME-s2, ...)")
    u = sub.add_parser("updates-per-epoch",
                       help="print the optimizer updates per epoch of fairseq-train ARGS on DATA "
                            "(to derive a learning-rate schedule from the data's size)")
    u.add_argument("--prepared", required=True, help="directory written by scripts/prepare-*.sh")
    u.add_argument("train_args", nargs=argparse.REMAINDER,
                   help="-- then the fairseq-train arguments, as for `run`")
    args = parser.parse_args(argv)
    try:
        return {"run": run, "score": score, "lenpen": lenpen, "table": table,
                "updates-per-epoch": updates_per_epoch}[args.command](args)
    except ExperimentError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
