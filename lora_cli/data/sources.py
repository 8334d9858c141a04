"""Rows from a local file, a folder of files, or a Hugging Face Hub dataset, each with its location for messages."""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from lora_cli.errors import UserError

DATA_EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet", ".txt")


RowStream = Iterator[tuple[dict, str]]  # (row, where it is, e.g. "'data.jsonl' row 7 (line 9)", for messages)
PARQUET_BATCH = 1000  # rows read from a Parquet file at a time
JSON_CHUNK = 1 << 20  # characters of a .json file decoded at a time


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
    loaded = _LoadedRows([], [])
    for row, where in iter_rows(path, split):
        loaded.rows.append(row)
        loaded.locations.append(where)
    return loaded


def iter_rows(path: str, split: str = "train") -> RowStream:
    """The rows of `path` (as load_rows reads them) one at a time, each with its location: memory stays bounded
    whatever the file's size (JSONL line by line, Parquet by row groups, CSV and JSON arrays as a stream)."""
    local = Path(path).expanduser()
    if local.is_dir():
        return _iter_files(_folder_files(local, split))
    if local.is_file():
        return _iter_files([local])
    if _looks_like_local_path(path):
        raise UserError(
            f"Data path '{path}' does not exist: it is neither an existing file nor a reachable Hugging Face Hub "
            f"dataset. Check the path (relative paths start from the current directory, {Path.cwd()})."
        )
    return _iter_hub(path, split)


def local_files(path: str, split: str = "train") -> list[Path] | None:
    """The files iter_rows reads for a local path, in order; None for a Hub dataset."""
    local = Path(path).expanduser()
    if local.is_dir():
        return _folder_files(local, split)
    if local.is_file():
        return [local]
    return None


def _looks_like_local_path(path: str) -> bool:
    """Hub names are 'name' or 'owner/name'; anything else is surely meant as a local path."""
    return (
        path.startswith(("/", ".", "~", "\\"))
        or path.lower().endswith(DATA_EXTENSIONS)
        or path.count("/") > 1
        or "\\" in path
    )


def _iter_files(files: list[Path]) -> RowStream:
    for file in files:
        _check_extension(file)  # before the first row: an unsupported file is refused without reading
    for file in files:
        count = 0
        for count, item in enumerate(_iter_file(file), start=1):
            yield item
        if not count:
            raise UserError(f"Data file '{file}' contains no examples. Point the data path at a file with rows.")


def _check_extension(file: Path) -> None:
    if file.suffix.lower() not in DATA_EXTENSIONS:
        raise UserError(
            f"Data file '{file}' has the unsupported extension '{file.suffix}'. Supported: "
            f"{', '.join(DATA_EXTENSIONS)}. Convert the file, or rename it if it already is one of these."
        )


def _iter_file(file: Path) -> RowStream:
    suffix = file.suffix.lower()
    if suffix == ".parquet":
        return _iter_parquet(file)
    return {".jsonl": _iter_jsonl, ".json": _iter_json, ".csv": _iter_csv, ".txt": _iter_txt}[suffix](file)


def _utf8_lines(file: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line, decoded one line at a time; a byte that is not UTF-8 is reported with its
    offset in the file and its line."""
    offset = 0
    with open(file, "rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            try:
                # -sig on the first line: tolerate the byte order mark that Windows tools write
                text = raw.decode("utf-8-sig" if line_number == 1 else "utf-8")
            except UnicodeDecodeError as e:
                _not_utf8(file, offset + e.start, line_number, raw[e.start])
            offset += len(raw)
            yield line_number, text


def _not_utf8(file: Path, position: int, line: int, byte: int) -> None:
    raise UserError(
        f"Data file '{file}' is not valid UTF-8: byte {position} (line {line}) is 0x{byte:02x}. "
        f"Re-save the file as UTF-8, e.g. `iconv -f latin1 -t utf-8 in > out`."
    ) from None


def _read_utf8(file: Path) -> str:
    raw = file.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        _not_utf8(file, e.start, raw[: e.start].count(b"\n") + 1, raw[e.start])


def _json_loads(text: str) -> Any:
    """json.loads, with nesting too deep for Python's parser (a RecursionError) reported as invalid JSON."""
    try:
        return json.loads(text)
    except RecursionError:
        raise json.JSONDecodeError("nested too deeply to parse", text, 0) from None


def _iter_jsonl(file: Path) -> RowStream:
    name, count = str(file), 0
    for line_number, line in _utf8_lines(file):
        if not line.strip():
            continue
        try:
            row = _json_loads(line)
        except json.JSONDecodeError as e:
            raise UserError(
                f"Data file '{name}' line {line_number} is not valid JSON ({e.msg}, column {e.colno}). "
                f"Each line of a .jsonl file must be one complete JSON object; fix or delete that line."
            ) from None
        count += 1
        where = f"'{name}' row {count} (line {line_number})"
        yield _require_object(row, where), where


def _iter_json(file: Path) -> RowStream:
    """A JSON array is streamed element by element; any other shape (an object holding the list, JSON lines in a
    .json file) is read whole, as before."""
    with open(file, encoding="utf-8-sig", errors="strict") as handle:
        try:
            head = handle.read(JSON_CHUNK)
        except UnicodeDecodeError:
            head = None
        if head is not None and head.lstrip().startswith("["):
            yield from _iter_json_array(file, handle, head)
            return
    yield from _parse_json(_read_utf8(file), file)


def _iter_json_array(file: Path, handle, buffer: str) -> RowStream:
    """The elements of a top-level JSON array, decoded one at a time from a growing-then-trimmed text buffer."""
    decoder, name, count = json.JSONDecoder(), str(file), 0
    position = buffer.index("[") + 1
    while True:
        buffer, position = _skip(buffer, position, handle, ",")
        if position < len(buffer) and buffer[position] == "]":
            return
        while True:
            try:
                value, end = decoder.raw_decode(buffer, position)
                break
            except (json.JSONDecodeError, RecursionError):
                more = _read_more(handle)
                if not more:
                    yield from _parse_json(_read_utf8(file), file)  # reports the error where it is
                    return
                buffer, position = buffer[position:] + more, 0
        count += 1
        where = f"'{name}' row {count}"
        yield _require_object(value, where), where
        position = end  # no copy per element: the buffer is trimmed only when more is read


def _skip(buffer: str, position: int, handle, separator: str) -> tuple[str, int]:
    """Move past whitespace and at most one separator, reading more of the file when the buffer runs out."""
    seen_separator = False
    while True:
        while position < len(buffer) and (buffer[position].isspace() or
                                           (buffer[position] == separator and not seen_separator)):
            seen_separator = seen_separator or buffer[position] == separator
            position += 1
        if position < len(buffer):
            return buffer, position
        more = _read_more(handle)
        if not more:
            return buffer, position
        buffer, position = more, 0


def _read_more(handle) -> str:
    try:
        return handle.read(JSON_CHUNK)
    except UnicodeDecodeError:
        return ""  # the whole-file reader reports the offending byte


def _parse_json(text: str, file: Path) -> RowStream:
    if not text.strip():
        return
    try:
        data = _json_loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # several top-level values: JSON lines in a .json file, as `datasets` allows
            yield from _iter_jsonl(file)
            return
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
    for i, row in enumerate(data, start=1):
        where = f"'{file}' row {i}"
        yield _require_object(row, where), where


def _iter_csv(file: Path) -> RowStream:
    name = str(file)
    lines = (text for _, text in _utf8_lines(file))
    for i, row in enumerate(csv.DictReader(lines), start=1):
        yield {key: value for key, value in row.items() if key is not None}, f"'{name}' row {i}"


def _iter_txt(file: Path) -> RowStream:
    name, count = str(file), 0
    for line_number, physical in _utf8_lines(file):
        for line in physical.splitlines():  # as str.splitlines of the whole text: \r, \x0b, ... split too
            if line.strip():
                count += 1
                yield {"text": line}, f"'{name}' row {count} (line {line_number})"


def _iter_parquet(file: Path) -> RowStream:
    import pyarrow.parquet as pq  # installed with `datasets`

    name, count = str(file), 0
    try:
        batches = pq.ParquetFile(file).iter_batches(batch_size=PARQUET_BATCH)
        for batch in batches:
            for row in batch.to_pylist():
                count += 1
                yield row, f"'{name}' row {count}"
    except Exception as e:  # pyarrow raises several types for a damaged or non-parquet file
        raise UserError(
            f"Data file '{file}' could not be read as Parquet: {e}. Check that it is a Parquet file."
        ) from None


def _require_object(row: Any, where: str) -> dict:
    if not isinstance(row, dict):
        raise UserError(
            f"Data {where} is a JSON {type(row).__name__}, not an object. Each example must be an object "
            f'with named fields, e.g. {{"text": "..."}}.'
        )
    return row


def _folder_files(folder: Path, split: str) -> list[Path]:
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
    return files


def load_hub(name: str, split: str):
    """The Hub dataset (a `datasets.Dataset`, memory-mapped Arrow in the HF cache)."""
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
    if not len(dataset):
        raise UserError(f"Hub dataset '{name}' split '{split}' contains no examples. Choose another split.")
    return dataset


def _iter_hub(name: str, split: str) -> RowStream:
    dataset = load_hub(name, split)
    for start in range(0, len(dataset), PARQUET_BATCH):
        rows = dataset.select(range(start, min(start + PARQUET_BATCH, len(dataset)))).to_list()
        for i, row in enumerate(rows, start=start + 1):
            yield row, f"Hub dataset '{name}' row {i}"
