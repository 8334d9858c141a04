"""`lora-train CONFIG --estimate`: will this run fit the GPU, and if not, what makes it fit.

Reads only the model's config.json (a local folder, or the Hub file alone: no weights) and the config's data
settings, builds the model on the meta device, and adds up the parts of a training step's peak memory
(memory_model.py). The verdict is for the GPU found here, or for the one named with --gpu; `precision: auto` is
resolved as that GPU would resolve it. Used by `--estimate` and by `--dry-run` (`estimate_for_config`,
`format_estimate`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from .config import Config
from .errors import UserError
from .inject import lora_settings
from .losses import chunk_rows
from .memory_model import GiB, MiB, ModelFacts, StepShape, model_facts, step_parts
from .models import build_meta_model, check_source, nonpositive_sizes
from .precision import base_dtype, choose_precision, dtype_name


@dataclass(frozen=True)
class GpuSpec:
    name: str
    memory_bytes: int  # what the card offers to CUDA (nvidia-smi's total)
    capability: tuple[int, int]


# nvidia-smi's totals: a T4's 16 GB are 15360 MiB once ECC is reserved; the 2080 Ti has 11 GB, the 3080 10 GB.
GPUS = {
    "t4": GpuSpec("Tesla T4", 15360 * MiB, (7, 5)),
    "2080ti": GpuSpec("RTX 2080 Ti", 11264 * MiB, (7, 5)),
    "3080": GpuSpec("RTX 3080", 10240 * MiB, (8, 6)),
}
DEFAULT_GPU = "t4"  # the card this tool is built for (free Colab and Kaggle)
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(gb|gib|g)?\s*$", re.IGNORECASE)
MAX_GPU_GB = 10_000  # beyond any single card: a larger --gpu size is a typo
MIN_SEQ_LEN = 128  # shorter than this, max_length stops being a useful suggestion


@dataclass
class Suggestion:
    change: str  # what to change, in words
    overrides: list[str]  # the same as lora-train overrides
    total_bytes: int
    fits: bool


@dataclass
class Estimate:
    model: str
    gpu: GpuSpec
    precision: str  # fp16 | bf16 | fp32
    weight_dtype: str
    facts: ModelFacts
    shape: StepShape
    parts: dict[str, int]
    notes: list[str] = field(default_factory=list)
    suggestions: list[Suggestion] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(self.parts.values())

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.gpu.memory_bytes

    def to_json(self) -> dict:
        return {
            "model": self.model, "gpu": self.gpu.name, "gpu_bytes": self.gpu.memory_bytes,
            "precision": self.precision, "micro_batch_size": self.shape.micro_batch,
            "sequence_length": self.shape.seq_len, "total_bytes": self.total_bytes, "fits": self.fits,
            "parts": dict(self.parts), "notes": list(self.notes),
            "suggestions": [vars(s) for s in self.suggestions],
        }


# --- the GPU -------------------------------------------------------------------------------------------------


def parse_gpu(text: str) -> GpuSpec:
    """t4 | 2080ti | 3080 | <N>GB (an unnamed card of N GiB, assumed to have bf16: compute capability 8.0)."""
    key = text.strip().lower().replace(" ", "").replace("-", "").replace("rtx", "").replace("tesla", "")
    if key in GPUS:
        return GPUS[key]
    match = _SIZE.match(text)
    if match and 0 < float(match.group(1)) <= MAX_GPU_GB:  # float() of a huge number is inf, not an error
        size = float(match.group(1))
        return GpuSpec(f"{size:g} GB GPU", int(size * GiB), (8, 0))
    if match:
        raise UserError(f"--gpu '{text}' is not a GPU memory size lora-cli can use: give the card's memory in GB, "
                        f"more than 0 and at most {MAX_GPU_GB}, such as 24GB.")
    raise UserError(f"--gpu '{text}' is not a GPU lora-cli knows; use one of {', '.join(GPUS)} or a size such as 24GB.")


def detect_gpu() -> GpuSpec | None:
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return GpuSpec(props.name, int(props.total_memory), torch.cuda.get_device_capability(0))


# --- config -> estimate --------------------------------------------------------------------------------------


def read_model_config(cfg: Config):
    """config.json only, from a local folder or the Hub (the one file, or the local cache when offline)."""
    from transformers import AutoConfig

    source = cfg.model.name_or_path
    path = Path(source).expanduser()
    if path.is_dir() and not (path / "config.json").is_file():
        raise UserError(f"model.name_or_path '{source}' is a folder without config.json; the estimate needs it.")
    if path.is_dir():
        check_source(source)  # a damaged config.json or a wrong-typed field: named, not a traceback
    try:
        return AutoConfig.from_pretrained(source, revision=cfg.model.revision,
                                          trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0].rstrip(".") if str(err).strip() else type(err).__name__
        raise UserError(
            f"Could not read config.json of '{source}': {first}. The estimate needs only that file: without the "
            "Hub (offline), put it in a folder and pass model.name_or_path=FOLDER."
        ) from None
    except (ArithmeticError, AssertionError, TypeError) as err:  # transformers' own checks of the sizes
        raise _impossible_config(source, _raw_config(path), err) from None


def _raw_config(path: Path) -> dict:
    import json

    try:
        raw = json.loads((path / "config.json").read_text(encoding="utf-8")) if path.is_dir() else {}
    except (OSError, ValueError):
        return {}
    return raw if isinstance(raw, dict) else {}


def _impossible_config(source: str, fields: dict, err: Exception | None) -> UserError:
    """config.json's sizes describe no model (a size of 0): name the fields, else transformers' complaint."""
    bad = nonpositive_sizes(fields)
    what = (f"has sizes that describe no model ({', '.join(bad)}; each must be a positive number)" if bad else
            f"describes a model transformers cannot build ({type(err).__name__}: {str(err).strip() or 'no detail'})")
    return UserError(f"config.json of '{source}' {what}. Fix the field (compare with the model's original "
                     "config.json) or re-download the model.")


def _meta_facts(cfg: Config, hf_config) -> ModelFacts:
    """The model's facts off its meta-device build, with a config transformers cannot build named, not a
    traceback: a model that is not a causal LM (T5, BERT-style encoders), or impossible sizes."""
    source = cfg.model.name_or_path
    if nonpositive_sizes(hf_config.to_dict()):  # some build anyway (a vocabulary of 0): a meaningless estimate
        raise _impossible_config(source, hf_config.to_dict(), None)
    try:
        model = build_meta_model(hf_config, cfg.model.trust_remote_code)
    except ValueError as err:
        if "Unrecognized configuration class" not in str(err):
            raise _impossible_config(source, hf_config.to_dict(), err) from None
        model_type = getattr(hf_config, "model_type", "?")
        raise UserError(
            f"model.name_or_path '{source}' is a '{model_type}' model (its config.json's model_type), which is not a "
            "causal language model: transformers has no AutoModelForCausalLM for it, so lora-cli cannot train it. "
            "Choose a decoder-only model (Llama, Qwen, Mistral, Gemma, Phi, GPT-2, ...)."
        ) from None
    except (ArithmeticError, AssertionError, TypeError, IndexError, RuntimeError) as err:
        raise _impossible_config(source, hf_config.to_dict(), err) from None
    try:
        return model_facts(model, lora_settings(cfg.lora))
    except (ArithmeticError, AssertionError, TypeError) as err:
        raise _impossible_config(source, hf_config.to_dict(), err) from None


def estimate_for_config(cfg: Config, gpu: GpuSpec | str | None = None, data=None, tokenize: bool = True) -> Estimate:
    """The estimate for `cfg` on `gpu` (a GpuSpec, a --gpu string, or None: the GPU here, else a T4).

    `data`: the DataBundle when the caller has tokenized the data already (--dry-run); else the data is tokenized
    here when it is a local file and the model folder has a tokenizer (`tokenize`), or the longest row is assumed
    to be data.max_length tokens.
    """
    notes: list[str] = []
    spec = parse_gpu(gpu) if isinstance(gpu, str) else gpu
    if spec is None:
        spec = detect_gpu()
        if spec is None:
            spec = GPUS[DEFAULT_GPU]
            notes.append(f"no CUDA GPU here: estimated for a {spec.name} (choose another with --gpu)")
    precision = choose_precision(cfg.train.precision, capability=spec.capability)
    weights = base_dtype(cfg.model.dtype, precision)
    facts = _meta_facts(cfg, read_model_config(cfg))
    seq_len, padded = _sequence_length(cfg, data, tokenize, notes)
    half = precision.precision in ("fp16", "bf16")
    shape = StepShape(
        micro_batch=cfg.train.micro_batch_size, seq_len=seq_len, packing=cfg.data.packing,
        checkpointing=cfg.train.gradient_checkpointing, weight_bytes=weights.itemsize,
        compute_bytes=2 if half else 4, load_in_4bit=cfg.model.load_in_4bit,
        padded=padded,
    )
    if facts.model_type not in _MEASURED_FAMILIES:
        notes.append(f"activations are calibrated on Llama-style models; for {facts.model_type} they are an "
                     "approximation")
    if facts.use_dora:
        notes.append("DoRA's extra activations are approximated, not measured")
    estimate = Estimate(cfg.model.name_or_path, spec, precision.precision, dtype_name(weights), facts, shape,
                        step_parts(facts, shape), notes)
    if not estimate.fits:
        estimate.suggestions = suggestions(facts, shape, spec, cfg)
    return estimate


# Families with the layer layout memory_model.py counts (RMSNorm, rotary attention, SwiGLU).
_MEASURED_FAMILIES = {"llama", "mistral", "qwen2", "qwen3", "gemma", "olmo", "olmo2", "stablelm"}


def _sequence_length(cfg: Config, data, tokenize: bool, notes: list[str]) -> tuple[int, bool]:
    """(tokens in the longest row of a micro batch, whether that batch is padded). Packed rows are data.max_length
    long and unpadded; unpacked, the longest example (at most data.max_length) when the data is known. Batches
    are grouped by length, so the longest batch is unpadded when micro_batch_size examples share that length."""
    max_length = cfg.data.max_length
    if cfg.data.packing:
        notes.append(f"packed rows of data.max_length={max_length} tokens")
        return max_length, False
    if data is None and tokenize:
        data = _tokenize_local_data(cfg, notes)
    if data is None or not data.train:
        notes.append(f"sequence length: data.max_length={max_length} (the longest example is not known without "
                     "tokenizing the data)")
        return max_length, True
    from .data import lengths_of

    lengths = lengths_of(data.train)
    longest = min(max(lengths), max_length)
    padded = sum(n >= longest for n in lengths) < cfg.train.micro_batch_size
    notes.append(f"sequence length: the longest example, {longest} tokens (data.max_length={max_length})"
                 + ("" if padded else f"; the longest batch is {cfg.train.micro_batch_size} examples that long"))
    return max(2, longest), padded


def _tokenize_local_data(cfg: Config, notes: list[str]):
    """The DataBundle of a local data file (up to 50 MB) tokenized with a local model folder's tokenizer; None if
    either is not here or the data does not tokenize."""
    datas, model = [Path(p).expanduser() for p in cfg.data.paths()], Path(cfg.model.name_or_path).expanduser()
    has_tokenizer = any((model / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json"))
    size = sum(sum(f.stat().st_size for f in ([d] if d.is_file() else d.rglob("*"))) for d in datas if d.exists())
    if not (all(d.exists() for d in datas) and model.is_dir() and has_tokenizer) or size > 50 * 10**6:
        return None
    from . import data as data_lib
    from .chat_templates import apply_template_setting
    from .models import load_tokenizer

    try:
        tokenizer = load_tokenizer(str(model), cfg.model.revision, cfg.model.trust_remote_code)
        apply_template_setting(tokenizer, cfg.data.chat_template)
        return data_lib.build_from_config(cfg, tokenizer)
    except UserError as err:
        notes.append(f"the data could not be tokenized ({str(err).splitlines()[0][:120]})")
        return None


# --- what makes it fit ---------------------------------------------------------------------------------------


def suggestions(facts: ModelFacts, shape: StepShape, gpu: GpuSpec, cfg: Config) -> list[Suggestion]:
    """Changes in order of what they cost (speed, then batch shape, then data, then precision), each applied on
    top of the previous ones and only as far as needed; stops once it fits. When the weights alone do not fit,
    activations cannot help: 4-bit comes first."""
    budget = gpu.memory_bytes
    total = lambda s: sum(step_parts(facts, s).values())  # noqa: E731
    steps: list[Suggestion] = []
    accumulation = cfg.train.gradient_accumulation_steps
    fixed = replace(shape, micro_batch=1, seq_len=2, checkpointing=True)
    order = ["checkpointing", "batch", "length", "4bit"]
    if total(fixed) > budget and not shape.load_in_4bit:
        order = ["4bit", "checkpointing", "batch", "length"]
    for option in order:
        if total(shape) <= budget:
            break
        if option == "checkpointing" and not shape.checkpointing:
            shape = replace(shape, checkpointing=True)
            steps.append(_suggest("turn on gradient checkpointing (about 20% slower)",
                                  ["train.gradient_checkpointing=true"], total(shape), budget))
        elif option == "batch" and shape.micro_batch > 1:
            effective = shape.micro_batch * accumulation
            batch = shape.micro_batch
            while batch > 1 and total(replace(shape, micro_batch=batch)) > budget:
                batch //= 2
            shape = replace(shape, micro_batch=max(1, batch))
            accumulation = math.ceil(effective / shape.micro_batch)
            steps.append(_suggest(
                f"micro batch {shape.micro_batch} with {accumulation} accumulation steps (same effective batch)",
                [f"train.micro_batch_size={shape.micro_batch}", f"train.gradient_accumulation_steps={accumulation}"],
                total(shape), budget))
        elif option == "length" and shape.seq_len > MIN_SEQ_LEN:
            length = shape.seq_len
            while length > MIN_SEQ_LEN and total(replace(shape, seq_len=length)) > budget:
                length = max(MIN_SEQ_LEN, length // 2)
            shape = replace(shape, seq_len=length)
            steps.append(_suggest(f"truncate examples to {length} tokens", [f"data.max_length={length}"],
                                  total(shape), budget))
        elif option == "4bit" and not shape.load_in_4bit:
            shape = replace(shape, load_in_4bit=True)
            steps.append(_suggest("load the base in 4-bit (QLoRA, NF4)", ["model.load_in_4bit=true"], total(shape),
                                  budget))
    return steps


def _suggest(change: str, overrides: list[str], total: int, budget: int) -> Suggestion:
    return Suggestion(change, overrides, total, total <= budget)


# --- printing ------------------------------------------------------------------------------------------------


def _gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def format_estimate(est: Estimate) -> str:
    """The estimate as the lines lora-train prints: parts, total, verdict, and what makes it fit."""
    f, s = est.facts, est.shape
    weights = f"NF4 4-bit + {est.weight_dtype}" if s.load_in_4bit else est.weight_dtype
    labels = {
        "base weights": f"base weights ({_count(f.total_params)} parameters, {weights})",
        "LoRA parameters": f"LoRA parameters ({_count(f.lora_params)} in {f.lora_modules} modules, fp32)",
        "LoRA gradients": "LoRA gradients (fp32)",
        "AdamW states": "AdamW states (2 x fp32)",
        "activations": f"activations ({f.layers} layers, {f.attn_implementation}"
                       + (", checkpointed)" if s.checkpointing else ", no checkpointing)"),
        "output head + loss": f"output head + loss ({f.vocab:,} vocabulary, chunks of "
                              f"{min(chunk_rows(f.vocab), s.micro_batch * s.seq_len)} rows)",
        "CUDA context + allocator": "CUDA context + allocator",
    }
    lines = [
        f"Memory estimate: {est.model} on a {est.gpu.name} ({_gib(est.gpu.memory_bytes)}), {est.precision} "
        f"{'mixed precision' if est.precision != 'fp32' else ''}".rstrip(),
        f"  micro batch {s.micro_batch} x {s.seq_len} tokens, packing {'on' if s.packing else 'off'}",
    ]
    lines += [f"  note: {note}" for note in est.notes]
    width = max(len(label) for label in labels.values()) + 2
    for name, size in est.parts.items():
        lines.append(f"  {labels.get(name, name):<{width}}{_gib(size):>11}")
    spare = est.gpu.memory_bytes - est.total_bytes
    verdict = (f"FITS ({_gib(spare)} to spare)" if est.fits else f"DOES NOT FIT ({_gib(-spare)} over)")
    lines.append(f"  {'total':<{width}}{_gib(est.total_bytes):>11}  of {_gib(est.gpu.memory_bytes)}: {verdict}")
    if est.suggestions:
        lines.append("What makes it fit, in order (each on top of the previous):")
        for i, sug in enumerate(est.suggestions, 1):
            status = "fits" if sug.fits else "not yet"
            lines.append(f"  {i}. {sug.change}: {' '.join(sug.overrides)} -> {_gib(sug.total_bytes)} ({status})")
        if not est.suggestions[-1].fits:
            lines.append("  Even with all of these it does not fit: choose a smaller model or a larger GPU.")
        else:
            every = " ".join(o for sug in est.suggestions for o in sug.overrides)
            lines.append(f"  i.e. lora-train CONFIG {every}")
    return "\n".join(lines)
