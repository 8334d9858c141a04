"""The Python API (lora_cli.train, estimate, merge, generate): results, files, override semantics, and the same
errors as the commands, raised as UserError."""

from __future__ import annotations

import copy
import importlib
import inspect
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import lora_cli
from lora_cli.cli import generate_app, merge_app, train_app
from lora_cli.config import build_config
from lora_cli.errors import UserError

REPO = Path(__file__).resolve().parent.parent
ROWS = [{"text": f"the lighthouse of quillhaven is painted green {i % 3}"} for i in range(8)]


def config_dict(tmp_path: Path, model_dir: Path, **sections) -> dict:
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    cfg = {
        "model": {"name_or_path": str(model_dir)},
        "lora": {"r": 4, "alpha": 8, "target_modules": "all-linear"},
        "data": {"path": str(data), "max_length": 32},
        "train": {"output_dir": str(tmp_path / "out"), "max_steps": 3, "micro_batch_size": 4, "logging_steps": 1,
                  "learning_rate": 1e-2, "warmup_ratio": 0.0, "seed": 0},
    }
    for section, values in sections.items():
        cfg[section].update(values)
    return cfg


def metrics_file(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# --- the package ------------------------------------------------------------------------------------------------


def test_the_api_names_stay_functions_after_their_modules_load():
    from lora_cli.generate import generate_text  # noqa: F401  (loads the modules of the same names)
    from lora_cli.merge import merge_adapter  # noqa: F401
    from lora_cli.train import train  # noqa: F401

    for name in ("train", "estimate", "merge", "generate"):
        assert inspect.isfunction(getattr(lora_cli, name)), name
        assert getattr(lora_cli, name).__module__ == "lora_cli.api"
    assert inspect.ismodule(importlib.import_module("lora_cli.train"))
    assert lora_cli.UserError is UserError


# Reaching these modules through the package's attribute finds the function instead: an AttributeError far from
# the cause. A from-import of the module's own names, or importlib.import_module("lora_cli.train"), works.
SHADOWED = re.compile(r"from lora_cli import (train|merge|generate|estimate)\b|from \.\.? import (train|merge|generate|"
                      r"estimate)\b|import lora_cli\.(train|merge|generate|estimate)\b[\w.]* as |"
                      r"[\"']lora_cli\.(train|merge|generate|estimate)\.\w")


def test_no_code_reaches_the_shadowed_modules_as_package_attributes():
    offenders = [f"{path.relative_to(REPO)}:{number}: {line.strip()}"
                 for folder in ("lora_cli", "tests", "scripts") for path in sorted((REPO / folder).rglob("*.py"))
                 if path.name != "test_api.py"
                 for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
                 if SHADOWED.search(line) and "lora_cli.train.train" not in line]
    assert not offenders, ("lora_cli.train, .merge, .generate and .estimate are the API functions, not the modules: "
                           "use `from lora_cli.train import NAME`, `from lora_cli.merge import stream`, or "
                           "importlib.import_module('lora_cli.train'):\n" + "\n".join(offenders))


def test_importing_the_package_loads_no_torch():
    code = "import sys, lora_cli; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_api_defaults_are_the_commands_defaults():
    """The defaults live in the commands' options, the library functions and the API: they must agree."""
    from lora_cli.cli import generate_command, merge_command
    from lora_cli.generate import SamplingSettings
    from lora_cli.merge import merge_adapter

    api_generate = inspect.signature(lora_cli.generate).parameters
    cli_generate = inspect.signature(generate_command).parameters
    for name in ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed"):
        assert api_generate[name].default == getattr(SamplingSettings, name) == cli_generate[name].default.default
    for name in ("dtype", "revision", "trust_remote_code", "merge", "load_in_4bit", "system"):
        assert api_generate[name].default == cli_generate[name].default.default, name
    api_merge = inspect.signature(lora_cli.merge).parameters
    library, cli_merge = inspect.signature(merge_adapter).parameters, inspect.signature(merge_command).parameters
    for name in ("base", "dtype", "max_shard_size", "verify_logits", "overwrite", "revision", "trust_remote_code"):
        assert api_merge[name].default == library[name].default == cli_merge[name].default.default, name


# --- overrides -------------------------------------------------------------------------------------------------


def test_overrides_merge_key_by_key_in_order_and_leave_the_callers_dicts_alone(tmp_path):
    cfg = config_dict(tmp_path, tmp_path / "model")
    before = copy.deepcopy(cfg)
    train_section = {"max_steps": 7}
    built = build_config(cfg, ["train.max_steps=5", "lora.r=2", "train.learning_rate=1e-4"], {"train": train_section,
                                                                                              "lora": {"alpha": 3}})
    assert built.train.max_steps == 7  # keyword sections come after the dotted strings
    assert built.train.learning_rate == 1e-4 and built.lora.r == 2 and built.lora.alpha == 3
    assert built.train.micro_batch_size == 4 and built.lora.target_modules == "all-linear"  # the rest kept
    assert cfg == before and train_section == {"max_steps": 7}
    assert build_config(built) is built
    assert build_config(built, sections={"lora": {"r": 16}}).lora.r == 16

    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(cfg), encoding="utf-8")  # JSON is YAML
    assert build_config(str(path), ["lora.r=2"]) == build_config(cfg, sections={"lora": {"r": 2}})


@pytest.mark.parametrize("call, message", [
    (lambda cfg: lora_cli.train(cfg, train=5), "train= takes a dict of that section's keys, e.g. "
                                                "train={'max_steps': 2} (got 5)"),
    (lambda cfg: lora_cli.train(cfg, trian={"max_steps": 2}),
     "The config dict has 1 problem:\n  - trian: unknown key; did you mean `train`?"),
    (lambda cfg: lora_cli.train(cfg, train={"max_step": 2}),
     "train.max_step: unknown key; did you mean `train.max_steps`?"),
    (lambda cfg: lora_cli.train(cfg, "train.max_steps"), "Override 'train.max_steps' is not key=value"),
    (lambda cfg: lora_cli.train(["model"]), "The config must be a YAML file's path, a dict of sections"),
    (lambda cfg: lora_cli.train("nowhere.yaml"), "Config file nowhere.yaml not found"),
    (lambda cfg: lora_cli.train(cfg, gpu="t4"), "gpu= goes with dry_run=True"),
])
def test_bad_config_input_raises_user_error(tmp_path, tiny_model_dir, call, message):
    with pytest.raises(UserError) as err:
        call(config_dict(tmp_path, tiny_model_dir("llama")))
    assert message in str(err.value)
    assert not (tmp_path / "out").exists()


# --- train -----------------------------------------------------------------------------------------------------


def test_train_returns_the_result_and_writes_the_adapter(tmp_path, trainable_model_dir):
    cfg = config_dict(tmp_path, trainable_model_dir("llama"), data={"val_size": 2})
    result = lora_cli.train(cfg, "train.eval_steps=2", train={"max_steps": 4}, quiet=True)

    out = tmp_path / "out"
    assert result.adapter_dir == result.output_dir == out
    assert (out / "adapter_model.safetensors").is_file() and (out / "loss.png").is_file()
    assert result.global_step == 4
    assert result.metrics == metrics_file(out)
    assert [r["step"] for r in result.metrics if "loss" in r] == [1, 2, 3, 4]
    evals = [r for r in result.metrics if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    best = min(evals, key=lambda r: r["eval_loss"])
    assert result.best_step == best["step"] and result.best_eval_loss == best["eval_loss"]
    assert result.final_eval_loss == evals[-1]["eval_loss"]
    assert result.merged_dir is None

    # Rerunning the same call with resume_from_checkpoint auto (a notebook cell run again) trains nothing and
    # returns the finished run's result.
    weights = (out / "adapter_model.safetensors").read_bytes()
    again = lora_cli.train(cfg, "train.eval_steps=2", train={"max_steps": 4, "resume_from_checkpoint": "auto"},
                           quiet=True)
    assert (out / "adapter_model.safetensors").read_bytes() == weights
    assert again.adapter_dir == out and again.global_step == 4 and again.metrics == result.metrics
    assert again.best_step == result.best_step and again.final_eval_loss == result.final_eval_loss
    assert again.final_train_loss == result.metrics[-2]["loss"]  # the last logged loss (step 4)


def test_train_refuses_what_the_command_refuses_with_the_same_message(tmp_path, trainable_model_dir):
    cfg = config_dict(tmp_path, trainable_model_dir("llama"))
    lora_cli.train(cfg, quiet=True)
    with pytest.raises(UserError) as err:
        lora_cli.train(cfg, quiet=True)
    assert "already holds a trained adapter" in str(err.value)

    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(cfg), encoding="utf-8")
    command = CliRunner().invoke(train_app, [str(path)])
    assert command.exit_code == 2
    assert " ".join(str(err.value).split()) in " ".join(command.output.split())


def test_dry_run_returns_none_and_writes_nothing(tmp_path, tiny_model_dir):
    assert lora_cli.train(config_dict(tmp_path, tiny_model_dir("llama")), dry_run=True) is None
    assert not (tmp_path / "out").exists()


def test_estimate_returns_and_prints_the_estimate(capsys):
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_info()  # a caller's own settings: quiet during the call, restored after it
    hf_logging.enable_progress_bar()
    fixture = REPO / "tests" / "fixtures" / "llama-3.2-3b"
    result = lora_cli.estimate(REPO / "configs" / "t4_3b.yaml", model={"name_or_path": str(fixture)}, gpu="t4")
    assert result.fits and result.gpu.memory_bytes == 15360 * 2**20
    assert "FITS" in capsys.readouterr().out
    quiet = lora_cli.estimate(REPO / "configs" / "t4_3b.yaml", f"model.name_or_path={fixture}", gpu="t4", quiet=True)
    assert quiet.to_json() == result.to_json() and capsys.readouterr().out == ""
    assert hf_logging.get_verbosity() == hf_logging.INFO and hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity(verbosity)
    if not bars:
        hf_logging.disable_progress_bar()


# --- merge and generate ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, trainable_model_dir):
    root = tmp_path_factory.mktemp("api")
    result = lora_cli.train(config_dict(root, trainable_model_dir("llama")), quiet=True)
    return result.adapter_dir


def test_merge_writes_the_folder_and_refuses_like_the_command(adapter, tmp_path, capsys):
    result = lora_cli.merge(adapter, tmp_path / "merged")
    assert result.output_dir == tmp_path / "merged" and result.streamed
    assert (tmp_path / "merged" / "config.json").is_file() and list((tmp_path / "merged").glob("*.safetensors"))
    capsys.readouterr()
    with pytest.raises(UserError) as err:
        lora_cli.merge(adapter, tmp_path / "merged", quiet=True)
    assert "--overwrite" in str(err.value)
    command = CliRunner().invoke(merge_app, [str(adapter), str(tmp_path / "merged")])
    assert command.exit_code == 2 and " ".join(str(err.value).split()) in " ".join(command.output.split())
    assert capsys.readouterr().out == ""


def test_generate_answers_as_the_command_does(adapter, tmp_path, capsys):
    base = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    greedy = {"temperature": 0, "max_new_tokens": 8}
    answer = lora_cli.generate(base, "hello", adapter=adapter, quiet=True, **greedy)
    assert isinstance(answer, str) and answer
    command = CliRunner().invoke(generate_app, [base, "--adapter", str(adapter), "--prompt", "hello",
                                                "--temperature", "0", "--max-new-tokens", "8"])
    assert command.exit_code == 0 and command.stdout.strip() == answer
    assert capsys.readouterr().out == ""  # no stream unless asked

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello\nhow are you\n")
    seen = []
    answers = lora_cli.generate(base, prompt_file=prompts, adapter=adapter, output=tmp_path / "answers.jsonl",
                                on_answer=lambda p, a: seen.append((p, a)), **greedy)
    assert answers[0] == answer and len(answers) == 2
    assert seen == list(zip(["hello", "how are you"], answers))
    written = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert written == [{"prompt": p, "response": a} for p, a in seen]
    assert "loading" in capsys.readouterr().err  # status lines on stderr

    assert lora_cli.generate(base, ["hello"], adapter=adapter, merge=True, quiet=True, **greedy) == [answer]
    history = lora_cli.generate(base, chat=io.StringIO("hello\n/exit\n"), adapter=adapter, quiet=True, **greedy)
    assert history == [{"role": "user", "content": "hello"}, {"role": "assistant", "content": answer}]


@pytest.mark.parametrize("kwargs, message", [
    ({}, "Choose exactly one of --prompt TEXT, --prompt-file FILE or --chat (in Python: prompt=, prompt_file= or "
         "chat=; got none)"),
    ({"prompt": "hi", "chat": io.StringIO()}, "got --prompt and --chat"),
    ({"prompt": []}, "prompt must be a string or a non-empty list of strings"),
    ({"prompt": ["hi", " "]}, "--prompt is empty"),
    ({"prompt": "hi", "temperature": -1}, "--temperature must be a number >= 0"),
    ({"prompt": "hi", "dtype": "float8"}, "--dtype must be one of auto, "),
    ({"prompt_file": "missing.txt"}, "Prompt file missing.txt does not exist"),
])
def test_generate_refuses_bad_input_before_loading_the_model(monkeypatch, kwargs, message):
    monkeypatch.setattr(importlib.import_module("lora_cli.generate"), "load_for_generation",
                        lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(UserError) as err:
        lora_cli.generate("some/model", **kwargs)
    assert message in str(err.value)
