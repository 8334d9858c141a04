"""The output folder's layout: every name lora-train writes into output_dir and into checkpoint-<step>/, in one place
(the PEFT adapter folder's own names too, which every command reads). It imports nothing of lora_cli, so any module
may import it: the chat templates read lora_config.yaml, the trainer writes everything.

    output_dir/
      adapter_config.json, adapter_model.safetensors, tokenizer files,    the result: a PEFT-loadable adapter
      lora_config.yaml, trainer_state.json, metrics.jsonl,                folder, published as a whole
      loss.png, samples.jsonl                                             curves; answers to train.eval_prompts
      merged/                                                             (train.merge_at_end)
      .lora_cli_result.json                                               the manifest: the result's names, when
      checkpoint-<step>/                                                  full-state checkpoints, each atomic
      runs/<run_name>/metrics.jsonl, samples.jsonl                        the live logs of a running job
      runs/<run_name>/events.out.tfevents.*                               TensorBoard (train.report_to)

    checkpoint-<step>/
      adapter_config.json, adapter_model.safetensors, tokenizer files, lora_config.yaml   a PEFT-loadable adapter
      trainer_state.json        TrainState: data position, logging window, early stopping, history, run id
      optimizer.pt              the optimizer's state_dict (AdamW moments and step counts, parameter groups)
      scheduler.pt              the learning-rate schedule's state_dict
      scaler.pt                 the fp16 loss scaler's state_dict (fp16 runs only)
      rng_state.pth             python, numpy, torch and CUDA RNG states of every process, indexed by rank
      best_adapter.safetensors  the best evaluated LoRA weights (train.load_best_at_end only)
      loss.png                  the curves so far (not needed to resume)

A run that keeps checkpoints (train.save_steps or train.save_minutes) also writes optimizer.pt, scheduler.pt,
scaler.pt, rng_state.pth and best_adapter.safetensors into its result, so that a longer run (a higher
train.max_steps or train.epochs) continues from the last step; last_adapter.safetensors is added when the result's
adapter is the best evaluated one (train.load_best_at_end) rather than the last.

Temporary names (what a kill can leave) are fsutil's: `.NAME.<random>.tmp`, `.NAME.replaced.old`, ...
"""

from __future__ import annotations

from pathlib import Path

# PEFT's adapter folder: what lora-train's result and checkpoints are, and what every command reads an adapter from.
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"  # adapters from PEFT before safetensors became its default
# Both in the result and in every checkpoint.
STATE_NAME = "trainer_state.json"
CONFIG_COPY_NAME = "lora_config.yaml"
PLOT_NAME = "loss.png"
# The result (and, live, runs/<run_name>/).
METRICS_NAME = "metrics.jsonl"
SAMPLES_NAME = "samples.jsonl"
MANIFEST_NAME = ".lora_cli_result.json"  # which names the published result consists of, and when it was published
MERGED_DIR = "merged"
LIVE_DIR = "runs"
CHECKPOINT_PREFIX = "checkpoint-"
# Only in checkpoints: what an exact continuation needs besides the adapter and trainer_state.json.
OPTIMIZER_NAME = "optimizer.pt"
SCHEDULER_NAME = "scheduler.pt"
SCALER_NAME = "scaler.pt"
RNG_NAME = "rng_state.pth"
BEST_NAME = "best_adapter.safetensors"
# Only in a result that carries the resume state and whose adapter is the best evaluated one, not the last.
LAST_NAME = "last_adapter.safetensors"
CHECKPOINT_REQUIRED = (CONFIG_NAME, WEIGHTS_NAME, STATE_NAME, CONFIG_COPY_NAME, OPTIMIZER_NAME, SCHEDULER_NAME,
                       RNG_NAME)
CHECKPOINT_TENSOR_FILES = (WEIGHTS_NAME, BEST_NAME, OPTIMIZER_NAME, SCHEDULER_NAME, SCALER_NAME, RNG_NAME)
# What earlier versions wrote as the result (they wrote no manifest): replaced, never carried over.
KNOWN_RESULT_NAMES = (
    CONFIG_NAME, WEIGHTS_NAME, LEGACY_WEIGHTS_NAME, CONFIG_COPY_NAME, STATE_NAME, METRICS_NAME, PLOT_NAME,
    SAMPLES_NAME, MERGED_DIR, "tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt",
    "chat_template.*", "*.model",
)


def checkpoint_dir(out: Path, step: int) -> Path:
    return out / f"{CHECKPOINT_PREFIX}{step}"


def checkpoint_step(name: str) -> int | None:
    """The step of a `checkpoint-<step>` name; None for any other name."""
    suffix = name[len(CHECKPOINT_PREFIX):]
    return int(suffix) if name.startswith(CHECKPOINT_PREFIX) and suffix.isdigit() else None


def live_dir(out: Path, run_name: str) -> Path:
    """Where a running job appends its metrics.jsonl and samples.jsonl."""
    return out / LIVE_DIR / run_name


def default_logging_dir(output_dir: str | Path) -> Path:
    """train.logging_dir when unset: the trackers write beside the live logs."""
    return Path(output_dir) / LIVE_DIR
