"""What importing the package does: nothing heavy, and the criterion registered whatever the
import order (fairseq's --user-dir does not import a package that is already imported)."""
import subprocess
import sys

import pytest
from conftest import REPO, run

pytestmark = pytest.mark.e2e  # each test starts a fresh Python: what an import does shows there only


def run_python(code, cwd=REPO):
    """python -c CODE in ``cwd``: its stdout, stripped (stderr apart; exit status 0 checked)."""
    proc = run([sys.executable, "-c", code], cwd=cwd, stderr=subprocess.PIPE, check=False, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip()


def test_data_preparation_imports_neither_torch_nor_fairseq():
    """python -m fairseq_pskd.prepare starts at once (the store's own check is in test_store.py)."""
    loaded = run_python("import sys, fairseq_pskd.prepare.cli; print(sorted(m for m in sys.modules "
                        "if m.split('.')[0] in ('torch', 'fairseq')))")
    assert loaded == "[]"


@pytest.mark.parametrize("order", [
    "import fairseq_pskd; import fairseq",
    "import fairseq; import fairseq_pskd",
    # a lookup that does not import (a library checking what is installed) changes nothing
    "import importlib.util, fairseq_pskd; importlib.util.find_spec('torch'); "
    "importlib.util.find_spec('fairseq'); import fairseq",
])
def test_criterion_is_registered_whatever_the_import_order(order):
    out = run_python(f"{order}\nfrom fairseq.criterions import CRITERION_REGISTRY as R\n"
                     f"import torch\nfrom fairseq import checkpoint_utils\n"
                     f"print('pskd' in R, 'pskd_label_smoothed_cross_entropy' in R, "
                     f"any(g.__name__ == 'Namespace' for g in torch.serialization.get_safe_globals()), "
                     f"getattr(checkpoint_utils.PathManager, 'pskd_atomic_copy', False))")
    # registered, checkpoints loadable under torch >= 2.6, copied atomically (docs/FAIRSEQ_CHANGES.md)
    assert out.splitlines()[-1] == "True True True True"


def test_user_dir_from_another_directory(tmp_path):
    """`python -m fairseq_pskd --user-dir` names the package's directory, which fairseq's
    --user-dir accepts from any working directory."""
    proc = run([sys.executable, "-m", "fairseq_pskd", "--user-dir"], cwd=tmp_path, stderr=subprocess.PIPE,
               check=False, timeout=60)
    assert proc.returncode == 0, proc.stderr
    user_dir = proc.stdout.strip()
    import os
    assert os.path.isfile(os.path.join(user_dir, "criterion.py"))
    code = ("import sys, argparse; from fairseq import utils; "
            f"utils.import_user_module(argparse.Namespace(user_dir={user_dir!r})); "
            "from fairseq.criterions import CRITERION_REGISTRY as R; print('pskd' in R)")
    assert run_python(code, cwd=tmp_path).splitlines()[-1] == "True"
