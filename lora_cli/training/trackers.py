"""Experiment trackers (train.report_to: tensorboard, wandb) through Accelerate's own tracker classes.

The metrics sink hands every record to `Trackers.log` and every sample answer to `Trackers.text`; nothing else
talks to a tracker. Only the main process starts trackers (the others get none). Tags are `train/<key>` for
training records and `eval/<key>` for evaluations (eval_loss -> eval/loss), at the record's optimizer step.

TensorBoard writes into <logging_dir>/<run_name>/ (logging_dir defaults to output_dir/runs, beside the live
metrics.jsonl). A resumed run writes into the same folder with `purge_step` set to the first step after the
checkpoint, so TensorBoard hides what the interrupted run logged after its checkpoint and shows the resumed run's
steps instead. A resumed W&B run continues the same W&B run (id = the run's id); W&B ignores steps it already has,
which an exact resume logs again with the same values.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import UserError
from ..layout import default_logging_dir

INSTALL = {
    "tensorboard": 'pip install -e ".[tensorboard]" (in a lora-cli checkout) or pip install tensorboard',
    "wandb": "pip install wandb",
}
DEFAULT_WANDB_PROJECT = "lora-cli"


def _installed(name: str) -> bool:
    """Whether the package a tracker needs is importable (Accelerate's own checks, which look without importing)."""
    from accelerate.utils import is_tensorboard_available, is_wandb_available

    return {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}[name]()


def check_installed(report_to: list[str]) -> None:
    """A requested tracker whose package is missing is a config error, found before anything slow loads
    (Accelerate would only log a debug line and train without it)."""
    missing = [name for name in report_to if not _installed(name)]
    if missing:
        fixes = "; ".join(f"{name}: {INSTALL[name]}" for name in missing)
        raise UserError(
            f"train.report_to asks for {', '.join(missing)}, which is not installed. Install it ({fixes}), or "
            "remove it from train.report_to."
        )


def logging_dir(cfg) -> Path:
    t = cfg.train
    return Path(t.logging_dir) if t.logging_dir else default_logging_dir(t.output_dir)


def tag(record: dict, key: str) -> str:
    """The tracker tag of a record's value: train/loss, train/learning_rate, eval/loss, eval/ppl, ..."""
    if "eval_loss" in record:
        return f"eval/{key.removeprefix('eval_')}"
    return f"train/{key}"


def scalars(record: dict) -> dict:
    """A record's numbers under their tags (None, a NaN grad norm written as null, is left out)."""
    return {tag(record, k): v for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class Trackers:
    """The run's started trackers (Accelerate GeneralTracker objects, also in accelerator.trackers); with none
    started (train.report_to empty, or a process other than the main one) every call does nothing."""

    def __init__(self, accelerator, trackers: list, where: list[str]):
        self.accelerator = accelerator
        self.trackers = trackers
        self.where = where  # where each tracker writes, for the closing summary

    def log(self, record: dict) -> None:
        values = scalars(record)
        if values and self.trackers:
            self.accelerator.log(values, step=record["step"])

    def text(self, step: int, rows: list[dict]) -> None:
        """Sample answers: a table where the tracker has one (W&B), else one text entry per prompt (TensorBoard)."""
        for tracker in self.trackers:
            if hasattr(tracker, "log_table"):
                data = [[r["step"], r["prompt"], r["answer"]] for r in rows]
                tracker.log_table("samples", columns=["step", "prompt", "answer"], data=data, step=step)
            else:
                tracker.log({f"samples/{i}": _markdown(r) for i, r in enumerate(rows)}, step=step)

    def end(self) -> None:
        """Close every tracker (idempotent). Not accelerator.end_training(): it also tears down the process group,
        which the final save and a multi-process run still need."""
        trackers, self.trackers = self.trackers, []
        for tracker in trackers:
            tracker.finish()
            if tracker in self.accelerator.trackers:
                self.accelerator.trackers.remove(tracker)


def _markdown(row: dict) -> str:
    # TensorBoard renders text as markdown: keep the answer verbatim in a code block.
    return f"**{row['prompt']}**\n\n```\n{row['answer']}\n```"


def start(accelerator, cfg, state, config_values: dict) -> Trackers:
    """Start train.report_to's trackers on the main process for the run in `state` (fresh or resumed)."""
    report_to = cfg.train.report_to
    if not report_to or not accelerator.is_main_process:
        return Trackers(accelerator, [], [])
    from accelerate.tracking import TensorBoardTracker, WandBTracker

    folder = logging_dir(cfg)
    made, where = [], []
    if "tensorboard" in report_to:
        # TensorBoard hides earlier events from this step on: a resumed run's steps after its checkpoint, and all
        # of an older fresh run's that used the same train.run_name (as metrics.jsonl starts over, so does the plot)
        purge_from = state.global_step + 1 if state.global_step else 0
        made.append(TensorBoardTracker(state.run_name, folder, purge_step=purge_from))
        where.append(f"TensorBoard: {folder / state.run_name}  (tensorboard --logdir {folder})")
    if "wandb" in report_to:
        project = cfg.train.wandb_project or os.environ.get("WANDB_PROJECT") or DEFAULT_WANDB_PROJECT
        wandb_dir = os.environ.get("WANDB_DIR") or str(folder)
        Path(wandb_dir).mkdir(parents=True, exist_ok=True)
        # One W&B run per lora-train run: a resumed run continues it. Entity, mode, API key: W&B's environment.
        made.append(WandBTracker(project, name=state.run_name, id=state.run_id, resume="allow", dir=wandb_dir))
        where.append(f"W&B: project {project}, run {state.run_name} (files under {wandb_dir}/wandb)")
    # Accelerate starts trackers through init_trackers; tracker objects in log_with are taken as they are.
    accelerator.log_with = made
    accelerator.init_trackers(state.run_name, config=config_values)
    return Trackers(accelerator, list(accelerator.trackers), where)


def hyperparameters(flat_config: dict) -> dict:
    """The resolved config as the flat {key: bool | int | float | str} trackers store (lists as text, null as "")."""
    simple = (bool, int, float, str)
    return {k: (v if isinstance(v, simple) else ("" if v is None else str(v))) for k, v in flat_config.items()}
