"""Sample answers while training (train.eval_prompts): what the model answers, at every evaluation and at the end.

When: with every evaluation (every train.eval_steps when set, else at the end of each epoch; with or without
validation data) and once at the end. Each prompt is answered greedily with the tokenizer's chat template (as
lora-generate does) in at most train.eval_max_new_tokens tokens. The rows {"step", "prompt", "answer"} go through
the metrics sink: printed under the progress bar, appended to runs/<run_name>/samples.jsonl, logged to the trackers
as text, and kept in the training state (so a resumed run continues the file without duplicates and the result's
samples.jsonl holds them all).

Answering must not change the training: the model is put in eval mode under no_grad, with its KV cache on (gradient
checkpointing turns it off) and sdpa attention instead of the packed-attention variant (data.packing), and every RNG
state is saved before and restored after; a run with prompts trains exactly the adapter a run without them trains.
Under several processes only the main one answers; the others wait (under FSDP all answer, since every
forward gathers the sharded weights, and the main one logs).
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

from ..errors import UserError
from .rng import untouched_rng
from .state import LoopState, Run


def load_prompts(cfg) -> Prompts | NoPrompts:
    """train.eval_prompts (read from its file when it is a path); NoPrompts for none. Checked before the model
    loads."""
    value = cfg.train.eval_prompts
    if isinstance(value, str):
        from ..generate_io import read_prompt_file

        if not Path(value).is_file():
            raise UserError(
                f"train.eval_prompts: '{value}' is not a file. Give the path of a prompt file (one prompt per line, "
                f"or JSONL with a \"prompt\" field), or write the prompts as a list: eval_prompts: [\"{value}\"]."
            )
        value = read_prompt_file(value)
    return Prompts(tuple(value)) if value else NoPrompts()


class Prompts:
    """train.eval_prompts, answered with every evaluation and at the end of the run."""

    def __init__(self, texts: tuple[str, ...]):
        self.texts = texts

    def answer(self, run: Run, loop: LoopState) -> None:
        """Answer the prompts with the model as it is now and log the rows (main process; the others wait).
        Once per step: the end of a run whose last step had an evaluation adds nothing."""
        state = loop.state
        if state.samples_step == state.global_step:
            return
        state.samples_step = state.global_step  # on every process, so all agree on the barrier below
        with run.sharding.generation(run) as generates:  # the main process; under FSDP all of them, in step
            if generates:
                step, started = state.global_step, time.perf_counter()
                with _generation_mode(run):
                    answers = [_answer(run, prompt) for prompt in self.texts]
                rows = [{"step": step, "prompt": p, "answer": a} for p, a in zip(self.texts, answers)]
                if run.main:
                    run.sink.log_samples(rows, state.samples)
                loop.samples_seconds += time.perf_counter() - started
        run.accelerator.wait_for_everyone()


class NoPrompts:
    """No train.eval_prompts: answering does nothing (no barrier, no step recorded), so the loop and the end of the
    run call `run.prompts.answer` without asking whether there are prompts, as they log to an empty Trackers."""

    texts: tuple[str, ...] = ()

    def answer(self, run: Run, loop: LoopState) -> None:
        pass


def _answer(run: Run, prompt: str) -> str:
    from ..generate import generate_text

    # data.system_prompt goes into chat conversations only: without a template the prompt stays the bare text
    system = run.cfg.data.system_prompt if getattr(run.tokenizer, "chat_template", None) else None
    with run.accelerator.autocast():  # the precision the model trains and evaluates in
        return generate_text(run.model, run.tokenizer, prompt, max_new_tokens=run.cfg.train.eval_max_new_tokens,
                             temperature=0.0, chat_template=True, system=system)


@contextlib.contextmanager
def _generation_mode(run: Run):
    """Eval mode, KV cache on, plain sdpa attention, RNG untouched; all put back as it was afterwards."""
    from ..packing import PACKED_SDPA, TRAIN_SDPA

    model = run.model
    config = model.config
    was_training, use_cache = model.training, getattr(config, "use_cache", None)
    attention = getattr(config, "_attn_implementation", None)
    model.eval()
    config.use_cache = True
    switched = attention in (PACKED_SDPA, TRAIN_SDPA)  # packed_attention switches only sdpa models: sdpa it was
    if switched:
        model.set_attn_implementation("sdpa")
    try:
        with untouched_rng():
            yield
    finally:
        if switched:
            model.set_attn_implementation(attention)
        config.use_cache = use_cache
        model.train(was_training)
