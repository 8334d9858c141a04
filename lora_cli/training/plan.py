"""The batch plan: which examples form each micro batch of an epoch, and how many optimizer steps the run takes.

The plan is a pure function of (data, config, epoch), so any process, and a resumed run, computes the same one.
"""

from __future__ import annotations

import math

from .. import data as data_lib
from ..config import Config
from ..losses import loss_positions
from ..packing import PackedLayout


def make_batches(examples, cfg: Config, epoch: int) -> list[list[list[int]]]:
    """The epoch's micro batches: each a list of rows, each row the indices of the examples it holds.

    Without packing every row holds one example and batches group similar lengths; with data.packing, rows are
    filled with several examples up to data.max_length tokens and a micro batch is micro_batch_size such rows.
    """
    lengths = data_lib.lengths_of(examples)
    t = cfg.train
    if cfg.data.packing:
        return data_lib.packed_batches(lengths, cfg.data.max_length, t.micro_batch_size, seed=t.seed, epoch=epoch)
    return [[[i] for i in b] for b in data_lib.length_grouped_batches(lengths, t.micro_batch_size, t.seed, epoch)]


# Called with (rows of examples, batch) for every training micro batch collated: what a benchmark counts (the
# tokens and examples of each step) without changing the loop.
COLLATE_OBSERVERS: list = []


def collate(examples, plan: list[list[int]], pad_id: int, packing: bool, pad_multiple: int = 1) -> dict:
    """A training micro batch: the data's collation, plus what the step would otherwise have to read back from the
    device, computed here on the CPU: the trained positions and their targets (losses.loss_positions) and, for
    every row, where each example starts and stops (packing.PackedLayout)."""
    rows = [[examples[i] for i in row] for row in plan]
    if packing:
        batch = data_lib.collate_packed(rows, pad_id)
    else:
        batch = data_lib.collate([row[0] for row in rows], pad_id, pad_multiple)
    width = batch["input_ids"].shape[1]
    batch["packed_layout"] = PackedLayout.from_lengths([[len(e) for e in row] for row in rows], width)
    batch.update(loss_positions(batch["labels"]))
    for observer in COLLATE_OBSERVERS:
        observer(rows, batch)
    return batch


def dropout_seed(seed: int, epoch: int, batch_index: int) -> int:
    """The seed LoRA dropout draws one micro batch's masks from: a function of the micro batch (the run's seed, the
    epoch, its place in the epoch), not of the process that trains it, so N processes draw the masks one process
    draws with N times the gradient accumulation (and a resumed run the masks of the uninterrupted one)."""
    return ((seed * 1_000_003 + epoch) * 1_000_003 + batch_index) % 2**63


def total_steps(cfg: Config, batches_per_epoch: int, num_processes: int = 1) -> int:
    if cfg.train.max_steps is not None:
        return cfg.train.max_steps
    steps_per_epoch = math.ceil(batches_per_epoch / (cfg.train.gradient_accumulation_steps * num_processes))
    return max(1, math.ceil(steps_per_epoch * cfg.train.epochs))
