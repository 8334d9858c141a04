"""lora-generate: same greedy text for base + adapter, merged in memory, and a merged folder; prompt files, chat,
chat template handling, and clean errors."""

from __future__ import annotations

import importlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import tiny
from helpers import randomise_lora
from lora_cli.adapter import save_adapter
from lora_cli.cli import generate_app
from lora_cli.errors import UserError
from lora_cli.inject import LoraSettings, apply_lora
from lora_cli.merge import merge_adapter
from lora_cli.models import load_base_model

gen = importlib.import_module("lora_cli.generate")  # the module; lora_cli.generate is the API function

GREEDY = ["--temperature", "0", "--max-new-tokens", "12"]


@pytest.fixture(scope="module")
def folders(tiny_model_dir, tmp_path_factory):
    """base (tiny llama), an adapter for it (randomised, so it changes the output), and the merged folder."""
    root = tmp_path_factory.mktemp("generate")
    base = tiny_model_dir("llama")
    model = load_base_model(str(base))
    settings = LoraSettings(r=4, alpha=8.0, target_modules="all-linear")
    report = apply_lora(model, settings)
    randomise_lora(model, seed=3)
    adapter = save_adapter(model, root / "adapter", settings, report.target_modules, str(base))
    merge_adapter(adapter, root / "merged")
    return {"base": str(base), "adapter": str(adapter), "merged": str(root / "merged")}


def run(*args, input: str | None = None):
    return CliRunner().invoke(generate_app, [str(a) for a in args], input=input)


def assert_error(result, *fragments: str):
    assert result.exit_code == 2, result.output
    assert "error:" in result.output and "Traceback" not in result.output, result.output
    for fragment in fragments:
        assert fragment in result.output, result.output


@pytest.fixture
def spy(monkeypatch):
    """Record every generate_text call (prompt and keyword arguments) while still generating."""
    calls = []
    real = gen.generate_text

    def recording(model, tokenizer, prompt, **kwargs):
        calls.append({"prompt": json.loads(json.dumps(prompt)), **kwargs})
        return real(model, tokenizer, prompt, **kwargs)

    monkeypatch.setattr(gen, "generate_text", recording)
    return calls


# --- same text three ways ------------------------------------------------------------------------------------


def test_greedy_text_same_for_adapter_merged_in_memory_and_merged_folder(folders):
    unmerged = run(folders["base"], "--adapter", folders["adapter"], "--prompt", "hello", *GREEDY)
    in_memory = run(folders["base"], "--adapter", folders["adapter"], "--merge", "--prompt", "hello", *GREEDY)
    merged_folder = run(folders["merged"], "--prompt", "hello", *GREEDY)
    base_only = run(folders["base"], "--prompt", "hello", *GREEDY)

    for result in (unmerged, in_memory, merged_folder, base_only):
        assert result.exit_code == 0, result.output
    assert unmerged.stdout.strip()  # something was generated (and streamed to stdout)
    assert unmerged.stdout == in_memory.stdout == merged_folder.stdout
    assert base_only.stdout != unmerged.stdout  # the adapter matters, so the equality above means something
    assert "merged in memory" in in_memory.stderr  # status lines go to stderr, keeping stdout for the text


def test_library_functions(folders):
    model, tokenizer = gen.load_for_generation(folders["base"], folders["adapter"])
    greedy = gen.generate_text(model, tokenizer, "hello", temperature=0, max_new_tokens=12)
    assert greedy == gen.generate_text(model, tokenizer, "hello", temperature=0, max_new_tokens=12)
    merged, _ = gen.load_for_generation(folders["merged"])
    assert gen.generate_text(merged, tokenizer, "hello", temperature=0, max_new_tokens=12) == greedy
    sampled = gen.generate_text(model, tokenizer, "hello", seed=5, max_new_tokens=12)
    assert sampled == gen.generate_text(model, tokenizer, "hello", seed=5, max_new_tokens=12)  # seeded = repeatable
    messages = [{"role": "user", "content": "hello"}]  # a list of messages is the same as the string prompt
    assert gen.generate_text(model, tokenizer, messages, temperature=0, max_new_tokens=12) == greedy
    with pytest.raises(UserError, match="--merge"):
        gen.load_for_generation(folders["base"], merge=True)
    with pytest.raises(UserError, match="--top-p"):
        gen.generate_text(model, tokenizer, "hello", top_p=0)


# --- prompt files ----------------------------------------------------------------------------------------------


def test_prompt_file_writes_one_jsonl_result_per_line(folders, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello\n\nhow are you\n")
    out = tmp_path / "answers.jsonl"

    result = run(folders["merged"], "--prompt-file", prompts, "--output", out, *GREEDY)

    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["hello", "how are you"]
    single = run(folders["merged"], "--prompt", "hello", *GREEDY)
    assert rows[0]["response"] == single.stdout.strip()


def test_prompt_file_jsonl_to_stdout(folders, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "hello", "id": 1}\n{"question": "how are you"}\n')

    result = run(folders["merged"], "--prompt-file", prompts, *GREEDY)

    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]  # stdout holds nothing but the JSONL
    assert [r["prompt"] for r in rows] == ["hello", "how are you"]
    assert all(set(r) == {"prompt", "response"} for r in rows)


# --- chat ------------------------------------------------------------------------------------------------------


def test_chat_keeps_history(folders, spy):
    result = run(folders["merged"], "--chat", "--system", "Be brief.", *GREEDY, input="hello\nhow are you\n/exit\n")

    assert result.exit_code == 0, result.output
    assert len(spy) == 2
    first, second = spy[0]["prompt"], spy[1]["prompt"]
    assert first == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}]
    assert second[:2] == first and second[2]["role"] == "assistant"
    assert second[3] == {"role": "user", "content": "how are you"}
    answers = result.stdout.splitlines()
    assert len(answers) == 2 and answers[0].strip() == second[2]["content"]
    assert "> " not in result.stdout  # no prompt marker when stdin is not a terminal


def test_chat_ends_at_eof_and_reset_forgets(folders, spy):
    result = run(folders["merged"], "--chat", *GREEDY, input="hello\n/reset\nhow are you\n")
    assert result.exit_code == 0, result.output
    assert [c["prompt"] for c in spy] == [[{"role": "user", "content": "hello"}],
                                          [{"role": "user", "content": "how are you"}]]


# --- chat template -----------------------------------------------------------------------------------------------


def test_chat_template_rendering(spy, folders, monkeypatch):
    tokenizer = tiny.make_tokenizer()
    templated, templated_special = gen.render_prompt(tokenizer, "hello", system="S")
    assert templated == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    assert templated_special is False  # the template writes its own special tokens, as in training
    assert gen.render_prompt(tokenizer, "hello", chat_template=False) == ("hello", True)
    tokenizer.chat_template = None  # no template: raw text automatically
    assert gen.render_prompt(tokenizer, "hello") == ("hello", True)

    rendered = []
    real = gen.render_prompt
    monkeypatch.setattr(gen, "render_prompt", lambda *a, **k: rendered.append(real(*a, **k)[0]) or real(*a, **k))
    assert run(folders["merged"], "--prompt", "hello", *GREEDY).exit_code == 0
    assert run(folders["merged"], "--prompt", "hello", "--no-chat-template", *GREEDY).exit_code == 0
    assert rendered == [templated.replace("<|im_start|>system\nS<|im_end|>\n", ""), "hello"]
    assert spy[0]["chat_template"] is True and spy[1]["chat_template"] is False


# --- bad input ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case",
    ["missing-model", "missing-adapter", "adapter-as-model", "prompt-and-chat", "no-mode", "merge-without-adapter",
     "bad-temperature", "bad-prompt-file", "missing-prompt-file", "output-in-missing-folder"],
)
def test_bad_input_exits_2(folders, tmp_path, case):
    args, expected = [folders["merged"], "--prompt", "hello"], ()
    if case == "missing-model":
        args[0], expected = str(tmp_path / "nope"), ("does not exist",)
    elif case == "missing-adapter":
        args += ["--adapter", str(tmp_path / "nope")]
        expected = ("Adapter folder", "does not exist")
    elif case == "adapter-as-model":
        args[0], expected = folders["adapter"], ("is an adapter folder", "pass it with --adapter")
    elif case == "prompt-and-chat":
        args += ["--chat"]
        expected = ("exactly one of", "--prompt and --chat")
    elif case == "no-mode":
        args, expected = [folders["merged"]], ("exactly one of", "none")
    elif case == "merge-without-adapter":
        args += ["--merge"]
        expected = ("--merge", "--adapter")
    elif case == "bad-temperature":
        args += ["--temperature", "-1"]
        expected = ("--temperature",)
    elif case == "bad-prompt-file":
        (tmp_path / "p.jsonl").write_text('{"text": "hello"}\n')
        args, expected = [folders["merged"], "--prompt-file", str(tmp_path / "p.jsonl")], ("line 1", '"prompt"')
    elif case == "missing-prompt-file":
        args, expected = [folders["merged"], "--prompt-file", str(tmp_path / "nope.txt")], ("does not exist",)
    else:
        args += ["--output", str(tmp_path / "nope" / "out.jsonl")]
        expected = ("does not exist",)

    result = run(*args)

    assert_error(result, *expected)


def test_console_script_entry_point():
    script = Path(sys.executable).parent / "lora-generate"
    exe = [str(script)] if script.exists() else [shutil.which("lora-generate") or "lora-generate"]
    proc = subprocess.run(exe + ["--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "MODEL" in proc.stdout and "--prompt-file" in proc.stdout and "--no-chat-template" in proc.stdout


def test_python_m_lora_cli_reaches_merge_and_generate(folders, tmp_path):
    from lora_cli.cli import main_app

    result = CliRunner().invoke(main_app, ["generate", folders["merged"], "--prompt", "hello", *GREEDY])
    direct = run(folders["merged"], "--prompt", "hello", *GREEDY)
    assert result.exit_code == 0 and result.stdout == direct.stdout, result.output
    result = CliRunner().invoke(main_app, ["merge", folders["adapter"], str(tmp_path / "m"), "--no-verify"])
    assert result.exit_code == 0 and (tmp_path / "m" / "config.json").is_file(), result.output


def test_chat_prints_a_marker_on_a_terminal(folders, capsys):
    import io

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    model, tokenizer = gen.load_for_generation(folders["merged"])
    history = gen.chat_session(model, tokenizer, Terminal("hello\n"), temperature=0, max_new_tokens=4)
    assert [m["role"] for m in history] == ["user", "assistant"]
    assert capsys.readouterr().out.startswith("> ")


def test_the_trained_system_prompt_is_read_from_the_adapters_config_copy(tmp_path):
    """lora-generate's default system prompt: data.system_prompt from the lora_config.yaml lora-train saved beside
    the adapter (lora_cli/layout.py names it); a PEFT adapter has none, and neither has a run without one."""
    from lora_cli.chat_templates import trained_system_prompt
    from lora_cli.layout import CONFIG_COPY_NAME

    (tmp_path / CONFIG_COPY_NAME).write_text("data:\n  system_prompt: Be brief.\n", encoding="utf-8")
    assert trained_system_prompt(tmp_path) == "Be brief."
    (tmp_path / CONFIG_COPY_NAME).write_text("data:\n  max_length: 64\n", encoding="utf-8")
    assert trained_system_prompt(tmp_path) is None
    assert trained_system_prompt(tmp_path / "peft-adapter") is None
    assert trained_system_prompt(None) is None
