"""Adapter folders in PEFT's format: `adapter_config.json` + `adapter_model.safetensors`.

What we write loads in PEFT, vLLM and llama.cpp's converter; what PEFT writes loads here. Loading is strict
(PEFT only warns about missing keys, which leaves users with a silent no-op adapter): every tensor must be
known, present and of the right shape, or one error lists each offending tensor.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import UserError
from .fsutil import atomic_file, atomic_write_text
from .inject import (
    InjectionReport,
    LoraSettings,
    apply_lora,
    lora_layers,
    lora_state_dict,
    pattern_value,
    resolve_target_paths,
)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
PREFIX = "base_model.model."
_LORA_KEYS = ("lora_A.weight", "lora_B.weight")
_DORA_KEY = "lora_magnitude_vector"


@dataclass
class AdapterConfig:
    settings: LoraSettings
    base_model_name_or_path: str | None
    revision: str | None
    raw: dict


# --- writing -------------------------------------------------------------------------------------------------


def adapter_config_dict(
    model: nn.Module, settings: LoraSettings, target_modules, base_model_name_or_path: str | None,
    revision: str | None = None,
) -> dict:
    """The adapter_config.json content: only keys every PEFT since 0.10 knows (older ones raise on new keys)."""
    layers = lora_layers(model)
    return {
        "alpha_pattern": dict(settings.alpha_pattern),
        "base_model_name_or_path": base_model_name_or_path,
        "bias": "none",
        "fan_in_fan_out": any(layer.fan_in_fan_out for layer in layers.values()),
        "inference_mode": True,
        "init_lora_weights": "gaussian" if settings.init == "gaussian" else True,
        "layer_replication": None,
        "layers_pattern": None,
        "layers_to_transform": settings.layers_to_transform,
        "loftq_config": {},
        "lora_alpha": settings.alpha,
        "lora_dropout": settings.dropout,
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": settings.r,
        "rank_pattern": dict(settings.rank_pattern),
        "revision": revision,
        "target_modules": target_modules,
        "task_type": "CAUSAL_LM",
        "use_dora": settings.use_dora,
        "use_rslora": settings.use_rslora,
    }


def save_adapter(
    model: nn.Module,
    out_dir: str | Path,
    settings: LoraSettings,
    target_modules,
    base_model_name_or_path: str | None,
    revision: str | None = None,
) -> Path:
    """Write the adapter files into `out_dir`, each atomically (temp name, then rename)."""
    out_dir = Path(out_dir)
    tensors = {PREFIX + k: v.detach().to("cpu").contiguous().clone() for k, v in lora_state_dict(model).items()}
    if not tensors:
        raise UserError("The model has no LoRA layers to save.")
    config = adapter_config_dict(model, settings, target_modules, base_model_name_or_path, revision)
    with atomic_file(out_dir / WEIGHTS_NAME) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    atomic_write_text(out_dir / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out_dir


# --- reading -------------------------------------------------------------------------------------------------


def read_adapter_config(adapter_dir: str | Path) -> AdapterConfig:
    adapter_dir = Path(adapter_dir)
    path = adapter_dir / CONFIG_NAME
    if not adapter_dir.is_dir():
        raise UserError(f"Adapter folder {adapter_dir} does not exist. Pass the folder that holds {CONFIG_NAME}.")
    if not path.is_file():
        raise UserError(
            f"{adapter_dir} has no {CONFIG_NAME}, so it is not an adapter folder. Pass the folder lora-train wrote "
            f"(its output_dir or a checkpoint-<step> inside it) or one saved by PEFT."
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not valid JSON ({err}). Re-save the adapter.") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path} must hold a JSON object.")
    return AdapterConfig(_settings_from_config(raw, path), raw.get("base_model_name_or_path"), raw.get("revision"), raw)


def _settings_from_config(raw: dict, path: Path) -> LoraSettings:
    peft_type = raw.get("peft_type")
    if peft_type != "LORA":
        raise UserError(
            f"{path} is a '{peft_type}' adapter; lora-cli reads LoRA adapters only (peft_type \"LORA\")."
        )
    unsupported = []
    if raw.get("modules_to_save"):
        unsupported.append(f"modules_to_save={raw['modules_to_save']} (fully trained modules)")
    if raw.get("bias", "none") != "none":
        unsupported.append(f"bias={raw['bias']!r} (trained biases)")
    if raw.get("lora_bias"):
        unsupported.append("lora_bias=true")
    if raw.get("layer_replication"):
        unsupported.append("layer_replication")
    if raw.get("layers_pattern") and raw.get("layers_to_transform") is not None:
        unsupported.append(f"layers_pattern={raw['layers_pattern']!r}")
    if unsupported:
        raise UserError(f"{path} uses features lora-cli does not support: {'; '.join(unsupported)}.")
    if "r" not in raw or "lora_alpha" not in raw:
        raise UserError(f"{path} lacks 'r' or 'lora_alpha'; both are needed to apply a LoRA adapter.")
    layers = raw.get("layers_to_transform")
    return LoraSettings(
        r=int(raw["r"]),
        alpha=float(raw["lora_alpha"]),
        dropout=float(raw.get("lora_dropout") or 0.0),
        target_modules=raw.get("target_modules"),
        use_rslora=bool(raw.get("use_rslora", False)),
        use_dora=bool(raw.get("use_dora", False)),
        init="gaussian" if raw.get("init_lora_weights") == "gaussian" else "default",
        layers_to_transform=[layers] if isinstance(layers, int) else layers,
        rank_pattern=dict(raw.get("rank_pattern") or {}),
        alpha_pattern=dict(raw.get("alpha_pattern") or {}),
    )


def read_adapter_tensors(adapter_dir: str | Path) -> dict[str, torch.Tensor]:
    adapter_dir = Path(adapter_dir)
    path = adapter_dir / WEIGHTS_NAME
    if path.is_file():
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise UserError(f"{path} is not a readable safetensors file ({err}). Re-save or re-download it.") from None
    legacy = adapter_dir / LEGACY_WEIGHTS_NAME
    if legacy.is_file():  # adapters from PEFT before safetensors became its default
        try:
            return torch.load(legacy, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises several unrelated types for a bad pickle
            raise UserError(f"{legacy} could not be read ({err}). Re-save the adapter.") from None
    raise UserError(f"{adapter_dir} has {CONFIG_NAME} but no {WEIGHTS_NAME}; the adapter's weights are missing.")


def _expected_shapes(model: nn.Module, paths: list[str], use_dora: bool, ranks: dict[str, int]) -> dict:
    shapes = {}
    for path in paths:
        module = model.get_submodule(path)
        # nn.Linear's features, not its weight's shape: a 4-bit (QLoRA) weight is packed, two values per byte.
        out_f, in_f = (module.weight.shape[1], module.weight.shape[0]) if not isinstance(module, nn.Linear) \
            else (module.out_features, module.in_features)
        shapes[f"{PREFIX}{path}.lora_A.weight"] = (ranks[path], in_f)
        shapes[f"{PREFIX}{path}.lora_B.weight"] = (out_f, ranks[path])
        if use_dora:
            shapes[f"{PREFIX}{path}.{_DORA_KEY}"] = (out_f,)
    return shapes


def _normalise_key(key: str) -> str:
    """PEFT writes no adapter name, but some tools leave `.default` in; accept both spellings."""
    return key.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.") \
        .replace(f".{_DORA_KEY}.default", f".{_DORA_KEY}")


def load_adapter(model: nn.Module, adapter_dir: str | Path) -> tuple[AdapterConfig, InjectionReport]:
    """Apply the adapter in `adapter_dir` to `model` (LoRA layers unmerged), strictly."""
    config = read_adapter_config(adapter_dir)
    tensors = {_normalise_key(k): v for k, v in read_adapter_tensors(adapter_dir).items()}
    settings = config.settings
    where = Path(adapter_dir) / WEIGHTS_NAME
    try:
        paths, _ = resolve_target_paths(model, settings, strict=False)
    except UserError as err:
        raise UserError(f"The adapter in {adapter_dir} does not fit this base model: {err}") from None
    ranks = {p: int(pattern_value(p, settings.rank_pattern, settings.r)) for p in paths}
    expected = _expected_shapes(model, paths, settings.use_dora, ranks)
    problems = []
    for key, shape in expected.items():
        if key not in tensors:
            problems.append(f"missing {key} (expected shape {list(shape)})")
        elif tuple(tensors[key].shape) != shape:
            problems.append(f"{key}: expected shape {list(shape)}, found {list(tensors[key].shape)}")
    for key in tensors:
        if key not in expected:
            problems.append(f"unexpected {key} (shape {list(tensors[key].shape)}): no such LoRA module in this base")
    if problems:
        listing = "\n  - ".join(problems[:20]) + (f"\n  - ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise UserError(
            f"The adapter {where} does not match this base model ({len(problems)} problems):\n  - {listing}\n"
            f"Check that the base model is the one the adapter was trained on (adapter_config.json says "
            f"{config.base_model_name_or_path!r})."
        )
    report = apply_lora(model, settings, paths=paths)
    state = {key[len(PREFIX):]: tensor for key, tensor in tensors.items()}
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in state:
                param.copy_(state[name].to(param.dtype))
    return config, report
