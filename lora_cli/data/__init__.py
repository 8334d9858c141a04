"""Training data: load rows from a file, folder or Hub dataset, format them, tokenize, mask, split and batch.

The pipeline, once per run (never per step):

    for each source of data.path: sources.load_rows -> mixing.take_rows -> formats.detect_format
        -> render each row to (text, trained character spans)
        -> tokenize: all texts in batches with offsets -> labels -> truncate -> split train/val
        -> batching: length-grouped or packed micro batches, collated per step

Every format reduces to the same intermediate form, a `_Rendered`: the exact text the model sees plus the
character spans whose tokens are trained. Tokenizing the whole text at once (instead of gluing separately
tokenized pieces) gives the same tokens the model sees at inference, and the offsets map tokens back to spans.
"""

from .batching import collate, collate_packed, length_grouped_batches, pack_rows, packed_batches
from .examples import IGNORE_INDEX, DataBundle, DataStats, Example, RowError
from .formats import FORMATS, alpaca_prompt, detect_format
from .from_config import build_from_config
from .mixing import Source, SourceStats, source_lines
from .preview import MASKED_STYLE, PLAIN_MARKS, TRAINED_STYLE, _label_runs, preview
from .sources import DATA_EXTENSIONS, load_rows
from .tokenize import build_datasets, tokenize_row

__all__ = [
    "DATA_EXTENSIONS", "FORMATS", "IGNORE_INDEX", "MASKED_STYLE", "PLAIN_MARKS", "TRAINED_STYLE", "DataBundle",
    "DataStats", "Source", "SourceStats",
    "Example", "RowError", "_label_runs", "alpaca_prompt", "build_datasets", "build_from_config", "collate",
    "collate_packed", "detect_format", "length_grouped_batches", "load_rows", "pack_rows", "packed_batches", "preview",
    "source_lines", "tokenize_row",
]
