"""Tokenizing in several processes (data.num_proc): chunks of rows go to a pool and come back in order.

Rendering a row (the chat template runs in Python, through jinja) costs more than the tokenizer's own Rust batch
encoding, so on a machine with spare cores more processes pay; docs/BENCHMARKS.md has the measurement.
"""

from __future__ import annotations

import multiprocessing
from collections import deque
from typing import Callable, Iterable, Iterator

IN_FLIGHT_PER_PROCESS = 2  # chunks queued per worker: enough to keep it busy, few enough to bound memory

_tokenizer = None  # each worker's copy, set once when the pool starts


def map_in_order(function: Callable, items: Iterable, tokenizer, num_proc: int) -> Iterator:
    """function(item, tokenizer) for each item, in order. With num_proc > 1 in that many worker processes
    ("spawn": the parent may hold threads that fork would copy half-way), never more than
    IN_FLIGHT_PER_PROCESS * num_proc items queued, so the input is read no faster than it is used."""
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
