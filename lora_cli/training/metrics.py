"""The one sink every record of a run goes through: the console line and metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path


class MetricsSink:
    """Training and evaluation records -> console and `metrics.jsonl` (main process only) and the run's history."""

    def __init__(self, out: Path, writes: bool, show):
        self.path = out / "metrics.jsonl"
        self.writes = writes  # only the main process writes
        self.show = show  # record -> None: the console line, or nothing when quiet

    def start(self) -> None:
        if self.writes:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.unlink(missing_ok=True)

    def log(self, record: dict, history: list[dict]) -> None:
        self.show(record)
        if self.writes:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        history.append(record)
