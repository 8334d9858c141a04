"""Where a run starts: fresh, or from a checkpoint (train.resume_from_checkpoint), decided before anything loads.

Resuming restores everything an uninterrupted run would have at that step (LoRA weights, optimizer, schedule, loss
scaler, every process's RNG, data position, logging window, early stopping), so on CPU in fp32 a resumed run gives
the same losses and the same adapter bytes. It is refused, naming each key, when the config differs in anything that
changes the result; what only changes how the run is watched or saved may differ, and the run may be made longer
(it then continues from the finished result, which carries the resume state when the run keeps checkpoints).

`prepare` is the one place that touches output_dir: it checks it, locks it, cleans up after killed runs and takes
one snapshot (snapshot.scan). Every decision after that (`plan_start`) is a pure function of the config and the
snapshot.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import yaml

from ..config import Config, config_to_yaml
from ..errors import UserError
from . import outdir
from .snapshot import CheckpointInfo, Snapshot, flatten, list_checkpoints, read_checkpoint, scan

# Keys a resumed run may change: how it is watched, saved and how long it runs, never what a step computes.
MAY_CHANGE = {
    "train.output_dir", "train.overwrite_output_dir", "train.resume_from_checkpoint", "train.max_steps",
    "train.epochs", "train.logging_steps", "train.eval_steps", "train.save_steps", "train.save_total_limit",
    "train.save_minutes", "train.merge_at_end", "train.max_nonfinite_steps", "train.gradient_checkpointing",
    "train.early_stopping_patience", "train.early_stopping_threshold", "train.load_best_at_end",
    "model.trust_remote_code", "train.report_to", "train.run_name", "train.logging_dir", "train.wandb_project",
    "train.eval_prompts", "train.eval_max_new_tokens",
}
RESUME_HINT = "train.resume_from_checkpoint=auto"


@dataclass(frozen=True)
class StartPlan:
    checkpoint: CheckpointInfo | None = None  # resume from here; None = a fresh run
    finished: str | None = None  # set when output_dir already holds this run's finished result: nothing to do
    best: CheckpointInfo | None = None  # where the best weights are when load_best_at_end is switched on at a resume
    notes: tuple[str, ...] = ()  # what to tell the user about the decision


def prepare(cfg: Config, out: Path, dry_run: bool, main: bool, say: Callable[..., None],
            wait_for_everyone: Callable[[], None], cleanup: contextlib.ExitStack) -> StartPlan:
    """Check output_dir (before anything slow loads), lock it, clean up after killed runs, decide where to start.
    A dry run writes nothing and refuses nothing: it says what a real run would do."""
    data_paths = cfg.data.paths()
    log = lambda message: say(message, markup=False)  # noqa: E731
    try:
        outdir.check_location(out, cfg.model.name_or_path, data_paths)
        if main and not dry_run:  # the lock first: what recover removes is then surely left by a dead run
            cleanup.callback(outdir.lock(out))
            outdir.recover(out, log=log)
        if not dry_run:
            wait_for_everyone()
        plan = plan_start(cfg, scan(out), *_explicit_checkpoint(cfg.train.resume_from_checkpoint))
    except UserError as err:
        if not dry_run:
            raise
        from rich.markup import escape

        say(f"[yellow]note: a real run would stop here:[/yellow] {escape(str(err))}")
        return StartPlan()
    for note in plan.notes:
        log(f"note: {note}" if dry_run else note)
    return plan


def _explicit_checkpoint(mode: str | None) -> tuple[CheckpointInfo | None, tuple[CheckpointInfo, ...]]:
    """train.resume_from_checkpoint=PATH read from disk, with the checkpoints beside it (the best may be one)."""
    if mode is None or mode == "auto":
        return None, ()
    path = Path(mode)
    if not path.is_dir():
        raise UserError(f"train.resume_from_checkpoint '{path}' is not a folder. Pass a checkpoint-<step> folder, or "
                        "auto for the newest one in train.output_dir.")
    return read_checkpoint(path), tuple(list_checkpoints(path.parent))


# --- the decisions: pure functions of the config and the snapshot ------------------------------------------------


def plan_start(cfg: Config, folder: Snapshot, explicit: CheckpointInfo | None = None,
               siblings: Sequence[CheckpointInfo] = ()) -> StartPlan:
    """Decide from output_dir's snapshot and train.resume_from_checkpoint (`explicit`: the checkpoint a path names,
    `siblings`: the checkpoints beside it); refuse what would lose or mix results."""
    t = cfg.train
    if explicit is not None:
        _check_explicit(explicit, cfg)
        _refuse_other_runs(folder, cfg, explicit.run_id)
        return StartPlan(checkpoint=explicit, best=best_source(cfg, explicit, (*siblings, *folder.resumables)))
    if t.resume_from_checkpoint == "auto":
        return _plan_auto(cfg, folder)
    out = folder.path
    if folder.has_result and not t.overwrite_output_dir:
        raise UserError(
            f"train.output_dir '{out}' already holds a trained adapter. Choose another train.output_dir, or set "
            "train.overwrite_output_dir=true to replace it."
        )
    stale = folder.checkpoints
    if stale and not t.overwrite_output_dir:
        latest = folder.newest_resumable or stale[-1]
        total = latest.state.total_steps if latest.state else "?"
        raise UserError(
            f"train.output_dir '{out}' holds checkpoints of an interrupted run (newest: {latest.path.name}, step "
            f"{latest.step} of {total}). To continue it, rerun with {RESUME_HINT}; to start over and discard them, "
            "set train.overwrite_output_dir=true."
        )
    if stale or folder.has_result:
        return StartPlan(notes=(f"starting over in {out} (train.overwrite_output_dir=true): what it holds stays until "
                                "this run replaces it; checkpoints of the earlier run are removed when this run writes "
                                "its first one",))
    return StartPlan()


def _plan_auto(cfg: Config, folder: Snapshot) -> StartPlan:
    """resume_from_checkpoint=auto: the newest complete checkpoint (or resumable result), a fresh start when there is
    none, or nothing to do when output_dir holds this very run, finished."""
    out, newest = folder.path, folder.newest_resumable
    if _finished(folder, cfg):
        further = (f"raise train.max_steps or train.epochs and the run continues from step {newest.step}" if newest
                   else "it kept no checkpoint to continue from, so start over with train.overwrite_output_dir=true")
        return StartPlan(finished=f"train.output_dir '{out}' already holds this run's finished adapter (step "
                                  f"{folder.result_state['global_step']}); nothing to resume. To train further, "
                                  f"{further}.")
    newest_step = newest.step if newest else -1
    notes = [f"note: {c.path.name} cannot be resumed from: {c.problem}" for c in folder.checkpoints
             if not c.resumable and c.step > newest_step]
    if newest is not None:
        try:
            check_compatible(newest, cfg)
        except UserError:
            if not cfg.train.overwrite_output_dir:
                raise
            notes.append(f"the checkpoints in {out} belong to a run with another config: starting over, as "
                         "train.overwrite_output_dir=true allows")
            return StartPlan(notes=tuple(notes))
        notes.append(f"resuming from {newest.path} (step {newest.step} of the run started {newest.state.run_started})")
        return StartPlan(checkpoint=newest, best=best_source(cfg, newest, folder.resumables), notes=tuple(notes))
    if folder.has_result and not cfg.train.overwrite_output_dir:
        raise UserError(
            f"train.output_dir '{out}' holds a trained adapter of another run (or one that kept no checkpoint to "
            "continue from). Choose another train.output_dir, or set train.overwrite_output_dir=true to replace it."
        )
    notes.append(f"no checkpoint to resume in {out}: starting a fresh run")
    return StartPlan(notes=tuple(notes))


def _refuse_other_runs(folder: Snapshot, cfg: Config, run_id: str) -> None:
    """Resuming from a checkpoint elsewhere must not mix this run into another run's output_dir."""
    others = [c.path.name for c in folder.checkpoints if c.run_id != run_id]
    if folder.has_result and folder.result_run_id != run_id:
        others.append("a trained adapter")
    if others and not cfg.train.overwrite_output_dir:
        raise UserError(
            f"train.output_dir '{folder.path}' holds another run's files ({', '.join(others)}). Resume into the "
            "checkpoint's own output_dir, choose an empty one, or set train.overwrite_output_dir=true to replace them."
        )


def _finished(folder: Snapshot, cfg: Config) -> bool:
    """Whether output_dir's result is this very run, finished: same run as its checkpoints and the same length."""
    state = folder.result_state if folder.has_result else None
    if not state or not state.get("run_id"):
        return False
    newest = folder.newest_resumable
    if newest is not None and (newest.run_id != state["run_id"] or newest.step > state.get("global_step", 0)):
        return False
    now = flat_config(cfg)
    saved = folder.result_config
    same_length = all(saved.get(k) == now.get(k) for k in ("train.max_steps", "train.epochs"))
    return same_length and not _differences(saved, now)


def _check_explicit(info: CheckpointInfo, cfg: Config) -> None:
    if not info.resumable:
        raise UserError(f"train.resume_from_checkpoint '{info.path}' cannot be resumed from: {info.problem}. Pass a "
                        "complete checkpoint-<step> folder written by lora-train.")
    check_compatible(info, cfg)


def best_source(cfg: Config, checkpoint: CheckpointInfo, candidates: Sequence[CheckpointInfo]) -> CheckpointInfo | None:
    """train.load_best_at_end switched on at a resume: the checkpoint holds no best weights (the run kept none), so
    they are read from the checkpoint written at the best evaluation's step, when it is still there; without it
    the change is refused (the final adapter would silently be the last one)."""
    best_step = checkpoint.state.best_step
    if not cfg.train.load_best_at_end or checkpoint.has_best or best_step is None:
        return None
    for candidate in (checkpoint, *candidates):
        if candidate.resumable and candidate.run_id == checkpoint.run_id and candidate.step == best_step:
            return candidate
    raise UserError(
        f"train.load_best_at_end=true was switched on at this resume, but {checkpoint.path} keeps no best weights "
        f"(the run kept none so far) and the checkpoint of its best evaluation (step {best_step}, eval loss "
        f"{checkpoint.state.best_eval_loss:.4f}) is no longer there, so the final adapter could not be the best one. "
        "Resume with train.load_best_at_end=false, or start a fresh run with it in another train.output_dir."
    )


# --- what may differ ---------------------------------------------------------------------------------------------


def flat_config(cfg: Config) -> dict:
    """The resolved config as {"section.key": value}."""
    return flatten(yaml.safe_load(config_to_yaml(cfg)))


def _differences(saved: dict, now: dict) -> list[str]:
    keys = sorted((set(saved) | set(now)) - MAY_CHANGE)
    # A key newer than the checkpoint is absent from its config: the run had its default.
    saved = {**{k: _default(k) for k in keys if k not in saved}, **saved}
    return [f"{k}: {saved.get(k)!r} in the checkpoint, {now.get(k)!r} now" for k in keys if saved.get(k) != now.get(k)]


def _default(key: str):
    section, _, name = key.partition(".")
    section_field = Config.model_fields.get(section)
    field = section_field.annotation.model_fields.get(name) if section_field is not None else None
    return None if field is None or field.is_required() else field.get_default(call_default_factory=True)


def check_compatible(checkpoint: CheckpointInfo, cfg: Config) -> None:
    differences = _differences(checkpoint.config, flat_config(cfg))
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
