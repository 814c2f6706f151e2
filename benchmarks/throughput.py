"""Training throughput and peak memory: label_smoothed_cross_entropy vs PS-KD, side by side.

    python benchmarks/throughput.py --data-bin DATA_BIN [--topk 1 8 32] [--rounds 3]
        [--steps 40] [--warmup 5] [--fp16] [--cpu] [--threads N] [--inline-topk]
        [--remainder uniform current] [--loss-path auto log_softmax] [--json OUT]

Each measurement is a fresh process that builds the same model (same seed) with fairseq's own
Trainer, runs `--warmup` untimed updates and then `--steps` timed updates on the training set
of DATA_BIN, and reports target words per second and its peak memory over the timed steps
(RSS, which counts the store pages read or written like any mapped file; on GPU also the peak
allocated CUDA memory, and how many host<->GPU synchronisations the criterion's compute_loss
caused, found with torch.cuda.set_sync_debug_mode; on CPU also the wall time of compute_loss
per update, the criterion's own cost, which is less noisy than the whole step's). The
configurations alternate within each round (baseline, pskd k=..., then reversed) so that a
noisy machine slows them alike; each ratio is the median of the per-round ratios.
--inline-topk (CPU) adds, for each k, a run with the top-k on the training thread instead of
the criterion's helper thread. --remainder measures each k with each --pskd-remainder mode
(default: uniform only), --loss-path with each --pskd-loss (default: auto, the one-pass loss
from the logits on this model; log_softmax is the loss from get_normalized_probs). PS-KD is
measured in epoch 2, where it reads priors and writes new ones: before the timed steps every
training sentence gets an epoch-1 prior (synthetic values written straight into the store), so
every read finds one and does the full gather, transfer and soft-target loss, as in a real run.

Default model: the quickstart's small Transformer (scripts/quickstart.sh).
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
USER_DIR = str(ROOT / "fairseq_pskd")
SMALL_TRANSFORMER = [
    "--arch", "transformer", "--share-all-embeddings", "--encoder-layers", "2", "--decoder-layers", "2",
    "--encoder-embed-dim", "128", "--decoder-embed-dim", "128", "--encoder-ffn-embed-dim", "512",
    "--decoder-ffn-embed-dim", "512", "--encoder-attention-heads", "4", "--decoder-attention-heads", "4",
    "--dropout", "0.3", "--optimizer", "adam", "--adam-betas", "(0.9,0.98)", "--lr", "1e-3",
    "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "400", "--max-tokens", "4096",
    "--label-smoothing", "0.1", "--seed", "1", "--max-epoch", "10", "--num-workers", "0",
]


def worker(args):
    """Build model + trainer in this process, time train steps, print one JSON line."""
    import torch
    from fairseq import options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq.trainer import Trainer

    import fairseq_pskd  # noqa: F401

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as save_dir:
        k = abs(args.topk)  # negative: the same k with the top-k on the training thread (CPU)
        crit = (["--criterion", "label_smoothed_cross_entropy"] if k == 0 else
                ["--criterion", "pskd", "--pskd-alpha", "0.8", "--pskd-topk", str(k),
                 "--pskd-remainder", args.remainder_one, "--pskd-loss", args.loss_path_one])
        device = ["--fp16"] if args.fp16 else (["--cpu"] if args.cpu else [])
        parser = options.get_training_parser()
        targs = options.parse_args_and_arch(parser, [
            args.data_bin, "--user-dir", USER_DIR, "--save-dir", save_dir, *SMALL_TRANSFORMER,
            *crit, *device, *args.extra])
        cfg = convert_namespace_to_omegaconf(targs)
        torch.manual_seed(1)
        task = tasks.setup_task(cfg.task)
        task.load_dataset("train")
        model = task.build_model(cfg.model)
        criterion = task.build_criterion(cfg.criterion)
        trainer = Trainer(cfg, task, model, criterion)
        itr = trainer.get_train_iterator(epoch=2, load_dataset=False).next_epoch_itr(shuffle=True)
        if args.topk < 0:
            criterion.priors.topk_on_helper = False
        if args.topk:
            trainer.begin_epoch(1)  # opens the store
            fill_priors(criterion.store, epoch=1)
        trainer.begin_epoch(2)  # PS-KD reads epoch-1 priors and writes epoch-2 ones
        batches = iter(itr)
        cuda = torch.cuda.is_available() and not args.cpu

        def step():
            sample = next(batches)
            trainer.train_step([sample])
            return int(sample["ntokens"]) if "ntokens" in sample else 0

        for _ in range(args.warmup):
            step()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        rss_scope = "timed steps" if reset_peak_rss() else "whole process"
        syncs = count_syncs(criterion) if cuda else None
        loss_time = time_loss(criterion) if not cuda else None
        tokens, t0 = 0, time.perf_counter()
        for _ in range(args.steps):
            tokens += step()
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        if hasattr(criterion, "close"):
            criterion.close()  # drains the writes, inside the temporary save dir
        from fairseq.logging import metrics

        # share of timed target tokens trained against a prior (must be ~1 for PS-KD)
        coverage = metrics.get_smoothed_values("default").get("pskd_coverage")
        out = {"topk": args.topk, "tokens": tokens, "seconds": seconds, "wps": tokens / seconds,
               "pskd_coverage": coverage,
               # CPU: wall time of compute_loss (loss + PS-KD's read/top-k/write) per update
               "loss_ms_per_step": loss_time[0] * 1000 / args.steps if loss_time else None,
               "peak_rss_mb": peak_rss_mb(), "peak_rss_scope": rss_scope}
        if cuda:
            out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
            out["criterion_syncs"] = len(syncs)
            out["criterion_sync_example"] = syncs[0] if syncs else None
        print("RESULT " + json.dumps(out), flush=True)


def time_loss(criterion):
    """Accumulate the wall time of ``criterion.compute_loss`` (CPU only: on a GPU it would
    time the kernel launches). Returns the one-element list it adds to."""
    total = [0.0]
    real = criterion.compute_loss

    def compute_loss(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            total[0] += time.perf_counter() - t0

    criterion.compute_loss = compute_loss
    return total


def count_syncs(criterion):
    """Make ``criterion.compute_loss`` record every host<->GPU synchronisation it causes
    (torch.cuda.set_sync_debug_mode("warn") while it runs); returns the list they go into."""
    import warnings

    import torch

    found = []
    real = criterion.compute_loss

    def compute_loss(*args, **kwargs):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                return real(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")
                found.extend(str(w.message).splitlines()[0] for w in caught
                             if "synchroniz" in str(w.message).lower())

    criterion.compute_loss = compute_loss
    return found


def reset_peak_rss():
    """Reset the kernel's peak-RSS mark (Linux: 5 > /proc/self/clear_refs), so that the peak
    covers the timed steps only, not model building or the synthetic priors; False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb():
    """VmHWM (peak resident set, MiB, since the last reset), else ru_maxrss (whole process)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def fill_priors(store, epoch, chunk=2048):
    """Give every sentence of the store a prior for ``epoch`` (valid, arbitrary values)."""
    import numpy as np
    import torch

    rng = np.random.default_rng(0)
    lengths = np.asarray(store.lengths, dtype=np.int64)
    k = store.topk
    probs = np.full(k, 0.9 / k, dtype=np.float32)
    for start in range(0, lengths.size, chunk):
        ids = np.arange(start, min(start + chunk, lengths.size))
        width = int(lengths[ids].max())
        idx = rng.integers(0, store.vocab_size, size=(ids.size, width, k), dtype=np.int64)
        store.write(epoch, torch.from_numpy(ids), torch.from_numpy(lengths[ids]), torch.from_numpy(idx),
                    torch.from_numpy(np.broadcast_to(probs, idx.shape).copy()))
    store.flush()


def config_name(config):
    k, remainder, path = config
    if k == 0:
        return "baseline"
    name = f"pskd k={abs(k)}" + ("" if remainder == "uniform" else f" {remainder}")
    return name + ("" if path == "auto" else f" {path}") + (" inline" if k < 0 else "")


def config_key(config):
    """JSON key of a configuration: k (uniform remainder, --pskd-loss auto), k/remainder[/path]."""
    k, remainder, path = config
    if k == 0:
        return "0"
    return "/".join([str(k)] + ([remainder] if remainder != "uniform" or path != "auto" else [])
                    + ([path] if path != "auto" else []))


def measure(args, config):
    topk, remainder, path = config
    cmd = [sys.executable, __file__, "--_worker", "--data-bin", args.data_bin, "--topk-one", str(topk),
           "--remainder-one", remainder, "--loss-path-one", path,
           "--steps", str(args.steps), "--warmup", str(args.warmup)]
    cmd += ["--fp16"] if args.fp16 else []
    cmd += ["--cpu"] if args.cpu else []
    cmd += ["--threads", str(args.threads)] if args.threads else []
    cmd += ["--", *args.extra] if args.extra else []
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=dict(os.environ, PYTHONUNBUFFERED="1"))
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise SystemExit(f"benchmark worker failed ({proc.returncode}):\n{proc.stdout[-4000:]}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-bin", required=True, help="fairseq data-bin (e.g. the quickstart's Multi30k)")
    p.add_argument("--topk", type=int, nargs="+", default=[1, 8, 32], help="PS-KD k values")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=40, help="timed updates per measurement")
    p.add_argument("--warmup", type=int, default=5, help="untimed updates first")
    p.add_argument("--fp16", action="store_true", help="GPU with --fp16")
    p.add_argument("--cpu", action="store_true", help="force the CPU")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    p.add_argument("--json", help="write all measurements and ratios here")
    p.add_argument("--remainder", nargs="+", default=["uniform"],
                   choices=["uniform", "current", "renormalize"],
                   help="--pskd-remainder modes to measure for each k (default: uniform, the "
                        "cheapest; the criterion's default is current)")
    p.add_argument("--loss-path", nargs="+", default=["auto"], choices=["auto", "logits", "log_softmax"],
                   help="--pskd-loss values to measure for each k and remainder (default: auto)")
    p.add_argument("--inline-topk", action="store_true",
                   help="CPU: also measure each k with the top-k on the training thread instead of "
                        "the criterion's helper thread (what the helper saves)")
    p.add_argument("--_worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--topk-one", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--remainder-one", default="uniform", help=argparse.SUPPRESS)
    p.add_argument("--loss-path-one", default="auto", help=argparse.SUPPRESS)
    p.add_argument("extra", nargs="*", help="-- then extra fairseq-train arguments")
    args = p.parse_args()
    if args._worker:
        args.topk = args.topk_one
        return worker(args)

    # (k, remainder, --pskd-loss); k = 0: baseline; -k: k with the CPU top-k on the training
    # thread (--inline-topk)
    configs = [(0, "uniform", "auto"),
               *[(k, rem, path) for k in args.topk for rem in args.remainder for path in args.loss_path],
               *([(-k, args.remainder[0], args.loss_path[0]) for k in args.topk] if args.inline_topk else [])]
    base = configs[0]
    runs = {c: [] for c in configs}
    for r in range(args.rounds):
        order = configs if r % 2 == 0 else configs[::-1]  # alternate the order too
        for c in order:
            res = measure(args, c)
            name = config_name(c)
            if c != base and not (res.get("pskd_coverage") or 0) >= 0.99:
                raise SystemExit(f"{name}: only {res.get('pskd_coverage')} of the timed tokens "
                                 "had a prior; the measurement would miss the read path")
            runs[c].append(res)
            print(f"round {r + 1}/{args.rounds} {name:<24} {res['wps']:8.0f} wps  "
                  f"peak RSS {res['peak_rss_mb']:.0f} MB"
                  + (f"  peak CUDA {res['peak_cuda_mb']:.0f} MB, {res['criterion_syncs']} syncs in "
                     f"the loss ({res['criterion_sync_example'] or '-'})" if "peak_cuda_mb" in res else "")
                  + (f"  loss {res['loss_ms_per_step']:.0f} ms/update" if res.get("loss_ms_per_step") else "")
                  + (f"  prior coverage {res['pskd_coverage']:.3f}" if c != base else ""),
                  flush=True)

    def med(c, key):
        return statistics.median(x[key] for x in runs[c])

    def ratio(c, key):  # per round (configurations measured next to each other), then the median
        return statistics.median(a[key] / b[key] for a, b in zip(runs[c], runs[base]))

    summary = []
    for c in configs:
        row = {"config": config_name(c), "topk": c[0], "remainder": c[1] if c != base else None,
               "loss_path": c[2] if c != base else None,
               "wps": med(c, "wps"), "peak_rss_mb": med(c, "peak_rss_mb")}
        if c != base:
            row["ratio_wps"] = ratio(c, "wps")
            row["ratio_rss"] = ratio(c, "peak_rss_mb")
        if runs[c][0].get("loss_ms_per_step"):
            row["loss_ms_per_step"] = med(c, "loss_ms_per_step")
            if c != base:
                row["ratio_loss"] = ratio(c, "loss_ms_per_step")
        if "peak_cuda_mb" in runs[c][0]:
            row["peak_cuda_mb"] = med(c, "peak_cuda_mb")
            if c != base:
                row["ratio_cuda_mem"] = ratio(c, "peak_cuda_mb")
        summary.append(row)
    print()
    print(f"{'config':<24} {'wps':>8} {'ratio X':>8} {'peak RSS MB':>12} {'RSS ratio':>10}"
          + (f" {'loss ms/upd':>12} {'loss ratio':>10}" if "loss_ms_per_step" in summary[0] else ""))
    for row in summary:
        print(f"{row['config']:<24} {row['wps']:8.0f} {row.get('ratio_wps', 1.0):8.3f} "
              f"{row['peak_rss_mb']:12.0f} {row.get('ratio_rss', 1.0):10.3f}"
              + (f" {row['loss_ms_per_step']:12.0f} {row.get('ratio_loss', 1.0):10.3f}"
                 if "loss_ms_per_step" in row else "")
              + (f"  peak CUDA {row['peak_cuda_mb']:.0f} MB (ratio {row.get('ratio_cuda_mem', 1.0):.3f})"
                 if "peak_cuda_mb" in row else ""))
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": {config_key(c): v for c, v in runs.items()},
                                               "summary": summary, "args": vars(args)}, indent=2))


if __name__ == "__main__":
    main()
