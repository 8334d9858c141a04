"""The run's objects: what setup fixes (Run, frozen), what the loop changes (LoopState: where the run is, TrainState,
written into every checkpoint, and bookkeeping no file holds), and what the run produced (TrainResult)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:  # types only: importing these here would load torch, transformers and accelerate for every command
    import torch
    from accelerate import Accelerator
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from ..config import Config
    from ..data import DataBundle
    from ..precision import PrecisionChoice
    from .fsdp import Sharding
    from .metrics import MetricsSink
    from .samples import NoPrompts, Prompts
    from .trackers import Trackers

Say = Callable[..., None]  # (message, markup=True) -> None: prints on the main process, nothing elsewhere


@dataclass
class TrainState:
    """Where the run is: written into every checkpoint (and the final adapter folder) as trainer_state.json.

    Everything here is what an exact continuation needs besides the tensors (LoRA weights, optimizer, schedule,
    loss scaler, RNG): the data position, the running sums of the current logging window, the early-stopping
    bookkeeping and the history of every logged record.
    """

    global_step: int = 0  # optimizer updates applied (steps the fp16 scaler skipped are not counted)
    epoch: int = 0
    batch_in_epoch: int = 0  # micro batches of this epoch consumed, over all processes
    tokens_seen: int = 0
    skipped_steps: int = 0  # windows whose update was skipped: non-finite loss, or fp16 overflow
    consecutive_skipped: int = 0
    total_steps: int = 0
    num_processes: int = 1
    run_id: str = ""  # the same across resumes of one run; checkpoints of other runs are never mixed in
    run_started: str = ""  # when the run (its first part) started, ISO 8601
    run_name: str = ""
    data_fingerprint: str = ""  # of the tokenized training examples: a resumed run must see the same data
    window_loss: float = 0.0  # sum of (loss x trained tokens) since the last logged record
    window_tokens: int = 0
    best_eval_loss: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    stopped_early: bool = False
    log_history: list[dict] = field(default_factory=list)
    samples: list[dict] = field(default_factory=list)  # sample answers to train.eval_prompts: step, prompt, answer
    samples_step: int | None = None  # the step last answered at, on every process (only the main one has `samples`)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainState":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class TrainResult:
    """What lora_cli.train returns: the published adapter folder and the run's final state."""

    output_dir: Path
    state: TrainState
    final_train_loss: float | None
    final_eval_loss: float | None
    merged_dir: Path | None = None

    @classmethod
    def from_saved_state(cls, output_dir: Path, state: dict, merged_dir: Path | None = None) -> "TrainResult":
        """The result of a run that finished earlier, from the trainer_state.json it published in output_dir (its
        final_train_loss is then the last logged loss, a mean over logging_steps, not the last step's own)."""
        saved = TrainState.from_dict(state)
        history = saved.log_history
        train_loss = next((r["loss"] for r in reversed(history) if r.get("loss") is not None), None)
        eval_loss = next((r["eval_loss"] for r in reversed(history) if r.get("eval_loss") is not None), None)
        return cls(output_dir, saved, train_loss, eval_loss, merged_dir)

    @property
    def adapter_dir(self) -> Path:
        """The adapter folder (PEFT format): lora-merge's and lora-generate --adapter's input."""
        return self.output_dir

    @property
    def metrics(self) -> list[dict]:
        """Every logged record, as in metrics.jsonl: {"step", "loss", "learning_rate", ...}, {"eval_loss", ...}."""
        return self.state.log_history

    @property
    def samples(self) -> list[dict]:
        """The answers to train.eval_prompts: {"step", "prompt", "answer"}, as in samples.jsonl."""
        return self.state.samples

    @property
    def global_step(self) -> int:
        return self.state.global_step

    @property
    def best_step(self) -> int | None:
        """The step of the lowest validation loss (None without validation data)."""
        return self.state.best_step

    @property
    def best_eval_loss(self) -> float | None:
        return self.state.best_eval_loss


@dataclass
class LoopState:
    """What the loop changes: where the run is (`state`, written into every checkpoint) and bookkeeping no file holds
    as such. Setup makes it (a fresh state, or the checkpoint's); fit, the evaluations, the checkpoints and the end
    of the run change it; nothing else does."""

    state: TrainState
    best_weights: dict | None = None  # LoRA tensors of the best evaluation (train.load_best_at_end)
    last_save: float = 0.0  # time.monotonic() of the last checkpoint, for train.save_minutes
    last_checkpoint_step: int | None = None  # a stop right after this step's checkpoint need not write it again
    samples_seconds: float = 0.0  # time spent answering train.eval_prompts in this part, for the closing summary


# eq=False: two Runs are the same run only when they are the same object (comparing models would be absurd).
@dataclass(frozen=True, eq=False)
class Run:
    """What setup (lora_cli.train) fixes for the whole run, built whole before the first step and never changed.

    fit's inputs by name: the model and its optimizer and schedule, the data (bundle.train, bundle.val), the
    arguments (cfg, total_steps), and the callback every record goes through (sink, with the trackers behind it).
    What the loop changes is the LoopState beside it. (The objects held change as they are used: the model's
    weights, the optimizer's moments, the sink's files; the Run's fields do not.)
    """

    cfg: Config
    accelerator: Accelerator
    precision: PrecisionChoice
    tokenizer: PreTrainedTokenizerBase
    model: PreTrainedModel  # the transformers model with LoRA layers: evaluated, packed-checked and saved
    loss_model: torch.nn.Module  # CausalLMLoss(model) as prepared by Accelerate: what the step runs
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    bundle: DataBundle
    target_modules: list[str]  # the resolved lora targets, as written to adapter_config.json
    out: Path
    total_steps: int
    start_step: int  # where this part of the run began (a resumed run: the checkpoint's step)
    started: float  # time.perf_counter() when setup began, for the closing summary
    quiet: bool
    say: Say
    sink: MetricsSink  # records and sample answers -> console, live files, trackers
    trackers: Trackers  # none started (an empty Trackers) unless train.report_to names some, on the main process
    prompts: Prompts | NoPrompts  # train.eval_prompts, read before the model loaded; NoPrompts for none
    # training.fsdp.Sharding: how whole tensors are read from and written to the model (FSDP shards them)
    sharding: Sharding = field(default_factory=lambda: _no_sharding())

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    def release(self) -> None:
        """Drop the model, its loss module, the optimizer and the schedule once the run is over, so their (GPU)
        memory can be freed even while something still holds the Run (a traceback). The one place a Run's fields
        change: the run is over."""
        for name in ("model", "loss_model", "optimizer", "scheduler"):
            object.__setattr__(self, name, None)


def _no_sharding() -> Sharding:
    from .fsdp import Sharding  # loads torch, so only once a Run is made

    return Sharding()
