"""The one place that loads base models and tokenizers, and decides precision and dtype (4-bit loading in
quantization.py; what is wrong with damaged model files in model_files.py).

lora-train, lora-merge and lora-generate all load through here, so they see the same model the same way.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError

from .errors import ModelNotFound, UserError
from .model_files import damaged_error, damaged_weight_files, unpickling_error
from .quantization import check_4bit_support, keep_standard_4bit_layout, quantization_kwargs

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
PRECISION_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# Names users and config files write for the same three dtypes.
DTYPE_ALIASES = {
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
}


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    dtype = DTYPE_ALIASES.get(str(name).strip().lower())
    if dtype is None:
        raise UserError(f"Unknown dtype '{name}'; choose one of {', '.join(DTYPES)}.")
    return dtype


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


@dataclass
class PrecisionChoice:
    precision: str  # fp16 | bf16 | fp32: the compute precision of the training step
    device: str  # cuda | cpu
    reason: str  # printed to the user, so the choice is never a surprise

    @property
    def mixed_precision(self) -> str:
        """Accelerate's name for it."""
        return {"fp16": "fp16", "bf16": "bf16", "fp32": "no"}[self.precision]


def _cuda_capability() -> tuple[int, int] | None:
    return torch.cuda.get_device_capability(0) if torch.cuda.is_available() else None


def choose_precision(requested: str = "auto", capability: tuple[int, int] | None | str = "detect") -> PrecisionChoice:
    """auto: bf16 on GPUs of compute capability >= 8.0, fp16 below (T4, 2080 Ti), fp32 on CPU.

    Chosen by compute capability, not `torch.cuda.is_bf16_supported()`, which has answered True on a T4.
    """
    cap = _cuda_capability() if capability == "detect" else capability
    if cap is None:
        if requested == "fp16":
            raise UserError(
                "train.precision=fp16 needs a CUDA GPU and none is available; fp16 on a CPU is not supported. "
                "Use train.precision=fp32 (or auto) on CPU."
            )
        if requested == "bf16":
            return PrecisionChoice("bf16", "cpu", "bf16 autocast on CPU, as requested (slow on most CPUs)")
        return PrecisionChoice("fp32", "cpu", "no CUDA GPU: fp32 on CPU")
    name = f"compute capability {cap[0]}.{cap[1]}"
    if requested == "auto":
        if cap >= (8, 0):
            return PrecisionChoice("bf16", "cuda", f"bf16 mixed precision ({name} supports bf16)")
        return PrecisionChoice("fp16", "cuda", f"fp16 mixed precision ({name} has no bf16)")
    if requested == "bf16" and cap < (8, 0):
        raise UserError(
            f"train.precision=bf16 is not supported on this GPU ({name}; bf16 needs 8.0 or newer, e.g. an A100 or "
            "RTX 30xx). Use train.precision=fp16 or auto."
        )
    return PrecisionChoice(requested, "cuda", f"{requested} as requested ({name})")


# Model families reported to break in fp16 (NaN/inf from activations beyond fp16's 65504), by model_type:
# (family, evidence, warn at the start of an fp16 run). Every entry is also named when an fp16 run stops on
# non-finite losses. Qwen2 is only named then: NaN losses in fp16 SFT were reported, yet Qwen2.5-0.5B trains in fp16
# in unsloth's T4 test, and a warning on one of the commonest T4 models that usually trains fine would teach users
# to ignore warnings. Phi-2's attention overflow was fixed upstream (q/k upcast), so it is not listed.
_GEMMA3 = ("Gemma 3", "its activations exceed the fp16 range (transformers #36822; vLLM refuses fp16 for it)", True)
_UPCAST_PARTS = "unsloth keeps parts of it in fp32 to train on fp16 GPUs"
FP16_FRAGILE = {
    "gemma2": ("Gemma 2", "its attention logit soft-capping overflows in fp16", True),
    "gemma3": _GEMMA3,
    "gemma3_text": _GEMMA3,
    "gemma3n": ("Gemma 3n", _UPCAST_PARTS, True),
    "gemma3n_text": ("Gemma 3n", _UPCAST_PARTS, True),
    "qwen3_moe": ("Qwen3-MoE", _UPCAST_PARTS, True),
    "glm4_moe": ("GLM-4-MoE", _UPCAST_PARTS, True),
    "gpt_oss": ("gpt-oss", _UPCAST_PARTS, True),
    "qwen2": ("Qwen2/Qwen2.5", "NaN losses in fp16 fine-tuning were reported (QwenLM/Qwen3 #670)", False),
}


def fp16_risk(model_or_config, precision: PrecisionChoice, at_start: bool = True) -> str | None:
    """What to tell the user when an fp16 run trains a model family reported to overflow in fp16, else None.

    `at_start`: the warning printed before training (listed families only); False: the sentence added to the
    non-finite-loss stop message (also families with mixed reports). The precision is never changed silently.
    """
    if precision.precision != "fp16":
        return None
    config = getattr(model_or_config, "config", model_or_config)
    text_config = getattr(config, "get_text_config", lambda: None)()
    types = [getattr(c, "model_type", None) for c in (config, text_config) if c is not None]
    entry = next((FP16_FRAGILE[t] for t in types if t in FP16_FRAGILE), None)
    if entry is None or (at_start and not entry[2]):
        return None
    family, evidence, _ = entry
    options = (
        "train on a GPU with bf16 (compute capability 8.0 or newer, e.g. A100, L4, RTX 30xx/40xx), where "
        "train.precision=auto picks bf16; or set train.precision=fp32 (several times slower on a T4)"
    )
    said = f"{family} models are reported to break in fp16: {evidence}."
    if not at_start:
        return f"{said} For this model: {options}."
    return (
        f"{said} This run uses {precision.reason}. Options: {options}; or keep fp16 and watch the loss: lora-train "
        "stops after train.max_nonfinite_steps non-finite steps in a row."
    )


def base_dtype(dtype_setting: str, precision: PrecisionChoice) -> torch.dtype:
    """The dtype the frozen base weights are loaded in: on a GPU the half type of the mixed precision, else fp32
    (CPU half-precision matmuls are far slower than fp32 ones, also under bf16 autocast)."""
    if dtype_setting != "auto":
        return DTYPES[dtype_setting]
    return PRECISION_DTYPES[precision.precision] if precision.device == "cuda" else torch.float32


def check_4bit_dtype(dtype_setting: str, load_in_4bit: bool, precision: PrecisionChoice) -> None:
    """A 4-bit base in one half type trained under autocast in the other cannot run, on CPU or CUDA.

    bitsandbytes' Linear4bit returns its input's dtype (model.dtype, through the norms), not autocast's, so e.g.
    float16 projections meet bf16 autocast in ops autocast promotes (the rotary embedding's torch.cat), and autocast
    refuses a half type that is not its own ("Unexpected floating ScalarType in at::autocast::prioritize"). A
    16-bit base is fine: its nn.Linear layers compute in autocast's dtype. float32 parts are fine too.
    """
    if not load_in_4bit or dtype_setting not in ("float16", "bfloat16") or precision.precision == "fp32":
        return
    half = PRECISION_DTYPES[precision.precision]
    if DTYPES[dtype_setting] == half:
        return
    matching = {torch.float16: "float16", torch.bfloat16: "bfloat16"}[half]
    raise UserError(
        f"model.dtype={dtype_setting} with model.load_in_4bit cannot train in train.precision={precision.precision} "
        f"(on {precision.device.upper()}): the 4-bit layers return {dtype_setting} tensors, which "
        f"{precision.precision} autocast refuses to mix with its own half type. Set model.dtype=auto (or {matching}, "
        "or float32 for fp32 norms, embedding and head), or a train.precision that matches model.dtype."
    )


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
        if (path / "adapter_config.json").is_file():  # the most common mix-up: an adapter where its base belongs
            hint = ("pass it with --adapter and give the base model here" if what == "MODEL" else
                    "give the base model it was trained on here (its adapter_config.json names it as "
                    "base_model_name_or_path)")
            raise UserError(f"{what} '{name_or_path}' is an adapter folder (it holds adapter_config.json), not a base "
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
            raise UserError(f"The tokenizer of '{name_or_path}' has neither a pad nor an eos token; lora-cli needs one.")
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


def model_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def base_quantization(load_in_4bit: bool, precision: PrecisionChoice) -> dict:
    """load_base_model's 4-bit arguments for a training run: compute in the training precision, on its device."""
    if not load_in_4bit:
        return {}
    check_4bit_support()
    return {"load_in_4bit": True, "compute_dtype": PRECISION_DTYPES[precision.precision], "device": precision.device}
