"""The output folder's rules: what a run may write where, its lock, the leftovers of killed runs, and the final
result published as one atomic swap. The names in it are lora_cli/layout.py's; what it holds is read by snapshot.scan.

While training, only checkpoints and the live log under runs/ are written into output_dir; an older result there
stays untouched until the new one is complete. The result is then built in a hidden sibling folder, the entries of
output_dir that are not part of any result (this run's checkpoints, runs/, files of your own) are hard-linked in
(copied where links are refused), and the sibling is swapped with output_dir (fsutil.replace_dir). Readers see the
old folder or the new one, never a mix; a kill at any moment leaves one of them plus a hidden leftover that the
next run removes (or, for a complete result that was not swapped in yet, swaps in).
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import shutil
import stat
import time
from pathlib import Path
from typing import Callable

from ..errors import UserError
from ..fsutil import (
    TempName,
    atomic_write_text,
    check_can_create,
    disk_full_message,
    follow_link,
    is_disk_full,
    is_within,
    link_tree,
    make_temp_dir,
    parse_temp_name,
    recover_dir,
    replace_dir,
    sync_tree,
    take_lock,
    temp_name,
)
from ..layout import KNOWN_RESULT_NAMES, MANIFEST_NAME, checkpoint_step
from .snapshot import list_checkpoints

PUBLISH_TAG = "publish-"  # the hidden sibling the result is built in: .<output_dir>.publish-<random>.tmp


def _ready_path(out: Path) -> Path:
    return out.with_name(temp_name(out) + "ready")


# --- checks before anything is loaded --------------------------------------------------------------------------


def resolve_output_dir(output_dir: str) -> Path:
    """train.output_dir as the folder the result replaces: `~` expanded, absolute, and a symbolic link followed to
    its target (a link to a Drive folder on Colab: the result goes to Drive, the link stays a link)."""
    out = follow_link(output_dir)
    cwd = Path.cwd().resolve()
    if is_within(cwd, out):
        where = "is" if cwd == out.resolve() else "contains"
        raise UserError(
            f"train.output_dir '{output_dir}' {where} the folder lora-train runs in ({cwd}). The result replaces "
            "output_dir as a whole, so give it a folder of its own, e.g. train.output_dir=outputs/run1."
        )
    return out


def check_location(out: Path, model_path: str, data_paths: list[str]) -> None:
    """Refuse an output_dir that is a file, not writable, or entangled with the base model or the data."""
    if out.exists() and not out.is_dir():
        raise UserError(f"train.output_dir '{out}' exists and is not a folder; choose another train.output_dir.")
    check_can_create(out, "train.output_dir")
    model = Path(model_path).expanduser()
    if model.is_dir() and (is_within(out, model) or is_within(model, out)):
        relation = "is" if out.resolve() == model.resolve() else ("is inside" if is_within(out, model) else "contains")
        raise UserError(
            f"train.output_dir '{out}' {relation} the base model folder '{model_path}'. Writing an adapter there "
            "would make transformers load the adapter whenever it loads the base. Choose another train.output_dir."
        )
    for data_path in data_paths:
        data = Path(data_path).expanduser()
        if data.exists() and is_within(data, out):
            raise UserError(
                f"train.output_dir '{out}' contains the data '{data_path}', which replacing the folder would move. "
                "Choose another train.output_dir."
            )
        if data.is_dir() and is_within(out, data):
            raise UserError(
                f"train.output_dir '{out}' is inside the data folder '{data_path}': the next run would read its "
                "checkpoints and logs as training data. Choose a train.output_dir outside it."
            )


# --- locking and leftovers -------------------------------------------------------------------------------------


def lock(out: Path) -> Callable[[], None]:
    """Hold an exclusive lock on output_dir for the run (released when the process ends, also by kill -9), so two
    runs (or a run and a lora-merge) never write into one folder and the leftovers cleaned up at start are surely
    dead ones. The lock file lies beside output_dir (`.<name>.lock`), since output_dir itself is swapped when the
    result is published. Returns the function that releases it."""
    handle = take_lock(out, lambda holder: f"train.output_dir '{out}' is in use by another lora-train run or "
                                           f"lora-merge ({holder}). Wait for it to finish, or choose another "
                                           "train.output_dir.")
    return handle.close if handle is not None else (lambda: None)  # no locks on this filesystem: run unlocked


def recover(out: Path, log: Callable[[str], None]) -> None:
    """Finish or undo what a killed run left, touching only names lora-train itself makes (call it holding the lock):
    a complete result not yet swapped in is swapped in (it is newer than what output_dir holds); a checkpoint whose
    replacement was cut between its two renames gets its old, complete copy back; temporary folders are removed."""
    ready = _ready_path(out)
    if ready.is_dir():
        if not out.exists() or _published_at(ready) > _published_at(out):
            log(f"note: completing the final save of an interrupted run into {out}")
            if out.exists():
                replace_dir(ready, out)
            else:
                recover_dir(out, ready)
        else:
            shutil.rmtree(ready, ignore_errors=True)
    recover_dir(out, ready)
    if out.parent.is_dir():
        for leftover in out.parent.iterdir():
            if parse_temp_name(leftover.name) == TempName(out.name, PUBLISH_TAG):
                shutil.rmtree(leftover, ignore_errors=True)
    if out.is_dir():
        _recover_checkpoints(out)


def _checkpoint_leftover(name: str) -> TempName | None:
    """The temporary name of a checkpoint-<step> folder (atomic_dir's), parsed; None for any other name."""
    parsed = parse_temp_name(name)
    return parsed if parsed is not None and checkpoint_step(parsed.target) is not None else None


def _recover_checkpoints(out: Path) -> None:
    for leftover in list(out.iterdir()):
        parsed = _checkpoint_leftover(leftover.name)
        if parsed is None or not leftover.is_dir():
            continue
        final = out / parsed.target
        if parsed.is_old_copy and not final.exists():
            os.replace(leftover, final)  # the complete old copy of a checkpoint whose replacement was cut short
        else:
            shutil.rmtree(leftover, ignore_errors=True)


def _published_at(folder: Path) -> int:
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        return int(json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8"))["published_at"])
    return 0


# --- publishing the result -------------------------------------------------------------------------------------


def publish(out: Path, write: Callable[[Path], None], run_id: str, needed_bytes: int,
            later: tuple[str, ...] = ()) -> None:
    """Build the result with `write(folder)` in a hidden sibling, carry over what is not part of any result, and swap
    it in as output_dir. Nothing in output_dir changes unless all of it succeeds. `later`: names the run adds to the
    result after publishing (merged/), listed in the manifest so that a later run replaces them too."""
    stage = make_temp_dir(out, tag=PUBLISH_TAG)
    try:
        if out.is_dir():  # the new folder takes the old one's place: keep its permissions and owner (setgid too)
            _same_mode_and_owner(stage, out)
        write(stage)
        names = sorted({p.name for p in stage.iterdir()} | set(later))
        manifest = {"published_at": time.time_ns(), "run_id": run_id, "names": names}
        atomic_write_text(stage / MANIFEST_NAME, json.dumps(manifest, indent=2) + "\n")
        sync_tree(stage)
        if out.is_dir():
            _carry_over(out, stage, set(names) | {MANIFEST_NAME}, run_id)
        ready = _ready_path(out)
        shutil.rmtree(ready, ignore_errors=True)
        os.replace(stage, ready)  # the commit point: from here on a later run completes the swap if this one dies
        replace_dir(ready, out)
    except Exception as err:  # safetensors, tokenizers and torch raise their own types for a full disk
        if is_disk_full(err, out.parent):
            raise UserError(disk_full_message("the final adapter", out, needed_bytes) + " The previous contents of "
                            "the folder are intact, and so are this run's checkpoints (resume with "
                            "train.resume_from_checkpoint=auto).") from None
        raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _same_mode_and_owner(folder: Path, like: Path) -> None:
    info = like.stat()
    os.chmod(folder, stat.S_IMODE(info.st_mode))
    with contextlib.suppress(OSError):  # another owner needs privileges; the mode is what matters most
        os.chown(folder, info.st_uid, info.st_gid)


def _carry_over(out: Path, stage: Path, new_names: set[str], run_id: str) -> None:
    stale = _old_result_names(out)
    others = {c.path.name for c in list_checkpoints(out) if c.run_id != run_id}  # not part of this result
    for entry in out.iterdir():
        name = entry.name
        if name in new_names or name in stale or name in others or _checkpoint_leftover(name):
            continue
        link_tree(entry, stage / name)


def _old_result_names(out: Path) -> set[str]:
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        return set(json.loads((out / MANIFEST_NAME).read_text(encoding="utf-8"))["names"])
    return {p.name for p in out.iterdir() if any(fnmatch.fnmatch(p.name, pat) for pat in KNOWN_RESULT_NAMES)}
