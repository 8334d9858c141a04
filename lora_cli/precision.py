"""Precision and dtypes: the names users write for a dtype, the training precision chosen for the GPU at hand
(fp16 below compute capability 8.0, bf16 from it, fp32 on CPU), the dtype the frozen base is loaded in, and the
model families reported to break in fp16.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import UserError
from .quantization import check_4bit_support

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


def dtype_name(dtype: torch.dtype) -> str:
    """torch.float16 -> 'float16': the name config files, messages and config.json use."""
    return str(dtype).removeprefix("torch.")


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


def model_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def base_quantization(load_in_4bit: bool, precision: PrecisionChoice) -> dict:
    """load_base_model's 4-bit arguments for a training run: compute in the training precision, on its device."""
    if not load_in_4bit:
        return {}
    check_4bit_support()
    return {"load_in_4bit": True, "compute_dtype": PRECISION_DTYPES[precision.precision], "device": precision.device}
