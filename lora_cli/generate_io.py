"""lora-generate's files: the prompts it reads (--prompt, --prompt-file) and the answers it writes (--output), each
checked before the model loads, and every OS refusal (permissions, a full disk) a one-paragraph error."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Iterator, TextIO

from .errors import UserError


def read_prompt_file(path: str | Path) -> list[str]:
    """One prompt per line, or JSONL with a "prompt" (or "question") field per line. Blank lines are skipped.

    The file is JSONL when it ends in .jsonl/.json or its first non-blank line starts with "{".
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"Prompt file {path} does not exist (or is not a file).")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise UserError(f"Prompt file {path} is not UTF-8 text ({err}).") from None
    numbered = [(n, line) for n, line in enumerate(lines, start=1) if line.strip()]
    if not numbered:
        raise UserError(f"Prompt file {path} has no prompts (it is empty).")
    is_jsonl = path.suffix.lower() in (".jsonl", ".json") or numbered[0][1].lstrip().startswith("{")
    if not is_jsonl:
        return [line for _, line in numbered]
    prompts = []
    for number, line in numbered:
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{path} line {number} is not valid JSON ({err.msg}); the file looks like JSONL.") from None
        field_name = next((k for k in ("prompt", "question") if isinstance(row, dict) and k in row), None)
        if field_name is None or not isinstance(row[field_name], str):
            raise UserError(
                f"{path} line {number} needs a string field \"prompt\" (or \"question\"), e.g. "
                '{"prompt": "What is LoRA?"}; for plain text use one prompt per line.'
            )
        if not row[field_name].strip():
            raise UserError(f"{path} line {number} has an empty \"{field_name}\"; give each line a prompt to answer "
                            "(or remove the line).")
        prompts.append(row[field_name])
    return prompts


def check_prompt(prompt: str | None) -> None:
    """An empty --prompt gives the model no tokens to start from (without a chat template or bos): refuse it
    before the model loads."""
    if prompt is not None and not prompt.strip():
        raise UserError("--prompt is empty; give the text to answer, e.g. --prompt \"What is LoRA?\".")


def check_output_file(path: str | Path | None, prompt_file: str | Path | None = None) -> None:
    """Refuse an unusable --output before the model loads, among them the prompt file itself (opening it for
    writing would empty it)."""
    if path is None:
        return
    path = Path(path)
    if prompt_file is not None and _same_file(path, Path(prompt_file)):
        raise UserError(f"--output {path} is the --prompt-file itself; writing the answers there would erase the "
                        "prompts. Choose another --output file.")
    if path.is_dir():
        raise UserError(f"--output {path} is a folder; pass a file path.")
    parent = path.parent
    if not parent.is_dir():
        raise UserError(f"--output {path}: folder {parent} does not exist (or is not a folder).")
    # An existing file is overwritten in place (its folder's permissions do not matter); a new one is created.
    if not os.access(path if path.exists() else parent, os.W_OK):
        raise UserError(f"--output {path} is not writable; choose another path.")


def _same_file(a: Path, b: Path) -> bool:
    """Also through a symlink, a hard link or another spelling of the path."""
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
        return a.resolve() == b.resolve()
    except OSError:
        return False


@contextlib.contextmanager
def open_output(path: str | Path) -> Iterator[TextIO]:
    """--output opened for writing, as a context; an OS refusal (permissions, a read-only or full disk) at open,
    write or close is a UserError."""
    try:
        out = open(path, "w", encoding="utf-8")
    except OSError as err:
        raise UserError(f"Cannot write --output {path}: {err.strerror or err}. Choose another path.") from None
    try:
        yield out
    except BaseException:
        with contextlib.suppress(OSError):  # closing retries a failed flush; the error in flight says more
            out.close()
        raise
    try:
        out.close()
    except OSError as err:
        raise _write_error(path, err) from None


def write_record(out: TextIO, prompt: str, response: str) -> dict:
    """One JSONL line {"prompt", "response"}, flushed so partial results survive an interruption."""
    record = {"prompt": prompt, "response": response}
    try:
        out.write(json.dumps(record, ensure_ascii=False) + "\n")
        out.flush()
    except OSError as err:  # a full disk shows up here, at the flush
        raise _write_error(getattr(out, "name", "the output"), err) from None
    return record


def _write_error(name, err: OSError) -> UserError:
    return UserError(
        f"Writing the answers to {name} failed: {err.strerror or err}. The lines before this answer are complete; "
        "free some space (or choose another --output) and rerun."
    )
