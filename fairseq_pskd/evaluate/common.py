"""What the evaluation commands share: their user-facing error and their JSON output."""
import json
from pathlib import Path

__all__ = ["EvaluationError", "write_json"]


class EvaluationError(Exception):
    """A user-facing error: printed as ``error: <message>``, exit status 2."""


def write_json(path, obj):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
