"""Where a run is (TrainState, written into every checkpoint) and what it produced (TrainResult)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class TrainState:
    """Where the run is. Written into every checkpoint as trainer_state.json."""

    global_step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    tokens_seen: int = 0
    skipped_steps: int = 0
    log_history: list[dict] = field(default_factory=list)


@dataclass
class TrainResult:
    output_dir: Path
    state: TrainState
    final_train_loss: float | None
    final_eval_loss: float | None
    merged_dir: Path | None = None


@dataclass
class Run:
    """Everything the loop works with, made once by setup (lora_cli.train) and finished there."""

    cfg: object  # Config
    accelerator: object
    precision: object  # models.PrecisionChoice
    tokenizer: object
    model: object  # the transformers model with LoRA layers: evaluated, packed-checked and saved
    loss_model: object  # CausalLMLoss(model) as prepared by Accelerate: what the step runs
    optimizer: object
    scheduler: object
    bundle: object  # data.DataBundle
    target_modules: object  # the resolved lora targets, as written to adapter_config.json
    out: Path
    total_steps: int
    sink: object  # metrics.MetricsSink
    quiet: bool
    state: TrainState = field(default_factory=TrainState)

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process
