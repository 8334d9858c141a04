"""lora-generate: --dtype, non-finite logits (fp16 overflow, corrupt adapter) stop with exit 2 and advice, and the
errors of issue 9 that ended in a traceback or named the wrong thing (MODEL, --output, a refused pytorch_model.bin).
"""

from __future__ import annotations

import argparse
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import amp_emulation
import tiny
from lora_cli import generate_io
from lora_cli.adapter import save_adapter
from lora_cli.cli import generate_app
from lora_cli.inject import LoraSettings, apply_lora
from lora_cli.models import load_base_model

gen = importlib.import_module("lora_cli.generate")  # the module; lora_cli.generate is the API function

GREEDY = ["--temperature", "0", "--max-new-tokens", "6"]
SAMPLING = ["--temperature", "0.7", "--seed", "0", "--max-new-tokens", "6"]


def run(*args):
    return CliRunner().invoke(generate_app, [str(a) for a in args])


def assert_error(result, *fragments: str):
    assert result.exit_code == 2, result.output
    assert "error:" in result.output and "Traceback" not in result.output, result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), result.exception
    message = " ".join(result.output.split())
    for fragment in fragments:
        assert fragment in message, message


@pytest.fixture(scope="module")
def overflowing_model_dir(tmp_path_factory):
    return amp_emulation.save_overflowing_model(tmp_path_factory.mktemp("overflowing") / "llama")


@pytest.fixture(scope="module")
def nan_adapter(tiny_model_dir, tmp_path_factory):
    """An adapter whose lora_B of one layer is NaN, as a diverged run leaves it (written past any save-time check)."""
    from safetensors.torch import load_file, save_file

    base = tiny_model_dir("llama")
    model = load_base_model(str(base))
    settings = LoraSettings(r=2, alpha=4.0)
    report = apply_lora(model, settings)
    folder = save_adapter(model, tmp_path_factory.mktemp("nan") / "adapter", settings, report.target_modules,
                          str(base))
    tensors = load_file(folder / "adapter_model.safetensors")
    name = next(k for k in sorted(tensors) if "lora_B" in k)
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    return str(base), str(folder)


# --- --dtype ---------------------------------------------------------------------------------------------------


def test_dtype_option_loads_the_model_in_that_dtype(tiny_model_dir):
    for dtype in ("float16", "bfloat16", "float32"):
        result = run(tiny_model_dir("llama"), "--prompt", "hello", "--dtype", dtype, *GREEDY)
        assert result.exit_code == 0, result.output
        assert f"(cpu, {dtype})" in result.stderr
    auto = run(tiny_model_dir("llama"), "--prompt", "hello", *GREEDY)
    assert auto.exit_code == 0 and "(cpu, float32)" in auto.stderr  # auto on a CPU: float32, as before
    assert_error(run(tiny_model_dir("llama"), "--prompt", "hello", "--dtype", "fp8"), "--dtype must be one of",
                 "auto, float16, bfloat16, float32", "'fp8'")


def test_generation_dtype_auto_follows_the_gpu():
    assert gen.generation_dtype("auto", "cpu") == gen.generation_dtype(None, "cpu") == torch.float32
    assert gen.generation_dtype("bfloat16", "cuda") == torch.bfloat16
    assert gen.generation_dtype(torch.float16, "cpu") == torch.float16


# --- non-finite logits -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("decoding", [GREEDY, SAMPLING], ids=["greedy", "sampling"])
def test_fp16_overflow_stops_with_the_dtype_advice(overflowing_model_dir, decoding):
    """Sampling used to die in torch.multinomial with a traceback; greedy printed garbage and exited 0."""
    result = run(overflowing_model_dir, "--prompt", "hello", "--dtype", "float16", *decoding)
    assert_error(result, "overflowed float16", "--dtype float32", "--dtype bfloat16")
    fine = run(overflowing_model_dir, "--prompt", "hello", "--dtype", "float32", *decoding)  # the advice works
    assert fine.exit_code == 0, fine.output


@pytest.mark.parametrize("decoding", [GREEDY, SAMPLING], ids=["greedy", "sampling"])
def test_nan_adapter_is_refused_by_name(nan_adapter, decoding):
    """Refused when the adapter is read, before the base loads (it used to sample into a traceback or print
    nothing), naming the file and the tensor."""
    base, adapter = nan_adapter
    result = run(base, "--adapter", adapter, "--prompt", "hello", *decoding)
    assert_error(result, "adapter_model.safetensors", "non-finite values (NaN or inf)")
    assert "base_model.model.model.layers." in " ".join(result.output.split())  # the tensor's name


def test_non_finite_logits_stop_the_library_call(overflowing_model_dir):
    from lora_cli.errors import UserError

    model, tokenizer = gen.load_for_generation(str(overflowing_model_dir), dtype=torch.float16)
    with pytest.raises(UserError, match="overflowed float16"):
        gen.generate_text(model, tokenizer, "hello", temperature=0, max_new_tokens=4)


def test_finite_scores_processor_lets_masked_tokens_through():
    check = gen._FiniteScores()
    masked = torch.tensor([[1.0, -float("inf"), 2.0]])  # what top-k/top-p leave: -inf is normal
    assert check(None, masked) is masked
    for bad in ([[1.0, float("nan"), 2.0]], [[1.0, float("inf"), 2.0]], [[-float("inf")] * 3]):
        with pytest.raises(gen.NonFiniteLogits):
            check(None, torch.tensor(bad))


# --- errors name MODEL, --output failures, a refused pytorch_model.bin (issue 9) --------------------------------


def test_model_errors_name_the_model_argument(tmp_path, nan_adapter):
    missing = run(tmp_path / "nope", "--prompt", "hello")
    assert_error(missing, f"MODEL '{tmp_path / 'nope'}' does not exist")
    adapter_as_model = run(nan_adapter[1], "--prompt", "hello")
    assert_error(adapter_as_model, "MODEL", "is an adapter folder", "pass it with --adapter")
    for result in (missing, adapter_as_model):
        assert "model.name_or_path" not in result.output


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full to fill a disk")
def test_full_disk_on_output_exits_2(tiny_model_dir):
    result = run(tiny_model_dir("llama"), "--prompt", "hello", "--output", "/dev/full", *GREEDY)
    assert_error(result, "/dev/full", "No space left on device")


def test_output_that_cannot_be_opened_exits_2(tiny_model_dir, tmp_path, monkeypatch):
    # What a race or a permission the early check cannot see (root, ACLs, a read-only mount) ends in at open().
    monkeypatch.setattr(generate_io, "check_output_file", lambda path, prompt_file=None: None)
    target = tmp_path / "gone" / "answers.jsonl"
    assert_error(run(tiny_model_dir("llama"), "--prompt", "hello", "--output", target, *GREEDY),
                 f"Cannot write --output {target}")


def test_output_file_may_live_in_a_folder_it_cannot_create_files_in(tmp_path, monkeypatch):
    """An existing writable file is overwritten in place: its folder's permissions do not matter."""
    existing = tmp_path / "answers.jsonl"
    existing.write_text("")
    monkeypatch.setattr(generate_io.os, "access", lambda path, mode: Path(path) == existing)
    generate_io.check_output_file(existing)


def test_refused_pytorch_model_bin_names_the_file_and_the_conversion(tmp_path):
    """A .bin checkpoint that pickles more than tensors: torch's weights_only refuses it (an UnpicklingError, which
    used to end in a traceback). The message names the file and a conversion command, which then works."""
    folder = tiny.save_model("llama", tmp_path / "bin_model")
    state = dict(load_base_model(str(folder)).state_dict())
    state["training_args"] = argparse.Namespace(lr=1e-4)  # what some training scripts pickled into checkpoints
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")

    result = run(folder, "--prompt", "hello", *GREEDY)

    assert_error(result, str(folder / "pytorch_model.bin"), "weights_only", "argparse.Namespace", "model.safetensors")
    command = re.search(r'python -c "(.+)"\s*$', result.output.strip(), re.S).group(1)
    subprocess.run([sys.executable, "-c", " ".join(command.split())], check=True, timeout=120)
    converted = run(folder, "--prompt", "hello", *GREEDY)
    assert converted.exit_code == 0, converted.output


# --- refused before the model loads (a missing MODEL would be named otherwise) -------------------------------


def test_an_empty_prompt_is_refused_before_the_model_loads(tmp_path):
    result = run(tmp_path / "no-model", "--prompt", "  ", "--no-chat-template")
    assert_error(result, "--prompt is empty; give the text to answer")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "hello"}\n{"prompt": ""}\n')
    result = run(tmp_path / "no-model", "--prompt-file", prompts)
    assert_error(result, f'{prompts} line 2 has an empty "prompt"')


def test_a_prompt_without_tokens_stops_the_library_call(tiny_model_dir):
    model_dir = tiny_model_dir("llama")
    model, tokenizer = gen.load_for_generation(str(model_dir), device="cpu")
    with pytest.raises(gen.UserError, match="The prompt is empty"):
        gen.generate_text(model, tokenizer, "", chat_template=False, temperature=0, max_new_tokens=2)


@pytest.mark.parametrize("option, value, fragment", [
    ("--repetition-penalty", "nan", "--repetition-penalty must be a number > 0; 1 means none (got nan)"),
    ("--repetition-penalty", "inf", "--repetition-penalty must be a number > 0; 1 means none (got inf)"),
    ("--seed", "-1", "--seed must be between 0 and 4294967295 (got -1)"),
    ("--seed", "99999999999999", "--seed must be between 0 and 4294967295 (got 99999999999999)"),
    ("--temperature", "1e-40", "--temperature 1e-40 is too small to sample with (below 0.0001"),
    ("--temperature", "nan", "--temperature must be a number >= 0; 0 means greedy (got nan)"),
    ("--temperature", "inf", "--temperature must be a number >= 0; 0 means greedy (got inf)"),
])
def test_sampling_settings_out_of_range_are_refused_before_the_model_loads(tmp_path, option, value, fragment):
    assert_error(run(tmp_path / "no-model", "--prompt", "hi", option, value), fragment)


def test_the_smallest_sampling_temperature_still_samples(tiny_model_dir):
    result = run(tiny_model_dir("llama"), "--prompt", "hi", "--temperature", "1e-4", "--seed", "4294967295",
                 "--max-new-tokens", "3")
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("how", ["same path", "other spelling", "symlink", "hard link"])
def test_output_that_is_the_prompt_file_is_refused_and_the_prompts_survive(tmp_path, how):
    import os

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("What is LoRA?\n")
    output = {"same path": prompts, "other spelling": tmp_path / "sub" / ".." / "prompts.txt",
              "symlink": tmp_path / "link.txt", "hard link": tmp_path / "hard.txt"}[how]
    (tmp_path / "sub").mkdir()
    if how == "symlink":
        output.symlink_to(prompts)
    elif how == "hard link":
        os.link(prompts, output)
    assert_error(run(tmp_path / "no-model", "--prompt-file", prompts, "--output", output),
                 "is the --prompt-file itself; writing the answers there would erase the prompts")
    assert prompts.read_text() == "What is LoRA?\n"
