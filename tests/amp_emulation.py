"""The T4 path on a CPU: run the real training entry point under emulated fp16 AMP.

On a T4 (compute capability 7.5) lora-train picks fp16: the base is loaded in float16, the LoRA weights stay
float32, Accelerate runs the forward under `torch.autocast("cuda", dtype=torch.float16)` and scales the loss with a
`GradScaler`. Accelerate ignores fp16 on a CPU (no autocast, no scaler), so the tests patch, in the test only:

* `lora_cli.precision._cuda_capability` -> (7, 5): `choose_precision` then makes the T4's choice (fp16 "on cuda") and
  `base_dtype` loads the base in float16, exactly as on the GPU. Accelerate still lands on the CPU (no CUDA here).
* `Accelerator.__init__`: after Accelerate has built itself (and skipped AMP because the device is a CPU), turn on
  what it builds on a GPU: `native_amp = True`, which makes `accelerator.autocast()` and the prepared model's forward
  use `torch.autocast(device.type, dtype=torch.float16)` (Accelerate takes the device type from its state: "cpu"),
  and `scaler = torch.amp.GradScaler("cpu")`, which `accelerator.backward`, `clip_grad_norm_` (unscale) and the
  prepared optimizer's `step` (skip on inf/NaN, then `update`) use as they would the CUDA one.

Nothing else changes: the product code runs as it is. AcceleratorState is a process-wide singleton that refuses a
second mixed-precision setting, so the patch resets it on entry and exit (other tests create fp32 Accelerators).

fp16 matmuls on this CPU are ~100x slower than fp32 ones: keep emulated runs tiny (hidden 32, a few steps).
"""

from __future__ import annotations

import contextlib
import functools

import torch

T4_CAPABILITY = (7, 5)
DEFAULT_INIT_SCALE = 2.0**16  # GradScaler's own default, what a T4 run starts with


def reset_accelerate_state() -> None:
    """Forget Accelerate's process-wide state, so the next Accelerator may choose another mixed precision."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@contextlib.contextmanager
def scaler_init_scale(init_scale: float):
    """Give the GradScaler Accelerate builds on a real GPU another initial scale (the product never sets one:
    GradScaler's default 2**16); a huge one makes the first steps overflow on purpose. Yields a dict collecting
    every Accelerator built inside under "accelerators". (Under `emulated_fp16`, pass its own init_scale instead.)
    """
    from accelerate import Accelerator

    seen: dict = {"accelerators": []}
    original = Accelerator.__init__

    @functools.wraps(original)
    def patched(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if self.scaler is not None:
            self.scaler = type(self.scaler)(self.device.type, init_scale=init_scale)
        seen["accelerators"].append(self)

    Accelerator.__init__ = patched
    try:
        yield seen
    finally:
        Accelerator.__init__ = original


@contextlib.contextmanager
def emulated_fp16(init_scale: float = DEFAULT_INIT_SCALE):
    """Inside, `lora_cli.train.train(cfg)` (and `lora-train`) with train.precision auto or fp16 trains as on a T4:
    float16 base, float32 LoRA weights, fp16 autocast and a GradScaler, on the CPU.

    Yields a dict that collects every Accelerator built inside under "accelerators" (to inspect its scaler).
    """
    from accelerate import Accelerator

    import lora_cli.precision as precision

    seen: dict = {"accelerators": []}
    original_init = Accelerator.__init__
    original_capability = precision._cuda_capability

    @functools.wraps(original_init)
    def patched_init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        if self.state.mixed_precision == "fp16" and self.device.type == "cpu":
            self.native_amp = True
            handler = self.scaler_handler.to_kwargs() if self.scaler_handler is not None else {}
            self.scaler = torch.amp.GradScaler("cpu", **{**handler, "init_scale": init_scale})
        seen["accelerators"].append(self)

    reset_accelerate_state()
    Accelerator.__init__ = patched_init
    precision._cuda_capability = lambda: T4_CAPABILITY
    try:
        yield seen
    finally:
        Accelerator.__init__ = original_init
        precision._cuda_capability = original_capability
        reset_accelerate_state()


def save_edited_model(path, edit, arch: str = "llama", **save_kwargs):
    """A tiny model folder (tiny.save_model) whose weights `edit(model)` changed in place under no_grad."""
    import tiny

    path = tiny.save_model(arch, path, **save_kwargs)
    model = tiny.transformers.AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        edit(model)
    model.save_pretrained(path)
    return path


def save_overflowing_model(path, arch: str = "llama"):
    """A tiny model that is fine in float32 and overflows float16: the first layer's MLP weights are scaled up
    (still far inside fp16's range, |w| < 200) so that its output, ~2e7, exceeds fp16's largest value (65504)."""

    def scale_first_mlp(model):
        mlp = model.model.layers[0].mlp
        for linear in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
            linear.weight.mul_(1500.0)

    return save_edited_model(path, scale_first_mlp, arch)
