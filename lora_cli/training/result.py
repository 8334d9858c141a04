"""The end of a run: the final evaluation and sample answers, the best weights (train.load_best_at_end), the result
that output_dir holds once it is published (outdir.publish swaps it in whole), train.merge_at_end, the summary.

A run that keeps checkpoints (train.save_steps or train.save_minutes) also writes the resume state into the result
(lora_cli/layout.py), so a longer run (a higher train.max_steps or train.epochs) continues from the last step rather
than from the last checkpoint before it.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from ..fsutil import atomic_write_text
from ..inject import lora_state_dict
from ..layout import MERGED_DIR, METRICS_NAME, PLOT_NAME, SAMPLES_NAME
from . import outdir
from .checkpoint import gather_rng_states, save_adapter_folder, save_resume_state
from .loop import evaluate_and_track, restore_best
from .metrics import to_jsonl
from .plot import title_for, write_loss_plot
from .state import LoopState, Run, TrainResult
from .summary import print_summary


def finish(run: Run, loop: LoopState, last_loss: float | None, last_eval: dict | None) -> TrainResult:
    """The final evaluation (unless the last step had one), the best weights if asked, then the result."""
    state, bundle, t = loop.state, run.bundle, run.cfg.train
    if bundle.val and (last_eval is None or last_eval.get("step") != state.global_step):
        last_eval = evaluate_and_track(run, loop)
    run.prompts.answer(run, loop)  # the final answers, unless this step's evaluation gave them
    last = last_weights(run, loop)  # what a longer run would continue from, before the best replaces it
    if t.load_best_at_end and loop.best_weights:
        restore_best(run, loop)
        run.say(f"the final adapter is the best evaluated one: step {state.best_step} (eval loss "
                f"{state.best_eval_loss:.4f})")
    if state.skipped_steps:
        run.say(f"[yellow]{state.skipped_steps} updates were skipped (non-finite loss, or fp16 overflow).")
    result = TrainResult(run.out, state, last_loss, last_eval["eval_loss"] if last_eval else None)
    run.accelerator.wait_for_everyone()
    run.trackers.end()  # their files are closed before output_dir is swapped for the result
    publish_result(run, loop, last)
    if not run.main:
        return result
    run.say(f"adapter saved to {run.out}", markup=False)
    if t.merge_at_end:
        result.merged_dir = merge_at_end(run)
        run.say(f"merged model saved to {result.merged_dir}", markup=False)
    print_summary(run, loop, run.out)
    return result


def keeps_checkpoints(run: Run) -> bool:
    t = run.cfg.train
    return bool(t.save_steps or t.save_minutes)


def last_weights(run: Run, loop: LoopState) -> dict | None:
    """The weights training goes on from, copied before load_best_at_end replaces them with the best ones (None
    when the result needs no copy: the run keeps no checkpoints, or the weights stay the last ones)."""
    if not (keeps_checkpoints(run) and run.cfg.train.load_best_at_end and loop.best_weights):
        return None
    # Under FSDP gathered from the shards (a collective: every process gets here alike).
    return {k: v.to("cpu", copy=True) for k, v in run.sharding.lora_tensors(run.model).items()}


def publish_result(run: Run, loop: LoopState, last: dict | None) -> None:
    """Write the result and swap it in as output_dir (every process calls this: the RNG states are gathered, and
    under FSDP the LoRA weights and optimizer moments from the shards)."""
    resumable = keeps_checkpoints(run)
    rng_states = gather_rng_states(run) if resumable else None
    lora_tensors = run.sharding.lora_tensors(run.model)
    optimizer_state = run.sharding.optimizer_state(run.optimizer) if resumable else None
    if not run.main:
        return
    later = (MERGED_DIR,) if run.cfg.train.merge_at_end else ()
    resume = (rng_states, optimizer_state)
    outdir.publish(run.out, lambda folder: _write_result(run, loop, folder, lora_tensors, resume, last),
                   loop.state.run_id, _result_bytes(run), later)


def _write_result(run: Run, loop: LoopState, folder: Path, lora_tensors: dict, resume: tuple,
                  last: dict | None) -> None:
    """Everything the finished run's output_dir holds besides what it carries over (checkpoints, runs/); `resume`:
    (RNG states, optimizer state) when the result carries the resume state, else (None, None)."""
    cfg, state = run.cfg, loop.state
    save_adapter_folder(folder, run.model, run.tokenizer, cfg, run.target_modules, state, lora_tensors)
    rng_states, optimizer_state = resume
    if rng_states is not None:
        save_resume_state(folder, run, loop, rng_states, optimizer_state, last)
    atomic_write_text(folder / METRICS_NAME, to_jsonl(state.log_history))
    if state.samples:
        atomic_write_text(folder / SAMPLES_NAME, to_jsonl(state.samples))
    title = title_for(cfg.model.name_or_path, cfg.data.describe_path(), state.run_name)
    write_loss_plot(state.log_history, folder / PLOT_NAME, title, warn=run.say)


def _result_bytes(run: Run) -> int:
    lora_bytes = sum(t.numel() * 4 for t in lora_state_dict(run.model).values())
    resume_bytes = 4 * lora_bytes if keeps_checkpoints(run) else 0  # AdamW's two moments, a best and a last copy
    return lora_bytes + resume_bytes + 2**25  # the adapter, tokenizer, logs


def merge_at_end(run: Run) -> Path:
    """train.merge_at_end, once the adapter is safe in output_dir: lora-merge's own verified merge, in fp32 from the
    base on disk (also for a 4-bit or fp16 run), into output_dir/merged (atomic). If it fails (a full disk: a merged
    3B model is ~6 GB), the adapter stays and the message says how to merge it later."""
    from ..merge import merge_adapter

    cfg, merged = run.cfg, run.out / MERGED_DIR
    try:
        merge_adapter(run.out, merged, base=cfg.model.name_or_path, revision=cfg.model.revision,
                      trust_remote_code=cfg.model.trust_remote_code, log=lambda m: run.say(m, markup=False))
    except UserError as err:
        raise UserError(f"The adapter is saved in {run.out}, but merging it (train.merge_at_end) failed: {err} Once "
                        f"that is fixed, merge it with: lora-merge {run.out} {merged}") from None
    return merged
