"""What the experiment commands share: the user-facing error, running a logged command, and
reading a prepared-data directory and a finished run directory."""
import json
import shlex
import subprocess
import sys
from pathlib import Path

__all__ = ["USER_DIR", "ExperimentError", "log", "run_logged", "fairseq_train_args", "is_fresh",
           "read_manifest", "prepared_dir_of", "finished_run"]

# the fairseq_pskd package directory, for fairseq's --user-dir
USER_DIR = str(Path(__file__).resolve().parent.parent)


class ExperimentError(Exception):
    """A user-facing error: printed as ``error: <message>``, exit status 2."""


def log(msg):
    print(f"[experiment] {msg}", flush=True)


def run_logged(cmd, log_path, env=None, on_line=None):
    """Run a command, teeing its output to log_path (and each line to ``on_line``); raise with
    the log's tail on failure."""
    log(f"$ {' '.join(shlex.quote(str(c)) for c in cmd)}")
    with open(log_path, "a") as out:
        proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=env)
        for line in proc.stdout:
            out.write(line)
            out.flush()
            if on_line is not None:
                on_line(line)
            if "| train |" in line or "| valid |" in line or "error" in line.lower():
                sys.stdout.write("    " + line.split("| INFO | ", 1)[-1])
                sys.stdout.flush()
        proc.wait()
    if proc.returncode != 0:
        with open(log_path) as f:
            tail = "".join(f.readlines()[-25:])
        raise ExperimentError(f"{Path(str(cmd[0])).name} {cmd[1] if len(cmd) > 1 else ''} failed "
                              f"(exit {proc.returncode}); last lines of {log_path}:\n{tail}")


def fairseq_train_args(args):
    """The fairseq-train arguments given after ``--`` (argparse keeps the ``--``)."""
    train_args = list(args.train_args)
    return train_args[1:] if train_args[:1] == ["--"] else train_args


def is_fresh(output: Path, *inputs: Path) -> bool:
    """Whether ``output`` exists and is no older than any of ``inputs``."""
    return output.exists() and all(output.stat().st_mtime >= i.stat().st_mtime for i in inputs)


def read_manifest(prepared: Path):
    manifest = prepared / "prepare.json"
    if not manifest.exists():
        raise ExperimentError(f"{manifest} not found: prepare the data first "
                              "(scripts/prepare-multi30k.sh or scripts/prepare-iwslt15.sh)")
    return json.loads(manifest.read_text())


def prepared_dir_of(results):
    """The prepared-data directory a run trained on (recorded; older runs: from its command)."""
    if results.get("prepared"):
        return Path(results["prepared"])
    cmd = shlex.split(results.get("train_command", ""))
    if "fairseq_cli.train" in cmd and cmd.index("fairseq_cli.train") + 1 < len(cmd):
        return Path(cmd[cmd.index("fairseq_cli.train") + 1]).parent
    raise ExperimentError("the run's results.json names no prepared data directory")


def finished_run(run_arg):
    """(run directory, its results.json, prepared directory, manifest) of a finished run."""
    run_dir = Path(run_arg).resolve()
    results_path = run_dir / "results.json"
    if not results_path.exists():
        raise ExperimentError(f"{results_path} not found: this needs a finished "
                              "`experiment run` directory")
    results = json.loads(results_path.read_text())
    prepared = prepared_dir_of(results)
    manifest = read_manifest(prepared)
    if not Path(results["checkpoint"]).exists():
        raise ExperimentError(f"the run's checkpoint {results['checkpoint']} is gone")
    return run_dir, results, prepared, manifest
