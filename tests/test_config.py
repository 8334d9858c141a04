"""The config schema: defaults, overrides, and error messages that name the key and the fix."""

from pathlib import Path

import pytest
import yaml

from lora_cli.config import Config, config_to_yaml, load_config, parse_overrides, validate_config
from lora_cli.errors import UserError

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
MINIMAL = "model:\n  name_or_path: org/model\ndata:\n  path: train.jsonl\n"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def error_of(data: dict) -> str:
    with pytest.raises(UserError) as info:
        validate_config(data, source="config.yaml")
    return str(info.value)


def minimal(**sections) -> dict:
    """The smallest valid config, with some sections' keys added or replaced."""
    data = {"model": {"name_or_path": "org/model"}, "data": {"path": "train.jsonl"}}
    for name, keys in sections.items():
        data[name] = {**data.get(name, {}), **keys}
    return data


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_example_configs_validate(path):
    load_config(path)


def test_example_configs_exist():
    assert {"alpaca_llama.yaml", "chat_qwen2.yaml", "t4_3b.yaml"} <= {p.name for p in CONFIGS}


def test_defaults(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL))
    assert cfg.model.dtype == "auto" and cfg.model.revision is None and cfg.model.trust_remote_code is False
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules) == (8, 16.0, 0.0, None)
    assert (cfg.data.split, cfg.data.format, cfg.data.max_length, cfg.data.val_size) == ("train", "auto", 1024, 0)
    assert (cfg.train.learning_rate, cfg.train.micro_batch_size, cfg.train.epochs) == (2e-4, 4, 1.0)
    assert (cfg.train.precision, cfg.train.optimizer, cfg.train.seed) == ("auto", "adamw", 42)
    assert cfg.train.eval_steps is None and cfg.train.save_steps is None and cfg.train.max_steps is None


def test_empty_section_means_defaults(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL + "lora:\n  # r: 16\ntrain:\n"))
    assert cfg.lora.r == 8 and cfg.train.epochs == 1.0


def test_override_values_are_typed_like_yaml():
    parsed = parse_overrides(
        [
            "train.learning_rate=1e-4",  # PyYAML alone would give the string '1e-4'
            "lora.target_modules=[q_proj,v_proj]",
            "train.max_steps=10",
            "train.merge_at_end=true",
            "model.dtype=float16",
            "model.revision='1e5'",  # quoted: stays a string
            "a.b.c=x",  # nested dicts are created
        ]
    )
    assert parsed["train"] == {"learning_rate": 1e-4, "max_steps": 10, "merge_at_end": True}
    assert isinstance(parsed["train"]["learning_rate"], float)
    assert parsed["lora"] == {"target_modules": ["q_proj", "v_proj"]}
    assert parsed["model"] == {"dtype": "float16", "revision": "1e5"}
    assert parsed["a"] == {"b": {"c": "x"}}


def test_overrides_merge_into_file(tmp_path):
    path = write(tmp_path, MINIMAL + "lora:\n  r: 4\n  alpha: 8\n")
    cfg = load_config(path, ["lora.r=16", "train.learning_rate=3e-5", "lora.layers_to_transform=2"])
    assert (cfg.lora.r, cfg.lora.alpha, cfg.train.learning_rate) == (16, 8.0, 3e-5)
    assert cfg.lora.layers_to_transform == [2]  # a single int is a one-layer list
    assert cfg.model.name_or_path == "org/model"


def test_section_override_merges_with_earlier_dotted_overrides(tmp_path):
    """A whole-section override merges into the section as the dotted ones do: an earlier `lora.r=2` survives a
    later `lora={alpha: 4}`; a key both give takes the later value."""
    path = write(tmp_path, MINIMAL + "lora:\n  r: 4\n  alpha: 8\ntrain:\n  output_dir: from-yaml\n")
    cfg = load_config(path, ["lora.r=2", "lora={alpha: 4}", "train.output_dir=from-override", "train={max_steps: 2}"])
    assert (cfg.lora.r, cfg.lora.alpha) == (2, 4.0)
    assert (cfg.train.output_dir, cfg.train.max_steps) == ("from-override", 2)
    cfg = load_config(path, ["lora.r=2", "lora={r: 16}", "lora.alpha=32"])
    assert (cfg.lora.r, cfg.lora.alpha) == (16, 32.0)


def test_unparsable_list_override_hint_quotes_the_items(tmp_path):
    """`?` inside a flow list is YAML syntax; the hint quotes each item, so the fix is still a list (quoting the
    whole list would make it one string, which train.eval_prompts reads as a file path)."""
    path = write(tmp_path, MINIMAL)
    with pytest.raises(UserError) as info:
        load_config(path, ["train.eval_prompts=[Who is the mayor?, Name it]"])
    message = str(info.value)
    suggestion = """train.eval_prompts='["Who is the mayor?", "Name it"]'"""
    assert f"quote each item of the list as a YAML string inside shell quotes, e.g. {suggestion}." in message
    fixed = suggestion.replace("'", "")  # what the shell hands over
    assert load_config(path, [fixed]).train.eval_prompts == ["Who is the mayor?", "Name it"]


@pytest.mark.parametrize(
    "section, key, suggestion",
    [
        ("lora", "rr", "`lora.r`"),  # misspelling in the same section
        ("train", "learnig_rate", "`train.learning_rate`"),
        ("lora", "learning_rate", "`train.learning_rate`"),  # right key, wrong section
        ("lora", "lora_alpha", "`lora.alpha`"),  # PEFT / axolotl names
        ("lora", "lora_r", "`lora.r`"),
        ("lora", "lora_dropout", "`lora.dropout`"),
        ("train", "lr", "`train.learning_rate`"),
        ("train", "batch_size", "`train.micro_batch_size`"),
        ("train", "num_epochs", "`train.epochs`"),
    ],
)
def test_unknown_key_suggests(section, key, suggestion):
    message = error_of(minimal(**{section: {key: 1}}))
    assert f"{section}.{key}: unknown key; did you mean {suggestion}?" in message


def test_unknown_top_level_keys():
    data = minimal()
    data.update(training={}, seed=1)
    message = error_of(data)
    assert "training: unknown key; did you mean `train`?" in message
    assert "seed: unknown key; did you mean `train.seed`? (it goes under `train:`)" in message


def test_unknown_key_without_a_close_match_lists_valid_keys():
    assert "lora.zzzz: unknown key; the keys under `lora:` are r, alpha," in error_of(minimal(lora={"zzzz": 1}))


# (config dict, key that must be named, phrase of the fix)
BAD_CONFIGS = {
    "negative lr": (minimal(train={"learning_rate": -1}), "train.learning_rate", "must be greater than 0 (got -1)"),
    "zero rank": (minimal(lora={"r": 0}), "lora.r", "must be greater than 0"),
    "dropout 1": (minimal(lora={"dropout": 1.0}), "lora.dropout", "must be less than 1"),
    "short max_length": (minimal(data={"max_length": 4}), "data.max_length", "must be at least 8"),
    "fractional steps": (minimal(train={"max_steps": 1.5}), "train.max_steps", "must be a whole number"),
    "text for number": (minimal(train={"epochs": "many"}), "train.epochs", "must be a number (got 'many')"),
    "text for bool": (minimal(train={"merge_at_end": "maybe"}), "train.merge_at_end", "must be true or false"),
    "list for string": (minimal(data={"split": ["a"]}), "data.split", "must be a string"),
    "section not mapping": ({**minimal(), "lora": 8}, "lora", "must be a section"),
    "bad enum": (minimal(train={"precision": "fp8"}), "train.precision", "must be one of auto, fp16, bf16, fp32"),
    "enum case": (minimal(model={"dtype": "bf16"}), "model.dtype", "did you mean `bfloat16`?"),
    "no model.name_or_path": ({"model": {}, "data": {"path": "x"}}, "model.name_or_path", "add `name_or_path:`"),
    "no model section": ({"data": {"path": "x"}}, "model", "add a `model:` section"),
    "empty data.path": (minimal(data={"path": ""}), "data.path", "must not be empty"),
    "both val sources": (minimal(data={"val_size": 0.1, "val_path": "v.jsonl"}), "data.val_path", "only one of"),
    "val_size too big": (minimal(data={"val_size": 1.5}), "data.val_size", "a fraction in [0, 1)"),
    "negative layer": (minimal(lora={"layers_to_transform": [0, -1]}), "lora.layers_to_transform", "0 or more"),
    "targets as number": (minimal(lora={"target_modules": 5}), "lora.target_modules", "a list of module names"),
    "targets comma string": (minimal(lora={"target_modules": "q,v"}), "lora.target_modules", "write it as [q_proj"),
    "targets bad regex": (minimal(lora={"target_modules": "(q"}), "lora.target_modules", "not a valid regex"),
    "eval without val data": (minimal(train={"eval_steps": 10}), "train.eval_steps", "set data.val_size"),
    "tracker as number": (
        minimal(train={"report_to": 5}), "train.report_to", "a list of trackers such as [tensorboard]"
    ),
    "resume path empty": (minimal(train={"resume_from_checkpoint": ""}), "train.resume_from_checkpoint",
                          "must not be empty"),
    "patience without val data": (minimal(train={"early_stopping_patience": 2}), "train.early_stopping_patience",
                                  "needs validation data"),
}


@pytest.mark.parametrize("data, key, fix", BAD_CONFIGS.values(), ids=BAD_CONFIGS.keys())
def test_bad_config_names_key_and_fix(data, key, fix):
    message = error_of(data)
    assert f"  - {key}: " in message and fix in message
    assert "http" not in message and "Traceback" not in message


# (file text or None for no file, overrides, phrases that must appear)
BAD_FILES = {
    "missing file": (None, [], ["not found", "Check the path"]),
    "invalid yaml": (MINIMAL + "train:\n  epochs: [1\n", [], ["not valid YAML at line", "started at line 6", "spaces"]),
    "duplicate key": (MINIMAL + "train: {}\ntrain: {}\n", [], ["duplicate key 'train'", "line 6", "Keep one"]),
    "list at top": ("- a\n- b\n", [], ["must be a mapping of sections", "list"]),
    "override without =": (MINIMAL, ["train.epochs"], ["'train.epochs' is not key=value", "train.learning_rate=1e-4"]),
    "override empty key part": (MINIMAL, ["train..epochs=1"], ["is not key=value"]),
    "override bad value": (MINIMAL, ["lora.target_modules=[a,"], ["not valid YAML", "quote"]),
    "override bad type": (MINIMAL, ["lora.r=big"], ["lora.r: must be a whole number (got 'big')"]),
}


@pytest.mark.parametrize("text, overrides, phrases", BAD_FILES.values(), ids=BAD_FILES.keys())
def test_bad_file_or_override(tmp_path, text, overrides, phrases):
    path = tmp_path / "config.yaml" if text is None else write(tmp_path, text)
    with pytest.raises(UserError) as info:
        load_config(path, overrides)
    assert str(path) in str(info.value) or "Override" in str(info.value)
    for phrase in phrases:
        assert phrase in str(info.value)


def test_every_problem_reported_at_once(tmp_path):
    path = write(tmp_path, MINIMAL + "lora:\n  rr: 4\ntrain:\n  learning_rate: -1\n  precision: fp8\n")
    with pytest.raises(UserError) as info:
        load_config(path)
    assert str(info.value) == (
        f"{path} has 3 problems:\n"
        "  - lora.rr: unknown key; did you mean `lora.r`?\n"
        "  - train.learning_rate: must be greater than 0 (got -1)\n"
        "  - train.precision: must be one of auto, fp16, bf16, fp32 (got 'fp8')"
    )


def test_yaml_round_trip(tmp_path):
    cfg = load_config(
        write(tmp_path, MINIMAL),
        ["lora.target_modules=[q_proj,v_proj]", "lora.layers_to_transform=[0,2]", "train.max_grad_norm=null",
         "model.revision=1234567", "data.val_size=100", "train.adam_epsilon=1e-6"],
    )
    text = config_to_yaml(cfg)
    assert list(yaml.safe_load(text)) == ["model", "lora", "data", "train"]
    assert "precision: auto" in text  # defaults are written out
    again = load_config(write(tmp_path, text))
    assert again == cfg and isinstance(again, Config)
    assert again.model.revision == "1234567" and again.data.val_size == 100


def test_quantization_bit_4_is_load_in_4bit_and_other_widths_are_refused():
    alias = validate_config(minimal(model={"quantization_bit": 4}))
    assert alias == validate_config(minimal(model={"load_in_4bit": True}))
    assert alias.model.load_in_4bit and "quantization_bit" not in config_to_yaml(alias)
    assert validate_config(minimal()).model.load_in_4bit is False
    message = error_of(minimal(model={"quantization_bit": 8}))
    assert "model.quantization_bit: only 4 is supported" in message and "(got 8)" in message
    assert "did you mean `model.load_in_4bit`" in error_of({**minimal(), "quantization_bit": 4})


def test_loraplus_lr_ratio():
    assert validate_config(minimal()).lora.loraplus_lr_ratio is None
    assert validate_config(minimal(lora={"loraplus_lr_ratio": 16})).lora.loraplus_lr_ratio == 16.0
    assert "lora.loraplus_lr_ratio: must be greater than 0" in error_of(minimal(lora={"loraplus_lr_ratio": 0}))
    assert validate_config(minimal(lora={"loraplus_lr_ratio": 1000})).lora.loraplus_lr_ratio == 1000.0
    huge = " ".join(error_of(minimal(lora={"loraplus_lr_ratio": 1e30})).split())
    assert "lora.loraplus_lr_ratio: must be at most 1000: lora_B's learning rate is train.learning_rate times " \
           "this ratio" in huge and "recommends about 16" in huge


def test_the_readmes_key_list_is_every_key_with_its_default():
    """README.md's "Every key, with its default" block is what the schema holds: no key missing, none extra, and
    each default the same (a drift the README walkthrough found: the optimizer keys were missing)."""
    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    block = readme.split("Every key, with its default", 1)[1].split("```yaml", 1)[1].split("```", 1)[0]
    documented = yaml.safe_load(block)
    actual = validate_config(documented).model_dump(mode="json")  # the example's required values kept

    def flat(tree: dict) -> dict:
        return {f"{section}.{key}": value for section, values in tree.items() for key, value in values.items()}

    assert sorted(flat(documented)) == sorted(flat(actual))
    assert flat(documented) == flat(actual)
