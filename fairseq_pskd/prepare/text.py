"""Plain-text helpers: reading corpora, Moses normalisation/tokenisation, detokenisation.

The data pipeline is

    raw text --normalise punctuation--> --Moses tokenise (escape=False)--> --sentencepiece-->

and evaluation undoes it:

    fairseq-generate --post-process sentencepiece  (gives Moses-tokenised text)
    -> detokenize(lines, lang=tgt)                  (gives plain text)
    -> sacrebleu against OUT/ref/<split>.<tgt>       (the raw, untouched references)

`tokenize` and `detokenize` are the public API other parts of the project call.
sacremoses is imported lazily so that importing this module never fails; a missing package
turns into a PrepareError that says what to install.
"""
from __future__ import annotations

import gzip
import multiprocessing
import random
import sys
import time
import zlib
from pathlib import Path
from typing import Iterable, Sequence

from .errors import PrepareError, require

__all__ = [
    "tokenize",
    "detokenize",
    "normalize_punctuation",
    "squash_whitespace",
    "read_bytes",
    "read_lines",
    "write_lines",
    "tokenize_lines",
    "length_filter",
    "random_subset",
]


def _sacremoses():
    sm = require("sacremoses", "sacremoses")
    return sm.MosesTokenizer, sm.MosesDetokenizer, sm.MosesPunctNormalizer


# ---------------------------------------------------------------------------------------------
# reading and writing
# ---------------------------------------------------------------------------------------------


def read_bytes(path: Path | str) -> bytes:
    """The (decompressed, for .gz) content of a file; corrupt gzip data becomes a PrepareError."""
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as fh:
                return fh.read()
        return path.read_bytes()
    except FileNotFoundError as e:
        raise PrepareError(f"file not found: {path}") from e
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        # EOFError: truncated; BadGzipFile: not gzip at all; zlib.error: damaged data / CRC
        raise PrepareError(
            f"{path} is corrupt or truncated ({type(e).__name__}: {e}); "
            "delete it and download it again"
        ) from e


def lines_from_bytes(data: bytes, name: str = "<data>") -> list[str]:
    """Split UTF-8 text into lines without their line endings.

    Only "\\n" ends a line: universal-newline reading would also split on a stray "\\r" inside a
    sentence and silently break the line alignment of a parallel corpus.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PrepareError(f"{name} is not valid UTF-8 ({e}); is it the right file?") from e
    if text.startswith("\ufeff"):  # a BOM is not part of the first sentence
        text = text[1:]
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def read_lines(path: Path | str) -> list[str]:
    """Read a UTF-8 text file (optionally .gz) into a list of lines without line endings."""
    return lines_from_bytes(read_bytes(path), str(path))


def write_lines(path: Path | str, lines: Iterable[str]) -> int:
    """Write lines (each must be free of line breaks) atomically; returns the line count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    n = 0
    with open(part, "w", encoding="utf-8", newline="\n") as fh:
        for line in lines:
            fh.write(line)
            fh.write("\n")
            n += 1
    part.replace(path)
    return n


def squash_whitespace(line: str) -> str:
    """Collapse every run of Unicode whitespace to one space and strip the ends.

    str.split() also splits on \\r, \\x0b, \\x0c, \\x1c-\\x1e, \\x85, \\u2028 and \\u2029, which
    fairseq (universal newlines) or sacrebleu would otherwise read as line breaks.
    """
    return " ".join(line.split())


# ---------------------------------------------------------------------------------------------
# Moses normalisation / tokenisation
# ---------------------------------------------------------------------------------------------

_CONTROL_RE = None


def _strip_controls(line: str) -> str:
    # Control and format characters (\p{Cc}, \p{Cf}: NUL, zero-width space, soft hyphen, BOM ...)
    # are invisible, carry no meaning for translation and would become pieces of their own.
    global _CONTROL_RE
    if _CONTROL_RE is None:
        import regex  # a dependency of sacremoses

        _CONTROL_RE = regex.compile(r"[\p{Cc}\p{Cf}]")
    return _CONTROL_RE.sub(" ", line)


class _LineTokenizer:
    """One Moses pipeline (normaliser + tokenizer) for one language."""

    def __init__(self, lang: str, normalize: bool = True):
        MosesTokenizer, _, MosesPunctNormalizer = _sacremoses()
        self.tok = MosesTokenizer(lang=lang)
        self.norm = MosesPunctNormalizer(lang=lang) if normalize else None

    def __call__(self, line: str) -> str:
        line = squash_whitespace(_strip_controls(line))
        if not line:
            return ""
        if self.norm is not None:
            line = self.norm.normalize(line)
        # escape=False: no "&amp;"/"&#124;" escapes. They would be learnt by sentencepiece,
        # produced by the model and then have to be undone again; the raw references do not
        # have them.
        line = self.tok.tokenize(line, escape=False, return_str=True)
        return squash_whitespace(line)


def normalize_punctuation(lines: Sequence[str], lang: str) -> list[str]:
    """Moses punctuation normalisation (normalize-punctuation.perl) of each line."""
    _, _, MosesPunctNormalizer = _sacremoses()
    norm = MosesPunctNormalizer(lang=lang)
    return [squash_whitespace(norm.normalize(squash_whitespace(line))) for line in lines]


def tokenize(lines: Sequence[str], lang: str, normalize: bool = True) -> list[str]:
    """Moses-tokenise lines exactly as the data pipeline does (one process).

    `normalize` applies Moses punctuation normalisation first (the pipeline default).
    Tokens are separated by single spaces; no XML escaping is applied.
    """
    if isinstance(lines, str):
        raise TypeError("tokenize() takes a list of lines, not a single string")
    fn = _LineTokenizer(lang, normalize)
    return [fn(line) for line in lines]


def detokenize(lines: Sequence[str], lang: str) -> list[str]:
    """Undo Moses tokenisation (sacremoses MosesDetokenizer) of each line.

    Input: Moses-tokenised lines, e.g. fairseq-generate hypotheses after
    `--post-process sentencepiece`. Output: plain text to score with sacrebleu against
    OUT/ref/<split>.<lang>. unescape=False because the pipeline never escapes (see tokenize);
    unescaping would turn a literal "&amp;" written by the model into "&".
    """
    if isinstance(lines, str):
        raise TypeError("detokenize() takes a list of lines, not a single string")
    _, MosesDetokenizer, _ = _sacremoses()
    md = MosesDetokenizer(lang=lang)
    return [squash_whitespace(md.detokenize(line.split(), unescape=False)) for line in lines]


# --- the parallel version used by the pipeline -----------------------------------------------

_WORKER: _LineTokenizer | None = None


def _init_worker(lang: str, normalize: bool) -> None:
    global _WORKER
    _WORKER = _LineTokenizer(lang, normalize)


def _tokenize_chunk(chunk: list[str]) -> list[str]:
    assert _WORKER is not None
    return [_WORKER(line) for line in chunk]


def tokenize_lines(
    lines: Sequence[str],
    lang: str,
    normalize: bool = True,
    workers: int = 1,
    label: str = "",
    log=None,
    chunk_size: int = 2000,
    progress_every: int = 50000,
) -> list[str]:
    """`tokenize` for many lines: a process pool when it pays off, progress lines on stderr.

    sacremoses is pure Python (about 10-20k lines/s per core), so IWSLT's ~400k training lines
    take long enough to want both workers and a sign of life.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    n = len(lines)
    t0 = time.time()
    if workers <= 1 or n < 4 * chunk_size:
        _init_worker(lang, normalize)
        out = _tokenize_chunk(list(lines))
    else:
        chunks = [list(lines[i : i + chunk_size]) for i in range(0, n, chunk_size)]
        out = []
        next_report = progress_every
        # fork keeps start-up cheap (no re-import of torch via the package __init__).
        ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else None)
        with ctx.Pool(workers, initializer=_init_worker, initargs=(lang, normalize)) as pool:
            for res in pool.imap(_tokenize_chunk, chunks):
                out.extend(res)
                if len(out) >= next_report and len(out) < n:
                    log(f"  tokenize {label}: {len(out)}/{n} lines, {time.time() - t0:.1f}s")
                    next_report += progress_every
    log(f"  tokenize {label}: {n} lines, {time.time() - t0:.1f}s")
    return out


# ---------------------------------------------------------------------------------------------
# cleaning
# ---------------------------------------------------------------------------------------------


def length_filter(
    src: Sequence[str], tgt: Sequence[str], min_len: int, max_len: int, ratio: float
) -> list[bool]:
    """Which pairs to keep, with the rules of Moses clean-corpus-n.perl on tokenised text.

    A pair is dropped when either side has fewer than `min_len` or (max_len > 0) more than
    `max_len` whitespace tokens, or (ratio > 0) when one side is more than `ratio` times longer
    than the other. Empty sides are always dropped when min_len >= 1.
    """
    if len(src) != len(tgt):
        raise PrepareError(f"length_filter: {len(src)} source vs {len(tgt)} target lines")
    keep = []
    for s, t in zip(src, tgt):
        ns, nt = len(s.split()), len(t.split())
        ok = ns >= min_len and nt >= min_len
        if ok and max_len > 0:
            ok = ns <= max_len and nt <= max_len
        if ok and ratio > 0:
            if ns == 0 or nt == 0:
                ok = ns == nt
            else:
                ok = ns / nt <= ratio and nt / ns <= ratio
        keep.append(ok)
    return keep


def random_subset(keep: Sequence[bool], size: int, seed: int) -> list[bool]:
    """`keep` with only `size` of its True entries left, drawn at random with `seed` (the same
    size and seed draw the same pairs; the pairs keep their corpus order)."""
    candidates = [i for i, k in enumerate(keep) if k]
    if size > len(candidates):
        raise PrepareError(
            f"--train-size {size} is more than the {len(candidates)} training pairs left after "
            "cleaning; ask for fewer, or leave --train-size out to use them all"
        )
    chosen = set(random.Random(seed).sample(candidates, size))
    return [i in chosen for i in range(len(keep))]
