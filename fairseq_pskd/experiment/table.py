"""``table``: the results table of finished runs, with the paired bootstrap against the first
run and the mean over the seeds of each system."""
import json
import re
import subprocess
import sys
from pathlib import Path

from .common import ExperimentError, is_fresh, prepared_dir_of
from .decode import SENTENCE_KEYS

__all__ = ["COLUMNS", "MEAN_COLUMNS", "table_extras", "paired_bootstrap", "format_table", "format_means",
           "table"]

COLUMNS = [("run", "{name}"), ("data", "{corpus} {src}->{tgt}"), ("test", "{subset}"),
           ("epochs", "{max_epoch}"), ("lenpen", "{lenpen_shown}"),
           ("BLEU", "{bleu:.2f}"), ("p", "{p}"), ("chrF", "{chrf:.2f}"),
           ("ECE %", "{ece_pct:.2f}"), ("NLL", "{nll:.3f}"), ("AURC x1000", "{aurc_k:.1f}"),
           ("sent rho", "{sent_rho}"), ("sent AURC x1000", "{sent_aurc}"), ("length", "{length}"),
           ("valid NLL", "{valid_nll}"), ("train min", "{train_min:.1f}")]


def _rows(results_list):
    for r in results_list:
        extra = r.get("_table", {})
        for subset, t in r["tests"].items():
            e = extra.get(subset, {})
            yield {**r, **t, "subset": subset, "ece_pct": 100 * t["ece"], "aurc_k": 1000 * t["aurc"],
                   "train_min": r.get("train_seconds", 0) / 60, "p": e.get("p", ""),
                   "length": e.get("length", "-"), "valid_nll": extra.get("valid_nll", "-"),
                   "lenpen_shown": _lenpen_shown(r), **_sentence_shown(t)}


def _sentence_shown(t):
    """The sentence-level columns of one test set ("-" for runs scored before they existed)."""
    rho, aurc = (t.get(k) for k in SENTENCE_KEYS)
    return {"sent_rho": "-" if rho is None else f"{rho:.3f}",
            "sent_aurc": "-" if aurc is None else f"{1000 * aurc:.1f}"}


def _shown_name(results, name=None):
    """A run's name (or ``name``), marked when `lenpen` chose its length penalty."""
    return (name or results["name"]) + (" (lenpen on valid)" if results.get("lenpen_choice") else "")


def _lenpen_shown(results):
    """The run's length penalty; "(valid)" when `lenpen` chose it on validation data."""
    if "lenpen" not in results:
        return "-"
    return f"{results['lenpen']:g}" + (" (valid)" if results.get("lenpen_choice") else "")


def table_extras(results, run_dir):
    """What a table shows beside results.json, read from the run directory when it is there:
    sacreBLEU's hypothesis/reference length ratio per test set, the last validation nll_loss."""
    extras = {}
    for subset in results["tests"]:
        score_json = run_dir / f"score.{subset}.json"
        if score_json.exists():
            m = re.search(r"ratio = ([0-9.]+)", json.loads(score_json.read_text()).get("bleu_detail", ""))
            if m:
                extras[subset] = {"length": f"{float(m.group(1)):.3f}"}
    # a RUN/lenpen directory shares its run's training log
    train_log = run_dir / ("../train.log" if results.get("lenpen_choice") else "train.log")
    if train_log.exists():
        from ..plots import parse_log

        valid = parse_log(train_log).get("valid", {})
        if valid and "nll_loss" in valid[max(valid)]:
            extras["valid_nll"] = f"{valid[max(valid)]['nll_loss']:.3f}"
    return extras


def paired_bootstrap(results, run_dirs, resamples=1000):
    """sacreBLEU's paired bootstrap p-value of each run's BLEU against the first run's, per test
    set, on the detokenised hypotheses in the run directories."""
    base = results[0]
    for subset in base["tests"]:
        ref = prepared_dir_of(base) / "ref" / f"{subset}.{base['tgt']}"
        hyps = [d / f"hyp.{subset}.{r['tgt']}" for r, d in zip(results, run_dirs)]
        if not ref.exists() or not all(h.exists() for h in hyps) \
                or not all(subset in r["tests"] for r in results):
            raise ExperimentError(f"--paired-bs needs {ref} and every run's hyp.{subset}.* file")
        proc = subprocess.run([sys.executable, "-m", "sacrebleu", str(ref), "-i", *map(str, hyps),
                               "-m", "bleu", "--paired-bs", "--paired-bs-n", str(resamples),
                               "-f", "json"], capture_output=True, text=True)
        if proc.returncode != 0:
            raise ExperimentError(f"sacrebleu --paired-bs failed:\n{proc.stderr[-2000:]}")
        for r, system in zip(results[1:], json.loads(proc.stdout)[1:]):
            r["_table"].setdefault(subset, {})["p"] = f"{system['BLEU']['p_value']:.3f}"


def format_table(results_list, markdown=False):
    rows = [[fmt.format(**row) for _, fmt in COLUMNS] for row in _rows(results_list)]
    head = [h for h, _ in COLUMNS]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    fmt = "  ".join("{:<%d}" % w for w in widths)
    return "\n".join([fmt.format(*head), fmt.format(*("-" * w for w in widths))]
                     + [fmt.format(*r) for r in rows])


_SEED_SUFFIX = re.compile(r"-s\d+$")
MEAN_COLUMNS = [("BLEU", "bleu", 1, "{:.2f}"), ("chrF", "chrf", 1, "{:.2f}"), ("ECE %", "ece", 100, "{:.2f}"),
                ("NLL", "nll", 1, "{:.3f}"), ("AURC x1000", "aurc", 1000, "{:.1f}"),
                ("sent rho", "sentence_spearman", 1, "{:.3f}"),
                ("sent AURC x1000", "sentence_aurc", 1000, "{:.1f}")]


def format_means(results_list, markdown=False):
    """Per system (a run's name without its "-s<seed>" suffix) and test set: the mean of each
    score over the system's runs, how many runs that is, and the mean BLEU's difference to the
    first system's (dBLEU) on the same test set at the same kind of length penalty."""
    groups = {}
    for r in results_list:
        for subset, t in r["tests"].items():
            # the runs at a chosen lenpen are not averaged with the same runs at lenpen 1
            key = (_shown_name(r, _SEED_SUFFIX.sub("", r["name"])), subset)
            groups.setdefault(key, []).append((r, t))
    head = ["system", "test", "runs"] + [h for h, *_ in MEAN_COLUMNS] + ["dBLEU", "length", "valid NLL"]
    rows, first_bleu = [], {}
    for (system, subset), runs in groups.items():
        row = [system, subset, str(len(runs))]
        # None: a run scored before the measure existed (the sentence-level ones)
        mean = {key: None if any(t.get(key) is None for _, t in runs)
                else sum(t[key] for _, t in runs) / len(runs) for _, key, *_ in MEAN_COLUMNS}
        row += ["-" if mean[key] is None else fmt.format(scale * mean[key])
                for _, key, scale, fmt in MEAN_COLUMNS]
        kind = (subset, bool(runs[0][0].get("lenpen_choice")))
        row.append(f"{mean['bleu'] - first_bleu[kind]:+.2f}" if kind in first_bleu else "")
        first_bleu.setdefault(kind, mean["bleu"])
        for values in ([r.get("_table", {}).get(subset, {}).get("length") for r, _ in runs],
                       [r.get("_table", {}).get("valid_nll") for r, _ in runs]):
            row.append(f"{sum(map(float, values)) / len(values):.3f}" if all(values) else "-")
        rows.append(row)
    if markdown:
        return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                         + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    fmt = "  ".join("{:<%d}" % w for w in widths)
    return "\n".join([fmt.format(*head), fmt.format(*("-" * w for w in widths))]
                     + [fmt.format(*r) for r in rows])


def table(args):
    results = []
    for path in args.results:
        p = Path(path)
        if not p.exists():
            raise ExperimentError(f"{p} not found: run `python -m fairseq_pskd.experiment run` first")
        results.append(json.loads(p.read_text()))
        results[-1]["_table"] = table_extras(results[-1], p.parent)
        ckpt = Path(results[-1].get("checkpoint", ""))
        if results[-1].get("lenpen_choice") and ckpt.is_file() and not is_fresh(p, ckpt):
            print(f"warning: {p} is older than its checkpoint {ckpt}: rerun `python -m "
                  f"fairseq_pskd.experiment lenpen {p.parent.parent}`", file=sys.stderr)
    if args.paired_bs and len(results) > 1:
        paired_bootstrap(results, [Path(p).parent for p in args.results])
    print(format_table(results, markdown=args.markdown))
    if args.mean_over_seeds:
        print("\nmean over the seeds of each system (run name without its -s<seed> suffix)")
        print(format_means(results, markdown=args.markdown))
        print("dBLEU: mean BLEU minus the first system's, on the same test set at the same kind "
              "of length penalty")
    if args.paired_bs and len(results) > 1:
        print(f"\np: sacreBLEU paired bootstrap (1,000 resamples) of BLEU against {results[0]['name']}")
    if len(results) == 2:
        a, b = results
        for subset in a["tests"]:
            if subset in b["tests"]:
                ta, tb = a["tests"][subset], b["tests"][subset]
                print(f"\n{_shown_name(b)} - {_shown_name(a)} on {subset}: BLEU {tb['bleu'] - ta['bleu']:+.2f}, "
                      f"chrF {tb['chrf'] - ta['chrf']:+.2f}, ECE {100 * (tb['ece'] - ta['ece']):+.2f} pts, "
                      f"NLL {tb['nll'] - ta['nll']:+.3f}, AURC x1000 {1000 * (tb['aurc'] - ta['aurc']):+.1f}")
        if args.reading and "test" in a["tests"] and "test" in b["tests"]:
            from ..reading import reading

            p = b.get("_table", {}).get("test", {}).get("p")
            print("\n" + "\n".join(reading(a, b, "test", p)))
    elif args.reading:
        raise ExperimentError("--reading compares two runs: give exactly two results.json files")
    return 0
