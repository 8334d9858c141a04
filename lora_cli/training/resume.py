"""Where a run starts: fresh, or from a checkpoint (train.resume_from_checkpoint), decided before anything loads.

Resuming restores everything an uninterrupted run would have at that step (LoRA weights, optimizer, schedule, loss
scaler, every process's RNG, data position, logging window, early stopping), so on CPU in fp32 a resumed run gives
the same losses and the same adapter bytes. It is refused, naming each key, when the config differs in anything that
changes the result; what only changes how the run is watched or saved may differ, and the run may be made longer.
"""

from __future__ import annotations

import hashlib
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import yaml

from ..config import Config, config_to_yaml
from ..errors import UserError
from .checkpoint import CONFIG_COPY_NAME, CheckpointInfo, list_checkpoints, newest_resumable, read_checkpoint
from .outdir import has_result, result_state

# Keys a resumed run may change: how it is watched, saved and how long it runs, never what a step computes.
MAY_CHANGE = {
    "train.output_dir", "train.overwrite_output_dir", "train.resume_from_checkpoint", "train.max_steps",
    "train.epochs", "train.logging_steps", "train.eval_steps", "train.save_steps", "train.save_total_limit",
    "train.save_minutes", "train.merge_at_end", "train.max_nonfinite_steps", "train.gradient_checkpointing",
    "train.early_stopping_patience", "train.early_stopping_threshold", "train.load_best_at_end",
    "model.trust_remote_code", "train.report_to", "train.run_name", "train.logging_dir", "train.wandb_project",
    "train.eval_prompts", "train.eval_max_new_tokens",
    "train.fsdp",  # how the weights are held: FSDP's checkpoints are laid out as DDP's (training.fsdp)
}
RESUME_HINT = "train.resume_from_checkpoint=auto"


@dataclass
class StartPlan:
    checkpoint: CheckpointInfo | None = None  # resume from here; None = a fresh run
    finished: str | None = None  # set when output_dir already holds this run's finished result: nothing to do


def plan_start(cfg: Config, out: Path, log: Callable[[str], None]) -> StartPlan:
    """Decide from output_dir (`out`, resolved) and train.resume_from_checkpoint; refuse what would lose or mix
    results."""
    t = cfg.train
    mode = t.resume_from_checkpoint
    if mode is not None and mode != "auto":
        checkpoint = _explicit_checkpoint(Path(mode), cfg)
        _refuse_other_runs(out, cfg, checkpoint.run_id)
        return StartPlan(checkpoint=checkpoint)
    newest = newest_resumable(out)
    if mode == "auto":
        return _plan_auto(cfg, out, newest, log)
    _refuse_finished_result(out, cfg)
    stale = [c for c in list_checkpoints(out)]
    if stale and not t.overwrite_output_dir and not has_result(out):
        latest = newest or stale[-1]
        total = latest.state.total_steps if latest.state else "?"
        raise UserError(
            f"train.output_dir '{out}' holds checkpoints of an interrupted run (newest: {latest.path.name}, step "
            f"{latest.step} of {total}). To continue it, rerun with {RESUME_HINT}; to start over and discard them, "
            "set train.overwrite_output_dir=true."
        )
    if stale or has_result(out):
        log(f"starting over in {out} (train.overwrite_output_dir=true): what it holds stays until this run replaces "
            "it; checkpoints of the earlier run are removed when this run writes its first one")
    return StartPlan()


def _plan_auto(cfg: Config, out: Path, newest: CheckpointInfo | None, log: Callable[[str], None]) -> StartPlan:
    """resume_from_checkpoint=auto: the newest complete checkpoint, a fresh start when there is none, or nothing to
    do when output_dir holds this very run, finished."""
    if _finished(out, cfg, newest):
        further = (f"raise train.max_steps or train.epochs and the run continues from {newest.path.name}" if newest
                   else "it kept no checkpoint to continue from, so start over with train.overwrite_output_dir=true")
        return StartPlan(finished=f"train.output_dir '{out}' already holds this run's finished adapter (step "
                                  f"{result_state(out)['global_step']}); nothing to resume. To train further, {further}.")
    for skipped in [c for c in list_checkpoints(out) if not c.resumable and c.step > (newest.step if newest else -1)]:
        log(f"note: {skipped.path.name} cannot be resumed from: {skipped.problem}")
    if newest is not None:
        try:
            check_compatible(newest, cfg)
        except UserError:
            if not cfg.train.overwrite_output_dir:
                raise
            log(f"the checkpoints in {out} belong to a run with another config: starting over, as "
                "train.overwrite_output_dir=true allows")
            return StartPlan()
        log(f"resuming from {newest.path} (step {newest.step} of the run started {newest.state.run_started})")
        return StartPlan(checkpoint=newest)
    if has_result(out) and not cfg.train.overwrite_output_dir:
        raise UserError(
            f"train.output_dir '{out}' holds a trained adapter of another run (or one that kept no checkpoint to "
            "continue from). Choose another train.output_dir, or set train.overwrite_output_dir=true to replace it."
        )
    log(f"no checkpoint to resume in {out}: starting a fresh run")
    return StartPlan()


def _refuse_finished_result(out: Path, cfg: Config) -> None:
    if has_result(out) and not cfg.train.overwrite_output_dir:
        raise UserError(
            f"train.output_dir '{out}' already holds a trained adapter. Choose another train.output_dir, or set "
            "train.overwrite_output_dir=true to replace it."
        )


def _refuse_other_runs(out: Path, cfg: Config, run_id: str) -> None:
    """Resuming from a checkpoint elsewhere must not mix this run into another run's output_dir."""
    state = result_state(out) if has_result(out) else None
    others = [c.path.name for c in list_checkpoints(out) if c.run_id != run_id]
    if has_result(out) and (state or {}).get("run_id") != run_id:
        others.append("a trained adapter")
    if others and not cfg.train.overwrite_output_dir:
        raise UserError(
            f"train.output_dir '{out}' holds another run's files ({', '.join(others)}). Resume into the checkpoint's "
            "own output_dir, choose an empty one, or set train.overwrite_output_dir=true to replace them."
        )


def _finished(out: Path, cfg: Config, newest: CheckpointInfo | None) -> bool:
    """Whether output_dir's result is this very run, finished: same run as its checkpoints and the same length."""
    state = result_state(out) if has_result(out) else None
    if not state or not state.get("run_id"):
        return False
    if newest is not None and (newest.run_id != state["run_id"] or newest.step > state.get("global_step", 0)):
        return False
    saved = _saved_config(out / CONFIG_COPY_NAME)
    now = flat_config(cfg)
    same_length = all(saved.get(k) == now.get(k) for k in ("train.max_steps", "train.epochs"))
    return same_length and not _differences(saved, now)


def _explicit_checkpoint(path: Path, cfg: Config) -> CheckpointInfo:
    if not path.is_dir():
        raise UserError(f"train.resume_from_checkpoint '{path}' is not a folder. Pass a checkpoint-<step> folder, or "
                        "auto for the newest one in train.output_dir.")
    info = read_checkpoint(path)
    if not info.resumable:
        raise UserError(f"train.resume_from_checkpoint '{path}' cannot be resumed from: {info.problem}. Pass a "
                        "complete checkpoint-<step> folder written by lora-train.")
    check_compatible(info, cfg)
    return info


# --- what may differ ---------------------------------------------------------------------------------------------


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def flat_config(cfg: Config) -> dict:
    """The resolved config as {"section.key": value}."""
    return _flatten(yaml.safe_load(config_to_yaml(cfg)))


def _saved_config(path: Path) -> dict:
    try:
        return _flatten(yaml.safe_load(path.read_text(encoding="utf-8")) or {})
    except (OSError, yaml.YAMLError):
        return {}


def _differences(saved: dict, now: dict) -> list[str]:
    keys = sorted((set(saved) | set(now)) - MAY_CHANGE)
    return [f"{k}: {saved.get(k)!r} in the checkpoint, {now.get(k)!r} now" for k in keys if saved.get(k) != now.get(k)]


def check_compatible(checkpoint: CheckpointInfo, cfg: Config) -> None:
    saved = _saved_config(checkpoint.path / CONFIG_COPY_NAME)
    now = flat_config(cfg)
    differences = _differences(saved, now)
    if differences:
        listing = "\n  - ".join(differences)
        raise UserError(
            f"Cannot resume from {checkpoint.path}: the config differs in what changes the result:\n  - {listing}\n"
            "Use the checkpoint's settings (its lora_config.yaml), or start a fresh run in another train.output_dir. "
            f"A resumed run may only change {', '.join(sorted(MAY_CHANGE))}."
        )


def check_resumable_run(checkpoint: CheckpointInfo, total_steps: int, num_processes: int, fingerprint: str) -> None:
    """What can only be checked once the data is loaded and the processes are up."""
    state = checkpoint.state
    if state.num_processes != num_processes:
        raise UserError(
            f"Cannot resume from {checkpoint.path}: it was written by a run on {state.num_processes} process(es), this "
            f"one runs on {num_processes}; the batch plan differs. Launch it with {state.num_processes}."
        )
    if state.data_fingerprint and state.data_fingerprint != fingerprint:
        raise UserError(
            f"Cannot resume from {checkpoint.path}: the training or validation data differs from the data it was "
            "trained on (a file changed, or the tokenizer). Restore the data, or start a fresh run in another "
            "train.output_dir."
        )
    if total_steps < state.global_step:
        raise UserError(
            f"Cannot resume from {checkpoint.path} (step {state.global_step}): this config trains {total_steps} steps "
            "in all, fewer than it has already done. Raise train.max_steps or train.epochs to at least "
            f"{state.global_step}."
        )


def data_fingerprint(*example_lists) -> str:
    """A hash of the tokenized examples (ids and labels, in order): the training set, then the validation set (which
    decides early stopping and the best adapter)."""
    digest = hashlib.sha256()
    for examples in example_lists:
        digest.update(len(examples).to_bytes(8, "little"))
        for example in examples:
            digest.update(len(example.input_ids).to_bytes(4, "little"))
            digest.update(array("q", example.input_ids).tobytes())
            digest.update(array("q", example.labels).tobytes())
    return digest.hexdigest()[:16]
