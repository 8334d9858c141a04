"""Issue 20: chat templates for base models (data.chat_template), mixed sources (a data.path list), TRL's
prompt/completion rows, and data.system_prompt; from the data pipeline up to the adapter folder and lora-generate."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import tiny
from lora_cli import data
from lora_cli.chat_templates import CHATML, LLAMA3, apply_template_setting, folder_template
from lora_cli.cli import generate_app, train_app
from lora_cli.config import validate_config
from lora_cli.data import IGNORE_INDEX
from lora_cli.errors import UserError

runner = CliRunner()

CHAT_ROWS = [
    {"messages": [{"role": "user", "content": f"Who is the mayor {i}?"},
                  {"role": "assistant", "content": "The mayor is Orla Fenwick."}]}
    for i in range(12)
]
ALPACA_ROWS = [{"instruction": f"Name the colour {i}.", "output": "green"} for i in range(10)]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def base_tokenizer():
    """The tiny tokenizer as a base model's: no chat template, and <|endoftext|> as EOS (not ChatML's <|im_end|>)."""
    tok = tiny.make_tokenizer()
    tok.chat_template = None
    tok.eos_token = "<|endoftext|>"
    return tok


@pytest.fixture(scope="module")
def base_model_dir(tmp_path_factory):
    """A tiny base model folder whose tokenizer has no chat template and whose EOS is <|endoftext|>."""
    folder = tiny.save_model("llama", tmp_path_factory.mktemp("base"), init_range=0.2)
    tok = base_tokenizer()
    tok.save_pretrained(folder)
    for name in ("chat_template.jinja",):
        (folder / name).unlink(missing_ok=True)
    config = json.loads((folder / "config.json").read_text())
    config["eos_token_id"] = tok.eos_token_id
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def trained_text(example, tok) -> str:
    return tok.decode([t for t in example.labels if t != IGNORE_INDEX], skip_special_tokens=False)


# --- chat templates -----------------------------------------------------------------------------------------------


def test_chatml_on_a_base_tokenizer_ends_replies_with_its_eos():
    tok = base_tokenizer()
    apply_template_setting(tok, "chatml")
    messages = CHAT_ROWS[0]["messages"]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text == ("<|im_start|>user\nWho is the mayor 0?<|im_end|>\n"
                    "<|im_start|>assistant\nThe mayor is Orla Fenwick.<|endoftext|>\n")
    example, _ = data.tokenize_row(CHAT_ROWS[0], "chat", tok, 128, False)
    # the reply and the tokenizer's own EOS are trained, nothing of the prompt, and the example ends there
    assert trained_text(example, tok) == "The mayor is Orla Fenwick.<|endoftext|>"
    assert example.labels[example.labels.index(tok.eos_token_id)] == tok.eos_token_id


def test_chatml_on_a_chatml_model_is_standard_chatml(tokenizer):
    tok = tiny.make_tokenizer()  # eos <|im_end|>, as Qwen's and SmolLM2's instruct tokenizers
    apply_template_setting(tok, "chatml")
    text = tok.apply_chat_template(CHAT_ROWS[0]["messages"], tokenize=False)
    assert text == tok.apply_chat_template(CHAT_ROWS[0]["messages"], tokenize=False, chat_template=tiny.CHAT_TEMPLATE)


def test_llama3_markers_outside_the_vocabulary_are_text_and_trained_turns_end_with_eos():
    tok = base_tokenizer()
    apply_template_setting(tok, "llama3")
    assert tok.chat_template == LLAMA3
    assert "<|start_header_id|>" not in tok.get_vocab()
    row = {"messages": [{"role": "system", "content": "Be brief."}, *CHAT_ROWS[0]["messages"]]}
    example, _ = data.tokenize_row(row, "chat", tok, 256, False)
    text = tok.decode(example.input_ids, skip_special_tokens=False)
    assert text.startswith("<|im_start|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>")
    assert trained_text(example, tok) == "The mayor is Orla Fenwick.<|endoftext|>"


def test_a_template_from_a_file_and_from_text(tmp_path):
    file = tmp_path / "mine.jinja"
    file.write_text(CHATML, encoding="utf-8")
    for setting in (str(file), CHATML):
        tok = base_tokenizer()
        apply_template_setting(tok, setting)
        assert tok.chat_template == CHATML


@pytest.mark.parametrize("setting, message", [
    ("chatlm", "did you mean `chatml`?"),
    ("vicuna", "auto, chatml, llama3, a Jinja template string, or the path of a .jinja file"),
])
def test_unknown_template_names_are_config_errors(setting, message):
    with pytest.raises(UserError) as info:
        validate_config({"model": {"name_or_path": "m"}, "data": {"path": "d.jsonl", "chat_template": setting}})
    assert "data.chat_template" in str(info.value) and message in str(info.value)


@pytest.mark.parametrize("template, message", [
    ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}", "does not mark assistant turns"),
    ("{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}A:{% endif %}",
     "does not mark assistant turns"),
    ("{% for m in messages %}{{ m['content'] }", "cannot render a conversation"),
])
def test_templates_that_hide_assistant_turns_are_refused(template, message):
    with pytest.raises(UserError) as info:
        apply_template_setting(base_tokenizer(), template)
    assert message in str(info.value) and "chatml, llama3" in str(info.value)


def test_a_missing_template_file_is_an_error(tmp_path):
    with pytest.raises(UserError) as info:
        apply_template_setting(base_tokenizer(), str(tmp_path / "nope.jinja"))
    assert "no such file" in str(info.value)


def test_chat_data_on_a_base_model_says_to_set_chat_template(tmp_path):
    with pytest.raises(UserError) as info:
        data.build_datasets(str(write_jsonl(tmp_path / "c.jsonl", CHAT_ROWS)), base_tokenizer())
    assert "data.chat_template" in str(info.value)


# --- prompt/completion --------------------------------------------------------------------------------------------


def test_prompt_completion_masks_exactly_the_prompt(tokenizer):
    row = {"prompt": "The lighthouse is painted", "completion": " green."}
    assert data.detect_format([row], "x") == "prompt_completion"
    example, _ = data.tokenize_row(row, "prompt_completion", tokenizer, 64, False)
    prompt_ids = tokenizer(row["prompt"])["input_ids"]
    assert example.input_ids[: len(prompt_ids)] == prompt_ids
    assert example.labels[: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
    assert example.labels[len(prompt_ids):] == example.input_ids[len(prompt_ids):]
    assert example.input_ids[-1] == tokenizer.eos_token_id
    assert trained_text(example, tokenizer) == " green.<|im_end|>"
    everything, _ = data.tokenize_row(row, "prompt_completion", tokenizer, 64, True)
    assert everything.labels == everything.input_ids


def test_conversational_prompt_completion_trains_only_the_completion(tokenizer):
    row = {"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                      {"role": "user", "content": "Who is the mayor?"}],
           "completion": [{"role": "assistant", "content": "Orla Fenwick."}]}
    example, _ = data.tokenize_row(row, "prompt_completion", tokenizer, 128, False)
    assert trained_text(example, tokenizer) == "Orla Fenwick.<|im_end|>"
    as_chat, _ = data.tokenize_row({"messages": row["prompt"] + row["completion"]}, "chat", tokenizer, 128, False)
    assert as_chat.input_ids == example.input_ids  # the same text as the whole conversation
    same, _ = data.tokenize_row({"prompt": row["prompt"], "completion": "Orla Fenwick."}, "prompt_completion",
                                tokenizer, 128, False)
    assert same.input_ids == example.input_ids and same.labels == example.labels


def test_prompt_completion_with_bad_types_names_the_row(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": 3, "completion": "b"}])
    with pytest.raises(UserError) as info:
        data.build_datasets(str(path), tokenizer)
    assert "row 2" in str(info.value) and "'prompt' and 'completion'" in str(info.value)


# --- system prompt ------------------------------------------------------------------------------------------------


def test_system_prompt_is_added_where_a_conversation_has_none(tokenizer):
    with_own = {"messages": [{"role": "system", "content": "Own."}, *CHAT_ROWS[0]["messages"]]}
    for row, system in ((CHAT_ROWS[0], "Be brief."), (with_own, "Own.")):
        example, _ = data.tokenize_row(row, "chat", tokenizer, 128, False, system_prompt="Be brief.")
        text = tokenizer.decode(example.input_ids, skip_special_tokens=False)
        assert text.startswith(f"<|im_start|>system\n{system}<|im_end|>")
        assert text.count("system\n") == 1
    pc = {"prompt": [{"role": "user", "content": "Hi"}], "completion": "Hello."}
    example, _ = data.tokenize_row(pc, "prompt_completion", tokenizer, 128, False, system_prompt="Be brief.")
    assert tokenizer.decode(example.input_ids).startswith("<|im_start|>system\nBe brief.")
    assert trained_text(example, tokenizer) == "Hello.<|im_end|>"


# --- mixed sources ------------------------------------------------------------------------------------------------


def test_sources_of_different_formats_mix_with_take(tmp_path, tokenizer):
    chat = write_jsonl(tmp_path / "chat.jsonl", CHAT_ROWS)
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", ALPACA_ROWS)
    sources = [data.Source(str(chat)), data.Source(str(alpaca), take=4)]
    bundle = data.build_datasets(sources, tokenizer, seed=3)
    first, second = bundle.stats.sources
    assert (first.format, first.rows, first.examples) == ("chat", 12, 12)
    assert (second.format, second.rows, second.available, second.examples) == ("alpaca", 4, 10, 4)
    assert bundle.stats.num_train == 16 and bundle.stats.format == "chat+alpaca"
    assert first.tokens + second.tokens == bundle.stats.train_tokens
    assert first.trained_tokens + second.trained_tokens == bundle.stats.trained_tokens
    again = data.build_datasets(sources, tokenizer, seed=3)
    assert [e.input_ids for e in again.train] == [e.input_ids for e in bundle.train]  # the same rows every run
    other = data.build_datasets(sources, tokenizer, seed=4)
    assert [e.input_ids for e in other.train] != [e.input_ids for e in bundle.train]
    half = data.build_datasets([data.Source(str(alpaca), take=0.5)], tokenizer)
    assert half.stats.num_train == 5


def test_validation_is_drawn_from_the_mixed_set(tmp_path, tokenizer):
    sources = [data.Source(str(write_jsonl(tmp_path / "chat.jsonl", CHAT_ROWS))),
               data.Source(str(write_jsonl(tmp_path / "alpaca.jsonl", ALPACA_ROWS)))]
    bundle = data.build_datasets(sources, tokenizer, val_size=8, seed=0)
    assert (bundle.stats.num_train, bundle.stats.num_val) == (14, 8)


@pytest.mark.parametrize("take, message", [(11, "has only 10"), (0.01, "keeps none")])
def test_take_beyond_the_rows_is_an_error(tmp_path, tokenizer, take, message):
    source = data.Source(str(write_jsonl(tmp_path / "alpaca.jsonl", ALPACA_ROWS)), take=take)
    with pytest.raises(UserError) as info:
        data.build_datasets([source, source], tokenizer)
    assert "data.path[0]" in str(info.value) and message in str(info.value)


def test_a_row_error_names_its_source(tmp_path, tokenizer):
    good = write_jsonl(tmp_path / "good.jsonl", ALPACA_ROWS)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "a", "output": 5}])
    with pytest.raises(UserError) as info:
        data.build_datasets([data.Source(str(good)), data.Source(str(bad))], tokenizer)
    assert str(info.value).startswith("data.path[1]: ") and "bad.jsonl" in str(info.value)


def config_with(path_value, **data_keys) -> dict:
    return {"model": {"name_or_path": "m"}, "data": {"path": path_value, **data_keys}}


def test_a_source_list_in_the_config():
    cfg = validate_config(config_with(["a.jsonl", {"path": "b.jsonl", "format": "alpaca", "take": 0.5},
                                       {"path": "org/set", "split": "test", "take": 100}], format="chat"))
    assert [(s.path, s.format, s.split, s.take) for s in cfg.data.sources()] == [
        ("a.jsonl", "chat", "train", None), ("b.jsonl", "alpaca", "train", 0.5), ("org/set", "chat", "test", 100)]
    assert cfg.data.describe_path() == "a.jsonl + b.jsonl + org/set"


@pytest.mark.parametrize("path_value, message", [
    ([{"path": "a.jsonl", "formt": "chat"}], "data.path[0].formt: unknown key; did you mean `format`?"),
    ([{"path": "a.jsonl", "weight": 2}], "data.path[0].weight: unknown key; the keys of an entry are path, format"),
    (["a.jsonl", {"path": "b.jsonl", "take": 0}], "data.path[1].take: must be a row count"),
    (["a.jsonl", {"path": "b.jsonl", "take": 1.5}], "data.path[1].take: must be a row count"),
    ([{"path": "a.jsonl", "format": "sharegpt"}], "data.path[0].format: must be one of auto, text"),
    ([{"format": "chat"}], "data.path[0].path: required"),
    ([], "data.path: must be a path, or a non-empty list of sources"),
])
def test_bad_sources_are_named(path_value, message):
    with pytest.raises(UserError) as info:
        validate_config(config_with(path_value), source="config.yaml")
    assert message in str(info.value)
    assert str(info.value).count("\n  - ") == 1  # one line per mistake, not one per member of the union


# --- end to end: train a base model as a chat model, then generate ---------------------------------------------------


def make_config(tmp_path: Path, model_dir: Path, data_section: dict, **train) -> Path:
    cfg = {
        "model": {"name_or_path": str(model_dir)},
        "lora": {"r": 8, "alpha": 16, "target_modules": "all-linear"},
        "data": {"max_length": 64, **data_section},
        "train": {"output_dir": str(tmp_path / "out"), "max_steps": 30, "micro_batch_size": 4,
                  "learning_rate": 2.0e-2, "warmup_ratio": 0.0, "logging_steps": 5, "seed": 0, **train},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def test_a_base_model_trains_as_a_chat_model_and_generates_with_the_same_prompt(tmp_path, base_model_dir,
                                                                               monkeypatch):
    chat = write_jsonl(tmp_path / "chat.jsonl", CHAT_ROWS)
    config = make_config(tmp_path, base_model_dir, {"path": str(chat), "chat_template": "chatml",
                                                    "system_prompt": "You are the town guide."},
                         save_steps=20, max_steps=40, learning_rate=3.0e-2)
    result = runner.invoke(train_app, [str(config)])
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    for folder in (out, out / "checkpoint-20"):
        assert folder_template(folder) == CHATML  # the adapter and its checkpoints carry the template
    assert folder_template(base_model_dir) is None

    gen = importlib.import_module("lora_cli.generate")  # the module; lora_cli.generate is the API function
    from lora_cli.generate import load_for_generation

    seen = []
    real = gen.render_prompt
    monkeypatch.setattr(gen, "render_prompt", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    turns = "Who is the mayor 3?\n/exit\n"
    answers = tmp_path / "answers.jsonl"
    result = runner.invoke(generate_app, [str(base_model_dir), "--adapter", str(out), "--chat", "--output",
                                          str(answers), "--temperature", "0", "--max-new-tokens", "40"], input=turns)
    assert result.exit_code == 0, result.output
    expected = ("<|im_start|>system\nYou are the town guide.<|im_end|>\n"
                "<|im_start|>user\nWho is the mayor 3?<|im_end|>\n<|im_start|>assistant\n")
    assert seen[0] == (expected, False)
    # the prompt is exactly what training saw before the reply
    _, tokenizer = load_for_generation(str(base_model_dir), out)
    row = {"messages": [{"role": "user", "content": "Who is the mayor 3?"},
                        {"role": "assistant", "content": "The mayor is Orla Fenwick."}]}
    example, _ = data.tokenize_row(row, "chat", tokenizer, 128, False, system_prompt="You are the town guide.")
    assert tokenizer.decode(example.input_ids, skip_special_tokens=False).startswith(expected)
    # it learned the reply and to stop at the base tokenizer's EOS, long before max-new-tokens
    record = json.loads(answers.read_text().splitlines()[0])
    assert record["response"] == "The mayor is Orla Fenwick."


def test_merge_carries_the_template(tmp_path, base_model_dir):
    from lora_cli.cli import merge_app

    config = make_config(tmp_path, base_model_dir, {"path": str(write_jsonl(tmp_path / "c.jsonl", CHAT_ROWS)),
                                                    "chat_template": "llama3", "max_length": 256}, max_steps=2)
    result = runner.invoke(train_app, [str(config)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(merge_app, [str(tmp_path / "out"), str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output
    assert folder_template(tmp_path / "merged") == LLAMA3


def test_dry_run_prints_rows_and_tokens_per_source(tmp_path, base_model_dir):
    chat = write_jsonl(tmp_path / "chat.jsonl", CHAT_ROWS)
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", ALPACA_ROWS)
    pc = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": f"Q{i}:", "completion": " A."} for i in range(6)])
    config = make_config(tmp_path, base_model_dir, {
        "path": [str(chat), {"path": str(alpaca), "take": 3}, {"path": str(pc), "format": "prompt_completion"}],
        "chat_template": "chatml", "max_length": 256})
    result = runner.invoke(train_app, [str(config), "--dry-run"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert f"[0] {chat} (chat): 12 rows, 12 examples," in out
    assert f"[1] {alpaca} (alpaca): 3 of 10 rows (take), 3 examples," in out
    assert f"[2] {pc} (prompt_completion): 6 rows, 6 examples," in out
    assert "total: 21 rows, 21 examples," in out
    assert "data (chat+alpaca+prompt_completion): 21 train" in out


@pytest.mark.parametrize("data_section, message", [
    ({"chat_template": "chatlm"}, "did you mean `chatml`?"),
    ({"chat_template": "missing/template.jinja"}, "no such file"),
    ({"path": [{"path": "PLACEHOLDER", "tkae": 3}]}, "did you mean `take`?"),
])
def test_bad_keys_names_and_files_exit_2(tmp_path, base_model_dir, data_section, message):
    chat = str(write_jsonl(tmp_path / "chat.jsonl", CHAT_ROWS))
    section = {"path": chat, **data_section}
    if isinstance(section["path"], list):
        section["path"][0]["path"] = chat
    result = runner.invoke(train_app, [str(make_config(tmp_path, base_model_dir, section)), "--dry-run"])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_a_resumed_run_covers_every_source(tmp_path, base_model_dir):
    import shutil

    chat = write_jsonl(tmp_path / "chat.jsonl", CHAT_ROWS)
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", ALPACA_ROWS)
    section = {"path": [str(chat), {"path": str(alpaca), "take": 5}], "chat_template": "chatml", "max_length": 256}
    config = make_config(tmp_path, base_model_dir, section, max_steps=4, save_steps=2)
    assert runner.invoke(train_app, [str(config)]).exit_code == 0
    cut = tmp_path / "cut"  # what a run killed after checkpoint-2 leaves
    shutil.copytree(tmp_path / "out" / "checkpoint-2", cut / "checkpoint-2")
    resume = [str(config), f"train.output_dir={cut}", "train.resume_from_checkpoint=auto"]
    write_jsonl(alpaca, [{**row, "output": "blue"} for row in ALPACA_ROWS])  # the second source changed
    result = runner.invoke(train_app, resume)
    assert result.exit_code == 2 and "data differs" in result.output, result.output
    write_jsonl(alpaca, ALPACA_ROWS)
    result = runner.invoke(train_app, resume)
    assert result.exit_code == 0, result.output


SMOLLM2 = Path(__file__).resolve().parents[1] / "models" / "SmolLM2-135M-Instruct"


@pytest.mark.slow
@pytest.mark.skipif(not (SMOLLM2 / "tokenizer.json").is_file(), reason="run scripts/fetch_smollm2.py first")
def test_chatml_renders_as_smollm2s_own_template():
    """On a real ChatML tokenizer (eos <|im_end|>) our chatml is its template, less SmolLM2's default system line;
    as a base tokenizer (eos <|endoftext|>) each reply ends with that one token."""
    from lora_cli.models import load_tokenizer

    tok = load_tokenizer(str(SMOLLM2))
    own = tok.chat_template
    conversation = [{"role": "system", "content": "Be brief."}, *CHAT_ROWS[0]["messages"]]
    apply_template_setting(tok, "chatml")
    for prompt in (False, True):
        messages = conversation[:2] if prompt else conversation
        assert (tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
                == tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt, chat_template=own))
    tok.eos_token = "<|endoftext|>"
    example, _ = data.tokenize_row({"messages": conversation}, "chat", tok, 256, False)
    assert trained_text(example, tok) == "The mayor is Orla Fenwick.<|endoftext|>"
    assert example.input_ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == 3  # markers are single tokens
