"""Tokenize rendered rows with character offsets, label the trained tokens, end with a trained EOS, and build the
train/validation split: everything the training loop needs from the data, computed once per run.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import random
from dataclasses import dataclass

import numpy as np

from lora_cli.errors import UserError

from .examples import IGNORE_INDEX, DataBundle, DataStats, Example, RowError
from .formats import EMPTY_RESPONSE, NO_REPLY, _render, _Rendered, detect_format
from .parallel import map_in_order
from .sources import RowStream, iter_rows

TOKENIZE_CHUNK = 1000  # rows tokenized per call: fast, but the offsets of 50k long rows at once would use GBs


def tokenize_row(row: dict, fmt: str, tokenizer, max_length: int, train_on_inputs: bool) -> tuple[Example, bool]:
    """Tokenize one row: returns the example and whether it was truncated to max_length.

    An example with no trained token (num_trained == 0) is returned as is; build_datasets drops and counts those.
    """
    _check_tokenizer(tokenizer, fmt)
    return _tokenize_rendered([_render(row, fmt, tokenizer, train_on_inputs)], tokenizer, max_length)[0]


def _check_tokenizer(tokenizer, fmt: str) -> None:
    if tokenizer.eos_token_id is None:
        raise UserError(
            "The tokenizer has no eos_token, so examples cannot end with a trained end-of-sequence token and the "
            "model would never learn to stop. Use a tokenizer that defines eos_token."
        )
    if fmt == "chat" and not getattr(tokenizer, "chat_template", None):
        raise UserError(
            "The data is in chat format (messages/conversations) but the tokenizer has no chat template. Use the "
            "tokenizer of an instruct/chat model that has one, or convert the data to the text or alpaca format."
        )


def _tokenize_rendered(rendered: list[_Rendered], tokenizer, max_length: int) -> list[tuple[Example, bool]]:
    """Tokenize rendered rows in one batched call (the tokenizer runs them in parallel in Rust) and label them."""
    results: list[tuple[Example, bool] | None] = [None] * len(rendered)
    # Texts with and without special tokens need separate calls; in practice all rows of one build agree.
    for add_special in (True, False):
        indices = [i for i, r in enumerate(rendered) if r.add_special_tokens == add_special]
        if not indices:
            continue
        encoding = tokenizer(
            [rendered[i].text for i in indices], add_special_tokens=add_special, return_offsets_mapping=True,
            return_attention_mask=False,
        )
        if "offset_mapping" not in encoding:
            raise UserError(
                f"The tokenizer ({type(tokenizer).__name__}) does not report character offsets, which are needed "
                f"to mask prompts. Use a fast tokenizer (a model folder with tokenizer.json), e.g. load it with "
                f"AutoTokenizer's default backend."
            )
        for i, ids, offsets in zip(indices, encoding["input_ids"], encoding["offset_mapping"]):
            results[i] = _label_tokens(rendered[i], ids, offsets, tokenizer.eos_token_id, max_length)
    return results


def _label_tokens(r: _Rendered, ids: list[int], offsets: list, eos_id: int, max_length: int) -> tuple[Example, bool]:
    ids = list(ids)
    if r.untrainable:  # nothing but an EOS would be trained: leave the row untrained, to be dropped and counted
        return Example(ids[:max_length], [IGNORE_INDEX] * min(len(ids), max_length)), len(ids) > max_length
    if len(ids) > max_length:  # keep the start: the prompt, and as much of the response as fits. No EOS: cut off.
        ids = ids[:max_length]
        return Example(ids, _labels(ids, offsets[:max_length], r.trained_spans)), True
    labels = _labels(ids, offsets, r.trained_spans)
    _end_with_trained_eos(r, ids, labels, eos_id)
    if len(ids) > max_length:  # only the appended EOS did not fit
        return Example(ids[:max_length], labels[:max_length]), True
    return Example(ids, labels), False


def _labels(ids: list[int], offsets: list, spans: list[tuple[int, int]]) -> list[int]:
    """The token id where the token is trained, else -100. A token is trained iff it ends inside a trained span.

    "Ends inside" rather than "lies inside": a token that straddles the prompt/response boundary is needed to
    produce the response's first characters. Zero-width tokens (a BOS the tokenizer adds) are never trained.
    """
    ends = [end for _, end in offsets]
    if ends != sorted(ends):  # a zero-width special token in the middle: take the slow, per-token way
        return [
            token if _ends_in_a_span(begin, end, spans) else IGNORE_INDEX for token, (begin, end) in zip(ids, offsets)
        ]
    # Token ends run left to right, so each span's tokens are one slice, found by bisection: this runs in C.
    labels = [IGNORE_INDEX] * len(ids)
    for span_start, span_end in spans:
        first, stop = bisect.bisect_right(ends, span_start), bisect.bisect_right(ends, span_end)
        labels[first:stop] = ids[first:stop]
    return labels


def _ends_in_a_span(begin: int, end: int, spans: list[tuple[int, int]]) -> bool:
    return begin < end and any(span_start < end <= span_end for span_start, span_end in spans)


def _end_with_trained_eos(r: _Rendered, ids: list[int], labels: list[int], eos_id: int) -> None:
    """Make the example end with a trained EOS, or the fine-tuned model never learns to stop.

    Appends it unless the text already ends with it; always trains it, also when pad == eos (a collator that
    masks pad tokens by id would mask it). For chat, the template's end-of-turn token usually is the EOS,
    followed by a newline: then the EOS that closes the last assistant reply is the one that counts.
    """
    if r.is_chat:
        last_trained = max((i for i, label in enumerate(labels) if label != IGNORE_INDEX), default=-1)
        if last_trained < 0:  # no assistant reply: nothing to learn, leave it to be dropped
            return
        if ids[last_trained] == eos_id:
            return
        # The template's end-of-turn is not the EOS: train what follows the reply too, so the EOS is reachable.
        for i in range(last_trained + 1, len(ids)):
            labels[i] = ids[i]
    if not ids or ids[-1] != eos_id:
        ids.append(eos_id)
        labels.append(eos_id)
    labels[-1] = eos_id


# --------------------------------------------------------------------------------------------------------------
# Building the datasets


def build_datasets(
    path: str,
    tokenizer,
    *,
    split: str = "train",
    format: str = "auto",
    max_length: int = 1024,
    train_on_inputs: bool = False,
    val_size: float | int = 0,
    val_path: str | None = None,
    seed: int = 42,
) -> DataBundle:
    """Load, format, tokenize and split the training data in memory; everything the train loop needs, computed
    once. lora-train goes through data.cache.load_or_build, which streams the same examples to disk instead."""
    options = DataOptions(path, split, format, max_length, train_on_inputs, val_size, val_path, seed)
    return build_in_memory(options, tokenizer)


def build_in_memory(options: DataOptions, tokenizer) -> DataBundle:
    sink: list[Example] = []
    tokenized = tokenize_sources(options, tokenizer, sink.extend)
    val_indices = set(tokenized.val_indices)
    train = [e for i, e in enumerate(sink) if i not in val_indices]
    val = [e for i, e in enumerate(sink) if i in val_indices]
    stats = data_stats(tokenized, [len(e) for e in train], [e.num_trained for e in train], [len(e) for e in val])
    return DataBundle(train, val, stats)


@dataclass(frozen=True)
class DataOptions:
    """Everything build_datasets needs besides the tokenizer: the one translation of config.data (options_from)."""

    path: str
    split: str = "train"
    format: str = "auto"
    max_length: int = 1024
    train_on_inputs: bool = False
    val_size: float | int = 0
    val_path: str | None = None
    seed: int = 42
    num_proc: int = 1  # processes that render and tokenize (data.num_proc); the examples are the same for any


def options_from(cfg) -> DataOptions:
    """config.data (and train.seed, which draws the validation split) as the data pipeline's options."""
    d = cfg.data
    return DataOptions(d.path, d.split, d.format, d.max_length, d.train_on_inputs, d.val_size, d.val_path,
                       cfg.train.seed, d.num_proc)


@dataclass
class Tokenized:
    """What tokenize_sources learnt besides the examples it handed on: the split, the counts for the summary."""

    format: str
    max_length: int
    counts: _Counts
    num_examples: int  # examples handed on: the training source's, then the validation file's
    val_indices: list[int]  # sorted indices (into the examples handed on) of the validation examples


def tokenize_sources(options: DataOptions, tokenizer, sink) -> Tokenized:
    """Stream the rows of the data (and validation) file, tokenize them in batches and hand the kept examples to
    `sink` (a callable taking a list of Examples), in order; then draw the validation split. Bounded memory: only
    TOKENIZE_CHUNK rows are held at once. The settings are checked where the config is read (config.schema)."""
    rows = iter_rows(options.path, options.split)
    first = next(rows, None)
    rows = itertools.chain([first] if first else [], rows)
    fmt = detect_format([first[0]] if first else [], options.path) if options.format == "auto" else options.format
    _check_tokenizer(tokenizer, fmt)
    counts = _Counts()
    kept = 0
    for chunk in _tokenized_chunks(rows, fmt, tokenizer, options, counts):
        kept += len(chunk)
        sink(chunk)
    if not kept:
        raise UserError(_nothing_left_message(options.path, counts.rows, counts, fmt, options.max_length))
    if options.val_path:
        val_rows = iter_rows(options.val_path, "validation")
        num_val = 0
        for chunk in _tokenized_chunks(val_rows, fmt, tokenizer, options, counts):
            num_val += len(chunk)
            sink(chunk)
        val_indices = list(range(kept, kept + num_val))
    else:
        num_val, val_indices = 0, validation_indices(kept, options.val_size, options.seed, options.path)
    return Tokenized(fmt, options.max_length, counts, kept + num_val, val_indices)


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
    )


@dataclass
class _Counts:
    truncated: int = 0
    rows: int = 0  # rows read (train + val), before dropping
    no_reply: int = 0  # chat rows without an assistant turn
    empty: int = 0  # rows whose response is empty (chat: every assistant reply)
    cut_off: int = 0  # rows whose response lies wholly beyond max_length

    @property
    def dropped(self) -> int:
        return self.no_reply + self.empty + self.cut_off


def _nothing_left_message(path: str, num_rows: int, counts: _Counts, fmt: str, max_length: int) -> str:
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
    return (f"No training examples are left from '{path}': of its {num_rows} rows, {', '.join(reasons)}. "
            f"To train, {'; '.join(fixes)}.")


def _tokenized_chunks(rows: RowStream, fmt: str, tokenizer, options: DataOptions, counts: _Counts):
    """The kept examples of `rows`, TOKENIZE_CHUNK rows at a time (in options.num_proc processes); row_index counts
    the stream's rows from 0."""
    work = functools.partial(_tokenize_chunk, fmt=fmt, max_length=options.max_length,
                             train_on_inputs=options.train_on_inputs)
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


def _tokenize_chunk(chunk: list[tuple[dict, str]], tokenizer, fmt: str, max_length: int,
                    train_on_inputs: bool) -> list[tuple[Example, bool, str | None]]:
    """(example, truncated, why it has nothing to train) for each row of the chunk; runs in a worker process too."""
    rendered = [_render_located(row, where, fmt, tokenizer, train_on_inputs) for row, where in chunk]
    tokenized = _tokenize_rendered(rendered, tokenizer, max_length)
    return [(example, truncated, r.untrainable) for r, (example, truncated) in zip(rendered, tokenized)]


def _batched(items, size: int):
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def _render_located(row: dict, where: str, fmt, tokenizer, train_on_inputs) -> _Rendered:
    try:
        return _render(row, fmt, tokenizer, train_on_inputs)
    except RowError as e:
        raise UserError(f"Data {where} ({fmt} format): {e}. Fix that row, or remove it.") from None


def validation_indices(num_examples: int, val_size: float | int, seed: int, path: str) -> list[int]:
    """The sorted indices of a deterministic random validation subset: a fraction if val_size < 1, else a count."""
    if not val_size:
        return []
    count = max(1, round(num_examples * val_size)) if val_size < 1 else int(val_size)
    if count >= num_examples:
        raise UserError(
            f"val_size={val_size} asks for {count} validation examples but '{path}' has only {num_examples} "
            f"usable examples, leaving none for training. Use a smaller val_size, or a separate val_path."
        )
    return sorted(random.Random(seed).sample(range(num_examples), count))
