"""The command line, ``python -m fairseq_pskd.experiment <command> ...``: one parser per command,
the usage text of the package docstring, exit status 2 on an ExperimentError."""
import argparse
import sys

from . import __doc__ as USAGE
from .common import ExperimentError
from .lenpen import lenpen
from .run import run
from .score import score
from .table import table
from .updates_per_epoch import updates_per_epoch

__all__ = ["build_parser", "main"]


def _floats(text):
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m fairseq_pskd.experiment", description=USAGE,
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
    return parser


_COMMANDS = {"run": run, "score": score, "lenpen": lenpen, "table": table,
            "updates-per-epoch": updates_per_epoch}


def main(argv=None):
    """Run one command; returns the exit status (2 on an ExperimentError)."""
    args = build_parser().parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
    except ExperimentError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
