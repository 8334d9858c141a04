"""Training data: load rows from a file, folder or Hub dataset, format them, tokenize, mask, split and batch.

The pipeline, once per run (never per step):

    load_rows -> detect_format -> render each row to (text, trained character spans)
              -> tokenize all texts in batches with offsets -> labels -> truncate -> split train/val

Every format reduces to the same intermediate form, a `_Rendered`: the exact text the model sees plus the
character spans whose tokens are trained. Tokenizing the whole text at once (instead of gluing separately
tokenized pieces) gives the same tokens the model sees at inference, and the offsets map tokens back to spans.
"""

from __future__ import annotations

import bisect
import csv
import io
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.text import Text

from lora_cli.errors import UserError

IGNORE_INDEX = -100  # label value that torch's cross-entropy ignores
FORMATS = ("text", "alpaca", "chat")
DATA_EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet", ".txt")

# The field sets of each format, for the message when none matches (detect_format checks them in this order).
FORMAT_FIELDS = {
    "chat": ("messages", "or", "conversations"),
    "alpaca": ("instruction", "output", "(optional input)"),
    "text": ("text",),
}

CHAT_ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}

ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)

TOKENIZE_CHUNK = 1000  # rows tokenized per call: fast, but the offsets of 50k long rows at once would use GBs


# --------------------------------------------------------------------------------------------------------------
# Public data types


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
    format: str  # the resolved format: text, alpaca or chat
    num_train: int
    num_val: int
    train_tokens: int  # total tokens in the train examples
    trained_tokens: int  # train tokens whose label is not -100
    num_truncated: int  # examples (train + val) cut to max_length
    num_dropped: int  # rows (train + val) dropped because no token was left to train, e.g. a too long prompt
    val_tokens: int = 0
    max_example_length: int = 0  # the longest train example, in tokens
    num_rows: int = 0  # rows loaded (train + val) before dropping
    max_length: int = 0


@dataclass
class DataBundle:
    train: list[Example]
    val: list[Example]
    stats: DataStats


class RowError(UserError):
    """A problem with one row's content. build_datasets adds the file and row number to the message."""


# --------------------------------------------------------------------------------------------------------------
# Loading


@dataclass
class _LoadedRows:
    rows: list[dict]
    locations: list[str]  # one per row, e.g. "data.jsonl line 7", for error messages


def load_rows(path: str, split: str = "train") -> list[dict]:
    """Load the rows of a local data file, a folder of data files, or a Hugging Face Hub dataset.

    Local files: .jsonl (one object a line), .json (a list of objects, or an object whose "data" or "train"
    key holds that list; JSON lines also accepted), .csv (header row = field names), .parquet, and .txt, where
    each non-empty line is one example {"text": line} (blank lines are skipped; use .jsonl for multi-line
    examples). A folder loads all data files of one extension in it and below, in sorted order; if some
    file names contain the split name (e.g. "train"), only those. Anything else is a Hub dataset name.
    """
    return _load(path, split).rows


def _load(path: str, split: str) -> _LoadedRows:
    local = Path(path).expanduser()
    if local.is_dir():
        return _load_folder(local, split)
    if local.is_file():
        return _load_file(local)
    if _looks_like_local_path(path):
        raise UserError(
            f"Data path '{path}' does not exist: it is neither an existing file nor a reachable Hugging Face Hub "
            f"dataset. Check the path (relative paths start from the current directory, {Path.cwd()})."
        )
    return _load_hub(path, split)


def _looks_like_local_path(path: str) -> bool:
    """Hub names are 'name' or 'owner/name'; anything else is surely meant as a local path."""
    return (
        path.startswith(("/", ".", "~", "\\"))
        or path.lower().endswith(DATA_EXTENSIONS)
        or path.count("/") > 1
        or "\\" in path
    )


def _load_file(file: Path) -> _LoadedRows:
    suffix = file.suffix.lower()
    if suffix == ".parquet":
        loaded = _read_parquet(file)
    elif suffix in (".jsonl", ".json", ".csv", ".txt"):
        text = _read_utf8(file)
        reader = {".jsonl": _parse_jsonl, ".json": _parse_json, ".csv": _parse_csv, ".txt": _parse_txt}[suffix]
        loaded = reader(text, file) if text.strip() else _LoadedRows([], [])
    else:
        raise UserError(
            f"Data file '{file}' has the unsupported extension '{file.suffix}'. Supported: "
            f"{', '.join(DATA_EXTENSIONS)}. Convert the file, or rename it if it already is one of these."
        )
    if not loaded.rows:
        raise UserError(f"Data file '{file}' contains no examples. Point the data path at a file with rows.")
    return loaded


def _read_utf8(file: Path) -> str:
    raw = file.read_bytes()
    try:
        return raw.decode("utf-8-sig")  # -sig: tolerate the byte order mark that Windows tools write
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise UserError(
            f"Data file '{file}' is not valid UTF-8: byte {e.start} (line {line}) is 0x{raw[e.start]:02x}. "
            f"Re-save the file as UTF-8, e.g. `iconv -f latin1 -t utf-8 in > out`."
        ) from None


def _parse_jsonl(text: str, file: Path) -> _LoadedRows:
    rows, locations = [], []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(
                f"Data file '{file}' line {line_number} is not valid JSON ({e.msg}, column {e.colno}). "
                f"Each line of a .jsonl file must be one complete JSON object; fix or delete that line."
            ) from None
        where = f"'{file}' row {len(rows) + 1} (line {line_number})"
        rows.append(_require_object(row, where))
        locations.append(where)
    return _LoadedRows(rows, locations)


def _parse_json(text: str, file: Path) -> _LoadedRows:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # several top-level values: JSON lines in a .json file, as `datasets` allows
            return _parse_jsonl(text, file)
        raise UserError(
            f"Data file '{file}' is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}. "
            f"Fix the file; it should hold a list of objects, or use one object a line in a .jsonl file."
        ) from None
    if isinstance(data, dict):
        data = next((data[key] for key in ("data", "train") if isinstance(data.get(key), list)), data)
    if not isinstance(data, list):
        raise UserError(
            f"Data file '{file}' holds a JSON {type(data).__name__}, not a list of examples. "
            f'Write the examples as a list of objects, e.g. [{{"text": "..."}}], or as a .jsonl file.'
        )
    locations = [f"'{file}' row {i}" for i in range(1, len(data) + 1)]
    rows = [_require_object(row, where) for row, where in zip(data, locations)]
    return _LoadedRows(rows, locations)


def _parse_csv(text: str, file: Path) -> _LoadedRows:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows = [{key: value for key, value in row.items() if key is not None} for row in reader]
    return _LoadedRows(rows, [f"'{file}' row {i}" for i in range(1, len(rows) + 1)])


def _parse_txt(text: str, file: Path) -> _LoadedRows:
    rows, locations = [], []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            rows.append({"text": line})
            locations.append(f"'{file}' row {len(rows)} (line {line_number})")
    return _LoadedRows(rows, locations)


def _read_parquet(file: Path) -> _LoadedRows:
    import pyarrow.parquet as pq  # installed with `datasets`

    try:
        rows = pq.read_table(file).to_pylist()
    except Exception as e:  # pyarrow raises several types for a damaged or non-parquet file
        raise UserError(
            f"Data file '{file}' could not be read as Parquet: {e}. Check that it is a Parquet file."
        ) from None
    return _LoadedRows(rows, [f"'{file}' row {i}" for i in range(1, len(rows) + 1)])


def _require_object(row: Any, where: str) -> dict:
    if not isinstance(row, dict):
        raise UserError(
            f"Data {where} is a JSON {type(row).__name__}, not an object. Each example must be an object "
            f'with named fields, e.g. {{"text": "..."}}.'
        )
    return row


def _load_folder(folder: Path, split: str) -> _LoadedRows:
    files = sorted(
        f for f in folder.rglob("*")
        if f.is_file() and f.suffix.lower() in DATA_EXTENSIONS
        and not any(part.startswith(".") for part in f.relative_to(folder).parts)
    )
    # Like `datasets`, a folder with train/test files is split by file name; don't mix test rows into training.
    split_word = re.compile(rf"(^|[^a-z0-9]){re.escape(split.lower())}([^a-z0-9]|$)")
    in_split = [f for f in files if split_word.search(str(f.relative_to(folder)).lower())]
    files = in_split or files
    if not files:
        raise UserError(
            f"Data folder '{folder}' contains no data files ({', '.join(DATA_EXTENSIONS)}). "
            f"Put the data files there or point the data path at a file."
        )
    extensions = sorted({f.suffix.lower() for f in files})
    if len(extensions) > 1:
        raise UserError(
            f"Data folder '{folder}' mixes data files of types {', '.join(extensions)}. Keep files of one type "
            f"in the folder, or point the data path at one file."
        )
    merged = _LoadedRows([], [])
    for file in files:
        loaded = _load_file(file)
        merged.rows.extend(loaded.rows)
        merged.locations.extend(loaded.locations)
    return merged


def _load_hub(name: str, split: str) -> _LoadedRows:
    import datasets

    try:
        dataset = datasets.load_dataset(name, split=split)
    except ValueError as e:  # e.g. an unknown split name; the message lists the splits
        raise UserError(f"Hub dataset '{name}' could not be loaded with split '{split}': {e}") from None
    except Exception as e:  # offline, unknown name, gated, ...: all the user's to fix
        raise UserError(
            f"Data path '{name}' is neither an existing file nor a reachable Hugging Face Hub dataset "
            f"({type(e).__name__}: {e}). Check the path of the local file or folder, or the dataset name and "
            f"your network connection (and HF_TOKEN for gated datasets)."
        ) from None
    rows = dataset.to_list()
    if not rows:
        raise UserError(f"Hub dataset '{name}' split '{split}' contains no examples. Choose another split.")
    return _LoadedRows(rows, [f"Hub dataset '{name}' row {i}" for i in range(1, len(rows) + 1)])


# --------------------------------------------------------------------------------------------------------------
# Formats


def detect_format(rows: list[dict], source: str) -> str:
    """Guess the format from the first row's fields: messages/conversations -> chat; instruction+output -> alpaca;
    text -> text."""
    fields = set(rows[0]) if rows else set()
    if "messages" in fields or "conversations" in fields:
        return "chat"
    if {"instruction", "output"} <= fields:
        return "alpaca"
    if "text" in fields:
        return "text"
    accepted = "; ".join(f"{fmt}: {' '.join(names)}" for fmt, names in FORMAT_FIELDS.items())
    raise UserError(
        f"Cannot tell the format of '{source}': its first row has the fields {sorted(fields)}, which match none "
        f"of the accepted field sets ({accepted}). Rename the fields to one of these sets."
    )


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """The standard Alpaca prompt; generation must use the same text to match training."""
    if input:
        return ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return ALPACA_PROMPT.format(instruction=instruction)


@dataclass
class _Rendered:
    """A row as the model sees it: the text, and the [start, end) character spans whose tokens are trained."""

    text: str
    trained_spans: list[tuple[int, int]]
    add_special_tokens: bool  # False for chat: the template already wrote the special tokens (BOS etc.)
    is_chat: bool = False


def _render(row: dict, fmt: str, tokenizer, train_on_inputs: bool) -> _Rendered:
    if fmt == "text":
        text = _string_field(row, "text")
        return _Rendered(text, [(0, len(text))], add_special_tokens=True)
    if fmt == "alpaca":
        return _render_alpaca(row, train_on_inputs)
    if fmt == "chat":
        return _render_chat(row, tokenizer, train_on_inputs)
    raise UserError(f"Unknown data format '{fmt}'. Use one of: auto, {', '.join(FORMATS)}.")


def _string_field(row: dict, name: str, optional: bool = False) -> str:
    value = row.get(name)
    if value is None:
        if optional:
            return ""
        raise RowError(f"the field '{name}' is missing or null; every row of this format needs it")
    if not isinstance(value, str):
        raise RowError(f"the field '{name}' is a {type(value).__name__}, it must be a string")
    return value


def _render_alpaca(row: dict, train_on_inputs: bool) -> _Rendered:
    prompt = alpaca_prompt(_string_field(row, "instruction"), _string_field(row, "input", optional=True))
    text = prompt + _string_field(row, "output")
    response_start = 0 if train_on_inputs else len(prompt)
    return _Rendered(text, [(response_start, len(text))], add_special_tokens=True)


def _chat_messages(row: dict) -> list[dict]:
    """The row's conversation as [{role, content}], from `messages` or ShareGPT-style `conversations`."""
    if "messages" in row:
        key, role_key, content_key, role_names = "messages", "role", "content", {r: r for r in CHAT_ROLES}
    else:
        key, role_key, content_key, role_names = "conversations", "from", "value", SHAREGPT_ROLES
    turns = row.get(key)
    if not isinstance(turns, list) or not turns:
        raise RowError(f"the field '{key}' must be a non-empty list of turns, got {type(turns).__name__}")
    messages = []
    for number, turn in enumerate(turns, start=1):
        where = f"'{key}' turn {number}"
        if not isinstance(turn, dict):
            raise RowError(
                f"{where} is a {type(turn).__name__}; it must be an object with '{role_key}' and '{content_key}'"
            )
        role, content = turn.get(role_key), turn.get(content_key)
        if role not in role_names:
            raise RowError(f"{where} has the {role_key} {role!r}; accepted: {', '.join(role_names)}")
        if not isinstance(content, str):
            raise RowError(f"{where} has a '{content_key}' of type {type(content).__name__}; it must be a string")
        messages.append({"role": role_names[role], "content": content})
    return messages


def _apply_template(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # the template's own checks (e.g. "roles must alternate") raise jinja errors
        raise RowError(f"the tokenizer's chat template rejected the conversation: {e}") from None


def _render_chat(row: dict, tokenizer, train_on_inputs: bool) -> _Rendered:
    messages = _chat_messages(row)
    # Turns after the last assistant reply teach nothing: drop them so the example ends with a trained turn.
    last_assistant = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    messages = messages[: last_assistant + 1] or messages
    text = _apply_template(tokenizer, messages)
    spans, cursor = [], 0
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            span = _assistant_span(tokenizer, messages, i, text, cursor)
            spans.append(span)
            cursor = span[1]
    if train_on_inputs and spans:  # everything up to the end of the last reply; not the whitespace after it
        spans = [(0, spans[-1][1])]
    return _Rendered(text, spans, add_special_tokens=False, is_chat=True)


def _assistant_span(tokenizer, messages: list[dict], i: int, text: str, cursor: int) -> tuple[int, int]:
    """Character span of assistant turn i in the rendered conversation: its content and end-of-turn token.

    Rendering the conversation up to the turn with the generation prompt gives where the content starts;
    rendering through the turn gives where it ends. This works for any template that renders a conversation's
    prefix as a prefix of the whole, which nearly all do. The whitespace the template writes after the
    end-of-turn token (ChatML's newline) is not part of the reply and is left untrained.
    """
    before = _apply_template(tokenizer, messages[:i], add_generation_prompt=True)
    through = _apply_template(tokenizer, messages[: i + 1])
    if text.startswith(before) and text.startswith(through) and cursor <= len(before) <= len(through):
        start, end = len(before), len(through)
    else:  # the generation prompt or earlier turns render differently in the whole: find the content itself
        start, end = _find_content(text, messages[i]["content"], cursor, tokenizer.eos_token)
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def _find_content(text: str, content: str, cursor: int, eos_token: str | None) -> tuple[int, int]:
    start = text.find(content, cursor)
    if start < 0:
        raise RowError(
            "an assistant message could not be located in the text the chat template renders, so its tokens "
            "cannot be marked for training; use a tokenizer with a standard chat template, or the text format"
        )
    end = start + len(content)
    after = len(text[end:]) - len(text[end:].lstrip())
    if eos_token and text.startswith(eos_token, end + after):  # train the end-of-turn token with the reply
        end += after + len(eos_token)
    return start, end


# --------------------------------------------------------------------------------------------------------------
# Tokenizing


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
    """Load, format, tokenize and split the training data; everything the train loop needs, computed once."""
    if format != "auto" and format not in FORMATS:
        raise UserError(f"Unknown data format '{format}'. Use one of: auto, {', '.join(FORMATS)}.")
    if max_length < 2:
        raise UserError(f"max_length is {max_length}; it must be at least 2 tokens (typically 512-4096).")
    if val_path and val_size:
        raise UserError(
            f"Both val_path ('{val_path}') and val_size ({val_size}) are set. Set only one: val_path to use a "
            f"separate validation file, or val_size to split one off the training data."
        )
    loaded = _load(path, split)
    fmt = detect_format(loaded.rows, path) if format == "auto" else format
    _check_tokenizer(tokenizer, fmt)
    counts = _Counts()
    examples = _tokenize_all(loaded, fmt, tokenizer, max_length, train_on_inputs, counts)
    if val_path:
        val_loaded = _load(val_path, split="validation")
        val = _tokenize_all(val_loaded, fmt, tokenizer, max_length, train_on_inputs, counts)
        train = examples
        num_rows = len(loaded.rows) + len(val_loaded.rows)
    else:
        train, val = _split_off_validation(examples, val_size, seed, path)
        num_rows = len(loaded.rows)
    if not train:
        raise UserError(
            f"No training examples are left from '{path}': all {len(examples)} had no trainable tokens within "
            f"max_length={max_length} ({counts.dropped} dropped). Increase max_length, or shorten the prompts."
        )
    stats = DataStats(
        format=fmt,
        num_train=len(train),
        num_val=len(val),
        train_tokens=sum(len(e) for e in train),
        trained_tokens=sum(e.num_trained for e in train),
        num_truncated=counts.truncated,
        num_dropped=counts.dropped,
        val_tokens=sum(len(e) for e in val),
        max_example_length=max(len(e) for e in train),
        num_rows=num_rows,
        max_length=max_length,
    )
    return DataBundle(train, val, stats)


@dataclass
class _Counts:
    truncated: int = 0
    dropped: int = 0


def _tokenize_all(loaded: _LoadedRows, fmt, tokenizer, max_length, train_on_inputs, counts: _Counts) -> list[Example]:
    examples = []
    for chunk_start in range(0, len(loaded.rows), TOKENIZE_CHUNK):
        chunk = range(chunk_start, min(chunk_start + TOKENIZE_CHUNK, len(loaded.rows)))
        rendered = [_render_located(loaded, i, fmt, tokenizer, train_on_inputs) for i in chunk]
        for row_index, (example, truncated) in zip(chunk, _tokenize_rendered(rendered, tokenizer, max_length)):
            example.row_index = row_index
            counts.truncated += truncated
            if example.num_trained == 0:  # nothing to learn from, e.g. the prompt alone fills max_length
                counts.dropped += 1
            else:
                examples.append(example)
    return examples


def _render_located(loaded: _LoadedRows, i: int, fmt, tokenizer, train_on_inputs) -> _Rendered:
    try:
        return _render(loaded.rows[i], fmt, tokenizer, train_on_inputs)
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
            f"val_size={val_size} asks for {count} validation examples but '{path}' has only {len(examples)} "
            f"usable examples, leaving none for training. Use a smaller val_size, or a separate val_path."
        )
    val_indices = set(random.Random(seed).sample(range(len(examples)), count))
    train = [e for i, e in enumerate(examples) if i not in val_indices]
    val = [e for i, e in enumerate(examples) if i in val_indices]
    return train, val


# --------------------------------------------------------------------------------------------------------------
# Batching


def collate(examples: list[Example], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch to its longest example (not max_length: less compute for short batches).

    Padding is masked out of attention and labels by position, never by id, so an EOS equal to pad stays trained.
    """
    longest = max(len(e) for e in examples)
    input_ids = torch.full((len(examples), longest), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), longest), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), longest), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example)
        input_ids[row, :n] = torch.tensor(example.input_ids, dtype=torch.long)
        labels[row, :n] = torch.tensor(example.labels, dtype=torch.long)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


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


# --------------------------------------------------------------------------------------------------------------
# Preview


TRAINED_STYLE = "bold green"
MASKED_STYLE = "dim"


def preview(example: Example, tokenizer) -> Text:
    """The decoded example with trained tokens highlighted and masked tokens dim, for `lora-train --dry-run`.

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
