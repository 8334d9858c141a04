"""The training data a config's data section describes: the one translation from config keys to the data options."""

from __future__ import annotations

from .build import DataOptions, build_in_memory
from .examples import DataBundle
from .mixing import Source, as_sources


def options_from(cfg) -> DataOptions:
    """The config's data settings and seed as the data pipeline's options (the tokenizer already has
    data.chat_template)."""
    data = cfg.data
    sources = (as_sources(data.path, data.format, data.split) if isinstance(data.path, str)
               else [Source(s.path, s.format, s.split, s.take) for s in data.sources()])
    return DataOptions(tuple(sources), data.format, data.max_length, data.train_on_inputs, data.val_size,
                       data.val_path, cfg.train.seed, data.system_prompt, data.num_proc)


def build_from_config(cfg, tokenizer) -> DataBundle:
    """The config's data, tokenized in memory (lora-train reads it through data.cache.load_data instead)."""
    return build_in_memory(options_from(cfg), tokenizer)
