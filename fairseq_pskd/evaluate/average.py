"""The ``average`` command: average the parameters of the last N epoch (or update)
checkpoints (fairseq's scripts/average_checkpoints.py is not in the wheel)."""
import os
import re
from pathlib import Path

from .common import EvaluationError

__all__ = ["last_n_checkpoints", "average_checkpoints", "cmd_average"]


def last_n_checkpoints(directory, n, update_based=False, upper_bound=None):
    """Paths of the newest ``n`` ``checkpoint<epoch>.pt`` (or ``checkpoint_<epoch>_<update>.pt``)
    files in ``directory``, newest first, optionally only those with epoch/update <= upper_bound."""
    pattern = re.compile(r"checkpoint_\d+_(\d+)\.pt" if update_based else r"checkpoint(\d+)\.pt")
    entries = []
    for name in os.listdir(directory):
        m = pattern.fullmatch(name)
        if m and (upper_bound is None or int(m.group(1)) <= upper_bound):
            entries.append((int(m.group(1)), name))
    if len(entries) < n:
        kind = "update" if update_based else "epoch"
        raise EvaluationError(f"found {len(entries)} {kind} checkpoints in {directory}, need {n}")
    return [os.path.join(directory, name) for _, name in sorted(entries, reverse=True)[:n]]


def average_checkpoints(paths):
    """Average the ``model`` parameters of ``paths``; everything else (cfg, extra_state,
    optimizer history) comes from ``paths[0]`` (the newest, as fairseq's script does).

    Floating-point tensors are summed in at least float32 and cast back to the first
    checkpoint's dtype, so fp16 checkpoints do not lose precision while summing; integer
    buffers are floor-divided as in fairseq.
    """
    import torch

    if not paths:
        raise EvaluationError("no checkpoints to average")
    new_state, sums, dtypes, keys = None, {}, {}, None
    for path in paths:
        if not os.path.isfile(path):
            raise EvaluationError(f"checkpoint not found: {path}")
        state = torch.load(path, map_location="cpu")
        if "model" not in state:
            raise EvaluationError(f"{path} has no 'model' entry; not a fairseq checkpoint")
        params = state["model"]
        if keys is None:
            new_state, keys = state, list(params.keys())
        elif list(params.keys()) != keys:
            raise EvaluationError(f"{path} has different parameters than {paths[0]}")
        for k in keys:
            p = params[k]
            if k not in sums:
                dtypes[k] = p.dtype
                # clone: shared parameters (tied embeddings) must not be summed in place twice
                sums[k] = p.to(torch.promote_types(p.dtype, torch.float32)).clone() \
                    if p.is_floating_point() else p.clone()
            else:
                sums[k] += p.to(sums[k].dtype)
    averaged = {}
    for k in keys:
        v = sums[k]
        if v.is_floating_point():
            averaged[k] = (v / len(paths)).to(dtypes[k])
        else:
            averaged[k] = v // len(paths)
    from collections import OrderedDict
    new_state["model"] = OrderedDict(averaged)
    return new_state


def cmd_average(args):
    import torch

    if args.num_epoch_checkpoints is not None and args.num_update_checkpoints is not None:
        raise EvaluationError("use --num-epoch-checkpoints or --num-update-checkpoints, not both")
    n = args.num_epoch_checkpoints or args.num_update_checkpoints
    if n is not None:
        if n < 1:
            raise EvaluationError("the number of checkpoints must be >= 1")
        if len(args.inputs) != 1 or not os.path.isdir(args.inputs[0]):
            raise EvaluationError("with --num-*-checkpoints, --inputs must be one checkpoint directory")
        paths = last_n_checkpoints(args.inputs[0], n, update_based=args.num_update_checkpoints is not None,
                                   upper_bound=args.checkpoint_upper_bound)
    else:
        paths = list(args.inputs)
        if any(os.path.isdir(p) for p in paths):
            raise EvaluationError("--inputs is a directory: also pass --num-epoch-checkpoints N")
    print("averaging:\n  " + "\n  ".join(paths))
    state = average_checkpoints(paths)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{args.output}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, args.output)  # never leave a half-written checkpoint behind
    print(f"wrote {args.output}")
    return paths
