"""SentencePiece tokenizers (Llama 2, Mistral v0.1-v0.3: a tokenizer.model) as GGUF `llama` vocabularies.

The pieces, scores and types are read from tokenizer.model itself (a protobuf; transformers bundles its schema, so
the sentencepiece package is not needed), as llama.cpp's converter reads them: a piece's type number is the same in
both formats. Tokens added on top (tokenizer_config.json's added tokens) follow as CONTROL (special) or
USER_DEFINED, and ids the model has no piece for as UNUSED placeholders.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError

SENTENCEPIECE_NAME = "tokenizer.model"
_UNUSED, _CONTROL, _USER_DEFINED = 5, 3, 4
_ADDED_SCORE = -1000.0  # what llama.cpp gives added tokens
_PAD_SCORE = -10000.0


def find_sentencepiece_model(*folders) -> Path | None:
    for folder in folders:
        if folder is not None and (Path(folder) / SENTENCEPIECE_NAME).is_file():
            return Path(folder) / SENTENCEPIECE_NAME
    return None


def sentencepiece_tokens(path: Path, vocab_size: int, tokenizer) -> tuple[list[str], list[float], list[int]]:
    from transformers.convert_slow_tokenizer import import_protobuf

    model_pb2 = import_protobuf()
    proto = model_pb2.ModelProto()
    try:
        proto.ParseFromString(Path(path).read_bytes())
    except Exception as err:  # protobuf's DecodeError and friends
        raise UserError(f"--gguf: {path} is not a SentencePiece model ({err}); nothing was written.") from None
    if proto.trainer_spec.model_type not in (1, 2):  # UNIGRAM, BPE
        raise UserError(f"--gguf: {path} is a SentencePiece model of type {proto.trainer_spec.model_type}, which "
                        "llama.cpp's `llama` vocabulary does not handle; nothing was written.")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    scores, types = [_PAD_SCORE] * vocab_size, [_UNUSED] * vocab_size
    for token_id, piece in enumerate(proto.pieces[:vocab_size]):
        tokens[token_id], scores[token_id], types[token_id] = piece.piece, piece.score, piece.type
    for token_id, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if token_id < vocab_size and token_id >= len(proto.pieces):
            tokens[token_id], scores[token_id] = added.content, _ADDED_SCORE
            types[token_id] = _CONTROL if added.special else _USER_DEFINED
    return tokens, scores, types
