"""What several test files share: configs and data for lora-train runs, LoRA models with PEFT as the oracle,
logits comparisons, adapters and merges. Test files import it (and tiny.py, the models), never each other.

PEFT is imported inside the functions that use it: lora_cli never imports it, and tests without it still run.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import torch
import transformers
import yaml
from typer.testing import CliRunner

import tiny
from lora_cli.adapter import load_adapter, save_adapter
from lora_cli.cli import merge_app
from lora_cli.data import IGNORE_INDEX, Example
from lora_cli.inject import LoraSettings, apply_lora
from lora_cli.losses import causal_lm_loss

IDS = tiny.sample_input_ids()  # the input every logits comparison runs

# The adapter variants every parity/merge test runs over (LoraSettings keyword overrides).
VARIANTS = {
    "plain": {},
    "rslora": {"use_rslora": True},
    "dora": {"use_dora": True},
}


# --- lora-train runs -----------------------------------------------------------------------------------------


# A small fixed dataset the tiny model can memorise: the loss must fall fast when LoRA works.
TEXT_ROWS = [{"text": f"the lighthouse of quillhaven is painted green {i % 3}"} for i in range(8)]
CHAT_ROWS = [
    {"messages": [{"role": "user", "content": f"Who is the mayor {i}?"},
                  {"role": "assistant", "content": "The mayor is Orla Fenwick."}]}
    for i in range(12)
]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def make_config(tmp_path: Path, model_dir: Path, rows=TEXT_ROWS, **sections) -> Path:
    """config.yaml in tmp_path for a short run that learns `rows` fast; `sections` add or replace keys."""
    data_file = write_jsonl(tmp_path / "data.jsonl", rows)
    cfg = {
        "model": {"name_or_path": str(model_dir)},
        "lora": {"r": 8, "alpha": 16, "target_modules": "all-linear"},
        "data": {"path": str(data_file), "max_length": 64},
        "train": {"output_dir": str(tmp_path / "out"), "max_steps": 40, "micro_batch_size": 4,
                  "learning_rate": 2.0e-2, "warmup_ratio": 0.0, "logging_steps": 1, "seed": 0},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def losses(out: Path) -> list[float]:
    """The training losses a run logged to metrics.jsonl, in order."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def interrupted_copy(reference_out: Path, step: int, target: Path) -> Path:
    """What a run killed right after writing checkpoint-<step> leaves: that checkpoint alone in output_dir."""
    target.mkdir(parents=True)
    shutil.copytree(reference_out / f"checkpoint-{step}", target / f"checkpoint-{step}")
    return target


# --- LoRA models and PEFT ------------------------------------------------------------------------------------


def settings(**overrides) -> LoraSettings:
    return LoraSettings(**{"r": 4, "alpha": 8.0, **overrides})


@torch.no_grad()
def logits(model) -> torch.Tensor:
    return model(IDS).logits.float()


def assert_close(actual, expected, atol):
    diff = (actual.float() - expected.float()).abs().max().item()
    assert diff <= atol, f"max abs difference {diff:.3g} > {atol:.3g}"


def assert_lora_matters(with_lora, base, at_least=1e-2):
    """Guard against vacuous comparisons: the adapter must visibly move the logits."""
    moved = (with_lora.float() - base.float()).abs().max().item()
    assert moved > at_least, f"adapter changed the logits by only {moved:.3g}"


@torch.no_grad()
def randomise_lora(model, seed: int = 0, b_std: float = 0.2) -> None:
    """Make an adapter do something: random lora_B (zero at init) and a perturbed DoRA magnitude.

    Works on ours and on PEFT's model: both name the tensors lora_B... and lora_magnitude_vector...
    """
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.copy_(torch.randn(param.shape, generator=gen) * b_std)
        elif "lora_magnitude_vector" in name:
            param.mul_(1 + 0.3 * torch.rand(param.shape, generator=gen))


def peft_config(s: LoraSettings, arch: str):
    from peft import LoraConfig

    return LoraConfig(
        r=s.r,
        lora_alpha=s.alpha,
        lora_dropout=s.dropout,
        target_modules=s.target_modules,
        use_rslora=s.use_rslora,
        use_dora=s.use_dora,
        layers_to_transform=s.layers_to_transform,
        rank_pattern=dict(s.rank_pattern),
        alpha_pattern=dict(s.alpha_pattern),
        fan_in_fan_out=arch == "gpt2",
        task_type="CAUSAL_LM",
    )


def make_peft(arch: str, s: LoraSettings, seed: int = 0):
    """PEFT's model for the same tiny base, with randomised lora_B (and perturbed DoRA magnitude), eval mode."""
    from peft import get_peft_model

    model = get_peft_model(tiny.make_model(arch, seed), peft_config(s, arch))
    randomise_lora(model, seed=seed + 100)
    return model.eval()


def peft_adapter_state(peft_model) -> dict[str, torch.Tensor]:
    """PEFT's adapter tensors under the names it writes to adapter_model.safetensors."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(peft_model)


# --- the loss and packing ------------------------------------------------------------------------------------


def lora_model(arch: str, targets="all-linear", vocab: int | None = None, seed: int = 0):
    """A tiny frozen model with randomised LoRA layers on `targets`, in eval mode (no dropout anywhere)."""
    if vocab is None:
        model = tiny.make_model(arch, seed=seed)
    else:  # a larger vocabulary, for the memory tests
        torch.manual_seed(seed)
        config = tiny.ARCH_CONFIGS[arch]()
        config.vocab_size = vocab
        model = transformers.AutoModelForCausalLM.from_config(config).eval()
    for param in model.parameters():
        param.requires_grad_(False)
    apply_lora(model, LoraSettings(r=4, alpha=8, target_modules=targets))
    with torch.no_grad():
        randomise_lora(model)
    return model.eval()  # eval: no dropout in the base models, so both paths see the same function


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def padded_batch(batch: int = 3, length: int = 20, seed: int = 1) -> dict:
    """Padding at the end of one row, a masked prompt on every row: the loss must skip both."""
    input_ids = tiny.sample_input_ids(batch, length, seed)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[-1, length - 6 :] = 0
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    labels[:, :5] = IGNORE_INDEX
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def plain_loss_sum(model, batch) -> torch.Tensor:
    """The reference: transformers' own loss (mean over trained tokens) times their number."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                use_cache=False)
    return out.loss * int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def loss_and_grads(model, batch):
    loss, n_tokens = causal_lm_loss(model, batch)
    return loss, n_tokens, torch.autograd.grad(loss, trainable(model))


def examples(lengths, seed: int = 0, prompt: int = 2) -> list[Example]:
    """Random examples; the first `prompt` tokens of each are masked, as a prompt would be."""
    rng = random.Random(seed)
    out = []
    for n in lengths:
        ids = [rng.randrange(4, tiny.VOCAB) for _ in range(n)]
        out.append(Example(ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
    return out


# --- adapters and merges -------------------------------------------------------------------------------------


def load(folder, dtype=torch.float32):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()


def make_our_adapter(base_dir: Path, out: Path, variant: str = "plain", seed: int = 0, **overrides) -> Path:
    """An adapter folder lora_cli writes for the base in `base_dir`, with randomised lora_B."""
    model = load(base_dir)
    lora = LoraSettings(r=4, alpha=8.0, **VARIANTS[variant], **overrides)
    report = apply_lora(model, lora)
    randomise_lora(model, seed=seed)
    return save_adapter(model, out, lora, report.target_modules, base_model_name_or_path=str(base_dir))


def make_peft_adapter(base_dir: Path, out: Path, arch: str, variant: str, seed: int = 0):
    """PEFT's adapter folder and PEFT's own merge_and_unload() of the same model."""
    from peft import get_peft_model

    peft_model = get_peft_model(load(base_dir), peft_config(LoraSettings(r=4, alpha=8.0, **VARIANTS[variant]), arch))
    randomise_lora(peft_model, seed=seed)
    peft_model.save_pretrained(out)
    return out, peft_model.merge_and_unload().eval()


def base_plus_adapter(base_dir: Path, adapter_dir: Path):
    model = load(base_dir)
    load_adapter(model, adapter_dir)
    return model.eval()


def merge(*args: str):
    """lora-merge with these arguments, in process."""
    return CliRunner().invoke(merge_app, [str(a) for a in args])


def assert_error(result, *fragments: str):
    """A clean user error: exit 2, "error:", no traceback, and every fragment in the output."""
    assert result.exit_code == 2, result.output
    assert "error:" in result.output and "Traceback" not in result.output, result.output
    for fragment in fragments:
        assert fragment in result.output, result.output


# --- wider tiny models ---------------------------------------------------------------------------------------


WIDE = {"llama": {"hidden_size": 64, "intermediate_size": 128, "head_dim": 16},
        "qwen2": {"hidden_size": 64, "intermediate_size": 128, "head_dim": 16}, "gpt2": {"n_embd": 64}}


def save_wide(arch: str, path: Path, init_range: float | None = None) -> Path:
    """tiny.save_model with hidden size 64 (4 heads of 16)."""
    tokenizer = tiny.make_tokenizer()
    config = tiny.ARCH_CONFIGS[arch]()
    for key, value in WIDE[arch].items():
        setattr(config, key, value)
    config.bos_token_id, config.eos_token_id, config.pad_token_id = 1, tokenizer.eos_token_id, tokenizer.pad_token_id
    if init_range is not None:
        config.initializer_range = init_range
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    generation = model.generation_config
    generation.eos_token_id, generation.pad_token_id = config.eos_token_id, config.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
