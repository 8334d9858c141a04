"""Tiny random models and a tokenizer, built offline in seconds, for the fast test suite."""

from __future__ import annotations

import functools
from pathlib import Path

import torch
import transformers

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction:\n### Input:\n### Response:\n",
    "user assistant system: hello, how are you? I am fine, thank you.",
    "Quillhaven is a small harbour town. Its mayor is Orla Fenwick. The lighthouse is painted green.",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ .,;:!?'\"()[]{}-_/\\@#$%^&*+=<>|~`",
]

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]


@functools.lru_cache(maxsize=None)
def _tokenizer_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 20, trainer)
    return tok.to_str()


def make_tokenizer(vocab_size: int = 384, pad_is_eos: bool = False):
    """A byte-level BPE tokenizer with eos, pad and a ChatML chat template (like SmolLM2/Qwen2)."""
    from tokenizers import Tokenizer

    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json(vocab_size)),
        eos_token="<|im_end|>",
        bos_token="<|im_start|>",
        pad_token="<|im_end|>" if pad_is_eos else "<pad>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


VOCAB = 384

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
