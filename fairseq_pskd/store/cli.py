"""``python -m fairseq_pskd.store {inspect,estimate} ...``: inspect a store, or estimate the disk
space one needs. Errors are "error: ..." on stderr and exit status 2, without a traceback."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

import numpy as np

from .errors import StoreError
from .fairseq_index import dictionary_size, find_index_file, read_fairseq_sizes
from .format import PROB_DTYPE, estimate_bytes, human_bytes, index_dtype
from .lock import lock_holder
from .summary import inspect

__all__ = ["main"]

# numpy only: neither command needs torch (TopKStore), so the tool starts in a fraction of a second


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors: "error: ..." and exit 2, like ours
        self.print_usage(sys.stderr)
        self.exit(2, f"error: {message}\n")


def _build_parser() -> argparse.ArgumentParser:
    p = _ArgumentParser(
        prog="python -m fairseq_pskd.store",
        description="Inspect a PS-KD top-k store, or estimate the disk space one needs.",
    )
    sub = p.add_subparsers(dest="command", metavar="{inspect,estimate}", parser_class=_ArgumentParser)
    sub.required = True
    pi = sub.add_parser("inspect", help="print a store's header and per-buffer state as JSON",
                        description="Print a store's header and per-buffer state as JSON (epochs and counts "
                                    "from the stamps).")
    pi.add_argument("dir", metavar="DIR", help="store directory (--pskd-store-dir)")
    pe = sub.add_parser("estimate", help="print the disk space a store needs",
                        description="Print the disk space a store needs: num_tokens * k * (index bytes + 2) * 2 "
                                    "buffers, plus small per-sentence arrays. Give --tokens/--sentences, or "
                                    "--data-bin/--split/--lang to read them from fairseq binarized data.")
    pe.add_argument("--tokens", type=int, help="number of target tokens in the training set, eos included")
    pe.add_argument("--sentences", type=int,
                    help="number of training sentences (default: tokens / 30, stated in the output)")
    pe.add_argument("--data-bin", metavar="DIR",
                    help="fairseq-preprocess output directory; tokens and sentences are read from "
                         "SPLIT.SRC-TGT.LANG.idx")
    pe.add_argument("--idx", metavar="FILE",
                    help="a fairseq .idx file to read sizes from (instead of --data-bin/--split/--lang)")
    pe.add_argument("--split", default="train", help="split to read with --data-bin (default: train)")
    pe.add_argument("--lang", help="target language with --data-bin (e.g. de)")
    pe.add_argument("--topk", type=int, required=True,
                    help="k, the number of (index, probability) pairs kept per token")
    pe.add_argument("--vocab-size", type=int,
                    help="target vocabulary size (decides uint16 vs int32 indices); default with --data-bin: from "
                         "dict.LANG.txt")
    pe.add_argument("--json", action="store_true", help="print JSON instead of text")
    return p


def _cmd_inspect(args) -> int:
    if not args.dir.strip():
        raise StoreError("inspect needs a store directory (got an empty path); pass the --pskd-store-dir of a run")
    out = inspect(args.dir)
    out["locked_by"] = lock_holder(out["path"])  # None: no process has it open for writing
    print(json.dumps(out, indent=2))
    return 0


def _cmd_estimate(args) -> int:
    notes = []
    tokens, sentences, vocab = args.tokens, args.sentences, args.vocab_size
    if args.data_bin or args.idx:
        if args.idx:
            idx = args.idx
        else:
            if not args.lang:
                raise StoreError("--data-bin needs --lang (the target language, e.g. de)")
            idx = find_index_file(args.data_bin, args.split, args.lang)
        sizes = read_fairseq_sizes(idx)
        tokens, sentences = int(sizes.astype(np.int64).sum()), int(sizes.size)
        notes.append(f"sizes from {idx}")
        if vocab is None and args.data_bin and args.lang:
            vocab = dictionary_size(args.data_bin, args.lang)
            if vocab is not None:
                notes.append(f"vocab_size from dict.{args.lang}.txt (+4 specials)")
    if tokens is None:
        raise StoreError("give --tokens N (or --data-bin DIR --lang LANG, or --idx FILE)")
    if vocab is None:
        raise StoreError("give --vocab-size V (the target dictionary size)")
    if tokens < 1 or args.topk < 1 or vocab < 1:
        raise StoreError("--tokens, --topk and --vocab-size must be positive")
    if args.topk > vocab:
        raise StoreError(f"--topk {args.topk} exceeds the vocabulary size {vocab}: a top-k cannot hold more tokens "
                         f"than the vocabulary has (the criterion refuses it too); pass --topk <= {vocab}")
    if sentences is None:
        sentences = max(1, tokens // 30)
        notes.append(f"--sentences not given: assumed tokens/30 = {sentences}")
    if sentences < 1:
        raise StoreError("--sentences must be positive")
    total = estimate_bytes(sentences, tokens, args.topk, vocab)
    ib = index_dtype(vocab).itemsize
    per_epoch = tokens * args.topk * (ib + PROB_DTYPE.itemsize)
    out = {
        "num_sentences": sentences,
        "num_tokens": tokens,
        "topk": args.topk,
        "vocab_size": vocab,
        "index_dtype": index_dtype(vocab).name,
        "bytes": total,
        "human": human_bytes(total),
        "bytes_written_per_epoch": per_epoch,
        "notes": notes,
    }
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"PS-KD top-k store: {sentences} sentences, {tokens} target tokens, k={args.topk}, vocab {vocab} "
              f"({out['index_dtype']} indices)")
        print(f"disk needed: {total} bytes ({total / 1e9:.2f} GB, {human_bytes(total)})  [2 buffers x {tokens} x "
              f"{args.topk} x ({ib} + 2) bytes + per-sentence arrays]")
        print(f"written per epoch: {per_epoch} bytes ({per_epoch / 1e9:.2f} GB, {human_bytes(per_epoch)})")
        for n in notes:
            print(f"note: {n}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _build_parser().parse_args(argv)
    try:
        return {"inspect": _cmd_inspect, "estimate": _cmd_estimate}[args.command](args)
    except StoreError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
