"""Atomic writes: a file or folder appears complete under its final name, or not at all."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import UserError


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it onto `path` (replacing any old file)."""
    path = Path(path)
    _ensure_writable_dir(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextlib.contextmanager
def atomic_dir(path: str | Path, overwrite: bool = False, flag: str = "--overwrite") -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success it replaces `path`.

    An existing non-empty `path` is refused unless `overwrite`; an interrupted write leaves `path` untouched.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"Output path {path} exists and is not a folder; choose another output path.")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise UserError(f"Output folder {path} already exists and is not empty; pass {flag} to replace it.")
    _ensure_writable_dir(path.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _ensure_writable_dir(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"Cannot create folder {folder}: {err.strerror}. Choose a writable output path.") from None
    if not os.access(folder, os.W_OK):
        raise UserError(f"Folder {folder} is not writable; choose a writable output path.")
