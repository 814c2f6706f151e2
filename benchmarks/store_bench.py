"""Throughput and memory benchmark of the PS-KD top-k store (fairseq_pskd/store/).

For each k it builds a synthetic store (random sentence lengths, mean ~30 tokens) in a
temporary directory, then times, on random batches of ~--batch-tokens target tokens taken
in shuffled order like a training epoch:

  create      TopKStore.create (preallocation of every file)
  write       epoch 1: write() of int32/float16 (B, T, k) CPU tensors (what the criterion
              passes) until the background writer has applied them all (page cache)
  msync       flush(): forcing the dirty pages to disk, timed separately (random-order
              writes dirty whole 4 KiB pages, so this is disk-bound and amplified)
  read        epoch 2: read() of batches written in epoch 1 (page-cache hot)
  read+write  epoch 2: read() then write() per batch, like the criterion, then msync
  latency     write() call time when the writer keeps up (what a training step pays)

and reports tokens/s and memory: ru_maxrss (peak), VmRSS (current), RssAnon (heap: what
must stay flat) and RssFile (memory-mapped store pages in the page cache: reclaimable,
grows with the pages touched). Finally it runs the same read+write loop in two fresh child
processes on a small and a large store and prints the RssAnon ratio, to show that memory
does not grow with the number of stored tokens.

    python benchmarks/store_bench.py                       # 50 M tokens, k = 4,8,16
    python benchmarks/store_bench.py --tokens 2000000 --seconds 2 --rss-sizes 1000000,2000000

Needs free disk: 2 * tokens * k * 4 bytes for the largest k (6.4 GB at the defaults);
stores are deleted after use.
"""
import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from fairseq_pskd.store import TopKStore  # noqa: E402


def mem() -> dict:
    """Memory of this process in MiB (Linux)."""
    out = {"ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key = line.split(":")[0]
                if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                    out[key] = int(line.split()[1]) / 1024
    except OSError:
        pass
    return out


def trim_heap() -> None:
    """Return freed heap memory to the OS (glibc), for a clean RssAnon baseline."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def synthetic_lengths(tokens: int, seed: int = 0) -> np.ndarray:
    """Sentence lengths (incl. eos) summing to exactly ``tokens``, mean ~30, in [2, 200]."""
    rng = np.random.default_rng(seed)
    n = int(tokens / 30 * 1.1) + 16
    lengths = np.clip(rng.gamma(4.0, 7.5, size=n).astype(np.int64) + 1, 2, 200)
    csum = np.cumsum(lengths)
    n = int(np.searchsorted(csum, tokens)) + 1
    lengths = lengths[:n]
    lengths[-1] -= int(lengths.sum()) - tokens
    if lengths[-1] < 1:  # pragma: no cover - only for tiny --tokens
        lengths = lengths[:-1]
        lengths[-1] += tokens - int(lengths.sum())
    return lengths.astype(np.int32)


def make_batches(lengths: np.ndarray, batch_tokens: int, seed: int):
    """Shuffled epoch cut into batches of about ``batch_tokens`` target tokens (ids arrays)."""
    perm = np.random.default_rng(seed).permutation(len(lengths))
    csum = np.cumsum(lengths[perm], dtype=np.int64)
    cuts = np.searchsorted(csum, np.arange(batch_tokens, csum[-1], batch_tokens))
    return np.split(perm, cuts + 1)


class Payload:
    """Random top-k tensors, pre-generated so the loop times the store, not the RNG."""

    def __init__(self, k: int, vocab: int, max_b: int, max_t: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.idx = torch.randint(0, vocab, (max_b, max_t, k), generator=g, dtype=torch.int32)
        self.p = torch.rand(max_b, max_t, k, generator=g).to(torch.float16)

    def get(self, b: int, t: int):
        # contiguous, like the criterion's topk output
        return self.idx[:b, :t].contiguous(), self.p[:b, :t].contiguous()


def run_loop(store, batches, lengths, payload, epoch, do_read, do_write, seconds, max_batches=None):
    """Read and/or write batches for ``seconds`` (or ``max_batches``), then wait for the writer.

    Returns tokens, elapsed seconds (page-cache throughput: the writer thread has applied
    every write, nothing is forced to disk yet), batches done and per-batch call times.
    """
    tokens = 0
    calls = []
    elapsed = 0.0
    for ids in batches:
        lens = lengths[ids]
        # Tensors are prepared outside the timed region (in training they already exist).
        ids_t, lens_t = torch.from_numpy(ids), torch.from_numpy(lens.astype(np.int64))
        if do_write:
            idx, p = payload.get(len(ids), int(lens.max()))
        t = time.perf_counter()
        if do_read:
            store.read(epoch, ids_t, lens_t)
        if do_write:
            store.write(epoch, ids_t, lens_t, idx, p)
        dt = time.perf_counter() - t
        calls.append(dt)
        elapsed += dt
        tokens += int(lens.sum())
        if (max_batches is not None and len(calls) >= max_batches) or (max_batches is None and elapsed >= seconds):
            break
    if do_write:
        t = time.perf_counter()
        store.flush(sync=False)  # the writer thread's backlog counts, the disk does not
        elapsed += time.perf_counter() - t
    return tokens, elapsed, len(calls), np.array(calls)


def timed_msync(store):
    """Seconds to force the dirty pages to disk, and the system-wide dirty MiB before."""
    d = meminfo("Dirty")
    t = time.perf_counter()
    store.flush()
    return time.perf_counter() - t, d


def meminfo(key):
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def pct(a, q):
    return float(np.percentile(a, q) * 1e3) if len(a) else float("nan")


def bench_k(args, k: int, lengths: np.ndarray, base_dir: str) -> dict:
    path = os.path.join(base_dir, f"store_k{k}")
    res = {"k": k}
    t0 = time.perf_counter()
    t = time.perf_counter()
    store = TopKStore.create(path, lengths, k, args.vocab_size)
    res["create_s"] = time.perf_counter() - t
    res["disk_bytes"] = store.summary()["disk_bytes"]
    batches = make_batches(lengths, args.batch_tokens, seed=k)
    max_b = max(len(b) for b in batches)
    payload = Payload(k, args.vocab_size, max_b, int(lengths.max()), seed=k)

    # epoch 1: write only (first touch of the preallocated buffer 1)
    tok, el, nb, _ = run_loop(store, batches, lengths, payload, 1, False, True, args.seconds)
    res.update(write_tok_s=tok / el, write_tokens=tok)
    res["write_msync_s"], res["write_dirty_mib"] = timed_msync(store)
    written = batches[:nb]
    t = time.perf_counter()
    store.end_epoch(1)
    res["end_epoch_s"] = time.perf_counter() - t

    # epoch 2: read the priors of epoch 1, then read + write like the criterion
    order = [written[i] for i in np.random.default_rng(1).permutation(len(written))]
    tok, el, nb, calls = run_loop(store, order, lengths, payload, 2, True, False, args.seconds)
    res.update(read_tok_s=tok / el, read_call_ms_p50=pct(calls, 50), read_call_ms_p99=pct(calls, 99))
    tok, el, nb, _ = run_loop(store, order, lengths, payload, 2, True, True, args.seconds)
    res.update(rw_tok_s=tok / el)
    res["rw_msync_s"], res["rw_dirty_mib"] = timed_msync(store)

    # what a training step pays for write() when the writer keeps up (the normal case:
    # training produces far fewer tokens/s than the writer applies)
    calls = []
    for ids in order[: args.latency_batches]:
        lens = lengths[ids]
        ids_t, lens_t = torch.from_numpy(ids), torch.from_numpy(lens.astype(np.int64))
        idx, p = payload.get(len(ids), int(lens.max()))
        t = time.perf_counter()
        store.write(3, ids_t, lens_t, idx, p)
        calls.append(time.perf_counter() - t)
        store.flush(sync=False)
    res.update(write_call_ms_p50=pct(calls, 50), write_call_ms_p99=pct(calls, 99))
    res["mem"] = mem()
    t = time.perf_counter()
    store.close()
    shutil.rmtree(path)
    res["cleanup_s"] = time.perf_counter() - t
    res["wall_s"] = time.perf_counter() - t0
    return res


def rss_child(args) -> None:
    """--_rss-child: one store of --tokens tokens, fixed work; prints memory as JSON."""
    lengths = synthetic_lengths(args.tokens, seed=3)
    batches = make_batches(lengths, args.batch_tokens, seed=3)
    payload = Payload(args.rss_topk, args.vocab_size, max(len(b) for b in batches), int(lengths.max()))
    trim_heap()  # so that "before" does not include freed heap the store would silently reuse
    before = mem()
    path = os.path.join(args.dir, "rss_store")
    store = TopKStore.create(path, lengths, args.rss_topk, args.vocab_size)
    after_create = mem()
    n = args.rss_batches
    run_loop(store, batches, lengths, payload, 1, False, True, 0, max_batches=n)
    store.end_epoch(1)
    run_loop(store, batches[:n], lengths, payload, 2, True, True, 0, max_batches=n)
    after = mem()
    store.close()
    shutil.rmtree(path)
    print(json.dumps({"tokens": args.tokens, "sentences": int(len(lengths)), "before": before,
                      "offsets_mib": 8 * len(lengths) / 2**20,
                      "after_create": after_create, "after": after}))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", help="where to create the stores (default: a new temp dir under $TMPDIR)")
    ap.add_argument("--tokens", type=int, default=50_000_000, help="target tokens in the synthetic training set")
    ap.add_argument("--topk", default="4,8,16", help="comma-separated k values")
    ap.add_argument("--batch-tokens", type=int, default=4096, help="target tokens per batch (fairseq --max-tokens)")
    ap.add_argument("--vocab-size", type=int, default=40000, help="vocabulary size (<= 65536: uint16 indices)")
    ap.add_argument("--seconds", type=float, default=6.0, help="duration of each timed phase")
    ap.add_argument("--latency-batches", type=int, default=200,
                    help="batches for the write() call latency with an idle writer")
    ap.add_argument("--rss-sizes", default="5000000,50000000",
                    help="two store sizes (tokens) for the RSS comparison; empty to skip")
    ap.add_argument("--rss-topk", type=int, default=8)
    ap.add_argument("--rss-batches", type=int, default=500, help="read+write batches in each RSS child")
    ap.add_argument("--json", help="also write the results to this JSON file")
    ap.add_argument("--_rss-child", dest="rss_child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(1)  # the training process owns the cores; the store must not need them

    own_dir = args.dir is None
    args.dir = tempfile.mkdtemp(prefix="pskd_store_bench_") if own_dir else args.dir
    os.makedirs(args.dir, exist_ok=True)
    try:
        if args.rss_child:
            return rss_child(args)
        ks = [int(x) for x in args.topk.split(",") if x]
        rss_k = [(n, args.rss_topk) for n in (int(x) for x in args.rss_sizes.split(",") if x)]
        need = max(TopKStore.estimate_bytes(n // 30, n, k, args.vocab_size)
                   for n, k in [(args.tokens, k) for k in ks] + rss_k)
        free = shutil.disk_usage(args.dir).free
        print(f"store dir {args.dir}: {free / 2**30:.1f} GiB free, largest store {need / 2**30:.2f} GiB")
        if need > free:
            sys.exit(f"error: not enough disk in {args.dir}; pass --dir elsewhere or fewer --tokens")
        t = time.perf_counter()
        lengths = synthetic_lengths(args.tokens)
        print(f"{len(lengths)} sentences, {int(lengths.sum())} tokens (mean {lengths.mean():.1f}), "
              f"batches of ~{args.batch_tokens} tokens, vocab {args.vocab_size}, {args.seconds:.0f} s per phase "
              f"(lengths generated in {time.perf_counter() - t:.1f} s)")
        print(f"memory at start: {fmt_mem(mem())}")
        results = []
        for k in ks:
            r = bench_k(args, k, lengths, args.dir)
            results.append(r)
            print(f"k={k:>2}: create {r['create_s']:.2f} s ({r['disk_bytes'] / 2**30:.2f} GiB) | "
                  f"write {r['write_tok_s'] / 1e6:.2f} M tok/s (+ msync {r['write_msync_s']:.2f} s, "
                  f"{r['write_dirty_mib']:.0f} MiB dirty) | "
                  f"read {r['read_tok_s'] / 1e6:.2f} M tok/s | read+write {r['rw_tok_s'] / 1e6:.2f} M tok/s "
                  f"(+ msync {r['rw_msync_s']:.2f} s) | write() call p50 {r['write_call_ms_p50']:.2f} ms | "
                  f"{fmt_mem(r['mem'])} | "
                  f"phase wall {r['wall_s']:.0f} s (cleanup {r['cleanup_s']:.1f} s)", flush=True)

        rss = []
        sizes = [int(x) for x in args.rss_sizes.split(",") if x]
        for n in sizes:
            cmd = [sys.executable, os.path.abspath(__file__), "--_rss-child", "--tokens", str(n),
                   "--dir", args.dir, "--rss-topk", str(args.rss_topk), "--rss-batches", str(args.rss_batches),
                   "--batch-tokens", str(args.batch_tokens), "--vocab-size", str(args.vocab_size)]
            t = time.perf_counter()
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rss.append(json.loads(out.strip().splitlines()[-1]))
            rss[-1]["wall_s"] = time.perf_counter() - t
            print(f"RSS child {n:,} tokens: {rss[-1]['wall_s']:.0f} s", flush=True)

        print("\n| k | disk GiB | create s | write Mtok/s | msync after write s | read Mtok/s | read+write Mtok/s "
              "| msync after read+write s "
              "| write() call ms p50/p99 | read() call ms p50/p99 "
              "| ru_maxrss MiB | VmRSS MiB | RssAnon MiB | RssFile MiB |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in results:
            m = r["mem"]
            print(f"| {r['k']} | {r['disk_bytes'] / 2**30:.2f} | {r['create_s']:.2f} | {r['write_tok_s'] / 1e6:.2f} | "
                  f"{r['write_msync_s']:.2f} | "
                  f"{r['read_tok_s'] / 1e6:.2f} | {r['rw_tok_s'] / 1e6:.2f} | {r['rw_msync_s']:.2f} | "
                  f"{r['write_call_ms_p50']:.2f} / {r['write_call_ms_p99']:.2f} | "
                  f"{r['read_call_ms_p50']:.2f} / {r['read_call_ms_p99']:.2f} | "
                  f"{m['ru_maxrss']:.0f} | {m.get('VmRSS', 0):.0f} | {m.get('RssAnon', 0):.0f} | "
                  f"{m.get('RssFile', 0):.0f} |")
        if len(rss) == 2:
            a, b = rss
            print(f"\nRSS vs store size (k={args.rss_topk}, {args.rss_batches} write + {args.rss_batches} "
                  f"read+write batches, fresh process each):")
            print("| store tokens | sentences | RssAnon before MiB | RssAnon after MiB "
                  "| store RssAnon MiB (after - before) | of which offsets MiB | RssFile after MiB | VmHWM MiB |")
            print("|---|---|---|---|---|---|---|---|")
            for x in rss:
                print(f"| {x['tokens']:,} | {x['sentences']:,} | {x['before']['RssAnon']:.0f} | "
                      f"{x['after']['RssAnon']:.0f} | "
                      f"{x['after']['RssAnon'] - x['before']['RssAnon']:.1f} | {x['offsets_mib']:.1f} | "
                      f"{x['after']['RssFile']:.0f} | {x['after']['VmHWM']:.0f} |")
            print(f"RssAnon after, ratio large/small store: {b['after']['RssAnon'] / a['after']['RssAnon']:.3f} "
                  f"(store tokens ratio {b['tokens'] / a['tokens']:.0f}x); store part (after - before): "
                  f"{a['after']['RssAnon'] - a['before']['RssAnon']:.1f} vs "
                  f"{b['after']['RssAnon'] - b['before']['RssAnon']:.1f} MiB")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"args": vars(args), "results": results, "rss": rss}, f, indent=2)
    finally:
        if own_dir:
            shutil.rmtree(args.dir, ignore_errors=True)


def fmt_mem(m: dict) -> str:
    return (f"maxrss {m['ru_maxrss']:.0f} MiB, VmRSS {m.get('VmRSS', 0):.0f}, "
            f"RssAnon {m.get('RssAnon', 0):.0f}, RssFile {m.get('RssFile', 0):.0f} MiB")


if __name__ == "__main__":
    main()
