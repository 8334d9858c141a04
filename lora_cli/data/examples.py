"""The data types every stage of the data pipeline shares: one tokenized example, the data summary, the bundle."""

from __future__ import annotations

from dataclasses import dataclass, field

from lora_cli.errors import UserError

IGNORE_INDEX = -100  # label value that torch's cross-entropy ignores


@dataclass
class Example:
    """One tokenized training example, unpadded."""

    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX (-100) where the token is not trained
    row_index: int = -1  # 0-based index of the source row in its file, for messages and --dry-run

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_trained(self) -> int:
        return len(self.labels) - self.labels.count(IGNORE_INDEX)


@dataclass
class DataStats:
    format: str  # the resolved format (text, alpaca, chat, prompt_completion); mixed sources: joined by "+"
    num_train: int
    num_val: int
    train_tokens: int  # total tokens in the train examples
    trained_tokens: int  # train tokens whose label is not -100
    num_truncated: int  # examples (train + val) cut to max_length
    num_dropped: int  # rows (train + val) dropped because no token was left to train, e.g. a too long prompt
    # Of num_dropped, the rows with an empty response (or, in chat, no assistant reply): they would train the
    # end-of-sequence token alone. The rest had their response cut off by max_length.
    num_without_response: int = 0
    val_tokens: int = 0
    max_example_length: int = 0  # the longest train example, in tokens
    num_rows: int = 0  # rows loaded (train + val) before dropping
    max_length: int = 0
    sources: list = field(default_factory=list)  # mixing.SourceStats of each data.path source, in order


@dataclass
class DataBundle:
    train: list[Example]  # or data.cache.CachedExamples: a sequence of Example read from the cache
    val: list[Example]
    stats: DataStats
    fingerprint: str = ""  # the cache key: resume checks it to train on the same examples


class RowError(UserError):
    """A problem with one row's content. build_datasets adds the file and row number to the message."""
