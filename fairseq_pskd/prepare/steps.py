"""Idempotent preparation steps: done-markers and the keys they hold.

Each step writes OUT/tmp/done/<step>.json after it succeeded. The marker holds a key, a hash of
everything the step's output depends on (its options, tool versions and the key of the step
before it), so a changed option re-runs that step and all later ones and nothing earlier. A
step whose marker is missing, stale, or whose outputs are gone runs again.
"""
from __future__ import annotations

import hashlib
import json
import platform
import time
from importlib import metadata
from pathlib import Path
from typing import Callable

__all__ = ["step_key", "tool_versions", "Steps"]


def step_key(*parts) -> str:
    """A short hash of ``parts`` (anything JSON can write, else its str)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def _dist_version(*names: str) -> str | None:
    for name in names:
        try:
            v = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        return v if name == names[0] else f"{v} ({name})"
    return None


def tool_versions() -> dict:
    return {
        "python": platform.python_version(),
        "sacremoses": _dist_version("sacremoses"),
        "sentencepiece": _dist_version("sentencepiece"),
        # the maintained builds for new Pythons use other distribution names
        "fairseq": _dist_version("fairseq", "ve-fairseq", "fairseq-fixed"),
        "sacrebleu": _dist_version("sacrebleu"),
        "torch": _dist_version("torch"),
    }


class Steps:
    """Done-markers: OUT/tmp/done/<step>.json = {"key": ..., "payload": ...}."""

    def __init__(self, done_dir: Path, log):
        self.dir = done_dir
        self.log = log
        self.ran: list[str] = []
        self.skipped: list[str] = []

    def _marker(self, name: str) -> Path:
        return self.dir / f"{name}.json"

    def done(self, name: str, key: str, outputs: list[Path]) -> dict | None:
        """The payload of a finished step whose key matches and outputs exist, else None."""
        try:
            m = json.loads(self._marker(name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if m.get("key") != key or not all(Path(p).exists() for p in outputs):
            return None
        return m.get("payload") or {}

    def run(self, name: str, key: str, outputs: list[Path], fn: Callable[[], dict | None]):
        payload = self.done(name, key, outputs)
        if payload is not None:
            self.log(f"step {name}: up to date, skipped")
            self.skipped.append(name)
            return payload
        self._marker(name).unlink(missing_ok=True)
        self.log(f"step {name}: running")
        t0 = time.time()
        payload = fn() or {}
        payload["seconds"] = round(time.time() - t0, 2)
        self.dir.mkdir(parents=True, exist_ok=True)
        part = self._marker(name).with_suffix(".part")
        part.write_text(json.dumps({"key": key, "payload": payload}, indent=1), encoding="utf-8")
        part.replace(self._marker(name))  # the marker appears only once the step succeeded
        self.log(f"step {name}: done in {payload['seconds']:.1f}s")
        self.ran.append(name)
        return payload
