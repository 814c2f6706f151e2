"""Progress of a training run, one line per finished epoch, read from fairseq-train's log:

    [baseline] epoch 7/12  valid nll 3.210  1m58s/epoch  ETA 10 min  (all runs: ETA 24 min)

``experiment run`` feeds it every line fairseq-train prints (the logs are written as before).
Seconds per epoch are fairseq's own ``wall`` clock of the current start of fairseq-train divided
by the epochs it has finished since, so start-up is included, a resumed run is timed from its
resumption and nothing depends on this process's clock. ``valid nll`` is the validation
``nll_loss`` of the epoch (fairseq's, base 2), comparable across criteria.

Recipes that train several runs (two lanes of runs side by side) give each run the epochs still
queued after it in its lane and one directory shared by all runs: each run writes there when its
lane will finish, and the line ends with the latest such time of all lanes still training.
"""
from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

_EPOCH = re.compile(r"\| epoch (\d+)\b")
_NLL = re.compile(r"\| nll_loss (-?\d+(?:\.\d+)?)\b")
_WALL = re.compile(r"\| wall (\d+(?:\.\d+)?)\b")
# the configuration fairseq-train logs first thing, each time it starts (also read by experiment/run.py)
TRAIN_START = "| fairseq_cli.train | {'_name'"


def duration(seconds: float) -> str:
    """40s under a minute, 1m58s under an hour, 1 h 05 min above."""
    seconds = max(0.0, seconds)
    if seconds >= 3600:
        h, m = divmod(int(round(seconds / 60)), 60)
        return f"{h} h {m:02d} min"
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


def eta(seconds: float) -> str:
    """Whole minutes (at least 1) under an hour, "<1 min" under 30 s, 1 h 05 min above."""
    seconds = max(0.0, seconds)
    if seconds >= 3600:
        return duration(seconds)
    return f"{max(1, int(round(seconds / 60)))} min" if seconds >= 30 else "<1 min"


class EpochProgress:
    """Turns fairseq-train's log lines into progress lines, written to ``out`` (a text stream).

    ``max_epoch``: the run's --max-epoch (None: no total and no ETA). ``queued_epochs``: epochs of
    the runs that follow this one in its lane. ``eta_dir``: where the runs of one recipe share
    when their lanes finish (None: this run only)."""

    def __init__(self, name, max_epoch=None, out=None, queued_epochs=0, eta_dir=None, clock=time.time):
        self.name, self.max_epoch, self.out = name, max_epoch, out
        self.queued_epochs, self.clock = int(queued_epochs), clock
        self.eta_dir = Path(eta_dir) if eta_dir else None
        self.segment_first_epoch = None  # the first epoch finished since fairseq-train (re)started
        self.valid_nll = {}

    def feed(self, line: str):
        """Read one log line; returns the progress line it completed (also written), or None."""
        if TRAIN_START in line:
            self.segment_first_epoch = None
            return None
        kind = "valid" if "| valid |" in line else "train" if "| train |" in line else None
        m = _EPOCH.search(line) if kind else None
        if m is None:
            return None
        epoch = int(m.group(1))
        if kind == "valid":
            nll = _NLL.search(line)
            if nll:
                self.valid_nll[epoch] = float(nll.group(1))
            return None
        wall = _WALL.search(line)
        if wall is None:  # a mid-epoch train_inner line, or no wall clock: not an epoch's end
            return None
        if self.segment_first_epoch is None:
            self.segment_first_epoch = epoch
        per_epoch = float(wall.group(1)) / (epoch - self.segment_first_epoch + 1)
        text = self._line(epoch, per_epoch)
        if self.out is not None:
            self.out.write(text + "\n")
            self.out.flush()
        return text

    def _line(self, epoch, per_epoch):
        parts = [f"[{self.name}] epoch {epoch}" + (f"/{self.max_epoch}" if self.max_epoch else "")]
        if epoch in self.valid_nll:
            parts.append(f"valid nll {self.valid_nll[epoch]:.3f}")
        parts.append(f"{duration(per_epoch)}/epoch")
        if self.max_epoch:
            left = max(0, self.max_epoch - epoch)
            parts.append(f"ETA {eta(left * per_epoch)}")
            if self.eta_dir is not None:
                lane_left = (left + self.queued_epochs) * per_epoch
                overall = self._share(lane_left)
                parts.append(f"(all runs: ETA {eta(overall)})")
        return "  ".join(parts)

    def _share(self, lane_left):
        """Record when this run's lane finishes; the latest finish of all lanes, as seconds left."""
        now = self.clock()
        self.eta_dir.mkdir(parents=True, exist_ok=True)
        mine = self.eta_dir / f"{self.name}.json"
        tmp = mine.with_suffix(".tmp")
        tmp.write_text(json.dumps({"finish": now + lane_left}))
        os.replace(tmp, mine)
        latest = now + lane_left
        for f in self.eta_dir.glob("*.json"):
            try:
                latest = max(latest, float(json.loads(f.read_text())["finish"]))
            except (OSError, ValueError, KeyError, TypeError):
                continue  # being replaced, or not ours: the others still give an ETA
        return latest - now
