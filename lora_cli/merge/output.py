"""Where lora-merge writes: the output folder checked before any slow work, guarded while the merge runs (a lock,
a killed merge's leftovers removed, SIGTERM unwinding like Ctrl-C) and every failed write one message."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import threading
from pathlib import Path
from typing import Callable

from ..errors import Terminated, UserError
from ..fsutil import (
    check_can_create,
    free_bytes,
    is_disk_full,
    is_within,
    lock_path_of,
    remove_stale_temp_dirs,
    size_text,
    take_lock,
)


def check_output_dir(output_dir: Path, overwrite: bool, protected: list[Path] = ()) -> None:
    """Refuse an unusable output path before any expensive work (atomic_dir checks again when writing)."""
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"Output path {output_dir} exists and is not a folder; choose another output path.")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise UserError(f"Output folder {output_dir} already exists and is not empty; pass --overwrite to replace it.")
    for other in protected:
        if other.exists() and is_within(other, output_dir):
            raise UserError(
                f"Output folder {output_dir} would replace {other}, which the merge reads from; choose another "
                "output folder."
            )
    check_can_create(output_dir, "the output folder")


@contextlib.contextmanager
def write_errors_reported(out_dir: Path, needed: int):
    """A failed write of the merged model as one message (exit 2): safetensors and tokenizers report a full disk with
    types of their own, in the system's words."""
    try:
        yield
    except UserError:
        raise
    except Exception as err:
        if isinstance(err, OSError) or is_disk_full(err):
            raise write_error(out_dir, err, needed) from None
        raise


class NewParentFolders(contextlib.AbstractContextManager):
    """The folders that do not exist yet above `path` (made later by the merge) are removed again, deepest first,
    if the block fails; `folders` lists them."""

    def __init__(self, path: Path):
        self.folders, parent = [], path.parent
        while not parent.exists() and parent != parent.parent:
            self.folders.append(parent)
            parent = parent.parent

    def __exit__(self, kind, value, traceback):
        if kind is not None:
            for folder in self.folders:  # stops at the first one that is not empty
                try:
                    folder.rmdir()
                except OSError:
                    break
        return False


def check_free_space(out_dir: Path, needed: int) -> None:
    """Refuse before writing a merged model the disk cannot hold (when its free space is known)."""
    free = free_bytes(out_dir)
    if free is not None and free < needed:
        raise write_error(out_dir, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), needed)


def write_error(out_dir: Path, err: Exception, needed: int) -> UserError:
    """The message for a failed write (the partial output is already gone: atomic_dir removed it)."""
    if is_disk_full(err, out_dir):
        free = free_bytes(out_dir)
        have = f" and {size_text(free)} are free" if free is not None else ""
        return UserError(
            f"Not enough disk space for the merged model in {out_dir}: it needs about {size_text(needed)}{have}. "
            "Free some space or choose another output folder; nothing was written."
        )
    return UserError(f"Writing the merged model to {out_dir} failed: {err}. Nothing was written.")


@contextlib.contextmanager
def output_guarded(output_dir: Path, log: Callable[[str], None]):
    """While merging into `output_dir`: no other lora-merge (or lora-train) writes it, the temporary folders a
    killed merge left beside it are removed, and SIGTERM unwinds like Ctrl-C, so atomic_dir removes this merge's own
    partial folder (an 8B merge leaves 16 GB). A lock rather than "remove temps whose owner is dead": atomic_dir's
    names do not carry a pid, and a pid can be reused; the kernel drops a lock with its process, kill -9 too.

    The folders above `output_dir` are created first, so that every merge can lock (one that could not, because its
    parent did not exist yet, would write unlocked while a later one cleaned up its temporary folder); if the merge
    fails, those it created are removed again. The lock file is removed when the merge ends, so none is left beside
    the merged folder (or inside lora-train's output_dir for train.merge_at_end)."""
    created = NewParentFolders(output_dir)
    with created:
        handle = take_lock(output_dir, lambda holder: (
            f"Output folder {output_dir} is being written by another lora-merge or lora-train ({holder}; its lock "
            f"is {lock_path_of(output_dir)}). Wait for it to finish, or choose another output folder."))
        try:
            with _sigterm_unwinds():
                if handle is not None:  # only a lock holder may remove anything
                    for leftover in remove_stale_temp_dirs(output_dir):
                        log(f"note: removed {leftover}, left by an interrupted merge into {output_dir}")
                yield
        finally:
            if handle is not None:  # removed while still held (take_lock's check makes that safe), then released
                with contextlib.suppress(OSError):
                    lock_path_of(output_dir).unlink()
                handle.close()


@contextlib.contextmanager
def _sigterm_unwinds():
    """SIGTERM (Colab/Kaggle ending a session, `kill`, a job scheduler) raises Terminated, Ctrl-C's path. Only where
    nobody else handles SIGTERM (lora-train's merge_at_end runs under its own handler) and only in the main thread
    (the only one that can set handlers). A repeated SIGTERM is ignored so that the cleanup itself finishes."""
    previous = signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is not threading.main_thread() or previous not in (signal.SIG_DFL, None):
        yield
        return

    def terminate(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated()

    signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
