"""The config of `lora-train CONFIG.yaml [key.sub=value ...]`: schema.py (the sections and their defaults),
validation.py (one error listing every problem, with did-you-mean), loading.py (YAML, overrides, writing back).

Use `load_config` (file + overrides), `build_config` (the Python API's: a file, dict or Config, then overrides) or
`validate_config` (a dict).
"""

from .loading import build_config, config_to_yaml, load_config, parse_overrides
from .schema import ALL_LINEAR, Config, DataSection, LoraSection, ModelSection, TrainSection
from .validation import validate_config

__all__ = [
    "ALL_LINEAR", "Config", "DataSection", "LoraSection", "ModelSection", "TrainSection", "build_config",
    "config_to_yaml", "load_config", "parse_overrides", "validate_config",
]
