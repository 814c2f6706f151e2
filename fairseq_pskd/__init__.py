"""fairseq-pskd: progressive self-knowledge distillation (PS-KD) for fairseq NMT.

Use as a fairseq user dir: ``fairseq-train ... --user-dir fairseq_pskd --criterion pskd``.

Importing the package imports neither torch nor fairseq (its store needs torch, its data
preparation neither), so the command-line tools start fast and work without fairseq. It
arranges two things for when they are (or already were) imported in the process:

- torch: the checkpoint-loading allow-list for torch >= 2.6 (compat.py);
- fairseq: the registration of the criterion (``pskd`` / ``pskd_label_smoothed_cross_entropy``),
  a clean exit of fairseq-train after an error (compat.py) and atomic copies of checkpoints
  (checkpoints.py).

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
    """Runs ``callback`` once, right after the top-level module ``name`` has been executed.

    The real module is found by the other finders and loaded by its own loader, through a
    proxy that calls back after it; a lookup that does not import (importlib.util.find_spec)
    leaves the hook in place."""

    def __init__(self, name, callback):
        self.name, self.callback = name, callback

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _CallbackLoader(spec.loader, self)
        return spec

    def done(self):
        if self in sys.meta_path:
            sys.meta_path.remove(self)
            self.callback()


class _CallbackLoader(importlib.abc.Loader):
    def __init__(self, loader, hook):
        self.loader, self.hook = loader, hook

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        module.__spec__.loader = module.__loader__ = self.loader  # it keeps its real loader
        self.loader.exec_module(module)
        self.hook.done()

    def __getattr__(self, name):  # get_resource_reader, is_package, ...: the real loader's
        return getattr(self.loader, name)


def _after_import(name, callback):
    if name in sys.modules:
        callback()
    else:
        sys.meta_path.insert(0, _AfterImport(name, callback))


def _install_compat():
    from . import compat

    compat.install()


def _register_criterion():
    from . import checkpoints, compat

    compat.install(fairseq_types=True)  # fairseq's own types for data-parallel resume
    compat.stop_data_buffers_at_exit()
    checkpoints.install_atomic_copy()
    importlib.import_module(__name__ + ".criterion")


_after_import("torch", _install_compat)
_after_import("fairseq", _register_criterion)
