"""Adapter folders in PEFT's format: `adapter_config.json` + `adapter_model.safetensors`.

What we write loads in PEFT, vLLM and llama.cpp's converter; what PEFT writes loads here. Loading is strict
(PEFT only warns about missing keys, which leaves users with a silent no-op adapter): every tensor must be
known, present and of the right shape, or one error lists each offending tensor.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .adapter_config import AdapterConfig, read_adapter_config
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
from .layout import CONFIG_NAME, LEGACY_WEIGHTS_NAME, WEIGHTS_NAME
from .precision import dtype_name

KEY_PREFIX = "base_model.model."  # PEFT's tensor names: the model's own module paths under this prefix
_DORA_KEY = "lora_magnitude_vector"
_MAX_LISTED = 10  # tensor names quoted in one error message


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
    lora_tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write the adapter files into `out_dir`, each atomically (temp name, then rename). `lora_tensors`: the LoRA
    tensors when the caller gathered them (a sharded model's parameters are shards); else read from the model."""
    out_dir = Path(out_dir)
    lora_tensors = lora_state_dict(model) if lora_tensors is None else lora_tensors
    tensors = {KEY_PREFIX + k: v.detach().to("cpu").contiguous().clone() for k, v in lora_tensors.items()}
    if not tensors:
        raise UserError("The model has no LoRA layers to save.")
    config = adapter_config_dict(model, settings, target_modules, base_model_name_or_path, revision)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_file(out_dir / WEIGHTS_NAME) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    atomic_write_text(out_dir / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out_dir


# --- reading -------------------------------------------------------------------------------------------------


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
    elif (adapter_dir / LEGACY_WEIGHTS_NAME).is_file():
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

    not_float = [f"{key} ({dtype_name(tensor.dtype)})" for key, tensor in tensors.items()
                 if tensor.dtype not in _LORA_DTYPES]
    if not_float:
        raise UserError(
            f"{path} holds {len(not_float)} {'tensors that are' if len(not_float) > 1 else 'tensor that is'} not "
            f"float32, float16 or bfloat16: {listing(not_float)}. "
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
        shapes[f"{KEY_PREFIX}{path}.lora_A.weight"] = (ranks[path], in_f)
        shapes[f"{KEY_PREFIX}{path}.lora_B.weight"] = (out_f, ranks[path])
        if use_dora:
            shapes[f"{KEY_PREFIX}{path}.{_DORA_KEY}"] = (out_f,)
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
    meta-device model (the streamed merge) the values are compared as each weight is read (merge/stream.py)."""
    copies, targeted = set(), set(paths)
    for key, tensor in tensors.items():
        path, _, param = key[len(KEY_PREFIX):].rpartition(BASE_LAYER)
        if not key.startswith(KEY_PREFIX) or path not in targeted or param != "weight":
            continue
        base = getattr(model.get_submodule(path), param, None)
        if not isinstance(base, torch.Tensor) or tuple(base.shape) != tuple(tensor.shape):
            continue  # reported as unexpected
        if base.is_floating_point() and not base.is_meta and not same_values(base.detach(), tensor):
            raise modified_copy_error(key, where)
        copies.add(key)
    return copies


def same_values(base: torch.Tensor, copy: torch.Tensor, rows_per_chunk: int = 4096) -> bool:
    """Equal up to rounding: one dtype rounded into the other (a bf16 base copied by a model loaded in fp32), or two
    roundings of the same fp32 weights (a copy saved from a bf16 model, the base loaded in fp16 on a T4). Compared
    in fp32 a chunk of rows at a time: a 128k-token head is 2 GB in fp32."""
    if base.shape != copy.shape:
        return False
    # Each rounding moves a value by at most half its dtype's eps (relative), below the smallest normal number by
    # at most that number's spacing: the two may differ by the sum.
    eps = max(torch.finfo(base.dtype).eps, torch.finfo(copy.dtype).eps)
    tiny = max(torch.finfo(base.dtype).tiny, torch.finfo(copy.dtype).tiny)
    flat_base, flat_copy = base.reshape(base.shape[0], -1), copy.reshape(copy.shape[0], -1)
    for start in range(0, flat_base.shape[0], rows_per_chunk):
        a = flat_base[start : start + rows_per_chunk].float()
        b = flat_copy[start : start + rows_per_chunk].float()
        if not bool(((a - b).abs() <= eps * torch.maximum(a.abs(), b.abs()) + tiny).all()):
            return False
    return True


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
        more = f"\n  - ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        listing = "\n  - ".join(problems[:20]) + more
        raise UserError(
            f"The adapter {where} does not match this base model ({len(problems)} problems):\n  - {listing}\n"
            f"Check that the base model is the one the adapter was trained on (adapter_config.json says "
            f"{config.base_model_name_or_path!r})."
        )
    report = apply_lora(model, settings, paths=paths)
    state = {key[len(KEY_PREFIX):]: tensor for key, tensor in tensors.items() if key not in copies}
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in state:
                param.copy_(state[name].to(param.dtype))
    return config, report
