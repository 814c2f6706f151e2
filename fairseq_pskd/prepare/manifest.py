"""OUT/prepare.json: what a prepared directory holds and how it was made (docs/DATA.md). It is
rewritten at the end of every preparation, skipped steps included: cheap, and it then
describes the directory as it is."""
from __future__ import annotations

import json
from pathlib import Path

__all__ = ["MANIFEST_VERSION", "build_manifest", "write_manifest"]

MANIFEST_VERSION = 1


def build_manifest(source, opt, out: Path, payloads: dict, versions: dict) -> dict:
    """The manifest of OUT prepared from ``source`` with options ``opt``; ``payloads`` holds
    what each step recorded (by step name: extract, clean, spm, encode, binarize)."""
    src, tgt = opt.src, opt.tgt
    langs = [src, tgt]
    splits = source.splits
    test_splits = [s for s in splits if s.name.startswith("test")]
    extract_info, clean_info = payloads["extract"], payloads["clean"]
    spm_info, enc_info, bin_info = payloads["spm"], payloads["encode"], payloads["binarize"]
    split_info = {}
    for s in splits:
        d = {
            "label": s.label,
            "origin": s.origin,
            "pairs": bin_info["pairs"][s.name],
        }
        if s.name == "train":
            d["pairs_before_cleaning"] = clean_info["pairs_before"]
        else:
            d["ref"] = {lang: f"ref/{s.name}.{lang}" for lang in langs}
        split_info[s.name] = d
    return {
        "manifest_version": MANIFEST_VERSION,
        "corpus": source.corpus,
        "description": source.description,
        "src": src,
        "tgt": tgt,
        "vocab_size": opt.vocab_size,
        "data_bin": "data-bin",
        "dict": {"size": bin_info["dict_size"], "files": [f"data-bin/dict.{lang}.txt" for lang in langs],
                 "joined": True},  # fmt: skip
        "spm": {
            "model": "spm.model",
            "vocab": "spm.vocab",
            "model_type": opt.spm_model_type,
            "vocab_size_requested": opt.vocab_size,
            "pieces": spm_info["pieces"],
            "character_coverage": 1.0,
            "normalization_rule_name": "identity",
            "trained_on": f"cleaned training text, {src} and {tgt} together",
            "roundtrip_exact": enc_info["roundtrip_exact"],
        },
        "text": {
            "normalize_punctuation": opt.normalize_punct,
            "tokenizer": "sacremoses MosesTokenizer(lang).tokenize(escape=False)",
            "detokenizer": "fairseq_pskd.prepare.text.detokenize(lines, lang)",
        },
        "cleaning": {
            "applied_to": "train only",
            "unit": "Moses tokens",
            "min_len": opt.min_len,
            "max_len": opt.max_len or None,
            "max_ratio": opt.max_ratio or None,
            "pairs_before": clean_info["pairs_before"],
            "pairs_after": clean_info["pairs_after"],
            # --train-size: the pairs kept are a seeded random subset of the cleaned ones
            "train_size": opt.train_size,
            "train_size_seed": opt.train_size_seed if opt.train_size else None,
            "pairs_cleaned": clean_info.get("pairs_cleaned", clean_info["pairs_after"]),
        },
        "splits": split_info,
        "test_sets": {s.name: s.label for s in test_splits},
        "source": {k: v for k, v in extract_info.items() if k not in ("lines", "origin", "seconds")},
        "binarize_command": bin_info.get("command"),
        "tools": versions,
        "evaluate": (
            f"fairseq-generate {out / 'data-bin'} -s {src} -t {tgt} --gen-subset test "
            "--path CHECKPOINT --beam 5 --post-process sentencepiece --required-batch-size-multiple 1 "
            "| grep '^H-' | sort -V "
            f"| cut -f3 | python -m fairseq_pskd.prepare detokenize --lang {tgt} "
            f"| sacrebleu {out / 'ref' / ('test.' + tgt)}"
        ),
    }


def write_manifest(out: Path, manifest: dict) -> Path:
    """Write OUT/prepare.json, never half of it; returns its path."""
    part = out / "prepare.json.part"
    part.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    part.replace(out / "prepare.json")
    return out / "prepare.json"
