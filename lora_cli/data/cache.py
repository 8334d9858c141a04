"""The tokenized-data cache: the examples of a data config written once to disk and memory-mapped on every start.

An entry is a folder named by its key, a hash of everything that decides the examples: the contents of every data
file (not their names, sizes or times), the tokenizer (its vocabulary, rules, special tokens and chat template),
the whole data section of the config except the settings listed in NOT_IN_KEY, the seed when it draws the
validation split, and CACHE_VERSION. A new data setting is therefore in the key without anyone adding it. Inside:

    ids.bin       every kept example's token ids, end to end (uint16 when the vocabulary fits, else int32)
    trained.bin   one byte per token: 1 where the token is trained (its label is its id), 0 where masked (-100)
    index.npz     per example: offsets into ids.bin, source row; the train and validation example numbers
    meta.json     the key's parts (to say what changed on a miss) and the data summary

numpy memmaps rather than Arrow: an example is two slices of two flat arrays, found from one offsets array, with no
per-row objects and nothing to decode; the lengths that plan batches and packing are one np.diff. An entry is
written in a hidden temporary folder and renamed into place when complete, under a lock, so a killed tokenization
leaves nothing a later start trusts (the next writer removes its leftovers). At most KEEP_ENTRIES entries are kept,
the least recently used removed first.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import time
from array import array
from collections.abc import Sequence
from pathlib import Path
from typing import Callable

import numpy as np

from lora_cli.errors import UserError
from lora_cli.fsutil import (
    atomic_write_text,
    disk_full_message,
    is_disk_full,
    lock_path_of,
    make_temp_dir,
    remove_stale_temp_dirs,
    sync_tree,
    take_lock,
)

from .build import DataOptions, Tokenized, data_stats, tokenize_sources
from .examples import IGNORE_INDEX, DataBundle, DataStats, Example
from .from_config import options_from
from .mixing import SourceStats
from .sources import load_hub, local_files

CACHE_VERSION = 1  # raise it whenever a change to the data code changes the examples it writes
KEEP_ENTRIES = 3  # entries kept in a cache folder; the least recently used beyond that are removed
DEFAULT_CACHE_NAME = ".lora-data-cache"  # beside output_dir, unless data.cache_dir says otherwise
# data.* settings that do not change the examples: how they are batched or produced, not what they are.
NOT_IN_KEY = ("cache_dir", "num_proc", "packing")
META_NAME = "meta.json"
_WAIT_SECONDS = 1.0


class CachedExamples(Sequence):
    """Some examples of a cache entry (the training or the validation ones), read from the memory maps on demand:
    a sequence of data.Example like the in-memory lists, plus `lengths`, without touching the tokens."""

    def __init__(self, entry: _Entry, numbers: np.ndarray):
        self._entry, self._numbers = entry, numbers
        self.lengths = entry.lengths[numbers]
        self.folder = entry.folder

    def __len__(self) -> int:
        return len(self._numbers)

    def __getitem__(self, i: int) -> Example:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self._entry.example(int(self._numbers[i]))


class _Entry:
    """One complete cache entry, memory-mapped."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.meta = json.loads((folder / META_NAME).read_text(encoding="utf-8"))
        index = np.load(folder / "index.npz")
        self.offsets, self.rows = index["offsets"], index["rows"]
        self.train, self.val = index["train"], index["val"]
        self.lengths = np.diff(self.offsets)
        total = int(self.offsets[-1])
        dtype = np.dtype(self.meta["id_dtype"])
        # np.memmap refuses an empty file: a cache holds at least one example, so total > 0
        self.ids = np.memmap(folder / "ids.bin", dtype=dtype, mode="r", shape=(total,))
        self.trained = np.memmap(folder / "trained.bin", dtype=np.uint8, mode="r", shape=(total,))

    def example(self, number: int) -> Example:
        start, stop = int(self.offsets[number]), int(self.offsets[number + 1])
        ids = self.ids[start:stop]
        labels = np.where(self.trained[start:stop].astype(bool), ids.astype(np.int64), IGNORE_INDEX)
        return Example(ids.tolist(), labels.tolist(), int(self.rows[number]))

    def bundle(self) -> DataBundle:
        stats = dict(self.meta["stats"])
        stats = DataStats(**{**stats, "sources": [SourceStats(**source) for source in stats["sources"]]})
        return DataBundle(CachedExamples(self, self.train), CachedExamples(self, self.val), stats,
                          fingerprint=self.meta["key"])


def load_data(cfg, tokenizer, output_dir: Path, say: Callable[[str], None] = lambda message: None) -> DataBundle:
    """lora-train's data: the config's data section through the cache (data.cache_dir, else beside output_dir)."""
    root = Path(cfg.data.cache_dir).expanduser() if cfg.data.cache_dir else output_dir.parent / DEFAULT_CACHE_NAME
    return load_or_build(options_from(cfg), cfg.data.model_dump(), tokenizer, root, say)


# --------------------------------------------------------------------------------------------------------------
# The key


def key_parts(settings: dict, options: DataOptions, tokenizer) -> dict:
    """What decides the examples, as plain data: the settings, each data file's content hash, the tokenizer's."""
    settings = {name: value for name, value in sorted(settings.items()) if name not in NOT_IN_KEY}
    if options.val_size or any(s.take is not None for s in options.sources):  # else the seed changes no example
        settings["seed"] = options.seed
    sources = [(s.path, s.split) for s in options.sources]
    sources += [(options.val_path, "validation")] if options.val_path else []
    return {
        "version": CACHE_VERSION,
        "settings": settings,
        "files": [part for path, split in sources for part in _source_digests(path, split)],
        "tokenizer": tokenizer_digest(tokenizer),
    }


def key_of(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _source_digests(path: str, split: str) -> list[list[str]]:
    files = local_files(path, split)
    if files is None:  # a Hub dataset: `datasets` fingerprints its Arrow files
        return [[f"hub:{path}:{split}", load_hub(path, split)._fingerprint]]
    return [[str(file), file_digest(file)] for file in files]


def file_digest(file: Path) -> str:
    """SHA-256 of the file's bytes: an edit that keeps the size and the modification time still changes it."""
    with open(file, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def tokenizer_digest(tokenizer) -> str:
    """A hash of what the tokenizer does to text: its full definition (vocabulary, merges, normalizer, pre- and
    post-processing with any BOS), its special tokens and its chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    parts = [
        type(tokenizer).__name__,
        backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items())),
        json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str),
        str(tokenizer.eos_token_id),
        str(getattr(tokenizer, "chat_template", None)),
        str(len(tokenizer)),
    ]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def why_missed(parts: dict, root: Path) -> str:
    """One line: what differs from the closest entry in `root` (the one with fewest differences), or that there
    is none yet."""
    best: list[str] | None = None
    for meta in _metas(root):
        differences = _differences(meta.get("parts", {}), parts)
        if best is None or len(differences) < len(best):
            best = differences
    if best is None:
        return f"no tokenized data cached in {root} yet"
    return "the cached tokenization differs: " + "; ".join(best)


def _differences(old: dict, new: dict) -> list[str]:
    found = []
    if old.get("version") != new["version"]:
        found.append("it was written by another version of lora-cli")
    old_files, new_files = dict(old.get("files", [])), dict(new["files"])
    changed = [name for name, digest in new_files.items() if name in old_files and old_files[name] != digest]
    if changed:
        found.append(f"the contents of {', '.join(changed)} changed")
    if set(old_files) != set(new_files):
        found.append(f"the data files are {', '.join(new_files)}, were {', '.join(old_files)}")
    old_settings, new_settings = old.get("settings", {}), new["settings"]
    for name in sorted(set(old_settings) | set(new_settings)):
        if old_settings.get(name) != new_settings.get(name):
            label = "train.seed" if name == "seed" else f"data.{name}"
            found.append(f"{label} is {new_settings.get(name)!r}, was {old_settings.get(name)!r}")
    if old.get("tokenizer") != new["tokenizer"]:
        found.append("the tokenizer (vocabulary, special tokens or chat template) changed")
    return found


# --------------------------------------------------------------------------------------------------------------
# Reading and writing entries


def load_or_build(options: DataOptions, settings: dict, tokenizer, root: Path,
                  say: Callable[[str], None] = lambda message: None) -> DataBundle:
    """The examples of `options` from the cache in `root`, tokenized and written there first on a miss."""
    parts = key_parts(settings, options, tokenizer)
    key = key_of(parts)
    entry = root / key
    if (entry / META_NAME).is_file():
        return _open(entry)
    _make_root(root)
    reason = why_missed(parts, root)
    with _writer_lock(entry, say):
        if (entry / META_NAME).is_file():  # another process wrote it while this one waited
            return _open(entry)
        remove_stale_temp_dirs(entry)  # what a killed writer left; safe under the lock
        say(f"tokenizing the data into {entry} ({reason})")
        started = time.perf_counter()
        _write(entry, key, parts, options, tokenizer)
        say(f"tokenized in {time.perf_counter() - started:.0f} s")
    _bound(root, keep=entry)
    return _open(entry)


def _open(entry: Path) -> DataBundle:
    with contextlib.suppress(OSError):
        os.utime(entry / META_NAME)  # most recently used: _bound removes the others first
    return _Entry(entry).bundle()


def _make_root(root: Path) -> None:
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"Cannot create the tokenized-data cache folder {root} ({err.strerror}). Set data.cache_dir "
                        "to a writable folder.") from None


@contextlib.contextmanager
def _writer_lock(entry: Path, say: Callable[[str], None]):
    """One writer per entry: others (another run, or the other processes of this one) wait for it."""
    waiting = False
    while True:
        try:
            handle = take_lock(entry, busy=lambda holder: holder)
            break
        except UserError as busy:
            if not waiting:
                say(f"waiting for {busy} to finish tokenizing the same data into {entry}")
                waiting = True
            time.sleep(_WAIT_SECONDS)
    try:
        yield
    finally:
        if handle is not None:
            lock_path_of(entry).unlink(missing_ok=True)
            handle.close()


def _write(entry: Path, key: str, parts: dict, options: DataOptions, tokenizer) -> None:
    tmp = make_temp_dir(entry)
    try:
        writer = _ExampleWriter(tmp, np.uint16 if len(tokenizer) <= 2**16 else np.int32)
        with writer:
            tokenized = tokenize_sources(options, tokenizer, writer.add)
        _finish(tmp, key, parts, writer, tokenized)
        sync_tree(tmp)
        os.replace(tmp, entry)
    except OSError as err:
        if is_disk_full(err, tmp.parent):
            raise UserError(disk_full_message("the tokenized data", tmp.parent, None) + " Or set data.cache_dir "
                            "to a disk with room.") from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _finish(tmp: Path, key: str, parts: dict, writer: _ExampleWriter, tokenized: Tokenized) -> None:
    offsets = np.zeros(len(writer.lengths) + 1, dtype=np.int64)
    np.cumsum(np.frombuffer(writer.lengths, dtype=np.int32), out=offsets[1:])
    lengths = np.diff(offsets)
    trained = np.frombuffer(writer.trained_counts, dtype=np.int32)
    val = np.asarray(tokenized.val_indices, dtype=np.int64)
    train = np.setdiff1d(np.arange(len(lengths), dtype=np.int64), val, assume_unique=True)
    np.savez(tmp / "index.npz", offsets=offsets, rows=np.frombuffer(writer.rows, dtype=np.int64), train=train, val=val)
    stats = data_stats(tokenized, lengths[train], trained[train], lengths[val])
    meta = {"key": key, "id_dtype": writer.id_dtype.name, "parts": parts, "stats": dataclasses.asdict(stats)}
    atomic_write_text(tmp / META_NAME, json.dumps(meta, indent=1, default=str))


class _ExampleWriter:
    """Appends tokenized examples to ids.bin and trained.bin; keeps only per-example numbers in memory."""

    def __init__(self, folder: Path, id_dtype):
        self.folder, self.id_dtype = folder, np.dtype(id_dtype)
        self.lengths, self.trained_counts, self.rows = array("i"), array("i"), array("q")

    def __enter__(self):
        self._ids = open(self.folder / "ids.bin", "wb")
        self._trained = open(self.folder / "trained.bin", "wb")
        return self

    def __exit__(self, *exc) -> None:
        self._ids.close()
        self._trained.close()

    def add(self, examples: list[Example]) -> None:
        if not examples:
            return
        ids, labels = array("q"), array("q")
        for e in examples:  # array.extend runs in C: far faster than numpy from a generator
            ids.extend(e.input_ids)
            labels.extend(e.labels)
        ids, labels = np.frombuffer(ids, dtype=np.int64), np.frombuffer(labels, dtype=np.int64)
        trained = labels != IGNORE_INDEX
        if not np.array_equal(labels[trained], ids[trained]):  # the format stores a mask, not the labels
            raise AssertionError("a trained label differs from its token id; the cache cannot store it")
        self._ids.write(ids.astype(self.id_dtype).tobytes())
        self._trained.write(trained.astype(np.uint8).tobytes())
        self.lengths.extend(len(e) for e in examples)
        self.trained_counts.extend(e.num_trained for e in examples)
        self.rows.extend(e.row_index for e in examples)


# --------------------------------------------------------------------------------------------------------------
# Bounding the folder


def _metas(root: Path) -> list[dict]:
    found = []
    for folder in root.iterdir() if root.is_dir() else []:
        with contextlib.suppress(OSError, ValueError):
            if not folder.name.startswith("."):
                found.append(json.loads((folder / META_NAME).read_text(encoding="utf-8")))
    return found


def _bound(root: Path, keep: Path, limit: int = KEEP_ENTRIES) -> None:
    """Remove the least recently used entries beyond `limit` (never `keep`). A run still reading a removed entry
    is unharmed: its memory maps hold the files until it ends."""
    entries = [f for f in root.iterdir() if not f.name.startswith(".") and (f / META_NAME).is_file() and f != keep]
    entries.sort(key=lambda f: (f / META_NAME).stat().st_mtime, reverse=True)
    for old in entries[max(0, limit - 1):]:
        shutil.rmtree(old, ignore_errors=True)


def cache_size(root: Path) -> int:
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) if root.is_dir() else 0

