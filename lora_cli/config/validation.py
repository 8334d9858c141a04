"""Validation with errors that name the key and the fix: every user mistake becomes ONE UserError that lists every
problem at once, one line per dotted key, with did-you-mean suggestions and the names users know from PEFT/axolotl.
"""

from __future__ import annotations

import difflib
import re
from typing import Any, get_args

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from ..errors import UserError
from .schema import UNION_TAGS, Config, cross_section_problems


def validate_config(data: dict, source: str = "config") -> Config:
    """Validate a config dict; on failure raise one UserError listing every problem, one line per key."""
    if not isinstance(data, dict):
        raise UserError(f"{source} must be a mapping of sections (model:, lora:, data:, train:) at the top level.")
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        raise UserError(_problem_report(source, [_describe(e) for e in exc.errors()])) from None
    problems = cross_section_problems(config)
    if problems:
        raise UserError(_problem_report(source, problems))
    return config


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
    "finite_number": "must be a finite number",
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
    "load_best_model_at_end": "train.load_best_at_end",
    "auto_resume_from_checkpoints": "train.resume_from_checkpoint",
    "early_stopping_steps": "train.early_stopping_patience",
    "quantization_bit": "model.load_in_4bit",
    "load_in_8bit": "model.load_in_4bit",
}

_REQUIRED_HINTS = {
    "model": "add a `model:` section with `name_or_path:`",
    "data": "add a `data:` section with `path:`",
    "model.name_or_path": "add `name_or_path:` under `model:` (a Hub id such as Qwen/Qwen2.5-0.5B-Instruct, a folder)",
    "data.path": "add `path:` under `data:` (a .jsonl/.json/.txt file, or a Hub dataset id)",
}


def _describe(error: ErrorDetails) -> str:
    loc, kind = tuple(part for part in error["loc"] if part not in UNION_TAGS), error["type"]
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
    """Valid keys under a location: the section names at the top, a section's fields inside it, a list entry's
    fields (data.path's sources) inside the list."""
    model: type[BaseModel] = Config
    for part in parents:
        if not isinstance(part, int):  # a list index: the entry has the list's item type
            model = _section_in(model.model_fields[part].annotation)
    return list(model.model_fields)


def _section_in(annotation: Any) -> type[BaseModel] | None:
    """The section type inside a field's type (itself, or inside a list, union or Annotated)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for member in get_args(annotation):
        found = _section_in(member)
        if found is not None:
            return found
    return None


def _unknown_key_fix(loc: tuple) -> str:
    parents, key = loc[:-1], str(loc[-1])
    if any(isinstance(part, int) for part in parents):  # inside a list entry: only its own keys make sense
        close = difflib.get_close_matches(key, _keys_at(parents), n=1)
        return f"did you mean `{close[0]}`?" if close else f"the keys of an entry are {', '.join(_keys_at(parents))}"
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
