"""Tokenizing in several processes (data.num_proc): chunks of rows go to a pool and come back in order.

Rendering a row (the chat template runs in Python, through jinja) costs more than the tokenizer's own Rust batch
encoding, so on a machine with spare cores more processes pay; docs/BENCHMARKS.md has the measurement.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
from collections import deque
from typing import Callable, Iterable, Iterator

IN_FLIGHT_PER_PROCESS = 2  # chunks queued per worker: enough to keep it busy, few enough to bound memory
AUTO = "auto"
# data.num_proc: auto. The first chunks are tokenized here: a small dataset is done before a spawned worker would have
# imported transformers (seconds each), so tests, quickstarts and --dry-run on small files start no pool at all.
AUTO_IN_PROCESS_CHUNKS = 8
# At most this many workers: each is an interpreter with its own tokenizer (a few hundred MB), and a free Colab has
# 2 cores and 12.7 GB. Measured on 2 cores: 2 processes tokenize 1.7x as fast as 1 (docs/BENCHMARKS.md, issue 18).
AUTO_MAX_PROCESSES = 4


def auto_processes() -> int:
    """The workers data.num_proc: auto starts: the cores this process may run on, at most AUTO_MAX_PROCESSES."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, AUTO_MAX_PROCESSES))

_tokenizer = None  # each worker's copy, set once when the pool starts


def map_in_order(function: Callable, items: Iterable, tokenizer, num_proc: int | str) -> Iterator:
    """function(item, tokenizer) for each item, in order. With num_proc > 1 in that many worker processes
    ("spawn": the parent may hold threads that fork would copy half-way), never more than
    IN_FLIGHT_PER_PROCESS * num_proc items queued, so the input is read no faster than it is used. num_proc "auto":
    the first AUTO_IN_PROCESS_CHUNKS items here, the rest, if any, in auto_processes() workers."""
    items = iter(items)
    if num_proc == AUTO:
        for item in itertools.islice(items, AUTO_IN_PROCESS_CHUNKS):
            yield function(item, tokenizer)
        following = next(items, None)
        if following is None:
            return
        items, num_proc = itertools.chain([following], items), auto_processes()
    if num_proc <= 1:
        for item in items:
            yield function(item, tokenizer)
        return
    context = multiprocessing.get_context("spawn")
    with context.Pool(num_proc, initializer=_keep_tokenizer, initargs=(tokenizer,)) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.apply_async(_call, (function, item)))
            if len(pending) >= IN_FLIGHT_PER_PROCESS * num_proc:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _keep_tokenizer(tokenizer) -> None:
    global _tokenizer
    _tokenizer = tokenizer


def _call(function: Callable, item):
    return function(item, _tokenizer)
