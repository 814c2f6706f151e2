"""One test set of one checkpoint: beam search, BLEU/chrF against the raw reference, and the
teacher-forced calibration; what ``run``, ``score`` and ``lenpen`` share. Each output is made
again only when what it was made from changed."""
import json
import os
import subprocess
import sys

from .common import USER_DIR, ExperimentError, is_fresh, log, run_logged

__all__ = ["SENTENCE_KEYS", "decode_and_score", "evaluate_test_set"]

# per test set: how well the length-normalised model score ranks the translations by their
# sentence chrF (calibration.sentence_confidence)
SENTENCE_KEYS = ("sentence_spearman", "sentence_aurc")


def decode_and_score(data_bin, src, tgt, ckpt, subset, ref, out, args, env):
    """Beam-search ``subset`` of ``data_bin`` with ``ckpt`` (args.beam, args.lenpen) and score
    the detokenised output against the raw reference ``ref``; outputs go to ``out`` (skipped
    when made from the same checkpoint, unchanged since, and settings). Returns the score dict
    of ``python -m fairseq_pskd.evaluate score``."""
    py = sys.executable
    device = ["--cpu"] if args.cpu else []
    # 1. beam search; --post-process sentencepiece gives Moses-tokenised text
    gen = out / f"generate.{subset}.txt"
    # what the decode was made with: a rerun with another checkpoint, beam or lenpen redoes it
    stamp, made_with = out / f"generate.{subset}.json", {
        "checkpoint": str(ckpt), "beam": args.beam, "lenpen": args.lenpen}
    if not (is_fresh(gen, ckpt) and stamp.exists() and json.loads(stamp.read_text()) == made_with):
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
    if not is_fresh(score, gen) or SENTENCE_KEYS[0] not in json.loads(score.read_text()):
        run_logged([py, "-m", "fairseq_pskd.evaluate", "score", "--generate-output", gen, "--ref", ref,
                    "--detok-lang", tgt, "--detok-output", out / f"hyp.{subset}.{tgt}", "--json", score,
                    "--sentence-output", out / f"sentence.{subset}.tsv"],
                   out / "eval.log", env)
    return json.loads(score.read_text())


def evaluate_test_set(data_bin, src, tgt, ckpt, subset, ref, out, args, env, title):
    """Decode and score ``subset`` (decode_and_score), then measure calibration; outputs go to
    ``out`` (skipped when newer than ckpt). Returns the test set's entry of results.json."""
    s = decode_and_score(data_bin, src, tgt, ckpt, subset, ref, out, args, env)
    # 3. teacher-forced calibration: ECE, NLL, AURC, reliability diagram (decoding plays no part)
    calib = out / f"calibration.{subset}.json"
    if not is_fresh(calib, ckpt):
        run_logged([sys.executable, "-m", "fairseq_pskd.evaluate", "calibration", "--data-bin", data_bin,
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
