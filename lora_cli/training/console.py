"""What the user sees while training: the progress bar, one line per logged record, the data summary, the dry run.

All of it goes to stderr (stdout stays free for scripts); only the main process prints.
"""

from __future__ import annotations

from rich.console import Console

from .. import data as data_lib
from ..config import Config, config_to_yaml

console = Console(stderr=True, soft_wrap=True)  # long paths stay on one line, copyable


def say_nothing(*args, **kwargs) -> None:
    """What the processes other than the main one print."""


def progress_bar(quiet: bool):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

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


def record_printer(progress, quiet: bool):
    """record -> one console line above the progress bar (training and evaluation records and sample answers)."""

    def show(record: dict) -> None:
        if quiet:
            return
        if "answer" in record:  # a sample answer (train.eval_prompts): user text, never markup
            answer = " ".join(record["answer"].split()) or "(empty)"
            progress.console.print(f"step {record['step']} sample: {record['prompt']}\n  -> {answer}", markup=False,
                                   highlight=False)
        elif "eval_loss" in record:
            progress.console.print(
                f"step {record['step']}: eval loss {record['eval_loss']:.4f}, perplexity {record['eval_ppl']:.2f}"
            )
        else:
            progress.console.print(
                f"step {record['step']}: loss {record['loss']:.4f}, lr {record['learning_rate']:.2e}, "
                f"{record['tokens_per_s']:.0f} tok/s"
            )

    return show


def print_data_summary(bundle) -> None:
    s = bundle.stats
    console.print(
        f"data ({s.format}): {s.num_train} train / {s.num_val} validation examples, {s.train_tokens:,} tokens "
        f"of which {s.trained_tokens:,} trained; longest {s.max_example_length} tokens, {s.num_truncated} truncated "
        f"to data.max_length={s.max_length}"
    )
    for line in data_lib.source_lines(s.sources):
        console.print(line, markup=False, highlight=False)
    if s.num_truncated:
        console.print(f"[yellow]{s.num_truncated} examples were longer than data.max_length and were truncated.")
    empty, cut = s.num_without_response, s.num_dropped - s.num_without_response
    if empty:
        console.print(f"[yellow]{empty} examples had an empty response (or no assistant reply) and were dropped.")
    if cut:
        console.print(f"[yellow]{cut} examples had no trained tokens left after truncation to data.max_length and "
                      "were dropped.")


def print_dry_run(cfg: Config, tokenizer, bundle, memory: str) -> None:
    out = Console()
    out.rule("resolved config")
    out.print(config_to_yaml(cfg), markup=False, highlight=False, soft_wrap=True)  # YAML lines stay whole
    plain = not out.is_terminal or out.no_color  # colour is lost in a pipe or a file: mark trained tokens too
    marks = data_lib.PLAIN_MARKS if plain else None
    out.rule(f"first training example (trained tokens {'between ' + ' and '.join(marks) if marks else 'highlighted'})")
    if bundle.train:
        out.print(data_lib.preview(bundle.train[0], tokenizer, plain=plain), soft_wrap=True)
    out.rule("GPU memory estimate (lora-train --estimate)")
    out.print(memory, markup=False, highlight=False, soft_wrap=True)
    out.rule("dry run: nothing was trained")
