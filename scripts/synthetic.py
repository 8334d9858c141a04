"""Synthetic models, tokenizers and data, built offline: shared by the test suite (tests/tiny.py), the benchmarks
(scripts/bench.py, scripts/gpu_bench.py) and the GPU check (scripts/gpu_check.py).

* `make_tokenizer`: a tiny byte-level BPE tokenizer (384 tokens, trained in a fraction of a second) with eos, pad
  and a ChatML chat template, like SmolLM2's / Qwen2's;
* `build_default_model`: the benchmarks' ~35M-parameter Llama with a realistic 32k BPE vocabulary;
* `write_workloads`: the benchmarks' fixed-length text and variable-length chat data.
"""

from __future__ import annotations

import functools
import json
import math
import random
from pathlib import Path

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TINY_VOCAB = 384
TINY_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction:\n### Input:\n### Response:\n",
    "user assistant system: hello, how are you? I am fine, thank you.",
    "Quillhaven is a small harbour town. Its mayor is Orla Fenwick. The lighthouse is painted green.",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ .,;:!?'\"()[]{}-_/\\@#$%^&*+=<>|~`",  # noqa: E501
]
# The benchmarks' default model: a small Llama (GQA, SwiGLU, tied embeddings like SmolLM2) with a realistic 32k
# vocabulary, so that the output head and the loss weigh in a step as they do in real models.
DEFAULT_MODEL = dict(
    model_type="llama", vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=6,
    num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=True,
    rms_norm_eps=1e-5,
)
# Public shapes (values from their config.json files), for random-weight models of their size.
SMOLLM2_135M = dict(model_type="llama", hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True,
                    max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5)
LLAMA_32_1B = dict(model_type="llama", hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                   num_key_value_heads=8, intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True,
                   head_dim=64, max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5)


def train_bpe(texts, vocab_size: int):
    """A byte-level BPE `tokenizers.Tokenizer` trained on `texts` (an iterable of strings), with SPECIAL_TOKENS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return tok


def wrap_tokenizer(tok, pad_is_eos: bool = False):
    """A transformers tokenizer around a trained `tokenizers.Tokenizer`: eos <|im_end|>, bos <|im_start|>, pad <pad>
    (or eos), unk <|endoftext|>, and the ChatML chat template."""
    import transformers

    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|im_start|>",
        pad_token="<|im_end|>" if pad_is_eos else "<pad>", unk_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


@functools.lru_cache(maxsize=None)
def _tiny_tokenizer_json(vocab_size: int) -> str:
    return train_bpe(TINY_CORPUS * 20, vocab_size).to_str()


def make_tokenizer(vocab_size: int = TINY_VOCAB, pad_is_eos: bool = False):
    """The tiny tokenizer: byte-level BPE with eos, pad and a ChatML chat template (like SmolLM2/Qwen2)."""
    from tokenizers import Tokenizer

    return wrap_tokenizer(Tokenizer.from_str(_tiny_tokenizer_json(vocab_size)), pad_is_eos)


def random_model(folder: Path, shape: dict, device: str = "cpu", dtype: str = "float32", tokenizer=None) -> Path:
    """A random-weight causal LM of `shape` (config.json values, model_type included) with `tokenizer` (by default
    the tiny one), saved as a Hugging Face folder; built on `device` in `dtype`, written atomically (a sibling
    folder, renamed). An existing folder is kept."""
    import torch
    import transformers

    if (folder / "config.json").is_file():
        return folder
    tokenizer = tokenizer or make_tokenizer()
    shape = dict(shape)
    config = transformers.AutoConfig.for_model(shape.pop("model_type"), **shape, bos_token_id=tokenizer.bos_token_id,
                                               eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    tmp = folder.with_name(folder.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(folder)
    return folder


# --------------------------------------------------------------------------------------------------------------
# The benchmarks' text: pseudo-words with a Zipf distribution


def _lexicon(rng: random.Random, size: int = 80000) -> list[str]:
    """Pseudo-words from syllables: a Zipf-distributed text over them trains a BPE vocabulary of realistic size."""
    cons = list("bcdfghjklmnprstvwz") + ["ch", "sh", "th", "qu", "br", "st", "tr", "pl"]
    vows = ["a", "e", "i", "o", "u", "ai", "ea", "ou", "y"]
    codas = ["", "", "", "n", "r", "s", "t", "l", "m", "nd", "st"]
    sylls = [c + v + k for c in cons for v in vows for k in codas]
    words: set[str] = set()
    while len(words) < size:
        words.add("".join(rng.choice(sylls) for _ in range(rng.choice([1, 2, 2, 3, 3, 4]))))
    lex = sorted(words)
    rng.shuffle(lex)
    return lex


class WordSource:
    def __init__(self, seed: int = 0, lexicon_size: int = 80000):
        self.rng = random.Random(seed)
        self.lex = _lexicon(self.rng, lexicon_size)
        total, self.cum = 0.0, []
        for i in range(len(self.lex)):
            total += 1.0 / (i + 10)
            self.cum.append(total)

    def words(self, n: int) -> str:
        return " ".join(self.rng.choices(self.lex, cum_weights=self.cum, k=n))


def build_default_model(folder: Path, vocab_size: int = 32000) -> Path:
    """A random ~35M-parameter Llama and a 32k byte-level BPE tokenizer, both built offline, saved as an HF folder.

    A `vocab_size` above 32000 widens only the model's embedding and head (the tokenizer never emits the extra ids):
    the compute and memory of a large-vocabulary model's output layer, on the same text."""
    if (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file():
        return folder
    print(f"[bench] building the default model in {folder} (once)", flush=True)
    source = WordSource(seed=1)
    tok = train_bpe((source.words(50) for _ in range(12000)), min(vocab_size, DEFAULT_MODEL["vocab_size"]))
    return random_model(folder, {**DEFAULT_MODEL, "vocab_size": vocab_size}, tokenizer=wrap_tokenizer(tok))


def chat_length(rng: random.Random) -> int:
    """Total tokens of one instruction example: log-normal (median ~170, long tail), clipped to 20..512, which is
    roughly how Alpaca/ShareGPT-style data spreads."""
    return int(min(512, max(20, rng.lognormvariate(math.log(170), 0.75))))


def write_workloads(folder: Path, tokenizer, seq_len: int, n_fixed: int, n_variable: int,
                    lexicon_size: int = 80000) -> dict[str, Path]:
    """The benchmarks' data: `fixed_<seq_len>.jsonl` (text rows longer than seq_len tokens: truncated to exactly it)
    and `variable_chat.jsonl` (chat rows whose lengths spread like chat_length). A small tokenizer needs only a
    small `lexicon_size` (the words take most of the time)."""
    folder.mkdir(parents=True, exist_ok=True)
    source = WordSource(seed=2, lexicon_size=lexicon_size)
    sample = source.words(2000)
    tokens_per_word = len(tokenizer(sample, add_special_tokens=False)["input_ids"]) / 2000
    fixed = folder / f"fixed_{seq_len}.jsonl"
    if not fixed.exists():
        words = int(seq_len / tokens_per_word * 1.3) + 8  # truncated to exactly seq_len by data.max_length
        rows = [{"text": source.words(words)} for _ in range(n_fixed)]
        fixed.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    variable = folder / "variable_chat.jsonl"
    if not variable.exists():
        rng = random.Random(3)
        rows = []
        for _ in range(n_variable):
            total = chat_length(rng) - 12  # the ChatML markup takes ~12 tokens
            prompt = max(3, int(total * rng.uniform(0.2, 0.5)))
            reply = max(3, total - prompt)
            rows.append({"messages": [
                {"role": "user", "content": source.words(max(2, int(prompt / tokens_per_word)))},
                {"role": "assistant", "content": source.words(max(2, int(reply / tokens_per_word)))},
            ]})
        variable.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return {"fixed": fixed, "variable": variable}
