"""fairseq-pskd: progressive self-knowledge distillation (PS-KD) for fairseq NMT.

Use as a fairseq user dir: ``fairseq-train ... --user-dir fairseq_pskd --criterion pskd``.
Importing the package applies the torch >= 2.6 checkpoint-loading fix (compat.py) and,
when fairseq is importable, registers the criterion. The store, data preparation and
evaluation modules are usable without fairseq.
"""
__version__ = "0.1.0"

from . import compat

compat.install()

try:
    import fairseq  # noqa: F401
except ImportError:  # the package is also a plain library (store, prepare, evaluate)
    fairseq = None

if fairseq is not None:
    from . import criterion  # noqa: F401,E402  (registers pskd / pskd_label_smoothed_cross_entropy)
