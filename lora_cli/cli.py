"""Command-line entry points. Thin: parse arguments, call the library, turn UserError into exit code 2.

`lora-train`, `lora-merge` and `lora-generate` are separate console scripts; `python -m lora_cli train|merge|generate`
reaches the same commands.
"""

from __future__ import annotations

import functools
import json
import os
import shlex
import sys
import traceback
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.text import Text

from .errors import Terminated, UserError

# Messages and paths are user text: print them as rich Text (or markup=False), never as markup, where
# "[q_proj, v_proj]" would vanish and a path holding "[/x]" would crash the printer itself.
err_console = Console(stderr=True)
EXIT_USER_ERROR = 2

DEBUG_HELP = "Show the full traceback on errors."
TRUST_REMOTE_CODE_HELP = "Run modelling code shipped with the model (only for repositories you trust)."


def _quiet_libraries() -> None:
    """Keep the user's terminal for our messages: transformers/datasets chatter goes below warning level."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


def handle_errors(func):
    """Run a command; a UserError becomes its message on stderr and exit code 2 (a traceback only with --debug)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        debug = kwargs.get("debug", False)
        _quiet_libraries()
        try:
            return func(*args, **kwargs)
        except UserError as err:
            if debug:  # the traceback too, but the same exit code: scripts that check for 2 see no difference
                traceback.print_exc()
            err_console.print(Text.assemble(("error:", "bold red"), " ", str(err)), highlight=False, soft_wrap=True)
            raise typer.Exit(EXIT_USER_ERROR) from None
        except KeyboardInterrupt as err:
            terminated = isinstance(err, Terminated)
            err_console.print("[yellow]terminated[/yellow]" if terminated else "[yellow]interrupted[/yellow]")
            raise typer.Exit(143 if terminated else 130) from None

    return wrapper


# --- lora-train ----------------------------------------------------------------------------------------------


def train_command(
    config: Optional[Path] = typer.Argument(None, help="YAML config file (see configs/ for examples)."),
    overrides: Optional[List[str]] = typer.Argument(
        None, help="Dotted overrides, YAML-typed: train.learning_rate=1e-4 lora.target_modules=[q_proj,v_proj]"
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Load model and data, print what would be trained, stop."),
    prepare: bool = typer.Option(
        False, "--prepare", help="Only tokenize the data into its cache (data.cache_dir) and print the data summary: "
        "later runs start without tokenizing. Loads no model; runs on a CPU."
    ),
    estimate: bool = typer.Option(
        False, "--estimate", help="Estimate the GPU memory a training step needs (reads only config.json), then stop."
    ),
    gpu: Optional[str] = typer.Option(
        None, "--gpu", help="With --estimate or --dry-run: the GPU to check, t4 | 2080ti | 3080 | a size like 24GB. "
        "Default: the GPU here, else a T4."
    ),
    json_output: bool = typer.Option(False, "--json", help="With --estimate: also print it as one JSON line, last."),
    plot: Optional[Path] = typer.Option(
        None, "--plot", metavar="OUTPUT_DIR",
        help="Only draw OUTPUT_DIR/loss.png from the metrics of the run there (finished, running or interrupted).",
    ),
    debug: bool = typer.Option(False, "--debug", help=DEBUG_HELP),
) -> None:
    """Fine-tune a causal LM with LoRA and write a PEFT-format adapter folder."""
    if plot is not None:
        _plot(plot, config, overrides, [flag for flag, given in (("--dry-run", dry_run), ("--estimate", estimate),
                                                                  ("--json", json_output), ("--gpu", gpu),
                                                                  ("--prepare", prepare)) if given])
        return
    if config is None:
        raise UserError("Missing the config file: lora-train CONFIG.yaml [key=value ...] (see configs/ for examples), "
                        "or lora-train --plot OUTPUT_DIR to draw the loss curves of a run.")
    from . import api
    from .config import load_config
    from .errors import TrainingStopped

    cfg = load_config(config, overrides or [])
    if estimate and dry_run:
        raise UserError("Choose one of --estimate (memory only, from config.json; loads nothing) or --dry-run (loads "
                        "the model and data, and prints the estimate too).")
    if prepare and (estimate or dry_run or gpu is not None or json_output):
        raise UserError("--prepare only tokenizes the data into its cache; run it alone (lora-train config.yaml "
                        "--prepare), then --dry-run or --estimate separately.")
    if prepare:
        from .train import prepare_data

        prepare_data(cfg)
        return
    if estimate:  # before anything loads a model or data
        result = api.estimate(cfg, gpu=gpu)
        if json_output:
            print(json.dumps(result.to_json()), flush=True)
        return
    if json_output or (gpu is not None and not dry_run):
        raise UserError("--json goes with --estimate, --gpu with --estimate or --dry-run, e.g. lora-train config.yaml "
                        "--estimate --gpu t4 --json")
    try:
        api.train(cfg, dry_run=dry_run, gpu=gpu)
    except TrainingStopped as stopped:
        if not stopped.main:  # under torchrun every process stops; the main one says how to continue
            raise typer.Exit(128 + stopped.signum) from None
        if stopped.finished:
            message = f"stopped after the run had finished: the adapter is saved in {stopped.checkpoint}."
        else:
            message = (f"stopped at step {stopped.step}; saved in {stopped.checkpoint}. To continue, run:\n  "
                       f"{_resume_command(config, overrides or [])}")
        err_console.print(message, markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(128 + stopped.signum) from None


def _plot(output_dir: Path, config: Optional[Path], overrides: Optional[List[str]], flags: List[str]) -> None:
    from .training.plot import redraw

    extra = [str(a) for a in ([config] if config is not None else []) + list(overrides or [])] + flags
    if extra:
        raise UserError(f"--plot OUTPUT_DIR draws a picture and trains nothing: it takes no config, overrides or "
                        f"other options (got {' '.join(extra)}). Run lora-train --plot OUTPUT_DIR alone.")
    path = redraw(output_dir)
    err_console.print(Text(f"loss curves drawn to {path}"), highlight=False, soft_wrap=True)


def _resume_command(config: Path, overrides: List[str]) -> str:
    """The command that continues this run: the same config and overrides, plus resume_from_checkpoint=auto; under
    torchrun or `accelerate launch` the launcher's own command line (with its process count, which a resumed run
    must keep)."""
    launcher = _launcher_argv()
    if launcher is not None:
        kept = [a for a in launcher if not a.startswith("train.resume_from_checkpoint=")]
        return shlex.join([*kept, "train.resume_from_checkpoint=auto"])
    kept = [o for o in overrides if not o.startswith("train.resume_from_checkpoint=")]
    program = ["lora-train"] if Path(sys.argv[0]).name == "lora-train" else [sys.executable, "-m", "lora_cli", "train"]
    return shlex.join([*program, str(config), *kept, "train.resume_from_checkpoint=auto"])


def _launcher_argv() -> Optional[List[str]]:
    """The command line of the torchrun / `accelerate launch` process that started this one (its elastic agent,
    which sets TORCHELASTIC_RUN_ID for its workers, is the parent process); None when not launched so, or where
    /proc cannot tell."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return None
    try:
        raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
    except OSError:
        return None
    argv = [part.decode(errors="replace") for part in raw.split(b"\0") if part]
    return argv or None


# --- lora-merge ----------------------------------------------------------------------------------------------


def merge_command(
    adapter_dir: Path = typer.Argument(
        ..., metavar="ADAPTER_DIR", help="Adapter folder (lora-train output or PEFT save_pretrained)."
    ),
    output_dir: Path = typer.Argument(
        ..., metavar="OUTPUT_DIR", help="Folder to write the merged model to (created atomically)."
    ),
    base: Optional[str] = typer.Option(
        None, "--base", help="Base model (Hub name or folder). Default: base_model_name_or_path of the adapter."
    ),
    dtype: Optional[str] = typer.Option(
        None, "--dtype", help="float16 | bfloat16 | float32. Default: the base model's stored dtype."
    ),
    max_shard_size: str = typer.Option("2GB", "--max-shard-size", help="Largest safetensors shard, e.g. 2GB, 500MB."),
    verify_logits: bool = typer.Option(
        False, "--verify-logits/--no-verify-logits", "--verify/--no-verify",
        help="Also load the whole model (about 4 bytes of RAM per parameter) and check the merged model's logits "
        "against base + adapter before writing. Without it the merge streams shard by shard and checks each merged "
        "weight on its own.",
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUTPUT_DIR if it exists."),
    revision: Optional[str] = typer.Option(
        None, "--revision", help="Hub branch, tag or commit of the base. Default: the adapter's revision."
    ),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help=TRUST_REMOTE_CODE_HELP),
    debug: bool = typer.Option(False, "--debug", help=DEBUG_HELP),
) -> None:
    """Merge a LoRA adapter into its base model and write a plain transformers model folder."""
    from . import api

    result = api.merge(adapter_dir, output_dir, base=base, dtype=dtype, max_shard_size=max_shard_size,
                       verify_logits=verify_logits, overwrite=overwrite, revision=revision,
                       trust_remote_code=trust_remote_code)
    Console(highlight=False, soft_wrap=True).print(Text(f"merged model saved to {result.output_dir}", style="green"))


# --- lora-generate -------------------------------------------------------------------------------------------


def generate_command(
    model: str = typer.Argument(..., metavar="MODEL", help="Model: Hub name or local folder (a merged folder too)."),
    adapter: Optional[Path] = typer.Option(None, "--adapter", help="LoRA adapter folder to apply to MODEL."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="One prompt; the answer streams to stdout."),
    prompt_file: Optional[Path] = typer.Option(
        None, "--prompt-file", help='One prompt per line, or JSONL with a "prompt" (or "question") field.'
    ),
    chat: bool = typer.Option(False, "--chat", help="Interactive multi-turn chat on stdin; /exit or Ctrl-D ends."),
    merge: bool = typer.Option(False, "--merge", help="Merge the adapter into the weights in memory (same output)."),
    load_in_4bit: bool = typer.Option(
        False, "--load-in-4bit", help="Load MODEL's linear layers in 4 bits (NF4, as QLoRA trains); needs bitsandbytes."
    ),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", help="Most tokens to generate per answer."),
    temperature: float = typer.Option(0.7, "--temperature", help="0 = greedy, deterministic."),
    top_p: float = typer.Option(0.9, "--top-p", help="Nucleus sampling threshold (sampling only)."),
    top_k: int = typer.Option(50, "--top-k", help="Sample among the K likeliest tokens; 0 = no limit."),
    repetition_penalty: float = typer.Option(1.0, "--repetition-penalty", help="1 = none."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed for reproducible sampling."),
    no_chat_template: bool = typer.Option(False, "--no-chat-template", help="Send the raw text, no chat template."),
    system: Optional[str] = typer.Option(None, "--system", help="System message put before the conversation."),
    output: Optional[Path] = typer.Option(None, "--output", help="Also write results as JSONL to this file."),
    dtype: str = typer.Option(
        "auto", "--dtype", help="auto | float16 | bfloat16 | float32. auto: bfloat16 on GPUs of compute capability "
        "8.0+, float16 on older ones (T4), float32 on CPU. float32 is the way out of a float16 overflow."
    ),
    revision: Optional[str] = typer.Option(None, "--revision", help="Hub branch, tag or commit of MODEL."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help=TRUST_REMOTE_CODE_HELP),
    debug: bool = typer.Option(False, "--debug", help=DEBUG_HELP),
) -> None:
    """Generate text with a model, optionally with a LoRA adapter."""
    from . import api
    from .generate_io import write_record

    # --prompt streams its answer; --prompt-file streams the answers when they go to --output, and otherwise prints
    # one JSON line per answer to stdout as it ends
    jsonl_to_stdout = prompt_file is not None and output is None
    print_record = (lambda asked, answer: write_record(sys.stdout, asked, answer)) if jsonl_to_stdout else None
    api.generate(
        model, prompt, prompt_file=prompt_file, chat=sys.stdin if chat else None, adapter=adapter, merge=merge,
        load_in_4bit=load_in_4bit, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
        repetition_penalty=repetition_penalty, seed=seed, chat_template=not no_chat_template, system=system,
        output=output, dtype=dtype, revision=revision, trust_remote_code=trust_remote_code,
        stream=not jsonl_to_stdout, on_answer=print_record,
    )


# --- wiring --------------------------------------------------------------------------------------------------


def _single(command) -> typer.Typer:
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)
    app.command()(handle_errors(command))
    return app


def _all_commands() -> typer.Typer:
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True, rich_markup_mode=None)
    app.command("train")(handle_errors(train_command))
    app.command("merge")(handle_errors(merge_command))
    app.command("generate")(handle_errors(generate_command))
    return app


train_app = _single(train_command)
merge_app = _single(merge_command)
generate_app = _single(generate_command)
main_app = _all_commands()


def main() -> None:  # python -m lora_cli
    main_app(prog_name="python -m lora_cli")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
