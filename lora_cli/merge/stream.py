"""lora-merge's low-RAM path: the base checkpoint is read and the merged model written one tensor at a time.

The output is what the in-memory path writes (`save_pretrained` of the merged model): the same tensor names (tied
weights once), dtypes, values, shard files and index. That layout is taken from transformers itself, applied to
the model built on the meta device: its state dict in the output dtype, tied weights removed the way
`save_pretrained` removes them, and huggingface_hub's shard split. Each tensor is then read from the base's
safetensors file, merged when the adapter targets it (`lora.merged_weight`, the formula LoraLinear uses, in fp32),
checked, cast and written (safetensors_io). Peak RAM is about the largest tensor, plus the interpreter.

A checkpoint this cannot map tensor for tensor (pickle .bin files, quantized bases, names that differ from the
model's, weight conversions) is merged by the in-memory path instead: `plan_streaming` says why.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..adapter import (
    BASE_LAYER,
    KEY_PREFIX,
    load_adapter,
    modified_copy_error,
    normalise_key,
    read_adapter_tensors,
    same_values,
)
from ..errors import UserError
from ..inject import lora_layers
from ..layout import WEIGHTS_NAME
from ..lora import merged_weight
from ..model_files import check_weight_files
from ..models import build_meta_model, generation_config
from ..precision import dtype_name
from ..safetensors_io import SafetensorsFile, write_streaming

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# Each merged weight is checked against the unmerged computation on a few random input columns: merged W x must
# equal W x + scaling B (A x) (DoRA: times m / ||W + s B A||) within 1e-4 of its largest value, the same relative
# tolerance as the fp32 logits check (verify.MERGE_TOLERANCE). fp32 rounding of a 4096-wide dot product is ~1e-6 of
# it; a missing update, a wrong scaling or transpose is off by the update's own size (1e-3 and more of W x).
PROBE_COLUMNS = 4
PROBE_TOLERANCE = 1e-4
FINITE_CHUNK = 2**20  # elements per isfinite() call: on the whole tensor its bool result (and a half tensor's
# fp32 upcast) would be another copy of it (measured: +84 MB RSS for a 525 MB embedding with 2**24)


@dataclass
class _Target:
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scaling: float
    fan_in_fan_out: bool
    magnitude: torch.Tensor | None
    base_copy: tuple[str, torch.Tensor] | None = None  # PEFT's full copy of this weight (lm_head): must equal it
    adapter_file: Path | None = None


@dataclass
class StreamPlan:
    files: dict[str, SafetensorsFile]  # output tensor name -> the base file holding it
    shards: dict[str, list[str]]  # output file name -> its tensors
    entries: dict[str, tuple[torch.dtype, tuple[int, ...]]]  # output tensor name -> (dtype, shape)
    index: dict | None  # model.safetensors.index.json content when sharded
    targets: dict[str, _Target]  # weight name -> the LoRA update folded into it
    config: object
    generation_config: object | None
    dtype: torch.dtype
    model_class: str  # written to config.json's architectures, as save_pretrained does
    largest_relative_error: float = 0.0
    merged: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(dtype.itemsize * math.prod(shape) for dtype, shape in self.entries.values())


# --- planning ------------------------------------------------------------------------------------------------


def _resolve(source, filename: str) -> Path | None:
    """A file of the base: in its folder, or from the Hub (cache first); None where the base has no such file."""
    folder = Path(source.name_or_path).expanduser()
    if folder.is_dir():
        return folder / filename if (folder / filename).is_file() else None
    from transformers.utils import cached_file

    try:
        found = cached_file(source.name_or_path, filename, revision=source.revision,
                            _raise_exceptions_for_missing_entries=False,
                            _raise_exceptions_for_connection_errors=False)
    except OSError:
        return None
    return Path(found) if found else None


def _checkpoint(source) -> dict[str, SafetensorsFile] | str:
    """Tensor name -> the safetensors file holding it, or why there is none. The files are the ones transformers
    loads: model.safetensors before the index (model_files.WEIGHT_FILE_ORDER), so a folder holding both is merged
    from the weights the in-memory path and every later from_pretrained would use."""
    single = _resolve(source, SINGLE_NAME)
    if single is not None:
        file = SafetensorsFile(single)
        return dict.fromkeys(file.keys(), file)
    index = _resolve(source, INDEX_NAME)
    if index is not None:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        files = {}
        for name in sorted(set(weight_map.values())):
            path = _resolve(source, name)
            if path is None:
                return f"the shard {name} named in {INDEX_NAME} is missing"
            files[name] = SafetensorsFile(path)
        # Each tensor from the shard that holds it, by the shards' own headers: an index that names the wrong shard
        # (hand-edited, or from another save) must not break the merge when the tensors are all there.
        return {key: file for file in files.values() for key in file.keys()}
    return "the base has no safetensors weights (a pickle .bin checkpoint)"


def _saved_layout(model, dtype: torch.dtype, shard_bytes: int):
    """What `save_pretrained` of this model in `dtype` would write: tensor names, dtypes, shapes and shard split."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    model.to(dtype)  # floating tensors only, like the in-memory path's final cast
    state = model.state_dict()
    for key in model._keys_to_ignore_on_save or []:
        state.pop(key, None)
    state = remove_tied_weights_from_state_dict(state, model)
    # from_pretrained records the weight conversions it applied (none, for a checkpoint whose names are the model's,
    # which the caller checks); save_pretrained reverts them, and in doing so orders the tensors by name.
    model._weight_conversions = []
    reverted = revert_weight_conversion(model, dict(state))
    if sorted(reverted) != sorted(state):
        return None
    state = {key: state[key] for key in reverted}
    split = split_torch_state_dict_into_shards(state, filename_pattern="model{suffix}.safetensors",
                                               max_shard_size=shard_bytes)
    entries = {key: (tensor.dtype, tuple(tensor.shape)) for key, tensor in state.items()}
    index = None
    if split.is_sharded:
        index = {"metadata": {"total_parameters": model.num_parameters(), **split.metadata},
                 "weight_map": split.tensor_to_filename}
    return entries, dict(split.filename_to_tensors), index


def plan_streaming(source, adapter_dir: Path, dtype: torch.dtype, shard_bytes: int) -> StreamPlan | str:
    """The streaming plan, or the reason this base needs the in-memory path. Adapter errors are raised here (the
    adapter is checked against the meta-device model exactly as against the loaded one)."""
    from transformers import AutoConfig

    check_weight_files(source.name_or_path, source.revision)  # truncated or missing files: say so, never stream them
    checkpoint = _checkpoint(source)
    if isinstance(checkpoint, str):
        return checkpoint
    config = AutoConfig.from_pretrained(source.name_or_path, revision=source.revision,
                                        trust_remote_code=source.trust_remote_code)
    if getattr(config, "quantization_config", None):
        return "the base is quantized"
    if getattr(config, "transformers_weights", None):  # from_pretrained loads that file, whatever else is there
        return f"its config.json names its weights file (transformers_weights: {config.transformers_weights})"
    model = build_meta_model(config, source.trust_remote_code)
    try:
        layout = _saved_layout(model, dtype, shard_bytes)
    except (ImportError, AttributeError, RuntimeError) as err:  # another transformers version, or shared tensors
        return f"transformers' save layout could not be computed ({type(err).__name__})"
    if layout is None:
        return "this architecture converts its weights when saving"
    entries, shards, index = layout
    missing = [k for k in entries if k not in checkpoint]
    if missing:
        return f"the checkpoint's tensor names differ from the model's ({missing[0]} is not in it)"
    wrong = [k for k in entries if checkpoint[k].shape(k) != entries[k][1]]
    if wrong:
        return f"{wrong[0]} has shape {list(checkpoint[wrong[0]].shape(wrong[0]))} in the checkpoint"
    load_adapter(model, adapter_dir)  # strict: the same errors as loading it onto the real base
    files = {key: checkpoint[key] for key in entries}
    return StreamPlan(files, shards, entries, index, _targets(model, adapter_dir), config,
                      generation_config(source.name_or_path, source.revision, config), dtype, type(model).__name__)


def _targets(model, adapter_dir: Path) -> dict[str, _Target]:
    tensors = {normalise_key(k): v for k, v in read_adapter_tensors(adapter_dir).items()}
    targets = {}
    for path, layer in lora_layers(model).items():
        magnitude = tensors[f"{KEY_PREFIX}{path}.lora_magnitude_vector"] if layer.use_dora else None
        copy_key = f"{KEY_PREFIX}{path}{BASE_LAYER}weight"
        copy = (copy_key, tensors[copy_key]) if copy_key in tensors else None
        targets[f"{path}.weight"] = _Target(tensors[f"{KEY_PREFIX}{path}.lora_A.weight"],
                                            tensors[f"{KEY_PREFIX}{path}.lora_B.weight"], layer.scaling,
                                            layer.fan_in_fan_out, magnitude, copy, adapter_dir / WEIGHTS_NAME)
    return targets


# --- writing -------------------------------------------------------------------------------------------------


def write_merged(plan: StreamPlan, folder: Path) -> None:
    """Every shard, the index when sharded, config.json and generation_config.json into `folder`."""
    for filename, keys in plan.shards.items():
        write_streaming(folder / filename, {k: plan.entries[k] for k in keys}, lambda key: _produce(plan, key),
                        metadata={"format": "pt"})
    if plan.index is not None:
        (folder / INDEX_NAME).write_text(json.dumps(plan.index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    config = plan.config
    config.dtype = dtype_name(plan.dtype)
    config.architectures = [plan.model_class]
    if getattr(config, "use_cache", None) is False:  # a merged model is for inference: see merge.save_merged
        config.use_cache = True
    config.save_pretrained(folder)
    if plan.generation_config is not None:
        plan.generation_config.save_pretrained(folder)


def merged_tensors(plan: StreamPlan) -> tuple[dict[str, tuple[int, ...]], Callable[[str], torch.Tensor]]:
    """The output tensors' shapes, and a function making any one of them (merged and checked as write_merged does),
    for writers of other formats (lora-merge --gguf-only)."""
    return {key: shape for key, (_, shape) in plan.entries.items()}, lambda key: _produce(plan, key)


@torch.no_grad()
def _produce(plan: StreamPlan, key: str) -> torch.Tensor:
    """One output tensor: read, merged if targeted (fp32, checked), cast, checked for inf/NaN."""
    dtype, _ = plan.entries[key]
    stored = plan.files[key].read(key)
    target = plan.targets.get(key)
    if target is None:
        out = stored.to(dtype)
    else:
        if target.base_copy is not None and not same_values(stored, target.base_copy[1]):
            raise modified_copy_error(target.base_copy[0], target.adapter_file)
        if stored.is_floating_point():  # a NaN already in the base is the base's fault, not the adapter's
            _check_finite(key, stored, "the base model's weight holds", "The base model's files are corrupt: "
                          "re-download them.")
        merged = merged_weight(stored, target.lora_A, target.lora_B, target.scaling, target.fan_in_fan_out,
                               target.magnitude)
        _check_finite(key, merged, "merging the LoRA update gives", "The adapter's lora_A/lora_B tensors are "
                      "probably corrupt or diverged in training (check the training loss).")
        plan.largest_relative_error = max(plan.largest_relative_error, _check_algebra(key, merged, stored, target))
        plan.merged.append(key)
        out = merged.to(dtype)
        del merged
    if out.is_floating_point():
        hint = " float16 holds |x| <= 65504 only; use --dtype bfloat16." if dtype == torch.float16 else ""
        _check_finite(key, out, f"in {dtype_name(dtype)} it has", hint)
    return out


def _check_finite(key: str, tensor: torch.Tensor, what: str, hint: str) -> None:
    flat = tensor.reshape(-1)
    for start in range(0, flat.numel(), FINITE_CHUNK):
        if not torch.isfinite(flat[start : start + FINITE_CHUNK]).all():
            raise UserError(f"The merged weight {key} is not finite: {what} inf or NaN values; nothing was written."
                            f" {hint}".rstrip())


def _check_algebra(key: str, merged: torch.Tensor, stored: torch.Tensor, t: _Target) -> float:
    """max |merged x - (W x + s B A x)| / max |W x + s B A x| on random columns x; UserError above tolerance."""
    oriented = (lambda w: w.t()) if t.fan_in_fan_out else (lambda w: w)
    weight = oriented(stored).float()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(weight.shape[1], PROBE_COLUMNS, generator=generator)
    expected = weight @ x + t.scaling * (t.lora_B.float() @ (t.lora_A.float() @ x))
    if t.magnitude is not None:  # DoRA: the row norms of W + s B A (detached in training, a constant here)
        norms = torch.linalg.norm(weight + t.scaling * (t.lora_B.float() @ t.lora_A.float()), dim=1)
        expected = expected * (t.magnitude.float() / norms).unsqueeze(1)
    scale = expected.abs().max().item()
    error = (oriented(merged) @ x - expected).abs().max().item() / max(scale, 1e-30)
    if not error <= PROBE_TOLERANCE:
        raise UserError(
            f"Verification failed for {key}: the merged weight differs from W + scaling * B A by {error:.3g} of its "
            f"output scale (tolerance {PROBE_TOLERANCE:g}); nothing was written. This is a bug in lora-merge; "
            "--verify-logits merges in memory and checks the whole model's logits instead."
        )
    return error
