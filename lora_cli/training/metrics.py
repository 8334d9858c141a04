"""The one sink every record of a run goes through: the console line and the run's live metrics.jsonl.

The live file is output_dir/runs/<run_name>/metrics.jsonl (`tail -f` it); the result's metrics.jsonl is written
with the adapter when the run finishes, so an unfinished run never replaces a finished one's. Records are strict
JSON: a non-finite number (a NaN grad norm) is written as null.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..fsutil import atomic_write_text

LIVE_DIR = "runs"
METRICS_NAME = "metrics.jsonl"


def strict(record: dict) -> dict:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}


def to_jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(strict(r), allow_nan=False) + "\n" for r in records)


class MetricsSink:
    """Training and evaluation records -> console, the live metrics.jsonl (main process only), the run's history."""

    def __init__(self, out: Path, run_name: str, writes: bool, show):
        self.path = out / LIVE_DIR / run_name / METRICS_NAME
        self.writes = writes  # only the main process writes
        self.show = show  # record -> None: the console line, or nothing when quiet

    def start(self, history: list[dict]) -> None:
        """Begin the live file with the records so far: none for a fresh run, the checkpoint's for a resumed one
        (so records the interrupted run logged after its last checkpoint are not duplicated)."""
        if self.writes:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.path, to_jsonl(history))

    def log(self, record: dict, history: list[dict]) -> None:
        record = strict(record)
        self.show(record)
        if self.writes:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record, allow_nan=False) + "\n")
        history.append(record)
