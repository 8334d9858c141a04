"""Reading a config: YAML file + `key.sub=value` overrides -> validated Config; and writing the resolved config."""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Sequence

import yaml

from ..errors import UserError
from .schema import Config, looks_like_number
from .validation import validate_config


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML config, apply `key.sub=value` overrides, and validate it."""
    path = Path(path)
    data = _read_yaml(path)
    if overrides:
        data = _deep_merge(data, parse_overrides(overrides))
    return validate_config(data, source=str(path))


def build_config(config: str | os.PathLike | Mapping | Config, overrides: Sequence[str] = (),
                 sections: Mapping[str, Mapping] | None = None) -> Config:
    """The Python API's config: a YAML file, a dict shaped like one, or a Config; then the dotted `overrides`
    (as on the command line), then `sections` ({"train": {"max_steps": 2}}), each merged key by key, not
    replacing a section. The caller's dicts are never changed."""
    if isinstance(config, Config) and not overrides and not sections:
        return config
    if isinstance(config, Config):
        data, source = config.model_dump(mode="json"), "The config"
    elif isinstance(config, Mapping):
        data, source = copy.deepcopy(dict(config)), "The config dict"
    elif isinstance(config, (str, os.PathLike)):
        data, source = _read_yaml(Path(config)), str(config)
    else:
        raise UserError(f"The config must be a YAML file's path, a dict of sections (model, lora, data, train) or a "
                        f"Config, not {type(config).__name__}.")
    if overrides:
        data = _deep_merge(data, parse_overrides(overrides))
    for name, values in (sections or {}).items():
        if not isinstance(values, Mapping):
            raise UserError(f"{name}= takes a dict of that section's keys, e.g. train={{'max_steps': 2}} (got "
                            f"{values!r}); for one key, a dotted string like 'train.max_steps=2' works too.")
        data = _deep_merge(data, {name: copy.deepcopy(dict(values))})
    return validate_config(data, source=source)


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
        raise UserError(f"Override {item!r}: the value {raw!r} is not valid YAML. {_quoting_hint(item, raw)}") from None
    # Only unquoted text: `model.revision='"1e5"'` stays a string.
    if isinstance(value, str) and looks_like_number(raw):
        return float(raw)
    return value


def _quoting_hint(item: str, raw: str) -> str:
    """How to write the value so YAML reads it. A list keeps its brackets and each item is quoted: quoting the whole
    `[Who is the mayor?]` would give one string (train.eval_prompts then reads it as a file path)."""
    key = item.partition("=")[0]
    if raw.lstrip().startswith("["):
        items = [part.strip() for part in raw.strip().removeprefix("[").removesuffix("]").split(",") if part.strip()]
        quoted = ", ".join(json.dumps(part, ensure_ascii=False) for part in items)
        return f"Fix it, or quote each item of the list as a YAML string inside shell quotes, e.g. {key}='[{quoted}]'."
    return f"Fix it, or quote it as a YAML string inside shell quotes, e.g. {key}='\"{raw}\"'."


def _set_nested(target: dict, keys: list[str], value: Any, item: str) -> None:
    node = target
    for depth, key in enumerate(keys[:-1]):
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise UserError(
                f"Override {item!r} sets a key inside {'.'.join(keys[: depth + 1])}, which an earlier override "
                f"set to a plain value. Drop one of the two overrides."
            )
    last = keys[-1]
    if isinstance(value, dict) and isinstance(node.get(last), dict):
        # A mapping merges into what earlier overrides set there (`lora.r=2 'lora={alpha: 4}'` keeps r=2), as it
        # merges into the file's section; a key given twice takes the later value, as everywhere else
        value = _deep_merge(node[last], value)
    node[last] = value


def _deep_merge(base: dict, updates: dict) -> dict:
    merged = dict(base)
    for key, value in updates.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


# --- writing --------------------------------------------------------------------------------------------------


class _ConfigDumper(yaml.SafeDumper):
    """Sections as blocks, lists inline (`target_modules: [q_proj, v_proj]`), as people write them."""


_ConfigDumper.add_representer(
    list, lambda dumper, data: dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True)
)


def config_to_yaml(config: Config) -> str:
    """The fully resolved config (every default filled in), in schema order; loading it gives an equal Config."""
    # One line per value, however long (a prompt list): YAML's own folding at 80 columns is valid but hard to read
    return yaml.dump(config.model_dump(mode="json"), Dumper=_ConfigDumper, sort_keys=False, allow_unicode=True,
                     width=2**16)
