"""The tokenizer as GGUF metadata: vocabulary, token types, merges, special ids, the BOS flag and the chat template.

Byte-level BPE tokenizers (SmolLM2, Llama 3, Qwen2) are written as `tokenizer.ggml.model = gpt2` with
`tokenizer.ggml.pre` naming the pre-tokenizer, the rule that splits text before the merges apply; llama.cpp has one
built in per name, and a wrong name makes a file that loads and mis-tokenizes. The name is found the way
llama.cpp's converter finds it, by the sha256 of the ids the tokenizer gives for one fixed text (known released
tokenizers, CHECK_HASHES); a tokenizer trained on its own vocabulary has no known hash, so its pre-tokenizer is
recognised by its shape in tokenizer.json (PRE_TOKENIZER_SHAPES: the regexes llama.cpp implements). Anything else is
refused by name. The tokenizer is the one transformers loads for the model (transformers 5 picks the class by
model type: a qwen2 folder gets Qwen2's pre-tokenizer whatever tokenizer_config.json names), as llama.cpp's
converter also uses. SentencePiece tokenizers (a tokenizer.model) go through gguf_sentencepiece.py.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from ..errors import UserError

# llama.cpp's check text (convert_hf_to_gguf.py, get_vocab_base_pre) and the hashes of the token ids it gives,
# for the tokenizers lora-cli's users train. SmolLM2-135M-Instruct's gives the smollm one (tested).
CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n\U0001f680 (normal) \U0001f636\u200d\U0001f32b\ufe0f (multiple "
    "emojis concatenated) \u2705 \U0001f999\U0001f999 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 "
    "\u1780\u17b6\u1793\u17cb\u178f\u17c2\u1796\u17b7\u179f\u17c1\u179f\u17a2\u17b6\u1785\U0001f601 ?\u6211\u60f3"
    "\u5728apple\u5de5\u4f5c1314151\u5929\uff5e ------======= \u043d\u0435\u0449\u043e \u043d\u0430 \u0411\u044a"
    "\u043b\u0433\u0430\u0440\u0441\u043a\u0438 ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
    "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
CHECK_HASHES = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM, SmolLM2
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3, 3.1, 3.2
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5, Qwen2, Qwen2.5
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # GPT-2
}

_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# tokenizer.json pre-tokenizer shapes (see _shape) -> the llama.cpp pre-tokenizer that splits text the same way.
PRE_TOKENIZER_SHAPES = {
    ("ByteLevel+regex",): "gpt-2",
    ("Digits(single)", "ByteLevel+regex"): "smollm",
    (f"Split({_LLAMA3_REGEX})", "ByteLevel"): "llama-bpe",
    (f"Split({_QWEN2_REGEX})", "ByteLevel"): "qwen2",
}

TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6


@dataclass
class TokenizerMeta:
    model: str  # tokenizer.ggml.model: gpt2 (byte-level BPE) or llama (SentencePiece)
    pre: str  # tokenizer.ggml.pre
    tokens: list[str]
    token_types: list[int]
    merges: list[str] = field(default_factory=list)
    scores: list[float] | None = None  # SentencePiece only
    special_ids: dict[str, int] = field(default_factory=dict)  # bos, eos, unk, pad
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool | None = None  # byte-level BPE: whether a space is put before the text
    chat_template: str | None = None

    def write(self, writer) -> None:
        writer.add_tokenizer_model(self.model)
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        writer.add_token_types(self.token_types)
        if self.merges:
            writer.add_token_merges(self.merges)
        for name, token_id in self.special_ids.items():
            getattr(writer, f"add_{name}_token_id")(token_id)
        if self.add_space_prefix is not None:
            writer.add_add_space_prefix(self.add_space_prefix)
        writer.add_add_bos_token(self.add_bos)
        if self.add_eos:
            writer.add_add_eos_token(True)
        if self.chat_template:
            writer.add_chat_template(self.chat_template)


def tokenizer_metadata(tokenizer, vocab_size: int, sentencepiece_file=None) -> TokenizerMeta:
    """The GGUF tokenizer metadata of a transformers tokenizer, over the model's `vocab_size` rows."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    model = spec.get("model") or {}
    if model.get("type") == "BPE" and _is_byte_level(spec):
        meta = _byte_level_bpe(tokenizer, spec, vocab_size)
    elif sentencepiece_file is not None:
        from .gguf_sentencepiece import sentencepiece_tokens

        tokens, scores, types = sentencepiece_tokens(sentencepiece_file, vocab_size, tokenizer)
        meta = TokenizerMeta("llama", "default", tokens, types, scores=scores)
    else:
        kind = model.get("type") or type(tokenizer).__name__
        raise UserError(
            f"--gguf cannot export this tokenizer ({kind} without byte-level pre-tokenization, and no "
            "tokenizer.model beside it): lora-merge writes byte-level BPE tokenizers (SmolLM2, Llama 3, Qwen2) and "
            "SentencePiece ones from tokenizer.model. Merge without --gguf and convert the merged folder with "
            "llama.cpp's convert_hf_to_gguf.py."
        )
    _add_specials(meta, tokenizer)
    meta.chat_template = chat_template_of(tokenizer)
    return meta


def chat_template_of(tokenizer) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the default one is what chat uses
        template = template.get("default") or next(iter(template.values()), None)
    return template or None


def _is_byte_level(spec: dict) -> bool:
    return "ByteLevel" in json.dumps(spec.get("pre_tokenizer")) or "ByteLevel" in json.dumps(spec.get("decoder"))


def _byte_level_bpe(tokenizer, spec: dict, vocab_size: int) -> TokenizerMeta:
    pre = pre_tokenizer_name(tokenizer, spec)
    vocab = dict(spec["model"]["vocab"])
    added = {entry["content"]: entry for entry in spec.get("added_tokens", [])}
    for content, entry in added.items():
        vocab[content] = entry["id"]
    by_id = {token_id: token for token, token_id in vocab.items()}
    if by_id and max(by_id) >= vocab_size:
        raise UserError(f"--gguf: the tokenizer has token id {max(by_id)}, outside the model's vocabulary of "
                        f"{vocab_size} rows (config.json vocab_size); the tokenizer does not belong to this model.")
    tokens, types = [], []
    for token_id in range(vocab_size):
        token = by_id.get(token_id)
        if token is None:  # a row of the embedding no token uses (vocabularies padded to a multiple of 64...)
            tokens.append(f"[PAD{token_id}]")
            types.append(TOKEN_UNUSED)
        elif token in added:
            tokens.append(token)
            types.append(TOKEN_CONTROL if added[token].get("special") else TOKEN_USER_DEFINED)
        else:
            tokens.append(token)
            types.append(TOKEN_NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    prefix_space = "ByteLevel+prefix_space" in _shape(spec.get("pre_tokenizer"))
    return TokenizerMeta("gpt2", pre, tokens, types, merges=merges, add_space_prefix=prefix_space)


def pre_tokenizer_name(tokenizer, spec: dict) -> str:
    """llama.cpp's name for this tokenizer's pre-tokenizer: by the check-text hash, else by its shape."""
    ids = tokenizer.encode(CHECK_TEXT)
    known = CHECK_HASHES.get(hashlib.sha256(str(ids).encode()).hexdigest())
    if known is not None:
        return known
    shape = _shape(spec.get("pre_tokenizer"))
    if shape in PRE_TOKENIZER_SHAPES:
        return PRE_TOKENIZER_SHAPES[shape]
    raise UserError(
        f"--gguf: this tokenizer's pre-tokenizer ({' + '.join(shape) or 'none'}) is not one llama.cpp implements "
        f"under a name lora-merge knows ({', '.join(sorted(set(PRE_TOKENIZER_SHAPES.values())))}); a GGUF with "
        "the wrong one would load and mis-tokenize, so nothing was written. Merge without --gguf and convert the "
        "merged folder with llama.cpp's convert_hf_to_gguf.py (which refuses unknown ones too, or knows newer ones)."
    )


def _shape(pre: dict | None) -> tuple[str, ...]:
    """A pre-tokenizer as the sequence of the steps that decide where text splits."""
    if not pre:
        return ()
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    shape = []
    for step in steps:
        kind = step.get("type")
        if kind == "ByteLevel":
            if step.get("add_prefix_space"):
                shape.append("ByteLevel+prefix_space")
            shape.append("ByteLevel+regex" if step.get("use_regex", True) else "ByteLevel")
        elif kind == "Digits":
            shape.append("Digits(single)" if step.get("individual_digits") else "Digits")
        elif kind == "Split":
            pattern = step.get("pattern") or {}
            shape.append(f"Split({pattern.get('Regex', pattern.get('String'))})")
        else:
            shape.append(kind)
    return tuple(shape)


def _add_specials(meta: TokenizerMeta, tokenizer) -> None:
    for name, attr in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unk", "unk_token_id"),
                       ("pad", "pad_token_id")):
        token_id = getattr(tokenizer, attr, None)
        if isinstance(token_id, int) and 0 <= token_id < len(meta.tokens):
            meta.special_ids[name] = token_id
    # What the tokenizer adds around a text by itself (its post-processor), not what a config flag claims.
    plain = tokenizer.encode("a", add_special_tokens=False)
    full = tokenizer.encode("a", add_special_tokens=True)
    bos, eos = meta.special_ids.get("bos"), meta.special_ids.get("eos")
    meta.add_bos = bos is not None and len(full) > len(plain) and full[0] == bos and plain[:1] != [bos]
    meta.add_eos = eos is not None and len(full) > len(plain) and full[-1] == eos and plain[-1:] != [eos]
