"""Reading `adapter_config.json`: the LoRA settings it holds, checked field by field (type, range, regex keys) and
refused by name where it asks for a PEFT feature lora-cli's layers would silently compute differently."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError
from .inject import LoraSettings
from .layout import CONFIG_NAME


@dataclass
class AdapterConfig:
    settings: LoraSettings
    base_model_name_or_path: str | None
    revision: str | None
    raw: dict


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
    _refuse_unsupported(raw, path)
    if "r" not in raw or "lora_alpha" not in raw:
        raise UserError(f"{path} lacks 'r' or 'lora_alpha'; both are needed to apply a LoRA adapter.")
    _check_field_types(raw, path)
    layers = raw.get("layers_to_transform")
    return LoraSettings(
        r=raw["r"],
        alpha=float(raw["lora_alpha"]),
        dropout=float(raw.get("lora_dropout") or 0.0),
        target_modules=raw.get("target_modules"),
        use_rslora=bool(raw.get("use_rslora")),
        use_dora=bool(raw.get("use_dora")),
        init="gaussian" if raw.get("init_lora_weights") == "gaussian" else "default",
        layers_to_transform=[layers] if isinstance(layers, int) else layers,
        rank_pattern=dict(raw.get("rank_pattern") or {}),
        alpha_pattern={key: float(value) for key, value in (raw.get("alpha_pattern") or {}).items()},
    )


# PEFT features that change which weights exist or what the layer computes; lora-cli's layers would silently
# compute something else, so an adapter that uses one is refused by name.
_UNSUPPORTED_FEATURES = {
    "modules_to_save": "fully trained modules",
    "lora_bias": "trained LoRA biases",
    "layer_replication": "replicated layers",
    "trainable_token_indices": "trained token embeddings",
    "target_parameters": "LoRA on parameters rather than modules",
    "alora_invocation_tokens": "Activated LoRA",
    "use_qalora": "QA-LoRA",
    "use_bdlora": "block-diagonal LoRA",
    "arrow_config": "Arrow routing",
    "kasa_config": "KaSA",
    "monteclora_config": "MonteCLoRA",
}


# Initialisations that subtract the initial B·A from the base weights: PEFT redoes that on load; we do not.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def _refuse_unsupported(raw: dict, path: Path) -> None:
    unsupported = [f"{key}={raw[key]!r} ({what})" for key, what in _UNSUPPORTED_FEATURES.items() if raw.get(key)]
    if raw.get("bias") not in (None, "none"):
        unsupported.append(f"bias={raw['bias']!r} (trained biases)")
    if raw.get("layers_pattern") and raw.get("layers_to_transform") is not None:
        unsupported.append(f"layers_pattern={raw['layers_pattern']!r}")
    init = raw.get("init_lora_weights")
    if isinstance(init, str) and init.startswith(_BASE_CHANGING_INITS):
        unsupported.append(
            f"init_lora_weights={init!r} (this initialisation also changed the base weights, so the adapter "
            "does not apply to the original base; PEFT converts it with save_pretrained(..., "
            "path_initial_model_for_weight_conversion=...))"
        )
    if unsupported:
        raise UserError(f"{path} uses features lora-cli does not support: {'; '.join(unsupported)}.")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:  # JSON has NaN and Infinity too; neither is a usable alpha or rank
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_name_list(value) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _is_pattern(check):
    return lambda value: isinstance(value, dict) and all(check(item) for item in value.values())


# key -> (the check a present, non-null value must pass, what the message says it must be)
_FIELD_TYPES = {
    "r": (lambda v: _is_int(v) and v > 0, "a positive whole number such as 8"),
    "lora_alpha": (_is_number, "a number such as 16"),
    "lora_dropout": (lambda v: _is_number(v) and 0 <= v <= 1, "a number from 0 to 1 such as 0.05"),
    "target_modules": (lambda v: isinstance(v, str) or _is_name_list(v),
                       'a list of module names such as ["q_proj", "v_proj"], or one regex string'),
    "exclude_modules": (lambda v: isinstance(v, str) or _is_name_list(v),
                        'a list of module names such as ["o_proj"], or one regex string'),
    "use_rslora": (lambda v: isinstance(v, bool), "true or false"),
    "use_dora": (lambda v: isinstance(v, bool), "true or false"),
    "fan_in_fan_out": (lambda v: isinstance(v, bool), "true or false"),
    "init_lora_weights": (lambda v: isinstance(v, (bool, str)), 'true, false or a method name such as "gaussian"'),
    "layers_to_transform": (lambda v: (_is_int(v) and v >= 0) or (isinstance(v, list) and all(
        _is_int(i) and i >= 0 for i in v)), "a layer index or a list of layer indices such as [0, 1]"),
    "rank_pattern": (_is_pattern(lambda v: _is_int(v) and v > 0),
                     'an object mapping module names to positive whole numbers, such as {"q_proj": 16}'),
    "alpha_pattern": (_is_pattern(_is_number), 'an object mapping module names to numbers, such as {"q_proj": 32}'),
    "base_model_name_or_path": (lambda v: isinstance(v, str), "a model name or folder, as a string"),
    "revision": (lambda v: isinstance(v, str), "a Hub branch, tag or commit, as a string"),
}


def _check_field_types(raw: dict, path: Path) -> None:
    """Each field lora-cli reads must have the type PEFT writes (null stands for the default): a hand-edited
    `"lora_alpha": "sixteen"` is named here, not met later as a Python error."""
    problems = [f"{key} must be {expected} (got {json.dumps(raw[key])})"
                for key, (check, expected) in _FIELD_TYPES.items() if raw.get(key) is not None and not check(raw[key])]
    problems += _bad_pattern_keys(raw)
    if problems:
        raise UserError(
            f"{path} has {len(problems)} invalid field{'s' if len(problems) > 1 else ''}: {'; '.join(problems)}. "
            "Correct the file, or re-save the adapter with the tool that trained it."
        )


def _bad_pattern_keys(raw: dict) -> list[str]:
    """rank_pattern/alpha_pattern keys are regular expressions (PEFT matches them against the end of each module
    path, as inject.pattern_value does): one that does not compile is named, not met later as re.error."""
    problems = []
    for field in ("rank_pattern", "alpha_pattern"):
        patterns = raw.get(field)
        for key in patterns if isinstance(patterns, dict) else ():
            try:
                re.compile(key)  # first alone, so that the error's position is the key's own
                re.compile(rf"(.*\.)?({key})$")
            except re.error as err:
                problems.append(f"{field} key {json.dumps(key)} is not a valid regular expression ({err}); use a "
                                'module name such as "q_proj" or a valid regex')
    return problems
