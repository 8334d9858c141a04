"""Formats: each row is rendered to the exact text the model sees plus the character spans whose tokens are trained.

text (the whole text trained), alpaca (the response trained), chat (the assistant turns trained, rendered with the
tokenizer's chat template, as lora-generate renders prompts) and prompt_completion (TRL's: the completion trained;
a prompt given as chat messages is rendered with the chat template, the completion as the assistant's turn(s)).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from lora_cli.errors import UserError

from .examples import RowError

FORMATS = ("text", "alpaca", "chat", "prompt_completion")

# The field sets of each format, for the message when none matches (detect_format checks them in this order).
FORMAT_FIELDS = {
    "chat": ("messages", "or", "conversations"),
    "prompt_completion": ("prompt", "completion"),
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
    """Guess the format from the first row's fields: messages/conversations -> chat; prompt+completion ->
    prompt_completion; instruction+output -> alpaca; text -> text."""
    fields = set(rows[0]) if rows else set()
    if "messages" in fields or "conversations" in fields:
        return "chat"
    if {"prompt", "completion"} <= fields:
        return "prompt_completion"
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


_KNOWN_FIELDS = ("messages", "conversations", "prompt", "completion", "instruction", "input", "output", "text")


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


def _render(row: dict, fmt: str, tokenizer, train_on_inputs: bool, system_prompt: str | None = None) -> _Rendered:
    """`system_prompt`: the system message of chat rows (and chat prompt/completion rows) that have none."""
    if fmt == "text":
        text = _string_field(row, "text")
        return _Rendered(text, [(0, len(text))], add_special_tokens=True,
                         untrainable=None if text.strip() else EMPTY_RESPONSE)
    if fmt == "alpaca":
        return _render_alpaca(row, train_on_inputs)
    if fmt == "chat":
        return _render_chat(_with_system(_chat_messages(row), system_prompt), tokenizer, train_on_inputs)
    if fmt == "prompt_completion":
        return _render_prompt_completion(row, tokenizer, train_on_inputs, system_prompt)
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
        return _parse_turns(row.get("messages"), "messages", "role", "content", {r: r for r in CHAT_ROLES})
    if "conversations" in row:
        return _parse_turns(row.get("conversations"), "conversations", "from", "value", SHAREGPT_ROLES)
    hint = _did_you_mean(row)
    raise RowError(
        f"it has neither a 'messages' nor a 'conversations' field, which every chat row needs (its fields: "
        f"{sorted(row)}" + (f"; did you mean {hint}?)" if hint else ")")
    )


def _parse_turns(turns, key: str, role_key: str, content_key: str, role_names: dict) -> list[dict]:
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


def _with_system(messages: list[dict], system_prompt: str | None) -> list[dict]:
    """data.system_prompt first, unless the conversation has its own system message."""
    if system_prompt is None or (messages and messages[0]["role"] == "system"):
        return messages
    return [{"role": "system", "content": system_prompt}, *messages]


def _render_prompt_completion(row: dict, tokenizer, train_on_inputs: bool, system_prompt: str | None) -> _Rendered:
    """TRL's prompt/completion rows. Strings: the prompt then the completion, as written (the completion and EOS
    trained). Chat messages: the prompt's turns then the completion as the assistant's turn(s), rendered with the
    chat template; only the completion's turns are trained, never an assistant turn inside the prompt."""
    prompt, completion = row.get("prompt"), row.get("completion")
    if isinstance(prompt, str) and isinstance(completion, str):
        text = prompt + completion
        start = 0 if train_on_inputs else len(prompt)
        return _Rendered(text, [(start, len(text))], add_special_tokens=True,
                         untrainable=None if completion.strip() else EMPTY_RESPONSE)
    if not isinstance(prompt, (str, list)) or not isinstance(completion, (str, list)):
        raise RowError(
            "'prompt' and 'completion' must each be a string, or a list of chat messages ({\"role\", \"content\"}); "
            f"got a {type(prompt).__name__} and a {type(completion).__name__}"
        )
    if not getattr(tokenizer, "chat_template", None):
        raise RowError("its prompt/completion is a list of chat messages, but the tokenizer has no chat template; "
                       "set data.chat_template (e.g. chatml), or write the prompt and completion as strings")
    roles = {r: r for r in CHAT_ROLES}
    prompt_turns = ([{"role": "user", "content": prompt}] if isinstance(prompt, str)
                    else _parse_turns(prompt, "prompt", "role", "content", roles))
    completion_turns = ([{"role": "assistant", "content": completion}] if isinstance(completion, str)
                        else _parse_turns(completion, "completion", "role", "content", roles))
    messages = _with_system(prompt_turns, system_prompt)
    return _render_chat(messages + completion_turns, tokenizer, train_on_inputs, first_trained=len(messages))


def _apply_template(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # the template's own checks (e.g. "roles must alternate") raise jinja errors
        raise RowError(f"the tokenizer's chat template rejected the conversation: {e}") from None


def _render_chat(messages: list[dict], tokenizer, train_on_inputs: bool, first_trained: int = 0) -> _Rendered:
    """The assistant turns from `first_trained` on are trained (prompt/completion rows: the completion's only)."""
    replies = [i for i, m in enumerate(messages) if m["role"] == "assistant" and i >= first_trained]
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
