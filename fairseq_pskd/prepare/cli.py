"""Command line: python -m fairseq_pskd.prepare {iwslt15,multi30k,tokenize,detokenize} ...

scripts/prepare-iwslt15.sh and scripts/prepare-multi30k.sh are thin wrappers around the first
two. Exit status: 0 success, 1 a problem with the input or the environment (the message says
what to do), 2 bad command-line usage, 130 interrupted.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from .errors import PrepareError

DEFAULTS = {
    # corpus: (src, tgt, vocab, min_len, max_len, max_ratio)
    # IWSLT: the cleaning of fairseq's prepare-iwslt14.sh (clean-corpus-n -ratio 1.5, 1..175).
    "iwslt15": ("en", "de", 10000, 1, 175, 1.5),
    # Multi30k: no length/ratio filter, so all 29,000 training pairs stay (only empty ones go).
    "multi30k": ("de", "en", 8000, 1, 0, 0.0),
}


def _lang(s: str) -> str:
    if not re.fullmatch(r"[a-z]{2,3}", s):
        raise argparse.ArgumentTypeError(f"language codes look like 'en' or 'de', not {s!r}")
    return s


def _positive(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return v


def _sha256(s: str) -> str:
    if not re.fullmatch(r"[0-9a-fA-F]{64}", s):
        raise argparse.ArgumentTypeError("a sha256 is 64 hex digits")
    return s.lower()


def _set_list(s: str) -> list[str]:
    return [x for x in (p.strip() for p in s.split(",")) if x]


def _common(p: argparse.ArgumentParser, corpus: str) -> None:
    src, tgt, vocab, min_len, max_len, ratio = DEFAULTS[corpus]
    p.add_argument("--out", required=True, type=Path, help="output directory (created)")
    p.add_argument("--raw", type=Path, help="local input instead of downloading (see above)")
    p.add_argument("--src", type=_lang, default=src, help=f"source language (default {src})")
    p.add_argument("--tgt", type=_lang, default=tgt, help=f"target language (default {tgt})")
    p.add_argument("--vocab-size", type=_positive, default=vocab,
                   help=f"joint sentencepiece vocabulary size (default {vocab})")  # fmt: skip
    p.add_argument("--spm-model-type", choices=["bpe", "unigram"], default="bpe",
                   help="sentencepiece model type (default bpe)")  # fmt: skip
    p.add_argument("--workers", type=_positive, default=2,
                   help="processes for tokenisation, sentencepiece and fairseq-preprocess "
                        "(default 2)")  # fmt: skip
    p.add_argument("--no-normalize-punct", dest="normalize_punct", action="store_false",
                   help="skip Moses punctuation normalisation before tokenising")  # fmt: skip
    g = p.add_argument_group("cleaning of the training data (dev/test are never filtered)")
    g.add_argument("--min-len", type=int, default=min_len,
                   help=f"drop pairs with a side shorter than this many tokens (default {min_len})")  # fmt: skip
    g.add_argument("--max-len", type=int, default=max_len,
                   help=f"drop pairs with a side longer than this, 0 = no limit (default {max_len})")  # fmt: skip
    g.add_argument("--max-ratio", type=float, default=ratio,
                   help=f"drop pairs whose token-count ratio exceeds this, 0 = off (default {ratio:g})")  # fmt: skip
    g.add_argument("--train-size", type=_positive, metavar="N",
                   help="keep only a random subset of N cleaned training pairs (a smaller corpus, "
                        "as for a learning curve; subwords are learned on it); default: all")  # fmt: skip
    g.add_argument("--train-size-seed", type=int, default=1, metavar="S",
                   help="seed of the --train-size subset (default 1)")  # fmt: skip
    p.add_argument("--force", action="store_true", help="redo every step")
    p.add_argument("--stop-after", choices=["extract", "tokenize", "clean", "spm", "encode", "binarize"],
                   help="stop after this step (to inspect OUT/tmp); a rerun without it continues")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m fairseq_pskd.prepare",
        description="Prepare IWSLT'15 En-De or Multi30k for fairseq (see docs/DATA.md).",
    )
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "iwslt15",
        help="IWSLT 2015 TED English-German",
        description="IWSLT 2015 TED En-De. --raw: the whole release 2015-01.tgz, a per-pair "
        "en-de.tgz / de-en.tgz, or a directory holding them or their extracted files. "
        "Without --raw the release is downloaded (per-pair URL, then the whole release).",
    )
    _common(p, "iwslt15")
    p.add_argument("--dev", default="tst2012",
                   help="set(s) for valid, '+' concatenates, e.g. dev2010+tst2010 (default tst2012)")  # fmt: skip
    p.add_argument("--test", default="tst2013", help="set for test (default tst2013)")
    p.add_argument("--extra-tests", type=_set_list, default=[],
                   help="comma-separated further test sets -> test1, test2, ... (e.g. tst2014)")  # fmt: skip
    p.add_argument("--url", help="download from this URL instead of the built-in ones")
    p.add_argument("--sha256", type=_sha256,
                   help="require this sha256 of the archive (none is published; by default the "
                        "checksum is only recorded)")  # fmt: skip

    p = sub.add_parser(
        "multi30k",
        help="Multi30k task 1",
        description="Multi30k task 1. --raw: a directory with <prefix>.<lang>.gz (or plain) "
        "files as in data/task1/raw of github.com/multi30k/dataset. Without --raw they are "
        "downloaded from raw.githubusercontent.com.",
    )
    _common(p, "multi30k")
    p.add_argument("--valid", default="val", help="file prefix of valid (default val)")
    p.add_argument("--test", default="test_2016_flickr",
                   help="file prefix of test (default test_2016_flickr)")  # fmt: skip
    p.add_argument("--extra-tests", type=_set_list, default=["test_2017_flickr", "test_2017_mscoco"],
                   help="comma-separated further test prefixes -> test1, test2, ... "
                        "(default test_2017_flickr,test_2017_mscoco; '' for none)")  # fmt: skip
    p.add_argument("--url-base", default=None, help="download base URL (default: the official repository)")

    for name, what in (("tokenize", "normalise + Moses-tokenise"), ("detokenize", "Moses-detokenise")):
        p = sub.add_parser(name, help=f"{what} stdin to stdout, as the pipeline does")
        p.add_argument("--lang", required=True, type=_lang)
        if name == "tokenize":
            p.add_argument("--no-normalize-punct", dest="normalize_punct", action="store_false")
    return ap


def _options(args):
    from .pipeline import Options

    if args.src == args.tgt:
        raise PrepareError("--src and --tgt must differ")
    if args.min_len < 0 or args.max_len < 0 or args.max_ratio < 0:
        raise PrepareError("--min-len, --max-len and --max-ratio must not be negative")
    return Options(
        out=args.out, src=args.src, tgt=args.tgt, vocab_size=args.vocab_size,
        spm_model_type=args.spm_model_type, workers=args.workers,
        normalize_punct=args.normalize_punct, min_len=args.min_len, max_len=args.max_len,
        max_ratio=args.max_ratio, train_size=args.train_size,
        train_size_seed=args.train_size_seed, force=args.force, stop_after=args.stop_after,
    )  # fmt: skip


def _run(args) -> None:
    from . import pipeline

    if args.command in ("tokenize", "detokenize"):
        from . import text

        lines = text.lines_from_bytes(sys.stdin.buffer.read(), "<stdin>")
        if args.command == "tokenize":
            res = text.tokenize(lines, args.lang, normalize=args.normalize_punct)
        else:
            res = text.detokenize(lines, args.lang)
        out = sys.stdout
        out.reconfigure(encoding="utf-8", newline="\n")
        for line in res:
            out.write(line + "\n")
        return

    opt = _options(args)
    download_dir = Path(args.out) / "download"
    if args.command == "iwslt15":
        from .iwslt import IWSLT15Source

        src = IWSLT15Source(
            args.src, args.tgt, args.raw, download_dir, dev=args.dev, test=args.test,
            extra_tests=args.extra_tests, url=args.url, sha256=args.sha256,
        )  # fmt: skip
    else:
        from .multi30k import URL_BASE, Multi30kSource

        src = Multi30kSource(
            args.src, args.tgt, args.raw, download_dir, valid=args.valid, test=args.test,
            extra_tests=args.extra_tests, url_base=args.url_base or URL_BASE,
        )  # fmt: skip
    labels = [s.label for s in src.splits]
    if len(set(labels)) != len(labels):
        raise PrepareError(f"a set is used for two splits: {labels}")
    pipeline.run(src, opt)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _run(args)
    except PrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to continue", file=sys.stderr)
        return 130
    return 0
