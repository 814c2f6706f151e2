"""Disk-backed top-k store of the previous epoch's predictions, for PS-KD.

PS-KD trains every target token against a mix of its label and ``P_{t-1}``, the model's own
distribution for that token one epoch earlier (docs/METHOD.md). Keeping full distributions
is impossible (140 M tokens x 40 k vocab on WMT'14), so for every target token we keep the
top-k vocabulary indices and their probabilities, in memory-mapped files: the process only
holds the pages it touches, so resident memory does not grow with the corpus. See
docs/STORE.md for the API, the format, the data-parallel design and what each module does.

Command line: ``python -m fairseq_pskd.store {inspect,estimate} ...``.

The package must not import fairseq, nor anything of fairseq_pskd outside it: it is used by
tools that run without fairseq.
"""
from .cli import main
from .errors import StoreError, StoreLockedError
from .fairseq_index import read_fairseq_sizes
from .format import (
    FORMAT_VERSION,
    HEADER_NAME,
    LENGTH_DTYPE,
    LENGTHS_NAME,
    LOCK_NAME,
    PROB_DTYPE,
    STAMP_DTYPE,
    index_dtype,
)
from .lock import lock_holder

# TopKStore reads and writes torch tensors; it is imported when first used, so that the command
# line (inspect, estimate: numpy only) starts without importing torch.
_LAZY = {"TopKStore": ".topk_store", "DEFAULT_MAX_PENDING": ".writer", "compact_rows": ".staging"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["StoreError", "StoreLockedError", "TopKStore", "compact_rows", "lock_holder", "read_fairseq_sizes",
           "main", "index_dtype", "FORMAT_VERSION", "HEADER_NAME", "LENGTHS_NAME", "LOCK_NAME", "PROB_DTYPE",
           "STAMP_DTYPE", "LENGTH_DTYPE", "DEFAULT_MAX_PENDING"]
