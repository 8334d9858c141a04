"""The training loop: optimizer steps over windows of micro batches until the run's step count is reached.

Around each step: updates the fp16 loss scaler skipped are counted but are not steps (max_steps counts applied
updates), records go through the metrics sink, evaluations feed early stopping, checkpoints are written at step
boundaries (every train.save_steps, every train.save_minutes, and on Ctrl-C / SIGTERM).
"""

from __future__ import annotations

import math
import signal
import time

from .. import packing as packing_lib
from ..errors import TrainingStopped, UserError
from ..precision import fp16_risk
from .checkpoint import save_checkpoint
from .console import progress_bar, record_printer
from .evaluation import evaluate
from .layout import checkpoint_dir
from .plan import collate, dropout_seed, make_batches
from .samples import answer_prompts
from .signals import StopRequests
from .state import Run
from .step import accumulate_gradients, share_of_window, sum_over_processes


def fit(run: Run, stop: StopRequests) -> tuple[float | None, dict | None]:
    """Train run.model with run.optimizer on run.bundle.train, evaluating on run.bundle.val, as run.cfg says, until
    run.total_steps updates are applied (or early stopping); every record goes through run.sink. Changes run.state
    and run.loop only. Returns (the last step's loss, the last evaluation)."""
    cfg, accelerator, state, bundle = run.cfg, run.accelerator, run.state, run.bundle
    t = cfg.train
    world, rank = accelerator.num_processes, accelerator.process_index
    pad_id = run.tokenizer.pad_token_id
    packing = cfg.data.packing
    window = t.gradient_accumulation_steps * world  # micro batches per optimizer step, all processes
    last_loss = None
    last_eval = next((r for r in reversed(state.log_history) if "eval_loss" in r), None)
    start_time = window_start = time.perf_counter()
    window_real_tokens = 0
    run.loop.last_save = time.monotonic()

    progress = progress_bar(run.quiet)
    run.sink.show = record_printer(progress, run.quiet)
    task = progress.add_task("training", total=run.total_steps, completed=state.global_step, loss=float("nan"),
                             lr=run.scheduler.get_last_lr()[0], tps=0.0)
    call_model = lambda fn: run.sharding.call_model(run.model, fn)  # noqa: E731 (under FSDP: via the loss module)
    with progress, packing_lib.packed_attention(run.model, accelerator.device, packing, call_model):
        while state.global_step < run.total_steps and not state.stopped_early:
            batches = make_batches(bundle.train, cfg, state.epoch)
            groups = [batches[i : i + window] for i in range(state.batch_in_epoch, len(batches), window)]
            for group in groups:
                # Every process collates the whole window (cheap) to count its trained tokens without a collective.
                micro = [collate(bundle.train, plan, pad_id, packing) for plan in group]
                if cfg.lora.dropout:  # the masks follow the micro batch, whichever process trains it
                    for j, batch in enumerate(micro):
                        batch["dropout_seed"] = dropout_seed(t.seed, state.epoch, state.batch_in_epoch + j)
                n_trained = sum(int((m["labels"][:, 1:] != -100).sum()) for m in micro)
                window_real_tokens += sum(len(bundle.train[i]) for plan in group for row in plan for i in row)
                step_loss = accumulate_gradients(accelerator, run.loss_model, share_of_window(micro, world, rank),
                                                 n_trained)
                state.batch_in_epoch += len(group)
                grad_norm, applied = _update(run) if step_loss is not None else (None, False)
                run.optimizer.zero_grad(set_to_none=True)
                if not applied:
                    _count_skipped(run, progress, step_loss is None)
                    _stop_if_asked(run, stop)
                    continue
                state.consecutive_skipped = 0
                state.global_step += 1
                state.tokens_seen += n_trained
                state.window_loss += step_loss * n_trained
                state.window_tokens += n_trained
                last_loss = step_loss
                tps = window_real_tokens / max(time.perf_counter() - window_start, 1e-9)
                lr = run.scheduler.get_last_lr()[0]
                progress.update(task, completed=state.global_step, loss=step_loss, lr=lr, tps=tps)
                if state.global_step % t.logging_steps == 0 or state.global_step == run.total_steps:
                    run.sink.log({
                        "step": state.global_step,
                        "epoch": round(state.epoch + state.batch_in_epoch / len(batches), 4),
                        "loss": state.window_loss / max(state.window_tokens, 1),
                        "learning_rate": lr,
                        "grad_norm": grad_norm,
                        "tokens_per_s": tps,
                        "skipped_steps": state.skipped_steps,
                        "elapsed_s": time.perf_counter() - start_time,
                    }, state.log_history)
                    state.window_loss, state.window_tokens, window_real_tokens = 0.0, 0, 0
                    window_start = time.perf_counter()
                if t.eval_steps and state.global_step % t.eval_steps == 0:
                    last_eval = evaluate_and_track(run) or last_eval
                if state.global_step >= run.total_steps or state.stopped_early:
                    break
                if _checkpoint_due(run):
                    save_checkpoint(run)
                    run.loop.last_save, run.loop.last_checkpoint_step = time.monotonic(), state.global_step
                _stop_if_asked(run, stop)
            else:  # the epoch ran out before max_steps
                state.epoch += 1
                state.batch_in_epoch = 0
                if not t.eval_steps:
                    last_eval = evaluate_and_track(run) or last_eval
    return last_loss, last_eval


def _update(run: Run) -> tuple[float | None, bool]:
    """Clip and apply the accumulated gradients; (grad norm, whether an update was applied)."""
    accelerator, t = run.accelerator, run.cfg.train
    grad_norm = None
    if t.max_grad_norm is not None:
        grad_norm = float(accelerator.clip_grad_norm_(run.loss_model.parameters(), t.max_grad_norm))
        if not math.isfinite(grad_norm) and getattr(accelerator, "scaler", None) is None:
            return grad_norm, False  # no loss scaler to skip it: applying non-finite gradients would ruin the weights
    run.optimizer.step()
    if accelerator.optimizer_step_was_skipped:  # the fp16 loss scaler found inf/nan gradients and lowered its scale
        return grad_norm, False
    run.scheduler.step()
    return grad_norm, True


def _count_skipped(run: Run, progress, nonfinite_loss: bool) -> None:
    state, t = run.state, run.cfg.train
    state.skipped_steps += 1
    state.consecutive_skipped += 1
    if not run.quiet:
        why = "the loss was non-finite" if nonfinite_loss else "the fp16 loss scaler found an overflow and lowered its scale"
        progress.console.print(
            f"[yellow]after step {state.global_step}: update skipped ({why}); {state.skipped_steps} skipped so far",
            highlight=False,
        )
    if state.consecutive_skipped >= t.max_nonfinite_steps:
        raise UserError(nonfinite_message(state.consecutive_skipped, run.precision, t.learning_rate,
                                          fp16_risk(run.model, run.precision, at_start=False),
                                          run.cfg.lora.loraplus_lr_ratio))


def _checkpoint_due(run: Run) -> bool:
    """Every train.save_steps updates, or train.save_minutes after the last checkpoint (the main process's clock
    decides for all, so every process takes part in the same saves)."""
    t, step = run.cfg.train, run.state.global_step
    due = bool(t.save_steps and step % t.save_steps == 0)
    if t.save_minutes and run.main and time.monotonic() - run.loop.last_save >= 60 * t.save_minutes:
        due = True
    return _any_process(run, due)


def _stop_if_asked(run: Run, stop: StopRequests) -> None:
    """After a step: on a pending Ctrl-C / SIGTERM (on any process), write a checkpoint and stop."""
    if not _any_process(run, stop.signum is not None):
        return
    step = run.state.global_step
    if run.loop.last_checkpoint_step != step:  # every process decides alike: the save gathers their RNG states
        save_checkpoint(run)
    # The signal number of the process that asked; another process only learns that one did, so SIGTERM there.
    raise TrainingStopped(stop.signum or signal.SIGTERM, step, checkpoint_dir(run.out, step), main=run.main)


def _any_process(run: Run, flag: bool) -> bool:
    if run.accelerator.num_processes == 1:
        return flag
    return sum_over_processes(run.accelerator, float(flag)) > 0


def evaluate_and_track(run: Run) -> dict | None:
    """An evaluation: the validation loss (when there is validation data) and the sample answers (when there are
    train.eval_prompts). The validation record, or None without validation data."""
    record = validate_and_track(run) if run.bundle.val else None
    answer_prompts(run)
    return record


def validate_and_track(run: Run) -> dict:
    """Evaluate, log, and keep the early-stopping and best-adapter bookkeeping."""
    state, t = run.state, run.cfg.train
    metrics = evaluate(run.model, run.bundle.val, run.tokenizer.pad_token_id, t.micro_batch_size, run.accelerator,
                       sharded_loss=run.loss_model if run.sharding.active else None)
    record = {"step": state.global_step, **metrics}
    run.sink.log(record, state.log_history)
    loss, best = metrics["eval_loss"], state.best_eval_loss
    if best is None or loss < best - t.early_stopping_threshold:
        state.evals_without_improvement = 0
    else:
        state.evals_without_improvement += 1
    if best is None or loss < best:
        state.best_eval_loss, state.best_step = loss, state.global_step
        if t.load_best_at_end:
            # Under FSDP gathered from the shards, on every process (each puts its shard back at the end).
            run.loop.best_weights = {k: v.to("cpu", copy=True) for k, v in run.sharding.lora_tensors(run.model).items()}
    patience = t.early_stopping_patience
    if patience and state.evals_without_improvement >= patience and not state.stopped_early:
        state.stopped_early = True
        run.say(
            f"early stopping at step {state.global_step}: {patience} evaluations without an improvement of more "
            f"than {t.early_stopping_threshold:g} (best eval loss {state.best_eval_loss:.4f} at step "
            f"{state.best_step})"
        )
    return record


def restore_best(run: Run) -> None:
    """train.load_best_at_end: put the best evaluated LoRA weights back before the final save."""
    if run.loop.best_weights:
        run.sharding.load_lora_tensors(run.model, run.loop.best_weights)


def nonfinite_message(count: int, precision, lr: float, model_risk: str | None = None,
                      loraplus_lr_ratio: float | None = None) -> str:
    hint = (
        "fp16 overflows easily: use train.precision=bf16 on a GPU that has it (compute capability >= 8.0) or "
        "train.precision=fp32, "
        if precision.precision == "fp16"
        else ""
    )
    return (
        f"{count} updates in a row were skipped (the loss was non-finite, NaN or inf, or the fp16 loss scaler found "
        f"overflowing gradients), so training stopped. {hint}lower train.learning_rate (now {lr:g})"
        + (f" or lora.loraplus_lr_ratio (now {loraplus_lr_ratio:g}, so lora_B learns at {lr * loraplus_lr_ratio:g})"
           if loraplus_lr_ratio else "")
        + ", or keep train.max_grad_norm set. Nothing was saved from this run beyond earlier checkpoints."
        + (f" Note: {model_risk}" if model_risk else "")
    )
