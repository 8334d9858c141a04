"""The training loop: optimizer steps over windows of micro batches until the run's step count is reached."""

from __future__ import annotations

import time

from .. import packing as packing_lib
from ..errors import UserError
from ..models import fp16_risk
from .checkpoint import save_checkpoint
from .console import progress_bar, record_printer
from .evaluation import evaluate
from .plan import collate, make_batches
from .state import Run
from .step import accumulate_gradients, share_of_window


def fit(run: Run) -> tuple[float | None, dict | None]:
    """Train until run.total_steps optimizer steps are done; (last step's loss, last evaluation record)."""
    cfg, accelerator, state, bundle = run.cfg, run.accelerator, run.state, run.bundle
    t = cfg.train
    world, rank = accelerator.num_processes, accelerator.process_index
    pad_id = run.tokenizer.pad_token_id
    packing = cfg.data.packing
    window = t.gradient_accumulation_steps * world  # micro batches per optimizer step, all processes
    last_loss, last_eval = None, None
    consecutive_nonfinite = 0
    start_time = time.perf_counter()
    window_loss, window_tokens, window_start = 0.0, 0, time.perf_counter()
    window_real_tokens = 0

    progress = progress_bar(run.quiet)
    run.sink.show = record_printer(progress, run.quiet)
    task = progress.add_task("training", total=run.total_steps, loss=float("nan"), lr=0.0, tps=0.0)
    with progress, packing_lib.packed_attention(run.model, accelerator.device, packing):
        while state.global_step < run.total_steps:
            batches = make_batches(bundle.train, cfg, state.epoch)
            groups = [batches[i : i + window] for i in range(state.batch_in_epoch, len(batches), window)]
            for group in groups:
                # Every process collates the whole window (cheap) to count its trained tokens without a collective.
                micro = [collate(bundle.train, plan, pad_id, packing) for plan in group]
                n_trained = sum(int((m["labels"][:, 1:] != -100).sum()) for m in micro)
                window_real_tokens += sum(len(bundle.train[i]) for plan in group for row in plan for i in row)
                step_loss = accumulate_gradients(accelerator, run.loss_model, share_of_window(micro, world, rank),
                                                 n_trained)
                state.batch_in_epoch += len(group)
                if step_loss is None:  # non-finite loss
                    run.optimizer.zero_grad(set_to_none=True)
                    state.skipped_steps += 1
                    consecutive_nonfinite += 1
                    if consecutive_nonfinite >= t.max_nonfinite_steps:
                        raise UserError(nonfinite_message(consecutive_nonfinite, run.precision, t.learning_rate,
                                                          fp16_risk(run.model, run.precision, at_start=False)))
                    continue
                consecutive_nonfinite = 0
                grad_norm = None
                if t.max_grad_norm is not None:
                    grad_norm = accelerator.clip_grad_norm_(run.loss_model.parameters(), t.max_grad_norm)
                run.optimizer.step()
                if accelerator.optimizer_step_was_skipped:  # fp16 scaler found inf/nan grads
                    state.skipped_steps += 1
                else:
                    run.scheduler.step()
                run.optimizer.zero_grad(set_to_none=True)
                state.global_step += 1
                state.tokens_seen += n_trained
                window_loss += step_loss * n_trained
                window_tokens += n_trained
                last_loss = step_loss
                elapsed = time.perf_counter() - window_start
                tps = window_real_tokens / max(elapsed, 1e-9)
                lr = run.scheduler.get_last_lr()[0]
                progress.update(task, advance=1, loss=step_loss, lr=lr, tps=tps)
                if state.global_step % t.logging_steps == 0 or state.global_step == run.total_steps:
                    run.sink.log({
                        "step": state.global_step,
                        "epoch": round(state.epoch + state.batch_in_epoch / len(batches), 4),
                        "loss": window_loss / max(window_tokens, 1),
                        "learning_rate": lr,
                        "grad_norm": float(grad_norm) if grad_norm is not None else None,
                        "tokens_per_s": tps,
                        "skipped_steps": state.skipped_steps,
                        "elapsed_s": time.perf_counter() - start_time,
                    }, state.log_history)
                    window_loss, window_tokens, window_real_tokens = 0.0, 0, 0
                    window_start = time.perf_counter()
                if bundle.val and t.eval_steps and state.global_step % t.eval_steps == 0:
                    last_eval = run_eval(run)
                if (run.main and t.save_steps and state.global_step % t.save_steps == 0
                        and state.global_step < run.total_steps):
                    save_checkpoint(run.out, run.model, run.tokenizer, cfg, run.target_modules, state)
                if state.global_step >= run.total_steps:
                    break
            else:  # the epoch ran out before max_steps
                state.epoch += 1
                state.batch_in_epoch = 0
                if bundle.val and not t.eval_steps:
                    last_eval = run_eval(run)
    return last_loss, last_eval


def run_eval(run: Run) -> dict:
    metrics = evaluate(run.model, run.bundle.val, run.tokenizer.pad_token_id, run.cfg.train.micro_batch_size,
                       run.accelerator)
    record = {"step": run.state.global_step, **metrics}
    run.sink.log(record, run.state.log_history)
    return record


def nonfinite_message(count: int, precision, lr: float, model_risk: str | None = None) -> str:
    hint = (
        "fp16 overflows easily: use train.precision=bf16 on a GPU that has it (compute capability >= 8.0) or "
        "train.precision=fp32, "
        if precision.precision == "fp16"
        else ""
    )
    return (
        f"The loss was non-finite (NaN or inf) for {count} optimizer steps in a row, so training stopped. "
        f"{hint}lower train.learning_rate (now {lr:g}), or keep train.max_grad_norm set. Nothing was saved from "
        "this run beyond earlier checkpoints." + (f" Note: {model_risk}" if model_risk else "")
    )
