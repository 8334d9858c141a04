"""Building the datasets: every source of data.path streamed row by row, rendered and tokenized in chunks (in
data.num_proc processes), its kept examples handed to a sink (a list in memory, or the cache's writer), then the
train/validation split and the data summary. Memory holds one chunk of rows at a time, whatever the data's size.
"""

from __future__ import annotations

import functools
import itertools
import random
from dataclasses import dataclass, field

import numpy as np

from lora_cli.errors import UserError

from .examples import DataBundle, DataStats, Example, RowError
from .formats import EMPTY_RESPONSE, NO_REPLY, _render, _Rendered, detect_format
from .mixing import Source, SourceStats, as_sources, chosen_rows
from .parallel import map_in_order
from .sources import RowStream, iter_rows
from .tokenize import _check_tokenizer, _tokenize_rendered

TOKENIZE_CHUNK = 1000  # rows tokenized per call: fast, but the offsets of 50k long rows at once would use GBs


@dataclass(frozen=True)
class DataOptions:
    """Everything the data pipeline needs besides the tokenizer (from_config.options_from translates the config).
    The settings are checked where the config is read (config.schema), once."""

    sources: tuple[Source, ...]
    format: str = "auto"  # of val_path's rows (each source has its own)
    max_length: int = 1024
    train_on_inputs: bool = False
    val_size: float | int = 0
    val_path: str | None = None
    seed: int = 42
    system_prompt: str | None = None
    # processes that render and tokenize (data.num_proc: a count or "auto"); the examples are the same for any
    num_proc: int | str = 1


def build_datasets(
    path: str | list[Source],
    tokenizer,
    *,
    split: str = "train",
    format: str = "auto",
    max_length: int = 1024,
    train_on_inputs: bool = False,
    val_size: float | int = 0,
    val_path: str | None = None,
    seed: int = 42,
    system_prompt: str | None = None,
) -> DataBundle:
    """Load, format, tokenize and split the training data in memory; everything the train loop needs.

    `path`: one path, read with `format` and `split`, or several `Source`s, each read with its own format and
    mixed into one set (validation is drawn from the mixed set). lora-train goes through data.cache.load_data,
    which streams the same examples to disk instead."""
    options = DataOptions(tuple(as_sources(path, format, split)), format, max_length, train_on_inputs, val_size,
                          val_path, seed, system_prompt)
    return build_in_memory(options, tokenizer)


def build_in_memory(options: DataOptions, tokenizer) -> DataBundle:
    sink: list[Example] = []
    tokenized = tokenize_sources(options, tokenizer, sink.extend)
    val_indices = set(tokenized.val_indices)
    train = [e for i, e in enumerate(sink) if i not in val_indices]
    val = [e for i, e in enumerate(sink) if i in val_indices]
    stats = data_stats(tokenized, [len(e) for e in train], [e.num_trained for e in train], [len(e) for e in val])
    return DataBundle(train, val, stats)


@dataclass
class Tokenized:
    """What tokenize_sources learnt besides the examples it handed on: the split, the counts for the summary."""

    format: str
    max_length: int
    counts: _Counts
    num_examples: int  # examples handed on: every source's in order, then the validation file's
    val_indices: list[int]  # sorted indices (into the examples handed on) of the validation examples
    sources: list[SourceStats] = field(default_factory=list)


def tokenize_sources(options: DataOptions, tokenizer, sink) -> Tokenized:
    """Stream the rows of every source (and of the validation file), tokenize them in chunks and hand the kept
    examples to `sink` (a callable taking a list of Examples), in order; then draw the validation split."""
    counts, per_source = _Counts(), []
    several = len(options.sources) > 1
    for index, source in enumerate(options.sources):
        per_source.append(_stream_source(source, index, options, tokenizer, counts, sink, several))
    kept = sum(s.examples for s in per_source)
    fmt = "+".join(dict.fromkeys(s.format for s in per_source))
    if not kept:
        where = f"'{options.sources[0].path}'"  # (with several sources, each one's examples were checked)
        raise UserError(_nothing_left_message(where, counts.rows, counts, fmt, options.max_length))
    num_val = 0
    if options.val_path:
        rows, first = _peeked(iter_rows(options.val_path, "validation"))
        val_fmt = options.format if options.format != "auto" else detect_format([first], options.val_path)
        _check_tokenizer(tokenizer, val_fmt)
        for chunk in _tokenized_chunks(rows, val_fmt, tokenizer, options, counts):
            num_val += len(chunk)
            sink(chunk)
        val_indices = list(range(kept, kept + num_val))
    else:
        val_indices = validation_indices(kept, options.val_size, options.seed, _name(options.sources))
    return Tokenized(fmt, options.max_length, counts, kept + num_val, val_indices, per_source)


def _stream_source(source: Source, index: int, options: DataOptions, tokenizer, counts: _Counts, sink,
                   several: bool) -> SourceStats:
    """One source's kept examples into `sink`, read with its own format; `several`: errors name the source."""
    available = None
    rows = iter_rows(source.path, source.split)
    if source.take is not None:  # which rows `take` keeps depends on how many there are: count them first
        available = sum(1 for _ in rows)
        wanted = chosen_rows(available, source, options.seed, index)
        rows = iter_rows(source.path, source.split)
        if wanted is not None:
            rows = (item for number, item in enumerate(rows) if number in wanted)
    rows, first = _peeked(rows)
    fmt = detect_format([first], source.path) if source.format == "auto" else source.format
    _check_tokenizer(tokenizer, fmt)
    own, examples, tokens, trained = _Counts(), 0, 0, 0
    try:
        for chunk in _tokenized_chunks(rows, fmt, tokenizer, options, own):
            examples += len(chunk)
            tokens += sum(len(e) for e in chunk)
            trained += sum(e.num_trained for e in chunk)
            sink(chunk)
    except UserError as err:
        raise UserError(f"data.path[{index}]: {err}" if several else str(err)) from None
    if not examples and several:  # one source with nothing to train is surely a mistake, even if others have
        raise UserError(_nothing_left_message(f"data.path[{index}] '{source.path}'", own.rows, own, fmt,
                                              options.max_length))
    counts.add(own)
    return SourceStats(source.path, fmt, own.rows, own.rows if available is None else available, examples, tokens,
                       trained)


def _peeked(rows: RowStream) -> tuple[RowStream, dict]:
    """The stream with its first row read (the format is detected from it); an empty source was refused by
    iter_rows already."""
    first = next(rows)
    return itertools.chain([first], rows), first[0]


def data_stats(tokenized: Tokenized, train_lengths, train_trained, val_lengths) -> DataStats:
    """The data summary from per-example arrays (lists, or numpy arrays of the cache) of the split."""
    c = tokenized.counts
    return DataStats(
        format=tokenized.format,
        num_train=len(train_lengths),
        num_val=len(val_lengths),
        train_tokens=int(np.sum(train_lengths, dtype=np.int64)),
        trained_tokens=int(np.sum(train_trained, dtype=np.int64)),
        num_truncated=c.truncated,
        num_dropped=c.dropped,
        num_without_response=c.no_reply + c.empty,
        val_tokens=int(np.sum(val_lengths, dtype=np.int64)),
        max_example_length=int(np.max(train_lengths)),
        num_rows=c.rows,
        max_length=tokenized.max_length,
        sources=tokenized.sources,
    )


def _name(sources) -> str:
    return f"'{sources[0].path}'" if len(sources) == 1 else f"the {len(sources)} sources of data.path"


@dataclass
class _Counts:
    truncated: int = 0
    rows: int = 0  # rows read (after take; train + val), before dropping
    no_reply: int = 0  # chat rows without an assistant turn
    empty: int = 0  # rows whose response is empty (chat: every assistant reply)
    cut_off: int = 0  # rows whose response lies wholly beyond max_length

    @property
    def dropped(self) -> int:
        return self.no_reply + self.empty + self.cut_off

    def add(self, other: _Counts) -> None:
        for name in ("truncated", "rows", "no_reply", "empty", "cut_off"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


def _nothing_left_message(where: str, num_rows: int, counts: _Counts, fmt: str, max_length: int) -> str:
    empty = {"text": "are empty", "alpaca": "have an empty output"}.get(fmt, "have only empty assistant replies")
    reasons, fixes = [], []
    if counts.no_reply:
        reasons.append(f"{counts.no_reply} have no assistant reply to train on")
        fixes.append("give each conversation at least one assistant message (role \"assistant\", or \"gpt\" in "
                     "ShareGPT conversations) after the prompt")
    if counts.empty:
        reasons.append(f"{counts.empty} {empty}")
        fixes.append("fill in the texts" if fmt == "text" else "fill in the responses")
    if counts.cut_off:
        reasons.append(f"{counts.cut_off} have a prompt that fills data.max_length={max_length}, leaving no "
                       "response token")
        fixes.append("increase data.max_length or shorten the prompts")
    return (f"No training examples are left from {where}: of its {num_rows} rows, {', '.join(reasons)}. "
            f"To train, {'; '.join(fixes)}.")


def _tokenized_chunks(rows: RowStream, fmt: str, tokenizer, options: DataOptions, counts: _Counts):
    """The kept examples of `rows`, TOKENIZE_CHUNK rows at a time (in options.num_proc processes); row_index counts
    the stream's rows from 0."""
    work = functools.partial(_tokenize_chunk, fmt=fmt, max_length=options.max_length,
                             train_on_inputs=options.train_on_inputs, system_prompt=options.system_prompt)
    row_index = 0
    for results in map_in_order(work, _batched(rows, TOKENIZE_CHUNK), tokenizer, options.num_proc):
        kept = []
        for example, truncated, untrainable in results:
            example.row_index = row_index
            row_index += 1
            counts.truncated += truncated
            if untrainable == NO_REPLY:
                counts.no_reply += 1
            elif untrainable == EMPTY_RESPONSE:
                counts.empty += 1
            elif example.num_trained == 0:  # the prompt alone fills max_length
                counts.cut_off += 1
            else:
                kept.append(example)
        counts.rows += len(results)
        yield kept


def _tokenize_chunk(chunk: list[tuple[dict, str]], tokenizer, fmt: str, max_length: int, train_on_inputs: bool,
                    system_prompt: str | None) -> list[tuple[Example, bool, str | None]]:
    """(example, truncated, why it has nothing to train) for each row of the chunk; runs in a worker process too."""
    rendered = [_render_located(row, where, fmt, tokenizer, train_on_inputs, system_prompt) for row, where in chunk]
    tokenized = _tokenize_rendered(rendered, tokenizer, max_length)
    return [(example, truncated, r.untrainable) for r, (example, truncated) in zip(rendered, tokenized)]


def _batched(items, size: int):
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def _render_located(row: dict, where: str, fmt, tokenizer, train_on_inputs, system_prompt) -> _Rendered:
    try:
        return _render(row, fmt, tokenizer, train_on_inputs, system_prompt)
    except RowError as e:
        raise UserError(f"Data {where} ({fmt} format): {e}. Fix that row, or remove it.") from None


def validation_indices(num_examples: int, val_size: float | int, seed: int, name: str) -> list[int]:
    """The sorted indices of a deterministic random validation subset: a fraction if val_size < 1, else a count."""
    if not val_size:
        return []
    count = max(1, round(num_examples * val_size)) if val_size < 1 else int(val_size)
    if count >= num_examples:
        raise UserError(
            f"val_size={val_size} asks for {count} validation examples but {name} has only {num_examples} "
            f"usable examples, leaving none for training. Use a smaller val_size, or a separate val_path."
        )
    return sorted(random.Random(seed).sample(range(num_examples), count))
