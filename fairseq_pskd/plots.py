"""Training curves from fairseq training logs.

``python -m fairseq_pskd.plots LOG [LOG ...] --out curves.png [--labels baseline pskd]``

Reads the end-of-epoch lines that fairseq-train writes (to stdout/stderr or ``--log-file``)
in ``--log-format simple`` / ``tqdm``::

    ... | INFO | train | epoch 003 | loss 5.58 | nll_loss 5.507 | ... | pskd_alpha 0.6 | ...
    ... | INFO | valid | epoch 003 | valid on 'valid' subset | loss 5.9 | ... | bleu 12.3 | ...

and in ``--log-format json``::

    ... | INFO | train | {"epoch": 3, "train_loss": "5.58", ...}
    ... | INFO | valid | {"epoch": 3, "valid_loss": "5.9", "valid_bleu": "12.3", ...}

Per-update ``train_inner`` lines are ignored. ``parse_log`` needs neither fairseq nor
matplotlib; plotting imports matplotlib (Agg backend) when called.
"""
import argparse
import json
import math
import re
import sys
from pathlib import Path

# "| <tag> | epoch 003 | k v | k v" (simple/tqdm) or "| <tag> | {...}" (json); the tag is
# "train" or the name of the validation subset (fairseq renames the logger to it).
# fairseq-hydra-train's log writes the same lines as "[time][<tag>][INFO] - epoch 003 | ...".
_TAG = r"(?:\|\s*(?P<tag>[\w.\-]+)\s*\||\]\[(?P<hydra_tag>[\w.\-]+)\]\[[A-Z]+\]\s+-)"
_EPOCH_LINE = re.compile(_TAG + r"\s*epoch\s+(?P<epoch>\d+)\s*\|(?P<rest>.*)$")
_JSON_LINE = re.compile(_TAG + r"\s*(?P<json>\{.*\})\s*$")


def _to_float(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _parse_pipes(rest):
    metrics = {}
    for field in rest.split("|"):
        parts = field.strip().rsplit(" ", 1)
        if len(parts) == 2:
            value = _to_float(parts[1])
            if value is not None:  # skips e.g. "valid on 'valid' subset"
                metrics[parts[0].strip()] = value
    return metrics


def _parse_json(tag, text):
    try:
        record = json.loads(text)
    except ValueError:
        return None, None  # e.g. fairseq_cli.train printing its config as a Python dict
    if not isinstance(record, dict) or "epoch" not in record or "update" in record:
        return None, None  # "update" marks a per-update (train_inner style) record
    epoch = _to_float(record["epoch"])
    if epoch is None:
        return None, None
    prefix = tag + "_"
    metrics = {}
    for key, value in record.items():
        if key == "epoch":
            continue
        value = _to_float(value)
        if value is None:
            continue
        # the json format prefixes every key with the tag once ("train_train_wall" -> "train_wall")
        metrics[key[len(prefix):] if key.startswith(prefix) else key] = value
    return int(epoch), metrics


def pyplot():
    """matplotlib.pyplot with the headless Agg backend, matplotlib's own logging at WARNING:
    importing fairseq leaves the root logger at DEBUG (its text_to_speech task calls
    basicConfig), and matplotlib's font search would fill the output."""
    import logging

    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def parse_lines(lines):
    """Like ``parse_log`` for an iterable of log lines."""
    out = {}
    for line in lines:
        line = line.rstrip("\r\n")
        m = _EPOCH_LINE.search(line)
        if m:
            tag = m.group("tag") or m.group("hydra_tag")
            epoch, metrics = int(m.group("epoch")), _parse_pipes(m.group("rest"))
        else:
            m = _JSON_LINE.search(line)
            if not m:
                continue
            tag = m.group("tag") or m.group("hydra_tag")
            epoch, metrics = _parse_json(tag, m.group("json"))
            if epoch is None:
                continue
        if tag.endswith("_inner") or not metrics:
            continue
        # a resumed run repeats epochs: the later line wins, being the run that went on
        out.setdefault(tag, {})[epoch] = metrics
    return out


def parse_log(path):
    """End-of-epoch metrics of a fairseq training log.

    Returns ``{tag: {epoch: {metric: value}}}`` where tag is ``"train"`` or a validation
    subset name (usually ``"valid"``), e.g. ``{"train": {1: {"loss": 7.0, ...}},
    "valid": {1: {"loss": 6.5, "bleu": 0.02, ...}}}``. Metric names are as in the simple
    format (``loss``, ``nll_loss``, ``ppl``, ``bleu``, ``pskd_alpha``, ...) for both formats.
    """
    with open(path, encoding="utf-8", errors="replace") as f:
        return parse_lines(f)


def _series(per_epoch, key):
    epochs = sorted(e for e, m in per_epoch.items() if key in m and math.isfinite(m[key]))
    return epochs, [per_epoch[e][key] for e in epochs]


def default_labels(logs):
    """A legend label per log: its file name without suffix, or its directory's name when file
    names repeat (RUN_A/train.log, RUN_B/train.log); "run N" for an already parsed log."""
    paths = [Path(p) if isinstance(p, (str, Path)) else None for p in logs]
    stems = [p.stem if p else None for p in paths]
    unique = len(set(stems)) == len(stems)
    return [(p.stem if unique else p.parent.name) if p else f"run {i + 1}"
            for i, p in enumerate(paths)]


def plot_curves(logs, out, labels=None, title=None, first_epoch=1):
    """Draw train/valid NLL, train/valid loss, valid BLEU and PS-KD alpha / coverage per epoch,
    one line per log, into one PNG. ``logs`` are paths or already parsed dicts; epochs before
    ``first_epoch`` are left out (to see the end of a long run). Panels whose metric is in no
    log are left out. Returns the list of panel names drawn.

    NLL (fairseq's ``nll_loss``, bits per token of the reference) compares runs of different
    criteria; ``loss`` is each criterion's own training objective (PS-KD's is against its soft
    targets), so its train curves compare only runs of one criterion."""
    from matplotlib.ticker import MaxNLocator

    plt = pyplot()

    parsed = [parse_log(p) if isinstance(p, (str, Path)) else p for p in logs]
    parsed = [{tag: {e: m for e, m in ep.items() if e >= first_epoch} for tag, ep in d.items()}
              for d in parsed]
    if labels is None:
        labels = default_labels(logs)
    if len(labels) != len(parsed):
        raise ValueError(f"{len(labels)} labels for {len(parsed)} logs")

    def has(tag_filter, key):
        return any(key in m for d in parsed for tag, ep in d.items() if tag_filter(tag)
                   for m in ep.values())

    is_train = lambda t: t == "train"  # noqa: E731
    is_valid = lambda t: t != "train"  # noqa: E731
    panels = []
    if has(is_train, "nll_loss") or has(is_valid, "nll_loss"):
        panels.append(("nll_loss", "NLL, bits per token (train solid, valid dashed)"))
    if has(is_train, "loss") or has(is_valid, "loss"):
        panels.append(("loss", "loss (train solid, valid dashed)"))
    if has(is_valid, "bleu"):
        panels.append(("bleu", "valid BLEU"))
    if has(is_train, "pskd_alpha"):
        panels.append(("pskd_alpha", "PS-KD alpha"))
    if has(is_train, "pskd_coverage"):
        panels.append(("pskd_coverage", "PS-KD coverage"))
    if not panels:
        since = f" from epoch {first_epoch} on" if first_epoch > 1 else ""
        raise ValueError(f"no end-of-epoch train/valid metrics{since} found in the logs")

    ncols = 2 if len(panels) > 1 else 1
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6 * ncols, 4 * nrows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, name) in zip(axes.flat, panels):
        for i, (data, label) in enumerate(zip(parsed, labels)):
            color = colors[i % len(colors)]
            if key in ("nll_loss", "loss", "pskd_alpha", "pskd_coverage") and "train" in data:
                x, y = _series(data["train"], key)
                if x:
                    ax.plot(x, y, "-o", color=color, markersize=3,
                            label=f"{label} train" if key in ("loss", "nll_loss") else label)
            if key in ("nll_loss", "loss", "bleu"):
                styles = ["--", ":", "-."]
                for j, tag in enumerate(t for t in sorted(data) if t != "train"):
                    x, y = _series(data[tag], key)
                    if x:
                        ax.plot(x, y, styles[j % 3] + "s", color=color, markersize=3,
                                label=f"{label} {tag}")
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return [key for key, _ in panels]


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m fairseq_pskd.plots",
        description="Plot train/valid NLL and loss, valid BLEU and PS-KD alpha/coverage per epoch from "
                    "fairseq training logs (--log-format simple, tqdm or json).")
    parser.add_argument("logs", nargs="+", metavar="LOG", help="fairseq-train log files")
    parser.add_argument("--out", required=True, metavar="PNG", help="output image")
    parser.add_argument("--labels", nargs="+", help="one label per log (default: the file names, "
                        "or their directories' names when the file names repeat)")
    parser.add_argument("--title", help="figure title")
    parser.add_argument("--first-epoch", type=int, default=1, metavar="N",
                        help="leave out the epochs before N (to see the end of a long run)")
    args = parser.parse_args(argv)
    if args.labels is not None and len(args.labels) != len(args.logs):
        parser.error(f"{len(args.labels)} --labels for {len(args.logs)} logs")
    try:
        panels = plot_curves(args.logs, args.out, labels=args.labels, title=args.title,
                             first_epoch=args.first_epoch)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({', '.join(panels)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
