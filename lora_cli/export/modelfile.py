"""An Ollama Modelfile beside the GGUF: FROM, the chat template in Ollama's Go-template syntax, stop tokens.

Nobody converts arbitrary Jinja to Go templates, and without a TEMPLATE Ollama guesses one or falls back to the
bare prompt (the usual "gibberish after export"). So each known chat format is written twice here: as Ollama's Go
template and as a Python function producing the same text. The model's own Jinja template is rendered on a probe
conversation and compared with each format's text: the family whose text matches exactly is written. A default
system message the template adds by itself (SmolLM2's) is recovered the same way and written as SYSTEM. A template
that matches no family gets a warning saying what to write by hand.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..fsutil import atomic_write_text

MODELFILE_NAME = "Modelfile"
TEMPLATE_DOCS = "https://github.com/ollama/ollama/blob/main/docs/template.md"


@dataclass(frozen=True)
class ChatFormat:
    name: str
    go_template: str
    render: Callable[[list[dict]], str]  # the messages plus the assistant's turn opened, as the Go template writes
    stops: tuple[str, ...]


def _chatml(messages: list[dict]) -> str:
    turns = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return turns + "<|im_start|>assistant\n"


def _llama3(messages: list[dict]) -> str:
    turns = "".join(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content']}<|eot_id|>" for m in messages)
    return turns + "<|start_header_id|>assistant<|end_header_id|>\n\n"


FORMATS = (
    ChatFormat("ChatML", (
        "{{- range .Messages }}<|im_start|>{{ .Role }}\n"
        "{{ .Content }}<|im_end|>\n"
        "{{ end }}<|im_start|>assistant\n"), _chatml, ("<|im_start|>", "<|im_end|>")),
    ChatFormat("Llama 3", (
        "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n"
        "{{ .Content }}<|eot_id|>\n"
        "{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n"), _llama3,
        ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
)

_PROBE = [{"role": "user", "content": "What is the capital of France?"},
          {"role": "assistant", "content": "Paris."},
          {"role": "user", "content": "And of Italy?"}]
_PROBE_SYSTEM = {"role": "system", "content": "You answer briefly."}


@dataclass
class ModelfileResult:
    path: Path
    format: str | None  # the chat format written, None when no TEMPLATE could be
    warning: str | None = None


def _rendered(tokenizer, messages: list[dict], add_bos: bool) -> str | None:
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception:  # a template that raises on this conversation (e.g. one that forbids system messages)
        return None
    bos = getattr(tokenizer, "bos_token", None)
    if add_bos and bos and text.startswith(bos):  # llama.cpp adds this BOS itself: Ollama's templates omit it
        text = text[len(bos):]
    return text


def match_format(tokenizer, add_bos: bool) -> tuple[ChatFormat | None, str | None]:
    """The known chat format the tokenizer's template writes, and the system message it adds when none is given."""
    if not getattr(tokenizer, "chat_template", None):
        return None, None
    plain = _rendered(tokenizer, _PROBE, add_bos)
    with_system = _rendered(tokenizer, [_PROBE_SYSTEM, *_PROBE], add_bos)
    for chat in FORMATS:
        if with_system is not None and with_system != chat.render([_PROBE_SYSTEM, *_PROBE]):
            continue
        if plain == chat.render(_PROBE):
            return chat, None
        default = _default_system(chat, plain)
        if default is not None:
            return chat, default
    return None, None


def _default_system(chat: ChatFormat, plain: str | None) -> str | None:
    """The system message a template inserts by itself: the text that, as a system turn, makes the renders equal."""
    marker = "\u0000SYSTEM\u0000"
    head, _, tail = chat.render([{"role": "system", "content": marker}, *_PROBE]).partition(marker)
    if plain is None or not tail or not plain.startswith(head) or not plain.endswith(tail):
        return None
    default = plain[len(head):len(plain) - len(tail)]
    return default if chat.render([{"role": "system", "content": default}, *_PROBE]) == plain else None


def write_modelfile(folder: Path, gguf_name: str, tokenizer, add_bos: bool) -> ModelfileResult:
    """Write `folder`/Modelfile for the GGUF file `gguf_name` in it (atomically); `add_bos`: llama.cpp puts BOS
    before the prompt (tokenizer.ggml.add_bos_token)."""
    chat, default_system = match_format(tokenizer, add_bos)
    lines = [f"FROM ./{gguf_name}", ""]
    warning = None
    if chat is not None:
        lines += [f'TEMPLATE """{chat.go_template}"""', ""]
        if default_system:
            lines += [f'SYSTEM """{default_system}"""', ""]
        stops = list(chat.stops)
        eos = getattr(tokenizer, "eos_token", None)
        if eos and eos not in stops:
            stops.append(eos)
        lines += [f'PARAMETER stop "{stop}"' for stop in stops]
    else:
        what = "has no chat template" if not getattr(tokenizer, "chat_template", None) else (
            "has a chat template that is neither ChatML nor Llama 3")
        warning = (f"the model {what}, so the Modelfile has no TEMPLATE and Ollama would send the bare prompt. Add a "
                   f"TEMPLATE \"\"\"...\"\"\" in Ollama's Go-template syntax ({TEMPLATE_DOCS}) and PARAMETER stop "
                   "lines for the end-of-turn tokens to it by hand before `ollama create`.")
        eos = getattr(tokenizer, "eos_token", None)
        if eos:
            lines.append(f'PARAMETER stop "{eos}"')
    path = folder / MODELFILE_NAME
    atomic_write_text(path, "\n".join(lines) + "\n")
    return ModelfileResult(path, chat.name if chat else None, warning)
