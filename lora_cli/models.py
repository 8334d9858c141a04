"""The one place that loads base models and tokenizers, and decides precision and dtype.

lora-train, lora-merge and lora-generate all load through here, so they see the same model the same way.
"""

from __future__ import annotations

import json
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .errors import UserError

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


def _check_source(name_or_path: str, what: str = "model.name_or_path") -> None:
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
        raise UserError(
            f"{what} '{name_or_path}' is a folder without config.json, so not a Hugging Face model folder. "
            "If it is an adapter folder, pass it with --adapter and give the base model here."
        )
    if path.is_dir():
        _check_config_json(path / "config.json")


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


def _load_error(name_or_path: str, err: Exception, what: str) -> UserError:
    first_line = str(err).strip().splitlines()[0].rstrip(".") if str(err).strip() else type(err).__name__
    if Path(name_or_path).expanduser().is_dir():
        advice = "Check that the folder holds a complete Hugging Face model; re-download or re-save it if not."
    else:
        advice = ("If it is a Hub name, check the spelling and that the Hub is reachable (or the model is in the "
                  "local cache); otherwise pass a local model folder.")
    return UserError(f"Could not load {what} '{name_or_path}': {first_line}. {advice}")


def _unpickling_error(name_or_path: str, err: Exception) -> UserError:
    """torch.load(weights_only=True) refused a pytorch_model*.bin: it pickles more than tensors."""
    folder = Path(name_or_path).expanduser()
    files = sorted(str(f) for f in folder.glob("*.bin")) if folder.is_dir() else []
    named = ", ".join(files) if files else f"the pytorch_model*.bin of '{name_or_path}'"
    found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
    reason = f" (it holds a pickled {found.group(1)})" if found else ""
    source = files[0] if files else "pytorch_model.bin"
    target = str(Path(source).with_name("model.safetensors"))
    convert = (
        f"python -c \"import torch; from safetensors.torch import save_file; sd = torch.load('{source}', "
        f"weights_only=False); save_file({{k: v.clone().contiguous() for k, v in sd.items() if isinstance(v, "
        f"torch.Tensor)}}, '{target}', metadata={{'format': 'pt'}})\""
    )
    return UserError(
        f"Could not load the model '{name_or_path}': torch refused to unpickle its checkpoint {named} with "
        f"weights_only=True{reason}, because unpickling anything but tensors can run code. Use a copy of the model "
        "that ships safetensors, or, if you trust the file, convert it to model.safetensors once (transformers "
        f"prefers that to the .bin; a sharded checkpoint needs each shard converted and an index): {convert}"
    )


def load_tokenizer(name_or_path: str, revision: str | None = None, trust_remote_code: bool = False):
    """The tokenizer, with a pad token guaranteed (falls back to eos, as most chat models expect)."""
    from transformers import AutoTokenizer

    _check_source(name_or_path)
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

    _check_source(name_or_path)
    extra = quantization_kwargs(compute_dtype or dtype, device) if load_in_4bit else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path, dtype=dtype, revision=revision, trust_remote_code=trust_remote_code, **extra
        )
    except Exception as err:  # what transformers raises for a damaged file varies: look at the files themselves
        if isinstance(err, pickle.UnpicklingError) and "weights only" in str(err).lower():
            raise _unpickling_error(name_or_path, err) from None
        damaged = damaged_weight_files(name_or_path, revision)
        if damaged:
            raise _damaged_error(name_or_path, revision, damaged) from None
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
        _keep_standard_4bit_layout(model)
    elif device is not None:  # a 4-bit model is placed by its device_map; transformers refuses to move it
        model.to(device)
    return model.eval()


# --- damaged downloads ---------------------------------------------------------------------------------------


def _model_folder(name_or_path: str, revision: str | None) -> Path | None:
    """The local folder the weights are read from: the folder itself, or the Hub cache's snapshot of the model."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name_or_path, revision=revision, local_files_only=True))
    except Exception:  # not a Hub name, or not in the cache: nothing local to look at
        return None


def _weight_files(folder: Path) -> tuple[list[Path], list[str]]:
    """The weight files transformers reads from `folder` (safetensors first, as it does), and missing shards."""
    for single, index_name in (("model.safetensors", "model.safetensors.index.json"),
                               ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        index = folder / index_name
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
            except (ValueError, KeyError, TypeError, AttributeError, OSError):
                return [], [f"{index} (not a valid shard index)"]
            missing = [f"{folder / s} (missing, though {index_name} lists it)" for s in shards
                       if not (folder / s).is_file()]
            return [folder / s for s in shards if (folder / s).is_file()], missing
        if (folder / single).is_file():
            return [folder / single], []
    return [], []


def _weight_file_problem(file: Path) -> str | None:
    """Why `file` cannot be a whole weights file (None if it looks whole): safetensors files are checked against
    their header's length, PyTorch zip archives for their closing directory (a cut file loses it)."""
    if file.suffix == ".safetensors":
        try:
            with safe_open(str(file), framework="pt"):
                return None
        except (SafetensorError, OSError) as err:
            return str(err)
    with open(file, "rb") as handle:
        head = handle.read(4)
    if not head:
        return "empty"
    if head.startswith(b"PK") and not zipfile.is_zipfile(file):
        return "a zip archive cut short"
    return None  # a legacy (pre-zip) PyTorch pickle, or a zip that at least ends properly


def damaged_weight_files(name_or_path: str, revision: str | None = None) -> list[str]:
    """The model's weight files that are truncated, unreadable or missing, each as 'path (why)'."""
    folder = _model_folder(name_or_path, revision)
    if folder is None:
        return []
    files, problems = _weight_files(folder)
    for file in files:
        problem = _weight_file_problem(file)
        if problem is not None:
            problems.append(f"{file} ({problem})")
    return problems


def check_weight_files(name_or_path: str, revision: str | None = None) -> None:
    """Refuse a model whose weight files are truncated, unreadable or missing, naming each and the fix."""
    damaged = damaged_weight_files(name_or_path, revision)
    if damaged:
        raise _damaged_error(name_or_path, revision, damaged)


def _damaged_error(name_or_path: str, revision: str | None, damaged: list[str]) -> UserError:
    if Path(name_or_path).expanduser().is_dir():
        fix = "Re-download the model (or copy its folder again) and rerun."
    else:
        rev = f" --revision {revision}" if revision else ""
        fix = f"Re-download it with `hf download {name_or_path}{rev} --force-download` and rerun."
    return UserError(
        f"The weights of the model '{name_or_path}' are damaged or incomplete: {'; '.join(damaged)}. An "
        f"interrupted download or copy leaves files like this. {fix}"
    )


def model_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


# --- QLoRA: a 4-bit base -------------------------------------------------------------------------------------

BNB_INSTALL_HINT = 'pip install -e ".[qlora]" (in a lora-cli checkout) or pip install "bitsandbytes>=0.46.1"'


def base_quantization(load_in_4bit: bool, precision: PrecisionChoice) -> dict:
    """load_base_model's 4-bit arguments for a training run: compute in the training precision, on its device."""
    if not load_in_4bit:
        return {}
    check_4bit_support()
    return {"load_in_4bit": True, "compute_dtype": PRECISION_DTYPES[precision.precision], "device": precision.device}


def check_4bit_support(what: str = "model.load_in_4bit") -> None:
    """bitsandbytes is an optional extra: say how to get it before anything slow is loaded."""
    import logging

    # On CPUs with AVX512-BF16 bitsandbytes' import logs a warning suggesting an optional `kernels` package for its
    # CPU inference kernel, which lora-cli never uses (see _keep_standard_4bit_layout); keep it off the terminal.
    cpu_ops_log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    previous_level = cpu_ops_log.level
    cpu_ops_log.setLevel(logging.ERROR)
    try:
        import bitsandbytes
    except ImportError as err:
        raise UserError(
            f"{what} loads the base model in 4 bits with bitsandbytes, which is not installed ({err}). Install it "
            f"with: {BNB_INSTALL_HINT}. Or turn 4-bit loading off (model.load_in_4bit: false in a config, no "
            "--load-in-4bit for lora-generate)."
        ) from None
    finally:
        cpu_ops_log.setLevel(previous_level)
    import transformers
    from transformers.utils import is_bitsandbytes_available

    if not is_bitsandbytes_available():  # transformers' own minimum version for 4-bit loading
        raise UserError(
            f"{what}: bitsandbytes {getattr(bitsandbytes, '__version__', '?')} is too old for transformers "
            f"{transformers.__version__}; upgrade it: pip install -U bitsandbytes"
        )


# What stays in half precision: everything that is not quantized. The embeddings, norms and output head of a 4-bit
# model are loaded in `dtype`, the half type of the training precision on a GPU, as in a 16-bit run. PEFT's
# prepare_model_for_kbit_training casts them all to fp32. Measured (scripts/qlora_check.py upcast: SmolLM2-135M,
# 4-bit, one batch, LoRA gradients against an all-fp32 reference), upcasting does not make the gradients more
# accurate: relative error 0.072 all half / 0.074 norms fp32 / 0.075 norms, embedding and head fp32 under fp16;
# 0.196 / 0.181 / 0.180 under bf16. The error comes from the 16-bit compute of the linear layers, which upcasting
# leaves alone. It does cost memory: +2.1 GB for Llama-3.1-8B's untied 128k embedding and head, and fp32 norm
# weights turn the norms' outputs, and the outputs of the projections fed by them, into fp32 activations.
# model.dtype: float32 gives PEFT's behaviour to whoever wants it.
def quantization_kwargs(compute_dtype: torch.dtype, device: str | None) -> dict:
    """from_pretrained arguments for QLoRA's base: NF4 weights with double quantization (the QLoRA paper's choice,
    ~4.13 bits per weight), computing in the training precision (fp16 on a T4, bf16 on sm80+, fp32 on CPU).

    transformers leaves the output head unquantized. The model is placed whole on the training device:
    `torch.cuda.current_device()` is the process's own GPU under `accelerate launch` (Accelerate sets it).
    """
    from transformers import BitsAndBytesConfig

    check_4bit_support()
    if device == "cuda":
        device = f"cuda:{torch.cuda.current_device()}"
    config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )
    return {"quantization_config": config, "device_map": {"": device or "cpu"}}


def _keep_standard_4bit_layout(model) -> None:
    """Turn off bitsandbytes' CPU inference shortcut on every 4-bit layer.

    On CPUs with AVX512-BF16, `Linear4bit.forward` in eval mode with an input that needs no gradient repacks the
    weight in place into another layout and from then on computes in bf16 whatever the compute dtype, without a
    gradient for its input. A LoRA layer keeps its 4-bit base out of `model.train()`, so that would happen during
    training too (and change evaluation's numbers); and `dequantize_4bit`, which DoRA and the tests rely on, reads
    only the standard layout. GPUs never take this path.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
