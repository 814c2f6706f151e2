"""Joint sentencepiece model: training and encoding.

Choices (documented in docs/DATA.md):
- trained on the cleaned, Moses-tokenised training text of both languages (one joint model, so
  that fairseq's --joined-dictionary and shared embeddings make sense);
- model_type "bpe" by default (the subword scheme of the usual IWSLT/Multi30k fairseq recipes);
- character_coverage 1.0: en/de have small alphabets, every training character gets a piece;
- normalization_rule_name "identity": no NFKC, so decode(encode(x)) == x and the detokenised
  output can match the raw references character for character;
- hard_vocab_limit False: on tiny corpora (tests) the model gets as many pieces as the data
  allows instead of failing; the real size is recorded in prepare.json.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Sequence

from .errors import PrepareError, require


def _spm():
    return require("sentencepiece", "sentencepiece")


def train(
    inputs: Sequence[Path],
    model_path: Path,
    vocab_size: int,
    model_type: str = "bpe",
    threads: int = 1,
) -> int:
    """Train a sentencepiece model; writes model_path (.model) and its .vocab; returns its size."""
    spm = _spm()
    model_path = Path(model_path)
    prefix = model_path.with_name(model_path.stem + ".part")
    try:
        spm.SentencePieceTrainer.train(
            input=",".join(str(p) for p in inputs),
            model_prefix=str(prefix),
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=1.0,
            normalization_rule_name="identity",
            hard_vocab_limit=False,
            num_threads=max(1, threads),
            # sentencepiece logs every iteration to stderr; errors are still raised.
            minloglevel=1,
        )
    except (RuntimeError, OSError) as e:
        raise PrepareError(f"sentencepiece training failed: {e}") from e
    shutil.move(f"{prefix}.vocab", model_path.with_suffix(".vocab"))
    shutil.move(f"{prefix}.model", model_path)
    return load(model_path).get_piece_size()


def load(model_path: Path):
    spm = _spm()
    return spm.SentencePieceProcessor(model_file=str(model_path))


def encode(sp, lines: Sequence[str], threads: int = 1) -> list[str]:
    """Encode lines as space-separated pieces (the input format of fairseq-preprocess)."""
    pieces = sp.encode(list(lines), out_type=str, num_threads=max(1, threads))
    return [" ".join(p) for p in pieces]


def decode_pieces(line: str) -> str:
    """What fairseq's `--post-process sentencepiece` does to a line of pieces."""
    return line.replace(" ", "").replace("\u2581", " ").strip()
