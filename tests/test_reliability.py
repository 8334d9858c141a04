"""Bad input of every kind ends in exit code 2 and a message that names the file, key or tensor and the fix:
damaged base weights, wrong-typed adapter_config.json fields, non-finite adapters, square brackets in user text,
data with nothing to train and booleans given for numbers (issue 9, items 5, 6, 7 and 9)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import get_args, get_origin

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import tiny
from lora_cli import data
from lora_cli.adapter import CONFIG_NAME, WEIGHTS_NAME, load_adapter
from lora_cli.cli import generate_app, main_app, merge_app, train_app
from lora_cli.config import Config, validate_config
from lora_cli.data import IGNORE_INDEX
from lora_cli.errors import UserError
from lora_cli.inject import lora_layers
from lora_cli.models import load_base_model, load_tokenizer
from test_lora import assert_close, logits, randomise_lora
from test_merge import make_our_adapter

runner = CliRunner()


def invoke(app, *args):
    return runner.invoke(app, [str(a) for a in args])


def assert_exit_2(result, *fragments: str):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and not isinstance(result.exception, (ValueError, TypeError))
    for fragment in fragments:
        assert fragment in result.output, (fragment, result.output)


def copy_model(tiny_model_dir, tmp_path, name="base") -> Path:
    return Path(shutil.copytree(tiny_model_dir("llama"), tmp_path / name))


def cut_in_half(file: Path) -> None:
    content = file.read_bytes()
    file.write_bytes(content[: len(content) // 2])


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def train_config(tmp_path: Path, model_dir: Path, rows=None, **sections) -> Path:
    rows = rows or [{"text": f"the lighthouse is green {i}"} for i in range(4)]
    config = {
        "model": {"name_or_path": str(model_dir)},
        "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "data": {"path": str(write_jsonl(tmp_path / "data.jsonl", rows)), "max_length": 32},
        "train": {"output_dir": str(tmp_path / "out"), "max_steps": 1, "micro_batch_size": 2},
    }
    for section, values in sections.items():
        config[section].update(values)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


# --- item 6: square brackets are text, not markup ------------------------------------------------------------


def test_config_error_keeps_its_brackets(tiny_model_dir, tmp_path):
    config = train_config(tmp_path, tiny_model_dir("llama"), lora={"target_modules": "q_proj,v_proj"})
    result = invoke(train_app, config)
    assert_exit_2(result, "write it as [q_proj, v_proj] (got 'q_proj,v_proj')")


def test_override_error_keeps_its_brackets(tiny_model_dir, tmp_path):
    result = invoke(train_app, train_config(tmp_path, tiny_model_dir("llama")), "lora.target_modules")
    assert_exit_2(result, "lora.target_modules=[q_proj,v_proj]")


def test_error_about_a_path_with_markup_prints_verbatim(tmp_path):
    missing = tmp_path / "x[/x]y[bold]z"
    result = invoke(merge_app, missing, tmp_path / "merged")
    assert_exit_2(result, f"Adapter folder {missing} does not exist")


def test_merge_into_a_path_with_markup(tiny_model_dir, tmp_path):
    adapter = make_our_adapter(tiny_model_dir("llama"), tmp_path / "adapter")
    out = tmp_path / "out[/x]" / "m[bold]x"
    result = invoke(merge_app, adapter, out, "--no-verify")
    assert result.exit_code == 0, result.output
    assert f"merged model saved to {out}" in result.output
    assert (out / "config.json").is_file()


def test_help_of_python_m_lora_cli_keeps_its_brackets():
    result = runner.invoke(main_app, ["train", "--help"])
    assert result.exit_code == 0 and "lora.target_modules=[q_proj,v_proj]" in result.output
