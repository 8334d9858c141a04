"""The one sink every record of a run goes through: the console line, the run's live metrics.jsonl, and the
experiment trackers (train.report_to) when there are any. Sample answers (train.eval_prompts) go through it too,
into the live samples.jsonl.

The live files are output_dir/runs/<run_name>/metrics.jsonl and samples.jsonl (`tail -f` them); the result's are
written with the adapter when the run finishes, so an unfinished run never replaces a finished one's. Records are
strict JSON: a non-finite number (a NaN grad norm) is written as null.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Protocol

from ..fsutil import atomic_write_text
from ..layout import METRICS_NAME, SAMPLES_NAME, live_dir


def strict(record: dict) -> dict:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}


def to_jsonl(records: list[dict]) -> str:
    return "".join(_line(r) for r in records)


def _line(record: dict) -> str:
    # ensure_ascii=False: sample answers stay readable in any language (the files are UTF-8).
    return json.dumps(strict(record), allow_nan=False, ensure_ascii=False) + "\n"


class Tracker(Protocol):
    def log(self, record: dict) -> None: ...

    def text(self, step: int, rows: list[dict]) -> None: ...


class _NoTracker:
    def log(self, record: dict) -> None:
        pass

    def text(self, step: int, rows: list[dict]) -> None:
        pass


NO_TRACKER: Tracker = _NoTracker()


class MetricsSink:
    """Records -> console, the live files (main process only), the trackers (a plug-in: `log(record)` and
    `text(step, rows)`, see trackers.Trackers; one that started none for none), and the run's history."""

    def __init__(self, out: Path, run_name: str, writes: bool, show, tracker: Tracker = NO_TRACKER, warn=print):
        self.path = live_dir(out, run_name) / METRICS_NAME
        self.samples_path = self.path.with_name(SAMPLES_NAME)
        self.writes = writes  # only the main process writes
        self.show = show  # record (or sample row) -> None: the console line, or nothing when quiet
        self.tracker = tracker
        self.warn = warn  # message -> None
        self.write_failed = False

    def start(self, history: list[dict], samples: list[dict] = ()) -> None:
        """Begin the live files with the records so far: none for a fresh run, the checkpoint's for a resumed one
        (so records the interrupted run logged after its last checkpoint are not duplicated)."""
        if self.writes:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.path, to_jsonl(history))
            if samples or self.samples_path.exists():
                atomic_write_text(self.samples_path, to_jsonl(samples))

    def log(self, record: dict, history: list[dict]) -> None:
        record = strict(record)
        self.show(record)
        self._append(self.path, [record])
        self.tracker.log(record)
        history.append(record)

    def log_samples(self, rows: list[dict], history: list[dict]) -> None:
        """Sample answers of one step: rows of {"step", "prompt", "answer"}."""
        for row in rows:
            self.show(row)
        self._append(self.samples_path, rows)
        if rows:
            self.tracker.text(rows[0]["step"], rows)
        history.extend(rows)

    def _append(self, path: Path, records: list[dict]) -> None:
        if not (self.writes and records):
            return
        try:
            with open(path, "a", encoding="utf-8") as f:
                f.write(to_jsonl(records))
        except OSError as err:  # a full disk must not end the run here: the history is kept in memory and written
            if not self.write_failed:  # with the result (and into every checkpoint); say it once
                self.warn(f"warning: could not append to {path} ({err.strerror or err}); training goes on, the "
                          "records are kept and written with the result")
            self.write_failed = True
