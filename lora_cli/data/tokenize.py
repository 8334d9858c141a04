"""Tokenize rendered rows with character offsets, label the trained tokens, end with a trained EOS, and build the
train/validation split: everything the training loop needs from the data, computed once per run.
"""

from __future__ import annotations

import bisect
import random
from dataclasses import dataclass

from lora_cli.errors import UserError

from .examples import IGNORE_INDEX, DataBundle, DataStats, Example, RowError
from .formats import EMPTY_RESPONSE, FORMATS, NO_REPLY, _render, _Rendered, detect_format
from .mixing import Source, SourceStats, as_sources, take_rows
from .sources import _load, _LoadedRows

TOKENIZE_CHUNK = 1000  # rows tokenized per call: fast, but the offsets of 50k long rows at once would use GBs


def tokenize_row(row: dict, fmt: str, tokenizer, max_length: int, train_on_inputs: bool,
                 system_prompt: str | None = None) -> tuple[Example, bool]:
    """Tokenize one row: returns the example and whether it was truncated to max_length.

    An example with no trained token (num_trained == 0) is returned as is; build_datasets drops and counts those.
    """
    _check_tokenizer(tokenizer, fmt)
    rendered = _render(row, fmt, tokenizer, train_on_inputs, system_prompt)
    return _tokenize_rendered([rendered], tokenizer, max_length)[0]


def _check_tokenizer(tokenizer, fmt: str) -> None:
    if tokenizer.eos_token_id is None:
        raise UserError(
            "The tokenizer has no eos_token, so examples cannot end with a trained end-of-sequence token and the "
            "model would never learn to stop. Use a tokenizer that defines eos_token."
        )
    if fmt == "chat" and not getattr(tokenizer, "chat_template", None):
        raise UserError(
            "The data is in chat format (messages/conversations) but the tokenizer has no chat template (a base "
            "model). Set data.chat_template to chatml or llama3 (or a Jinja template), use the tokenizer of an "
            "instruct/chat model, or convert the data to the text or alpaca format."
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
    """Load, format, tokenize and split the training data; everything the train loop needs, computed once.

    `path`: one path, read with `format` and `split`, or several `Source`s, each read with its own format and
    mixed into one set (validation is drawn from the mixed set)."""
    if format != "auto" and format not in FORMATS:
        raise UserError(f"Unknown data format '{format}'. Use one of: auto, {', '.join(FORMATS)}.")
    if max_length < 2:
        raise UserError(f"max_length is {max_length}; it must be at least 2 tokens (typically 512-4096).")
    if val_path and val_size:
        raise UserError(
            f"Both val_path ('{val_path}') and val_size ({val_size}) are set. Set only one: val_path to use a "
            f"separate validation file, or val_size to split one off the training data."
        )
    sources = as_sources(path, format, split)
    options = _Options(tokenizer, max_length, train_on_inputs, system_prompt)
    counts = _Counts()
    examples, per_source, num_rows = [], [], 0
    for index, source in enumerate(sources):
        got, stats = _build_source(source, index, seed, options, counts, several=len(sources) > 1)
        examples += got
        per_source.append(stats)
        num_rows += stats.rows
    fmt = "+".join(dict.fromkeys(s.format for s in per_source))
    if not examples:
        where = f"'{sources[0].path}'"  # (with several sources, each one's examples were checked above)
        raise UserError(_nothing_left_message(where, num_rows, counts, fmt, max_length))
    if val_path:
        val_loaded = _load(val_path, split="validation")
        val_fmt = format if format != "auto" else detect_format(val_loaded.rows, val_path)
        val = _tokenize_all(val_loaded, val_fmt, options, counts)
        train = examples
        num_rows += len(val_loaded.rows)
    else:
        train, val = _split_off_validation(examples, val_size, seed, _name(sources))
    stats = DataStats(
        format=fmt,
        num_train=len(train),
        num_val=len(val),
        train_tokens=sum(len(e) for e in train),
        trained_tokens=sum(e.num_trained for e in train),
        num_truncated=counts.truncated,
        num_dropped=counts.dropped,
        num_without_response=counts.no_reply + counts.empty,
        val_tokens=sum(len(e) for e in val),
        max_example_length=max(len(e) for e in train),
        num_rows=num_rows,
        max_length=max_length,
        sources=per_source,
    )
    return DataBundle(train, val, stats)


@dataclass
class _Options:
    """How every row is rendered and tokenized, whatever its source."""

    tokenizer: object
    max_length: int
    train_on_inputs: bool
    system_prompt: str | None


def _build_source(source: Source, index: int, seed: int, options: _Options, counts: _Counts,
                  several: bool) -> tuple[list[Example], SourceStats]:
    """One source's examples, read with its own format; `several`: row errors name the source."""
    loaded = _load(source.path, source.split)
    available = len(loaded.rows)
    loaded = take_rows(loaded, source, seed, index)
    fmt = detect_format(loaded.rows, source.path) if source.format == "auto" else source.format
    _check_tokenizer(options.tokenizer, fmt)
    own = _Counts()
    try:
        examples = _tokenize_all(loaded, fmt, options, own)
    except UserError as err:
        raise UserError(f"data.path[{index}]: {err}" if several else str(err)) from None
    if not examples and several:  # one source with nothing to train is surely a mistake, even if others have
        raise UserError(_nothing_left_message(f"data.path[{index}] '{source.path}'", len(loaded.rows), own, fmt,
                                              options.max_length))
    counts.add(own)
    stats = SourceStats(source.path, fmt, len(loaded.rows), available, len(examples),
                        sum(len(e) for e in examples), sum(e.num_trained for e in examples))
    return examples, stats


def _name(sources: list[Source]) -> str:
    return f"'{sources[0].path}'" if len(sources) == 1 else f"the {len(sources)} sources of data.path"


@dataclass
class _Counts:
    truncated: int = 0
    no_reply: int = 0  # chat rows without an assistant turn
    empty: int = 0  # rows whose response is empty (chat: every assistant reply)
    cut_off: int = 0  # rows whose response lies wholly beyond max_length

    @property
    def dropped(self) -> int:
        return self.no_reply + self.empty + self.cut_off

    def add(self, other: _Counts) -> None:
        for name in ("truncated", "no_reply", "empty", "cut_off"):
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


def _tokenize_all(loaded: _LoadedRows, fmt: str, options: _Options, counts: _Counts) -> list[Example]:
    tokenizer, max_length = options.tokenizer, options.max_length
    examples = []
    for chunk_start in range(0, len(loaded.rows), TOKENIZE_CHUNK):
        chunk = range(chunk_start, min(chunk_start + TOKENIZE_CHUNK, len(loaded.rows)))
        rendered = [_render_located(loaded, i, fmt, options) for i in chunk]
        for row_index, (example, truncated) in zip(chunk, _tokenize_rendered(rendered, tokenizer, max_length)):
            example.row_index = row_index
            counts.truncated += truncated
            reason = rendered[row_index - chunk_start].untrainable
            if reason == NO_REPLY:
                counts.no_reply += 1
            elif reason == EMPTY_RESPONSE:
                counts.empty += 1
            elif example.num_trained == 0:  # the prompt alone fills max_length
                counts.cut_off += 1
            else:
                examples.append(example)
    return examples


def _render_located(loaded: _LoadedRows, i: int, fmt: str, options: _Options) -> _Rendered:
    try:
        return _render(loaded.rows[i], fmt, options.tokenizer, options.train_on_inputs, options.system_prompt)
    except RowError as e:
        raise UserError(f"Data {loaded.locations[i]} ({fmt} format): {e}. Fix that row, or remove it.") from None


def _split_off_validation(
    examples: list[Example], val_size: float | int, seed: int, path: str
) -> tuple[list[Example], list[Example]]:
    """Split a deterministic random subset off for validation: a fraction if val_size < 1, else a count."""
    if not val_size:
        return examples, []
    if val_size < 0 or (val_size >= 1 and val_size != int(val_size)):
        raise UserError(
            f"val_size is {val_size}; use a fraction between 0 and 1 (e.g. 0.05), a whole number of examples, "
            f"or 0 for no validation."
        )
    count = max(1, round(len(examples) * val_size)) if val_size < 1 else int(val_size)
    if count >= len(examples):
        raise UserError(
            f"val_size={val_size} asks for {count} validation examples but {path} has only {len(examples)} "
            f"usable examples, leaving none for training. Use a smaller val_size, or a separate val_path."
        )
    val_indices = set(random.Random(seed).sample(range(len(examples)), count))
    train = [e for i, e in enumerate(examples) if i not in val_indices]
    val = [e for i, e in enumerate(examples) if i in val_indices]
    return train, val
