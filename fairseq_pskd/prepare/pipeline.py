"""The corpus-independent part of the preparation: steps, done-markers, manifest.

A corpus module (iwslt.py, multi30k.py) provides a *source*: which splits exist and how to get
their raw, line-parallel text. Everything after that is the same for every corpus:

    extract   raw text of every split and both languages     -> OUT/tmp/raw/<split>.<lang>
    tokenize  Moses punctuation normalisation + tokenisation  -> OUT/tmp/tok/<split>.<lang>
    clean     length/ratio filter, training data only         -> OUT/tmp/clean/train.<lang>
    spm       joint sentencepiece model on cleaned train      -> OUT/spm.model, OUT/spm.vocab
    encode    every split as pieces                           -> OUT/tmp/spm/<split>.<lang>
    binarize  fairseq-preprocess --joined-dictionary          -> OUT/data-bin/
    refs      raw text of the non-train splits                -> OUT/ref/<split>.<lang>
    manifest                                                  -> OUT/prepare.json

Idempotence: each step runs only when what its output depends on changed (steps.py); the
manifest describes the result (manifest.py).
"""
from __future__ import annotations

import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import binarize, subword, text
from .errors import PrepareError
from .manifest import build_manifest, write_manifest
from .steps import Steps, step_key, tool_versions

__all__ = ["Split", "Options", "Source", "run"]


@dataclass
class Split:
    """One split as fairseq will know it."""

    name: str  # fairseq name: train, valid, test, test1, ...
    label: str  # corpus name of the split, e.g. "tst2013" or "test_2016_flickr"
    origin: dict = field(default_factory=dict)  # lang -> list of original file names


@dataclass
class Options:
    out: Path
    src: str
    tgt: str
    vocab_size: int
    spm_model_type: str = "bpe"
    workers: int = 2
    normalize_punct: bool = True
    min_len: int = 1
    max_len: int = 0
    max_ratio: float = 0.0
    # a seeded random subset of this many cleaned training pairs (None: all of them), as a user
    # with only that much data would have: subwords are learned on the subset too
    train_size: int | None = None
    train_size_seed: int = 1
    force: bool = False
    stop_after: str | None = None  # a step name: stop there (inspect intermediate files)


class Source:
    """Interface of a corpus source (see iwslt.py / multi30k.py)."""

    corpus: str = ""
    description: str = ""
    splits: list[Split]

    def fingerprint(self) -> dict:
        """What identifies the input (paths, sizes, mtimes, URLs, split selection)."""
        raise NotImplementedError

    def check(self) -> None:
        """Cheap checks to run before anything else (input exists, ...)."""

    def extract(self, workdir: Path, log) -> tuple[dict, dict]:
        """Return ({split name: {lang: [raw lines]}}, info for the manifest).

        Fills Split.origin. workdir is for intermediate files (downloads go elsewhere).
        """
        raise NotImplementedError


def _count_lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for _ in f)


def run(source: Source, opt: Options) -> dict:
    """Prepare OUT for one corpus; returns the manifest (also written to OUT/prepare.json)."""
    t_start = time.time()
    out = Path(opt.out).absolute()
    tmp = out / "tmp"

    def log(msg: str) -> None:
        print(f"[prepare {source.corpus}] {msg}", file=sys.stderr, flush=True)

    src, tgt = opt.src, opt.tgt
    langs = [src, tgt]
    splits = source.splits
    names = [s.name for s in splits]
    eval_splits = [s for s in splits if s.name != "train"]
    test_splits = [s for s in splits if s.name.startswith("test")]
    if names[0] != "train" or "valid" not in names:
        raise PrepareError("internal: a source must define train and valid splits")

    raw_dir, tok_dir, clean_dir, enc_dir = (tmp / d for d in ("raw", "tok", "clean", "spm"))
    data_bin, ref_dir = out / "data-bin", out / "ref"
    spm_model = out / "spm.model"

    steps = Steps(tmp / "done", log)

    def stopped(name: str) -> bool:
        if opt.stop_after == name:
            log(f"stopped after step {name} (--stop-after); no manifest written")
            return True
        return False

    if opt.force and steps.dir.exists():
        shutil.rmtree(steps.dir)

    # --- keys (computable up front: they depend on options and input identity only) ----------
    versions = tool_versions()
    k_extract = step_key("extract", source.corpus, source.fingerprint(), langs,
                         [(s.name, s.label) for s in splits])  # fmt: skip
    k_tok = step_key("tokenize", k_extract, opt.normalize_punct, versions["sacremoses"])
    subset = [opt.train_size, opt.train_size_seed] if opt.train_size else None
    k_clean = step_key("clean", k_tok, opt.min_len, opt.max_len, opt.max_ratio, *([subset] if subset else []))
    k_spm = step_key("spm", k_clean, opt.vocab_size, opt.spm_model_type, versions["sentencepiece"])
    k_encode = step_key("encode", k_spm)
    k_bin = step_key("binarize", k_encode, versions["fairseq"])
    k_refs = step_key("refs", k_extract)

    def files(d: Path, split_names) -> list[Path]:
        return [d / f"{n}.{lang}" for n in split_names for lang in langs]

    bin_outputs = [data_bin / f"dict.{lang}.txt" for lang in langs] + [
        data_bin / f"{n}.{src}-{tgt}.{lang}.{ext}" for n in names for lang in langs
        for ext in ("bin", "idx")
    ]  # fmt: skip

    # --- preflight: fail before hours of work, not after --------------------------------------
    order = ["extract", "tokenize", "clean", "spm", "encode", "binarize", "refs"]
    last = order.index(opt.stop_after) if opt.stop_after else len(order) - 1

    def needed(name: str, key: str, outputs: list[Path]) -> bool:
        return order.index(name) <= last and steps.done(name, key, outputs) is None

    source.check()
    if needed("binarize", k_bin, bin_outputs):
        binarize.find_preprocess()
    if needed("tokenize", k_tok, files(tok_dir, names)):
        text._sacremoses()
    if needed("spm", k_spm, [spm_model]) or needed("encode", k_encode, files(enc_dir, names)):
        subword._spm()

    # --- extract -----------------------------------------------------------------------------
    def do_extract():
        texts, info = source.extract(tmp, log)
        counts = {}
        for s in splits:
            sides = texts[s.name]
            n_src, n_tgt = len(sides[src]), len(sides[tgt])
            if n_src != n_tgt:
                raise PrepareError(
                    f"{s.name} ({s.label}): the {src} side has {n_src} lines "
                    f"({', '.join(s.origin.get(src, []))}) but the {tgt} side has {n_tgt} "
                    f"({', '.join(s.origin.get(tgt, []))}); the sides must be line-parallel. "
                    "Re-download or repair the input."
                )
            if n_src == 0:
                raise PrepareError(f"{s.name} ({s.label}) is empty; is the input complete?")
            for lang in langs:
                text.write_lines(raw_dir / f"{s.name}.{lang}", sides[lang])
            counts[s.name] = n_src
            log(f"  {s.name:6s} <- {s.label}: {n_src} lines")
        info["lines"] = counts
        info["origin"] = {s.name: s.origin for s in splits}
        return info

    extract_info = steps.run("extract", k_extract, files(raw_dir, names), do_extract)
    if stopped("extract"):
        return {}
    for s in splits:  # origins are also needed when extraction was skipped
        s.origin = extract_info["origin"][s.name]

    # --- tokenize ----------------------------------------------------------------------------
    def do_tokenize():
        for lang in langs:
            for n in names:
                lines = text.read_lines(raw_dir / f"{n}.{lang}")
                tok = text.tokenize_lines(lines, lang, normalize=opt.normalize_punct,
                                          workers=opt.workers, label=f"{n}.{lang}", log=log)  # fmt: skip
                text.write_lines(tok_dir / f"{n}.{lang}", tok)
        return {}

    steps.run("tokenize", k_tok, files(tok_dir, names), do_tokenize)
    if stopped("tokenize"):
        return {}

    # --- clean (training data only: dev/test must stay aligned with their references) -------
    def do_clean():
        s_lines = text.read_lines(tok_dir / f"train.{src}")
        t_lines = text.read_lines(tok_dir / f"train.{tgt}")
        keep = text.length_filter(s_lines, t_lines, opt.min_len, opt.max_len, opt.max_ratio)
        kept = sum(keep)
        log(f"  kept {kept}/{len(keep)} training pairs ({len(keep) - kept} dropped)")
        if kept == 0:
            raise PrepareError("cleaning dropped every training pair; check --min-len/--max-len")
        info = {"pairs_before": len(keep), "pairs_after": kept}
        if opt.train_size:
            keep = text.random_subset(keep, opt.train_size, opt.train_size_seed)
            info["pairs_cleaned"], info["pairs_after"] = kept, opt.train_size
            log(f"  --train-size {opt.train_size}: a random subset (seed {opt.train_size_seed}) "
                f"of the {kept} cleaned pairs")
        for lang, lines in ((src, s_lines), (tgt, t_lines)):
            text.write_lines(clean_dir / f"train.{lang}", (x for x, k in zip(lines, keep) if k))
        return info

    clean_info = steps.run("clean", k_clean, files(clean_dir, ["train"]), do_clean)
    if stopped("clean"):
        return {}

    # --- sentencepiece -----------------------------------------------------------------------
    def do_spm():
        out.mkdir(parents=True, exist_ok=True)
        log(f"  training a joint {opt.spm_model_type} model, {opt.vocab_size} pieces, on "
            f"2 x {clean_info['pairs_after']} lines")  # fmt: skip
        size = subword.train(
            [clean_dir / f"train.{lang}" for lang in langs], spm_model, opt.vocab_size,
            opt.spm_model_type, threads=opt.workers,
        )  # fmt: skip
        if size < opt.vocab_size:
            log(f"  note: the data only supports {size} pieces (asked for {opt.vocab_size})")
        return {"pieces": size}

    spm_info = steps.run("spm", k_spm, [spm_model, spm_model.with_suffix(".vocab")], do_spm)
    if stopped("spm"):
        return {}

    # --- encode ------------------------------------------------------------------------------
    def do_encode():
        sp = subword.load(spm_model)
        exact = {}
        for n in names:
            for lang in langs:
                tok = text.read_lines((clean_dir if n == "train" else tok_dir) / f"{n}.{lang}")
                enc = subword.encode(sp, tok, threads=opt.workers)
                # what fairseq-generate --post-process sentencepiece will give back
                same = sum(subword.decode_pieces(e) == t for e, t in zip(enc, tok))
                exact[f"{n}.{lang}"] = round(same / max(1, len(tok)), 6)
                text.write_lines(enc_dir / f"{n}.{lang}", enc)
        worst = min(exact.values())
        log(f"  sentencepiece round trip exact for >= {100 * worst:.2f}% of lines in every file")
        return {"roundtrip_exact": exact}

    enc_info = steps.run("encode", k_encode, files(enc_dir, names), do_encode)
    if stopped("encode"):
        return {}

    # --- binarize ----------------------------------------------------------------------------
    def do_binarize():
        part = tmp / "data-bin.part"
        if part.exists():
            shutil.rmtree(part)
        log("  running fairseq-preprocess (log: tmp/fairseq-preprocess.log)")
        argv = binarize.run_preprocess(
            src, tgt,
            trainpref=enc_dir / "train",
            validpref=enc_dir / "valid",
            testprefs=[enc_dir / s.name for s in test_splits],
            destdir=part,
            workers=opt.workers,
            log_path=tmp / "fairseq-preprocess.log",
        )  # fmt: skip
        pairs = {}
        for n in names:
            pairs[n] = binarize.count_pairs(part, n, src, tgt)
            expected = _count_lines(enc_dir / f"{n}.{src}")
            if pairs[n] != expected:
                raise PrepareError(
                    f"fairseq-preprocess wrote {pairs[n]} pairs for {n}, expected {expected}"
                )
        d_src = (part / f"dict.{src}.txt").read_bytes()
        if d_src != (part / f"dict.{tgt}.txt").read_bytes():
            raise PrepareError("internal: the joined dictionaries differ")
        if data_bin.exists():
            shutil.rmtree(data_bin)
        part.rename(data_bin)
        dict_size = 4 + d_src.count(b"\n")  # + <s> <pad> </s> <unk>, which are not listed
        log("  pairs: " + ", ".join(f"{n}={c}" for n, c in pairs.items()))
        # recorded relative to OUT (the manifest should survive moving OUT)
        cmd = ["fairseq-preprocess"] + [
            a.replace(str(part), "data-bin").replace(str(out) + "/", "")
            for a in argv[argv.index("--source-lang"):]
        ]  # fmt: skip
        return {"pairs": pairs, "dict_size": dict_size, "command": cmd}

    bin_info = steps.run("binarize", k_bin, bin_outputs, do_binarize)
    if stopped("binarize"):
        return {}

    # --- references --------------------------------------------------------------------------
    def do_refs():
        for s in eval_splits:
            for lang in langs:
                lines = text.read_lines(raw_dir / f"{s.name}.{lang}")
                text.write_lines(ref_dir / f"{s.name}.{lang}", map(text.squash_whitespace, lines))
        return {}

    steps.run("refs", k_refs, files(ref_dir, [s.name for s in eval_splits]), do_refs)

    # --- manifest (always rewritten: cheap, and reflects the current state) -----------------
    payloads = {"extract": extract_info, "clean": clean_info, "spm": spm_info, "encode": enc_info,
                "binarize": bin_info}
    manifest = build_manifest(source, opt, out, payloads, versions)
    manifest_path = write_manifest(out, manifest)
    log(
        f"finished in {time.time() - t_start:.1f}s (ran: {', '.join(steps.ran) or 'nothing'}; "
        f"skipped: {', '.join(steps.skipped) or 'nothing'}); manifest: {manifest_path}"
    )
    return manifest
