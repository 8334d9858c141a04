"""The loader: where lora-train, lora-merge, lora-generate and --estimate get base models, tokenizers and
adapters, so they see the same model the same way (4-bit loading in quantization.py; what is wrong with damaged
model files in model_files.py; the dtype a model is loaded in is precision.py's).

`load_model` composes tokenizer + base model + optional adapter for lora-merge and lora-generate. Where a model
comes from (`ModelSource`: name or folder, Hub revision, trust_remote_code) is passed the same way to the
tokenizer, the config lookup and the weights, so a pinned revision or remote code is never dropped halfway.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError

from .adapter import load_adapter, read_adapter_tensors
from .adapter_config import AdapterConfig, read_adapter_config
from .chat_templates import use_folder_template
from .errors import ModelNotFound, UserError
from .inject import InjectionReport, merge_lora
from .layout import CONFIG_NAME
from .model_files import damaged_error, damaged_weight_files, unpickling_error
from .precision import DTYPE_ALIASES, DTYPES, dtype_name
from .quantization import check_4bit_support, keep_standard_4bit_layout, quantization_kwargs


def stored_dtype(name_or_path: str, revision: str | None = None, trust_remote_code: bool = False) -> torch.dtype | None:
    """The dtype the model's config.json says its weights are stored in (`dtype`, formerly `torch_dtype`)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError):
        return None
    for cfg in (config, getattr(config, "get_text_config", lambda: None)()):
        value = getattr(cfg, "dtype", None) if cfg is not None else None
        if isinstance(value, str):
            value = DTYPE_ALIASES.get(value.lower())
        if isinstance(value, torch.dtype) and value in DTYPES.values():
            return value
    return None


def check_source(name_or_path: str, what: str = "model.name_or_path") -> None:
    path = Path(name_or_path).expanduser()
    looks_local = path.is_absolute() or name_or_path.startswith((".", "~")) or path.exists()
    if looks_local and not path.exists():
        raise UserError(f"{what} '{name_or_path}' does not exist. Pass a local model folder or a Hub model name.")
    if path.is_file():
        raise UserError(
            f"{what} '{name_or_path}' is a file; pass the folder that holds config.json (a Hugging Face model "
            "folder) or a Hub model name."
        )
    if path.is_dir() and not (path / "config.json").is_file():
        if (path / CONFIG_NAME).is_file():  # the most common mix-up: an adapter where its base belongs
            hint = ("pass it with --adapter and give the base model here" if what == "MODEL" else
                    f"give the base model it was trained on here (its {CONFIG_NAME} names it as "
                    "base_model_name_or_path)")
            raise UserError(f"{what} '{name_or_path}' is an adapter folder (it holds {CONFIG_NAME}), not a base "
                            f"model: {hint}.")
        raise UserError(
            f"{what} '{name_or_path}' is a folder without config.json, so not a Hugging Face model folder. Pass the "
            "folder that holds the model's config.json and weights, or a Hub model name."
        )
    if path.is_dir():
        _check_config_json(path / "config.json")
        _check_config_fields(path / "config.json")


# Sizes every causal LM's config.json gives; 0 or less makes transformers divide by zero or assert (tracebacks).
_SIZE_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "head_dim", "intermediate_size", "n_embd", "n_layer", "n_head", "d_model")


def nonpositive_sizes(fields: dict) -> list[str]:
    """'name: value' for each size field of a config.json dict (or its text_config) that is 0 or less."""
    text = fields.get("text_config") if isinstance(fields.get("text_config"), dict) else {}
    fields = {**fields, **text}
    return [f"{name}: {fields[name]}" for name in _SIZE_FIELDS
            if isinstance(fields.get(name), (int, float)) and not isinstance(fields.get(name), bool)
            and fields[name] <= 0]


def _check_config_json(path: Path) -> None:
    """transformers reports a broken config.json vaguely, or (for a JSON list) with a TypeError: name the file."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(
            f"{path} is not valid JSON ({err}). The model's configuration is damaged: re-download or re-save the model."
        ) from None
    except OSError as err:
        raise UserError(f"{path} cannot be read ({err.strerror or err}). Check the file's permissions.") from None
    if not isinstance(config, dict):
        raise UserError(
            f"{path} must hold a JSON object (the model's configuration), not a {type(config).__name__}. "
            "Re-download or re-save the model."
        )
    bad = nonpositive_sizes(config)
    if bad:
        raise UserError(f"{path} has sizes that describe no model ({', '.join(bad)}; each must be a positive number). "
                        "Fix the field (compare with the model's original config.json) or re-download the model.")


def _check_config_fields(path: Path) -> None:
    """transformers checks the types of config.json's fields (`hidden_size: "big"`) and raises huggingface_hub's
    validation error, which is neither an OSError nor a ValueError: name the file and the field instead."""
    from transformers import AutoConfig

    try:
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:  # an older huggingface_hub: transformers did not validate field types then
        return
    try:
        AutoConfig.from_pretrained(path.parent)
    except StrictDataclassError as err:
        detail = " ".join(line.strip() for line in str(err).strip().splitlines())
        raise UserError(f"{path} has a field transformers refuses: {detail}. Fix that field (compare with the "
                        "model's original config.json) or re-download the model.") from None
    except Exception:  # anything else (remote code, an unknown model type) is reported by the load itself
        return


def _load_error(name_or_path: str, err: Exception, what: str) -> ModelNotFound:
    first_line = str(err).strip().splitlines()[0].rstrip(".") if str(err).strip() else type(err).__name__
    if Path(name_or_path).expanduser().is_dir():
        advice = "Check that the folder holds a complete Hugging Face model; re-download or re-save it if not."
    else:
        advice = ("If it is a Hub name, check the spelling and that the Hub is reachable (or the model is in the "
                  "local cache); otherwise pass a local model folder.")
    return ModelNotFound(f"Could not load {what} '{name_or_path}': {first_line}. {advice}")


def load_tokenizer(name_or_path: str, revision: str | None = None, trust_remote_code: bool = False):
    """The tokenizer, with a pad token guaranteed (falls back to eos, as most chat models expect)."""
    from transformers import AutoTokenizer

    check_source(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise _load_error(name_or_path, err, "the tokenizer of") from None
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise UserError(
                f"The tokenizer of '{name_or_path}' has neither a pad nor an eos token; lora-cli needs one."
            )
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(
    name_or_path: str,
    dtype: torch.dtype = torch.float32,
    revision: str | None = None,
    trust_remote_code: bool = False,
    device: str | None = None,
    load_in_4bit: bool = False,
    compute_dtype: torch.dtype | None = None,
):
    """A causal LM with frozen weights in `dtype`, in eval mode, on `device` (or CPU).

    With `load_in_4bit` the linear layers of the decoder are NF4 4-bit (QLoRA; see `quantization_kwargs`) and
    compute in `compute_dtype` (default: `dtype`); everything else is in `dtype`.
    """
    from transformers import AutoModelForCausalLM

    check_source(name_or_path)
    extra = quantization_kwargs(compute_dtype or dtype, device) if load_in_4bit else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path, dtype=dtype, revision=revision, trust_remote_code=trust_remote_code, **extra
        )
    except Exception as err:  # what transformers raises for a damaged file varies: look at the files themselves
        if isinstance(err, pickle.UnpicklingError) and "weights only" in str(err).lower():
            raise unpickling_error(name_or_path, err) from None
        damaged = damaged_weight_files(name_or_path, revision)
        if damaged:
            raise damaged_error(name_or_path, revision, damaged) from None
        if isinstance(err, RuntimeError) and "ignore_mismatched_sizes" in str(err):
            raise UserError(
                f"The weights of '{name_or_path}' do not fit its config.json: a tensor has another shape than the "
                "config asks for, so the folder mixes files of different models. Re-download or re-save the model."
            ) from None
        if isinstance(err, (OSError, ValueError, KeyError, SafetensorError)):
            raise _load_error(name_or_path, err, "the model") from None
        raise
    for param in model.parameters():
        param.requires_grad_(False)
    if load_in_4bit:
        keep_standard_4bit_layout(model)
    elif device is not None:  # a 4-bit model is placed by its device_map; transformers refuses to move it
        model.to(device)
    return model.eval()


def build_meta_model(hf_config, trust_remote_code: bool = False):
    """The model with every tensor on the meta device: shapes without memory."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(hf_config, trust_remote_code=trust_remote_code)


def load_base_shapes(name_or_path: str, dtype: torch.dtype = torch.float32, revision: str | None = None,
                     trust_remote_code: bool = False):
    """What `load_base_model` gives, without the weights: every parameter on the meta device in the dtype loading
    would give it (including the parameters a model keeps in fp32), the buffers real (they are computed, not read:
    the rotary embedding's frequencies), the generation config the weights' folder has. For an FSDP process whose
    weights come from process 0 (CPU-RAM-efficient loading): it never holds the whole model."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    check_source(name_or_path)
    try:
        config = AutoConfig.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as err:
        raise _load_error(name_or_path, err, "the model") from None
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    _keep_fp32_parameters(model, dtype)
    model.generation_config = generation_config(name_or_path, revision, model.config)
    for param in model.parameters():
        param.requires_grad_(False)
    return model.eval()


def _keep_fp32_parameters(model, dtype: torch.dtype) -> None:
    """The parameters transformers' loading keeps in fp32 (a model's _keep_in_fp32_modules in fp16, its
    _keep_in_fp32_modules_strict in both half types: MoE routers' biases), matched as its loading matches them.
    Should this private API move, the caller's comparison with process 0 still catches a difference."""
    try:
        from transformers.core_model_loading import build_glob_alternation

        plan = model._get_dtype_plan(dtype)
    except (ImportError, AttributeError):
        return
    if not plan:
        return
    pattern, group_names, _ = build_glob_alternation(list(plan))
    for name, param in model.named_parameters():
        found = pattern.search(name)
        if found is not None:
            param.data = param.data.to(plan[group_names[found.lastgroup]])


def generation_config(name_or_path: str, revision: str | None, config):
    """The generation config `from_pretrained` attaches: the folder's generation_config.json, else the one the
    model's config implies."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(name_or_path, revision=revision)
    except OSError:
        return GenerationConfig.from_model_config(config)


# --- base + adapter, for lora-merge and lora-generate -----------------------------------------------------------------


@dataclass(frozen=True)
class ModelSource:
    name_or_path: str
    revision: str | None = None  # Hub branch, tag or commit; None = the default branch
    trust_remote_code: bool = False


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    adapter: AdapterConfig | None = None
    report: InjectionReport | None = None  # which modules the adapter wraps


def base_source_of_adapter(adapter_dir: str | Path, base: str | None, revision: str | None = None,
                           trust_remote_code: bool = False) -> ModelSource:
    """The base an adapter applies to: `base` if given, else the adapter's base_model_name_or_path (and revision)."""
    config = read_adapter_config(adapter_dir)
    if base is not None:
        return ModelSource(base, revision, trust_remote_code)
    if not config.base_model_name_or_path:
        raise UserError(
            f"{Path(adapter_dir) / CONFIG_NAME} does not name its base model (base_model_name_or_path is "
            "empty); pass the base with --base MODEL."
        )
    return ModelSource(config.base_model_name_or_path, revision or config.revision, trust_remote_code)


def load_model(
    source: ModelSource,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | None = None,
    adapter_dir: str | Path | None = None,
    merge: bool = False,
    load_in_4bit: bool = False,
    log: Callable[[str], None] | None = None,
    what: str = "model.name_or_path",
) -> LoadedModel:
    """The tokenizer and the frozen base in `dtype` on `device`, with the adapter's LoRA layers applied (unmerged,
    or folded into the weights when `merge`). A missing or broken adapter fails before the (slow) model load.
    `what`: how errors name the model source to the user (lora-generate's argument is MODEL).
    `load_in_4bit`: the base's linear layers in NF4 4-bit, computing in `dtype` (QLoRA's base; the adapter stays
    unmerged, since folding it into 4-bit weights would re-round them)."""
    log = log or (lambda message: None)
    if merge and adapter_dir is None:
        raise UserError("--merge merges an adapter into the model in memory; it needs --adapter DIR.")
    if merge and load_in_4bit:
        raise UserError(
            "--merge and --load-in-4bit do not go together: folding the adapter into 4-bit weights would round them "
            "again and change the model. Drop --merge (the adapter then runs unmerged, with the same output), or "
            "merge into the unquantized base with lora-merge and generate from that folder."
        )
    if load_in_4bit:
        check_4bit_support("--load-in-4bit")
    adapter_tensors = None
    if adapter_dir is not None:
        read_adapter_config(adapter_dir)
        adapter_tensors = read_adapter_tensors(adapter_dir)  # refuses damaged or non-finite weights
    check_source(source.name_or_path, what)
    tokenizer = load_tokenizer(source.name_or_path, source.revision, source.trust_remote_code)
    if adapter_dir is not None and use_folder_template(tokenizer, adapter_dir):
        log(f"chat template: the one {adapter_dir} was trained with (data.chat_template)")
    where = f"{device or 'cpu'}, {dtype_name(dtype)}" + (", linear layers in 4-bit NF4" if load_in_4bit else "")
    at_revision = f" at revision {source.revision}" if source.revision else ""
    log(f"loading {source.name_or_path}{at_revision} ({where})")
    model = load_base_model(source.name_or_path, dtype, source.revision, source.trust_remote_code, device=device,
                            load_in_4bit=load_in_4bit)
    loaded = LoadedModel(model, tokenizer)
    if adapter_dir is not None:
        loaded.adapter, loaded.report = load_adapter(model, adapter_dir, adapter_tensors)
        merged = ", merged in memory" if merge else ""
        log(f"adapter {adapter_dir}: {len(loaded.report.wrapped)} LoRA modules{merged}")
        if merge:
            merge_lora(model)
    return loaded
