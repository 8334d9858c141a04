"""loss.png: the run's curves as one picture, drawn from metrics records (never from live training objects).

Top panel: the training loss as logged (each point the mean over train.logging_steps steps, thin) and smoothed
(thick), the validation loss (markers, the best one starred); bottom panel: the learning rate. Optimizer steps on
the x axis, the model, data and run in the title. Written at the end of every run (output_dir/loss.png), into every
checkpoint, and by `lora-train --plot OUTPUT_DIR` from the metrics.jsonl of any run, finished or not.

matplotlib is used through its object API on the Agg canvas (no pyplot, no display, no global state), so it draws
on a headless machine and from any thread. Without matplotlib a run still finishes: no picture, one warning.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import yaml

from ..errors import UserError
from ..fsutil import atomic_file
from ..layout import CHECKPOINT_PREFIX, CONFIG_COPY_NAME, LIVE_DIR, METRICS_NAME, PLOT_NAME, STATE_NAME

_warned = []


def matplotlib_missing() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return True
    return False


def title_for(model: str, data: str, run_name: str) -> str:
    """'SmolLM2-135M-Instruct on train.jsonl · run-20250101-120000': a folder's or file's last part, a Hub id whole."""
    def short(name: str) -> str:
        path = Path(name).expanduser()
        return path.name if path.exists() else name

    parts = [f"{short(model)} on {short(data)}" if model else short(data), run_name]
    return " · ".join(p for p in parts if p)


def smooth(values: list[float]) -> list[float]:
    """An exponential moving average over about a tenth of the points, bias-corrected like TensorBoard's (the first
    points are not pulled towards zero)."""
    span = max(1.0, len(values) / 10)
    weight = 1 - 2 / (span + 1)
    out, average = [], 0.0
    for i, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight**i) if weight else value)
    return out


def write_loss_plot(records: list[dict], path: Path, title: str, warn=None) -> bool:
    """Draw `records` (metrics.jsonl rows) into `path`, atomically. False (after one warning) without matplotlib."""
    if matplotlib_missing():
        if warn is not None and not _warned:
            _warned.append(True)
            warn("matplotlib is not installed, so no loss.png is drawn (pip install matplotlib)")
        return False
    figure = _figure(records, title)
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    with atomic_file(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100)
    return True


def _finite(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return [s for s, _ in points], [v for _, v in points]


def _figure(records: list[dict], title: str):
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    figure = Figure(figsize=(9, 6))
    # Fixed margins, not a layout engine: half the drawing time (a picture is drawn at every checkpoint).
    loss_ax, lr_ax = figure.subplots(2, 1, sharex=True, height_ratios=[3, 1],
                                     gridspec_kw={"left": 0.1, "right": 0.97, "top": 0.89, "bottom": 0.09,
                                                  "hspace": 0.08})
    steps, losses = _finite(records, "loss")
    if steps:
        smoothed = len(steps) >= 20  # fewer points: the logged line is the curve
        loss_ax.plot(steps, losses, color="tab:blue", alpha=0.35 if smoothed else 1.0, linewidth=1 if smoothed else 1.8,
                     marker="." if len(steps) < 60 else None, label="training loss (logged)")
        if smoothed:
            loss_ax.plot(steps, smooth(losses), color="tab:blue", linewidth=2.2, label="training loss (smoothed)")
    eval_steps, eval_losses = _finite(records, "eval_loss")
    if eval_steps:
        loss_ax.plot(eval_steps, eval_losses, color="tab:orange", linewidth=1.5, marker="o", label="validation loss")
        best = min(range(len(eval_losses)), key=eval_losses.__getitem__)
        loss_ax.plot([eval_steps[best]], [eval_losses[best]], color="tab:red", marker="*", markersize=14,
                     linestyle="none", label=f"best validation {eval_losses[best]:.4f} (step {eval_steps[best]})")
    if not steps and not eval_steps:
        loss_ax.text(0.5, 0.5, "no records yet", ha="center", va="center", transform=loss_ax.transAxes)
    loss_ax.set_ylabel("loss (per trained token)")
    loss_ax.grid(True, alpha=0.3)
    if steps or eval_steps:
        loss_ax.legend(loc="upper right", fontsize=9)
    lr_steps, lrs = _finite(records, "learning_rate")
    lr_ax.plot(lr_steps, lrs, color="tab:green", linewidth=1.5)
    lr_ax.set_ylabel("learning rate")
    lr_ax.set_xlabel("optimizer step")
    lr_ax.grid(True, alpha=0.3)
    lr_ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: short_number(value)))  # not a 1e-4 offset
    last = max([0, *steps, *eval_steps])
    figure.suptitle(f"{title}\nstep {last}" if title else f"step {last}", fontsize=11)
    return figure


def short_number(value: float) -> str:
    """A tick label at most ~6 characters wide (the fixed left margin must hold it): 0.002, 1.5e-4, 5e-5."""
    if value == 0 or abs(value) >= 1e-3:
        return f"{value:.2g}"
    mantissa, exponent = f"{value:.1e}".split("e")
    return f"{float(mantissa):g}e{int(exponent)}"


# --- lora-train --plot OUTPUT_DIR --------------------------------------------------------------------------------


def find_metrics(out: Path) -> Path:
    """The newest metrics.jsonl of `out`: the finished result's, or the live one of a running or interrupted run."""
    if not out.is_dir():
        raise UserError(f"--plot {out}: no such folder. Pass a train.output_dir of a run (finished or not).")
    candidates = [p for p in [out / METRICS_NAME, *out.glob(f"{LIVE_DIR}/*/{METRICS_NAME}")] if p.is_file()]
    if not candidates:
        raise UserError(f"--plot {out}: there is no {METRICS_NAME} in it nor in {out / LIVE_DIR}/*/; is it the "
                        "train.output_dir of a lora-train run?")
    # Newest first; on a tie the result's own (a finished run's live copy holds the same records).
    return max(candidates, key=lambda p: (p.stat().st_mtime_ns, p.parent == out))


def read_records(path: Path) -> list[dict]:
    records = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):  # only the last line may be cut off (a running job is writing it)
                raise UserError(f"{path} line {number} is not valid JSON; is it a lora-train metrics file?") from None
    return records


def _title_from_folder(out: Path, metrics: Path) -> str:
    """The title from the run's resolved config (the result's, else the newest checkpoint's) and its run name."""
    configs = [out / CONFIG_COPY_NAME, *sorted(out.glob(f"{CHECKPOINT_PREFIX}*/{CONFIG_COPY_NAME}"),
                                               key=lambda p: p.stat().st_mtime_ns, reverse=True)]
    cfg = {}
    for path in configs:
        try:
            cfg = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            break
        except (OSError, yaml.YAMLError):
            continue
    run_name = metrics.parent.name if metrics.parent != out else _result_run_name(out)
    model = (cfg.get("model") or {}).get("name_or_path", "")
    data = (cfg.get("data") or {}).get("path", "")
    return title_for(model, data, run_name)


def _result_run_name(out: Path) -> str:
    try:
        return json.loads((out / STATE_NAME).read_text(encoding="utf-8")).get("run_name", "")
    except (OSError, ValueError):
        return ""


def redraw(out: Path) -> Path:
    """lora-train --plot: draw loss.png from the newest metrics.jsonl of OUTPUT_DIR, beside that file: OUTPUT_DIR's
    own for a finished run, runs/<run_name>/ for a running or interrupted one (a finished result folder never gets
    the picture of another run); returns the picture's path."""
    out = Path(out)
    metrics = find_metrics(out)
    if matplotlib_missing():
        raise UserError("--plot needs matplotlib, which is not installed: pip install matplotlib")
    path = metrics.with_name(PLOT_NAME)
    write_loss_plot(read_records(metrics), path, _title_from_folder(out, metrics))
    return path
