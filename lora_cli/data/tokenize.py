"""Tokenize rendered rows with character offsets, label the trained tokens, and end with a trained EOS (build.py
streams the data through here and splits it)."""

from __future__ import annotations

import bisect

from lora_cli.errors import UserError

from .examples import IGNORE_INDEX, Example
from .formats import _render, _Rendered


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
