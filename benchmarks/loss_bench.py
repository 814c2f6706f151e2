"""The loss alone, forward and backward, side by side: fairseq's label_smoothed_nll_loss of
log_softmax(z) against PS-KD's loss on the log_softmax path (loss.pskd_loss) and from the logits
in one pass (loss.pskd_loss_from_logits), each remainder and without priors (epoch 1).

    python benchmarks/loss_bench.py [--tokens 3400] [--vocab 7784] [--topk 8] [--rounds 5]
        [--dtype float32|float16|bfloat16] [--device cpu|cuda] [--threads 1] [--block-elements N]

Defaults: one batch of the quickstart's model (about 3,400 target tokens of --max-tokens 4096,
Multi30k's 7,784-word joint vocabulary). Each configuration runs twice untimed, then --rounds
times; the configurations alternate within a round and each ratio against label smoothing is
the median of the per-round ratios. On CUDA every timing ends with a synchronize.
"""
import argparse
import statistics
import sys
import time

import torch


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=3400)
    ap.add_argument("--vocab", type=int, default=7784)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch threads on CPU (0: torch's default)")
    ap.add_argument("--block-elements", type=int, default=0,
                    help="rows per block of the one-pass loss, in elements (default: the loss's own)")
    args = ap.parse_args(argv)

    import fairseq  # noqa: F401  (registers the plugin's criterion through its import hook)
    from fairseq.criterions.label_smoothed_cross_entropy import label_smoothed_nll_loss

    from fairseq_pskd import loss as loss_module
    from fairseq_pskd.loss import pskd_loss, pskd_loss_from_logits

    if args.block_elements:
        blocks = loss_module._row_blocks
        loss_module._row_blocks = lambda z, block_elements=None: blocks(z, args.block_elements)

    if args.threads:
        torch.set_num_threads(args.threads)
    dev, dtype = torch.device(args.device), getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    n, vocab, k = args.tokens, args.vocab, args.topk
    z = (torch.randn(n, vocab, generator=g) * 3).to(dev, dtype).requires_grad_(True)
    target = torch.randint(4, vocab, (n,), generator=g).to(dev)
    probs, idx = torch.softmax(torch.randn(n, vocab, generator=g) * 3, -1).topk(k, -1)
    probs, idx = probs.half().to(dev), idx.to(dev)
    mask = torch.ones(n, dtype=torch.bool, device=dev)

    def ls():
        loss, _ = label_smoothed_nll_loss(torch.log_softmax(z.float(), -1), target, 0.1, ignore_index=1)
        loss.backward()

    def log_softmax_path(remainder):
        loss, _, _ = pskd_loss(torch.log_softmax(z.float(), -1), target, 0.5, 0.1, idx, probs, mask,
                               remainder, ignore_index=1)
        loss.backward()

    def from_logits(remainder, prior=True):
        loss, *_ = pskd_loss_from_logits(z, target, 0.5, 0.1, idx if prior else None, probs, mask,
                                         remainder, ignore_index=1)
        loss.backward()

    configs = {"label smoothing (fairseq)": ls}
    for rem in ("current", "uniform", "renormalize"):
        configs[f"pskd {rem}, log_softmax path"] = lambda rem=rem: log_softmax_path(rem)
        configs[f"pskd {rem}, from logits"] = lambda rem=rem: from_logits(rem)
    configs["no prior (epoch 1), from logits"] = lambda: from_logits("current", prior=False)

    def timed(fn):
        z.grad = None
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    for fn in configs.values():
        timed(fn), timed(fn)
    times = {name: [] for name in configs}
    names = list(configs)
    for r in range(args.rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            times[name].append(timed(configs[name]))
    base = times[names[0]]
    print(f"{n} tokens x {vocab} vocabulary, k = {k}, {args.dtype} logits on {dev}, "
          f"{torch.get_num_threads()} thread(s), {args.rounds} rounds"
          + (f", blocks of {args.block_elements} elements" if args.block_elements else ""))
    print(f"{'config':<34} {'ms (median)':>12} {'ratio':>7}")
    for name in names:
        ratio = statistics.median(t / b for t, b in zip(times[name], base))
        print(f"{name:<34} {1000 * statistics.median(times[name]):12.1f} {ratio:7.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
