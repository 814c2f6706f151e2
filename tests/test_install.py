"""A non-editable install, used from outside the checkout: README's one-line `--user-dir`
with fairseq-train, fairseq-generate and fairseq-hydra-train (examples/hydra/pskd.yaml).

The install, once per module, takes seconds and no network: the plugin is built into a wheel
(`pip wheel --no-deps --no-build-isolation --no-index`, from a copy of its sources, so the
checkout gains no build/ or egg-info) and installed into a fresh virtual environment made
`--without-pip`, with nothing else in it. Only then does a .pth file make that environment see
the test interpreter's site-packages, for torch and fairseq (a .pth does not run the .pth files
of the directory it names, so this checkout's editable install stays invisible), and its bin/
gets fairseq's console scripts, the ones pip writes, pointing at the new interpreter. Every
command then runs in bash, from a directory outside the checkout, with that bin/ first on PATH,
as a user who typed `pip install .` into their own environment would.
"""
import os
import re
import shlex
import shutil
import site
import subprocess
import sys
import sysconfig
import time
import types
from pathlib import Path

import pytest
from conftest import REPO, TINY_ARCH, TINY_TRAIN, epoch_stats

pytestmark = pytest.mark.e2e

USER_DIR_LINE = '"$(python -m fairseq_pskd --user-dir)"'  # README.md, "Use it"
HYDRA_CONFIG_DIR = REPO / "examples" / "hydra"
PACKAGING_FILES = ("setup.py", "setup.cfg", "pyproject.toml", "MANIFEST.in", "README.md", "LICENSE")

# fairseq's console scripts, as pip writes them into an environment's bin/
CONSOLE_SCRIPT = """#!{python}
# -*- coding: utf-8 -*-
import re
import sys
from {module} import {attr}
if __name__ == '__main__':
    sys.argv[0] = re.sub(r'(-script\\.pyw|\\.exe)?$', '', sys.argv[0])
    sys.exit({attr}())
"""



def assert_two_pskd_epochs(log, save_dir):
    """Two epochs of --criterion pskd (a_T 0.8, --max-epoch 2) in ``log``, saved in ``save_dir``."""
    stats = epoch_stats(log)
    assert sorted(stats) == [1, 2], log[-3000:]
    assert stats[1]["pskd_alpha"] == pytest.approx(0.4) and stats[1]["pskd_coverage"] == 0
    assert stats[2]["pskd_alpha"] == pytest.approx(0.8) and stats[2]["pskd_coverage"] == pytest.approx(1.0)
    assert 0 < stats[2]["pskd_topk_mass"] <= 1
    assert (save_dir / "checkpoint_last.pt").is_file()
    assert (save_dir / "pskd_store").is_dir()


def generate_all(installed, data_bin, cwd):
    """fairseq-generate of ckpt/checkpoint_last.pt with the one-line --user-dir: every test sentence."""
    gen = installed.run(
        f'fairseq-generate "$DATA" --user-dir {USER_DIR_LINE} --path ckpt/checkpoint_last.pt '
        '--gen-subset test --beam 2 --batch-size 8 --required-batch-size-multiple 1 --cpu',
        cwd=cwd, DATA=data_bin)
    assert gen.returncode == 0, gen.stdout[-6000:]
    hyps = re.findall(r"^H-(\d+)\t", gen.stdout, flags=re.M)
    assert sorted(map(int, hyps)) == list(range(24)), gen.stdout[-3000:]
    return gen


def _inside(path, directory):
    return Path(path).resolve().is_relative_to(Path(directory).resolve())


def _user_dir_in(log):
    """The user_dir of the configuration fairseq logs when it starts, resolved."""
    found = set(re.findall(r"'user_dir': '([^']+)'", log))
    assert len(found) == 1, f"fairseq logged user_dir {found or 'nowhere'}"
    return Path(found.pop()).resolve()


def _fairseq_console_scripts():
    from importlib.metadata import entry_points

    return [ep for ep in entry_points(group="console_scripts") if ep.value.startswith("fairseq_cli.")]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The plugin installed (not editable) into a new virtual environment that reuses this
    interpreter's torch and fairseq; ``.run(script, cwd)`` runs a bash script in it."""
    pytest.importorskip("setuptools", reason="building the wheel needs setuptools (scripts/install.sh installs it)")
    t0 = time.time()
    root = tmp_path_factory.mktemp("install")
    assert not _inside(root, REPO)
    src = root / "src"
    src.mkdir()
    for name in PACKAGING_FILES:
        if (REPO / name).is_file():
            shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "fairseq_pskd", src / "fairseq_pskd",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-cache-dir"]
    quiet = dict(stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)

    def check(cmd, **kw):
        proc = subprocess.run(cmd, **quiet, **kw)
        assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{proc.stdout[-4000:]}"
        return proc

    check([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
           "-w", root / "wheels", src])
    (wheel,) = (root / "wheels").glob("fairseq_pskd-*.whl")
    env_dir = root / "env"
    check([sys.executable, "-m", "venv", "--without-pip", env_dir])
    python = env_dir / "bin" / "python"
    # into the empty environment: nothing to uninstall, nothing to fetch
    check([*pip, "--python", python, "install", "--no-deps", "--no-index", "-q", wheel])
    env_site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                   **quiet).stdout.strip())
    assert (env_site / "fairseq_pskd" / "criterion.py").is_file(), "the wheel did not install the package"
    # torch and fairseq from this interpreter's site-packages, after the environment's own
    ours = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"],
                          *site.getsitepackages()])
    (env_site / "_reuse_torch_and_fairseq.pth").write_text("".join(f"{p}\n" for p in ours if os.path.isdir(p)))
    for ep in _fairseq_console_scripts():
        module, attr = ep.value.split(":")
        script = env_dir / "bin" / ep.name
        script.write_text(CONSOLE_SCRIPT.format(python=python, module=module, attr=attr))
        script.chmod(0o755)

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env.update(PATH=f"{env_dir / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}", VIRTUAL_ENV=str(env_dir),
               PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", PYTHONNOUSERSITE="1")

    def run(script, cwd, timeout=600, **variables):
        assert not _inside(cwd, REPO)
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd,
                              env=dict(env, **{k: str(v) for k, v in variables.items()}),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
        return proc

    print(f"\nnon-editable install into {env_dir}: {time.time() - t0:.1f}s")
    return types.SimpleNamespace(env_dir=env_dir, site=env_site, user_dir=(env_site / "fairseq_pskd").resolve(),
                                 python=python, run=run)


def test_user_dir_names_the_installed_copy(installed, tmp_path):
    """From outside the checkout, `python -m fairseq_pskd --user-dir` names the installed
    package (inside the new environment, not the checkout), and that is the copy imported
    there, by `import fairseq_pskd` and by fairseq's --user-dir alike."""
    proc = installed.run(
        'command -v python fairseq-train fairseq-generate fairseq-hydra-train\n'
        'python -m fairseq_pskd --user-dir\n'
        'python -c "import sys, fairseq, fairseq_pskd.criterion as c; from fairseq import utils; '
        "import argparse; utils.import_user_module(argparse.Namespace(user_dir=sys.argv[1])); "
        'print(c.__file__); print(sys.modules[\'fairseq_pskd\'].__file__); print(fairseq.__file__)" '
        f'{USER_DIR_LINE}\n', cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("/")]
    *tools, user_dir, criterion_file, package_file, fairseq_file = lines
    assert [Path(t).parent for t in tools] == [installed.env_dir / "bin"] * 4, tools  # (python: a symlink)
    assert Path(user_dir).resolve() == installed.user_dir, user_dir
    assert not _inside(user_dir, REPO) and not Path(user_dir).is_symlink()
    assert _inside(criterion_file, user_dir) and _inside(package_file, user_dir)
    assert not _inside(fairseq_file, installed.env_dir), "fairseq comes from the reused site-packages"


def test_train_and_generate_from_another_directory(installed, toy_data_bin, tmp_path):
    """README's "Use it" line, from /tmp: fairseq-train with --criterion pskd for 2 epochs (the
    second trains against the first's stored priors), then fairseq-generate on its checkpoint,
    both with `--user-dir "$(python -m fairseq_pskd --user-dir)"`."""
    t0 = time.time()
    train = installed.run(
        f'fairseq-train "$DATA" --user-dir {USER_DIR_LINE} --criterion pskd --pskd-alpha 0.8 '
        f'--pskd-topk 4 --label-smoothing 0.1 --max-epoch 2 --save-dir ckpt {shlex.join(TINY_ARCH + TINY_TRAIN)}',
        cwd=tmp_path, DATA=toy_data_bin)
    assert train.returncode == 0, train.stdout[-6000:]
    log = train.stdout
    assert _user_dir_in(log) == installed.user_dir, "fairseq was not given the installed copy"
    assert "PS-KD: a_T=0.8, k=4" in log
    assert_two_pskd_epochs(log, tmp_path / "ckpt")

    gen = generate_all(installed, toy_data_bin, tmp_path)
    assert re.search(r"Generate test with beam=2: BLEU4 = [\d.]+", gen.stdout), gen.stdout[-2000:]
    print(f"\nfairseq-train (2 epochs) + fairseq-generate: {time.time() - t0:.1f}s")


def test_hydra_train_with_the_example_config(installed, toy_data_bin, tmp_path):
    """examples/hydra/pskd.yaml, as its comment says to run it, with the plugin named by
    `common.user_dir="$(python -m fairseq_pskd --user-dir)"` and the tiny model of the other
    tests as overrides: 2 epochs of PS-KD, the second against the first's priors."""
    t0 = time.time()
    tiny = ["common.cpu=true", "common.log_interval=1", "common.no_progress_bar=true",
            "dataset.max_tokens=400", "dataset.num_workers=0", "optimization.max_epoch=2",
            "criterion.pskd_topk=4", "checkpoint.save_dir=ckpt",
            *(f"model.{side}.{key}={value}" for side in ("encoder", "decoder")
              for key, value in (("layers", 1), ("embed_dim", 32), ("ffn_embed_dim", 64), ("attention_heads", 2)))]
    proc = installed.run(
        'fairseq-hydra-train --config-dir "$CONFIG_DIR" --config-name pskd task.data="$DATA" '
        f'common.user_dir={USER_DIR_LINE} {shlex.join(tiny)}',
        cwd=tmp_path, DATA=toy_data_bin, CONFIG_DIR=HYDRA_CONFIG_DIR)
    assert proc.returncode == 0, proc.stdout[-6000:]
    log = proc.stdout
    assert _user_dir_in(log) == installed.user_dir
    assert "criterion: PSKDCriterion" in log
    # the example's criterion fields reach the criterion, with the II fields resolved
    assert "PS-KD: a_T=0.8, k=4, remainder=current, schedule: a_t = a_T * epoch / 2 (--max-epoch), " \
           "store: ckpt/pskd_store" in log, log[-4000:]
    # the plugin's log reader (fairseq_pskd.plots) reads hydra's "[time][train][INFO] - epoch 002 | ..."
    assert_two_pskd_epochs(log, tmp_path / "ckpt")

    # its checkpoint decodes as fairseq-train's do (examples/hydra/pskd.yaml's comment)
    generate_all(installed, toy_data_bin, tmp_path)
    print(f"\nfairseq-hydra-train (2 epochs) + fairseq-generate: {time.time() - t0:.1f}s")
