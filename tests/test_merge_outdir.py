"""lora-merge's OUTPUT_DIR: a symbolic link is written through (the Colab Drive case), and an interrupted merge
leaves no hidden temporary folder behind, or the next merge into the same folder removes it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_merge import assert_close, base_plus_adapter, load, logits, make_our_adapter, merge


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("overwrite", [False, True], ids=["new folder", "--overwrite"])
def test_a_linked_output_dir_is_written_through_and_stays_a_link(tiny_model_dir, tmp_path, overwrite):
    base_dir = tiny_model_dir("llama")
    adapter = make_our_adapter(base_dir, tmp_path / "adapter")
    drive, work = tmp_path / "drive", tmp_path / "work"
    drive.mkdir()
    work.mkdir()
    if overwrite:
        (drive / "merged").mkdir()
        (drive / "merged" / "old.txt").write_text("old")
    link = work / "linkout"
    link.symlink_to(drive / "merged" if overwrite else drive)
    target = (drive / "merged") if overwrite else drive

    result = merge(adapter, link, *(["--overwrite"] if overwrite else []))

    assert result.exit_code == 0, result.output
    assert link.is_symlink() and link.resolve() == target.resolve()
    assert (target / "config.json").is_file() and (target / "model.safetensors").is_file()
    assert not (target / "old.txt").exists()
    assert sorted(p.name for p in work.iterdir()) == ["linkout"]  # no stray temporary link or folder
    assert hidden(target.parent) == []
    assert_close(logits(load(link)), logits(base_plus_adapter(base_dir, adapter)), 1e-4)
