"""Atomic writes: a file or folder appears complete under its final name, or not at all.

Files and folders are first written under a temporary name beside their destination (same filesystem, so the
final rename is atomic), synced to disk, and given the modes a plain open()/mkdir() would give (tempfile's are
private, 0600/0700, which a serving process under another account cannot read). A folder that replaces an older
one is swapped in with one renameat2(RENAME_EXCHANGE) where the filesystem has it, so readers see the old folder
or the new one and never a moment without either; elsewhere two renames, with `recover_dir` finishing the job
after a crash between them.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from .errors import UserError

TMP_SUFFIX = ".tmp"
OLD_SUFFIX = ".old"
_REPLACED = "replaced" + OLD_SUFFIX  # replace_dir's old copy: .NAME.replaced.old


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_mode() -> int:
    return 0o666 & ~_umask()


def dir_mode() -> int:
    return 0o777 & ~_umask()


def temp_name(path: Path) -> str:
    """The prefix of temporary names for `path` (hidden, so listings and globs of final names skip them)."""
    return f".{path.name}."


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it onto `path` (replacing any old file)."""
    path = Path(path)
    if not path.parent.is_dir():  # never re-create a folder that vanished (a temporary one someone removed)
        raise FileNotFoundError(errno.ENOENT, "the folder to write into does not exist", str(path.parent))
    fd, tmp = tempfile.mkstemp(prefix=temp_name(path), suffix=TMP_SUFFIX, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, file_mode())
        _fsync_file(tmp_path)
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextlib.contextmanager
def atomic_dir(path: str | Path, overwrite: bool = False, flag: str = "--overwrite") -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success it replaces `path` as a whole.

    An existing non-empty `path` is refused unless `overwrite`; an interrupted write leaves `path` untouched.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"Output path {path} exists and is not a folder; choose another output path.")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise UserError(f"Output folder {path} already exists and is not empty; pass {flag} to replace it.")
    _ensure_writable_dir(path.parent)
    tmp = make_temp_dir(path)
    try:
        yield tmp
        sync_tree(tmp)
        replace_dir(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def old_copy_path(path: Path) -> Path:
    """Where replace_dir keeps `path`'s old folder between its two renames (without renameat2's exchange)."""
    return path.with_name(temp_name(path) + _REPLACED)


def make_temp_dir(path: Path, tag: str = "") -> Path:
    """An empty folder beside `path` with a hidden temporary name (and the mode a plain mkdir gives)."""
    tmp = Path(tempfile.mkdtemp(prefix=temp_name(path) + tag, suffix=TMP_SUFFIX, dir=path.parent))
    os.chmod(tmp, dir_mode())
    return tmp


# tempfile.mkdtemp's random part (tempfile._RandomNameSequence): 8 of these characters. atomic_dir(path) names its
# temporary folder `.NAME.<random>.tmp`; lora-train's own temporaries beside its output_dir carry a tag
# (`.NAME.publish-<random>.tmp`, `.NAME.ready`).
_RANDOM_PART = re.compile("[a-z0-9_]{8}")


@dataclass(frozen=True)
class TempName:
    """A temporary name this module made beside `target`: `.TARGET.<tag><random>.tmp` (atomic_file, atomic_dir,
    make_temp_dir; tag "" unless make_temp_dir was given one) or `.TARGET.replaced.old` (replace_dir's old copy,
    tag "replaced")."""

    target: str
    tag: str

    @property
    def is_old_copy(self) -> bool:
        return self.tag == "replaced"


def parse_temp_name(name: str) -> TempName | None:
    """The inverse of the temporary names made here (see TempName); None for any other name."""
    if not name.startswith("."):
        return None
    if name.endswith("." + _REPLACED) and len(name) > len(_REPLACED) + 2:
        return TempName(name[1 : -len(_REPLACED) - 1], "replaced")
    if not name.endswith(TMP_SUFFIX):
        return None
    target, _, rest = name[1 : -len(TMP_SUFFIX)].rpartition(".")
    if not target or not _RANDOM_PART.fullmatch(rest[-8:]):
        return None
    return TempName(target, rest[:-8])


def remove_stale_temp_dirs(path: Path) -> list[Path]:
    """Remove what atomic_dir(path) leaves when its process is killed (SIGKILL, a power cut): its hidden temporary
    folders beside `path`, only under the exact names it makes. Call it only while holding `take_lock(path)`,
    so that no live writer's folder is among them. After a kill between replace_dir's two renames `path` is gone
    and its previous, complete contents wait as `.NAME.replaced.old`: they are put back (the new folder cannot be
    told apart from a partial one). Returns the folders removed."""
    old = old_copy_path(path)
    if old.is_dir() and not path.exists():
        os.replace(old, path)
    removed = [old] if old.is_dir() else []
    if path.parent.is_dir():
        removed += [p for p in path.parent.iterdir()
                    if parse_temp_name(p.name) == TempName(path.name, "") and p.is_dir() and not p.is_symlink()]
    for folder in removed:
        shutil.rmtree(folder, ignore_errors=True)
    return removed


def lock_path_of(path: Path) -> Path:
    """`.NAME.lock` beside `path`: the one lock file lora-train and lora-merge both take before writing `path`."""
    return path.with_name(temp_name(path) + "lock")


def take_lock(path: Path, busy: Callable[[str], str]):
    """Lock writing `path` exclusively (non-blocking) through lock_path_of(path), and write this pid into it. The
    kernel drops the lock when the process ends, also by SIGKILL, so leftovers found while holding it are surely a
    dead writer's. Returns the open lock file (close it to release), or None on a filesystem without locks (some
    network/FUSE mounts). While another process holds it: UserError(busy(what the lock file says of its holder,
    "pid N")). The folder above `path` is created first, to hold the lock file. A holder may remove the file
    before it releases the lock: a process that opened it just before then locks a deleted file, which guards
    nothing, so every taker checks that the file it locked is still the one at that path, and retries if not."""
    import fcntl

    lock_path = lock_path_of(path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        handle = open(lock_path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise UserError(busy(_lock_holder(lock_path))) from None
        except OSError:
            handle.close()
            return None
        with contextlib.suppress(OSError):
            if os.fstat(handle.fileno()).st_ino == os.stat(lock_path).st_ino:
                break
        handle.close()
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}\n")
    handle.flush()
    return handle


def _lock_holder(lock_path: Path) -> str:
    with contextlib.suppress(OSError):
        return lock_path.read_text(encoding="utf-8").strip() or "another process"
    return "another process"


# --- swapping folders ------------------------------------------------------------------------------------------

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux renameat2 RENAME_EXCHANGE). False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    result = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
        return False  # the filesystem (or an old kernel) cannot exchange: fall back to two renames
    raise OSError(code, os.strerror(code), str(a))


def replace_dir(new: Path, path: Path) -> None:
    """Put the complete folder `new` at `path`, replacing any folder there; the old one is deleted."""
    if not path.exists():
        os.replace(new, path)
        _fsync_dir(path.parent)
        return
    if exchange(new, path):  # `new` now holds the old folder
        _fsync_dir(path.parent)
        shutil.rmtree(new, ignore_errors=True)
        return
    old = old_copy_path(path)
    shutil.rmtree(old, ignore_errors=True)
    os.replace(path, old)
    os.replace(new, path)  # a crash just before this line leaves `old` and `new`: recover_dir puts `new` back
    _fsync_dir(path.parent)
    shutil.rmtree(old, ignore_errors=True)


def recover_dir(path: Path, ready: Path) -> None:
    """After a crash between replace_dir's two renames: `path` is gone, `ready` is the complete new folder."""
    if not path.exists() and ready.is_dir():
        os.replace(ready, path)
    shutil.rmtree(old_copy_path(path), ignore_errors=True)


def link_tree(src: Path, dst: Path) -> None:
    """Recreate `src` at `dst` with hard links to its files (no data copied); copy where links are refused."""
    if src.is_dir() and not src.is_symlink():
        dst.mkdir(mode=dir_mode())
        for child in src.iterdir():
            link_tree(child, dst / child.name)
        return
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:  # another filesystem, or one without hard links (e.g. some FUSE mounts): copy instead
        shutil.copy2(src, dst, follow_symlinks=False)


# --- durability ------------------------------------------------------------------------------------------------


def sync_tree(folder: Path) -> None:
    """fsync every file and folder under `folder`, so a rename that publishes it never exposes empty files."""
    for root, _, files in os.walk(folder):
        for name in files:
            _fsync_file(Path(root) / name)
        _fsync_dir(Path(root))


def _fsync_file(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem can fsync a folder
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# --- checks and messages ---------------------------------------------------------------------------------------


_DISK_FULL_WORDS = ("no space left on device", "disk quota exceeded")


def is_disk_full(err: BaseException, folder: Path | None = None) -> bool:
    """Whether a write failed for want of space. Not only OSError: safetensors, tokenizers (Rust) and torch's zip
    writer raise types of their own with the system's words in the message, or (torch) a bare "unexpected pos"
    for a short write, which counts when `folder`'s disk is (nearly) full."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(err).lower()
    if any(words in text for words in _DISK_FULL_WORDS):
        return True
    if folder is not None and "unexpected pos" in text:
        free = free_bytes(folder)
        return free is not None and free < 2**20
    return False


def free_bytes(folder: Path) -> int | None:
    """Free space on the disk that holds `folder` (or would: its nearest existing ancestor); None if unknown."""
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            with contextlib.suppress(OSError):
                return shutil.disk_usage(candidate).free
            return None
    return None


def size_text(n: int | float) -> str:
    """A size for a message: GB from 10^9 bytes, else MB, two decimals (the units disks are sold in)."""
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.2f} MB"


def disk_full_message(what: str, folder: Path, needed: int | None) -> str:
    free = free_bytes(folder)
    need = f" It needs about {size_text(needed)} free" if needed else " Free some space"
    have = f"; {size_text(free)} are free there now" if free is not None else ""
    return f"Writing {what} to {folder} failed: the disk is full.{need}{have}. Free space or choose another folder."


def check_can_create(folder: Path, what: str) -> None:
    """Refuse early (before any slow work) a folder that cannot be created or replaced: its nearest existing
    ancestor outside it must be a writable folder (temporary siblings are made there), and so must it, if it exists."""
    ancestor = folder.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"Cannot create {what} {folder}: {ancestor} is a file, not a folder. Choose another path.")
    for place in (ancestor, folder) if folder.is_dir() else (ancestor,):
        if not os.access(place, os.W_OK | os.X_OK):
            raise UserError(f"Cannot write {what} {folder}: folder {place} is not writable. Choose a writable path.")


def follow_link(path: str | Path) -> Path:
    """An output folder as the folder that gets replaced: `~` expanded, absolute, and a symbolic link followed to its
    target. Replacing the link itself would put the output on the local disk and drop the link (on Colab, a link to
    a Drive folder: the result must go to Drive and the link stay a link)."""
    out = Path(os.path.abspath(Path(path).expanduser()))
    return out.resolve() if out.is_symlink() else out


def is_within(inner: Path, outer: Path) -> bool:
    """Whether `inner` is `outer` or lies inside it (after resolving links)."""
    try:
        inner.resolve().relative_to(outer.resolve())
        return True
    except ValueError:
        return False


def _ensure_writable_dir(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"Cannot create folder {folder}: {err.strerror}. Choose a writable output path.") from None
    if not os.access(folder, os.W_OK):
        raise UserError(f"Folder {folder} is not writable; choose a writable output path.")
