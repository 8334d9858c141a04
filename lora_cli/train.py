"""lora-train: config -> model + LoRA -> data -> Accelerate loop -> adapter folder, as setup -> fit -> finish.

`setup` loads everything and builds the `Run` the loop works with, `training.loop.fit` trains, `finish` evaluates
and saves. The pieces live in lora_cli/training/, one job per module.
"""

from __future__ import annotations

import json
from pathlib import Path

from . import data as data_lib
from .adapter import CONFIG_NAME, WEIGHTS_NAME
from .config import Config
from .errors import UserError
from .inject import apply_lora, merge_lora
from .losses import CausalLMLoss
from .models import (PrecisionChoice, base_dtype, base_quantization, choose_precision, fp16_risk, load_base_model,
                     load_tokenizer)
from .training.checkpoint import lora_settings, save_adapter_folder
from .training.console import console, print_data_summary, print_dry_run, say_nothing
from .training.loop import fit, run_eval
from .training.metrics import MetricsSink
from .training.optim import make_optimizer, make_scheduler
from .training.plan import make_batches, total_steps
from .training.state import Run, TrainResult
from .training.step import check_distributed_type


def prepare_model_and_data(cfg: Config, precision: PrecisionChoice):
    """Load tokenizer, base model (frozen, in the half dtype on GPU) and LoRA layers (fp32), then the data."""
    tokenizer = load_tokenizer(cfg.model.name_or_path, cfg.model.revision, cfg.model.trust_remote_code)
    dtype = base_dtype(cfg.model.dtype, precision)
    model = load_base_model(cfg.model.name_or_path, dtype, cfg.model.revision, cfg.model.trust_remote_code,
                            **base_quantization(cfg.model.load_in_4bit, precision))
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


def check_output_dir(cfg: Config) -> Path:
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


def enable_gradient_checkpointing(model) -> None:
    # Non-reentrant: reentrant checkpointing gives no LoRA grads with a frozen embedding and is >2x slower.
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.config.use_cache = False


def train(cfg: Config, dry_run: bool = False, quiet: bool = False) -> TrainResult | None:
    run = setup(cfg, dry_run, quiet)
    if run is None:
        return None
    last_loss, last_eval = fit(run)
    return finish(run, last_loss, last_eval)


def setup(cfg: Config, dry_run: bool, quiet: bool) -> Run | None:
    """Everything before the first step: output folder check, precision, Accelerate, model, LoRA, data, optimizer."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    precision = choose_precision(cfg.train.precision)
    try:
        out = check_output_dir(cfg)
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
    check_distributed_type(accelerator)
    main = accelerator.is_main_process
    quiet = quiet or not main
    say = console.print if main else say_nothing
    world = accelerator.num_processes
    say(f"[bold]precision:[/bold] {precision.reason}" + (f"; {world} processes" if world > 1 else ""))
    set_seed(cfg.train.seed)  # the same seed everywhere: identical LoRA init and batch plan on every process
    tokenizer, model, report, bundle = prepare_model_and_data(cfg, precision)
    say(report.summary)
    if risk := fp16_risk(model, precision):
        say(f"[yellow]warning:[/yellow] {risk}")
    if main:
        print_data_summary(bundle)
    if dry_run:
        if main:
            print_dry_run(cfg, tokenizer, bundle)
        return None
    if cfg.train.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model.train()
    optimizer = make_optimizer(model, cfg)
    first_epoch = make_batches(bundle.train, cfg, 0)
    if cfg.data.packing:
        rows = sum(len(plan) for plan in first_epoch)
        fill = bundle.stats.train_tokens / max(1, rows * cfg.data.max_length)
        say(f"packing: {len(bundle.train)} examples into {rows} rows of up to {cfg.data.max_length} "
            f"tokens ({fill:.0%} full)")
    steps = total_steps(cfg, len(first_epoch), world)
    scheduler = make_scheduler(optimizer, cfg.train.lr_scheduler, int(cfg.train.warmup_ratio * steps), steps)
    # The loss module, not the bare model, is what gets prepared: see CausalLMLoss. `model` stays the same object
    # inside it (for evaluation, packing and saving).
    loss_model, optimizer, scheduler = accelerator.prepare(CausalLMLoss(model), optimizer, scheduler)
    sink = MetricsSink(out, writes=main, show=say_nothing)
    sink.start()
    return Run(cfg, accelerator, precision, tokenizer, model, loss_model, optimizer, scheduler, bundle,
               report.target_modules, out, steps, sink, quiet)


def finish(run: Run, last_loss: float | None, last_eval: dict | None) -> TrainResult:
    """The final evaluation (unless the last step had one), then the adapter folder and the merged model."""
    state, bundle = run.state, run.bundle
    if bundle.val and (last_eval is None or last_eval.get("step") != state.global_step):
        last_eval = run_eval(run)
    say = console.print if run.main else say_nothing
    if state.skipped_steps:
        say(f"[yellow]{state.skipped_steps} optimizer steps were skipped (non-finite loss or gradients).")
    result = TrainResult(run.out, state, last_loss, last_eval["eval_loss"] if last_eval else None)
    run.accelerator.wait_for_everyone()
    if not run.main:
        return result
    out = run.out
    save_adapter_folder(out, run.model, run.tokenizer, run.cfg, run.target_modules, state)
    console.print(f"[green]adapter saved to {out}")
    if run.cfg.train.merge_at_end:
        from .merge import save_merged

        # The adapter config travels with the merged model (as lora_adapter_config.json) for provenance.
        adapter_config = json.loads((out / CONFIG_NAME).read_text(encoding="utf-8"))
        result.merged_dir = save_merged(
            merge_lora(run.model), run.tokenizer, out / "merged", overwrite=True, adapter_config=adapter_config
        )
        console.print(f"[green]merged model saved to {result.merged_dir}")
    return result
