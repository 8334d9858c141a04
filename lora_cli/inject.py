"""Where LoRA goes: resolve `target_modules` on a model, wrap those modules, freeze the rest, and merge back."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from torch import nn

from .config.schema import ALL_LINEAR
from .errors import UserError
from .lora import LoraLinear, is_lora_target_type

if TYPE_CHECKING:
    from .config.schema import LoraSection

# PEFT's defaults (attention query and value), so adapters are comparable with what users know.
DEFAULT_TARGETS: dict[str, list[str]] = {
    **dict.fromkeys(
        ["llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "opt", "stablelm", "olmo", "olmo2"],
        ["q_proj", "v_proj"],
    ),
    "gpt2": ["c_attn"],
    **dict.fromkeys(["gpt_neox", "falcon", "bloom"], ["query_key_value"]),
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "phi3": ["qkv_proj"],
}

# Used to find attention projections by structure on an architecture not in the table.
_ATTENTION_CONTAINER = re.compile(r"(attn|attention)", re.IGNORECASE)
_QUERY_VALUE = re.compile(r"^(q|v|query|value|q_proj|v_proj|wq|wv)$", re.IGNORECASE)
_FUSED_QKV = re.compile(r"^(qkv|qkv_proj|c_attn|query_key_value|wqkv|Wqkv|in_proj)$")
_LAYER_INDEX = re.compile(r"\.(\d+)\.")  # first numbered path segment: the decoder layer (PEFT's default)


@dataclass
class LoraSettings:
    """Everything that decides the shape and math of an adapter (the `lora:` config section)."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] | str | None = None
    use_rslora: bool = False
    use_dora: bool = False
    init: str = "default"
    layers_to_transform: list[int] | None = None
    # Per-module overrides, as PEFT's rank_pattern / alpha_pattern: {name-suffix-or-regex: value}
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    # LoRA+ (lora.loraplus_lr_ratio): B's learning rate over A's. Training only (the optimizer reads it); it is
    # not part of the adapter and not written to adapter_config.json.
    loraplus_lr_ratio: float | None = None


def lora_settings(section: LoraSection) -> LoraSettings:
    """The config's `lora:` section as LoraSettings: the one translation, for training,
    the estimate and the adapter files alike."""
    return LoraSettings(**section.model_dump())


@dataclass
class InjectionReport:
    wrapped: list[str]
    target_modules: list[str] | str  # the resolved targets, as written to adapter_config.json
    trainable_params: int
    total_params: int

    @property
    def summary(self) -> str:
        pct = 100 * self.trainable_params / max(self.total_params, 1)
        return (
            f"LoRA on {len(self.wrapped)} modules: trainable params {self.trainable_params:,} of "
            f"{self.total_params:,} ({pct:.3f}%)"
        )


# --- target resolution ---------------------------------------------------------------------------------------


def linear_module_names(model: nn.Module) -> list[str]:
    """Paths of every module LoRA can wrap, output head included."""
    return [name for name, module in model.named_modules() if is_lora_target_type(module)]


def _suffix_matches(path: str, entry: str) -> bool:
    return path == entry or path.endswith("." + entry)


def _output_head_name(model: nn.Module) -> str | None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        return None
    return next((name for name, module in model.named_modules() if module is head), None)


def _layer_index(path: str) -> int | None:
    match = _LAYER_INDEX.search(path)
    return int(match.group(1)) if match else None


def default_targets(model: nn.Module) -> list[str]:
    """The attention projections for the model's architecture, from the table or found by structure."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in DEFAULT_TARGETS:
        return DEFAULT_TARGETS[model_type]
    names = [n for n in linear_module_names(model) if _ATTENTION_CONTAINER.search(n.rsplit(".", 1)[0])]
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    found = [leaf for leaf in leaves if _QUERY_VALUE.match(leaf)] or [leaf for leaf in leaves if _FUSED_QKV.match(leaf)]
    if not found:
        raise UserError(
            f"lora.target_modules is not set and lora-cli has no default for the '{model_type}' architecture, nor "
            f"could it find the attention projections by their names. Set lora.target_modules explicitly, e.g. "
            f"lora.target_modules=[{', '.join(leaves[:2]) or 'q_proj,v_proj'}] or lora.target_modules=all-linear. "
            f"Linear modules in this model: {', '.join(_distinct_suffixes(model))}."
        )
    return found


def _distinct_suffixes(model: nn.Module) -> list[str]:
    return sorted({name.rsplit(".", 1)[-1] for name in linear_module_names(model)})


def resolve_target_paths(
    model: nn.Module, settings: LoraSettings, strict: bool = True
) -> tuple[list[str], list[str] | str]:
    """Module paths to wrap, and the target_modules value that reproduces them (for adapter_config.json).

    With `strict`, a list entry that matches nothing is an error (PEFT ignores it silently when another entry
    matches, which leaves users training less than they think). Loading an adapter PEFT made uses PEFT's
    lenient rule instead: the tensor check that follows catches any real mismatch.
    """
    targets = settings.target_modules
    candidates = linear_module_names(model)
    head = _output_head_name(model)
    if targets is None:
        targets = default_targets(model)
    if isinstance(targets, str) and targets != ALL_LINEAR and settings.layers_to_transform is not None:
        # PEFT's LoraConfig raises on this combination, so an adapter saved with it would not load there.
        raise UserError(
            f"lora.layers_to_transform cannot be combined with a regex lora.target_modules ({targets!r}): PEFT "
            f"and the tools built on it reject such adapters. Put the layer numbers in the regex instead, e.g. "
            f"'.*\\.(0|1)\\.self_attn\\.(q_proj|v_proj)', or give lora.target_modules as a list of names."
        )
    if targets == ALL_LINEAR:
        paths = [p for p in candidates if p != head]
        written: list[str] | str = sorted({p.rsplit(".", 1)[-1] for p in paths})
    elif isinstance(targets, str):
        paths = _match_regex(model, targets)
        written = targets
    else:
        paths = _match_list(model, list(targets), strict)
        written = list(targets)
    paths = _filter_layers(paths, settings.layers_to_transform)
    if not paths:
        raise UserError(
            f"lora.target_modules={targets!r} with lora.layers_to_transform={settings.layers_to_transform} "
            f"selects no module. Linear modules in this model: {', '.join(_distinct_suffixes(model))}."
        )
    _refuse_tied_head(model, paths, head)
    return paths, written


def _match_list(model: nn.Module, entries: list[str], strict: bool = True) -> list[str]:
    all_paths = [name for name, _ in model.named_modules() if name]
    linear = set(linear_module_names(model))
    chosen, unmatched = [], []
    for entry in entries:
        hits = [p for p in all_paths if _suffix_matches(p, entry)]
        if not hits:
            unmatched.append(entry)
            continue
        not_linear = [p for p in hits if p not in linear]
        if not_linear:
            module = model.get_submodule(not_linear[0])
            raise UserError(
                f"lora.target_modules entry '{entry}' matches '{not_linear[0]}', a {type(module).__name__}; "
                f"lora-cli wraps Linear and Conv1D layers only. Choose among: {', '.join(_distinct_suffixes(model))}."
            )
        chosen.extend(hits)
    if unmatched and (strict or not chosen):
        raise UserError(
            f"lora.target_modules entries {unmatched} match no module in this model. Linear modules it has: "
            f"{', '.join(_distinct_suffixes(model))}. Fix the names (they match the end of a module path), or use "
            f"lora.target_modules=all-linear."
        )
    order = {p: i for i, p in enumerate(all_paths)}
    return sorted(set(chosen), key=order.__getitem__)


def _match_regex(model: nn.Module, pattern: str) -> list[str]:
    try:
        regex = re.compile(pattern)
    except re.error as err:
        raise UserError(f"lora.target_modules '{pattern}' is not a valid regular expression ({err}).") from None
    hits = [p for p in linear_module_names(model) if regex.fullmatch(p)]
    if not hits:
        raise UserError(
            f"lora.target_modules regex '{pattern}' matches no Linear module path (it must match the whole path, "
            f"e.g. '.*\\.(q_proj|v_proj)'). Linear modules: {', '.join(_distinct_suffixes(model))}."
        )
    return hits


def _filter_layers(paths: list[str], layers: list[int] | None) -> list[str]:
    if layers is None:
        return paths
    wanted = set(layers)
    return [p for p in paths if _layer_index(p) in wanted]


def _refuse_tied_head(model: nn.Module, paths: list[str], head: str | None) -> None:
    if head is None or head not in paths:
        return
    embeddings = model.get_input_embeddings()
    if embeddings is not None and model.get_submodule(head).weight is embeddings.weight:
        raise UserError(
            f"lora.target_modules selects '{head}', the output head, whose weight is tied to the input embedding: "
            "a LoRA update on it would silently change the embedding too. Remove it from lora.target_modules "
            "(all-linear already leaves it out)."
        )


# --- apply / merge -------------------------------------------------------------------------------------------


def pattern_value(path: str, patterns: dict, default):
    """PEFT's rank_pattern/alpha_pattern lookup: the first key matching the end of the path."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def apply_lora(model: nn.Module, settings: LoraSettings, paths: list[str] | None = None) -> InjectionReport:
    """Freeze every base parameter and wrap the target modules in LoraLinear; only LoRA parameters train."""
    if any(isinstance(m, LoraLinear) for m in model.modules()):
        raise UserError("This model already has LoRA layers; merge or reload the base before adding another adapter.")
    written: list[str] | str
    if paths is None:
        paths, written = resolve_target_paths(model, settings)
    else:
        written = settings.target_modules if settings.target_modules is not None else paths
    for param in model.parameters():
        param.requires_grad_(False)
    for path in paths:
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        layer = LoraLinear.from_base(
            getattr(parent, child),
            r=pattern_value(path, settings.rank_pattern, settings.r),
            alpha=pattern_value(path, settings.alpha_pattern, settings.alpha),
            dropout=settings.dropout,
            use_rslora=settings.use_rslora,
            init=settings.init,
            use_dora=settings.use_dora,
        )
        setattr(parent, child, layer)
    return InjectionReport(
        wrapped=list(paths),
        target_modules=written,
        trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        total_params=sum(_weights_in(p) for p in model.parameters()),
    )


def _weights_in(param) -> int:
    """How many weights a parameter holds: a 4-bit (QLoRA) one packs two per byte of its uint8 storage."""
    quant_state = getattr(param, "quant_state", None)
    return quant_state.shape.numel() if quant_state is not None else param.numel()


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


def lora_state_dict(model: nn.Module) -> dict:
    """The adapter tensors, keyed by their path in the transformers model (PEFT adds `base_model.model.`)."""
    return {k: v for k, v in model.state_dict().items() if ".lora_" in k}


def set_lora_enabled(model: nn.Module, enabled: bool) -> None:
    for layer in lora_layers(model).values():
        layer.lora_enabled = enabled


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA layer into its base weight and put the original modules back.

    Afterwards the model is a plain transformers model again; `save_pretrained` writes ordinary weights.
    Tied embeddings stay consistent because the output head is never wrapped when it is tied.
    """
    layers = lora_layers(model)
    for layer in layers.values():  # check every layer first: one bad layer leaves the whole model untouched
        if not layer.merged:
            layer.checked_merged_weight()
    for path, layer in layers.items():
        layer.merge()
        parent_path, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent_path), child, layer.unwrap())
    return model
