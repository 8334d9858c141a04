"""The training loop: config -> model + LoRA -> data -> Accelerate loop -> adapter folder.

One readable `train()` function; the pieces it calls are small and named for what they do. State that a future
exact resume needs (optimizer, scheduler, scaler, RNG, data position) lives in Accelerate's objects and in
`TrainState`, so resume can be added without restructuring.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from rich.console import Console

from . import data as data_lib
from . import packing as packing_lib
from .adapter import CONFIG_NAME, WEIGHTS_NAME, save_adapter
from .config import Config, config_to_yaml
from .errors import UserError
from .fsutil import atomic_dir, atomic_write_text
from .inject import LoraSettings, apply_lora, merge_lora
from .losses import CausalLMLoss, causal_lm_loss
from .models import PrecisionChoice, base_dtype, choose_precision, load_base_model, load_tokenizer

console = Console(stderr=True)


@dataclass
class TrainState:
    """Where the run is. Written into every checkpoint as trainer_state.json."""

    global_step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    tokens_seen: int = 0
    skipped_steps: int = 0
    log_history: list[dict] = field(default_factory=list)


@dataclass
class TrainResult:
    output_dir: Path
    state: TrainState
    final_train_loss: float | None
    final_eval_loss: float | None
    merged_dir: Path | None = None


# --- setup ---------------------------------------------------------------------------------------------------


def lora_settings(cfg: Config) -> LoraSettings:
    return LoraSettings(**cfg.lora.model_dump())


def prepare_model_and_data(cfg: Config, precision: PrecisionChoice):
    """Load tokenizer, base model (frozen, in the half dtype on GPU) and LoRA layers (fp32), then the data."""
    tokenizer = load_tokenizer(cfg.model.name_or_path, cfg.model.revision, cfg.model.trust_remote_code)
    dtype = base_dtype(cfg.model.dtype, precision)
    model = load_base_model(cfg.model.name_or_path, dtype, cfg.model.revision, cfg.model.trust_remote_code)
    report = apply_lora(model, lora_settings(cfg))
    bundle = data_lib.build_datasets(
        cfg.data.path,
        tokenizer,
        split=cfg.data.split,
        format=cfg.data.format,
        max_length=cfg.data.max_length,
        train_on_inputs=cfg.data.train_on_inputs,
        val_size=cfg.data.val_size,
        val_path=cfg.data.val_path,
        seed=cfg.train.seed,
    )
    return tokenizer, model, report, bundle


def _check_output_dir(cfg: Config) -> Path:
    """Refuse to train over a finished adapter unless asked: losing a trained adapter is worse than an error."""
    out = Path(cfg.train.output_dir)
    if (out / WEIGHTS_NAME).exists() and not cfg.train.overwrite_output_dir:
        raise UserError(
            f"train.output_dir '{out}' already holds a trained adapter. Choose another train.output_dir, or set "
            "train.overwrite_output_dir=true to replace it."
        )
    if out.exists() and not out.is_dir():
        raise UserError(f"train.output_dir '{out}' exists and is not a folder; choose another train.output_dir.")
    return out


def _make_batches(bundle_examples, cfg: Config, epoch: int) -> list[list[list[int]]]:
    """The epoch's micro batches: each a list of rows, each row the indices of the examples it holds.

    Without packing every row holds one example and batches group similar lengths; with data.packing, rows are
    filled with several examples up to data.max_length tokens and a micro batch is micro_batch_size such rows.
    """
    lengths = [len(ex.input_ids) for ex in bundle_examples]
    t = cfg.train
    if cfg.data.packing:
        return data_lib.packed_batches(lengths, cfg.data.max_length, t.micro_batch_size, seed=t.seed, epoch=epoch)
    return [[[i] for i in b] for b in data_lib.length_grouped_batches(lengths, t.micro_batch_size, t.seed, epoch)]


def _collate(examples, plan: list[list[int]], pad_id: int, packing: bool) -> dict:
    if packing:
        return data_lib.collate_packed([[examples[i] for i in row] for row in plan], pad_id)
    return data_lib.collate([examples[row[0]] for row in plan], pad_id)


def _total_steps(cfg: Config, batches_per_epoch: int, num_processes: int = 1) -> int:
    if cfg.train.max_steps is not None:
        return cfg.train.max_steps
    steps_per_epoch = math.ceil(batches_per_epoch / (cfg.train.gradient_accumulation_steps * num_processes))
    return max(1, math.ceil(steps_per_epoch * cfg.train.epochs))


# --- one optimizer step's forward and backward, on one process or several -------------------------------------


def _share_of_window(micro: list[dict], num_processes: int, rank: int) -> list[tuple[dict, float]]:
    """This process's micro batches of an optimizer step's window, as (batch, weight).

    Micro batch j goes to process j % num_processes, so N processes with micro batch B train exactly what one
    process does with N times the gradient accumulation. Every process must run as many backward passes as the
    others (under DDP each one ends in a collective), so where the window does not divide evenly, a process short
    of one repeats the window's first batch with weight 0: it adds nothing to the gradient.
    """
    mine = [(batch, 1.0) for batch in micro[rank::num_processes]]
    count = math.ceil(len(micro) / num_processes)
    return mine + [(micro[0], 0.0)] * (count - len(mine))


def _check_distributed_type(accelerator) -> None:
    """DDP (and one process) are what the loop is tested with; FSDP and DeepSpeed shard parameters, which the
    adapter saving (it reads the LoRA tensors from the model) does not gather yet."""
    kind = getattr(accelerator.distributed_type, "value", str(accelerator.distributed_type))
    if kind in ("FSDP", "DEEPSPEED", "MEGATRON_LM"):
        raise UserError(
            f"`accelerate launch` is set up for {kind}, which lora-train does not support yet: it would save an "
            "adapter from sharded parameters. Use plain multi-GPU data parallelism instead (in `accelerate config` "
            "choose multi-GPU without FSDP or DeepSpeed, or run `accelerate launch --multi_gpu --num_processes N "
            "-m lora_cli train config.yaml`)."
        )


def _sum_over_processes(accelerator, value: float) -> float:
    if accelerator.num_processes == 1:
        return value
    total = accelerator.reduce(torch.tensor(value, dtype=torch.float64, device=accelerator.device), reduction="sum")
    return float(total)


def _accumulate_gradients(accelerator, loss_model, mine: list[tuple[dict, float]], n_trained: int) -> float | None:
    """Forward and backward over this process's share of the window; the window's loss per trained token (over
    all processes), or None when a loss was non-finite on any process (then no process has finished the window)."""
    # Normalised by the trained tokens of the whole window, so every token weighs the same whatever micro batch or
    # process it lands in; times the process count because DDP averages the processes' gradients.
    scale = accelerator.num_processes / max(n_trained, 1)
    window_loss = 0.0
    for i, (batch, weight) in enumerate(mine):
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        last = i == len(mine) - 1  # gradients are synchronised once, on the window's last backward
        with contextlib.nullcontext() if last else accelerator.no_sync(loss_model):
            with accelerator.autocast():
                loss_sum, _ = loss_model(**batch)
            finite = bool(torch.isfinite(loss_sum))
            if _sum_over_processes(accelerator, float(finite)) < accelerator.num_processes:
                return None
            accelerator.backward(loss_sum * (scale * weight))
        window_loss += loss_sum.item() * weight / max(n_trained, 1)
    return _sum_over_processes(accelerator, window_loss)


def make_scheduler(optimizer, kind: str, warmup_steps: int, total_steps: int):
    """Linear warmup, then cosine / linear decay to 0, or constant."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if kind == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        progress = min(1.0, progress)
        return 0.5 * (1.0 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_optimizer(model, cfg: Config):
    params = [p for p in model.parameters() if p.requires_grad]
    t = cfg.train
    return torch.optim.AdamW(
        params, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon, weight_decay=t.weight_decay
    )


def enable_gradient_checkpointing(model) -> None:
    # Non-reentrant: reentrant checkpointing gives no LoRA grads with a frozen embedding and is >2x slower.
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.config.use_cache = False


# --- evaluation ----------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model, examples, pad_token_id: int, batch_size: int, accelerator) -> dict:
    """Mean loss per trained token over `examples`, and its perplexity.

    With several processes each evaluates every N-th example (of the length-sorted order, so all get similar
    lengths) and the sums are added up: the same result as one process, in 1/N of the time.
    """
    model.eval()
    total_loss, total_tokens = 0.0, 0
    lengths = [len(ex.input_ids) for ex in examples]
    order = sorted(range(len(examples)), key=lengths.__getitem__)
    order = order[accelerator.process_index :: accelerator.num_processes]
    for start in range(0, len(order), batch_size):
        batch = data_lib.collate([examples[i] for i in order[start : start + batch_size]], pad_token_id)
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        with accelerator.autocast():
            loss_sum, n_tokens = causal_lm_loss(model, batch)
        total_loss += loss_sum.item()
        total_tokens += n_tokens
    model.train()
    total_loss = _sum_over_processes(accelerator, total_loss)
    total_tokens = round(_sum_over_processes(accelerator, float(total_tokens)))
    mean = total_loss / max(total_tokens, 1)
    return {"eval_loss": mean, "eval_ppl": math.exp(min(mean, 50.0)), "eval_tokens": total_tokens}


# --- saving --------------------------------------------------------------------------------------------------


def save_adapter_folder(folder: Path, model, tokenizer, cfg: Config, target_modules, state: TrainState | None) -> None:
    """An adapter folder that PEFT loads, plus the tokenizer and the resolved config."""
    save_adapter(model, folder, lora_settings(cfg), target_modules, cfg.model.name_or_path, cfg.model.revision)
    tokenizer.save_pretrained(folder)
    atomic_write_text(folder / "lora_config.yaml", config_to_yaml(cfg))
    if state is not None:
        atomic_write_text(folder / "trainer_state.json", json.dumps(asdict(state), indent=2) + "\n")


def save_checkpoint(out: Path, model, tokenizer, cfg: Config, target_modules, state: TrainState) -> Path:
    final = out / f"checkpoint-{state.global_step}"
    with atomic_dir(final, overwrite=True) as tmp:
        save_adapter_folder(tmp, model, tokenizer, cfg, target_modules, state)
    _prune_checkpoints(out, cfg.train.save_total_limit)
    return final


def _prune_checkpoints(out: Path, limit: int | None) -> None:
    if not limit:
        return
    import shutil

    checkpoints = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    for old in checkpoints[:-limit]:
        shutil.rmtree(old, ignore_errors=True)


def append_metrics(out: Path, record: dict) -> None:
    with open(out / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


# --- the loop ------------------------------------------------------------------------------------------------


def train(cfg: Config, dry_run: bool = False, quiet: bool = False) -> TrainResult | None:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    precision = choose_precision(cfg.train.precision)
    try:
        out = _check_output_dir(cfg)
    except UserError as err:
        if not dry_run:  # checked before loading anything, so a doomed run fails in seconds
            raise
        console.print(f"[yellow]note: a real run would stop here: {err}")
        out = Path(cfg.train.output_dir)
    # Under `accelerate launch` / torchrun every process runs this function; only the main one prints and writes.
    # step_scheduler_with_optimizer=False: Accelerate would otherwise step the schedule once per process on every
    # optimizer step (it assumes the data loader was shortened per process), ending it N times too early.
    accelerator = Accelerator(mixed_precision=precision.mixed_precision, cpu=precision.device == "cpu",
                              step_scheduler_with_optimizer=False)
    _check_distributed_type(accelerator)
    main = accelerator.is_main_process
    quiet = quiet or not main
    say = console.print if main else _say_nothing
    world, rank = accelerator.num_processes, accelerator.process_index
    say(f"[bold]precision:[/bold] {precision.reason}" + (f"; {world} processes" if world > 1 else ""))
    set_seed(cfg.train.seed)  # the same seed everywhere: identical LoRA init and batch plan on every process
    tokenizer, model, report, bundle = prepare_model_and_data(cfg, precision)
    say(report.summary)
    if main:
        _print_data_summary(bundle)
    if dry_run:
        if main:
            print_dry_run(cfg, tokenizer, bundle)
        return None
    if cfg.train.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model.train()
    optimizer = make_optimizer(model, cfg)
    first_epoch = _make_batches(bundle.train, cfg, 0)
    batches_per_epoch = len(first_epoch)
    if cfg.data.packing:
        rows = sum(len(plan) for plan in first_epoch)
        fill = bundle.stats.train_tokens / max(1, rows * cfg.data.max_length)
        say(f"packing: {len(bundle.train)} examples into {rows} rows of up to {cfg.data.max_length} "
                      f"tokens ({fill:.0%} full)")
    total_steps = _total_steps(cfg, batches_per_epoch, world)
    scheduler = make_scheduler(
        optimizer, cfg.train.lr_scheduler, int(cfg.train.warmup_ratio * total_steps), total_steps
    )
    # The loss module, not the bare model, is what gets prepared: see CausalLMLoss. `model` stays the same object
    # inside it (for evaluation, packing and saving).
    loss_model, optimizer, scheduler = accelerator.prepare(CausalLMLoss(model), optimizer, scheduler)
    packing = cfg.data.packing
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.jsonl").unlink(missing_ok=True)

    state = TrainState()
    pad_id = tokenizer.pad_token_id
    window = cfg.train.gradient_accumulation_steps * world  # micro batches per optimizer step, all processes
    t = cfg.train
    last_loss, last_eval = None, None
    consecutive_nonfinite = 0
    start_time = time.perf_counter()
    window_loss, window_tokens, window_start = 0.0, 0, time.perf_counter()
    window_real_tokens = 0

    progress = _progress(quiet)
    task = progress.add_task("training", total=total_steps, loss=float("nan"), lr=0.0, tps=0.0)
    with progress, packing_lib.packed_attention(model, accelerator.device, packing):
        while state.global_step < total_steps:
            batches = _make_batches(bundle.train, cfg, state.epoch)
            groups = [batches[i : i + window] for i in range(state.batch_in_epoch, len(batches), window)]
            for group in groups:
                # Every process collates the whole window (cheap) to count its trained tokens without a collective.
                micro = [_collate(bundle.train, plan, pad_id, packing) for plan in group]
                n_trained = sum(int((m["labels"][:, 1:] != -100).sum()) for m in micro)
                window_real_tokens += sum(len(bundle.train[i]) for plan in group for row in plan for i in row)
                step_loss = _accumulate_gradients(accelerator, loss_model, _share_of_window(micro, world, rank),
                                                  n_trained)
                state.batch_in_epoch += len(group)
                if step_loss is None:  # non-finite loss
                    optimizer.zero_grad(set_to_none=True)
                    state.skipped_steps += 1
                    consecutive_nonfinite += 1
                    if consecutive_nonfinite >= t.max_nonfinite_steps:
                        raise UserError(_nonfinite_message(consecutive_nonfinite, precision, t.learning_rate))
                    continue
                consecutive_nonfinite = 0
                grad_norm = None
                if t.max_grad_norm is not None:
                    grad_norm = accelerator.clip_grad_norm_(loss_model.parameters(), t.max_grad_norm)
                optimizer.step()
                if accelerator.optimizer_step_was_skipped:  # fp16 scaler found inf/nan grads
                    state.skipped_steps += 1
                else:
                    scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state.global_step += 1
                state.tokens_seen += n_trained
                window_loss += step_loss * n_trained
                window_tokens += n_trained
                last_loss = step_loss
                elapsed = time.perf_counter() - window_start
                tps = window_real_tokens / max(elapsed, 1e-9)
                progress.update(task, advance=1, loss=step_loss, lr=scheduler.get_last_lr()[0], tps=tps)
                if state.global_step % t.logging_steps == 0 or state.global_step == total_steps:
                    record = {
                        "step": state.global_step,
                        "epoch": round(state.epoch + state.batch_in_epoch / len(batches), 4),
                        "loss": window_loss / max(window_tokens, 1),
                        "learning_rate": scheduler.get_last_lr()[0],
                        "grad_norm": float(grad_norm) if grad_norm is not None else None,
                        "tokens_per_s": tps,
                        "skipped_steps": state.skipped_steps,
                        "elapsed_s": time.perf_counter() - start_time,
                    }
                    _log(progress, record, quiet)
                    if main:
                        append_metrics(out, record)
                    state.log_history.append(record)
                    window_loss, window_tokens, window_real_tokens = 0.0, 0, 0
                    window_start = time.perf_counter()
                if bundle.val and t.eval_steps and state.global_step % t.eval_steps == 0:
                    last_eval = _run_eval(model, bundle, pad_id, t, accelerator, out, state, progress, quiet)
                if main and t.save_steps and state.global_step % t.save_steps == 0 and state.global_step < total_steps:
                    save_checkpoint(out, model, tokenizer, cfg, report.target_modules, state)
                if state.global_step >= total_steps:
                    break
            else:  # the epoch ran out before max_steps
                state.epoch += 1
                state.batch_in_epoch = 0
                if bundle.val and not t.eval_steps:
                    last_eval = _run_eval(model, bundle, pad_id, t, accelerator, out, state, progress, quiet)

    if bundle.val and (last_eval is None or last_eval.get("step") != state.global_step):
        last_eval = _run_eval(model, bundle, pad_id, t, accelerator, out, state, progress, quiet)
    if state.skipped_steps:
        say(f"[yellow]{state.skipped_steps} optimizer steps were skipped (non-finite loss or gradients).")
    result = TrainResult(out, state, last_loss, last_eval["eval_loss"] if last_eval else None)
    accelerator.wait_for_everyone()
    if not main:
        return result
    save_adapter_folder(out, model, tokenizer, cfg, report.target_modules, state)
    console.print(f"[green]adapter saved to {out}")
    if t.merge_at_end:
        from .merge import save_merged

        # The adapter config travels with the merged model (as lora_adapter_config.json) for provenance.
        adapter_config = json.loads((out / CONFIG_NAME).read_text(encoding="utf-8"))
        result.merged_dir = save_merged(
            merge_lora(model), tokenizer, out / "merged", overwrite=True, adapter_config=adapter_config
        )
        console.print(f"[green]merged model saved to {result.merged_dir}")
    return result


def _run_eval(model, bundle, pad_id, t, accelerator, out, state, progress, quiet) -> dict:
    metrics = evaluate(model, bundle.val, pad_id, t.micro_batch_size, accelerator)
    record = {"step": state.global_step, **metrics}
    if accelerator.is_main_process:
        append_metrics(out, record)
    state.log_history.append(record)
    if not quiet:
        progress.console.print(
            f"step {state.global_step}: eval loss {metrics['eval_loss']:.4f}, perplexity {metrics['eval_ppl']:.2f}"
        )
    return record


def _nonfinite_message(count: int, precision: PrecisionChoice, lr: float) -> str:
    hint = (
        "fp16 overflows easily: use train.precision=bf16 on a GPU that has it (compute capability >= 8.0) or "
        "train.precision=fp32, "
        if precision.precision == "fp16"
        else ""
    )
    return (
        f"The loss was non-finite (NaN or inf) for {count} optimizer steps in a row, so training stopped. "
        f"{hint}lower train.learning_rate (now {lr:g}), or keep train.max_grad_norm set. Nothing was saved from "
        "this run beyond earlier checkpoints."
    )


# --- console output ------------------------------------------------------------------------------------------


def _say_nothing(*args, **kwargs) -> None:
    """What the processes other than the main one print."""


def _progress(quiet: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}  {task.fields[tps]:.0f} tok/s"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        disable=quiet,
    )


def _log(progress, record: dict, quiet: bool) -> None:
    if quiet:
        return
    progress.console.print(
        f"step {record['step']}: loss {record['loss']:.4f}, lr {record['learning_rate']:.2e}, "
        f"{record['tokens_per_s']:.0f} tok/s"
    )


def _print_data_summary(bundle) -> None:
    s = bundle.stats
    console.print(
        f"data ({s.format}): {s.num_train} train / {s.num_val} validation examples, {s.train_tokens:,} tokens "
        f"of which {s.trained_tokens:,} trained; longest {s.max_example_length} tokens, {s.num_truncated} truncated "
        f"to data.max_length={s.max_length}"
    )
    if s.num_truncated:
        console.print(f"[yellow]{s.num_truncated} examples were longer than data.max_length and were truncated.")
    dropped = s.num_dropped
    if dropped:
        console.print(
            f"[yellow]{dropped} examples had no trained tokens (no response, or none left after truncation) and "
            "were dropped."
        )


def print_dry_run(cfg: Config, tokenizer, bundle) -> None:
    out = Console()
    out.rule("resolved config")
    out.print(config_to_yaml(cfg), markup=False, highlight=False)
    out.rule("first training example (trained tokens highlighted)")
    if bundle.train:
        out.print(data_lib.preview(bundle.train[0], tokenizer))
    out.rule("dry run: nothing was trained")
