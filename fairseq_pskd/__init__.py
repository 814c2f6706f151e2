"""fairseq-pskd: progressive self-knowledge distillation (PS-KD) for fairseq NMT.

Use as a fairseq user dir: ``fairseq-train ... --user-dir fairseq_pskd --criterion pskd``.

Importing the package imports neither torch nor fairseq, so the store, data preparation and
evaluation commands start fast and work without fairseq. It arranges two things for when they
are (or already were) imported in the process:

- torch: the checkpoint-loading allow-list for torch >= 2.6 (compat.py);
- fairseq: the registration of the criterion (``pskd`` / ``pskd_label_smoothed_cross_entropy``).

The second must not depend on the import order: ``--user-dir`` does not import a package that
is already imported (e.g. by ``python -m fairseq_pskd.evaluate``), so the registration then runs
when fairseq itself finishes importing.
"""
import importlib
import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs ``callback`` right after the top-level module ``name`` has been executed."""

    def __init__(self, name, callback):
        self.name, self.callback = name, callback

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)  # once; and lets find_spec below find the real module
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        exec_module, callback = spec.loader.exec_module, self.callback

        def exec_then_callback(module):
            exec_module(module)
            callback()

        spec.loader.exec_module = exec_then_callback
        return spec


def _after_import(name, callback):
    if name in sys.modules:
        callback()
    else:
        sys.meta_path.insert(0, _AfterImport(name, callback))


def _install_compat():
    from . import compat

    compat.install()


def _register_criterion():
    _install_compat()  # fairseq imports torch: the allow-list is in place before any load
    importlib.import_module(__name__ + ".criterion")


_after_import("torch", _install_compat)
_after_import("fairseq", _register_criterion)
