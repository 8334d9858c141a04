"""QLoRA's base: the frozen linear layers in NF4 4-bit (bitsandbytes, an optional extra), computing in the training
precision. models.load_base_model takes its arguments from here.
"""

from __future__ import annotations

import torch

from .errors import UserError

BNB_INSTALL_HINT = 'pip install -e ".[qlora]" (in a lora-cli checkout) or pip install "bitsandbytes>=0.46.1"'


def check_4bit_support(what: str = "model.load_in_4bit") -> None:
    """bitsandbytes is an optional extra: say how to get it before anything slow is loaded."""
    import logging

    # On CPUs with AVX512-BF16 bitsandbytes' import logs a warning suggesting an optional `kernels` package for its
    # CPU inference kernel, which lora-cli never uses (see keep_standard_4bit_layout); keep it off the terminal.
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


def keep_standard_4bit_layout(model) -> None:
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
