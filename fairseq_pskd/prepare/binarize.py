"""Run fairseq-preprocess and read back what it wrote.

fairseq-preprocess is run as a subprocess (not imported): importing fairseq pulls in torch,
which the rest of the preparation does not need, and its logging setup is global.
"""
from __future__ import annotations

import importlib.util
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from .errors import PrepareError

ENV_OVERRIDE = "FAIRSEQ_PREPROCESS"


def find_preprocess() -> list[str]:
    """The command that runs fairseq-preprocess, as an argv prefix.

    Order: $FAIRSEQ_PREPROCESS (a command line, for unusual installs and for tests), the
    fairseq-preprocess next to this Python (a venv that is used without being activated),
    fairseq-preprocess on PATH, `python -m fairseq_cli.preprocess`.
    """
    override = os.environ.get(ENV_OVERRIDE)
    if override:
        argv = shlex.split(override)
        if not argv or shutil.which(argv[0]) is None:
            raise PrepareError(
                f"{ENV_OVERRIDE}={override!r} does not name an executable; unset it or point it "
                "to fairseq-preprocess"
            )
        return argv
    beside = Path(sys.executable).parent / "fairseq-preprocess"
    if beside.is_file() and os.access(beside, os.X_OK):
        return [str(beside)]
    on_path = shutil.which("fairseq-preprocess")
    if on_path:
        return [on_path]
    if importlib.util.find_spec("fairseq_cli") is not None:
        return [sys.executable, "-m", "fairseq_cli.preprocess"]
    raise PrepareError(
        "fairseq-preprocess was not found (not beside "
        f"{sys.executable}, not on PATH, and the module fairseq_cli is not importable). "
        "Install fairseq into this environment (bash scripts/install.sh) or activate the venv "
        "that has it."
    )


def run_preprocess(
    src: str,
    tgt: str,
    trainpref: Path,
    validpref: Path | None,
    testprefs: Sequence[Path],
    destdir: Path,
    workers: int,
    log_path: Path,
) -> list[str]:
    """Binarise with a joined dictionary built from the training text; returns the argv used.

    No --nwordssrc/--thresholdsrc: the vocabulary is already fixed by sentencepiece, so the
    dictionary is every piece that occurs in the training data (padded to a multiple of 8).
    """
    argv = find_preprocess() + [
        "--source-lang", src,
        "--target-lang", tgt,
        "--trainpref", str(trainpref),
        "--destdir", str(destdir),
        "--joined-dictionary",
        "--workers", str(max(1, workers)),
    ]  # fmt: skip
    if validpref is not None:
        argv += ["--validpref", str(validpref)]
    if testprefs:
        argv += ["--testpref", ",".join(str(p) for p in testprefs)]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w", encoding="utf-8") as log:
        log.write("$ " + shlex.join(argv) + "\n")
        log.flush()
        try:
            proc = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT)
        except OSError as e:
            raise PrepareError(f"could not run {argv[0]}: {e}") from e
    if proc.returncode != 0:
        tail = "".join(open(log_path, encoding="utf-8", errors="replace").readlines()[-15:])
        raise PrepareError(
            f"fairseq-preprocess failed with exit code {proc.returncode}; "
            f"full log: {log_path}\n--- last lines ---\n{tail}"
        )
    return argv


def index_sizes(idx_path: Path) -> list[int]:
    """Sentence lengths (in tokens, incl. </s>) stored in a fairseq mmap .idx file.

    Read with the store's reader of fairseq's index header (store/fairseq_index.py, which imports
    neither fairseq nor torch), so that the store and data preparation accept the same files.
    """
    # imported here: the store package brings numpy, which `python -m fairseq_pskd.prepare` does
    # not need to start
    from ..store.errors import StoreError
    from ..store.fairseq_index import read_fairseq_sizes

    try:
        return read_fairseq_sizes(str(idx_path)).tolist()
    except StoreError as e:
        raise PrepareError(str(e)) from e


def count_pairs(data_bin: Path, split: str, src: str, tgt: str) -> int:
    """Number of sentence pairs of `split` in a data-bin (checks both sides agree)."""
    prefix = Path(data_bin) / f"{split}.{src}-{tgt}"
    n_src = len(index_sizes(Path(f"{prefix}.{src}.idx")))
    n_tgt = len(index_sizes(Path(f"{prefix}.{tgt}.idx")))
    if n_src != n_tgt:
        raise PrepareError(f"{prefix}: {n_src} source vs {n_tgt} target sentences")
    return n_src
