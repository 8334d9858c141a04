"""lora-train: config -> model + LoRA -> data -> Accelerate loop -> adapter folder, as setup -> fit -> finish.

`setup` decides where the run starts (fresh, or from a checkpoint), loads everything and builds the `Run` the loop
works with; `training.loop.fit` trains; `finish` evaluates and publishes the result into output_dir as one atomic
swap. The pieces live in lora_cli/training/, one job per module.
"""

from __future__ import annotations

import contextlib
import gc
import time
from pathlib import Path

import torch

from . import data as data_lib
from .chat_templates import apply_template_setting
from .config import Config
from .errors import TrainingStopped, UserError
from .inject import apply_lora, lora_settings
from .losses import CausalLMLoss
from .models import load_base_model, load_base_shapes, load_tokenizer
from .precision import (
    PrecisionChoice,
    base_dtype,
    base_quantization,
    check_4bit_dtype,
    choose_precision,
    dtype_name,
    fp16_risk,
)
from .training import console, fsdp, outdir, resume, start, trackers
from .training.loop import fit
from .training.optim import make_optimizer, make_scheduler
from .training.plan import make_batches, total_steps
from .training.result import finish
from .training.samples import load_prompts
from .training.signals import StopRequests
from .training.state import LoopState, Run, TrainResult
from .training.step import attention_kernels, check_distributed_type, check_launch_environment
from .training.summary import print_summary


def prepare_model_and_data(cfg: Config, precision: PrecisionChoice, out: Path, accelerator, sharding):
    """Load the tokenizer, the data (from the cache, tokenized first if needed: a data error shows before the slow
    model load), the base model (frozen, in the half dtype on GPU; under FSDP the weights on process 0 only) and
    LoRA layers (fp32)."""
    tokenizer = load_tokenizer(cfg.model.name_or_path, cfg.model.revision, cfg.model.trust_remote_code)
    apply_template_setting(tokenizer, cfg.data.chat_template)  # before the model loads: a bad template fails fast
    bundle = _load_data_on_main_first(cfg, tokenizer, out, accelerator)
    dtype = base_dtype(cfg.model.dtype, precision)
    source = (cfg.model.name_or_path, dtype, cfg.model.revision, cfg.model.trust_remote_code)
    model = sharding.load_base(lambda: load_base_model(*source, **base_quantization(cfg.model.load_in_4bit, precision)),
                               lambda: load_base_shapes(*source))
    report = apply_lora(model, lora_settings(cfg.lora))
    return tokenizer, model, report, bundle


def _load_data_on_main_first(cfg: Config, tokenizer, out: Path, accelerator):
    """The main process tokenizes (on a cache miss); the others wait, then open its cache entry. Every process says
    when it tokenizes (only a writer does), so a second tokenization would show. If the main one fails (a bad row),
    it still meets the others at the barrier, so they fail with the same message instead of waiting forever."""
    failure = None
    if accelerator.is_main_process:
        try:
            bundle = data_lib.load_data(cfg, tokenizer, out, say=_plain_printer)
        except Exception as err:
            failure = err
    accelerator.wait_for_everyone()
    if failure is not None:
        raise failure
    if not accelerator.is_main_process:
        bundle = data_lib.load_data(cfg, tokenizer, out, say=_plain_printer)
    return bundle


def prepare_data(cfg: Config) -> None:
    """lora-train --prepare: tokenize the data into the cache (or find it there), print the summary, nothing else.
    A later run on any machine that sees the same cache folder starts without tokenizing."""
    tokenizer = load_tokenizer(cfg.model.name_or_path, cfg.model.revision, cfg.model.trust_remote_code)
    apply_template_setting(tokenizer, cfg.data.chat_template)
    out = outdir.resolve_output_dir(cfg.train.output_dir)
    bundle = data_lib.load_data(cfg, tokenizer, out, say=_plain_printer)
    console.print_data_summary(bundle)
    _plain_printer(f"data cache: {bundle.train.folder}")


def _plain_printer(message: str) -> None:
    console.console.print(message, markup=False, highlight=False)


def enable_gradient_checkpointing(model) -> None:
    # Non-reentrant: reentrant checkpointing gives no LoRA grads with a frozen embedding and is >2x slower.
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.config.use_cache = False


def train(cfg: Config, dry_run: bool = False, quiet: bool = False, gpu: str | None = None) -> TrainResult | None:
    """Train and publish the adapter. None for a dry run, or when output_dir already holds this finished run.

    Raises TrainingStopped after Ctrl-C / SIGTERM: the checkpoint it wrote resumes with resume_from_checkpoint=auto.
    """
    with contextlib.ExitStack() as cleanup:  # releases the output_dir lock and ends the trackers however it ends
        started = setup(cfg, dry_run, quiet, cleanup, gpu)
        if started is None:
            return None
        run, loop = started
        cleanup.callback(_release, run, loop)
        several = run.accelerator.num_processes > 1
        with StopRequests(run.say, several_processes=several) as stop, attention_kernels():
            try:
                last_loss, last_eval = fit(run, loop, stop)
            except TrainingStopped as stopped:
                run.trackers.end()
                print_summary(run, loop, None, stopped_at=stopped.checkpoint)
                raise
            result = finish(run, loop, last_loss, last_eval)
    if stop.signum is not None:  # the signal came during the final save, which completed
        raise TrainingStopped(stop.signum, loop.state.global_step, run.out, finished=True, main=run.main)
    return result


def _release(run: Run, loop: LoopState) -> None:
    """Let go of the model, optimizer and data when train() returns or fails, so their (GPU) memory is free at once:
    a notebook that trains twice must not hold the first model until Python's cycle collector happens to run."""
    run.accelerator.free_memory()  # Accelerate's own references to the prepared objects
    run.release()  # the run is over, whatever still holds it (a traceback)
    loop.best_weights = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def setup(cfg: Config, dry_run: bool, quiet: bool, cleanup: contextlib.ExitStack,
          gpu: str | None = None) -> tuple[Run, LoopState] | None:
    """Everything before the first step: where to start, precision, Accelerate, model, LoRA, data, optimizer, and
    for a resumed run every state the checkpoint holds. The Run (fixed from here on) and the LoopState fit starts
    from; None for a dry run or a run already finished."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    started = time.perf_counter()
    # Config errors that need no model, found before anything slow loads: a missing tracker, a missing prompt file.
    trackers.check_installed(cfg.train.report_to)
    prompts = load_prompts(cfg)
    precision = choose_precision(cfg.train.precision)
    check_4bit_dtype(cfg.model.dtype, cfg.model.load_in_4bit, precision)
    out = outdir.resolve_output_dir(cfg.train.output_dir)
    # Under `accelerate launch` / torchrun every process runs this function; only the main one prints and writes.
    # step_scheduler_with_optimizer=False: Accelerate would otherwise step the schedule once per process on every
    # optimizer step (it assumes the data loader was shortened per process), ending it N times too early.
    check_launch_environment()
    fsdp_kwargs = fsdp.accelerator_kwargs(cfg)
    accelerator = Accelerator(mixed_precision=precision.mixed_precision, cpu=precision.device == "cpu",
                              step_scheduler_with_optimizer=False, **fsdp_kwargs)
    check_distributed_type(accelerator)
    main = accelerator.is_main_process
    quiet = quiet or not main
    say = _printer(main)
    sharding = fsdp.sharding_for(accelerator, cfg, fsdp_kwargs, say)
    plan = resume.prepare(cfg, out, dry_run, main, say, accelerator.wait_for_everyone, cleanup)
    if plan.finished:
        say(plan.finished, markup=False)
        return None
    world = accelerator.num_processes
    say(f"[bold]precision:[/bold] {precision.reason}" + (f"; {world} processes" if world > 1 else ""))
    set_seed(cfg.train.seed)  # the same seed everywhere: identical LoRA init and batch plan on every process
    tokenizer, model, report, bundle = prepare_model_and_data(cfg, precision, out, accelerator, sharding)
    _describe(cfg, precision, model, report, bundle, say, main)
    if dry_run:
        if main:
            console.print_dry_run(cfg, tokenizer, bundle, _memory_estimate(cfg, bundle, gpu))
        return None
    if cfg.train.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model.train()
    sharding.prepare_model(model)
    # The device it trains on: under FSDP the LoRA weights of processes other than 0 are on the meta device until
    # Accelerate shards them (fused AdamW there too, or the processes would round their updates differently).
    optimizer = make_optimizer(model, cfg, accelerator.device)
    steps = _total_steps(cfg, bundle, world, say)
    scheduler = make_scheduler(optimizer, cfg.train.lr_scheduler, int(cfg.train.warmup_ratio * steps), steps)
    # The loss module, not the bare model, is what gets prepared: see CausalLMLoss. `model` stays the same object
    # inside it (for evaluation, packing and saving).
    loss_model, optimizer, scheduler = accelerator.prepare(CausalLMLoss(model), optimizer, scheduler)
    sharding.prepared(loss_model)
    if sharding.active:
        say(fsdp.sharded_line(sharding, model, world), markup=False)
    state, best = start.initial_state(cfg, plan, model, optimizer, scheduler, accelerator, bundle, steps, say,
                                      sharding)
    run_trackers, sink = start.start_logging(accelerator, cfg, out, state, say, cleanup)
    start.restore_rng(plan, accelerator)  # last: nothing after this draws from the generators before the loop
    run = Run(cfg=cfg, accelerator=accelerator, precision=precision, tokenizer=tokenizer, model=model,
              loss_model=loss_model, optimizer=optimizer, scheduler=scheduler, bundle=bundle,
              target_modules=report.target_modules, out=out, total_steps=steps, start_step=state.global_step,
              started=started, quiet=quiet, say=say, sink=sink, trackers=run_trackers, prompts=prompts,
              sharding=sharding)
    return run, LoopState(state, best_weights=best)


def _describe(cfg: Config, precision: PrecisionChoice, model, report, bundle, say, main: bool) -> None:
    """What was loaded: the LoRA layers, the 4-bit base, an fp16 risk, the data."""
    say(report.summary, markup=False)
    if cfg.model.load_in_4bit:
        say(_four_bit_line(cfg, precision), markup=False)
    if risk := fp16_risk(model, precision):
        say(f"[yellow]warning:[/yellow] {_escape(risk)}")
    if main:
        console.print_data_summary(bundle)


def _total_steps(cfg: Config, bundle, world: int, say) -> int:
    """The run's optimizer steps, from the first epoch's batch plan (which it also reports for data.packing)."""
    first_epoch = make_batches(bundle.train, cfg, 0)
    if cfg.data.packing:
        rows = sum(len(plan) for plan in first_epoch)
        fill = bundle.stats.train_tokens / max(1, rows * cfg.data.max_length)
        say(f"packing: {len(bundle.train)} examples into {rows} rows of up to {cfg.data.max_length} "
            f"tokens ({fill:.0%} full)")
    return total_steps(cfg, len(first_epoch), world)


def _four_bit_line(cfg: Config, precision: PrecisionChoice) -> str:
    rest = dtype_name(base_dtype(cfg.model.dtype, precision))
    return (f"base: linear layers in 4-bit NF4 (double quantization, computing in {precision.precision}); embeddings, "
            f"norms and head in {rest}")


def _memory_estimate(cfg: Config, bundle, gpu: str | None) -> str:
    """--dry-run's memory estimate, from the data it has just tokenized (the longest batch it will really see)."""
    from .estimate import estimate_for_config, format_estimate

    try:
        return format_estimate(estimate_for_config(cfg, gpu, data=bundle))
    except UserError as err:
        return f"no estimate: {err}"


def _printer(main: bool):
    if not main:
        return console.say_nothing
    return lambda message, markup=True: console.console.print(message, markup=markup, highlight=False)


def _escape(err: Exception) -> str:
    from rich.markup import escape

    return escape(str(err))
