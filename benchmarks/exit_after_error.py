"""How fairseq-train exits when an error ends training: exit status 1, or SIGABRT (status 134,
"terminate called without an active exception") at interpreter exit after the error is printed.

    python benchmarks/exit_after_error.py --data-bin DATA_BIN [--runs 12] [--criterion ...]

Trains one epoch, then resumes it --runs times with an error injected into the first training
forward pass, in three variants side by side, and prints how often each exit status came back:
stock fairseq (the plugin's exit-time stop of the data-buffer threads unregistered), with the
plugin as it is, and stock fairseq with --data-buffer-size 0. The abort comes from fairseq's
data-buffer thread, a daemon thread that collates the next batches in C++, killed at exit in
the middle of that work (fairseq_pskd/compat.py). docs/STORE.md quotes the figures.
"""
import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile

USER_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fairseq_pskd")
MODEL = ["--arch", "transformer", "--encoder-layers", "1", "--decoder-layers", "1",
         "--encoder-embed-dim", "32", "--decoder-embed-dim", "32", "--encoder-ffn-embed-dim", "64",
         "--decoder-ffn-embed-dim", "64", "--encoder-attention-heads", "2",
         "--decoder-attention-heads", "2", "--share-all-embeddings", "--optimizer", "adam",
         "--lr", "1e-3", "--max-tokens", "400", "--cpu", "--seed", "1", "--num-workers", "0",
         "--no-progress-bar", "--label-smoothing", "0.1"]
# fairseq-train whose criterion raises in its first training forward pass
INJECT = """
import atexit, sys
from fairseq_cli.train import cli_main
if "--stock" in sys.argv:  # without the plugin's exit-time stop of the data-buffer threads
    sys.argv.remove("--stock")
    import fairseq_pskd.compat
    atexit.unregister(fairseq_pskd.compat._stop_data_buffers)
from fairseq.criterions import FairseqCriterion
import fairseq.criterions.label_smoothed_cross_entropy as ls
forward = ls.LabelSmoothedCrossEntropyCriterion.forward
def failing(self, model, sample, reduce=True):
    if model.training:
        raise RuntimeError("injected failure in the first training step")
    return forward(self, model, sample, reduce)
ls.LabelSmoothedCrossEntropyCriterion.forward = failing  # pskd inherits it
sys.argv[0] = "fairseq-train"
cli_main()
"""


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-bin", required=True)
    p.add_argument("--runs", type=int, default=12)
    p.add_argument("--criterion", default="label_smoothed_cross_entropy",
                   help="label_smoothed_cross_entropy (default) or pskd")
    args = p.parse_args()
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    with tempfile.TemporaryDirectory() as tmp:
        first = os.path.join(tmp, "epoch1")

        def train(save, max_epoch, extra=(), inject=False):
            cmd = [sys.executable, *(["-c", INJECT] if inject else ["-m", "fairseq_cli.train"]),
                   args.data_bin, "--user-dir", USER_DIR, *MODEL, "--criterion", args.criterion,
                   "--max-epoch", str(max_epoch), "--save-dir", save, *extra]
            return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, env=env)

        proc = train(first, 1)
        if proc.returncode != 0:
            sys.exit(f"the first epoch failed:\n{proc.stdout[-3000:]}")
        variants = {"stock fairseq": ("--stock",), "with the plugin": (),
                    "stock, --data-buffer-size 0": ("--stock", "--data-buffer-size", "0")}
        counts = {name: collections.Counter() for name in variants}
        for _ in range(args.runs):
            for name, extra in variants.items():
                save = os.path.join(tmp, "resumed")
                shutil.rmtree(save, ignore_errors=True)
                shutil.copytree(first, save)
                proc = train(save, 2, extra, inject=True)
                if "injected failure" not in proc.stdout:
                    sys.exit(f"the injected error did not show:\n{proc.stdout[-3000:]}")
                status = 128 - proc.returncode if proc.returncode < 0 else proc.returncode
                counts[name][status] += 1
    print(f"{args.criterion}, {args.runs} resumed runs each, error in the first training step")
    for name, c in counts.items():
        print(f"  {name:28s} " + ", ".join(f"exit {s}: {n}" for s, n in sorted(c.items())))


if __name__ == "__main__":
    main()
