"""Adapter folders and full-state checkpoints: writing them, pruning old ones, and reading their tensors back.

A `checkpoint-<step>/` folder (names in lora_cli/layout.py) is a PEFT-loadable adapter folder that also holds what an
exact continuation needs: the training state, optimizer, schedule, loss scaler, every process's RNG and the best
weights.
It is written as a whole folder under a temporary name and renamed into place (fsutil.atomic_dir) at an optimizer
step boundary, so a folder named checkpoint-<step> is always complete; snapshot.read_checkpoint checks anyway.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..adapter import KEY_PREFIX, save_adapter
from ..config import Config, config_to_yaml
from ..errors import UserError
from ..fsutil import atomic_dir, atomic_file, atomic_write_text, disk_full_message, is_disk_full
from ..inject import lora_settings, lora_state_dict
from ..layout import (
    BEST_NAME,
    CONFIG_COPY_NAME,
    LAST_NAME,
    OPTIMIZER_NAME,
    PLOT_NAME,
    RNG_NAME,
    SCALER_NAME,
    SCHEDULER_NAME,
    STATE_NAME,
    checkpoint_dir,
)
from .plot import title_for, write_loss_plot
from .rng import rng_state
from .snapshot import CheckpointInfo, list_checkpoints
from .state import LoopState, Run, TrainState


def save_adapter_folder(folder: Path, model, tokenizer, cfg: Config, target_modules, state: TrainState | None,
                        lora_tensors: dict | None = None) -> None:
    """An adapter folder that PEFT loads, plus the tokenizer and the resolved config. `lora_tensors`: the LoRA
    weights when the caller gathered them (a sharded model's parameters are shards)."""
    save_adapter(model, folder, lora_settings(cfg.lora), target_modules, cfg.model.name_or_path, cfg.model.revision,
                 lora_tensors)
    tokenizer.save_pretrained(folder)
    atomic_write_text(folder / CONFIG_COPY_NAME, config_to_yaml(cfg))
    if state is not None:
        write_state(folder, state)


def write_state(folder: Path, state: TrainState) -> None:
    # allow_nan=False: a non-finite value here is a bug upstream, never a file other tools cannot parse.
    atomic_write_text(folder / STATE_NAME, json.dumps(asdict(state), indent=2, allow_nan=False) + "\n")


# --- writing ---------------------------------------------------------------------------------------------------


def save_checkpoint(run: Run, loop: LoopState) -> Path | None:
    """Write checkpoint-<global_step>/ (main process; every process calls this: RNG states are gathered) and prune
    the run's older checkpoints beyond train.save_total_limit."""
    rng_states = gather_rng_states(run)
    # Under FSDP gathering the LoRA weights and optimizer moments from the shards is a collective, too.
    lora_tensors, optimizer_state = run.sharding.lora_tensors(run.model), run.sharding.optimizer_state(run.optimizer)
    if not run.main:
        return None
    state = loop.state
    final = checkpoint_dir(run.out, state.global_step)
    try:
        with atomic_dir(final, overwrite=True) as tmp:
            save_adapter_folder(tmp, run.model, run.tokenizer, run.cfg, run.target_modules, state, lora_tensors)
            save_resume_state(tmp, run, loop, rng_states, optimizer_state)
            title = title_for(run.cfg.model.name_or_path, run.cfg.data.describe_path(), state.run_name)
            write_loss_plot(state.log_history, tmp / PLOT_NAME, title, warn=run.say)
    except Exception as err:  # safetensors, tokenizers and torch raise their own types for a full disk
        if is_disk_full(err, run.out):
            raise UserError(disk_full_message(f"checkpoint {final.name}", run.out, checkpoint_bytes(run.model))
                            + " Earlier checkpoints are intact; resume from them with "
                            "train.resume_from_checkpoint=auto.") from None
        raise
    prune_checkpoints(run.out, run.cfg.train.save_total_limit, state.run_id, lambda m: run.say(m, markup=False))
    return final


def gather_rng_states(run: Run) -> list:
    """Every process's RNG states, indexed by rank (a collective: every process must call it)."""
    return _gather(run.accelerator, rng_state())


def save_resume_state(folder: Path, run: Run, loop: LoopState, rng_states: list, optimizer_state: dict,
                      last_weights: dict | None = None) -> None:
    """What a continuation needs besides the adapter folder: optimizer (its state_dict, gathered whole under FSDP:
    Sharding.optimizer_state), schedule, loss scaler, RNG, best weights; `last_weights` when the folder's adapter is
    not the weights training goes on from (a result whose adapter is the best evaluated one)."""
    _save_torch(folder / OPTIMIZER_NAME, optimizer_state)
    _save_torch(folder / SCHEDULER_NAME, run.scheduler.state_dict())
    scaler = getattr(run.accelerator, "scaler", None)
    if scaler is not None:
        _save_torch(folder / SCALER_NAME, scaler.state_dict())
    _save_torch(folder / RNG_NAME, rng_states)
    if loop.best_weights is not None:
        _save_tensors(folder / BEST_NAME, loop.best_weights)
    if last_weights is not None:
        _save_tensors(folder / LAST_NAME, last_weights)


def _save_tensors(path: Path, tensors: dict) -> None:
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})


def _save_torch(path: Path, obj) -> None:
    with atomic_file(path) as tmp:
        torch.save(obj, tmp)


def checkpoint_bytes(model) -> int:
    """About what one checkpoint takes on disk: the LoRA weights, two AdamW moments, and a best copy."""
    lora_bytes = sum(t.numel() * 4 for t in lora_state_dict(model).values())
    return 4 * lora_bytes + 2**20


def _gather(accelerator, obj) -> list:
    """`obj` of every process, indexed by rank (a collective: every process must call it)."""
    if accelerator.num_processes == 1:
        return [obj]
    gathered = [None] * accelerator.num_processes
    torch.distributed.all_gather_object(gathered, obj)
    return gathered


def prune_checkpoints(out: Path, limit: int | None, run_id: str, log=None) -> None:
    """Keep the newest `limit` checkpoints of this run (counted among its own only), and remove those of other runs:
    after train.overwrite_output_dir=true they are kept until this run has a checkpoint of its own, and could
    afterwards only be resumed by mistake."""
    checkpoints = list_checkpoints(out)
    foreign = [c for c in checkpoints if c.run_id != run_id]
    own = [c for c in checkpoints if c.run_id == run_id]
    doomed = foreign + (own[:-limit] if limit else [])
    if foreign and log is not None:
        log(f"removed {len(foreign)} checkpoint(s) of an earlier run: {', '.join(c.path.name for c in foreign)}")
    for old in doomed:
        shutil.rmtree(old.path, ignore_errors=True)


# --- reading ---------------------------------------------------------------------------------------------------


def load_training_state(checkpoint: CheckpointInfo, model, optimizer, scheduler, accelerator, sharding) -> TrainState:
    """Restore LoRA weights, optimizer, schedule and loss scaler from a checkpoint (or a resumable result); return
    its state. RNG states are restored separately, last (rng.set_rng_state). `sharding`: training.fsdp's, which
    puts whole tensors into (sharded) parameters."""
    path = checkpoint.path
    tensors = _load_tensors(path / checkpoint.weights_name)
    sharding.load_lora_tensors(model, {key.removeprefix(KEY_PREFIX): tensor for key, tensor in tensors.items()})
    sharding.load_optimizer_state(optimizer, _load_torch(path / OPTIMIZER_NAME))
    scheduler.load_state_dict(_load_torch(path / SCHEDULER_NAME))
    scaler = getattr(accelerator, "scaler", None)
    if scaler is not None and (path / SCALER_NAME).is_file():
        scaler.load_state_dict(_load_torch(path / SCALER_NAME))
    return TrainState.from_dict(json.loads((path / STATE_NAME).read_text(encoding="utf-8")))


def load_best_weights(checkpoint: CheckpointInfo, best: CheckpointInfo | None) -> dict | None:
    """The best evaluated LoRA weights for train.load_best_at_end: kept in the checkpoint, or (switched on at this
    resume) the weights of the checkpoint written at the best evaluation's step (resume.best_source)."""
    if checkpoint.has_best:
        return _load_tensors(checkpoint.path / BEST_NAME)
    if best is None:
        return None
    return {k.removeprefix(KEY_PREFIX): v for k, v in _load_tensors(best.path / best.weights_name).items()}


def load_rng_state(path: Path, rank: int) -> dict:
    states = _load_torch(path / RNG_NAME)
    return states[rank]


def _load_tensors(path: Path) -> dict:
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error type for a damaged file
        raise UserError(f"Checkpoint file {path} could not be read ({err}); resume from another checkpoint.") from None


def _load_torch(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several unrelated types for a damaged file
        raise UserError(f"Checkpoint file {path} could not be read ({err}); resume from another checkpoint.") from None
