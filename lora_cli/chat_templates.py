"""Chat templates chosen by `data.chat_template`: a name, Jinja text, or a .jinja file; and the template (and system
prompt) a trained adapter folder carries, so that lora-generate, lora-merge and other tools render prompts as
training did.

The named templates end every assistant turn with the tokenizer's own end-of-sequence token (where the family's
end-of-turn marker is not that token), so a base model learns to stop without new tokens, whose embeddings LoRA
cannot train. Their other markers are used as the tokenizer splits them: single tokens where the vocabulary has
them, else plain text, trained like any other text.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path

from .errors import UserError
from .layout import CONFIG_COPY_NAME

AUTO = "auto"  # the model's own template (today's behaviour)

# ChatML (Qwen, SmolLM2): <|im_start|>role\ncontent<|im_end|>\n; an assistant turn ends with the tokenizer's EOS,
# which for ChatML models (eos_token <|im_end|>) is the same text.
CHATML = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] }}"
    "{{- (eos_token if message['role'] == 'assistant' else '<|im_end|>') + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Llama 3: <|begin_of_text|><|start_header_id|>role<|end_header_id|>\n\ncontent<|eot_id|>; an assistant turn ends
# with the tokenizer's EOS (<|eot_id|> in the instruct models, <|end_of_text|> in the base ones).
LLAMA3 = (
    "{{- bos_token if bos_token else '' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim }}"
    "{{- eos_token if message['role'] == 'assistant' else '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

NAMED_TEMPLATES = {"chatml": CHATML, "llama3": LLAMA3}
TEMPLATE_NAMES = (AUTO, *NAMED_TEMPLATES)
TEMPLATE_FILE_SUFFIX = ".jinja"
CHOICES = f"{', '.join(TEMPLATE_NAMES)}, a Jinja template string, or the path of a {TEMPLATE_FILE_SUFFIX} file"

# Where transformers writes a tokenizer's template: chat_template.jinja (transformers >= 4.43 when saving), or the
# "chat_template" key of tokenizer_config.json (older saves, and PEFT users' folders).
TEMPLATE_FILE_NAME = "chat_template.jinja"
TOKENIZER_CONFIG_NAME = "tokenizer_config.json"


def looks_like_jinja(setting: str) -> bool:
    return "{{" in setting or "{%" in setting


def looks_like_path(setting: str) -> bool:
    return setting.lower().endswith(TEMPLATE_FILE_SUFFIX) or "/" in setting or "\\" in setting


def setting_problem(setting: str) -> str | None:
    """Why a data.chat_template value is not a name, Jinja text or a path (None if it looks like one of them);
    the config check, before anything loads. A path is only read later (resolve_template)."""
    if setting in TEMPLATE_NAMES or looks_like_jinja(setting) or looks_like_path(setting):
        return None
    close = difflib.get_close_matches(setting.lower(), TEMPLATE_NAMES, n=1)
    hint = f"; did you mean `{close[0]}`?" if close else ""
    return f"is not a known template name; use one of {CHOICES}{hint}"


def resolve_template(setting: str) -> str | None:
    """The Jinja text data.chat_template names; None for auto (the tokenizer's own)."""
    if setting == AUTO:
        return None
    if setting in NAMED_TEMPLATES:
        return NAMED_TEMPLATES[setting]
    if looks_like_jinja(setting):
        return setting
    problem = setting_problem(setting)
    if problem:
        raise UserError(f"data.chat_template '{setting}' {problem}.")
    file = Path(setting).expanduser()
    if not file.is_file():
        raise UserError(
            f"data.chat_template '{setting}' looks like a file path, but there is no such file (relative paths start "
            f"from {Path.cwd()}). Give an existing {TEMPLATE_FILE_SUFFIX} file, or one of {CHOICES}."
        )
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"data.chat_template file '{setting}' cannot be read as UTF-8 text ({err}).") from None
    if not looks_like_jinja(text):
        raise UserError(
            f"data.chat_template file '{setting}' holds no Jinja template (no {{{{ ... }}}} or {{% ... %}}). Write a "
            f"template that renders `messages`, or use one of {CHOICES}."
        )
    return text


# Two turns with texts that occur nowhere in any template.
_PROBE_USER, _PROBE_REPLY = "Question 7f3a?", "Answer 9c1e."
_PROBE = [{"role": "user", "content": _PROBE_USER}, {"role": "assistant", "content": _PROBE_REPLY}]


def apply_template_setting(tokenizer, setting: str) -> None:
    """Make data.chat_template the tokenizer's template, so training renders with it and every folder the tokenizer
    is saved into (the adapter, checkpoints, a merged model) carries it. auto keeps the tokenizer's own."""
    template = resolve_template(setting)
    if template is None:
        return
    check_marks_assistant_turns(tokenizer, template, f"data.chat_template '{_short(setting)}'")
    tokenizer.chat_template = template


def check_marks_assistant_turns(tokenizer, template: str, what: str) -> None:
    """Refuse a template lora-cli cannot find assistant turns in: a conversation must render as its prompt with the
    generation prompt (a header that opens the assistant's turn), then the reply. Training marks the reply's tokens
    this way, and generation prompts the model with exactly that header."""
    try:
        whole = tokenizer.apply_chat_template(_PROBE, chat_template=template, tokenize=False)
        prompt = tokenizer.apply_chat_template(_PROBE[:1], chat_template=template, tokenize=False,
                                               add_generation_prompt=True)
        bare = tokenizer.apply_chat_template(_PROBE[:1], chat_template=template, tokenize=False)
    except Exception as err:  # jinja's syntax and render errors, and the template's own raise_exception
        raise UserError(f"{what} cannot render a conversation of a user and an assistant turn: {err}. Fix the "
                        f"template, or use one of {CHOICES}.") from None
    if not (prompt != bare and whole.startswith(prompt) and _PROBE_REPLY in whole[len(prompt):]):
        raise UserError(
            f"{what} does not mark assistant turns so that lora-cli can find them: rendering a user turn with "
            "add_generation_prompt must give a prompt that ends with an assistant header, and the whole conversation "
            f"must be that prompt followed by the assistant's reply. Rendered prompt: {prompt!r}; conversation: "
            f"{whole!r}. Fix the template, or use one of {CHOICES}."
        )


def _short(setting: str) -> str:
    return setting if len(setting) <= 60 else setting[:57] + "..."


def folder_template(folder: str | Path) -> str | None:
    """The chat template a saved tokenizer folder carries (an adapter, a checkpoint, a merged model); None if none."""
    folder = Path(folder)
    file = folder / TEMPLATE_FILE_NAME
    if file.is_file():
        return file.read_text(encoding="utf-8") or None
    try:
        config = json.loads((folder / TOKENIZER_CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    template = config.get("chat_template") if isinstance(config, dict) else None
    if isinstance(template, list):  # several named templates: the default one
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    return template if isinstance(template, str) and template else None


def use_folder_template(tokenizer, folder: str | Path | None) -> bool:
    """Give a base model's tokenizer the template of the adapter trained on it (data.chat_template): prompts then
    render as training rendered them. Returns whether the template changed."""
    template = folder_template(folder) if folder is not None else None
    if template is None or template == getattr(tokenizer, "chat_template", None):
        return False
    tokenizer.chat_template = template
    return True


def trained_system_prompt(adapter_dir: str | Path | None) -> str | None:
    """data.system_prompt of the run that trained the adapter (from the lora_config.yaml it saved), or None."""
    import yaml

    if adapter_dir is None:
        return None
    try:
        config = yaml.safe_load((Path(adapter_dir) / CONFIG_COPY_NAME).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):  # a PEFT adapter has none: nothing to follow
        return None
    data = config.get("data") if isinstance(config, dict) else None
    prompt = data.get("system_prompt") if isinstance(data, dict) else None
    return prompt if isinstance(prompt, str) else None
