"""The config schema for `lora-train CONFIG.yaml`: one pydantic section per part of the run.

Growing it is local: a new key is a new field with a default (old configs keep working), a new section is a
`_Section` subclass plus a field on `Config`, and a check that spans sections goes in `cross_section_problems`.
Error wording and did-you-mean suggestions are derived from the schema (validation.py).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from ..chat_templates import setting_problem

Dtype = Literal["auto", "float16", "bfloat16", "float32"]
Precision = Literal["auto", "fp16", "bf16", "fp32"]
DataFormat = Literal["auto", "text", "alpaca", "chat", "prompt_completion"]
LrScheduler = Literal["cosine", "linear", "constant"]
LoraInit = Literal["default", "gaussian"]
INIT_CHOICES = get_args(LoraInit)  # LoraLinear checks its `init` against the same names
Optimizer = Literal["adamw"]  # torch.optim.AdamW; a Literal so more can be added without a type change
Tracker = Literal["tensorboard", "wandb"]  # experiment trackers, run through Accelerate's tracker classes

ALL_LINEAR = "all-linear"  # target_modules' PEFT keyword: every linear layer but the output head


class _Section(BaseModel):
    # forbid: a misspelt key must be an error, never silently ignored.
    # coerce_numbers_to_str: YAML reads `revision: 1234567` as an int where a string was meant.
    # allow_inf_nan=False: `.inf` or `.nan` (YAML's spellings) is never a usable learning rate, alpha or ratio.
    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic reads true as 1 for a number field, so `lora.r=true` would silently train at rank 1.
        annotation = cls.model_fields[info.field_name].annotation
        if is_numeric_list_field(annotation) and isinstance(value, list):
            if any(isinstance(item, bool) for item in value):
                raise PydanticCustomError("bool_for_number", "must be a list of numbers, not of true or false")
        elif isinstance(value, bool) and (is_numeric_field(annotation) or is_numeric_list_field(annotation)):
            raise PydanticCustomError("bool_for_number", "must be a number, not true or false")
        return value


def is_numeric_field(annotation: Any) -> bool:
    """Whether a field's type is int or float (or one of them or None)."""
    members = get_args(annotation) or (annotation,)
    return any(member in (int, float) for member in members)


def is_numeric_list_field(annotation: Any) -> bool:
    """Whether a field's type is a list of numbers (or None), such as layers_to_transform."""
    return any(get_origin(member) is list and is_numeric_field(get_args(member)[0]) for member in get_args(annotation))


class ModelSection(_Section):
    name_or_path: str = Field(min_length=1)  # Hub id (org/name) or a local folder
    revision: str | None = None  # Hub branch, tag or commit; None = the default branch
    dtype: Dtype = "auto"  # dtype the frozen base weights are loaded in; auto = the half type of train.precision
    trust_remote_code: bool = False  # run modelling code shipped in the Hub repo (only for repos you trust)
    # QLoRA: the frozen base's linear layers in NF4 4-bit (bitsandbytes, the `qlora` extra), computing in the
    # training precision. axolotl's name; LLaMA-Factory's `quantization_bit: 4` means the same.
    load_in_4bit: bool = False
    quantization_bit: int | None = Field(None, exclude=True)  # alias, folded into load_in_4bit

    @field_validator("quantization_bit")
    @classmethod
    def _only_4_bits(cls, value: int | None) -> int | None:
        if value not in (None, 4):
            raise PydanticCustomError(
                "quantization_bit",
                "only 4 is supported (NF4 4-bit, QLoRA); write model.load_in_4bit: true, or remove the key to train "
                "on the 16-bit base",
            )
        return value

    @model_validator(mode="after")
    def _alias_to_load_in_4bit(self) -> "ModelSection":
        # Folded in and forgotten, so a config that says quantization_bit: 4 equals one that says load_in_4bit.
        if self.quantization_bit == 4:
            self.load_in_4bit, self.quantization_bit = True, None
        return self


MAX_LORAPLUS_LR_RATIO = 1000.0


class LoraSection(_Section):
    r: int = Field(8, gt=0)  # rank of the update matrices
    alpha: float = Field(16.0, gt=0)  # scale is alpha / r (alpha / sqrt(r) with use_rslora)
    dropout: float = Field(0.0, ge=0, lt=1)  # dropout on the LoRA input
    # list of module-name suffixes, a regex (full match on the module path), or "all-linear";
    # None = the architecture's attention projections
    target_modules: list[str] | str | None = None
    use_rslora: bool = False  # rank-stabilised scaling
    use_dora: bool = False  # weight-decomposed LoRA
    init: LoraInit = "default"  # default: B = 0 and A Kaiming-uniform (PEFT's default); gaussian: A ~ N(0, 1/r)
    layers_to_transform: list[int] | None = Field(None, min_length=1)  # decoder layer indices; None = all
    # LoRA+: lora_B learns this many times faster than lora_A (the LoRA+ paper suggests ~16); None = off
    loraplus_lr_ratio: float | None = Field(None, gt=0)

    @field_validator("target_modules", mode="before")
    @classmethod
    def _check_target_modules(cls, value: Any) -> Any:
        # Checked by hand rather than by the union type, so a mistake gives one clear line, not one per member.
        if value is None:
            return None
        if isinstance(value, str):
            return _check_module_pattern(value)
        if isinstance(value, list) and value and all(isinstance(name, str) and name for name in value):
            return value
        raise PydanticCustomError(
            "target_modules", "must be a list of module names such as [q_proj, v_proj], a regex, or all-linear"
        )

    @field_validator("loraplus_lr_ratio")
    @classmethod
    def _loraplus_ratio_in_reason(cls, value: float | None) -> float | None:
        # B's learning rate is train.learning_rate x ratio. The LoRA+ paper recommends ~16 and its sweeps stay in
        # the hundreds; far beyond, B's steps blow up the loss and the run stops on non-finite losses that seem to
        # blame the learning rate. 1000 leaves room to experiment and catches typos (1e30, 16000 for 16).
        if value is not None and value > MAX_LORAPLUS_LR_RATIO:
            raise PydanticCustomError(
                "loraplus_ratio",
                f"must be at most {MAX_LORAPLUS_LR_RATIO:g}: lora_B's learning rate is train.learning_rate times this "
                "ratio, so a huge one makes the loss diverge; the LoRA+ paper recommends about 16",
            )
        return value

    @field_validator("layers_to_transform", mode="before")
    @classmethod
    def _one_layer_is_a_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, int) and not isinstance(value, bool) else value

    @field_validator("layers_to_transform")
    @classmethod
    def _layers_not_negative(cls, value: list[int] | None) -> list[int] | None:
        if value and min(value) < 0:
            raise PydanticCustomError("layer_index", "layer indices must be 0 or more")
        return value


def _check_module_pattern(pattern: str) -> str:
    if not pattern.strip():
        raise PydanticCustomError("target_modules", "must not be empty; remove the key to use the default")
    # "q_proj,v_proj" is a valid regex that matches nothing: almost always a list written as one string.
    if re.fullmatch(r"\w+(\s*,\s*\w+)+", pattern):
        raise PydanticCustomError("target_modules", "looks like a comma-separated list; write it as [q_proj, v_proj]")
    if pattern != ALL_LINEAR:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise PydanticCustomError("target_modules", f"is not a valid regex ({exc}); use a list of names instead")
    return pattern


class DataSource(_Section):
    """One entry of a data.path list."""

    path: str = Field(min_length=1)  # a local file or folder, or a Hub dataset id
    format: DataFormat | None = None  # None = data.format
    split: str | None = Field(None, min_length=1)  # None = data.split
    take: int | float | None = None  # rows to use: a count (>= 1) or a fraction (0 < take <= 1); None = all

    @field_validator("take", mode="before")
    @classmethod
    def _check_take(cls, value: Any) -> Any:
        if isinstance(value, str) and looks_like_number(value):
            value = float(value)  # YAML 1.1 reads `1e3` as a string
        if value is None or isinstance(value, bool):
            return value  # a bool is refused by _no_bool_for_a_number
        if isinstance(value, float) and value.is_integer() and value > 1:
            value = int(value)
        if (isinstance(value, int) and value >= 1) or (isinstance(value, float) and 0 < value <= 1):
            return value
        raise PydanticCustomError(
            "take", "must be a row count such as 500, or a fraction of the source's rows such as 0.25"
        )


# data.path: one path, or a list of sources (each a path, or a DataSource mapping). The discriminator picks the
# member by the value's type, so an error is reported for that member only, not once per member.
_ONE_PATH, _SOURCES = "one path", "sources"
UNION_TAGS = (_ONE_PATH, _SOURCES)  # names pydantic puts in error locations; validation.py leaves them out
DataPath = Annotated[
    Union[Annotated[str, Tag(_ONE_PATH)], Annotated[list[DataSource], Tag(_SOURCES)]],
    Discriminator(lambda value: _SOURCES if isinstance(value, list) else _ONE_PATH),
]


class DataSection(_Section):
    # a local .jsonl/.json/.txt file or folder, or a Hub dataset id; or a list of sources mixed into one set
    path: DataPath
    split: str = Field("train", min_length=1)  # split to read when path is a Hub dataset
    format: DataFormat = "auto"  # auto = guess from the fields of the first record
    max_length: int = Field(1024, ge=8)  # tokens per example; longer ones are truncated
    train_on_inputs: bool = False  # False = loss on the response only (prompt tokens masked)
    val_size: int | float = 0  # fraction in [0, 1) or a count >= 1 of examples held out of path; 0 = none
    val_path: str | None = None  # a separate validation file, instead of val_size
    packing: bool = False  # concatenate examples into max_length blocks
    # auto = the model's own; chatml, llama3; Jinja text; or the path of a .jinja file. Written into the adapter.
    chat_template: str = Field("auto", min_length=1)
    system_prompt: str | None = None  # the system message of chat rows that have none; lora-generate uses it too
    # The tokenized data is cached here (keyed by the files' contents, the tokenizer and these settings); null = a
    # folder .lora-data-cache beside train.output_dir, so a rerun after a Colab disconnect finds it on Drive.
    cache_dir: str | None = None
    # processes that tokenize the data on a cache miss; auto = the cores here, up to 4, once the data is larger than
    # a few chunks (data/parallel.py; the measurement is in docs/BENCHMARKS.md)
    num_proc: Union[Literal["auto"], int] = "auto"

    @field_validator("path", mode="before")
    @classmethod
    def _sources_as_mappings(cls, value: Any) -> Any:
        if isinstance(value, str) and not value:
            raise PydanticCustomError("data_path", "must not be empty")
        if not isinstance(value, list):
            return value
        if not value:
            raise PydanticCustomError("data_path", "must be a path, or a non-empty list of sources")
        return [{"path": item} if isinstance(item, str) else item for item in value]

    @field_validator("num_proc", mode="before")
    @classmethod
    def _processes(cls, value: Any) -> Any:
        # one sentence instead of one per branch of the union (auto, or an int of at least 1)
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            return value
        raise PydanticCustomError("num_proc", "must be auto or a number of processes, 1 or more")

    @field_validator("chat_template")
    @classmethod
    def _known_template(cls, value: str) -> str:
        problem = setting_problem(value)
        if problem:
            raise PydanticCustomError("chat_template", problem)
        return value

    def sources(self) -> list[DataSource]:
        """Every source with its own format and split filled in (data.format, data.split where it names none)."""
        entries = [DataSource(path=self.path)] if isinstance(self.path, str) else self.path
        return [DataSource(path=s.path, format=s.format or self.format, split=s.split or self.split, take=s.take)
                for s in entries]

    def paths(self) -> list[str]:
        """The paths of every source, and val_path: what the run reads."""
        return [s.path for s in self.sources()] + ([self.val_path] if self.val_path else [])

    def describe_path(self) -> str:
        """data.path in a line: the path, or the sources' paths joined by ' + '."""
        return " + ".join(s.path for s in self.sources())

    @field_validator("val_size", mode="before")
    @classmethod
    def _check_val_size(cls, value: Any) -> Any:
        if isinstance(value, str) and looks_like_number(value):
            value = float(value)  # YAML 1.1 reads `1e-1` as a string
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if is_number and (0 <= value < 1 or (isinstance(value, int) and value >= 1)):
            return value
        raise PydanticCustomError(
            "val_size", "must be a fraction in [0, 1) such as 0.05, or a whole number of examples such as 200"
        )

    @field_validator("val_path")
    @classmethod
    def _not_both_val_sources(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and info.data.get("val_size", 0) > 0:
            raise PydanticCustomError(
                "val_source", "set only one of data.val_size (held out of data.path) or data.val_path, not both"
            )
        return value


class TrainSection(_Section):
    output_dir: str = Field("outputs/lora", min_length=1)  # adapter, checkpoints and lora_config.yaml go here
    overwrite_output_dir: bool = False  # False = refuse to write into a non-empty output_dir
    epochs: float = Field(1.0, gt=0)  # passes over the data (fractions allowed); ignored when max_steps is set
    max_steps: int | None = Field(None, gt=0)  # optimizer steps; overrides epochs when set
    micro_batch_size: int = Field(4, gt=0)  # examples per forward pass
    gradient_accumulation_steps: int = Field(1, gt=0)  # effective batch = micro_batch_size * this
    learning_rate: float = Field(2e-4, gt=0)
    lr_scheduler: LrScheduler = "cosine"
    warmup_ratio: float = Field(0.03, ge=0, lt=1)  # fraction of steps spent warming up linearly
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)  # gradient clipping; None = no clipping
    optimizer: Optimizer = "adamw"
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    adam_epsilon: float = Field(1e-8, gt=0)
    precision: Precision = "auto"  # autocast precision; auto = bf16 where supported, else fp16 on GPU, fp32 on CPU
    gradient_checkpointing: bool = False  # recompute activations: less memory, ~30% slower
    fsdp: bool = False  # under torchrun / accelerate launch: shard the base over the processes (FSDP2), not copy it
    seed: int = Field(42, ge=0)
    logging_steps: int = Field(10, gt=0)
    eval_steps: int | None = Field(None, gt=0)  # None = evaluate at the end of each epoch only
    save_steps: int | None = Field(None, gt=0)  # None = no intermediate checkpoints
    save_total_limit: int | None = Field(None, gt=0)  # keep only the newest N checkpoints; None = keep all
    merge_at_end: bool = False  # also save the base model with the adapter merged in
    max_nonfinite_steps: int = Field(10, gt=0)  # consecutive skipped steps (NaN/inf loss or fp16 overflow) tolerated
    # null = a fresh run; auto = continue from the newest complete checkpoint in output_dir (a fresh start if there
    # is none, so the same command can be rerun after every disconnect); or the path of a checkpoint-<step> folder
    resume_from_checkpoint: str | None = Field(None, min_length=1)
    save_minutes: float | None = Field(None, gt=0)  # also checkpoint when this many minutes passed since the last
    early_stopping_patience: int | None = Field(None, gt=0)  # stop after N evaluations without improvement
    early_stopping_threshold: float = Field(0.0, ge=0)  # the least decrease of eval loss that counts as one
    load_best_at_end: bool = False  # the final adapter is the one with the best evaluation loss
    # Watching the run (none of these changes what is trained; all may change when a run is resumed):
    report_to: list[Tracker] = Field(default_factory=list)  # [tensorboard], [wandb], both, or [] / none
    run_name: str | None = None  # names runs/<run_name>/ and the tracker run; None = run-YYYYmmdd-HHMMSS
    logging_dir: str | None = None  # where the trackers write; None = output_dir/runs
    wandb_project: str | None = None  # None = $WANDB_PROJECT, else "lora-cli"
    # prompts answered greedily (chat template) at every evaluation and at the end, or the path of a prompt file
    eval_prompts: list[str] | str | None = None
    eval_max_new_tokens: int = Field(64, gt=0)

    @field_validator("report_to", mode="before")
    @classmethod
    def _report_to_list(cls, value: Any) -> Any:
        # HF's spelling: `report_to: none`, or one name as a plain string.
        if value is None:
            return []
        values = [value] if isinstance(value, str) else value
        if isinstance(values, list) and all(isinstance(v, str) for v in values):
            names = [v.strip().lower() for v in values]
            return list(dict.fromkeys(n for n in names if n != "none"))
        raise PydanticCustomError("report_to", "must be a list of trackers such as [tensorboard] or [wandb], or none")

    @field_validator("run_name")
    @classmethod
    def _run_name_is_a_folder_name(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[A-Za-z0-9_+=@-][A-Za-z0-9._+=@-]*", value):
            raise PydanticCustomError(
                "run_name", "must be a folder name of letters, digits and . _ - + = @ (no spaces or slashes, not "
                "starting with a dot)"
            )
        return value

    @field_validator("eval_prompts", mode="before")
    @classmethod
    def _check_eval_prompts(cls, value: Any) -> Any:
        if value is None or (isinstance(value, str) and value.strip()):
            return value
        if isinstance(value, list) and value and all(isinstance(p, str) and p.strip() for p in value):
            return value
        raise PydanticCustomError(
            "eval_prompts", "must be a list of prompts such as [\"What is LoRA?\"], or the path of a prompt file "
            "(one prompt per line, or JSONL with a \"prompt\" field)"
        )


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: ModelSection
    lora: LoraSection = Field(default_factory=LoraSection)
    data: DataSection
    train: TrainSection = Field(default_factory=TrainSection)

    @model_validator(mode="before")
    @classmethod
    def _empty_section_means_defaults(cls, data: Any) -> Any:
        # `lora:` with every key commented out is YAML null; the user meant "all defaults".
        if isinstance(data, dict):
            return {key: {} if value is None and key in cls.model_fields else value for key, value in data.items()}
        return data


def cross_section_problems(config: Config) -> list[str]:
    """Checks that need more than one section (run once every field is valid on its own)."""
    problems = []
    has_validation_data = config.data.val_size > 0 or config.data.val_path is not None
    if config.train.eval_steps is not None and not has_validation_data and not config.train.eval_prompts:
        problems.append(
            f"train.eval_steps: is set but there is no validation data and no train.eval_prompts; set data.val_size "
            f"(e.g. 0.05) or data.val_path, or train.eval_prompts, or remove train.eval_steps (got "
            f"{config.train.eval_steps})"
        )
    for key in ("early_stopping_patience", "load_best_at_end"):
        value = getattr(config.train, key)
        if value and not has_validation_data:
            problems.append(
                f"train.{key}: needs validation data to compare evaluations; set data.val_size (e.g. 0.05) or "
                f"data.val_path, or remove train.{key} (got {str(value).lower()})"
            )
    return problems


# What a person means as a number but PyYAML (YAML 1.1) reads as a string: `1e-4`, `1.0e5` (no dot, no sign).
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def looks_like_number(text: str) -> bool:
    return _NUMBER.fullmatch(text.strip()) is not None
