"""The command line, ``python -m fairseq_pskd.evaluate <command> ...``: one parser per
command, exit status 2 on an EvaluationError or an unreadable file."""
import argparse
import sys

from ..calibration import DEFAULT_BINS
from .average import cmd_average
from .calibration import cmd_calibration
from .common import EvaluationError
from .score import cmd_score

__all__ = ["build_parser", "setup_logging", "main"]


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
