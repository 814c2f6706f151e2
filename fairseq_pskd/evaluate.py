"""Evaluation for PS-KD NMT models: BLEU/chrF, token-level calibration, checkpoint averaging.

Command line (``python -m fairseq_pskd.evaluate <command> ...``)::

    score        sacreBLEU BLEU and chrF of fairseq-generate output (or plain hypotheses)
    calibration  teacher-forced token-level ECE, accuracy, NLL, AURC / E-AURC + reliability diagram
    average      average the parameters of the last N epoch (or update) checkpoints

The metrics themselves (ECE, reliability bins, AURC, the diagram) are in calibration.py.
fairseq, torch and matplotlib are imported only by the commands that need them.
See docs/EVALUATION.md for the definitions and examples.
"""
import argparse
import json
import os
import re
import sys
from pathlib import Path


# importing the package (this module's parent) put torch >= 2.6's checkpoint allow-list and the
# criterion's registration in place for when torch and fairseq are imported (__init__.py)
from .calibration import DEFAULT_BINS, calibration_metrics, plot_reliability, sentence_confidence


class EvaluationError(Exception):
    """A user-facing error: printed as ``error: <message>``, exit status 2."""


# --------------------------------------------------------------------------------------
# score: BLEU / chrF of fairseq-generate output
# --------------------------------------------------------------------------------------

_HYP_LINE = re.compile(r"^H-(\d+)\t([^\t]*)(?:\t(.*))?$")


def read_generate_hypotheses(path):
    """Best hypothesis per sentence id from fairseq-generate/interactive output, sorted by id.

    Lines are ``H-<id>\\t<score>\\t<text>``; an empty hypothesis may lose its text field.
    With --nbest > 1 the first H- line of an id is its best one, so later ones are dropped.
    """
    hyps = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            m = _HYP_LINE.match(line.rstrip("\r\n"))
            if m:
                hyps.setdefault(int(m.group(1)), m.group(3) or "")
    return [hyps[i] for i in sorted(hyps)], sorted(hyps)


_POSITIONAL_LINE = re.compile(r"^P-(\d+)\t(.*)$")


def read_generate_sentence_scores(path):
    """Per sentence id (sorted), the mean of the best hypothesis's positional scores (fairseq
    prints log2-probabilities per token, end of sentence included): a length-normalised model
    score that, unlike the H- line's, does not depend on --lenpen."""
    scores = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            m = _POSITIONAL_LINE.match(line.rstrip("\r\n"))
            if m and int(m.group(1)) not in scores:
                values = [float(v) for v in m.group(2).split()]
                scores[int(m.group(1))] = sum(values) / len(values) if values else float("-inf")
    return [scores[i] for i in sorted(scores)], sorted(scores)


def sentence_chrf(hyps, refs):
    """sacreBLEU's sentence chrF (defaults) of each detokenised hypothesis."""
    from sacrebleu.metrics import CHRF

    chrf = CHRF()
    return [chrf.sentence_score(h, [r]).score for h, r in zip(hyps, refs)]


def read_lines(path):
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\r\n") for line in f]


def detokenize(lines, lang):
    """Moses detokenisation with the settings data preparation used (one place: prepare.text)."""
    from fairseq_pskd.prepare.text import detokenize as prepare_detokenize

    return list(prepare_detokenize(lines, lang))


def bleu_chrf(hyps, refs, tokenize=None):
    """Corpus BLEU and chrF with sacrebleu defaults (tokenize=None: 13a)."""
    from sacrebleu.metrics import BLEU, CHRF
    try:
        bleu = BLEU(tokenize=tokenize) if tokenize else BLEU()
    except KeyError:
        raise EvaluationError(f"unknown sacrebleu tokenizer {tokenize!r}") from None
    chrf = CHRF()
    b = bleu.corpus_score(hyps, [refs])
    c = chrf.corpus_score(hyps, [refs])
    return {
        "bleu": float(b.score),
        "chrf": float(c.score),
        "bleu_signature": str(bleu.get_signature()),
        "chrf_signature": str(chrf.get_signature()),
        "bleu_detail": str(b),
        "bleu_line": b.format(signature=str(bleu.get_signature())),
        "chrf_line": c.format(signature=str(chrf.get_signature())),
        "n": len(hyps),
    }


def _infer_lang(ref_path):
    suffix = Path(ref_path).suffix.lstrip(".")
    return suffix if re.fullmatch(r"[a-z]{2,3}", suffix) else None


def cmd_score(args):
    if not os.path.isfile(args.ref):
        raise EvaluationError(f"reference file not found: {args.ref}")
    refs = read_lines(args.ref)
    if args.generate_output:
        if not os.path.isfile(args.generate_output):
            raise EvaluationError(f"generate output not found: {args.generate_output}")
        hyps, ids = read_generate_hypotheses(args.generate_output)
        if not hyps:
            raise EvaluationError(f"no H-<id> lines in {args.generate_output}; is it fairseq-generate output?")
        if len(hyps) != len(refs):
            hint = ""
            if len(hyps) < len(refs) and len(refs) - len(hyps) < 8:
                hint = ("; fairseq-generate leaves out the last sentences of a set whose size is "
                        "not a multiple of --required-batch-size-multiple (default 8): decode with "
                        "--required-batch-size-multiple 1")
            raise EvaluationError(
                f"{len(hyps)} hypotheses in {args.generate_output} but {len(refs)} reference lines "
                f"in {args.ref}{hint}")
        if ids != list(range(len(refs))):
            missing = sorted(set(range(len(refs))) - set(ids))[:10]
            raise EvaluationError(f"hypothesis ids are not 0..{len(refs) - 1}; missing e.g. {missing}")
        # generate prints moses-tokenised text: detokenise unless told not to
        lang = None if args.no_detok else (args.detok_lang or _infer_lang(args.ref))
        if lang is None and not args.no_detok:
            raise EvaluationError(
                f"cannot tell the target language from {args.ref}: pass --detok-lang LANG or --no-detok")
        source = args.generate_output
    else:
        if not os.path.isfile(args.hyp):
            raise EvaluationError(f"hypothesis file not found: {args.hyp}")
        hyps = read_lines(args.hyp)
        if len(hyps) != len(refs):
            raise EvaluationError(
                f"{len(hyps)} hypothesis lines in {args.hyp} but {len(refs)} reference lines in {args.ref}")
        lang = None if args.no_detok else args.detok_lang  # plain hypotheses: already detokenised
        source = args.hyp
    if lang:
        hyps = detokenize(hyps, lang)
        print(f"hypotheses Moses-detokenised as {lang!r}", file=sys.stderr)
    result = bleu_chrf(hyps, refs, tokenize=args.tokenize)
    result.update({"hypotheses": str(source), "reference": str(args.ref), "detok_lang": lang})
    if args.generate_output:
        scores, score_ids = read_generate_sentence_scores(args.generate_output)
        if not score_ids:
            print(f"no P- lines (positional scores) in {args.generate_output}: no sentence-level "
                  "confidence", file=sys.stderr)
        elif score_ids != ids:
            raise EvaluationError(f"{args.generate_output} has P- lines (positional scores) for "
                                  f"{len(score_ids)} of its {len(ids)} hypotheses")
        else:
            chrf = sentence_chrf(hyps, refs)
            result.update(sentence_confidence(scores, chrf))
            result["sentence_score"] = "mean log2-probability per token of the hypothesis (P- lines)"
            if args.sentence_output:  # what the two figures are computed from, to re-check them
                Path(args.sentence_output).write_text(
                    "".join(f"{s!r}\t{c!r}\n" for s, c in zip(scores, chrf)), encoding="utf-8")

    # the same lines sacrebleu's own CLI prints: score and signature together
    print(result.pop("bleu_line"))
    print(result.pop("chrf_line"))
    if "sentence_spearman" in result:
        print(f"sentence level: Spearman {result['sentence_spearman']:.3f} of the length-normalised "
              f"model score and sentence chrF, AURC {1000 * result['sentence_aurc']:.1f} x1000 "
              "(risk 1 - chrF/100)")
    if args.detok_output:
        Path(args.detok_output).write_text("".join(h + "\n" for h in hyps), encoding="utf-8")
    if args.json:
        _write_json(args.json, result)
    return result


# --------------------------------------------------------------------------------------
# calibration: teacher-forced token-level metrics of a fairseq checkpoint
# --------------------------------------------------------------------------------------

def collect_token_statistics(model, task, subset, max_tokens=None, batch_size=None,
                             device="cpu", skip_invalid_size_inputs=False):
    """Teacher-forced pass over ``subset``: per non-pad target token, the max-softmax
    confidence and whether the argmax is the reference token, plus the summed NLL (nats).

    Returns ``(confidence float64[N], correct bool[N], nll_sum, num_sentences)``.
    """
    import torch
    from fairseq import utils

    dataset = task.dataset(subset)
    itr = task.get_batch_iterator(
        dataset=dataset, max_tokens=max_tokens, max_sentences=batch_size,
        max_positions=utils.resolve_max_positions(task.max_positions(), model.max_positions()),
        ignore_invalid_inputs=skip_invalid_size_inputs, required_batch_size_multiple=1,
        seed=1, num_shards=1, shard_id=0, num_workers=0,
    ).next_epoch_itr(shuffle=False)
    pad = task.target_dictionary.pad()
    confs, corrects = [], []
    nll_sum, n_sent = 0.0, 0
    model.eval()  # no dropout: the model as it translates
    with torch.no_grad():
        for sample in itr:
            if not sample or "net_input" not in sample:
                continue
            if device != "cpu":
                sample = utils.move_to_cuda(sample)
            net_output = model(**sample["net_input"])
            lprobs = model.get_normalized_probs(net_output, log_probs=True).float()
            target = sample["target"]
            mask = target.ne(pad)
            max_lp, pred = lprobs.max(dim=-1)
            tgt_lp = lprobs.gather(-1, target.unsqueeze(-1)).squeeze(-1)
            confs.append(max_lp[mask].exp().double().cpu())
            corrects.append(pred[mask].eq(target[mask]).cpu())
            nll_sum -= float(tgt_lp[mask].double().sum())
            n_sent += int(sample["nsentences"]) if "nsentences" in sample else target.size(0)
    if not confs:
        raise EvaluationError(f"no batches in subset {subset!r}")
    return (torch.cat(confs).numpy(), torch.cat(corrects).numpy().astype(bool), nll_sum, n_sent)


def load_model(path, data_bin, use_cuda):
    from fairseq import checkpoint_utils

    import pickle
    try:
        models, _cfg, task = checkpoint_utils.load_model_ensemble_and_task(
            [str(path)], arg_overrides={"data": str(data_bin)})
    except pickle.UnpicklingError as e:
        # torch's safe loader refused an object that is not on the plugin's allow-list
        detail = next((l.strip() for l in str(e).splitlines() if "Unsupported global" in l), str(e))
        raise EvaluationError(f"cannot load {path} with torch's weights-only loader: {detail}")
    model = models[0]
    model.float()  # fp16-trained checkpoints: score in float32
    if use_cuda:
        model.cuda()
    return model, task


def cmd_calibration(args):
    if not os.path.isfile(args.path):
        raise EvaluationError(f"checkpoint not found: {args.path}")
    if not os.path.isdir(args.data_bin):
        raise EvaluationError(f"data-bin directory not found: {args.data_bin}")
    if args.bins < 1:
        raise EvaluationError("--bins must be >= 1")
    import torch

    use_cuda = torch.cuda.is_available() and not args.cpu
    device = "cuda" if use_cuda else "cpu"
    max_tokens = args.max_tokens
    if max_tokens is None and args.batch_size is None:
        max_tokens = 4096
    model, task = load_model(args.path, args.data_bin, use_cuda)
    try:
        task.load_dataset(args.subset, combine=False, epoch=1)
    except FileNotFoundError as e:
        raise EvaluationError(f"cannot load subset {args.subset!r} from {args.data_bin}: {e}")
    confidence, correct, nll_sum, n_sent = collect_token_statistics(
        model, task, args.subset, max_tokens=max_tokens, batch_size=args.batch_size,
        device=device, skip_invalid_size_inputs=args.skip_invalid_size_inputs)
    result = calibration_metrics(confidence, correct, nll_sum=nll_sum, n_bins=args.bins)
    result = {"checkpoint": str(args.path), "data_bin": str(args.data_bin), "subset": args.subset,
              "device": device, "num_sentences": n_sent, **result}

    print(f"subset {args.subset}: {n_sent} sentences, {result['num_tokens']} target tokens "
          f"(teacher forcing, incl. EOS), device {device}")
    print(f"ECE       {100 * result['ece']:.2f}%  ({args.bins} equal-width bins)")
    print(f"accuracy  {100 * result['accuracy']:.2f}%  (mean confidence {100 * result['mean_confidence']:.2f}%)")
    print(f"NLL       {result['nll']:.4f} nats/token  (ppl {result['ppl']:.2f})")
    print(f"AURC      {1000 * result['aurc']:.2f}  (x1000)")
    print(f"E-AURC    {1000 * result['eaurc']:.2f}  (x1000; optimal AURC {1000 * result['optimal_aurc']:.2f})")
    if args.png:
        plot_reliability(result["reliability"], args.png, title=args.title or Path(args.path).name,
                         ece=result["ece"])
        print(f"reliability diagram: {args.png}")
    if args.json:
        _write_json(args.json, result)
    return result


# --------------------------------------------------------------------------------------
# average: checkpoint averaging (fairseq's scripts/average_checkpoints.py is not in the wheel)
# --------------------------------------------------------------------------------------

def last_n_checkpoints(directory, n, update_based=False, upper_bound=None):
    """Paths of the newest ``n`` ``checkpoint<epoch>.pt`` (or ``checkpoint_<epoch>_<update>.pt``)
    files in ``directory``, newest first, optionally only those with epoch/update <= upper_bound."""
    pattern = re.compile(r"checkpoint_\d+_(\d+)\.pt" if update_based else r"checkpoint(\d+)\.pt")
    entries = []
    for name in os.listdir(directory):
        m = pattern.fullmatch(name)
        if m and (upper_bound is None or int(m.group(1)) <= upper_bound):
            entries.append((int(m.group(1)), name))
    if len(entries) < n:
        kind = "update" if update_based else "epoch"
        raise EvaluationError(f"found {len(entries)} {kind} checkpoints in {directory}, need {n}")
    return [os.path.join(directory, name) for _, name in sorted(entries, reverse=True)[:n]]


def average_checkpoints(paths):
    """Average the ``model`` parameters of ``paths``; everything else (cfg, extra_state,
    optimizer history) comes from ``paths[0]`` (the newest, as fairseq's script does).

    Floating-point tensors are summed in at least float32 and cast back to the first
    checkpoint's dtype, so fp16 checkpoints do not lose precision while summing; integer
    buffers are floor-divided as in fairseq.
    """
    import torch

    if not paths:
        raise EvaluationError("no checkpoints to average")
    new_state, sums, dtypes, keys = None, {}, {}, None
    for path in paths:
        if not os.path.isfile(path):
            raise EvaluationError(f"checkpoint not found: {path}")
        state = torch.load(path, map_location="cpu")
        if "model" not in state:
            raise EvaluationError(f"{path} has no 'model' entry; not a fairseq checkpoint")
        params = state["model"]
        if keys is None:
            new_state, keys = state, list(params.keys())
        elif list(params.keys()) != keys:
            raise EvaluationError(f"{path} has different parameters than {paths[0]}")
        for k in keys:
            p = params[k]
            if k not in sums:
                dtypes[k] = p.dtype
                # clone: shared parameters (tied embeddings) must not be summed in place twice
                sums[k] = p.to(torch.promote_types(p.dtype, torch.float32)).clone() \
                    if p.is_floating_point() else p.clone()
            else:
                sums[k] += p.to(sums[k].dtype)
    averaged = {}
    for k in keys:
        v = sums[k]
        if v.is_floating_point():
            averaged[k] = (v / len(paths)).to(dtypes[k])
        else:
            averaged[k] = v // len(paths)
    from collections import OrderedDict
    new_state["model"] = OrderedDict(averaged)
    return new_state


def cmd_average(args):
    import torch

    if args.num_epoch_checkpoints is not None and args.num_update_checkpoints is not None:
        raise EvaluationError("use --num-epoch-checkpoints or --num-update-checkpoints, not both")
    n = args.num_epoch_checkpoints or args.num_update_checkpoints
    if n is not None:
        if n < 1:
            raise EvaluationError("the number of checkpoints must be >= 1")
        if len(args.inputs) != 1 or not os.path.isdir(args.inputs[0]):
            raise EvaluationError("with --num-*-checkpoints, --inputs must be one checkpoint directory")
        paths = last_n_checkpoints(args.inputs[0], n, update_based=args.num_update_checkpoints is not None,
                                   upper_bound=args.checkpoint_upper_bound)
    else:
        paths = list(args.inputs)
        if any(os.path.isdir(p) for p in paths):
            raise EvaluationError("--inputs is a directory: also pass --num-epoch-checkpoints N")
    print("averaging:\n  " + "\n  ".join(paths))
    state = average_checkpoints(paths)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{args.output}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, args.output)  # never leave a half-written checkpoint behind
    print(f"wrote {args.output}")
    return paths


# --------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------

def _write_json(path, obj):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m fairseq_pskd.evaluate",
        description="Evaluate PS-KD NMT models: BLEU/chrF, token-level calibration, checkpoint averaging.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("score", help="sacreBLEU BLEU and chrF of fairseq-generate output",
                       description="Corpus BLEU and chrF (sacrebleu) of fairseq-generate output or plain "
                                   "hypotheses against a detokenised reference.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--generate-output", metavar="GEN.txt",
                     help="fairseq-generate output; H-<id> lines are sorted by id")
    src.add_argument("--hyp", metavar="FILE", help="plain hypotheses, one per line, already detokenised")
    p.add_argument("--ref", required=True, metavar="REF", help="detokenised reference, e.g. OUT/ref/test.de")
    det = p.add_mutually_exclusive_group()
    det.add_argument("--detok-lang", metavar="LANG",
                     help="Moses-detokenise hypotheses for LANG (default with --generate-output: "
                          "the reference file's extension)")
    det.add_argument("--no-detok", action="store_true", help="score hypotheses as they are")
    p.add_argument("--tokenize", default=None, help="sacrebleu BLEU tokenizer (default: 13a)")
    p.add_argument("--detok-output", metavar="FILE", help="also write the scored hypotheses here")
    p.add_argument("--json", metavar="OUT.json", help="write the scores as JSON")
    p.add_argument("--sentence-output", metavar="FILE",
                   help="with --generate-output: write each hypothesis's score and sentence chrF "
                        "(tab-separated, in id order)")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("calibration", help="token-level ECE / NLL / AURC with teacher forcing",
                       description="Teacher-forced token-level calibration of a fairseq checkpoint.")
    p.add_argument("--data-bin", required=True, metavar="DIR", help="fairseq binarised data directory")
    p.add_argument("--path", required=True, metavar="CKPT", help="checkpoint file")
    p.add_argument("--subset", default="test", help="split to evaluate (default: test)")
    p.add_argument("--bins", type=int, default=DEFAULT_BINS,
                   help=f"number of equal-width confidence bins for ECE (default: {DEFAULT_BINS})")
    p.add_argument("--batch-size", type=int, default=None, help="max sentences per batch")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="max tokens per batch (default 4096 when --batch-size is not given)")
    p.add_argument("--skip-invalid-size-inputs", action="store_true",
                   help="skip sentences longer than the model allows instead of failing")
    p.add_argument("--png", metavar="FILE", help="write a reliability diagram here")
    p.add_argument("--title", help="title of the reliability diagram (default: checkpoint name)")
    p.add_argument("--json", metavar="OUT.json", help="write the metrics as JSON")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even if CUDA is available")
    p.set_defaults(func=cmd_calibration)

    p = sub.add_parser("average", help="average the last N checkpoints",
                       description="Average model parameters of several checkpoints (like fairseq's "
                                   "scripts/average_checkpoints.py); the rest comes from the newest.")
    p.add_argument("--inputs", nargs="+", required=True, metavar="PATH",
                   help="checkpoint files, or one directory with --num-epoch-checkpoints")
    p.add_argument("--output", required=True, metavar="OUT.pt", help="averaged checkpoint to write")
    num = p.add_mutually_exclusive_group()
    num.add_argument("--num-epoch-checkpoints", type=int, metavar="N",
                     help="average the last N checkpoint<epoch>.pt in the --inputs directory")
    num.add_argument("--num-update-checkpoints", type=int, metavar="N",
                     help="average the last N checkpoint_<epoch>_<update>.pt in the --inputs directory")
    p.add_argument("--checkpoint-upper-bound", type=int, metavar="K",
                   help="ignore checkpoints of epochs (updates) above K")
    p.set_defaults(func=cmd_average)
    return parser


def setup_logging():
    """fairseq's text_to_speech task sets the root logger to DEBUG when fairseq is imported
    (matplotlib then logs every font lookup); use fairseq_cli's format at INFO instead."""
    import logging
    logging.basicConfig(format="%(asctime)s | %(levelname)s | %(name)s | %(message)s",
                        datefmt="%Y-%m-%d %H:%M:%S", level=logging.INFO, stream=sys.stderr, force=True)


def main(argv=None):
    """Run one command; returns the exit status (2 on errors). ``argv`` may hold paths."""
    args = build_parser().parse_args(None if argv is None else [str(a) for a in argv])
    try:
        args.func(args)
    except EvaluationError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (OSError, UnicodeDecodeError) as e:  # unreadable/unwritable files: no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    setup_logging()  # only as a program: library callers (and pytest) keep their logging
    sys.exit(main())
