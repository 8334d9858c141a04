"""lora-train: config -> model + LoRA -> data -> Accelerate loop -> adapter folder, as setup -> fit -> finish.

`setup` decides where the run starts (fresh, or from a checkpoint), loads everything and builds the `Run` the loop
works with; `training.loop.fit` trains; `finish` evaluates and publishes the result into output_dir as one atomic
swap. The pieces live in lora_cli/training/, one job per module.
"""

from __future__ import annotations

import contextlib
import gc
import time
import uuid
from datetime import datetime
from pathlib import Path

import torch

from . import data as data_lib
from .config import Config
from .errors import TrainingStopped, UserError
from .fsutil import atomic_write_text
from .inject import apply_lora, lora_state_dict
from .losses import CausalLMLoss
from .models import (PrecisionChoice, base_dtype, base_quantization, check_4bit_dtype, choose_precision, fp16_risk,
                     load_base_model, load_tokenizer)
from .training import fsdp, outdir, trackers
from .training.checkpoint import (
    load_rng_state,
    load_training_state,
    lora_settings,
    rng_state,
    save_adapter_folder,
    set_rng_state,
)
from .training.console import console, print_data_summary, print_dry_run, say_nothing
from .training.loop import evaluate_and_track, fit, restore_best
from .training.metrics import METRICS_NAME, SAMPLES_NAME, MetricsSink, to_jsonl
from .training.optim import make_optimizer, make_scheduler
from .training.plan import make_batches, total_steps
from .training.plot import PLOT_NAME, title_for, write_loss_plot
from .training.resume import StartPlan, check_resumable_run, data_fingerprint, flat_config, plan_start
from .training.samples import answer_prompts, load_prompts
from .training.signals import StopRequests
from .training.state import Run, TrainResult, TrainState
from .training.step import attention_kernels, check_distributed_type
from .training.summary import print_summary


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
        run = setup(cfg, dry_run, quiet, cleanup, gpu)
        if run is None:
            return None
        cleanup.callback(_release, run)
        several = run.accelerator.num_processes > 1
        with StopRequests(run.say, several_processes=several) as stop, attention_kernels():
            try:
                last_loss, last_eval = fit(run, stop)
            except TrainingStopped as stopped:
                _end_trackers(run)
                print_summary(run, None, stopped_at=stopped.checkpoint)
                raise
            result = finish(run, last_loss, last_eval)
    if stop.signum is not None:  # the signal came during the final save, which completed
        raise TrainingStopped(stop.signum, run.state.global_step, run.out, finished=True)
    return result


def _release(run: Run) -> None:
    """Let go of the model, optimizer and data when train() returns or fails, so their (GPU) memory is free at once:
    a notebook that trains twice must not hold the first model until Python's cycle collector happens to run."""
    run.accelerator.free_memory()  # Accelerate's own references to the prepared objects
    run.model = run.loss_model = run.optimizer = run.scheduler = run.best_weights = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def setup(cfg: Config, dry_run: bool, quiet: bool, cleanup: contextlib.ExitStack, gpu: str | None = None) -> Run | None:
    """Everything before the first step: where to start, precision, Accelerate, model, LoRA, data, optimizer, and
    for a resumed run every state the checkpoint holds."""
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
    fsdp_kwargs = fsdp.accelerator_kwargs(cfg)
    accelerator = Accelerator(mixed_precision=precision.mixed_precision, cpu=precision.device == "cpu",
                              step_scheduler_with_optimizer=False, **fsdp_kwargs)
    check_distributed_type(accelerator)
    main = accelerator.is_main_process
    quiet = quiet or not main
    say = _printer(main)
    sharding = fsdp.sharding_for(accelerator, cfg, fsdp_kwargs, say)
    plan = _plan(cfg, out, dry_run, main, say, accelerator, cleanup)
    if plan.finished:
        say(plan.finished, markup=False)
        return None
    world = accelerator.num_processes
    say(f"[bold]precision:[/bold] {precision.reason}" + (f"; {world} processes" if world > 1 else ""))
    set_seed(cfg.train.seed)  # the same seed everywhere: identical LoRA init and batch plan on every process
    tokenizer, model, report, bundle = prepare_model_and_data(cfg, precision)
    say(report.summary, markup=False)
    if cfg.model.load_in_4bit:
        say(_four_bit_line(cfg, precision), markup=False)
    if risk := fp16_risk(model, precision):
        say(f"[yellow]warning:[/yellow] {_escape(risk)}")
    if main:
        print_data_summary(bundle)
    if dry_run:
        if main:
            print_dry_run(cfg, tokenizer, bundle, _memory_estimate(cfg, bundle, gpu))
        return None
    if cfg.train.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model.train()
    sharding.prepare_model(model)
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
    sharding.prepared(loss_model)
    if sharding.active:
        say(fsdp.sharded_line(sharding, model, world), markup=False)
    run = Run(cfg, accelerator, precision, tokenizer, model, loss_model, optimizer, scheduler, bundle,
              report.target_modules, out, steps, None, quiet, say=say, sharding=sharding)
    run.prompts, run.started = prompts, started
    _start(run, plan, cleanup)
    return run


def _start(run: Run, plan: StartPlan, cleanup: contextlib.ExitStack) -> None:
    """The run's state (fresh, or restored from the checkpoint), the trackers and the metrics sink; for a resumed run the RNG states come last, so nothing here draws from the restored generators."""
    accelerator, cfg = run.accelerator, run.cfg
    run.state = _initial_state(run, plan, data_fingerprint(run.bundle.train, run.bundle.val))
    run.start_step = run.state.global_step
    saved_rng = rng_state()  # a tracker's start-up must not draw from the generators training uses
    run.trackers = trackers.start(accelerator, cfg, run.state, trackers.hyperparameters(flat_config(cfg)))
    set_rng_state(saved_rng)
    cleanup.callback(_end_trackers, run)  # also on a failure or a second Ctrl-C
    run.sink = MetricsSink(run.out, run.state.run_name, writes=run.main, show=say_nothing, tracker=run.trackers,
                           warn=lambda m: run.say(m, markup=False))
    run.sink.start(run.state.log_history, run.state.samples)
    if plan.checkpoint is not None:
        set_rng_state(load_rng_state(plan.checkpoint.path, accelerator.process_index))


def _four_bit_line(cfg: Config, precision: PrecisionChoice) -> str:
    rest = str(base_dtype(cfg.model.dtype, precision)).split(".")[1]
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
        return say_nothing
    return lambda message, markup=True: console.print(message, markup=markup, highlight=False)


def _plan(cfg: Config, out: Path, dry_run: bool, main: bool, say, accelerator,
          cleanup: contextlib.ExitStack) -> StartPlan:
    """Check output_dir (before anything slow loads), lock it, clean up after killed runs, decide where to start."""
    data_paths = [cfg.data.path] + ([cfg.data.val_path] if cfg.data.val_path else [])
    if dry_run:  # a dry run writes nothing and refuses nothing: it says what a real run would do
        try:
            outdir.check_location(out, cfg.model.name_or_path, data_paths)
            return plan_start(cfg, out, log=lambda m: say(f"note: {m}", markup=False))
        except UserError as err:
            say(f"[yellow]note: a real run would stop here:[/yellow] {_escape(err)}")
            return StartPlan()
    outdir.check_location(out, cfg.model.name_or_path, data_paths)
    if main:  # the lock first: what recover removes is then surely left by a dead run
        cleanup.callback(outdir.lock(out))
        outdir.recover(out, log=lambda m: say(m, markup=False))
    accelerator.wait_for_everyone()
    return plan_start(cfg, out, log=lambda m: say(m, markup=False))


def _escape(err: Exception) -> str:
    from rich.markup import escape

    return escape(str(err))


def _initial_state(run: Run, plan: StartPlan, fingerprint: str) -> TrainState:
    """A fresh state, or the checkpoint's with its tensors (weights, optimizer, schedule, scaler) restored."""
    world = run.accelerator.num_processes
    if plan.checkpoint is None:
        started = datetime.now().astimezone()
        return TrainState(total_steps=run.total_steps, num_processes=world, run_id=uuid.uuid4().hex,
                          run_started=started.isoformat(timespec="seconds"),
                          run_name=run.cfg.train.run_name or started.strftime("run-%Y%m%d-%H%M%S"),
                          data_fingerprint=fingerprint)
    check_resumable_run(plan.checkpoint, run.total_steps, world, fingerprint)
    state, best = load_training_state(plan.checkpoint.path, run)
    if state.total_steps != run.total_steps:
        run.say(f"note: this run trains {run.total_steps} steps in all, the checkpoint's run {state.total_steps}: the "
                f"learning-rate schedule (warmup and decay) is re-planned over {run.total_steps} steps from step "
                f"{state.global_step} on, so the learning rate changes there.", markup=False)
    state.total_steps = run.total_steps
    state.run_name = run.cfg.train.run_name or state.run_name  # a resumed run keeps its name unless given one
    run.best_weights = best if run.cfg.train.load_best_at_end else None
    return state


def finish(run: Run, last_loss: float | None, last_eval: dict | None) -> TrainResult:
    """The final evaluation (unless the last step had one), the best weights if asked, then the result."""
    state, bundle, t = run.state, run.bundle, run.cfg.train
    if bundle.val and (last_eval is None or last_eval.get("step") != state.global_step):
        last_eval = evaluate_and_track(run)
    answer_prompts(run)  # the final answers, unless this step's evaluation gave them
    if t.load_best_at_end and run.best_weights:
        restore_best(run)
        run.say(f"the final adapter is the best evaluated one: step {state.best_step} (eval loss "
                f"{state.best_eval_loss:.4f})")
    if state.skipped_steps:
        run.say(f"[yellow]{state.skipped_steps} updates were skipped (non-finite loss, or fp16 overflow).")
    result = TrainResult(run.out, state, last_loss, last_eval["eval_loss"] if last_eval else None)
    lora_tensors = run.sharding.lora_tensors(run.model)  # under FSDP gathered from the shards: every process calls
    run.accelerator.wait_for_everyone()
    if not run.main:
        return result
    _end_trackers(run)  # their files are closed before output_dir is swapped for the result
    later = ("merged",) if t.merge_at_end else ()
    outdir.publish(run.out, lambda folder: _write_result(run, folder, lora_tensors), state.run_id,
                   _result_bytes(run), later)
    run.say(f"adapter saved to {run.out}", markup=False)
    if t.merge_at_end:
        result.merged_dir = _merge_at_end(run)
        run.say(f"merged model saved to {result.merged_dir}", markup=False)
    print_summary(run, run.out)
    return result


def _merge_at_end(run: Run) -> Path:
    """train.merge_at_end, once the adapter is safe in output_dir: lora-merge's own verified merge, in fp32 from the
    base on disk (also for a 4-bit or fp16 run), into output_dir/merged (atomic). If it fails (a full disk: a merged
    3B model is ~6 GB), the adapter stays and the message says how to merge it later."""
    from .merge import merge_adapter

    cfg, merged = run.cfg, run.out / "merged"
    try:
        merge_adapter(run.out, merged, base=cfg.model.name_or_path, revision=cfg.model.revision,
                      trust_remote_code=cfg.model.trust_remote_code, log=lambda m: run.say(m, markup=False))
    except UserError as err:
        raise UserError(f"The adapter is saved in {run.out}, but merging it (train.merge_at_end) failed: {err} Once "
                        f"that is fixed, merge it with: lora-merge {run.out} {merged}") from None
    return merged


def _end_trackers(run: Run) -> None:
    if run.trackers is not None:
        run.trackers.end()


def _write_result(run: Run, folder: Path, lora_tensors: dict) -> None:
    """Everything the finished run's output_dir holds besides what it carries over (checkpoints, runs/)."""
    cfg = run.cfg
    save_adapter_folder(folder, run.model, run.tokenizer, cfg, run.target_modules, run.state, lora_tensors)
    atomic_write_text(folder / METRICS_NAME, to_jsonl(run.state.log_history))
    if run.state.samples:
        atomic_write_text(folder / SAMPLES_NAME, to_jsonl(run.state.samples))
    title = title_for(cfg.model.name_or_path, cfg.data.path, run.state.run_name)
    write_loss_plot(run.state.log_history, folder / PLOT_NAME, title, warn=run.say)


def _result_bytes(run: Run) -> int:
    return sum(t.numel() * 4 for t in lora_state_dict(run.model).values()) + 2**25  # the adapter, tokenizer, logs
