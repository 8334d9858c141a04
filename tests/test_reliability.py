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
from helpers import assert_close, logits, make_our_adapter, randomise_lora
from lora_cli import data
from lora_cli.adapter import load_adapter
from lora_cli.cli import generate_app, main_app, merge_app, train_app
from lora_cli.config import Config, validate_config
from lora_cli.data import IGNORE_INDEX
from lora_cli.errors import UserError
from lora_cli.inject import lora_layers
from lora_cli.layout import CONFIG_NAME, WEIGHTS_NAME
from lora_cli.models import load_base_model, load_tokenizer

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


# --- item 5: a damaged base model ----------------------------------------------------------------------------

DAMAGED = ("model.safetensors", "damaged or incomplete", "Re-download")


@pytest.fixture
def truncated_base(tiny_model_dir, tmp_path) -> Path:
    base = copy_model(tiny_model_dir, tmp_path, "truncated")
    cut_in_half(base / "model.safetensors")
    return base


def test_truncated_base_in_lora_train(truncated_base, tmp_path):
    result = invoke(train_app, train_config(tmp_path, truncated_base))
    assert_exit_2(result, *DAMAGED, str(truncated_base / "model.safetensors"))
    assert not (tmp_path / "out").exists()


def test_truncated_base_in_lora_merge(tiny_model_dir, truncated_base, tmp_path):
    adapter = make_our_adapter(tiny_model_dir("llama"), tmp_path / "adapter")
    result = invoke(merge_app, adapter, tmp_path / "merged", "--base", truncated_base)
    assert_exit_2(result, *DAMAGED)
    assert not (tmp_path / "merged").exists()


def test_truncated_base_in_lora_generate(truncated_base):
    result = invoke(generate_app, truncated_base, "--prompt", "hello", "--temperature", "0", "--max-new-tokens", "2")
    assert_exit_2(result, *DAMAGED)


def test_truncated_base_in_the_hub_cache_names_the_cached_file(tiny_model_dir, tmp_path, monkeypatch):
    import huggingface_hub.constants

    snapshot = tmp_path / "hub" / "models--org--tiny" / "snapshots" / "abc123"
    shutil.copytree(tiny_model_dir("llama"), snapshot)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("abc123")
    cut_in_half(snapshot / "model.safetensors")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(UserError) as err:
        load_base_model("org/tiny")
    assert str(snapshot / "model.safetensors") in str(err.value)
    assert "hf download org/tiny --force-download" in str(err.value)


def _shard(base: Path) -> list[str]:
    """Rewrite the base's weights as two shards plus an index, as large models come."""
    tensors = load_file(str(base / "model.safetensors"))
    (base / "model.safetensors").unlink()
    keys = list(tensors)
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    halves = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
    for name, part in zip(names, halves):
        save_file({k: tensors[k] for k in part}, str(base / name), metadata={"format": "pt"})
    weight_map = {k: name for name, part in zip(names, halves) for k in part}
    (base / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return names


@pytest.mark.parametrize("damage", ["missing-shard", "truncated-shard", "truncated-bin", "empty-file"])
def test_damaged_weight_files_are_named(tiny_model_dir, tmp_path, damage):
    base = copy_model(tiny_model_dir, tmp_path)
    if damage == "missing-shard":
        (base / _shard(base)[1]).unlink()
        culprit, why = base / "model-00002-of-00002.safetensors", "missing"
    elif damage == "truncated-shard":
        cut_in_half(base / _shard(base)[1])
        culprit, why = base / "model-00002-of-00002.safetensors", "incomplete metadata"
    elif damage == "truncated-bin":
        torch.save(load_file(str(base / "model.safetensors")), base / "pytorch_model.bin")
        (base / "model.safetensors").unlink()
        cut_in_half(base / "pytorch_model.bin")
        culprit, why = base / "pytorch_model.bin", "cut short"
    else:
        (base / "model.safetensors").write_bytes(b"")
        culprit, why = base / "model.safetensors", "header too small"
    with pytest.raises(UserError) as err:
        load_base_model(str(base))
    message = str(err.value)
    assert str(culprit) in message and why in message and "Re-download" in message


def test_weights_of_another_shape_than_the_config(tiny_model_dir, tmp_path):
    base = copy_model(tiny_model_dir, tmp_path)
    tensors = load_file(str(base / "model.safetensors"))
    tensors["lm_head.weight"] = tensors["lm_head.weight"][:5].contiguous()
    save_file(tensors, str(base / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UserError, match="do not fit its config.json"):
        load_base_model(str(base))


@pytest.mark.parametrize("content,problem", [
    (b'{"model_type": "llama",', "is not valid JSON"),
    (b'{"model_type": "\xff"}', "is not valid JSON"),
    (b"[1, 2]", "must hold a JSON object"),
])
def test_broken_config_json_is_named(tiny_model_dir, tmp_path, content, problem):
    base = copy_model(tiny_model_dir, tmp_path)
    (base / "config.json").write_bytes(content)
    for load in (load_tokenizer, load_base_model):  # the tokenizer raised a TypeError on a JSON list
        with pytest.raises(UserError) as err:
            load(str(base))
        assert str(base / "config.json") in str(err.value) and problem in str(err.value)


def test_wrong_typed_config_json_field_is_named(tiny_model_dir, tmp_path):
    """transformers' own validation error (huggingface_hub's, neither OSError nor ValueError) was a traceback."""
    from lora_cli.estimate import read_model_config

    base = copy_model(tiny_model_dir, tmp_path)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "hidden_size": "big"}))
    cfg = validate_config({"model": {"name_or_path": str(base)}, "data": {"path": "d.jsonl"}})
    for load in (lambda: load_tokenizer(str(base)), lambda: load_base_model(str(base)), lambda: read_model_config(cfg)):
        with pytest.raises(UserError) as err:
            load()
        message = str(err.value)
        assert str(base / "config.json") in message and "hidden_size" in message and "re-download" in message


@pytest.mark.parametrize("field", ["num_attention_heads", "vocab_size"])
def test_a_config_json_size_of_0_is_named_by_every_command(tiny_model_dir, tmp_path, field):
    """num_attention_heads: 0 was a ZeroDivisionError traceback in lora-train (transformers' config check)."""
    from typer.testing import CliRunner

    from lora_cli.cli import train_app

    base = copy_model(tiny_model_dir, tmp_path)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, field: 0}))
    expected = f"{base / 'config.json'} has sizes that describe no model ({field}: 0; each must be a positive number)"
    for load in (load_tokenizer, load_base_model):
        with pytest.raises(UserError) as err:
            load(str(base))
        assert expected in str(err.value)
    (tmp_path / "data.jsonl").write_text('{"text": "hello"}\n')
    (tmp_path / "config.yaml").write_text(f"model: {{name_or_path: {base}}}\n"
                                          f"data: {{path: {tmp_path / 'data.jsonl'}}}\n"
                                          f"train: {{output_dir: {tmp_path / 'out'}}}\n")
    result = CliRunner().invoke(train_app, [str(tmp_path / "config.yaml")])
    assert result.exit_code == 2 and expected in " ".join(result.output.split()), result.output


def test_an_adapter_folder_given_as_the_base_says_what_to_give_instead(tmp_path):
    from lora_cli.models import check_source

    (tmp_path / "adapter_config.json").write_text("{}")
    for what in ("model.name_or_path", "--base"):  # neither lora-train nor lora-merge has an --adapter option
        with pytest.raises(UserError) as err:
            check_source(str(tmp_path), what)
        assert f"{what} '{tmp_path}' is an adapter folder" in str(err.value) and "--adapter" not in str(err.value)
        assert "base_model_name_or_path" in str(err.value)
    (tmp_path / "adapter_config.json").unlink()
    with pytest.raises(UserError, match="is a folder without config.json"):
        check_source(str(tmp_path))


def test_merge_says_where_a_missing_base_name_came_from(tiny_model_dir, tmp_path, monkeypatch):
    """lora-train writes the base as its config gave it: a relative folder does not resolve from another folder."""
    from lora_cli.merge import merge_adapter

    adapter = make_our_adapter(tiny_model_dir("llama"), tmp_path / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "models/gone"}))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for verify in (False, True):
        with pytest.raises(UserError) as err:
            merge_adapter(adapter, tmp_path / "merged", verify_logits=verify)
        message = str(err.value)
        assert "models/gone" in message and str(adapter / "adapter_config.json") in message and "--base" in message
    assert not (tmp_path / "merged").exists()


# --- item 5: wrong-typed adapter_config.json fields ----------------------------------------------------------

BAD_FIELDS = {
    "lora_alpha": ("sixteen", "a number"),
    "r": ("eight", "a positive whole number"),
    "target_modules": (123, "a list of module names"),
    "rank_pattern": ({"q_proj": "x"}, "an object mapping module names to positive whole numbers"),
    "alpha_pattern": (["q_proj"], "an object mapping module names to numbers"),
    "lora_dropout": ("x", "a number from 0 to 1"),
    "layers_to_transform": ("a", "a layer index or a list of layer indices"),
    "use_rslora": ("yes", "true or false"),
    "use_dora": ("no", "true or false"),
    "init_lora_weights": ([1], "true, false or a method name"),
    "base_model_name_or_path": (5, "a model name or folder"),
    "revision": (5, "a Hub branch, tag or commit"),
}
BAD_VALUES = [(key, value, expected) for key, (value, expected) in BAD_FIELDS.items()] + [
    ("r", 0, "a positive whole number"),
    ("r", -4, "a positive whole number"),
    ("r", 4.5, "a positive whole number"),
    ("r", True, "a positive whole number"),
    ("rank_pattern", ["q_proj"], "an object mapping"),
    ("rank_pattern", {"q_proj": 0}, "an object mapping"),
    ("target_modules", ["q_proj", 1], "a list of module names"),
]


def _edit_config(adapter: Path, **changes) -> Path:
    config = json.loads((adapter / CONFIG_NAME).read_text())
    config.update(changes)
    (adapter / CONFIG_NAME).write_text(json.dumps(config))
    return adapter


@pytest.fixture(scope="module")
def good_adapter(tiny_model_dir, tmp_path_factory) -> Path:
    return make_our_adapter(tiny_model_dir("llama"), tmp_path_factory.mktemp("good") / "adapter")


@pytest.mark.parametrize("key,value,expected", BAD_VALUES, ids=lambda v: repr(v)[:20])
@pytest.mark.parametrize("command", ["merge", "generate"])
def test_wrong_typed_adapter_config_field(good_adapter, tiny_model_dir, tmp_path, command, key, value, expected):
    adapter = _edit_config(Path(shutil.copytree(good_adapter, tmp_path / "adapter")), **{key: value})
    base = tiny_model_dir("llama")
    if command == "merge":
        result = invoke(merge_app, adapter, tmp_path / "merged", "--base", base)
    else:
        result = invoke(generate_app, base, "--adapter", adapter, "--prompt", "hi", "--max-new-tokens", "1")
    assert_exit_2(result, str(adapter / CONFIG_NAME), f"{key} must be {expected}", json.dumps(value))


def test_every_wrong_field_is_listed_at_once(good_adapter, tmp_path):
    adapter = _edit_config(Path(shutil.copytree(good_adapter, tmp_path / "adapter")), r="eight", lora_alpha="x")
    with pytest.raises(UserError, match="2 invalid fields: r must be .*; lora_alpha must be"):
        load_adapter(tiny.make_model("llama"), adapter)


@pytest.mark.parametrize("key,value", [
    ("alora_invocation_tokens", [5, 6]), ("use_qalora", True), ("target_parameters", ["mlp.experts.down_proj"]),
    ("trainable_token_indices", [1, 2]), ("lora_bias", True), ("init_lora_weights", "pissa_niter_4"),
    ("init_lora_weights", "olora"),
])
def test_peft_features_that_change_the_math_are_refused(good_adapter, tmp_path, key, value):
    adapter = _edit_config(Path(shutil.copytree(good_adapter, tmp_path / "adapter")), **{key: value})
    with pytest.raises(UserError, match=f"does not support: {key}="):
        load_adapter(tiny.make_model("llama"), adapter)


@pytest.mark.parametrize("targets,exclude,excluded", [
    (["q_proj", "v_proj"], r".*\.0\.self_attn\.q_proj", "0.self_attn.q_proj"),  # a regex over the whole path
    ("all-linear", ["down_proj"], "down_proj"),  # names matched as the end of the path
])
def test_peft_adapter_with_exclude_modules_loads_and_matches_peft(tmp_path, targets, exclude, excluded):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, exclude_modules=exclude, task_type="CAUSAL_LM")
    peft_model = get_peft_model(tiny.make_model("llama"), config)
    randomise_lora(peft_model, seed=5)
    peft_model.save_pretrained(tmp_path)
    model = tiny.make_model("llama")
    load_adapter(model, tmp_path)
    wrapped = list(lora_layers(model))
    assert len(wrapped) == len(peft_model.targeted_module_names) and not any(p.endswith(excluded) for p in wrapped)
    assert_close(logits(model.eval()), logits(peft_model.eval()), 1e-5)


# --- item 7: non-finite adapters are refused on load ---------------------------------------------------------


def _poison(adapter: Path, count: int, value=float("nan"), dtype=None) -> list[str]:
    tensors = load_file(str(adapter / WEIGHTS_NAME))
    names = sorted(tensors)[:count]
    for name in names:
        tensors[name] = tensors[name].to(dtype) if dtype is not None else tensors[name].clone()
        tensors[name].view(-1)[0] = value if dtype is None else 7
    save_file(tensors, str(adapter / WEIGHTS_NAME), metadata={"format": "pt"})
    return names


def test_nan_adapter_in_lora_generate(tiny_model_dir, tmp_path):
    adapter = make_our_adapter(tiny_model_dir("llama"), tmp_path / "adapter")
    names = _poison(adapter, 2)
    result = invoke(generate_app, tiny_model_dir("llama"), "--adapter", adapter, "--prompt", "hi",
                    "--temperature", "0", "--max-new-tokens", "2")
    assert_exit_2(result, str(adapter / WEIGHTS_NAME), "non-finite values (NaN or inf) in 2 of its 8 tensors",
                  *names, "checkpoint")


def test_inf_adapter_in_lora_merge_fails_before_the_base_loads(tiny_model_dir, tmp_path, monkeypatch):
    adapter = make_our_adapter(tiny_model_dir("llama"), tmp_path / "adapter")
    names = _poison(adapter, 1, value=float("inf"))

    def must_not_load(*args, **kwargs):
        raise AssertionError("the base model was loaded for a broken adapter")

    monkeypatch.setattr("lora_cli.models.load_base_model", must_not_load)
    result = invoke(merge_app, adapter, tmp_path / "merged")
    assert_exit_2(result, "non-finite values", names[0])
    assert not (tmp_path / "merged").exists()


def test_many_non_finite_tensors_are_listed_up_to_a_limit(tiny_model_dir, tmp_path):
    adapter = make_our_adapter(tiny_model_dir("llama"), tmp_path / "adapter", target_modules="all-linear")
    names = _poison(adapter, 14)
    with pytest.raises(UserError) as err:
        load_adapter(tiny.make_model("llama"), adapter)
    message = str(err.value)
    assert "in 14 of its 28 tensors" in message and "and 4 more" in message
    assert all(name in message for name in names[:10]) and names[13] not in message


def test_integer_adapter_tensors_are_refused(tiny_model_dir, tmp_path):
    adapter = make_our_adapter(tiny_model_dir("llama"), tmp_path / "adapter")
    names = _poison(adapter, 1, dtype=torch.int32)
    with pytest.raises(UserError, match="holds 1 tensor that is not float32, float16 or bfloat16") as err:
        load_adapter(tiny.make_model("llama"), adapter)
    assert f"{names[0]} (int32)" in str(err.value)


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


# --- item 9: data with nothing to train ----------------------------------------------------------------------


def chat(*turns: str) -> dict:
    roles = ["user", "assistant"]
    return {"messages": [{"role": roles[i % 2], "content": text} for i, text in enumerate(turns)]}


def build(tmp_path, rows, tokenizer, **kwargs):
    return data.build_datasets(str(write_jsonl(tmp_path / "d.jsonl", rows)), tokenizer, **kwargs)


def data_error(tmp_path, rows, tokenizer, **kwargs) -> str:
    with pytest.raises(UserError) as err:
        build(tmp_path, rows, tokenizer, **kwargs)
    return str(err.value)


def test_chat_without_any_assistant_turn(tmp_path, tokenizer):
    message = data_error(tmp_path, [{"messages": [{"role": "user", "content": f"q{i}"}]} for i in range(40)], tokenizer)
    assert "of its 40 rows, 40 have no assistant reply to train on" in message
    assert "max_length" not in message and "all 0" not in message


def test_prompts_that_fill_max_length_are_counted(tmp_path, tokenizer):
    message = data_error(tmp_path, [chat("q " * 100, "a")] * 5, tokenizer, max_length=32)
    assert "of its 5 rows, 5 have a prompt that fills data.max_length=32" in message
    assert "increase data.max_length" in message


def test_mixed_reasons_are_each_counted(tmp_path, tokenizer):
    rows = [chat("q " * 100, "a"), chat("q", ""), {"messages": [{"role": "user", "content": "q"}]}]
    message = data_error(tmp_path, rows, tokenizer, max_length=32)
    assert "of its 3 rows, 1 have no assistant reply" in message
    assert "1 have only empty assistant replies" in message and "1 have a prompt that fills" in message


@pytest.mark.parametrize("rows,what", [
    ([chat("q", "")] * 4, "4 have only empty assistant replies"),
    ([chat("q", "  \n")] * 4, "4 have only empty assistant replies"),
    ([{"instruction": "do", "output": ""}] * 4, "4 have an empty output"),
    ([{"text": ""}] * 4, "4 are empty"),
])
def test_only_empty_responses_is_an_error(tmp_path, tokenizer, rows, what):
    assert what in data_error(tmp_path, rows, tokenizer, max_length=256)


def test_one_empty_reply_among_normal_ones_is_dropped_and_counted(tmp_path, tokenizer):
    rows = [chat(f"q{i}", "" if i == 3 else "an answer") for i in range(10)]
    bundle = build(tmp_path, rows, tokenizer)
    assert (bundle.stats.num_train, bundle.stats.num_dropped, bundle.stats.num_without_response) == (9, 1, 1)
    assert 3 not in [e.row_index for e in bundle.train]


def test_an_empty_turn_inside_a_conversation_is_not_trained(tmp_path, tokenizer):
    bundle = build(tmp_path, [chat("q1", "the first answer", "q2", "", "q3", "the last answer")], tokenizer)
    example = bundle.train[0]
    trained = tokenizer.decode([label for label in example.labels if label != IGNORE_INDEX])
    # Both answers, each with its end-of-turn token; nothing for the empty reply between them.
    assert trained == "the first answer<|im_end|>the last answer<|im_end|>"


def test_a_conversation_the_assistant_opens(tmp_path, tokenizer):
    row = {"messages": [{"role": "assistant", "content": "Hello there!"}, {"role": "user", "content": "hi"},
                        {"role": "assistant", "content": "How are you?"}]}
    example = build(tmp_path, [row], tokenizer).train[0]
    trained = tokenizer.decode([label for label in example.labels if label != IGNORE_INDEX])
    assert trained == "Hello there!<|im_end|>How are you?<|im_end|>"


def test_misspelt_messages_field_is_named(tmp_path, tokenizer):
    rows = [chat("q", "a"), {"mesages": chat("q", "a")["messages"]}]
    message = data_error(tmp_path, rows, tokenizer)
    assert "row 2" in message and "neither a 'messages' nor a 'conversations' field" in message
    assert "did you mean 'messages' for 'mesages'" in message and "'conversations' must be" not in message


def test_misspelt_field_in_the_first_row_is_suggested(tmp_path, tokenizer):
    message = data_error(tmp_path, [{"mesages": chat("q", "a")["messages"]}], tokenizer)
    assert "did you mean 'messages' for 'mesages'?" in message


def test_json_nested_too_deeply(tmp_path):
    (tmp_path / "deep.jsonl").write_text("[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(UserError, match="line 1 is not valid JSON"):
        data.load_rows(str(tmp_path / "deep.jsonl"))


# --- item 9: booleans are not numbers ------------------------------------------------------------------------


def _numeric_fields() -> list[tuple[str, str, bool]]:
    """(section, key, is a list of numbers) for every number field of the config schema, read off its types."""
    fields = []
    for section, section_field in Config.model_fields.items():
        for key, field in section_field.annotation.model_fields.items():
            members = get_args(field.annotation) or (field.annotation,)
            if any(member in (int, float) for member in members):
                fields.append((section, key, False))
            elif any(get_origin(m) is list and get_args(m)[0] in (int, float) for m in members):
                fields.append((section, key, True))
    return fields


NUMERIC_FIELDS = _numeric_fields()


def test_the_numeric_fields_are_found():
    keys = {f"{section}.{key}" for section, key, _ in NUMERIC_FIELDS}
    assert {"lora.r", "lora.alpha", "data.max_length", "train.learning_rate", "train.max_steps",
            "lora.layers_to_transform", "train.seed"} <= keys
    assert "model.trust_remote_code" not in keys and len(keys) >= 20


def _minimal(section: str, key: str, value) -> dict:
    config = {"model": {"name_or_path": "org/model"}, "data": {"path": "train.jsonl"}}
    config.setdefault(section, {})[key] = value
    return config


@pytest.mark.parametrize("section,key,is_list", NUMERIC_FIELDS, ids=[f"{s}.{k}" for s, k, _ in NUMERIC_FIELDS])
@pytest.mark.parametrize("flag", [True, False])
def test_a_boolean_is_refused_for_every_number(section, key, is_list, flag):
    for value in ([flag, [flag]] if is_list else [flag]):
        with pytest.raises(UserError) as err:
            validate_config(_minimal(section, key, value), source="config.yaml")
        assert f"{section}.{key}: must be" in str(err.value)  # val_size has its own wording; it refused bools before


@pytest.mark.parametrize("key", ["lora.alpha", "train.learning_rate", "train.max_grad_norm", "train.epochs"])
@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_infinity_and_nan_are_refused(key, value):
    section, name = key.split(".")
    with pytest.raises(UserError, match=rf"{key}: must be a finite number"):
        validate_config(_minimal(section, name, value), source="config.yaml")


def test_lora_r_true_on_the_command_line(tiny_model_dir, tmp_path):
    result = invoke(train_app, train_config(tmp_path, tiny_model_dir("llama")), "lora.r=true")
    assert_exit_2(result, "lora.r: must be a number, not true or false (got true)")
