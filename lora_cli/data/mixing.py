"""Several data sources mixed into one training set: what a source is, the rows `take` keeps, and what each source
contributed (for the data summary)."""

from __future__ import annotations

import random
from dataclasses import dataclass

from lora_cli.errors import UserError


@dataclass(frozen=True)
class Source:
    """One entry of data.path: where the rows are, their format, the split (Hub datasets and split folders), and
    how many rows to use: a count (>= 1), a fraction (0 < take <= 1), or None for all."""

    path: str
    format: str = "auto"
    split: str = "train"
    take: int | float | None = None


@dataclass
class SourceStats:
    """What one source gave the mixed set; tokens count its examples in training and validation alike."""

    path: str
    format: str
    rows: int  # rows read (after take)
    available: int  # rows in the source before take
    examples: int  # rows kept (a row with nothing left to train is dropped)
    tokens: int
    trained_tokens: int


def as_sources(path: str | list[Source], format: str, split: str) -> list[Source]:
    """data.path as a list of sources: a single path is one source with data.format and data.split."""
    if isinstance(path, str):
        return [Source(path, format, split)]
    return list(path)


def chosen_rows(total: int, source: Source, seed: int, index: int) -> set[int] | None:
    """The numbers of the rows `source.take` asks for among `total`, drawn at random with the run's seed (the same
    rows on every run and on a resume; the reader keeps them in their order in the source). None: all of them."""
    take = source.take
    if take is None:
        return None
    count = take if isinstance(take, int) else round(total * take)
    if isinstance(take, int) and take > total:
        raise UserError(
            f"data.path[{index}] ('{source.path}') asks for take={take} rows, but it has only {total}. Use a smaller "
            f"take, a fraction such as 0.5, or remove take to use all its rows."
        )
    if count < 1:
        raise UserError(
            f"data.path[{index}] ('{source.path}'): take={take} of its {total} rows keeps none. Use a larger fraction "
            "or a row count."
        )
    if count >= total:
        return None
    # Each source draws from its own generator, so adding or reordering one source leaves the others' rows as
    # they were.
    return set(random.Random(f"{seed}:{source.path}:{source.split}").sample(range(total), count))


def source_lines(sources: list[SourceStats]) -> list[str]:
    """The data summary's per-source lines and their total; none for a single source read whole."""
    if len(sources) < 2 and all(s.rows == s.available for s in sources):
        return []
    lines = ["per source (tokens of training and validation examples):"]
    for number, s in enumerate(sources):
        rows = f"{s.rows:,} rows" if s.rows == s.available else f"{s.rows:,} of {s.available:,} rows (take)"
        lines.append(f"  [{number}] {s.path} ({s.format}): {rows}, {s.examples:,} examples, {s.tokens:,} tokens, "
                     f"{s.trained_tokens:,} trained")
    total = (sum(s.rows for s in sources), sum(s.examples for s in sources), sum(s.tokens for s in sources),
             sum(s.trained_tokens for s in sources))
    lines.append(f"  total: {total[0]:,} rows, {total[1]:,} examples, {total[2]:,} tokens, {total[3]:,} trained")
    return lines
