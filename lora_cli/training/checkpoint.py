"""Adapter folders (the final result and every checkpoint-<step>/) and checkpoint bookkeeping."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

from ..adapter import save_adapter
from ..config import Config, config_to_yaml
from ..fsutil import atomic_dir, atomic_write_text
from ..inject import LoraSettings
from .state import TrainState


def lora_settings(cfg: Config) -> LoraSettings:
    return LoraSettings(**cfg.lora.model_dump())


def save_adapter_folder(folder: Path, model, tokenizer, cfg: Config, target_modules, state: TrainState | None) -> None:
    """An adapter folder that PEFT loads, plus the tokenizer and the resolved config."""
    save_adapter(model, folder, lora_settings(cfg), target_modules, cfg.model.name_or_path, cfg.model.revision)
    tokenizer.save_pretrained(folder)
    atomic_write_text(folder / "lora_config.yaml", config_to_yaml(cfg))
    if state is not None:
        atomic_write_text(folder / "trainer_state.json", json.dumps(asdict(state), indent=2) + "\n")


def save_checkpoint(out: Path, model, tokenizer, cfg: Config, target_modules, state: TrainState) -> Path:
    final = out / f"checkpoint-{state.global_step}"
    with atomic_dir(final, overwrite=True) as tmp:
        save_adapter_folder(tmp, model, tokenizer, cfg, target_modules, state)
    prune_checkpoints(out, cfg.train.save_total_limit)
    return final


def prune_checkpoints(out: Path, limit: int | None) -> None:
    if not limit:
        return
    checkpoints = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    for old in checkpoints[:-limit]:
        shutil.rmtree(old, ignore_errors=True)
