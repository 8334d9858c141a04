"""The config schema for `lora-train CONFIG.yaml [key.sub=value ...]`, and errors that name the key and the fix.

Use `load_config` (file + overrides) or `validate_config` (a dict): every user mistake becomes ONE UserError
that lists every problem at once, one line per dotted key. Error wording and did-you-mean suggestions are
derived from the schema, so growing it is local: a new key is a new field with a default (old configs keep
working), a new section is a `_Section` subclass plus a field on `Config`, and a check that spans sections
goes in `_cross_section_problems`.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal, Sequence

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import ErrorDetails, PydanticCustomError

from .errors import UserError

Dtype = Literal["auto", "float16", "bfloat16", "float32"]
Precision = Literal["auto", "fp16", "bf16", "fp32"]
DataFormat = Literal["auto", "text", "alpaca", "chat"]
LrScheduler = Literal["cosine", "linear", "constant"]
LoraInit = Literal["default", "gaussian"]
Optimizer = Literal["adamw"]  # torch.optim.AdamW; a Literal so more can be added without a type change

ALL_LINEAR = "all-linear"


class _Section(BaseModel):
    # forbid: a misspelt key must be an error, never silently ignored.
    # coerce_numbers_to_str: YAML reads `revision: 1234567` as an int where a string was meant.
    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)


class ModelSection(_Section):
    name_or_path: str = Field(min_length=1)  # Hub id (org/name) or a local folder
    revision: str | None = None  # Hub branch, tag or commit; None = the default branch
    dtype: Dtype = "auto"  # dtype the frozen base weights are loaded in; auto = the half type of train.precision
    trust_remote_code: bool = False  # run modelling code shipped in the Hub repo (only for repos you trust)


class LoraSection(_Section):
    r: int = Field(8, gt=0)  # rank of the update matrices
    alpha: float = Field(16.0, gt=0)  # scale is alpha / r (alpha / sqrt(r) with use_rslora)
    dropout: float = Field(0.0, ge=0, lt=1)  # dropout on the LoRA input
    # list of module-name suffixes, a regex (full match on the module path), or "all-linear";
    # None = the architecture's attention projections
    target_modules: list[str] | str | None = None
    use_rslora: bool = False  # rank-stabilised scaling
    use_dora: bool = False  # weight-decomposed LoRA
    init: LoraInit = "default"  # default: B = 0 and A Kaiming-uniform (PEFT's default); gaussian: A ~ N(0, 1/r)
    layers_to_transform: list[int] | None = Field(None, min_length=1)  # decoder layer indices; None = all

    @field_validator("target_modules", mode="before")
    @classmethod
    def _check_target_modules(cls, value: Any) -> Any:
        # Checked by hand rather than by the union type, so a mistake gives one clear line, not one per member.
        if value is None:
            return None
        if isinstance(value, str):
            return _check_module_pattern(value)
        if isinstance(value, list) and value and all(isinstance(name, str) and name for name in value):
            return value
        raise PydanticCustomError(
            "target_modules", "must be a list of module names such as [q_proj, v_proj], a regex, or all-linear"
        )

    @field_validator("layers_to_transform", mode="before")
    @classmethod
    def _one_layer_is_a_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, int) and not isinstance(value, bool) else value

    @field_validator("layers_to_transform")
    @classmethod
    def _layers_not_negative(cls, value: list[int] | None) -> list[int] | None:
        if value and min(value) < 0:
            raise PydanticCustomError("layer_index", "layer indices must be 0 or more")
        return value


def _check_module_pattern(pattern: str) -> str:
    if not pattern.strip():
        raise PydanticCustomError("target_modules", "must not be empty; remove the key to use the default")
    # "q_proj,v_proj" is a valid regex that matches nothing: almost always a list written as one string.
    if re.fullmatch(r"\w+(\s*,\s*\w+)+", pattern):
        raise PydanticCustomError("target_modules", "looks like a comma-separated list; write it as [q_proj, v_proj]")
    if pattern != ALL_LINEAR:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise PydanticCustomError("target_modules", f"is not a valid regex ({exc}); use a list of names instead")
    return pattern


class DataSection(_Section):
    path: str = Field(min_length=1)  # a local .jsonl/.json/.txt file or folder, or a Hub dataset id
    split: str = Field("train", min_length=1)  # split to read when path is a Hub dataset
    format: DataFormat = "auto"  # auto = guess from the fields of the first record
    max_length: int = Field(1024, ge=8)  # tokens per example; longer ones are truncated
    train_on_inputs: bool = False  # False = loss on the response only (prompt tokens masked)
    val_size: int | float = 0  # fraction in [0, 1) or a count >= 1 of examples held out of path; 0 = none
    val_path: str | None = None  # a separate validation file, instead of val_size
    packing: bool = False  # concatenate examples into max_length blocks

    @field_validator("val_size", mode="before")
    @classmethod
    def _check_val_size(cls, value: Any) -> Any:
        if isinstance(value, str) and _looks_like_number(value):
            value = float(value)  # YAML 1.1 reads `1e-1` as a string
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if is_number and (0 <= value < 1 or (isinstance(value, int) and value >= 1)):
            return value
        raise PydanticCustomError(
            "val_size", "must be a fraction in [0, 1) such as 0.05, or a whole number of examples such as 200"
        )

    @field_validator("val_path")
    @classmethod
    def _not_both_val_sources(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and info.data.get("val_size", 0) > 0:
            raise PydanticCustomError(
                "val_source", "set only one of data.val_size (held out of data.path) or data.val_path, not both"
            )
        return value


class TrainSection(_Section):
    output_dir: str = Field("outputs/lora", min_length=1)  # adapter, checkpoints and lora_config.yaml go here
    overwrite_output_dir: bool = False  # False = refuse to write into a non-empty output_dir
    epochs: float = Field(1.0, gt=0)  # passes over the data (fractions allowed); ignored when max_steps is set
    max_steps: int | None = Field(None, gt=0)  # optimizer steps; overrides epochs when set
    micro_batch_size: int = Field(4, gt=0)  # examples per forward pass
    gradient_accumulation_steps: int = Field(1, gt=0)  # effective batch = micro_batch_size * this
    learning_rate: float = Field(2e-4, gt=0)
    lr_scheduler: LrScheduler = "cosine"
    warmup_ratio: float = Field(0.03, ge=0, lt=1)  # fraction of steps spent warming up linearly
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)  # gradient clipping; None = no clipping
    optimizer: Optimizer = "adamw"
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    adam_epsilon: float = Field(1e-8, gt=0)
    precision: Precision = "auto"  # autocast precision; auto = bf16 where supported, else fp16 on GPU, fp32 on CPU
    gradient_checkpointing: bool = False  # recompute activations: less memory, ~30% slower
    seed: int = Field(42, ge=0)
    logging_steps: int = Field(10, gt=0)
    eval_steps: int | None = Field(None, gt=0)  # None = evaluate at the end of each epoch only
    save_steps: int | None = Field(None, gt=0)  # None = no intermediate checkpoints
    save_total_limit: int | None = Field(None, gt=0)  # keep only the newest N checkpoints; None = keep all
    merge_at_end: bool = False  # also save the base model with the adapter merged in
    max_nonfinite_steps: int = Field(10, gt=0)  # consecutive NaN/inf losses tolerated before stopping


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: ModelSection
    lora: LoraSection = Field(default_factory=LoraSection)
    data: DataSection
    train: TrainSection = Field(default_factory=TrainSection)

    @model_validator(mode="before")
    @classmethod
    def _empty_section_means_defaults(cls, data: Any) -> Any:
        # `lora:` with every key commented out is YAML null; the user meant "all defaults".
        if isinstance(data, dict):
            return {key: {} if value is None and key in cls.model_fields else value for key, value in data.items()}
        return data


# --- loading --------------------------------------------------------------------------------------------------


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML config, apply `key.sub=value` overrides, and validate it."""
    path = Path(path)
    data = _read_yaml(path)
    if overrides:
        data = _deep_merge(data, parse_overrides(overrides))
    return validate_config(data, source=str(path))


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(
            f"Config file {path} not found. Check the path (relative paths start from {Path.cwd()}); "
            f"the examples in configs/ are a good starting point."
        ) from None
    except IsADirectoryError:
        raise UserError(f"Config path {path} is a folder; pass the YAML file, e.g. {path / 'config.yaml'}.") from None
    except UnicodeDecodeError:
        raise UserError(f"Config file {path} is not UTF-8 text; save it as UTF-8 (plain YAML).") from None
    except OSError as exc:
        raise UserError(f"Cannot read config file {path}: {exc.strerror}. Check its permissions.") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        raise UserError(_yaml_error_message(path, exc)) from None
    if data is None:
        return {}  # empty file: validation then says which sections are required
    if not isinstance(data, dict):
        raise UserError(
            f"Config file {path} must be a mapping of sections (model:, lora:, data:, train:) at the top level, "
            f"but it is a {type(data).__name__}. See configs/ for examples."
        )
    return data


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys: PyYAML keeps the last one, silently dropping e.g. a first `train:`."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *anchor` merges are allowed to repeat keys
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, (str, int, float, bool)):
                continue  # unhashable keys: SafeLoader's own error is clear enough
            if key in seen:
                raise _DuplicateKeyError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


class _DuplicateKeyError(yaml.constructor.ConstructorError):
    pass


def _yaml_error_message(path: Path, exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    problem = getattr(exc, "problem", None) or str(exc)
    context, start = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    if context and start and mark and start.line != mark.line:  # e.g. an unclosed [ found only at the end
        problem += f" ({context} started at line {start.line + 1}, column {start.column + 1})"
    if isinstance(exc, _DuplicateKeyError):
        fix = "Keep one of the two entries (merge their keys if both are sections)."
    else:
        fix = "Check the indentation there (spaces, not tabs) and that each key is followed by `: `."
    return f"Config file {path} is not valid YAML{where}: {problem}. {fix}"


# --- overrides ------------------------------------------------------------------------------------------------

# What a person means as a number but PyYAML (YAML 1.1) reads as a string: `1e-4`, `1.0e5` (no dot, no sign).
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _looks_like_number(text: str) -> bool:
    return _NUMBER.fullmatch(text.strip()) is not None


def parse_overrides(overrides: Sequence[str]) -> dict:
    """`["train.learning_rate=1e-4", "lora.target_modules=[q_proj,v_proj]"]` -> nested dict of YAML-typed values."""
    result: dict = {}
    for item in overrides:
        keys, raw = _split_override(item)
        _set_nested(result, keys, _parse_value(item, raw), item)
    return result


def _split_override(item: str) -> tuple[list[str], str]:
    key, sep, raw = item.partition("=")
    keys = key.strip().split(".")
    if not sep or not all(k and not k.isspace() and " " not in k for k in keys):
        raise UserError(
            f"Override {item!r} is not key=value. Write a dotted key, '=' and a value with no spaces around '=', "
            f"e.g. train.learning_rate=1e-4 or lora.target_modules=[q_proj,v_proj]."
        )
    return keys, raw


def _parse_value(item: str, raw: str) -> Any:
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        raise UserError(
            f"Override {item!r}: the value {raw!r} is not valid YAML. Fix it, or quote it as a YAML string "
            f"inside shell quotes, e.g. {item.partition('=')[0]}='\"{raw}\"'."
        ) from None
    # Only unquoted text: `model.revision='"1e5"'` stays a string.
    if isinstance(value, str) and _looks_like_number(raw):
        return float(raw)
    return value


def _set_nested(target: dict, keys: list[str], value: Any, item: str) -> None:
    node = target
    for depth, key in enumerate(keys[:-1]):
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise UserError(
                f"Override {item!r} sets a key inside {'.'.join(keys[: depth + 1])}, which an earlier override "
                f"set to a plain value. Drop one of the two overrides."
            )
    node[keys[-1]] = value


def _deep_merge(base: dict, updates: dict) -> dict:
    merged = dict(base)
    for key, value in updates.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


# --- validation and error messages ----------------------------------------------------------------------------


def validate_config(data: dict, source: str = "config") -> Config:
    """Validate a config dict; on failure raise one UserError listing every problem, one line per key."""
    if not isinstance(data, dict):
        raise UserError(f"{source} must be a mapping of sections (model:, lora:, data:, train:) at the top level.")
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        raise UserError(_problem_report(source, [_describe(e) for e in exc.errors()])) from None
    problems = _cross_section_problems(config)
    if problems:
        raise UserError(_problem_report(source, problems))
    return config


def _cross_section_problems(config: Config) -> list[str]:
    """Checks that need more than one section (run once every field is valid on its own)."""
    problems = []
    has_validation_data = config.data.val_size > 0 or config.data.val_path is not None
    if config.train.eval_steps is not None and not has_validation_data:
        problems.append(
            f"train.eval_steps: is set but there is no validation data; set data.val_size (e.g. 0.05) or "
            f"data.val_path, or remove train.eval_steps (got {config.train.eval_steps})"
        )
    return problems


def _problem_report(source: str, problems: list[str]) -> str:
    noun = "problem" if len(problems) == 1 else "problems"
    return f"{source} has {len(problems)} {noun}:\n" + "\n".join(f"  - {p}" for p in problems)


# Requirement wording by pydantic error type; the requirement is the fix. Placeholders come from the error's ctx.
_REQUIREMENTS = {
    "greater_than": "must be greater than {gt}",
    "greater_than_equal": "must be at least {ge}",
    "less_than": "must be less than {lt}",
    "less_than_equal": "must be at most {le}",
    "int_type": "must be a whole number",
    "int_parsing": "must be a whole number",
    "int_from_float": "must be a whole number",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "string_type": "must be a string",
    "string_too_short": "must not be empty",
    "list_type": "must be a list, e.g. [0, 1]",
    "too_short": "must not be an empty list; remove the key instead",
    "model_type": "must be a section (indented `key: value` lines)",
    "model_attributes_type": "must be a section (indented `key: value` lines)",
    "dict_type": "must be a section (indented `key: value` lines)",
}

# Names users know from PEFT, axolotl and transformers.TrainingArguments, anywhere in the file.
_ALIASES = {
    "lora_r": "lora.r",
    "rank": "lora.r",
    "lora_alpha": "lora.alpha",
    "lora_dropout": "lora.dropout",
    "lora_target_modules": "lora.target_modules",
    "lr": "train.learning_rate",
    "batch_size": "train.micro_batch_size",
    "per_device_train_batch_size": "train.micro_batch_size",
    "num_epochs": "train.epochs",
    "num_train_epochs": "train.epochs",
    "lr_scheduler_type": "train.lr_scheduler",
    "optim": "train.optimizer",
    "warmup_steps": "train.warmup_ratio",
    "bf16": "train.precision",
    "fp16": "train.precision",
    "torch_dtype": "model.dtype",
    "base_model": "model.name_or_path",
    "sequence_len": "data.max_length",
    "max_seq_length": "data.max_length",
    "max_seq_len": "data.max_length",
}

_REQUIRED_HINTS = {
    "model": "add a `model:` section with `name_or_path:`",
    "data": "add a `data:` section with `path:`",
    "model.name_or_path": "add `name_or_path:` under `model:` (a Hub id such as Qwen/Qwen2.5-0.5B-Instruct, a folder)",
    "data.path": "add `path:` under `data:` (a .jsonl/.json/.txt file, or a Hub dataset id)",
}


def _describe(error: ErrorDetails) -> str:
    loc, kind = error["loc"], error["type"]
    key = _dotted(loc)
    if kind == "extra_forbidden":
        return f"{key}: unknown key; {_unknown_key_fix(loc)}"
    if kind == "missing":
        return f"{key}: required; {_REQUIRED_HINTS.get(key, 'add it')}"
    hint = ""
    if kind == "literal_error":
        requirement, hint = _choices_requirement(error)
    elif kind in _REQUIREMENTS:
        requirement = _REQUIREMENTS[kind].format(**{k: _show(v) for k, v in error.get("ctx", {}).items()})
    else:  # our PydanticCustomErrors, and anything unforeseen: pydantic's own sentence
        requirement = error["msg"].removeprefix("Value error, ")
    return f"{key}: {requirement} (got {_show(error['input'])}){hint}"


def _dotted(loc: tuple) -> str:
    return "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).lstrip(".")


def _show(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # bounds like gt=0 arrive as 0.0 on float fields
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _choices_requirement(error: ErrorDetails) -> tuple[str, str]:
    """("must be one of ...", "; did you mean `x`?" or "")."""
    allowed = re.findall(r"'([^']*)'", error["ctx"]["expected"])
    close = difflib.get_close_matches(str(error["input"]).lower(), allowed, n=1)
    return f"must be one of {', '.join(allowed)}", f"; did you mean `{close[0]}`?" if close else ""


def _keys_at(parents: tuple) -> list[str]:
    """Valid keys under a location: the section names at the top, a section's fields inside it."""
    model: type[BaseModel] = Config
    for part in parents:
        model = model.model_fields[part].annotation
    return list(model.model_fields)


def _unknown_key_fix(loc: tuple) -> str:
    parents, key = loc[:-1], str(loc[-1])
    suggestion = _suggest_key(parents, key)
    if suggestion is None:
        where = f"keys under `{'.'.join(parents)}:`" if parents else "top-level sections"
        return f"the {where} are {', '.join(_keys_at(parents))}"
    suggested_parent = suggestion.rpartition(".")[0]
    move = f" (it goes under `{suggested_parent}:`)" if suggested_parent != ".".join(parents) else ""
    return f"did you mean `{suggestion}`?{move}"


def _suggest_key(parents: tuple, key: str) -> str | None:
    """An alias users know, else the same name in another section, else a close spelling here, else anywhere."""
    if key in _ALIASES:
        return _ALIASES[key]
    here = ".".join(parents)
    # leaf name -> dotted key, for keys outside this level (reversed: the first in schema order wins)
    elsewhere = {k.rpartition(".")[2]: k for k in reversed(_all_keys()) if k.rpartition(".")[0] != here}
    if key in elsewhere:
        return elsewhere[key]
    close = difflib.get_close_matches(key, _keys_at(parents), n=1)
    if close:
        return f"{here}.{close[0]}".lstrip(".")
    close = difflib.get_close_matches(key, list(elsewhere), n=1)
    return elsewhere[close[0]] if close else None


def _all_keys() -> list[str]:
    """Every valid dotted key: the sections, then each section's fields."""
    sections = Config.model_fields
    fields = [f"{name}.{key}" for name, field in sections.items() for key in field.annotation.model_fields]
    return list(sections) + fields


# --- writing --------------------------------------------------------------------------------------------------


class _ConfigDumper(yaml.SafeDumper):
    """Sections as blocks, lists inline (`target_modules: [q_proj, v_proj]`), as people write them."""


_ConfigDumper.add_representer(
    list, lambda dumper, data: dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True)
)


def config_to_yaml(config: Config) -> str:
    """The fully resolved config (every default filled in), in schema order; loading it gives an equal Config."""
    return yaml.dump(config.model_dump(mode="json"), Dumper=_ConfigDumper, sort_keys=False, allow_unicode=True)
