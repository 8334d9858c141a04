"""Adapter folders and full-state checkpoints: writing them, finding the newest complete one, reading it back.

A `checkpoint-<step>/` folder is a PEFT-loadable adapter folder (adapter_config.json, adapter_model.safetensors,
the tokenizer, lora_config.yaml) that also holds what an exact continuation needs:

    trainer_state.json        TrainState: data position, logging window, early stopping, history, run id
    optimizer.pt              the optimizer's state_dict (AdamW moments and step counts, parameter groups)
    scheduler.pt              the learning-rate schedule's state_dict
    scaler.pt                 the fp16 loss scaler's state_dict (fp16 runs only)
    rng_state.pth             python, numpy, torch and CUDA RNG states of every process, indexed by rank
    best_adapter.safetensors  the best evaluated LoRA weights (train.load_best_at_end only)
    loss.png                  the curves so far (training.plot; not needed to resume)

It is written as a whole folder under a temporary name and renamed into place (fsutil.atomic_dir) at an optimizer
step boundary, so a folder named checkpoint-<step> is always complete; `is_complete` checks anyway.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..adapter import CONFIG_NAME, WEIGHTS_NAME, save_adapter
from ..config import Config, config_to_yaml
from ..errors import UserError
from ..fsutil import atomic_dir, atomic_file, atomic_write_text, disk_full_message, is_disk_full
from ..inject import LoraSettings, lora_state_dict
from ..model_files import weight_file_problem
from .plot import PLOT_NAME, title_for, write_loss_plot
from .state import Run, TrainState

STATE_NAME = "trainer_state.json"
CONFIG_COPY_NAME = "lora_config.yaml"
OPTIMIZER_NAME = "optimizer.pt"
SCHEDULER_NAME = "scheduler.pt"
SCALER_NAME = "scaler.pt"
RNG_NAME = "rng_state.pth"
BEST_NAME = "best_adapter.safetensors"
REQUIRED = (CONFIG_NAME, WEIGHTS_NAME, STATE_NAME, CONFIG_COPY_NAME, OPTIMIZER_NAME, SCHEDULER_NAME, RNG_NAME)
PREFIX = "checkpoint-"


def lora_settings(cfg: Config) -> LoraSettings:
    return LoraSettings(**cfg.lora.model_dump())


def save_adapter_folder(folder: Path, model, tokenizer, cfg: Config, target_modules, state: TrainState | None,
                        lora_tensors: dict | None = None) -> None:
    """An adapter folder that PEFT loads, plus the tokenizer and the resolved config."""
    save_adapter(model, folder, lora_settings(cfg), target_modules, cfg.model.name_or_path, cfg.model.revision,
                 lora_tensors)
    tokenizer.save_pretrained(folder)
    atomic_write_text(folder / CONFIG_COPY_NAME, config_to_yaml(cfg))
    if state is not None:
        write_state(folder, state)


def write_state(folder: Path, state: TrainState) -> None:
    # allow_nan=False: a non-finite value here is a bug upstream, never a file other tools cannot parse.
    atomic_write_text(folder / STATE_NAME, json.dumps(asdict(state), indent=2, allow_nan=False) + "\n")


# --- writing ---------------------------------------------------------------------------------------------------


def save_checkpoint(run: Run, best: dict | None) -> Path | None:
    """Write checkpoint-<global_step>/ (main process; every process calls this: RNG states are gathered) and prune
    the run's older checkpoints beyond train.save_total_limit."""
    rng_states = _gather(run.accelerator, rng_state())
    # Under FSDP gathering the LoRA weights and optimizer moments from the shards is a collective, too.
    lora_tensors, optimizer_state = run.sharding.lora_tensors(run.model), run.sharding.optimizer_state(run.optimizer)
    if not run.main:
        return None
    final = run.out / f"{PREFIX}{run.state.global_step}"
    try:
        with atomic_dir(final, overwrite=True) as tmp:
            save_adapter_folder(tmp, run.model, run.tokenizer, run.cfg, run.target_modules, run.state, lora_tensors)
            _save_torch(tmp / OPTIMIZER_NAME, optimizer_state)
            _save_torch(tmp / SCHEDULER_NAME, run.scheduler.state_dict())
            scaler = getattr(run.accelerator, "scaler", None)
            if scaler is not None:
                _save_torch(tmp / SCALER_NAME, scaler.state_dict())
            _save_torch(tmp / RNG_NAME, rng_states)
            if best is not None:
                save_file(best, str(tmp / BEST_NAME), metadata={"format": "pt"})
            title = title_for(run.cfg.model.name_or_path, run.cfg.data.path, run.state.run_name)
            write_loss_plot(run.state.log_history, tmp / PLOT_NAME, title, warn=run.say)
    except Exception as err:  # safetensors, tokenizers and torch raise their own types for a full disk
        if is_disk_full(err, run.out):
            raise UserError(disk_full_message(f"checkpoint {final.name}", run.out, checkpoint_bytes(run.model))
                            + " Earlier checkpoints are intact; resume from them with "
                            "train.resume_from_checkpoint=auto.") from None
        raise
    prune_checkpoints(run.out, run.cfg.train.save_total_limit, run.state.run_id, lambda m: run.say(m, markup=False))
    return final


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


def rng_state() -> dict:
    """This process's RNG states, as plain values and tensors (loadable with torch.load(weights_only=True))."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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


@dataclass
class CheckpointInfo:
    path: Path
    step: int
    state: TrainState | None  # None when incomplete or unreadable
    problem: str = ""  # why it cannot be resumed from

    @property
    def run_id(self) -> str:
        return self.state.run_id if self.state else ""

    @property
    def resumable(self) -> bool:
        return self.state is not None and not self.problem


def _step_of(path: Path) -> int | None:
    suffix = path.name[len(PREFIX):]
    return int(suffix) if path.name.startswith(PREFIX) and suffix.isdigit() else None


def read_checkpoint(path: Path) -> CheckpointInfo:
    step = _step_of(path)
    missing = [name for name in REQUIRED if not (path / name).is_file()]
    state = None
    if (path / STATE_NAME).is_file():
        try:
            state = TrainState.from_dict(json.loads((path / STATE_NAME).read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError):
            return CheckpointInfo(path, step or 0, None, f"its {STATE_NAME} is unreadable")
    if missing:
        why = ("it was written by an older lora-cli without the training state" if state is not None and not
               state.run_id else f"it lacks {', '.join(missing)}")
        return CheckpointInfo(path, step or 0, state, why)
    for name in (WEIGHTS_NAME, BEST_NAME, OPTIMIZER_NAME, SCHEDULER_NAME, SCALER_NAME, RNG_NAME):
        problem = weight_file_problem(path / name) if (path / name).is_file() else None
        if problem:  # cut short or overwritten since it was written (a synced-folder conflict, a bad disk)
            return CheckpointInfo(path, state.global_step, state, f"its {name} is damaged ({problem})")
    return CheckpointInfo(path, state.global_step, state)


def list_checkpoints(out: Path) -> list[CheckpointInfo]:
    """checkpoint-<step> folders in `out`, oldest first by (run start, step); temporary leftovers are not listed."""
    if not out.is_dir():
        return []
    found = [read_checkpoint(p) for p in out.iterdir() if p.is_dir() and _step_of(p) is not None]
    return sorted(found, key=lambda c: (c.state.run_started if c.state else "", c.step))


def newest_resumable(out: Path) -> CheckpointInfo | None:
    """The newest complete checkpoint of the most recently started run in `out`."""
    usable = [c for c in list_checkpoints(out) if c.resumable]
    return usable[-1] if usable else None


def load_training_state(path: Path, run: Run) -> tuple[TrainState, dict | None]:
    """Restore LoRA weights, optimizer, schedule and loss scaler from a checkpoint; return its state and the best
    weights kept for train.load_best_at_end. RNG states are restored separately, last (set_rng_state)."""
    tensors = _load_tensors(path / WEIGHTS_NAME)
    run.sharding.load_lora_tensors(run.model, {key.removeprefix("base_model.model."): t for key, t in tensors.items()})
    run.sharding.load_optimizer_state(run.optimizer, _load_torch(path / OPTIMIZER_NAME))
    run.scheduler.load_state_dict(_load_torch(path / SCHEDULER_NAME))
    scaler = getattr(run.accelerator, "scaler", None)
    if scaler is not None and (path / SCALER_NAME).is_file():
        scaler.load_state_dict(_load_torch(path / SCALER_NAME))
    best = _load_tensors(path / BEST_NAME) if (path / BEST_NAME).is_file() else None
    state = TrainState.from_dict(json.loads((path / STATE_NAME).read_text(encoding="utf-8")))
    return state, best


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
