"""What stock fairseq 0.12 needs to run on today's torch and Python. Every object of fairseq or
torch the plugin replaces, wraps or writes, these two included: docs/FAIRSEQ_CHANGES.md.

1. Checkpoint loading. torch >= 2.6 loads checkpoints with ``weights_only=True`` by default, and fairseq 0.12
checkpoints pickle a few non-tensor objects, so ``fairseq-generate``,
``fairseq-interactive`` and resuming ``fairseq-train`` fail with "Weights only load
failed". Rather than switching safe loading off (``weights_only=False`` would execute any
pickled object), we add to torch's allow-list exactly the globals fairseq checkpoints
hold. A checkpoint that holds any other object is still refused by torch.

The plugin is imported through ``--user-dir`` before fairseq reads any checkpoint, so
importing this package is enough; this point changes torch's allow-list only, not fairseq.

2. A clean exit after an error. fairseq-train collates the next batches on a daemon thread
(``fairseq.data.iterators.BackgroundConsumer``, the ``--data-buffer-size`` buffer). When an
error ends training, the interpreter kills that thread at exit wherever it is; inside torch's
C++ code that aborts the process ("terminate called without an active exception", exit status
134 instead of 1, for any criterion: benchmarks/exit_after_error.py measures it). At exit, before
the interpreter finalizes, ``stop_data_buffers_at_exit`` lets each such thread finish the batch
it is on and stop: it writes the thread's private ``_max_len`` and drains its ``_queue`` (the
names fairseq 0.12's BackgroundConsumer uses).
"""
import argparse
import atexit
import queue
import threading
import time

# Found with torch.serialization.get_unsafe_globals_in_checkpoint on checkpoints written by
# fairseq 0.12.3 (transformer, adam, inverse_sqrt, label smoothing / PS-KD): the legacy
# ``args`` field is an argparse.Namespace; with --eval-bleu the saved metrics state holds
# numpy arrays (BLEU n-gram counts), which need numpy's array reconstructor and dtypes.
# numpy arrays of plain dtypes are data: an object-dtype array pickles its elements as
# separate globals, which stay refused.
#
# Data-parallel resume: rank 0 reads the checkpoint and fairseq's broadcast_object sends it to
# the other ranks with torch.save/torch.load, by then with ``cfg`` as an omegaconf DictConfig;
# those ranks need omegaconf's containers and nodes (and the builtins their pickles call).
FAIRSEQ_CHECKPOINT_GLOBALS = [argparse.Namespace]


def _omegaconf_globals(fairseq_types):
    try:
        import collections
        import typing

        from omegaconf import DictConfig, ListConfig, nodes
        from omegaconf.base import ContainerMetadata, Metadata
    except ImportError:  # pragma: no cover - omegaconf comes with fairseq
        return []
    node_types = [getattr(nodes, n) for n in ("AnyNode", "StringNode", "IntegerNode", "FloatNode",
                                               "BooleanNode", "EnumNode", "BytesNode", "PathNode")
                  if hasattr(nodes, n)]
    extra = []
    if fairseq_types:  # only once fairseq is imported: the package works without it
        # broadcast_object replaces tensors by index placeholders (a plain dataclass)
        from fairseq.distributed.utils import _TensorPlaceholder
        extra.append(_TensorPlaceholder)
    return [DictConfig, ListConfig, ContainerMetadata, Metadata, *node_types,
            collections.defaultdict, dict, list, int, typing.Any, *extra]


def _numpy_globals():
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy comes with torch/fairseq
        return []
    try:  # numpy >= 2 moved these; torch resolves them by the module path they pickle under
        from numpy._core.multiarray import _reconstruct, scalar
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct, scalar
    dtypes = [type(np.dtype(t)) for t in
              ("float64", "float32", "float16", "int64", "int32", "int16", "int8", "uint8", "bool")]
    return [scalar, _reconstruct, np.ndarray, np.dtype, *dtypes]


def allowed_globals(fairseq_types=False):
    """The objects the plugin adds to torch's weights-only allow-list (``fairseq_types``: with
    those of fairseq's own classes that data-parallel resume unpickles; needs fairseq)."""
    return FAIRSEQ_CHECKPOINT_GLOBALS + _numpy_globals() + _omegaconf_globals(fairseq_types)


_installed = set()


def install(fairseq_types=False):
    """Allow exactly what fairseq checkpoints need in torch's weights-only unpickler.

    Called when torch is imported, and with ``fairseq_types`` once fairseq is."""
    import torch

    add = getattr(getattr(torch, "serialization", None), "add_safe_globals", None)
    if add is None:  # torch < 2.4 has no allow-list and loads with weights_only=False anyway
        return
    new = [g for g in allowed_globals(fairseq_types) if g not in _installed]
    if new:
        add(new)
        _installed.update(new)


_EXIT_WAIT_S = 30.0  # at most this long for the buffer threads to finish the batch they collate
_stop_registered = False


def stop_data_buffers_at_exit():
    """Register (once) the exit-time stop of fairseq's data-buffer threads (point 2 above).

    atexit handlers run before the interpreter starts killing daemon threads."""
    global _stop_registered
    if not _stop_registered:
        atexit.register(_stop_data_buffers)
        _stop_registered = True


def _stop_data_buffers():
    try:
        from fairseq.data.iterators import BackgroundConsumer
    except ImportError:
        return
    deadline = time.monotonic() + _EXIT_WAIT_S
    for thread in threading.enumerate():
        if not isinstance(thread, BackgroundConsumer) or not thread.is_alive():
            continue
        # its loop stops after the item it is on (count >= max_len); its queue.put calls
        # return because the queue is drained here, so it reaches the check and then exits
        thread._max_len = 0
        while thread.is_alive() and time.monotonic() < deadline:
            try:
                thread._queue.get(timeout=0.05)
            except queue.Empty:
                pass
