"""One optimizer step, on one process or several (DDP under `accelerate launch`/torchrun), without a host sync.

The forward and backward over a window of micro batches, then the clipped update, are queued on the device and
nothing is read back: the loss sums, the finite flags and the update's outcome stay on the device. Whether an update
was applied (the loop counts applied updates) travels to the host through a pinned buffer, copied without blocking
and read one step later (`UpdateOutcome`), when the device has long finished it; the loop reads everything else once
per logging window, where the console and the metrics need numbers anyway.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os

import torch

from ..errors import UserError

# Why an update was skipped, by the code `apply_update` leaves on the device (0: applied).
SKIP_REASONS = {
    1: "the loss was non-finite",
    2: "the gradient norm was non-finite",
    3: "the fp16 loss scaler found an overflow and lowered its scale",
}


def share_of_window(micro: list[dict], num_processes: int, rank: int) -> list[tuple[dict, float]]:
    """This process's micro batches of an optimizer step's window, as (batch, weight).

    Micro batch j goes to process j % num_processes, so N processes with micro batch B train exactly what one
    process does with N times the gradient accumulation. Every process must run as many backward passes as the
    others (under DDP each one ends in a collective), so where the window does not divide evenly, a process short
    of one repeats the window's first batch with weight 0: it adds nothing to the gradient.
    """
    mine = [(batch, 1.0) for batch in micro[rank::num_processes]]
    count = math.ceil(len(micro) / num_processes)
    return mine + [(micro[0], 0.0)] * (count - len(mine))


def check_distributed_type(accelerator) -> None:
    """One process, DDP and FSDP (training.fsdp) are what the loop is tested with; DeepSpeed and Megatron-LM shard
    and step the model their own way, which the loop's saving and resuming do not follow."""
    kind = getattr(accelerator.distributed_type, "value", str(accelerator.distributed_type))
    if kind in ("DEEPSPEED", "MEGATRON_LM"):
        raise UserError(_unsupported_engine(kind))


# What `accelerate launch` sets for a DeepSpeed or Megatron-LM config; the Accelerator reads it.
ENGINE_ENV = {"ACCELERATE_USE_DEEPSPEED": "DEEPSPEED", "ACCELERATE_USE_MEGATRON_LM": "MEGATRON_LM"}


def check_launch_environment() -> None:
    """check_distributed_type before the Accelerator is made: without DeepSpeed installed, making it would end in
    an ImportError traceback instead of the refusal that points at FSDP."""
    for variable, kind in ENGINE_ENV.items():
        if os.environ.get(variable, "").lower() == "true":
            raise UserError(_unsupported_engine(kind))


def _unsupported_engine(kind: str) -> str:
    return (
        f"`accelerate launch` is set up for {kind}, which lora-train does not support. To shard a base that does "
        "not fit one GPU, use FSDP: `accelerate launch --config_file configs/accelerate/fsdp_2gpu.yaml -m "
        "lora_cli train config.yaml`, or `torchrun --nproc_per_node N -m lora_cli train config.yaml "
        "train.fsdp=true`. For a base that fits one GPU, plain data parallelism: `accelerate launch --multi_gpu "
        "--num_processes N -m lora_cli train config.yaml`."
    )


def sum_over_processes(accelerator, value: float) -> float:
    if accelerator.num_processes == 1:
        return value
    total = accelerator.reduce(torch.tensor(value, dtype=torch.float64, device=accelerator.device), reduction="sum")
    return float(total)


def to_device(batch: dict, device: torch.device) -> dict:
    """A collated batch on the device, copied without a host sync: from pinned memory and non-blocking on CUDA (a
    plain copy from pageable memory waits for the device). Entries that are not tensors move themselves, if they
    can (packing.PackedLayout), or stay as they are."""
    cuda = device.type == "cuda"
    moved = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = (value.pin_memory() if cuda else value).to(device, non_blocking=cuda)
        elif hasattr(value, "to"):
            value = value.to(device)
        moved[key] = value
    return moved


def accumulate_gradients(accelerator, loss_model, mine: list[tuple[dict, float]], n_trained: int) -> torch.Tensor:
    """Forward and backward over this process's share of the window; the window's summed loss over all processes
    (float64, on the device, not read): non-finite when any process's loss was."""
    # Normalised by the trained tokens of the whole window, so every token weighs the same whatever micro batch or
    # process it lands in; times the process count because DDP averages the processes' gradients.
    scale = accelerator.num_processes / max(n_trained, 1)
    window_sum = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    for i, (batch, weight) in enumerate(mine):
        batch = to_device(batch, accelerator.device)
        last = i == len(mine) - 1  # gradients are synchronised once, on the window's last backward
        with contextlib.nullcontext() if last else accelerator.no_sync(loss_model):
            with accelerator.autocast():
                loss_sum, _ = loss_model(**batch)
            if loss_sum.requires_grad:  # (a loss that reached no trainable weight has nothing to propagate)
                accelerator.backward(loss_sum * (scale * weight))
        if weight:  # detached: a sum that kept each step's autograd graph alive would hold its memory
            window_sum = window_sum + loss_sum.detach().double() * weight
    if accelerator.num_processes > 1:  # a collective on the device: every process gets the same sum and verdict
        window_sum = accelerator.reduce(window_sum, reduction="sum")
    return window_sum


def apply_update(accelerator, optimizer, parameters, max_grad_norm: float | None,
                 window_loss: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Clip and apply the accumulated gradients unless the update must be skipped, decided on the device:
    (grad norm or None, skip reason code: 0 applied, else a key of SKIP_REASONS), both device tensors, unread.

    Skipped are windows with a non-finite loss; without a loss scaler (fp32, bf16) a non-finite gradient norm (the
    weights would be ruined); with fp16's scaler, overflowing gradients (the scaler then lowers its scale). The
    optimizer is told through `found_inf`, as GradScaler tells fused optimizers: the kernel leaves the weights,
    moments and step count as they were. The schedule is stepped by the loop once the outcome is known.
    """
    scaler = getattr(accelerator, "scaler", None)
    raw = optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer
    loss_bad = ~torch.isfinite(window_loss)
    grad_norm = None
    if max_grad_norm is not None:
        grad_norm = accelerator.clip_grad_norm_(parameters, max_grad_norm)  # unscales first under fp16
    elif scaler is not None:
        accelerator.unscale_gradients()
    if scaler is not None:
        # GradScaler's own record of inf/NaN gradients, per device (set by unscale_): a non-finite loss is added to
        # it, so the step GradScaler drives skips for either.
        found = scaler._per_optimizer_states[id(raw)]["found_inf_per_device"]
        scaler_inf = torch.stack([flag.to(loss_bad.device) for flag in found.values()]).sum() > 0 if found \
            else torch.zeros_like(loss_bad)
        for flag in found.values():
            torch.maximum(flag, loss_bad.to(flag), out=flag)
        reason = torch.where(loss_bad, 1, torch.where(scaler_inf, 3, 0))
        optimizer.step()
        return grad_norm, reason
    norm_bad = ~torch.isfinite(grad_norm) if grad_norm is not None else torch.zeros_like(loss_bad)
    reason = torch.where(loss_bad, 1, torch.where(norm_bad, 2, 0))
    if getattr(raw, "_step_supports_amp_scaling", False):  # fused AdamW: the skip happens inside the kernel
        raw.found_inf = (reason > 0).float()
        try:
            optimizer.step()
        finally:
            del raw.found_inf
    elif not bool(reason):  # an optimizer without found_inf (none lora-cli makes): the one host read of a step
        optimizer.step()
    return grad_norm, reason


class UpdateOutcome:
    """The last update's skip reason on its way to the host: copied into pinned memory without blocking, and read
    when the loop needs it, by then (one window later) long written."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.host = torch.zeros((), dtype=torch.int32, pin_memory=self.cuda)
        self.done = None

    def record(self, reason: torch.Tensor) -> None:
        self.host.copy_(reason, non_blocking=self.cuda)
        if self.cuda:
            self.done = torch.cuda.Event()
            self.done.record()

    def read(self) -> int:
        if self.done is not None:
            self.done.synchronize()  # returns at once unless the device is still on the update it comes from
        # A read of host memory, not of the device: the value was copied there by `record`.
        return ctypes.c_int32.from_address(self.host.data_ptr()).value


class WindowSums:
    """Running sums of the applied updates, kept on the device and read once per logging window.

    `loss` continues TrainState.window_loss (sum of loss x trained tokens since the last logged record) one update
    at a time, in float64, so a resumed run adds exactly what an uninterrupted one does whenever the host reads it.
    """

    def __init__(self, window_loss: float, device: torch.device):
        self.loss = torch.tensor(window_loss, dtype=torch.float64, device=device)
        self.last_step_loss = torch.full((), math.nan, dtype=torch.float64, device=device)
        self.grad_norm = torch.full((), math.nan, dtype=torch.float64, device=device)

    def add(self, window_loss: torch.Tensor, n_trained: int, reason: torch.Tensor, grad_norm) -> None:
        applied = reason == 0
        self.loss = torch.where(applied, self.loss + window_loss, self.loss)
        self.last_step_loss = torch.where(applied, window_loss / max(n_trained, 1), self.last_step_loss)
        if grad_norm is not None:
            self.grad_norm = grad_norm.detach().double()

    def read(self) -> tuple[float, float, float | None]:
        """(window loss sum, last applied step's loss, last grad norm): the logging window's one host sync."""
        loss, last, norm = torch.stack([self.loss, self.last_step_loss, self.grad_norm]).tolist()
        return loss, last, (norm if math.isfinite(norm) else None)

    def reset(self) -> None:
        self.loss = torch.zeros_like(self.loss)


def attention_kernels():
    """The scaled-dot-product attention kernels a run may use: flash, memory-efficient and math; not cuDNN's.

    PyTorch tries cuDNN's attention first on Hopper GPUs (H100, H200), and cuDNN plans a new execution graph for
    every new input shape: measured on an H200 (docs/BENCHMARKS.md, section 12), 15 ms of CPU time per attention
    call against 11 us of GPU time, which length-grouped batches (a new length every step) and packed rows (a new
    length every example) pay in every layer. Flash and memory-efficient attention compute the same without planning;
    a T4 (compute capability 7.5) never gets cuDNN's attention anyway.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])
