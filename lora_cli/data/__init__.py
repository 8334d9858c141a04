"""Training data: load rows from a file, folder or Hub dataset, format them, tokenize, mask, split and batch.

The pipeline, once per run (never per step):

    for each source of data.path: sources.iter_rows (a stream) -> its `take` -> formats.detect_format
        -> render each row to (text, trained character spans)
        -> tokenize: batches of rows with offsets -> labels -> truncate -> split train/val
        -> cache: written once to memory-mapped files on disk, keyed by contents and settings (lora-train's path)
        -> batching: length-grouped or packed micro batches, planned from the lengths alone, collated per step

Every format reduces to the same intermediate form, a `_Rendered`: the exact text the model sees plus the
character spans whose tokens are trained. Tokenizing the whole text at once (instead of gluing separately
tokenized pieces) gives the same tokens the model sees at inference, and the offsets map tokens back to spans.
"""

from .batching import collate, collate_packed, length_grouped_batches, lengths_of, pack_rows, packed_batches
from .build import DataOptions, build_datasets, build_in_memory
from .cache import CachedExamples, load_data, load_or_build
from .examples import IGNORE_INDEX, DataBundle, DataStats, Example, RowError
from .formats import FORMATS, alpaca_prompt, detect_format
from .from_config import build_from_config, options_from
from .mixing import Source, SourceStats, source_lines
from .preview import MASKED_STYLE, PLAIN_MARKS, TRAINED_STYLE, _label_runs, preview
from .sources import DATA_EXTENSIONS, load_rows
from .tokenize import tokenize_row

__all__ = [
    "DATA_EXTENSIONS", "FORMATS", "IGNORE_INDEX", "MASKED_STYLE", "PLAIN_MARKS", "TRAINED_STYLE", "CachedExamples",
    "DataBundle", "DataOptions", "DataStats", "Example", "RowError", "Source", "SourceStats", "_label_runs",
    "alpaca_prompt", "build_datasets", "build_from_config", "build_in_memory", "collate", "collate_packed",
    "detect_format", "length_grouped_batches", "lengths_of", "load_data", "load_or_build", "load_rows",
    "options_from", "pack_rows", "packed_batches", "preview", "source_lines", "tokenize_row",
]
