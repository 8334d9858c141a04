"""What output_dir holds, read once: the published result and every checkpoint, each with its state and config.

Deciding where a run starts (training.resume) works on one `Snapshot` taken after the folder is locked and cleaned
up, so every decision sees the same folder and each checkpoint's files are read once. A finished result that
carries the resume state (see lora_cli/layout.py) is read like a checkpoint too: a longer run continues from it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..layout import (
    BEST_NAME,
    CHECKPOINT_REQUIRED,
    CHECKPOINT_TENSOR_FILES,
    CONFIG_COPY_NAME,
    CONFIG_NAME,
    LAST_NAME,
    LEGACY_WEIGHTS_NAME,
    STATE_NAME,
    WEIGHTS_NAME,
    checkpoint_step,
)
from ..model_files import weight_file_problem
from .state import TrainState


@dataclass(frozen=True)
class CheckpointInfo:
    """A checkpoint-<step> folder (or a finished result carrying the resume state) as read from disk."""

    path: Path
    step: int
    state: TrainState | None  # None when incomplete or unreadable
    problem: str = ""  # why it cannot be resumed from
    config: dict = field(default_factory=dict)  # its lora_config.yaml, flattened ({"train.max_steps": 8, ...})
    has_best: bool = False  # holds best_adapter.safetensors (train.load_best_at_end)

    @property
    def run_id(self) -> str:
        return self.state.run_id if self.state else ""

    @property
    def resumable(self) -> bool:
        return self.state is not None and not self.problem

    @property
    def weights_name(self) -> str:
        """The file with the LoRA weights training goes on from: the adapter itself, unless the folder is a result
        whose adapter is the best one (train.load_best_at_end) rather than the last."""
        return LAST_NAME if (self.path / LAST_NAME).is_file() else WEIGHTS_NAME


@dataclass(frozen=True)
class Snapshot:
    """output_dir at one moment."""

    path: Path
    exists: bool
    has_result: bool  # a trained adapter (ours, PEFT's or a legacy .bin one)
    result_state: dict | None  # the result's trainer_state.json (None for an adapter without one)
    result_config: dict  # the result's lora_config.yaml, flattened
    result_checkpoint: CheckpointInfo | None  # the result read as a checkpoint, when it carries the resume state
    checkpoints: tuple[CheckpointInfo, ...]  # checkpoint-<step> folders, oldest first by (run start, step)

    @property
    def result_run_id(self) -> str:
        return (self.result_state or {}).get("run_id") or ""

    @property
    def resumables(self) -> list[CheckpointInfo]:
        """What a run can continue from, oldest first: the complete checkpoints and a resumable result."""
        found = [c for c in self.checkpoints if c.resumable]
        if self.result_checkpoint is not None and self.result_checkpoint.resumable:
            found.append(self.result_checkpoint)
        return sorted(found, key=_age)

    @property
    def newest_resumable(self) -> CheckpointInfo | None:
        """The newest of the most recently started run."""
        usable = self.resumables
        return usable[-1] if usable else None


def _age(info: CheckpointInfo) -> tuple[str, int, bool]:
    # Ties (a result at a checkpoint's step): the result last, it also holds the final evaluation.
    return (info.state.run_started if info.state else "", info.step, checkpoint_step(info.path.name) is None)


def scan(out: Path) -> Snapshot:
    """Read output_dir once (call it holding the lock, after outdir.recover)."""
    if not out.is_dir():
        return Snapshot(out, False, False, None, {}, None, ())
    result = has_result(out)
    state = _read_json(out / STATE_NAME) if result else None
    config = read_flat_config(out / CONFIG_COPY_NAME) if result else {}
    resumable_result = None
    if result and state is not None and all((out / name).is_file() for name in CHECKPOINT_REQUIRED):
        resumable_result = read_checkpoint(out)
    return Snapshot(out, True, result, state, config, resumable_result, tuple(list_checkpoints(out)))


def has_result(out: Path) -> bool:
    """Whether `out` holds a trained adapter (ours, PEFT's or a legacy .bin one)."""
    return (out / CONFIG_NAME).is_file() and any((out / name).is_file() for name in (WEIGHTS_NAME, LEGACY_WEIGHTS_NAME))


def read_checkpoint(path: Path) -> CheckpointInfo:
    step = checkpoint_step(path.name)
    missing = [name for name in CHECKPOINT_REQUIRED if not (path / name).is_file()]
    config = read_flat_config(path / CONFIG_COPY_NAME)
    has_best = (path / BEST_NAME).is_file()
    state = None
    if (path / STATE_NAME).is_file():
        try:
            state = TrainState.from_dict(json.loads((path / STATE_NAME).read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError):
            return CheckpointInfo(path, step or 0, None, f"its {STATE_NAME} is unreadable", config, has_best)
    if missing:
        why = ("it was written by an older lora-cli without the training state" if state is not None and not
               state.run_id else f"it lacks {', '.join(missing)}")
        return CheckpointInfo(path, step or 0, state, why, config, has_best)
    for name in (*CHECKPOINT_TENSOR_FILES, LAST_NAME):
        problem = weight_file_problem(path / name) if (path / name).is_file() else None
        if problem:  # cut short or overwritten since it was written (a synced-folder conflict, a bad disk)
            return CheckpointInfo(path, state.global_step, state, f"its {name} is damaged ({problem})", config,
                                  has_best)
    return CheckpointInfo(path, state.global_step, state, "", config, has_best)


def list_checkpoints(out: Path) -> list[CheckpointInfo]:
    """checkpoint-<step> folders in `out`, oldest first by (run start, step); temporary leftovers are not listed."""
    if not out.is_dir():
        return []
    found = [read_checkpoint(p) for p in out.iterdir() if p.is_dir() and checkpoint_step(p.name) is not None]
    return sorted(found, key=lambda c: (c.state.run_started if c.state else "", c.step))


def flatten(tree: dict, prefix: str = "") -> dict:
    """A nested config as {"section.key": value}."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def read_flat_config(path: Path) -> dict:
    try:
        return flatten(yaml.safe_load(path.read_text(encoding="utf-8")) or {})
    except (OSError, yaml.YAMLError, AttributeError):
        return {}


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
