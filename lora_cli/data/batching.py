"""Micro batches: padding collation, length-grouped batches, and sample packing (data.packing: true)."""

from __future__ import annotations

import bisect
import random

import torch

from .examples import IGNORE_INDEX, Example


def collate(examples: list[Example], pad_token_id: int, pad_to_multiple_of: int = 1) -> dict[str, torch.Tensor]:
    """Right-pad a batch to its longest example (not max_length: less compute for short batches), rounded up to a
    multiple of `pad_to_multiple_of`.

    Padding is masked out of attention and labels by position, never by id, so an EOS equal to pad stays trained.
    """
    longest = -(-max(len(e) for e in examples) // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(examples), longest), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), longest), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), longest), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example)
        input_ids[row, :n] = torch.tensor(example.input_ids, dtype=torch.long)
        labels[row, :n] = torch.tensor(example.labels, dtype=torch.long)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def lengths_of(examples) -> list[int]:
    """The examples' lengths: from the cache's lengths array when it has one (no example is read), else counted."""
    lengths = getattr(examples, "lengths", None)
    return lengths.tolist() if lengths is not None else [len(e) for e in examples]


def length_grouped_batches(lengths: list[int], batch_size: int, seed: int, epoch: int = 0) -> list[list[int]]:
    """Batches of indices whose examples have similar lengths, so little compute is spent on padding.

    As HF's LengthGroupedSampler: shuffle, sort by length within mega-batches of 50 batches (random enough
    that batches differ every epoch), cut into batches, shuffle the batch order. The batch holding the longest
    example goes first, so a batch size too large for memory fails at step 1, not hours in.
    Deterministic for (seed, epoch).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rng = random.Random(f"{seed}:{epoch}")
    order = list(range(len(lengths)))
    rng.shuffle(order)
    mega_size = 50 * batch_size
    batches = []
    for mega_start in range(0, len(order), mega_size):
        mega = sorted(order[mega_start : mega_start + mega_size], key=lambda i: lengths[i], reverse=True)
        batches.extend(mega[i : i + batch_size] for i in range(0, len(mega), batch_size))
    rng.shuffle(batches)
    if batches:
        longest = max(range(len(batches)), key=lambda b: max(lengths[i] for i in batches[b]))
        batches.insert(0, batches.pop(longest))
    return batches


# --------------------------------------------------------------------------------------------------------------
# Packing (data.packing: true)
#
# Several examples share one row of up to max_length tokens. Each keeps its own position ids (0, 1, 2, ... from its
# first token) and there is no attention_mask: transformers 5 then finds the example boundaries from the position
# ids and attends block-diagonally, and while training lora_cli.packing runs attention per example; either way no
# example sees another and every example's loss is exactly its unpacked loss. The first label of every example is
# masked, so the last token of one example never learns to predict the next example's first token.

PACK_WINDOW = 2000  # examples packed together: enough for ~99% full rows, few enough that epochs differ


def pack_rows(lengths: list[int], max_length: int, seed: int, epoch: int = 0) -> list[list[int]]:
    """Example indices grouped into rows of at most `max_length` tokens, deterministic for (seed, epoch).

    Best-fit decreasing within shuffled windows of PACK_WINDOW examples: each example, longest first, goes into
    the open row with the least room that still fits it (a sorted list of free space, found by bisection).
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    rng = random.Random(f"pack:{seed}:{epoch}")
    order = list(range(len(lengths)))
    rng.shuffle(order)
    rows: list[list[int]] = []
    for start in range(0, len(order), PACK_WINDOW):
        window = sorted(order[start : start + PACK_WINDOW], key=lambda i: lengths[i], reverse=True)
        free: list[tuple[int, int]] = []  # (free tokens, row number), sorted
        window_rows: list[list[int]] = []
        for i in window:
            need = min(lengths[i], max_length)
            slot = bisect.bisect_left(free, (need, -1))
            if slot < len(free):
                room, row = free.pop(slot)
            else:
                room, row = max_length, len(window_rows)
                window_rows.append([])
            window_rows[row].append(i)
            if room - need > 0:
                bisect.insort(free, (room - need, row))
        rows.extend(window_rows)
    rng.shuffle(rows)
    return rows


def packed_batches(
    lengths: list[int], max_length: int, rows_per_batch: int, seed: int, epoch: int = 0
) -> list[list[list[int]]]:
    """Micro batches of `rows_per_batch` packed rows; each row is the list of example indices it holds."""
    if rows_per_batch < 1:
        raise ValueError(f"rows_per_batch must be >= 1, got {rows_per_batch}")
    rows = pack_rows(lengths, max_length, seed, epoch)
    return [rows[i : i + rows_per_batch] for i in range(0, len(rows), rows_per_batch)]


def collate_packed(rows: list[list[Example]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Concatenate each row's examples, with per-example position ids and no attention_mask (see above).

    Rows are right-padded to the longest row; the padding gets position ids 0, 1, ... of its own, so it forms one
    more (untrained) sequence that no example attends to.
    """
    longest = max(sum(len(e) for e in row) for row in rows)
    input_ids = torch.full((len(rows), longest), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.empty((len(rows), longest), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for example in row:
            n = len(example)
            input_ids[r, at : at + n] = torch.tensor(example.input_ids, dtype=torch.long)
            labels[r, at + 1 : at + n] = torch.tensor(example.labels[1:], dtype=torch.long)
            position_ids[r, at : at + n] = torch.arange(n)
            at += n
        position_ids[r, at:] = torch.arange(longest - at)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
