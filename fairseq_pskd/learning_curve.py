"""The learning curve: each system against the baseline at several training-set sizes
(scripts/learning-curve.sh; docs/RESULTS.md, "The learning curve").

    python -m fairseq_pskd.learning_curve RUN_DIR ... [--baseline baseline] [--png OUT.png]
                                          [--markdown] [--paired-bs]

Each RUN_DIR is a finished `experiment run` directory named SYSTEM-sSEED (baseline-s1,
pskd-a0.4-s2, ...), with RUN_DIR/lenpen when `experiment lenpen` chose its length penalty on
validation data. A run's training-set size is the number of training pairs its fairseq-train
log says it loaded, so runs of any recipe (or of earlier versions) are placed where they belong.
Per size and system the table gives the mean over seeds (BLEU at lenpen 1 and at the one chosen
on valid, chrF, ECE, NLL, sentence-level Spearman, length ratio, validation NLL), the
differences to the baseline's mean, and with --paired-bs the paired bootstrap p of each seed's
BLEU against the baseline of the same seed. The PNG draws dBLEU (lenpen chosen on valid), dNLL
and dECE against the size, one line per system through the mean, a marker per seed.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from .experiment import ExperimentError, paired_bootstrap, table_extras

_LOADED_TRAIN = re.compile(r"loaded ([\d,]+) examples from: \S*train\.")
_RUN_NAME = re.compile(r"^(?P<system>.+)-s(?P<seed>\d+)$")


def training_pairs(run_dir: Path) -> int:
    """Training pairs the run's fairseq-train loaded (its train.log; results.json's
    train_pairs when recorded)."""
    results = json.loads((run_dir / "results.json").read_text())
    if results.get("train_pairs"):
        return int(results["train_pairs"])
    log = run_dir / "train.log"
    if log.exists():
        with open(log, errors="replace") as f:
            for line in f:
                m = _LOADED_TRAIN.search(line)
                if m:
                    return int(m.group(1).replace(",", ""))
    raise ExperimentError(f"{run_dir}: cannot tell its training-set size (no train_pairs in "
                          "results.json, no 'loaded N examples from: ...train.' in train.log)")


def collect(run_dirs, subset="test"):
    """{(size, system): {seed: {"fixed": results, "tuned": results or None}}} of the runs."""
    runs = {}
    for d in map(Path, run_dirs):
        m = _RUN_NAME.match(d.name)
        if not m or not (d / "results.json").exists():
            raise ExperimentError(f"{d} is not a finished run named SYSTEM-sSEED (e.g. baseline-s1)")
        fixed = json.loads((d / "results.json").read_text())
        fixed["_table"] = table_extras(fixed, d)
        fixed["_dir"] = d
        tuned = None
        if (d / "lenpen" / "results.json").exists():
            tuned = json.loads((d / "lenpen" / "results.json").read_text())
            tuned["_table"], tuned["_dir"] = table_extras(tuned, d / "lenpen"), d / "lenpen"
        if subset not in fixed["tests"]:
            raise ExperimentError(f"{d}: no results on {subset!r}")
        key = (training_pairs(d), m.group("system"))
        runs.setdefault(key, {})[int(m.group("seed"))] = {"fixed": fixed, "tuned": tuned}
    return runs


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _row(size, name, seeds, subset):
    """Means over the seeds of one system at one size, and each seed's own figures."""
    row = {"size": size, "system": name, "seeds": sorted(seeds)}
    for kind in ("fixed", "tuned"):
        tests = [r[kind]["tests"][subset] for r in seeds.values() if r[kind]]
        row[f"bleu_{kind}"] = _mean([t["bleu"] for t in tests]) if len(tests) == len(seeds) else None
    tests = [r["fixed"]["tests"][subset] for r in seeds.values()]
    for key in ("chrf", "ece", "nll", "sentence_spearman", "sentence_aurc"):
        row[key] = _mean([t.get(key) for t in tests]) if all(t.get(key) is not None for t in tests) else None
    extras = [r["fixed"]["_table"] for r in seeds.values()]
    row["length"] = _mean([float(e[subset]["length"]) for e in extras if subset in e])
    row["valid_nll"] = _mean([float(e["valid_nll"]) for e in extras if "valid_nll" in e])
    row["per_seed"] = {seed: {"bleu_fixed": r["fixed"]["tests"][subset]["bleu"],
                              "bleu_tuned": r["tuned"]["tests"][subset]["bleu"] if r["tuned"] else None,
                              "ece": r["fixed"]["tests"][subset]["ece"], "nll": r["fixed"]["tests"][subset]["nll"]}
                       for seed, r in sorted(seeds.items())}
    return row


def _p_values(base, other, subset):
    """sacreBLEU's paired bootstrap p of other's BLEU against base's, at lenpen 1 and chosen."""
    p = {}
    for kind in ("fixed", "tuned"):
        pair = [base[kind], other[kind]]
        if all(pair):
            paired_bootstrap(pair, [x["_dir"] for x in pair])
            p[kind] = pair[1]["_table"][subset].get("p")
    return p


def summarize(runs, baseline="baseline", subset="test", paired_bs=False):
    """One row per (size, system), sizes ascending, the baseline first: means over seeds and
    differences to the baseline's mean at the same size."""
    rows = []
    for size in sorted({s for s, _ in runs}):
        systems = sorted((name for s, name in runs if s == size), key=lambda n: (n != baseline, n))
        if baseline not in systems:
            raise ExperimentError(f"no {baseline} runs with {size} training pairs to compare with")
        base = runs[(size, baseline)]
        at_size = [_row(size, name, runs[(size, name)], subset) for name in systems]
        ref = at_size[0]
        for row in at_size[1:]:
            for key in ("bleu_fixed", "bleu_tuned", "nll", "ece"):
                row[f"d_{key}"] = None if row[key] is None or ref[key] is None else row[key] - ref[key]
            for seed, s in row["per_seed"].items():
                b = ref["per_seed"].get(seed)
                s["d_bleu_tuned"] = (None if not b or s["bleu_tuned"] is None or b["bleu_tuned"] is None
                                     else s["bleu_tuned"] - b["bleu_tuned"])
                s["d_nll"] = None if not b else s["nll"] - b["nll"]
                s["d_ece"] = None if not b else s["ece"] - b["ece"]
            if paired_bs:
                row["p"] = {seed: _p_values(base[seed], runs[(size, row["system"])][seed], subset)
                            for seed in row["seeds"] if seed in base}
        rows += at_size
    return rows


HEAD = ["pairs", "system", "seeds", "BLEU lp 1", "dBLEU", "BLEU lp valid", "dBLEU", "p (lp 1 / valid)",
        "chrF", "ECE %", "dECE", "NLL", "dNLL", "sent rho", "length", "valid NLL"]


def _f(value, fmt, scale=1.0, sign=False):
    if value is None:
        return "" if sign else "-"  # no difference: the baseline's own row
    return (f"{{:+{fmt}}}" if sign else f"{{:{fmt}}}").format(scale * value)


def format_rows(rows, markdown=False):
    lines = []
    for r in rows:
        p = "; ".join(f"s{seed}: {v.get('fixed') or '-'} / {v.get('tuned') or '-'}"
                      for seed, v in r.get("p", {}).items()) if r.get("p") else ""
        lines.append([f"{r['size']:,}", r["system"], ",".join(map(str, r["seeds"])),
                      _f(r["bleu_fixed"], ".2f"), _f(r.get("d_bleu_fixed"), ".2f", sign=True),
                      _f(r["bleu_tuned"], ".2f"), _f(r.get("d_bleu_tuned"), ".2f", sign=True), p,
                      _f(r["chrf"], ".2f"), _f(r["ece"], ".2f", 100), _f(r.get("d_ece"), ".2f", 100, True),
                      _f(r["nll"], ".3f"), _f(r.get("d_nll"), ".3f", sign=True),
                      _f(r["sentence_spearman"], ".3f"), _f(r["length"], ".3f"), _f(r["valid_nll"], ".3f")])
    if markdown:
        return "\n".join(["| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
                         + ["| " + " | ".join(x) + " |" for x in lines])
    widths = [max(len(x) for x in col) for col in zip(HEAD, *lines)]
    fmt = "  ".join("{:<%d}" % w for w in widths)
    return "\n".join([fmt.format(*HEAD), fmt.format(*("-" * w for w in widths))] + [fmt.format(*x) for x in lines])


def plot(rows, out, baseline="baseline", title=None):
    """dBLEU (lenpen chosen on valid), dNLL and dECE against the training-set size."""
    from .plots import pyplot

    plt = pyplot()

    panels = [("d_bleu_tuned", "dBLEU (lenpen chosen on valid)", 1.0), ("d_nll", "dNLL (nats/token)", 1.0),
              ("d_ece", "dECE (points)", 100.0)]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    systems = sorted({r["system"] for r in rows if r["system"] != baseline})
    for ax, (key, label, scale) in zip(axes, panels):
        ax.axhline(0, color="grey", lw=0.8)
        for i, name in enumerate(systems):
            mine = [r for r in rows if r["system"] == name]
            color = f"C{i}"
            xs = [r["size"] for r in mine if r.get(key) is not None]
            ys = [scale * r[key] for r in mine if r.get(key) is not None]
            ax.plot(xs, ys, "-o", color=color, label=f"{name} (mean)")
            for marker, seed in zip("^v<>", sorted({s for r in mine for s in r["per_seed"]})):
                pts = [(r["size"], r["per_seed"][seed].get(key)) for r in mine if seed in r["per_seed"]]
                pts = [(x, scale * y) for x, y in pts if y is not None]
                if pts:
                    ax.plot(*zip(*pts), marker, color=color, alpha=0.5, ls="none", label=f"{name} s{seed}")
        ax.set_xscale("log")
        ax.set_xticks(sorted({r["size"] for r in rows}))
        ax.set_xticklabels([f"{s:,}" for s in sorted({r["size"] for r in rows})], rotation=30)
        ax.set_xticks([], minor=True)  # a log axis's own minor labels (4x10^3, ...) would overlap
        ax.set_xlabel("training pairs")
        ax.set_title(label)
    # One legend below the panels: inside an axis it covered points.
    handles, labels = axes[0].get_legend_handles_labels()
    rows_of_legend = -(-len(handles) // 6) if handles else 0
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(len(handles), 6), fontsize=7, frameon=False)
    fig.suptitle(title or f"against {baseline}: below 0 is better for NLL and ECE, above 0 for BLEU")
    fig.tight_layout(rect=(0, 0.05 * rows_of_legend, 1, 1))
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m fairseq_pskd.learning_curve", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="finished run directories named SYSTEM-sSEED")
    ap.add_argument("--baseline", default="baseline", help="the system the others are compared with")
    ap.add_argument("--subset", default="test")
    ap.add_argument("--png", help="also draw dBLEU, dNLL and dECE against the size")
    ap.add_argument("--json", help="also write the rows as JSON")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--paired-bs", action="store_true",
                    help="paired bootstrap p of each seed's BLEU against the same seed's baseline")
    args = ap.parse_args(argv)
    try:
        rows = summarize(collect(args.runs, args.subset), args.baseline, args.subset, args.paired_bs)
    except ExperimentError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_rows(rows, markdown=args.markdown))
    print("\nmeans over seeds; d: minus the baseline's mean with as many training pairs; "
          "lp valid: the length penalty chosen on validation BLEU; p: paired bootstrap "
          "(1,000 resamples) against the same seed's baseline, at lenpen 1 / chosen")
    if args.png:
        plot(rows, args.png, args.baseline)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
