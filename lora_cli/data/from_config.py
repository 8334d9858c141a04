"""The training data a config's data section describes: the one translation from config keys to build_datasets."""

from __future__ import annotations

from .examples import DataBundle
from .mixing import Source
from .tokenize import build_datasets


def build_from_config(cfg, tokenizer) -> DataBundle:
    """build_datasets with the config's data settings and seed (the tokenizer already has data.chat_template)."""
    data = cfg.data
    path = data.path if isinstance(data.path, str) else [Source(s.path, s.format, s.split, s.take)
                                                          for s in data.sources()]
    return build_datasets(
        path,
        tokenizer,
        split=data.split,
        format=data.format,
        max_length=data.max_length,
        train_on_inputs=data.train_on_inputs,
        val_size=data.val_size,
        val_path=data.val_path,
        seed=cfg.train.seed,
        system_prompt=data.system_prompt,
    )
