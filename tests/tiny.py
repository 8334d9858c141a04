"""Tiny random models and a tokenizer, built offline in seconds, for the fast test suite."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import transformers

# scripts/synthetic.py, shared with the benchmarks: importable wherever tiny is (a test's child process too).
_SCRIPTS = str(Path(__file__).resolve().parent.parent / "scripts")
if _SCRIPTS not in sys.path:
    sys.path.insert(0, _SCRIPTS)
import synthetic  # noqa: E402

CHAT_TEMPLATE = synthetic.CHAT_TEMPLATE
CORPUS = synthetic.TINY_CORPUS  # the text the tiny tokenizers are trained on


def make_tokenizer(vocab_size: int = synthetic.TINY_VOCAB, pad_is_eos: bool = False):
    """A byte-level BPE tokenizer with eos, pad and a ChatML chat template (like SmolLM2/Qwen2)."""
    return synthetic.make_tokenizer(vocab_size, pad_is_eos)


VOCAB = synthetic.TINY_VOCAB

# One config per architecture family we promise to support. Sizes are tiny: hidden 32-64, 2 layers.
ARCH_CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False),
    "llama_tied": lambda: transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True),
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=256, bos_token_id=1, eos_token_id=2),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=256),
    "qwen2": lambda: transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256),
    "mistral": lambda: transformers.MistralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256),
    "opt": lambda: transformers.OPTConfig(
        vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=256, word_embed_proj_dim=32),
    "phi": lambda: transformers.PhiConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=256),
}

ARCHS = [a for a in ARCH_CONFIGS if a != "llama_tied"]


def make_model(arch: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32, init_range: float | None = None):
    """A tiny randomly initialised causal LM of the given architecture, in eval mode.

    `init_range` widens the random weights: with the default 0.02 a frozen random output head can only produce
    near-uniform logits, so training tests use a wider init to let LoRA reach a low loss.
    """
    torch.manual_seed(seed)
    config = ARCH_CONFIGS[arch]()
    if init_range is not None:
        config.initializer_range = init_range
    # Ids of the test tokenizer's specials (make_tokenizer): keep every config inside the tiny vocabulary.
    config.bos_token_id, config.eos_token_id, config.pad_token_id = 1, 2, 3
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.to(dtype)
    return model.eval()


def save_model(arch: str, path: Path, seed: int = 0, pad_is_eos: bool = False, init_range: float | None = None) -> Path:
    """Write a tiny model and tokenizer to `path` as a normal Hugging Face folder; return the path."""
    model = make_model(arch, seed, init_range=init_range)
    tok = make_tokenizer(VOCAB, pad_is_eos=pad_is_eos)
    model.config.eos_token_id = tok.eos_token_id
    model.config.pad_token_id = tok.pad_token_id
    if model.generation_config is not None:
        model.generation_config.eos_token_id = tok.eos_token_id
        model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return Path(path)


def sample_input_ids(batch: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, VOCAB, (batch, length), generator=g)
