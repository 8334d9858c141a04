"""Adapter folders in PEFT's format: `adapter_config.json` + `adapter_model.safetensors`.

What we write loads in PEFT, vLLM and llama.cpp's converter; what PEFT writes loads here. Loading is strict
(PEFT only warns about missing keys, which leaves users with a silent no-op adapter): every tensor must be
known, present and of the right shape, or one error lists each offending tensor.
"""

from __future__ import annotations

import json
import math
import re
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
_MAX_LISTED = 10  # tensor names quoted in one error message


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
        "fan_in_fan_out": any(layer.checkpoint_fan_in_fan_out for layer in layers.values()),
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
    out_dir.mkdir(parents=True, exist_ok=True)
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


def read_adapter_tensors(adapter_dir: str | Path) -> dict[str, torch.Tensor]:
    """The adapter's tensors, refused unless every one is a finite floating-point tensor: a NaN adapter loads
    "strictly" and then generates empty text, so it is stopped here, before any slow work."""
    adapter_dir = Path(adapter_dir)
    path = adapter_dir / WEIGHTS_NAME
    if path.is_file():
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise UserError(f"{path} is not a readable safetensors file ({err}). Re-save or re-download it.") from None
    elif (adapter_dir / LEGACY_WEIGHTS_NAME).is_file():  # adapters from PEFT before safetensors became its default
        path = adapter_dir / LEGACY_WEIGHTS_NAME
        try:
            tensors = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises several unrelated types for a bad pickle
            raise UserError(f"{path} could not be read ({err}). Re-save the adapter.") from None
        if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
            raise UserError(f"{path} does not hold a dictionary of tensors, so it is not an adapter. Re-save it.")
    else:
        raise UserError(f"{adapter_dir} has {CONFIG_NAME} but no {WEIGHTS_NAME}; the adapter's weights are missing.")
    _check_tensor_values(tensors, path)
    return tensors


# What LoRA weights are saved in (float64 too: a hand-made adapter, harmless); float8 cannot even be checked for NaN.
_LORA_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_tensor_values(tensors: dict[str, torch.Tensor], path: Path) -> None:
    def listing(names: list[str]) -> str:
        shown = ", ".join(names[:_MAX_LISTED])
        return shown + (f" and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else "")

    not_float = [f"{key} ({str(tensor.dtype).removeprefix('torch.')})" for key, tensor in tensors.items()
                 if tensor.dtype not in _LORA_DTYPES]
    if not_float:
        raise UserError(
            f"{path} holds {len(not_float)} tensor{'s' * (len(not_float) > 1)} that {'are' if len(not_float) > 1 else 'is'} "
            f"not float32, float16 or bfloat16: {listing(not_float)}. "
            "LoRA weights are stored in one of those (float8 or integer tensors are a damaged file, or a "
            "quantized export lora-cli cannot read). Re-save the adapter in float32, float16 or bfloat16."
        )
    non_finite = [k for k, v in tensors.items() if not bool(torch.isfinite(v).all())]
    if non_finite:
        raise UserError(
            f"{path} holds non-finite values (NaN or inf) in {len(non_finite)} of its {len(tensors)} tensors: "
            f"{listing(non_finite)}. Such an adapter only produces garbage; training probably diverged (check the "
            "loss in the run's metrics.jsonl). Use an earlier checkpoint-<step> folder, or retrain with a lower "
            "learning rate."
        )


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


def normalise_key(key: str) -> str:
    """PEFT writes no adapter name, but some tools leave `.default` in; accept both spellings."""
    return key.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.") \
        .replace(f".{_DORA_KEY}.default", f".{_DORA_KEY}")


def _without_excluded(paths: list[str], exclude, config_path: Path) -> list[str]:
    """PEFT's exclude_modules: a regex matched against the whole module path, or names matched as its end."""
    if not exclude:
        return paths
    if isinstance(exclude, str):
        try:
            regex = re.compile(exclude)
        except re.error as err:
            raise UserError(f"{config_path}: exclude_modules {exclude!r} is not a valid regular expression ({err}).") \
                from None
        kept = [p for p in paths if not regex.fullmatch(p)]
    else:
        kept = [p for p in paths if not any(p == name or p.endswith("." + name) for name in exclude)]
    if not kept:
        raise UserError(
            f"{config_path}: exclude_modules={exclude!r} excludes every module target_modules selects, so the "
            "adapter would change nothing. Correct the file, or re-save the adapter."
        )
    return kept


BASE_LAYER = ".base_layer."


def base_layer_copies(model: nn.Module, tensors: dict[str, torch.Tensor], paths: list[str], where: Path) -> set[str]:
    """The adapter's full copies of a targeted layer's own weights (`base_model.model.lm_head.base_layer.weight`).

    PEFT writes them when target_modules names lm_head or embed_tokens (save_embedding_layers="auto", its default),
    and PEFT's loader puts them in place of the base's weights. A copy equal to the base's weight changes nothing
    and is ignored; one that differs means a modified head, which a LoRA merge cannot reproduce: refused. On the
    meta-device model (the streamed merge) the values are compared as each weight is read (merge_stream)."""
    copies, targeted = set(), set(paths)
    for key, tensor in tensors.items():
        path, _, param = key[len(PREFIX):].rpartition(BASE_LAYER)
        if not key.startswith(PREFIX) or path not in targeted or param != "weight":
            continue
        base = getattr(model.get_submodule(path), param, None)
        if not isinstance(base, torch.Tensor) or tuple(base.shape) != tuple(tensor.shape):
            continue  # reported as unexpected
        if base.is_floating_point() and not base.is_meta and not same_values(base.detach(), tensor):
            raise modified_copy_error(key, where)
        copies.add(key)
    return copies


def same_values(base: torch.Tensor, copy: torch.Tensor) -> bool:
    """Equal up to the rounding of the one dtype into the other (a bf16 base copied by a model loaded in fp32, or
    an fp32 base copied by a bf16 model)."""
    return torch.equal(copy.to(base.dtype), base) or torch.equal(base.to(copy.dtype), copy)


def modified_copy_error(key: str, where: Path) -> UserError:
    return UserError(
        f"The adapter {where} holds {key}, a full copy of the base model's weight, and it differs from the base's "
        "own. PEFT saves such copies (save_embedding_layers, \"auto\" when target_modules names lm_head or "
        "embed_tokens) and its loader puts them in place of the base's weights, so this adapter comes with a modified "
        "output head or embedding, or was saved from another base. lora-cli applies LoRA updates only. Use the base "
        "the adapter was trained on (--base), or, if that layer was not meant to change, re-save the adapter with "
        "save_pretrained(..., save_embedding_layers=False)."
    )


def load_adapter(
    model: nn.Module, adapter_dir: str | Path, tensors: dict[str, torch.Tensor] | None = None
) -> tuple[AdapterConfig, InjectionReport]:
    """Apply the adapter in `adapter_dir` to `model` (LoRA layers unmerged), strictly. `tensors`: the result of
    read_adapter_tensors(adapter_dir) when the caller read them already (to fail before loading the model)."""
    config = read_adapter_config(adapter_dir)
    tensors = tensors if tensors is not None else read_adapter_tensors(adapter_dir)
    tensors = {normalise_key(k): v for k, v in tensors.items()}
    settings = config.settings
    where = Path(adapter_dir) / WEIGHTS_NAME
    try:
        paths, _ = resolve_target_paths(model, settings, strict=False)
    except UserError as err:
        raise UserError(f"The adapter in {adapter_dir} does not fit this base model: {err}") from None
    paths = _without_excluded(paths, config.raw.get("exclude_modules"), Path(adapter_dir) / CONFIG_NAME)
    ranks = {p: int(pattern_value(p, settings.rank_pattern, settings.r)) for p in paths}
    expected = _expected_shapes(model, paths, settings.use_dora, ranks)
    problems = []
    for key, shape in expected.items():
        if key not in tensors:
            problems.append(f"missing {key} (expected shape {list(shape)})")
        elif tuple(tensors[key].shape) != shape:
            problems.append(f"{key}: expected shape {list(shape)}, found {list(tensors[key].shape)}")
    copies = base_layer_copies(model, tensors, paths, where)
    for key in tensors:
        if key not in expected and key not in copies:
            problems.append(f"unexpected {key} (shape {list(tensors[key].shape)}): no such LoRA module in this base")
    if problems:
        listing = "\n  - ".join(problems[:20]) + (f"\n  - ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise UserError(
            f"The adapter {where} does not match this base model ({len(problems)} problems):\n  - {listing}\n"
            f"Check that the base model is the one the adapter was trained on (adapter_config.json says "
            f"{config.base_model_name_or_path!r})."
        )
    report = apply_lora(model, settings, paths=paths)
    state = {key[len(PREFIX):]: tensor for key, tensor in tensors.items() if key not in copies}
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in state:
                param.copy_(state[name].to(param.dtype))
    return config, report
