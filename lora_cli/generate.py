"""lora-generate: text from a base model, base + adapter (unmerged or merged in memory), or a merged folder.

Prompts are rendered with the tokenizer's chat template when it has one, exactly as lora-train renders chat data
(`apply_chat_template(messages)`, then tokenized without extra special tokens), with the generation prompt added.
The quickstart calls `load_for_generation` and `generate_text` directly.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, TextIO

import torch

from .errors import UserError
from .generate_io import write_record
from .models import ModelSource, load_model
from .precision import DTYPES, base_dtype, choose_precision, model_device

EXIT_COMMANDS = ("/exit", "/quit")
RESET_COMMAND = "/reset"
RAW_TURN_SEPARATOR = "\n\n"  # how a conversation is joined when there is no chat template


# Below this, sampling picks the top token anyway (its probability rounds to 1 once the logits differ by a few
# hundredths), and far below it logits / temperature overflow float32 to inf and sampling crashes: say to use 0.
MIN_TEMPERATURE = 1e-4
MAX_SEED = 2**32 - 1  # numpy's and transformers.set_seed's limit


@dataclass
class SamplingSettings:
    """How tokens are chosen. temperature 0 means greedy decoding (deterministic)."""

    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 50
    repetition_penalty: float = 1.0
    seed: int | None = None

    def validate(self) -> "SamplingSettings":
        problems = []
        if self.max_new_tokens < 1:
            problems.append(f"--max-new-tokens must be at least 1 (got {self.max_new_tokens})")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            problems.append(f"--temperature must be a number >= 0; 0 means greedy (got {self.temperature})")
        elif 0 < self.temperature < MIN_TEMPERATURE:
            problems.append(f"--temperature {self.temperature} is too small to sample with (below {MIN_TEMPERATURE:g} "
                            "it picks the top token anyway, and tiny values overflow the scores); use 0 for greedy "
                            "decoding")
        if not 0 < self.top_p <= 1:
            problems.append(f"--top-p must be in (0, 1] (got {self.top_p})")
        if self.top_k < 0:
            problems.append(f"--top-k must be >= 0; 0 disables it (got {self.top_k})")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            problems.append(f"--repetition-penalty must be a number > 0; 1 means none (got {self.repetition_penalty})")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            problems.append(f"--seed must be between 0 and {MAX_SEED} (got {self.seed})")
        if problems:
            raise UserError("; ".join(problems) + ".")
        return self


# --- loading -------------------------------------------------------------------------------------------------


DTYPE_CHOICES = ("auto", *DTYPES)


def generation_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    """--dtype: auto (or None) is bf16 on GPUs of compute capability >= 8, fp16 below (a T4), fp32 on CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return base_dtype("auto", choose_precision("auto")) if device.startswith("cuda") else torch.float32
    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPE_CHOICES)} (got '{dtype}').")
    return DTYPES[dtype]


def load_for_generation(
    model: str,
    adapter: str | Path | None = None,
    merge: bool = False,
    *,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    log: Callable[[str], None] | None = None,
    load_in_4bit: bool = False,
):
    """(model, tokenizer) ready to generate: on CUDA if available, else CPU, in `dtype` (see `generation_dtype`).
    With `adapter`, its LoRA layers are applied unmerged, or folded in (`merge`) in memory.
    `load_in_4bit`: the base in NF4 4-bit (as a QLoRA run trained it), computing in that dtype."""
    device = device or model_device()
    dtype = generation_dtype(dtype, device)
    loaded = load_model(ModelSource(model, revision, trust_remote_code), dtype=dtype, device=device,
                        adapter_dir=adapter, merge=merge, load_in_4bit=load_in_4bit, log=log, what="MODEL")
    return loaded.model.eval(), loaded.tokenizer


# --- prompts -------------------------------------------------------------------------------------------------


def _messages(prompt: str | list[dict], system: str | None) -> list[dict]:
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
    if system and not (messages and messages[0].get("role") == "system"):
        messages.insert(0, {"role": "system", "content": system})
    return messages


def render_prompt(
    tokenizer, prompt: str | list[dict], *, chat_template: bool = True, system: str | None = None
) -> tuple[str, bool]:
    """The text the model sees and whether the tokenizer should add its special tokens (bos) to it.

    With a chat template: the conversation rendered with add_generation_prompt=True; the template writes any bos
    itself, as in training. Without one (or chat_template=False): the raw text, the turns (system first) joined
    by a blank line; the tokenizer adds its usual special tokens.
    """
    messages = _messages(prompt, system)
    if chat_template and getattr(tokenizer, "chat_template", None):
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as err:  # the template's own checks raise jinja errors
            raise UserError(f"The tokenizer's chat template rejected the conversation: {err}") from None
        return text, False
    return RAW_TURN_SEPARATOR.join(m["content"] for m in messages), True


class NonFiniteLogits(Exception):
    """Raised inside model.generate by `_FiniteScores`; generate_text turns it into a UserError."""


class _FiniteScores:
    """A logits processor (generate runs it last, on the scores the next token is picked from) that stops
    generation when they hold NaN or +inf, or no finite value: greedy decoding would then emit garbage (argmax of
    NaN) and sampling would crash ("probability tensor contains either inf, nan or element < 0"). -inf alone is
    normal: top-k and top-p mask tokens with it."""

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if torch.isnan(scores).any() or torch.isposinf(scores).any() or torch.isneginf(scores).all(dim=-1).any():
            raise NonFiniteLogits
        return scores


def non_finite_logits_message(model) -> str:
    """Why the next-token scores went NaN/inf, judged from the weights and the dtype, and what to do."""
    bad_lora = [name for name, p in model.named_parameters() if "lora_" in name and not torch.isfinite(p).all()]
    if bad_lora:
        return (
            f"The adapter is corrupt: its tensor base_model.model.{bad_lora[0]} ({len(bad_lora)} in all) holds NaN "
            "or inf, so the model's next-token scores are NaN. Its training probably diverged (check the training "
            "loss); retrain it, or use an earlier checkpoint folder."
        )
    bad = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        return (
            f"The model's weights hold NaN or inf ({bad[0]}, {len(bad)} tensors in all), so its next-token scores "
            "are NaN: the model files are corrupt (or were merged from a diverged adapter)."
        )
    dtype = model.get_input_embeddings().weight.dtype
    if dtype == torch.float16:
        return (
            "The model overflowed float16 while generating: its next-token scores became NaN or inf (some "
            "activation exceeded float16's largest value, 65504). Rerun with --dtype float32 (twice the memory), or "
            "--dtype bfloat16 on a GPU of compute capability 8.0 or newer (a T4 has no bfloat16: use float32 there)."
        )
    if dtype == torch.bfloat16:
        return "The model's next-token scores became NaN or inf in bfloat16. Rerun with --dtype float32."
    return (
        "The model's next-token scores became NaN or inf, even in float32, with finite weights: the model (or the "
        "adapter's update) is numerically broken, e.g. by a diverged training run."
    )


def _eos_ids(model, tokenizer) -> list[int]:
    ids = []
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (configured if isinstance(configured, (list, tuple)) else [configured]) + [tokenizer.eos_token_id]:
        if value is not None and value not in ids:
            ids.append(int(value))
    return ids


@torch.no_grad()
def generate_text(
    model,
    tokenizer,
    prompt: str | list[dict],
    sampling: SamplingSettings | None = None,
    *,
    chat_template: bool = True,
    system: str | None = None,
    stream: bool = False,
    **sampling_fields,
) -> str:
    """Generate an answer to `prompt` (a string, or a list of {"role", "content"} messages) and return it.

    How tokens are chosen: `sampling`, validated once by the caller (lora-generate, for every prompt), or the
    SamplingSettings fields as keywords (`temperature=0, max_new_tokens=48`; the rest keep their defaults).
    temperature 0 is greedy decoding. Generation stops at eos (the tokenizer's and the generation config's) or
    after max_new_tokens. With `stream`, the answer is printed to stdout as it is generated. Non-finite next-token
    scores (an fp16 overflow, a corrupt adapter) stop it with a UserError that says which and what to do.
    """
    from transformers import LogitsProcessorList, TextStreamer

    if sampling is not None and sampling_fields:
        raise TypeError("generate_text takes `sampling` or its fields as keywords, not both")
    settings = sampling if sampling is not None else SamplingSettings(**sampling_fields).validate()
    text, add_special_tokens = render_prompt(tokenizer, prompt, chat_template=chat_template, system=system)
    encoded = tokenizer(text, return_tensors="pt", add_special_tokens=add_special_tokens)
    if encoded["input_ids"].shape[1] == 0:  # an empty prompt, no chat template and no bos: nothing to start from
        raise UserError("The prompt is empty (no tokens to start from); give the text to answer.")
    device = next(model.parameters()).device
    input_ids = encoded["input_ids"].to(device)
    attention_mask = encoded["attention_mask"].to(device)
    # On top of the model's own generation_config (transformers merges it in); max_new_tokens wins over max_length.
    kwargs = {
        "max_new_tokens": settings.max_new_tokens,
        "repetition_penalty": settings.repetition_penalty,
        "eos_token_id": _eos_ids(model, tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "do_sample": settings.temperature > 0,
    }
    if settings.temperature > 0:
        kwargs.update(temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k)
    if settings.seed is not None:
        from transformers import set_seed

        set_seed(settings.seed)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    try:
        output = model.generate(input_ids=input_ids, attention_mask=attention_mask, streamer=streamer,
                                logits_processor=LogitsProcessorList([_FiniteScores()]), **kwargs)
    except NonFiniteLogits:
        if stream:
            sys.stdout.write("\n")
            sys.stdout.flush()
        raise UserError(non_finite_logits_message(model)) from None
    return tokenizer.decode(output[0, input_ids.shape[1]:], skip_special_tokens=True).strip()


# --- the three modes of lora-generate ------------------------------------------------------------------------


def run_prompts(
    model, tokenizer, prompts: Iterable[str], out: TextIO, *, stream: bool = False, **options
) -> list[dict]:
    """Answer each prompt on its own; write one JSON line {"prompt", "response"} per answer to `out` as it ends.
    `options`: generate_text's keywords."""
    records = []
    for prompt in prompts:
        response = generate_text(model, tokenizer, prompt, stream=stream, **options)
        records.append(write_record(out, prompt, response))
    return records


def chat_session(
    model,
    tokenizer,
    lines: TextIO | None = None,
    *,
    system: str | None = None,
    interactive: bool | None = None,
    on_turn: Callable[[str, str], None] | None = None,
    **options,
) -> list[dict]:
    """A multi-turn conversation read line by line from `lines` (stdin), answers streamed to stdout.

    Every answer sees the whole history. Ends at EOF (Ctrl-D) or /exit; /reset forgets the history. The "> "
    marker is printed only when the input is a terminal, so piped output stays clean. Returns the history.
    """
    lines = lines if lines is not None else sys.stdin
    if interactive is None:
        interactive = bool(getattr(lines, "isatty", lambda: False)())
    history: list[dict] = [{"role": "system", "content": system}] if system else []
    start = len(history)
    while True:
        if interactive:
            sys.stdout.write("> ")
            sys.stdout.flush()
        line = lines.readline()
        if not line:  # EOF
            if interactive:
                sys.stdout.write("\n")
            break
        text = line.strip()
        if not text:
            continue
        if text in EXIT_COMMANDS:
            break
        if text == RESET_COMMAND:
            del history[start:]
            continue
        history.append({"role": "user", "content": text})
        response = generate_text(model, tokenizer, list(history), stream=True, **options)
        history.append({"role": "assistant", "content": response})
        if on_turn is not None:
            on_turn(text, response)
    return history


def sampling_options(settings: SamplingSettings, chat_template: bool = True) -> dict:
    """Keyword arguments for generate_text: the settings validated once, for every prompt of the session."""
    return {"sampling": settings.validate(), "chat_template": chat_template}
