"""Rows from a local file, a folder of files, or a Hugging Face Hub dataset, each with its location for messages."""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_cli.errors import UserError

DATA_EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet", ".txt")


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


def _json_loads(text: str) -> Any:
    """json.loads, with nesting too deep for Python's parser (a RecursionError) reported as invalid JSON."""
    try:
        return json.loads(text)
    except RecursionError:
        raise json.JSONDecodeError("nested too deeply to parse", text, 0) from None


def _parse_jsonl(text: str, file: Path) -> _LoadedRows:
    rows, locations = [], []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = _json_loads(line)
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
        data = _json_loads(text)
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
