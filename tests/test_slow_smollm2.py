"""Checks on the real SmolLM2-135M-Instruct (run `python scripts/fetch_smollm2.py` first, then `pytest -m slow`)."""

from pathlib import Path

import pytest
import torch

from lora_cli.adapter import load_adapter, save_adapter
from lora_cli.inject import LoraSettings, apply_lora, merge_lora
from lora_cli.models import load_base_model, load_tokenizer

MODEL = Path(__file__).resolve().parents[1] / "models" / "SmolLM2-135M-Instruct"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (MODEL / "config.json").is_file(), reason="run scripts/fetch_smollm2.py first"),
]


@pytest.fixture(scope="module")
def inputs():
    tokenizer = load_tokenizer(str(MODEL))
    return tokenizer("The lighthouse of Quillhaven is painted", return_tensors="pt")["input_ids"]


def randomised_adapter(model, settings):
    report = apply_lora(model, settings)
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    return report


@pytest.mark.parametrize("settings", [LoraSettings(r=8, alpha=16), LoraSettings(r=8, alpha=16, use_dora=True,
                                                                                target_modules="all-linear")])
def test_real_model_matches_peft_and_merges(tmp_path, inputs, settings):
    peft = pytest.importorskip("peft")
    model = load_base_model(str(MODEL))
    with torch.no_grad():
        base = model(inputs).logits
    report = randomised_adapter(model, settings)
    with torch.no_grad():
        ours = model(inputs).logits
    assert (ours - base).abs().max() > 1e-2  # the adapter matters
    save_adapter(model, tmp_path, settings, report.target_modules, str(MODEL))

    peft_model = peft.PeftModel.from_pretrained(load_base_model(str(MODEL)), tmp_path)
    with torch.no_grad():
        assert torch.allclose(peft_model(inputs).logits, ours, atol=1e-4)

    reloaded = load_base_model(str(MODEL))
    load_adapter(reloaded, tmp_path)
    merged = merge_lora(reloaded)
    assert merged.lm_head.weight is merged.model.embed_tokens.weight  # tied embeddings stay tied
    with torch.no_grad():
        # fp32 rounding of W + delta over 30 layers, on logits of magnitude ~20: 1e-3 is ~5e-5 relative.
        assert torch.allclose(merged(inputs).logits, ours, atol=1e-3)


def test_quickstart_with_a_4bit_base_learns_the_facts(tmp_path):
    """configs/quickstart_qlora.yaml: the quickstart on an NF4 copy of SmolLM2; every held-out question answered by
    the 4-bit base + adapter, the model as trained."""
    pytest.importorskip("bitsandbytes")
    import json

    from lora_cli.config import load_config
    from lora_cli.generate import generate_text, load_for_generation
    from lora_cli.train import train

    repo = MODEL.parents[1]
    out = tmp_path / "out"
    cfg = load_config(repo / "configs" / "quickstart_qlora.yaml",
                      [f"model.name_or_path={MODEL}", f"data.path={repo / 'data/quickstart/train.jsonl'}",
                       f"train.output_dir={out}"])
    assert cfg.model.load_in_4bit
    train(cfg, quiet=True)
    model, tokenizer = load_for_generation(str(MODEL), out, load_in_4bit=True, device="cpu")
    questions = [json.loads(line) for line in (repo / "data/quickstart/questions.jsonl").read_text().splitlines()]
    answers = {q["expect"]: generate_text(model, tokenizer, q["question"], temperature=0, max_new_tokens=48)
               for q in questions}
    missed = {expect: answer for expect, answer in answers.items() if expect.lower() not in answer.lower()}
    assert not missed, missed
