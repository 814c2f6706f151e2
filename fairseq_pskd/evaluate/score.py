"""The ``score`` command: sacreBLEU BLEU and chrF of fairseq-generate output (or of plain
hypotheses) against a detokenised reference, and the sentence-level confidence of the
hypotheses (how well the model's length-normalised score ranks them by sentence chrF)."""
import os
import re
import sys
from pathlib import Path

from ..calibration import sentence_confidence
from .common import EvaluationError, write_json

__all__ = ["read_generate_hypotheses", "read_generate_sentence_scores", "sentence_chrf", "read_lines",
           "detokenize", "bleu_chrf", "cmd_score"]

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
        write_json(args.json, result)
    return result
