"""The Python API: lora_cli.train, estimate, merge and generate, for notebooks and other tools.

Each does what its command does, with the same checks, messages and guarantees (atomic outputs, locks, resume);
cli.py is a thin layer over these functions. Problems with the input raise lora_cli.UserError (the commands turn it
into exit code 2); an interrupted training run raises lora_cli.TrainingStopped after saving a checkpoint.

This module imports nothing heavy at load time (`import lora_cli` stays fast): torch, transformers and the modules
that need them are imported inside the functions.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Callable, Sequence, TextIO, Union

from .config import Config, build_config
from .errors import UserError
from .training.state import TrainResult

if TYPE_CHECKING:
    from .estimate import Estimate
    from .merge import MergeResult

ConfigLike = Union[str, os.PathLike, Mapping, Config]  # a YAML file, a dict shaped like one, or a Config


def _quiet_libraries(func):
    """While the call runs, transformers prints only errors and no progress bars (as under the commands: cli.py), so
    a notebook shows lora-cli's own lines; afterwards the caller's settings are back."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        from transformers.utils import logging as hf_logging

        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # no fork warnings from the tokenizers library
        verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        try:
            return func(*args, **kwargs)
        finally:
            hf_logging.set_verbosity(verbosity)
            if bars:
                hf_logging.enable_progress_bar()

    return wrapper


@_quiet_libraries
def train(config: ConfigLike, /, *overrides: str, dry_run: bool = False,
          quiet: bool = False, gpu: str | None = None, **sections: Mapping) -> TrainResult | None:
    """Train a LoRA adapter as `lora-train` does and return the run's TrainResult (adapter_dir, metrics,
    best_step, final losses, ...).

    `config`: a YAML file, a dict shaped like one, or a Config. Overrides, applied in this order, each merged key by
    key into its section: dotted strings exactly as on the command line ("train.max_steps=2", YAML-typed), then one
    keyword per section with a dict of Python values (train={"max_steps": 2}, lora={"r": 4}).

    With `dry_run` it loads the model and data, prints what would be trained (the memory estimate for `gpu` too)
    and returns None. When output_dir already holds this very run, finished (a rerun with
    resume_from_checkpoint: auto after the run ended), nothing is trained and the result there is returned.
    """
    cfg = build_config(config, overrides, sections)
    if gpu is not None and not dry_run:
        raise UserError("gpu= goes with dry_run=True (or lora_cli.estimate): it names the GPU whose memory the "
                        "estimate is for, e.g. lora_cli.train('config.yaml', dry_run=True, gpu='t4').")
    from .train import train as run_training

    result = run_training(cfg, dry_run=dry_run, quiet=quiet, gpu=gpu)
    if result is None and not dry_run:
        result = _finished_result(cfg)
    return result


def _finished_result(cfg: Config) -> TrainResult | None:
    """The result a finished run left in output_dir (train() returned None: there was nothing left to train)."""
    from .layout import MERGED_DIR
    from .training import outdir
    from .training.snapshot import scan

    folder = scan(outdir.resolve_output_dir(cfg.train.output_dir))
    if not folder.has_result or folder.result_state is None:
        return None
    merged = folder.path / MERGED_DIR
    return TrainResult.from_saved_state(folder.path, folder.result_state, merged if merged.is_dir() else None)


@_quiet_libraries
def estimate(config: ConfigLike, /, *overrides: str, gpu: str | None = None, processes: int = 1,
             quiet: bool = False, **sections: Mapping) -> Estimate:
    """The GPU memory a training step of this config needs, as `lora-train --estimate` computes it (from the model's
    config.json, without loading the model). Prints the estimate unless `quiet`; returns it (`.fits`,
    `.total_bytes`, `.parts`, `.to_json()`). `gpu`: t4 | 2080ti | 3080 | a size like "24GB"; default the GPU here,
    else a T4. `processes`: the GPUs it is launched on (with train.fsdp the base is sharded over them). Overrides
    as in `train`."""
    from .estimate import estimate_for_config, format_estimate

    result = estimate_for_config(build_config(config, overrides, sections), gpu, processes=processes)
    if not quiet:
        print(format_estimate(result), flush=True)
    return result


@_quiet_libraries
def merge(adapter_dir: str | os.PathLike, output_dir: str | os.PathLike, *, base: str | None = None,
          dtype: str | None = None, max_shard_size: str | int = "2GB", verify_logits: bool = False,
          overwrite: bool = False, revision: str | None = None, trust_remote_code: bool = False,
          gguf: str | None = None, gguf_only: bool = False, ollama: bool = False, quiet: bool = False) -> MergeResult:
    """Merge an adapter into its base and write a plain transformers folder, as `lora-merge` does (the keyword
    arguments are its options; `gguf="q8_0"` is --gguf q8_0). Prints its notes unless `quiet`; returns the
    MergeResult (output_dir, dtype, ...; gguf: the GGUF written, its path)."""
    from .merge import merge_adapter

    return merge_adapter(adapter_dir, output_dir, base=base, dtype=dtype, max_shard_size=max_shard_size,
                         verify_logits=verify_logits, overwrite=overwrite, revision=revision,
                         trust_remote_code=trust_remote_code, log=_printer(sys.stdout, quiet), gguf=gguf,
                         gguf_only=gguf_only, ollama=ollama)


@_quiet_libraries
def generate(model: str | os.PathLike, prompt: str | Sequence[str] | None = None, *,
             prompt_file: str | os.PathLike | None = None, chat: TextIO | None = None,
             adapter: str | os.PathLike | None = None, merge: bool = False, load_in_4bit: bool = False,
             max_new_tokens: int = 256, temperature: float = 0.7, top_p: float = 0.9, top_k: int = 50,
             repetition_penalty: float = 1.0, seed: int | None = None, chat_template: bool = True,
             system: str | None = None, output: str | os.PathLike | None = None, dtype: str = "auto",
             revision: str | None = None, trust_remote_code: bool = False, stream: bool = False,
             on_answer: Callable[[str, str], None] | None = None, quiet: bool = False):
    """Answer prompts with MODEL (a Hub name or folder, a merged one too), optionally with an adapter, as
    `lora-generate` does; the keyword arguments are its options.

    Exactly one of: `prompt` (a string: returns the answer; a list of strings: returns the list of answers),
    `prompt_file` (one prompt per line, or JSONL with a "prompt" field: returns the list of answers) or `chat` (a
    text stream read line by line as a multi-turn conversation, like lora-generate --chat on stdin: returns the
    conversation as a list of {"role", "content"} messages). `output` also writes {"prompt", "response"} JSON
    lines to that file; `stream` prints each answer to stdout as it is generated (chat always does); `on_answer`
    is called with (prompt, answer) after each one. `system` defaults to the system prompt the adapter was trained
    with (data.system_prompt), if any. Status lines go to stderr unless `quiet`. The model is loaded once per call:
    pass all prompts together.
    """
    from . import generate_io
    from .chat_templates import trained_system_prompt
    from .generate import (
        SamplingSettings,
        chat_session,
        generate_text,
        generation_dtype,
        load_for_generation,
        sampling_options,
    )

    prompts = _prompts(prompt, prompt_file, chat)
    options = sampling_options(
        SamplingSettings(max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed),
        chat_template=chat_template,
    )
    generate_io.check_output_file(output, prompt_file)
    generation_dtype(dtype, "cpu")  # only to validate dtype before the (slow) model load
    status = _printer(sys.stderr, quiet)
    lm, tokenizer = load_for_generation(
        str(model), adapter, merge, dtype=dtype, revision=revision, trust_remote_code=trust_remote_code,
        log=status, load_in_4bit=load_in_4bit,
    )
    with_template = chat_template and getattr(tokenizer, "chat_template", None)
    if system is None and with_template and (system := trained_system_prompt(adapter)) is not None:
        status(f"system prompt: the one {adapter} was trained with (data.system_prompt); --system replaces it")
    with generate_io.open_output(output) if output is not None else contextlib.nullcontext() as out_file:
        def answered(asked: str, answer: str) -> None:
            if out_file is not None:
                generate_io.write_record(out_file, asked, answer)
            if on_answer is not None:
                on_answer(asked, answer)

        if chat is not None:
            return chat_session(lm, tokenizer, chat, system=system, on_turn=answered, **options)
        answers = []
        for asked in prompts:
            answers.append(generate_text(lm, tokenizer, asked, stream=stream, system=system, **options))
            answered(asked, answers[-1])
    return answers[0] if isinstance(prompt, str) else answers


def _prompts(prompt: str | Sequence[str] | None, prompt_file, chat) -> list[str]:
    """The prompts to answer, checked before the model loads (empty for chat)."""
    from .generate_io import check_prompt, read_prompt_file

    modes = [name for name, given in (("--prompt", prompt is not None), ("--prompt-file", prompt_file is not None),
                                      ("--chat", chat is not None)) if given]
    if len(modes) != 1:
        raise UserError(f"Choose exactly one of --prompt TEXT, --prompt-file FILE or --chat (in Python: prompt=, "
                        f"prompt_file= or chat=; got {' and '.join(modes) or 'none'}).")
    if prompt_file is not None:
        return read_prompt_file(prompt_file)
    if chat is not None:
        return []
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise UserError(f"prompt must be a string or a non-empty list of strings (got {prompt!r}).")
    for text in prompts:
        check_prompt(text)
    return prompts


def _printer(stream: TextIO, quiet: bool) -> Callable[[str], None]:
    return (lambda message: None) if quiet else (lambda message: print(message, file=stream, flush=True))


__all__ = ["ConfigLike", "estimate", "generate", "merge", "train"]
