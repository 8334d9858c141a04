"""The --dry-run preview of one example: trained tokens highlighted, masked ones dim."""

from __future__ import annotations

from rich.text import Text

from .examples import IGNORE_INDEX, Example

TRAINED_STYLE = "bold green"
MASKED_STYLE = "dim"


PLAIN_MARKS = ("[[", "]]")  # around trained runs where colour is lost: piped to a file, `tee`, NO_COLOR


def preview(example: Example, tokenizer, plain: bool = False) -> Text:
    """The decoded example with trained tokens highlighted and masked tokens dim, for `lora-train --dry-run`; with
    `plain`, trained runs are also put between PLAIN_MARKS.

    Runs of tokens with the same trained/masked state are cut from decodes of growing prefixes, so spaces and
    multi-byte characters come out as in a decode of the whole example.
    """
    text = Text()
    decoded_so_far = ""
    for start, stop, trained in _label_runs(example.labels):
        decoded = tokenizer.decode(
            example.input_ids[:stop], skip_special_tokens=False, clean_up_tokenization_spaces=False
        )
        if decoded.startswith(decoded_so_far):
            piece = decoded[len(decoded_so_far) :]
        else:  # a prefix decode that is not a prefix of the next (rare): decode the run alone
            piece = tokenizer.decode(example.input_ids[start:stop], skip_special_tokens=False)
        if trained and plain:
            piece = f"{PLAIN_MARKS[0]}{piece}{PLAIN_MARKS[1]}"
        text.append(piece, style=TRAINED_STYLE if trained else MASKED_STYLE)
        decoded_so_far = decoded
    return text


def _label_runs(labels: list[int]) -> list[tuple[int, int, bool]]:
    """[start, stop) runs of consecutive positions that are all trained or all masked."""
    runs = []
    start = 0
    for i in range(1, len(labels) + 1):
        if i == len(labels) or (labels[i] != IGNORE_INDEX) != (labels[start] != IGNORE_INDEX):
            runs.append((start, i, labels[start] != IGNORE_INDEX))
            start = i
    return runs
