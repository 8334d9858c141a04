"""The training loop: optimizer steps over windows of micro batches until the run's step count is reached.

Around each step: updates the fp16 loss scaler skipped are counted but are not steps (max_steps counts applied
updates), records go through the metrics sink, evaluations feed early stopping, checkpoints are written at step
boundaries (every train.save_steps, every train.save_minutes, and on Ctrl-C / SIGTERM).
"""

from __future__ import annotations

import math
import signal
import time

import torch

from .. import packing as packing_lib
from ..errors import TrainingStopped, UserError
from ..layout import checkpoint_dir
from ..precision import fp16_risk
from .checkpoint import save_checkpoint
from .console import progress_bar, record_printer
from .evaluation import evaluate
from .plan import collate, dropout_seed, make_batches
from .signals import StopRequests
from .state import LoopState, Run, TrainState
from .step import (
    SKIP_REASONS,
    UpdateOutcome,
    WindowSums,
    accumulate_gradients,
    apply_update,
    share_of_window,
    sum_over_processes,
)


def fit(run: Run, loop: LoopState, stop: StopRequests) -> tuple[float | None, dict | None]:
    """Train run.model with run.optimizer on run.bundle.train, evaluating on run.bundle.val, as run.cfg says, until
    run.total_steps updates are applied (or early stopping); every record goes through run.sink. `run` is what setup
    fixed (frozen); `loop` is all fit changes (loop.state: step counters, data position, window sums, best, history),
    and `stop` tells it a Ctrl-C / SIGTERM came. Returns (the last step's loss, the last evaluation).

    A step that does not log, evaluate or checkpoint reads nothing back from the device: whether its update was
    applied reaches the host one step later (training.step.UpdateOutcome), and the running sums are read once per
    logging window (training.step.WindowSums). A step after which something happens on the host (a record, an
    evaluation, a checkpoint, the last step, a requested stop, a run of skips about to stop the run) settles its
    outcome at once.
    """
    cfg, accelerator, state, bundle = run.cfg, run.accelerator, loop.state, run.bundle
    t = cfg.train
    world, rank = accelerator.num_processes, accelerator.process_index
    pad_id = run.tokenizer.pad_token_id
    packing = cfg.data.packing
    pad_multiple = padding_multiple(accelerator.device, packing)
    window = t.gradient_accumulation_steps * world  # micro batches per optimizer step, all processes
    last_eval = next((r for r in reversed(state.log_history) if "eval_loss" in r), None)
    start_time = time.perf_counter()
    loop.last_save = time.monotonic()
    sums = WindowSums(state.window_loss, accelerator.device)
    outcome = UpdateOutcome(accelerator.device)
    pending: list = []  # the update whose outcome has not been read yet: [trained tokens, real tokens]
    timing = {"start": time.perf_counter(), "real_tokens": 0}

    progress = progress_bar(run.quiet)
    run.sink.show = record_printer(progress, run.quiet)
    task = progress.add_task("training", total=run.total_steps, completed=state.global_step, loss=float("nan"),
                             lr=run.scheduler.get_last_lr()[0], tps=0.0)
    call_model = lambda fn: run.sharding.call_model(run.model, fn)  # noqa: E731 (under FSDP: via the loss module)

    def settle() -> bool | None:
        """Read the pending update's outcome and count it: applied (True, the schedule steps) or skipped (False);
        None when nothing was pending."""
        if not pending:
            return None
        n_trained, real_tokens = pending.pop()
        reason = outcome.read()
        timing["real_tokens"] += real_tokens
        if reason:
            _count_skipped(run, state, progress, SKIP_REASONS[reason])
            return False
        run.scheduler.step()
        state.consecutive_skipped = 0
        state.global_step += 1
        state.tokens_seen += n_trained
        state.window_tokens += n_trained
        progress.update(task, completed=state.global_step)
        return True

    with progress, packing_lib.packed_attention(run.model, accelerator.device, packing, call_model):
        while state.global_step < run.total_steps and not state.stopped_early:
            batches = make_batches(bundle.train, cfg, state.epoch)
            groups = [batches[i : i + window] for i in range(state.batch_in_epoch, len(batches), window)]
            for group in groups:
                # Every process collates the whole window (cheap) to count its trained tokens without a collective.
                micro = [collate(bundle.train, plan, pad_id, packing, pad_multiple) for plan in group]
                if cfg.lora.dropout:  # the masks follow the micro batch, whichever process trains it
                    for j, batch in enumerate(micro):
                        batch["dropout_seed"] = dropout_seed(t.seed, state.epoch, state.batch_in_epoch + j)
                n_trained = sum(m["loss_index"].shape[0] for m in micro)
                real_tokens = sum(len(bundle.train[i]) for plan in group for row in plan for i in row)
                window_loss = accumulate_gradients(accelerator, run.loss_model, share_of_window(micro, world, rank),
                                                   n_trained)
                state.batch_in_epoch += len(group)
                settle()  # the previous update's outcome: the schedule must know it before this update
                grad_norm, reason = apply_update(accelerator, run.optimizer, run.loss_model.parameters(),
                                                 t.max_grad_norm, window_loss)
                run.optimizer.zero_grad(set_to_none=True)
                sums.add(window_loss, n_trained, reason, grad_norm)
                outcome.record(reason)
                pending.append((n_trained, real_tokens))
                if not _host_work_due(run, loop, stop, state.global_step + 1):
                    continue
                if not settle():  # a host step: settled now
                    _stop_if_asked(run, loop, stop, sums)
                    continue
                if state.global_step % t.logging_steps == 0 or state.global_step == run.total_steps:
                    _log(run, state, sums, progress, task, timing, start_time, len(batches))
                if t.eval_steps and state.global_step % t.eval_steps == 0:
                    last_eval = evaluate_and_track(run, loop) or last_eval
                if state.global_step >= run.total_steps or state.stopped_early:
                    break
                if _checkpoint_due(run, loop):
                    _save(run, loop, sums)
                _stop_if_asked(run, loop, stop, sums)
            else:  # the epoch ran out before max_steps
                settle()
                state.epoch += 1
                state.batch_in_epoch = 0
                if not t.eval_steps:
                    last_eval = evaluate_and_track(run, loop) or last_eval
        settle()
        state.window_loss, last_loss, _ = sums.read()
    return (None if math.isnan(last_loss) else last_loss), last_eval


def padding_multiple(device, packing: bool) -> int:
    """Unpacked batches on a GPU are padded to a multiple of PAD_MULTIPLE tokens, so lengths repeat from step to step
    and kernels and the caching allocator reuse their shapes (the Trainer's pad_to_multiple_of); padding is masked,
    so the loss is the same. Packed rows are already full, and on the CPU extra padding is only extra work."""
    return PAD_MULTIPLE if torch.device(device).type == "cuda" and not packing else 1


PAD_MULTIPLE = 64


def _host_work_due(run: Run, loop: LoopState, stop: StopRequests, next_step: int) -> bool:
    """Whether the host acts after this step if its update was applied (or because of a skip): then its outcome is
    read now instead of one step later."""
    t, state = run.cfg.train, loop.state
    return bool(
        next_step % t.logging_steps == 0 or next_step >= run.total_steps
        or (t.eval_steps and next_step % t.eval_steps == 0) or (t.save_steps and next_step % t.save_steps == 0)
        or state.consecutive_skipped + 1 >= t.max_nonfinite_steps
        # One answer for every process (the main one's clock decides save_minutes), so all take the same path.
        or _any_process(run, stop.signum is not None or bool(
            t.save_minutes and run.main and time.monotonic() - loop.last_save >= 60 * t.save_minutes))
    )


def _log(run: Run, state: TrainState, sums: WindowSums, progress, task, timing: dict, start_time: float,
         n_batches: int) -> None:
    # The logging window's one host sync: the loss sums, the last step's loss and grad norm.
    window_loss, step_loss, grad_norm = sums.read()
    tps = timing["real_tokens"] / max(time.perf_counter() - timing["start"], 1e-9)
    lr = run.scheduler.get_last_lr()[0]
    progress.update(task, completed=state.global_step, loss=step_loss, lr=lr, tps=tps)
    run.sink.log({
        "step": state.global_step,
        "epoch": round(state.epoch + state.batch_in_epoch / n_batches, 4),
        "loss": window_loss / max(state.window_tokens, 1),
        "learning_rate": lr,
        "grad_norm": grad_norm,
        "tokens_per_s": tps,
        "skipped_steps": state.skipped_steps,
        "elapsed_s": time.perf_counter() - start_time,
    }, state.log_history)
    sums.reset()
    state.window_loss, state.window_tokens = 0.0, 0
    timing["start"], timing["real_tokens"] = time.perf_counter(), 0


def _save(run: Run, loop: LoopState, sums: WindowSums) -> None:
    loop.state.window_loss = sums.read()[0]  # the checkpoint holds the running sum exactly
    save_checkpoint(run, loop)
    loop.last_save, loop.last_checkpoint_step = time.monotonic(), loop.state.global_step


def _count_skipped(run: Run, state: TrainState, progress, why: str) -> None:
    t = run.cfg.train
    state.skipped_steps += 1
    state.consecutive_skipped += 1
    if not run.quiet:
        progress.console.print(
            f"[yellow]after step {state.global_step}: update skipped ({why}); {state.skipped_steps} skipped so far",
            highlight=False,
        )
    if state.consecutive_skipped >= t.max_nonfinite_steps:
        raise UserError(nonfinite_message(state.consecutive_skipped, run.precision, t.learning_rate,
                                          fp16_risk(run.model, run.precision, at_start=False),
                                          run.cfg.lora.loraplus_lr_ratio))


def _checkpoint_due(run: Run, loop: LoopState) -> bool:
    """Every train.save_steps updates, or train.save_minutes after the last checkpoint (the main process's clock
    decides for all, so every process takes part in the same saves)."""
    t, step = run.cfg.train, loop.state.global_step
    due = bool(t.save_steps and step % t.save_steps == 0)
    if t.save_minutes and run.main and time.monotonic() - loop.last_save >= 60 * t.save_minutes:
        due = True
    return _any_process(run, due)


def _stop_if_asked(run: Run, loop: LoopState, stop: StopRequests, sums: WindowSums) -> None:
    """After a settled step: on a pending Ctrl-C / SIGTERM (on any process), write a checkpoint and stop."""
    if not _any_process(run, stop.signum is not None):
        return
    step = loop.state.global_step
    if loop.last_checkpoint_step != step:  # every process decides alike: the save gathers their RNG states
        _save(run, loop, sums)
    # The signal number of the process that asked; another process only learns that one did, so SIGTERM there.
    raise TrainingStopped(stop.signum or signal.SIGTERM, step, checkpoint_dir(run.out, step), main=run.main)


def _any_process(run: Run, flag: bool) -> bool:
    if run.accelerator.num_processes == 1:
        return flag
    return sum_over_processes(run.accelerator, float(flag)) > 0


def evaluate_and_track(run: Run, loop: LoopState) -> dict | None:
    """An evaluation: the validation loss (when there is validation data) and the sample answers (when there are
    train.eval_prompts). The validation record, or None without validation data."""
    record = validate_and_track(run, loop) if run.bundle.val else None
    run.prompts.answer(run, loop)
    return record


def validate_and_track(run: Run, loop: LoopState) -> dict:
    """Evaluate, log, and keep the early-stopping and best-adapter bookkeeping."""
    state, t = loop.state, run.cfg.train
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
            loop.best_weights = {k: v.to("cpu", copy=True) for k, v in run.sharding.lora_tensors(run.model).items()}
    patience = t.early_stopping_patience
    if patience and state.evals_without_improvement >= patience and not state.stopped_early:
        state.stopped_early = True
        run.say(
            f"early stopping at step {state.global_step}: {patience} evaluations without an improvement of more "
            f"than {t.early_stopping_threshold:g} (best eval loss {state.best_eval_loss:.4f} at step "
            f"{state.best_step})"
        )
    return record


def restore_best(run: Run, loop: LoopState) -> None:
    """train.load_best_at_end: put the best evaluated LoRA weights back before the final save."""
    if loop.best_weights:
        run.sharding.load_lora_tensors(run.model, loop.best_weights)


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
