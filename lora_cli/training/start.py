"""Where the run starts from, once the model is loaded: its state (fresh, or restored from the checkpoint that
resume.plan_start chose), the trackers and the metrics sink, and last the RNG states. setup (lora_cli.train) builds
the Run whole from these and what it loaded."""

from __future__ import annotations

import contextlib
import uuid
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import Config
from . import trackers as trackers_lib
from .checkpoint import load_best_weights, load_rng_state, load_training_state
from .console import say_nothing
from .metrics import MetricsSink
from .resume import StartPlan, check_resumable_run, flat_config
from .rng import set_rng_state, untouched_rng
from .state import Say, TrainState
from .trackers import Trackers

if TYPE_CHECKING:
    from accelerate import Accelerator
    from torch.optim import Optimizer
    from torch.optim.lr_scheduler import LRScheduler
    from transformers import PreTrainedModel

    from ..data import DataBundle


def initial_state(cfg: Config, plan: StartPlan, model: PreTrainedModel, optimizer: Optimizer,
                  scheduler: LRScheduler, accelerator: Accelerator, bundle: DataBundle, total: int,
                  say: Say) -> tuple[TrainState, dict | None]:
    """A fresh state, or the checkpoint's with its tensors (weights, optimizer, schedule, scaler) restored; and the
    best weights train.load_best_at_end keeps."""
    world = accelerator.num_processes
    fingerprint = bundle.fingerprint  # the cache key: the files' contents, the tokenizer, the data settings
    checkpoint = plan.checkpoint
    if checkpoint is None:
        started = datetime.now().astimezone()
        return TrainState(total_steps=total, num_processes=world, run_id=uuid.uuid4().hex,
                          run_started=started.isoformat(timespec="seconds"),
                          run_name=cfg.train.run_name or started.strftime("run-%Y%m%d-%H%M%S"),
                          data_fingerprint=fingerprint), None
    check_resumable_run(checkpoint, total, world, fingerprint)
    state = load_training_state(checkpoint, model, optimizer, scheduler, accelerator)
    if state.total_steps != total:
        say(f"note: this run trains {total} steps in all, the checkpoint's run {state.total_steps}: the "
            f"learning-rate schedule (warmup and decay) is re-planned over {total} steps from step "
            f"{state.global_step} on, so the learning rate changes there.", markup=False)
    state.total_steps = total
    state.run_name = cfg.train.run_name or state.run_name  # a resumed run keeps its name unless given one
    if not cfg.train.load_best_at_end:
        return state, None
    if plan.best is not None:
        say(f"note: train.load_best_at_end was switched on: the best weights so far (step {state.best_step}) are read "
            f"from {plan.best.path}", markup=False)
    return state, load_best_weights(checkpoint, plan.best)


def start_logging(accelerator: Accelerator, cfg: Config, out: Path, state: TrainState, say: Say,
                  cleanup: contextlib.ExitStack) -> tuple[Trackers, MetricsSink]:
    """The trackers (ended by `cleanup` however the run ends) and the metrics sink, begun with the state's records."""
    with untouched_rng():  # a tracker's start-up must not draw from the generators training uses
        trackers = trackers_lib.start(accelerator, cfg, state, trackers_lib.hyperparameters(flat_config(cfg)))
    cleanup.callback(trackers.end)  # also on a failure or a second Ctrl-C
    sink = MetricsSink(out, state.run_name, writes=accelerator.is_main_process, show=say_nothing, tracker=trackers,
                       warn=lambda m: say(m, markup=False))
    sink.start(state.log_history, state.samples)
    return trackers, sink


def restore_rng(plan: StartPlan, accelerator: Accelerator) -> None:
    """A resumed run's RNG states: restored last, once nothing else in setup draws from the generators."""
    if plan.checkpoint is not None:
        set_rng_state(load_rng_state(plan.checkpoint.path, accelerator.process_index))
