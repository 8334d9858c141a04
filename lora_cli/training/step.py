"""One optimizer step's forward and backward, on one process or several (DDP under `accelerate launch`/torchrun)."""

from __future__ import annotations

import contextlib
import math

import torch

from ..errors import UserError


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
        raise UserError(
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


def accumulate_gradients(accelerator, loss_model, mine: list[tuple[dict, float]], n_trained: int) -> float | None:
    """Forward and backward over this process's share of the window; the window's loss per trained token (over
    all processes), or None when a loss was non-finite on any process (then no process has finished the window)."""
    # Normalised by the trained tokens of the whole window, so every token weighs the same whatever micro batch or
    # process it lands in; times the process count because DDP averages the processes' gradients.
    scale = accelerator.num_processes / max(n_trained, 1)
    window_loss = 0.0
    for i, (batch, weight) in enumerate(mine):
        batch = {k: v.to(accelerator.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        last = i == len(mine) - 1  # gradients are synchronised once, on the window's last backward
        with contextlib.nullcontext() if last else accelerator.no_sync(loss_model):
            with accelerator.autocast():
                loss_sum, _ = loss_model(**batch)
            finite = bool(torch.isfinite(loss_sum))
            if sum_over_processes(accelerator, float(finite)) < accelerator.num_processes:
                return None
            accelerator.backward(loss_sum * (scale * weight))
        window_loss += loss_sum.item() * weight / max(n_trained, 1)
    return sum_over_processes(accelerator, window_loss)


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
