"""lora-merge: fold a LoRA adapter into its base model and write a plain transformers model folder.

By default the merge streams (stream.py): the base's safetensors shards are read one tensor at a time, each
targeted weight is merged in fp32, checked against W + scaling * B A and written, so RAM holds about one tensor
(plus the interpreter), whatever the model's size. Bases it cannot stream (pickle .bin checkpoints) and
`--verify-logits` take the in-memory path: the whole model is loaded in fp32 on the CPU (4 bytes of RAM per
parameter), the adapter applied unmerged, a short verify batch records the reference logits (verify.py), each LoRA
layer folds its update into its weight in place (`LoraLinear.merge`), the logits are compared again, and the model
is cast once and saved. Both write the same folder, atomically, guarded by output.py (checks before any slow work,
the lock, a killed merge's leftovers, one message for every failed write). A quantized base is refused before
anything loads.

This module is the package's front (`merge_adapter`, `save_merged`); stream.py, verify.py and output.py are its
private parts.
"""
from __future__ import annotations

import contextlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..adapter_config import read_adapter_config
from ..chat_templates import use_folder_template
from ..errors import ModelNotFound, UserError
from ..export import GgufRequest, plan_source
from ..fsutil import atomic_dir, follow_link
from ..inject import lora_layers, merge_lora
from ..layout import CONFIG_NAME
from ..model_files import weights_dtype
from ..models import ModelSource, base_source_of_adapter, check_source, load_model, load_tokenizer, stored_dtype
from ..precision import dtype_name, parse_dtype
from . import output
from .stream import PROBE_TOLERANCE, StreamPlan, merged_tensors, plan_streaming, write_merged
from .verify import LogitsCheck, VerifyCheck

# The adapter config travels with the merged model for provenance, but NOT as adapter_config.json: a model folder
# holding adapter_config.json makes transformers (and vLLM, TGI) treat the folder as a PEFT adapter and try to
# load a base model from base_model_name_or_path. Under this name every loader ignores it.
MERGED_ADAPTER_CONFIG_NAME = "lora_adapter_config.json"


@dataclass
class MergeResult:
    output_dir: Path
    base: str
    dtype: torch.dtype
    adapter_effect: float | None = None  # max |logit change| the adapter causes on the verify batch
    checks: list[VerifyCheck] = field(default_factory=list)  # the logits checks (in-memory path)
    streamed: bool = False  # merged shard by shard (the low-RAM path)
    merged_tensors: int = 0  # weights the adapter changed (streamed path)
    largest_merge_error: float | None = None  # of the per-tensor check, relative (streamed path)
    gguf: object | None = None  # export.GgufWritten, with --gguf


# --- helpers -------------------------------------------------------------------------------------------------


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


_LARGEST_SHARD = 2**63 - 1  # safetensors' offsets are 64-bit


def parse_size(size: str | int) -> int:
    """'2GB', '500MB', '200KB', '1GiB' or a byte count -> bytes (transformers' units: 1GB = 10^9 bytes)."""
    if isinstance(size, int):
        value = size
    else:
        match = _SIZE.match(str(size))
        if not match:
            raise UserError(f"--max-shard-size '{size}' is not a size; write it like 2GB, 500MB or 200KB.")
        number = float(match.group(1)) * _UNITS[(match.group(2) or "B").upper()]  # inf for 400 nines
        if not math.isfinite(number) or number > _LARGEST_SHARD:  # int(inf) raises OverflowError
            raise UserError(f"--max-shard-size '{size}' is larger than any disk; write it like 2GB, 500MB or 200KB.")
        value = int(number)
    if value <= 0:
        raise UserError(f"--max-shard-size must be positive, got {size!r}.")
    return value


@torch.no_grad()
def _check_finite_weights(model: nn.Module) -> None:
    for name, param in model.named_parameters():
        if param.is_floating_point() and not torch.isfinite(param).all():
            hint = " float16 holds |x| <= 65504 only; use bfloat16." if param.dtype == torch.float16 else ""
            raise UserError(
                f"The merged weight {name} has non-finite values (inf or NaN) in {dtype_name(param.dtype)}; "
                f"nothing was written.{hint}"
            )


def _untie_if_diverged(model: nn.Module) -> None:
    """A config that says the head is tied to the embedding must not be written for weights that differ.

    Merging never touches a tied head (targeting it is refused), so this only fires for a model someone untied by
    hand: then transformers would re-tie on load and silently replace the head, so say they are untied.
    """
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    if get_in is None or get_out is None:
        return
    embedding, head = get_in(), get_out()
    if embedding is None or head is None or head.weight is embedding.weight:
        return
    configs = [model.config]
    text_config = getattr(model.config, "get_text_config", lambda: None)()
    if text_config is not None and text_config is not model.config:
        configs.append(text_config)
    if not any(getattr(cfg, "tie_word_embeddings", False) for cfg in configs):
        return
    if head.weight.shape == embedding.weight.shape and torch.equal(head.weight, embedding.weight):
        return
    for cfg in configs:
        if hasattr(cfg, "tie_word_embeddings"):
            cfg.tie_word_embeddings = False


# --- public API ----------------------------------------------------------------------------------------------


def save_merged(
    model: nn.Module,
    tokenizer,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    dtype: torch.dtype | None = None,
    max_shard_size: str | int = "2GB",
    adapter_config: dict | None = None,
    after_write: Callable[[Path], None] | None = None,
) -> Path:
    """Write an already merged model as a plain transformers folder, atomically.

    Casts once to `dtype` (if given), then writes sharded safetensors (+ index when sharded), config.json,
    generation_config.json, the tokenizer, and the adapter's config as `lora_adapter_config.json`; then
    `after_write(temporary folder)` (the GGUF export) before the folder is published.
    """
    if lora_layers(model):
        raise UserError("The model still has LoRA layers; merge them (inject.merge_lora) before saving it merged.")
    shard_bytes = parse_size(max_shard_size)
    if dtype is not None:
        model.to(dtype)
    _check_finite_weights(model)
    _untie_if_diverged(model)
    # A merged model is for inference: training with gradient checkpointing sets use_cache=False in the config,
    # which would make every later generate() recompute the whole prefix for each new token.
    if getattr(model.config, "use_cache", None) is False:
        model.config.use_cache = True
    out_dir = follow_link(out_dir)
    needed = sum(p.numel() * p.element_size() for p in model.parameters())
    with output.write_errors_reported(out_dir, needed), atomic_dir(out_dir, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, max_shard_size=shard_bytes)
        if getattr(model, "generation_config", None) is not None and not (tmp / "generation_config.json").exists():
            model.generation_config.save_pretrained(tmp)
        _write_side_files(tmp, tokenizer, adapter_config)
        if after_write is not None:
            after_write(tmp)
    return out_dir


def _write_side_files(folder: Path, tokenizer, adapter_config: dict | None) -> None:
    tokenizer.save_pretrained(folder)
    if adapter_config is not None:
        # Named lora_adapter_config.json on purpose: see MERGED_ADAPTER_CONFIG_NAME.
        (folder / MERGED_ADAPTER_CONFIG_NAME).write_text(
            json.dumps(adapter_config, indent=2, sort_keys=True) + "\n", encoding="utf-8"
        )


def merge_adapter(
    adapter_dir: str | Path,
    output_dir: str | Path,
    *,
    base: str | None = None,
    dtype: str | torch.dtype | None = None,
    max_shard_size: str | int = "2GB",
    verify_logits: bool = False,
    overwrite: bool = False,
    revision: str | None = None,
    trust_remote_code: bool = False,
    log: Callable[[str], None] | None = None,
    gguf: str | None = None,
    gguf_only: bool = False,
    ollama: bool = False,
) -> MergeResult:
    """Merge the adapter into its base and write `output_dir`: shard by shard, or in memory where the base needs
    it or `verify_logits` asks for the whole-model logits check. `gguf` (a type: f32, f16, bf16, q8_0, q4_0) adds
    `<output folder name>-<type>.gguf` to it (`gguf_only`: instead of the safetensors files; `ollama`: and a
    Modelfile)."""
    log = log or (lambda message: None)
    export = GgufRequest.from_options(gguf, gguf_only, ollama)  # a bad type fails before anything loads
    adapter_dir, output_dir = Path(adapter_dir), follow_link(output_dir)  # a link to a Drive folder: write there
    target_dtype = parse_dtype(dtype)
    shard_bytes = parse_size(max_shard_size)
    config = read_adapter_config(adapter_dir)
    if base is not None and config.base_model_name_or_path and config.base_model_name_or_path != base:
        log(f"note: the adapter names {config.base_model_name_or_path} as its base; merging into {base} as asked")
    source = base_source_of_adapter(adapter_dir, base, revision, trust_remote_code)
    named_by_adapter = base is None
    check_source(source.name_or_path, "--base" if base is not None else f"The base named in {adapter_dir}")
    base = source.name_or_path
    protected = [adapter_dir] + ([Path(base)] if Path(base).exists() else [])
    output.check_output_dir(output_dir, overwrite, protected)
    _refuse_quantized_base(source, adapter_dir, output_dir)
    if export is not None:
        with _named_by_adapter_hint(source, adapter_dir, named_by_adapter):
            _check_exportable(export, source, adapter_dir)
    if target_dtype is None:
        # config.json's dtype, else the stored weights' own (a config without `dtype` is common in hand-made or
        # older bf16 checkpoints; float32 would double their size)
        target_dtype = (stored_dtype(base, source.revision, source.trust_remote_code)
                        or weights_dtype(base, source.revision) or torch.float32)
    result = MergeResult(output_dir, base, target_dtype)
    with output.output_guarded(output_dir, log):
        result = _merge(result, source, adapter_dir, config.raw, named_by_adapter, shard_bytes, verify_logits,
                        overwrite, log, export)
    result.gguf = export.written if export is not None else None
    return result


def _merge(result: MergeResult, source: ModelSource, adapter_dir: Path, adapter_config: dict, named_by_adapter: bool,
           shard_bytes: int, verify_logits: bool, overwrite: bool, log: Callable[[str], None],
           export: GgufRequest | None) -> MergeResult:
    base, target_dtype = source.name_or_path, result.dtype
    if not verify_logits:
        with _named_by_adapter_hint(source, adapter_dir, named_by_adapter):  # a missing base fails here
            tokenizer = load_tokenizer(base, source.revision, source.trust_remote_code)
        use_folder_template(tokenizer, adapter_dir)  # the merged folder renders prompts as training did
        plan = plan_streaming(source, adapter_dir, target_dtype, shard_bytes)
        if isinstance(plan, StreamPlan):
            return _merge_streaming(plan, tokenizer, result, adapter_config, overwrite, log, export)
        log(f"note: {plan}, so the merge runs in memory (about 4 bytes of RAM per parameter)")
    with _named_by_adapter_hint(source, adapter_dir, named_by_adapter):
        return _merge_in_memory(source, adapter_dir, result, adapter_config, shard_bytes, verify_logits, overwrite,
                                log, export)


def _check_exportable(export: GgufRequest, source: ModelSource, adapter_dir: Path) -> None:
    """--gguf: an architecture or tokenizer the export cannot write is refused before any merging."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source.name_or_path, revision=source.revision,
                                            trust_remote_code=source.trust_remote_code)
    except (OSError, ValueError, KeyError):  # loading the base later says what is wrong
        return
    tokenizer = load_tokenizer(source.name_or_path, source.revision, source.trust_remote_code)
    base_folder = Path(source.name_or_path) if Path(source.name_or_path).is_dir() else None
    export.check(config, tokenizer, (adapter_dir, base_folder))


def _refuse_quantized_base(source: ModelSource, adapter_dir: Path, output_dir: Path) -> None:
    """A pre-quantized base (bitsandbytes, GPTQ, AWQ...: config.json has quantization_config) is refused before
    anything loads: its weights are rounded to a few bits, and the merged model lora-merge writes is full precision,
    made from the unquantized weights."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source.name_or_path, revision=source.revision,
                                            trust_remote_code=source.trust_remote_code)
    except (OSError, ValueError, KeyError):  # loading it later says what is wrong
        return
    quantization = getattr(config, "quantization_config", None)
    if not quantization:
        return
    if not isinstance(quantization, dict):
        quantization = quantization.to_dict() if hasattr(quantization, "to_dict") else {}
    method = quantization.get("quant_method", "unknown")
    bits = " 4-bit" if quantization.get("load_in_4bit") else " 8-bit" if quantization.get("load_in_8bit") else ""
    raise UserError(
        f"The base model '{source.name_or_path}' is quantized ({method}{bits}: its config.json has "
        "quantization_config), and an adapter cannot be merged into quantized weights: lora-merge writes a "
        "full-precision model made from the unquantized base. Merge into the unquantized model this one was made "
        f"from: lora-merge {adapter_dir} {output_dir} --base UNQUANTIZED_BASE (its Hub name or folder). To run the "
        f"adapter on the quantized base instead, leave it unmerged: lora-generate {source.name_or_path} --adapter "
        f"{adapter_dir}."
    )


@contextlib.contextmanager
def _named_by_adapter_hint(source: ModelSource, adapter_dir: Path, named_by_adapter: bool):
    """A base that fails to load while its name came from the adapter: say where the name came from."""
    try:
        yield
    except ModelNotFound as err:
        if not named_by_adapter:
            raise
        # lora-train writes the base as its config gave it: a relative folder only resolves from where it ran
        raise UserError(
            f"{err} The name '{source.name_or_path}' comes from {adapter_dir / CONFIG_NAME} "
            "(base_model_name_or_path, as the training config gave it; a relative folder is looked up from the "
            "current folder). Pass the base with --base MODEL."
        ) from None


def _merge_streaming(plan: StreamPlan, tokenizer, result: MergeResult, adapter_config: dict, overwrite: bool,
                     log: Callable[[str], None], export: GgufRequest | None) -> MergeResult:
    output_dir, needed = result.output_dir, plan.total_bytes
    output.check_free_space(output_dir, needed)
    files = f"{len(plan.shards)} file{'s' * (len(plan.shards) > 1)}"
    log(f"merging {result.base} shard by shard into {output_dir} ({dtype_name(result.dtype)}): "
        f"{len(plan.targets)} LoRA weights, {len(plan.entries)} tensors in {files}")
    with output.write_errors_reported(output_dir, needed), atomic_dir(output_dir, overwrite=overwrite) as tmp:
        if export is not None and export.only:  # each tensor merged, checked and converted straight into the GGUF
            export.export(tmp, output_dir, plan_source(*merged_tensors(plan)), plan.config, tokenizer, log)
        else:
            write_merged(plan, tmp)  # checks every tensor as it goes: a failure leaves nothing behind
            _write_side_files(tmp, tokenizer, adapter_config)
            if export is not None:
                export.export_folder(tmp, output_dir, plan.config, tokenizer, log)
    result.streamed, result.merged_tensors = True, len(plan.merged)
    result.largest_merge_error = plan.largest_relative_error
    log(f"verify: {len(plan.merged)} merged weights reproduce W x + scaling B A x (largest relative difference "
        f"{plan.largest_relative_error:.2g}, tolerance {PROBE_TOLERANCE:g}); every tensor written is finite")
    return result


def _merge_in_memory(source: ModelSource, adapter_dir: Path, result: MergeResult, adapter_config: dict,
                     shard_bytes: int, verify: bool, overwrite: bool, log: Callable[[str], None],
                     export: GgufRequest | None) -> MergeResult:
    """Load base (fp32, CPU) + adapter, verify the logits if asked, merge in place, cast once, write."""
    loaded = load_model(source, dtype=torch.float32, adapter_dir=adapter_dir, log=log)
    model, tokenizer = loaded.model, loaded.tokenizer
    target_dtype, output_dir = result.dtype, result.output_dir

    check = LogitsCheck.before_merge(model, tokenizer, log) if verify else None
    merge_lora(model)  # in place, layer by layer
    if check is not None:
        result.adapter_effect = check.adapter_effect
        result.checks = check.after_merge(model, target_dtype, log)

    log(f"writing {output_dir} ({dtype_name(target_dtype)})")
    after_write = None
    if export is not None:  # from the folder just written; --gguf-only removes the folder's other files after
        after_write = lambda tmp: export.export_folder(tmp, output_dir, model.config, tokenizer, log)  # noqa: E731
    save_merged(model, tokenizer, output_dir, overwrite=overwrite, dtype=target_dtype,
                max_shard_size=shard_bytes, adapter_config=adapter_config, after_write=after_write)
    return result
