"""Formats: each row is rendered to the exact text the model sees plus the character spans whose tokens are trained.

text (the whole text trained), alpaca (the response trained) and chat (the assistant turns trained, rendered with the
tokenizer's chat template, as lora-generate renders prompts).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from lora_cli.errors import UserError

from .examples import RowError

FORMATS = ("text", "alpaca", "chat")

# The field sets of each format, for the message when none matches (detect_format checks them in this order).
FORMAT_FIELDS = {
    "chat": ("messages", "or", "conversations"),
    "alpaca": ("instruction", "output", "(optional input)"),
    "text": ("text",),
}

CHAT_ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}

ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


def detect_format(rows: list[dict], source: str) -> str:
    """Guess the format from the first row's fields: messages/conversations -> chat; instruction+output -> alpaca;
    text -> text."""
    fields = set(rows[0]) if rows else set()
    if "messages" in fields or "conversations" in fields:
        return "chat"
    if {"instruction", "output"} <= fields:
        return "alpaca"
    if "text" in fields:
        return "text"
    accepted = "; ".join(f"{fmt}: {' '.join(names)}" for fmt, names in FORMAT_FIELDS.items())
    hint = _did_you_mean(fields)
    raise UserError(
        f"Cannot tell the format of '{source}': its first row has the fields {sorted(fields)}, which match none "
        f"of the accepted field sets ({accepted}). Rename the fields to one of these sets"
        + (f" (did you mean {hint}?)." if hint else ".")
    )


_KNOWN_FIELDS = ("messages", "conversations", "instruction", "input", "output", "text")


def _did_you_mean(fields) -> str:
    """"'messages' for 'mesages'" for the fields that look like misspelt known ones ('' if none do)."""
    pairs = [(difflib.get_close_matches(str(field), _KNOWN_FIELDS, n=1, cutoff=0.75), field) for field in sorted(fields)
             if field not in _KNOWN_FIELDS]
    return ", ".join(f"'{close[0]}' for '{field}'" for close, field in pairs if close)


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """The standard Alpaca prompt; generation must use the same text to match training."""
    if input:
        return ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return ALPACA_PROMPT.format(instruction=instruction)


@dataclass
class _Rendered:
    """A row as the model sees it: the text, and the [start, end) character spans whose tokens are trained."""

    text: str
    trained_spans: list[tuple[int, int]]
    add_special_tokens: bool  # False for chat: the template already wrote the special tokens (BOS etc.)
    is_chat: bool = False
    # Why the row has nothing to train, before any truncation: NO_REPLY or EMPTY_RESPONSE; None if it has.
    # Such rows are dropped and counted: trained, they would teach only the end-of-sequence token.
    untrainable: str | None = None


NO_REPLY = "no assistant reply"
EMPTY_RESPONSE = "empty response"


def _render(row: dict, fmt: str, tokenizer, train_on_inputs: bool) -> _Rendered:
    if fmt == "text":
        text = _string_field(row, "text")
        return _Rendered(text, [(0, len(text))], add_special_tokens=True,
                         untrainable=None if text.strip() else EMPTY_RESPONSE)
    if fmt == "alpaca":
        return _render_alpaca(row, train_on_inputs)
    if fmt == "chat":
        return _render_chat(row, tokenizer, train_on_inputs)
    raise UserError(f"Unknown data format '{fmt}'. Use one of: auto, {', '.join(FORMATS)}.")


def _string_field(row: dict, name: str, optional: bool = False) -> str:
    value = row.get(name)
    if value is None:
        if optional:
            return ""
        raise RowError(f"the field '{name}' is missing or null; every row of this format needs it")
    if not isinstance(value, str):
        raise RowError(f"the field '{name}' is a {type(value).__name__}, it must be a string")
    return value


def _render_alpaca(row: dict, train_on_inputs: bool) -> _Rendered:
    prompt = alpaca_prompt(_string_field(row, "instruction"), _string_field(row, "input", optional=True))
    output = _string_field(row, "output")
    text = prompt + output
    response_start = 0 if train_on_inputs else len(prompt)
    return _Rendered(text, [(response_start, len(text))], add_special_tokens=True,
                     untrainable=None if output.strip() else EMPTY_RESPONSE)


def _chat_messages(row: dict) -> list[dict]:
    """The row's conversation as [{role, content}], from `messages` or ShareGPT-style `conversations`."""
    if "messages" in row:
        key, role_key, content_key, role_names = "messages", "role", "content", {r: r for r in CHAT_ROLES}
    elif "conversations" in row:
        key, role_key, content_key, role_names = "conversations", "from", "value", SHAREGPT_ROLES
    else:
        hint = _did_you_mean(row)
        raise RowError(
            f"it has neither a 'messages' nor a 'conversations' field, which every chat row needs (its fields: "
            f"{sorted(row)}" + (f"; did you mean {hint}?)" if hint else ")")
        )
    turns = row.get(key)
    if not isinstance(turns, list) or not turns:
        raise RowError(f"the field '{key}' must be a non-empty list of turns, got {type(turns).__name__}")
    messages = []
    for number, turn in enumerate(turns, start=1):
        where = f"'{key}' turn {number}"
        if not isinstance(turn, dict):
            raise RowError(
                f"{where} is a {type(turn).__name__}; it must be an object with '{role_key}' and '{content_key}'"
            )
        role, content = turn.get(role_key), turn.get(content_key)
        if role not in role_names:
            raise RowError(f"{where} has the {role_key} {role!r}; accepted: {', '.join(role_names)}")
        if not isinstance(content, str):
            raise RowError(f"{where} has a '{content_key}' of type {type(content).__name__}; it must be a string")
        messages.append({"role": role_names[role], "content": content})
    return messages


def _apply_template(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # the template's own checks (e.g. "roles must alternate") raise jinja errors
        raise RowError(f"the tokenizer's chat template rejected the conversation: {e}") from None


def _render_chat(row: dict, tokenizer, train_on_inputs: bool) -> _Rendered:
    messages = _chat_messages(row)
    replies = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    # An empty reply is not trained: it would teach the model to answer with the end-of-turn token alone.
    trained = [i for i in replies if messages[i]["content"].strip()]
    # Turns after the last trained reply teach nothing: drop them so the example ends with a trained turn.
    if trained:
        messages = messages[: trained[-1] + 1]
    text = _apply_template(tokenizer, messages)
    spans, cursor = [], 0
    for i in trained:
        span = _assistant_span(tokenizer, messages, i, text, cursor)
        spans.append(span)
        cursor = span[1]
    if train_on_inputs and spans:  # everything up to the end of the last reply; not the whitespace after it
        spans = [(0, spans[-1][1])]
    untrainable = None if trained else (EMPTY_RESPONSE if replies else NO_REPLY)
    return _Rendered(text, spans, add_special_tokens=False, is_chat=True, untrainable=untrainable)


def _assistant_span(tokenizer, messages: list[dict], i: int, text: str, cursor: int) -> tuple[int, int]:
    """Character span of assistant turn i in the rendered conversation: its content and end-of-turn token.

    Rendering the conversation up to the turn with the generation prompt gives where the content starts;
    rendering through the turn gives where it ends. This works for any template that renders a conversation's
    prefix as a prefix of the whole, which nearly all do. The whitespace the template writes after the
    end-of-turn token (ChatML's newline) is not part of the reply and is left untrained.
    """
    span = None
    if i > 0:  # a conversation the assistant opens has no prefix to render (templates refuse an empty one)
        before = _apply_template(tokenizer, messages[:i], add_generation_prompt=True)
        through = _apply_template(tokenizer, messages[: i + 1])
        if text.startswith(before) and text.startswith(through) and cursor <= len(before) <= len(through):
            span = len(before), len(through)
    # Else the generation prompt or earlier turns render differently in the whole: find the content itself.
    start, end = span or _find_content(text, messages[i]["content"], cursor, tokenizer.eos_token)
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def _find_content(text: str, content: str, cursor: int, eos_token: str | None) -> tuple[int, int]:
    start = text.find(content, cursor)
    if start < 0:
        raise RowError(
            "an assistant message could not be located in the text the chat template renders, so its tokens "
            "cannot be marked for training; use a tokenizer with a standard chat template, or the text format"
        )
    end = start + len(content)
    after = len(text[end:]) - len(text[end:].lstrip())
    if eos_token and text.startswith(eos_token, end + after):  # train the end-of-turn token with the reply
        end += after + len(eos_token)
    return start, end
