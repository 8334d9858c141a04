"""The closing summary: one table (stderr) of what the run did and where everything it wrote is."""

from __future__ import annotations

import time
from pathlib import Path

from ..layout import MERGED_DIR, METRICS_NAME, PLOT_NAME, SAMPLES_NAME
from .console import console
from .snapshot import list_checkpoints
from .state import LoopState, Run, TrainState


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h {minutes:02d}m {seconds:02d}s" if hours else f"{minutes}m {seconds:02d}s"


def _steps(run: Run, state: TrainState) -> str:
    text = f"{state.global_step} of {run.total_steps}"
    if state.stopped_early:
        text += " (stopped early)"
    if run.start_step:
        text += f", resumed from step {run.start_step}"
    return text


def _throughput(run: Run, state: TrainState) -> str:
    """Mean tokens/s of the windows logged in this part of the run (all tokens of the rows, as the progress bar)."""
    rates = [r["tokens_per_s"] for r in state.log_history
             if r.get("step", 0) > run.start_step and isinstance(r.get("tokens_per_s"), (int, float))]
    return f"{sum(rates) / len(rates):,.0f}" if rates else "-"


def _evaluations(state: TrainState) -> list[tuple[str, str]]:
    evals = [r for r in state.log_history if isinstance(r.get("eval_loss"), (int, float))]
    if not evals:
        return []
    best = min(evals, key=lambda r: r["eval_loss"])
    return [("final validation loss", f"{evals[-1]['eval_loss']:.4f} (step {evals[-1]['step']})"),
            ("best validation loss", f"{best['eval_loss']:.4f} (step {best['step']})")]


def _checkpoints(out: Path, run_id: str) -> str:
    own = [c for c in list_checkpoints(out) if c.run_id == run_id]
    if not own:
        return "none kept"
    return f"{len(own)} in {out} (newest {own[-1].path.name})"


def print_summary(run: Run, loop: LoopState, result_dir: Path | None, stopped_at: Path | None = None) -> None:
    """The table for a finished run (result_dir) or one stopped by Ctrl-C / SIGTERM (stopped_at: its checkpoint)."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    if not run.main or run.quiet:
        return
    state = loop.state
    table = Table(title="stopped: run summary" if stopped_at else "run summary", show_header=False,
                  title_justify="left", box=None, padding=(0, 2, 0, 0))
    table.add_column(style="bold", no_wrap=True)
    table.add_column(no_wrap=True)
    rows = [("wall time", duration(time.perf_counter() - run.started) + (" (this part)" if run.start_step else "")),
            ("optimizer steps", _steps(run, state)),
            ("tokens trained", f"{state.tokens_seen:,} (tokens the loss covered)"),
            ("tokens/s", _throughput(run, state)),
            *_evaluations(state),
            ("skipped updates", f"{state.skipped_steps} (non-finite loss or fp16 overflow)")]
    live = run.sink.path.parent
    folder = stopped_at if stopped_at is not None else result_dir
    plot = [("plot", str(folder / PLOT_NAME))] if (folder / PLOT_NAME).is_file() else []  # none without matplotlib
    if stopped_at is not None:
        rows += [("checkpoint", str(stopped_at)), *plot, ("live log", str(live / METRICS_NAME))]
    else:
        rows += [("adapter", str(result_dir)), ("checkpoints", _checkpoints(result_dir, state.run_id)),
                 *plot, ("metrics", str(result_dir / METRICS_NAME))]
    if state.samples:
        where = (live if stopped_at is not None else result_dir) / SAMPLES_NAME
        rows.append(("sample answers", f"{where} ({len(state.samples)} answers; answering took "
                                       f"{duration(loop.samples_seconds)} of this part)"))
    if stopped_at is None and run.cfg.train.merge_at_end:
        rows.append(("merged model", str(result_dir / MERGED_DIR)))
    for where in run.trackers.where:
        rows.append(("tracker logs", where))
    for name, value in rows:
        table.add_row(name, Text(value))  # Text: a path holding [brackets] is not markup
    # Wide enough for the longest path on one line (copyable), however narrow the terminal.
    width = max(len(name) for name, _ in rows) + max(len(value) for _, value in rows) + 4
    wide = Console(stderr=True, width=max(width, console.width), highlight=False, soft_wrap=True)
    wide.print(table)
