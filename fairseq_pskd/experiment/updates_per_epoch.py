"""``updates-per-epoch``: how many optimizer updates an epoch of ``run`` makes, to derive a
learning-rate schedule from the data's size (schedule.py)."""
from pathlib import Path

from .common import USER_DIR, fairseq_train_args, read_manifest

__all__ = ["updates_per_epoch"]


def updates_per_epoch(args):
    """Print how many updates an epoch of ``run --prepared DATA -- ARGS`` makes (schedule.py)."""
    from ..schedule import updates_per_epoch as count

    prepared = Path(args.prepared).resolve()
    manifest = read_manifest(prepared)
    train_args = fairseq_train_args(args)
    argv = [prepared / manifest.get("data_bin", "data-bin"), "--user-dir", USER_DIR,
            "--source-lang", manifest["src"], "--target-lang", manifest["tgt"], *train_args]
    print(count(argv))
    return 0
