"""The one composed loader: tokenizer + base model + optional adapter, for lora-merge and lora-generate.

Where a model comes from (`ModelSource`: name or folder, Hub revision, trust_remote_code) is passed the same way
to the tokenizer, the config lookup and the weights, so a pinned revision or remote code is never dropped halfway.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .adapter import load_adapter, read_adapter_tensors
from .adapter_config import AdapterConfig, read_adapter_config
from .chat_templates import use_folder_template
from .errors import UserError
from .inject import InjectionReport, merge_lora
from .models import check_source, load_base_model, load_tokenizer
from .quantization import check_4bit_support


@dataclass(frozen=True)
class ModelSource:
    name_or_path: str
    revision: str | None = None  # Hub branch, tag or commit; None = the default branch
    trust_remote_code: bool = False


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    adapter: AdapterConfig | None = None
    report: InjectionReport | None = None  # which modules the adapter wraps


def base_source_of_adapter(adapter_dir: str | Path, base: str | None, revision: str | None = None,
                           trust_remote_code: bool = False) -> ModelSource:
    """The base an adapter applies to: `base` if given, else the adapter's base_model_name_or_path (and revision)."""
    config = read_adapter_config(adapter_dir)
    if base is not None:
        return ModelSource(base, revision, trust_remote_code)
    if not config.base_model_name_or_path:
        raise UserError(
            f"{Path(adapter_dir) / 'adapter_config.json'} does not name its base model (base_model_name_or_path is "
            "empty); pass the base with --base MODEL."
        )
    return ModelSource(config.base_model_name_or_path, revision or config.revision, trust_remote_code)


def load_model(
    source: ModelSource,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | None = None,
    adapter_dir: str | Path | None = None,
    merge: bool = False,
    load_in_4bit: bool = False,
    log: Callable[[str], None] | None = None,
    what: str = "model.name_or_path",
) -> LoadedModel:
    """The tokenizer and the frozen base in `dtype` on `device`, with the adapter's LoRA layers applied (unmerged,
    or folded into the weights when `merge`). A missing or broken adapter fails before the (slow) model load.
    `what`: how errors name the model source to the user (lora-generate's argument is MODEL).
    `load_in_4bit`: the base's linear layers in NF4 4-bit, computing in `dtype` (QLoRA's base; the adapter stays
    unmerged, since folding it into 4-bit weights would re-round them)."""
    log = log or (lambda message: None)
    if merge and adapter_dir is None:
        raise UserError("--merge merges an adapter into the model in memory; it needs --adapter DIR.")
    if merge and load_in_4bit:
        raise UserError(
            "--merge and --load-in-4bit do not go together: folding the adapter into 4-bit weights would round them "
            "again and change the model. Drop --merge (the adapter then runs unmerged, with the same output), or "
            "merge into the unquantized base with lora-merge and generate from that folder."
        )
    if load_in_4bit:
        check_4bit_support("--load-in-4bit")
    adapter_tensors = None
    if adapter_dir is not None:
        read_adapter_config(adapter_dir)
        adapter_tensors = read_adapter_tensors(adapter_dir)  # refuses damaged or non-finite weights
    check_source(source.name_or_path, what)
    tokenizer = load_tokenizer(source.name_or_path, source.revision, source.trust_remote_code)
    if adapter_dir is not None and use_folder_template(tokenizer, adapter_dir):
        log(f"chat template: the one {adapter_dir} was trained with (data.chat_template)")
    where = f"{device or 'cpu'}, {str(dtype).split('.')[1]}" + (", linear layers in 4-bit NF4" if load_in_4bit else "")
    log(f"loading {source.name_or_path}" + (f" at revision {source.revision}" if source.revision else "") + f" ({where})")
    model = load_base_model(source.name_or_path, dtype, source.revision, source.trust_remote_code, device=device,
                            load_in_4bit=load_in_4bit)
    loaded = LoadedModel(model, tokenizer)
    if adapter_dir is not None:
        loaded.adapter, loaded.report = load_adapter(model, adapter_dir, adapter_tensors)
        log(f"adapter {adapter_dir}: {len(loaded.report.wrapped)} LoRA modules" + (", merged in memory" if merge else ""))
        if merge:
            merge_lora(model)
    return loaded
