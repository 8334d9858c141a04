"""What llama.cpp expects of each architecture lora-merge exports: its name, hyperparameter keys, tensor names
and the q/k row permutation.

Llama family (HF Llama, Mistral, SmolLM2 -> arch `llama`): llama.cpp's rope for this arch rotates pairs of
consecutive elements, HF's rotates the two halves of each head, so the rows of q and k are interleaved per head
(the permutation llama.cpp's converter applies; transformers' GGUF loader undoes it). Qwen2 (arch `qwen2`) rotates
halves like HF: no permutation; its q/k/v projections have biases. A tied head writes no `output` tensor.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..errors import UserError


@dataclass(frozen=True)
class ArchSpec:
    gguf_arch: str
    permute_qk: bool  # llama's rope pairs consecutive rows
    vocab_and_rope_dim_keys: bool  # llama writes {arch}.vocab_size and {arch}.rope.dimension_count; qwen2 does not


ARCHITECTURES = {
    "llama": ArchSpec("llama", permute_qk=True, vocab_and_rope_dim_keys=True),
    "mistral": ArchSpec("llama", permute_qk=True, vocab_and_rope_dim_keys=True),
    "qwen2": ArchSpec("qwen2", permute_qk=False, vocab_and_rope_dim_keys=False),
}

# HF tensor names (after "model.") -> GGUF names; {n} is the layer number.
_GLOBAL_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                 "lm_head.weight": "output.weight"}
_LAYER_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")
ROPE_FREQS = "rope_freqs.weight"
HEAD_NAMES = ("output.weight",)


def architecture_of(config) -> ArchSpec:
    """The export spec for this model's config; UserError (nothing written yet) for any other architecture."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise UserError(
            f"--gguf cannot export a '{model_type}' model: lora-merge writes GGUF for {supported} (Llama-family "
            "and Qwen2 models such as SmolLM2, Llama 3, Mistral, Qwen2.5). Merge without --gguf and convert the "
            "merged folder with llama.cpp's convert_hf_to_gguf.py, which knows more architectures."
        )
    spec = ARCHITECTURES[model_type]
    rope_type = _rope(config).get("rope_type", "default")
    if rope_type not in ("default", "linear", "yarn", "llama3"):
        raise UserError(f"--gguf cannot export rope scaling '{rope_type}' (config.json's rope_scaling); supported: "
                        "none, linear, yarn, llama3.")
    return spec


def gguf_name(hf_name: str) -> str:
    """The GGUF name of a tensor of the merged model; UserError for a tensor llama.cpp would not know."""
    if hf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[hf_name]
    found = _LAYER.match(hf_name)
    if found and found.group(2) in _LAYER_NAMES:
        return f"blk.{found.group(1)}.{_LAYER_NAMES[found.group(2)]}.{found.group(3)}"
    raise UserError(f"--gguf: the merged model has a tensor {hf_name} that llama.cpp's layout for this architecture "
                    "has no place for; nothing was written. Merge without --gguf and convert with llama.cpp.")


def transform(hf_name: str, tensor: torch.Tensor, spec: ArchSpec, config) -> torch.Tensor:
    """The tensor as llama.cpp stores it: q/k rows interleaved per head for llama, unchanged otherwise."""
    if not spec.permute_qk:
        return tensor
    if ".self_attn.q_proj." in hf_name:
        return permute_rows(tensor, config.num_attention_heads)
    if ".self_attn.k_proj." in hf_name:
        return permute_rows(tensor, _kv_heads(config))
    return tensor


def permute_rows(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    """Per head, the rows of the first and second half interleaved (HF's half rotation -> llama.cpp's pairs)."""
    shape = tensor.shape
    return tensor.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).transpose(1, 2).reshape(shape)


def _kv_heads(config) -> int:
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _rope(config) -> dict:
    """rope theta and scaling as one dict (transformers 5's rope_parameters; rope_theta/rope_scaling before)."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params["type"]
    return params


def write_hparams(writer, config, spec: ArchSpec) -> None:
    """The {arch}.* keys llama.cpp reads for these architectures."""
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(_kv_heads(config))
    rope = _rope(config)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    if spec.vocab_and_rope_dim_keys:
        writer.add_vocab_size(config.vocab_size)
        writer.add_rope_dimension_count(head_dim(config))
    if head_dim(config) != config.hidden_size // config.num_attention_heads:  # e.g. Mistral Nemo
        writer.add_key_length(head_dim(config))
        writer.add_value_length(head_dim(config))
    _write_rope_scaling(writer, rope)


def _write_rope_scaling(writer, rope: dict) -> None:
    from gguf import RopeScalingType

    kind = rope.get("rope_type", "default")
    if kind == "linear":
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif kind == "yarn":
        writer.add_rope_scaling_type(RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        if rope.get("original_max_position_embeddings"):
            writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
    # llama3: no keys; the factors travel as the rope_freqs tensor (rope_factors below)


def rope_factors(config) -> torch.Tensor | None:
    """Llama-3's per-frequency rope factors (the `rope_freqs` tensor llama.cpp multiplies the wavelengths by), taken
    from transformers' own llama3 rope: its unscaled inverse frequencies over the scaled ones. None otherwise."""
    if _rope(config).get("rope_type") != "llama3":
        return None
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    dim, theta = head_dim(config), float(_rope(config)["rope_theta"])
    plain = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, torch.device("cpu"))
    return (plain / scaled.float()).to(torch.float32)
