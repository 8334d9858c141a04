"""lora-merge --gguf: the GGUF file a real reader loads back (transformers' own GGUF loader, offline on the CPU)
equals the merged model, its tokenizer tokenizes as the original, the Modelfile carries the chat template, and bad
input is refused before anything is written."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

import tiny
from lora_cli.export.gguf_tokenizer import CHECK_TEXT
from test_merge import assert_error, load, logits, make_our_adapter, merge

TYPES = ["f32", "f16", "bf16", "q8_0", "q4_0"]
# The model loaded from the GGUF must equal the merged model with each weight rounded as the type rounds it
# (rounded_like_gguf: gguf's own quantize + dequantize, on the HF layout; the q/k row permutation commutes with
# row-wise blocks), bit for bit (measured: identical logits for every type on llama, qwen2, tied llama and mistral,
# two seeds each). A missing permutation, a transposed weight or a dropped bias is off by the size of the logits
# themselves. How far each type's rounding moves the logits of a real model is measured on SmolLM2
# (tests/test_slow_gguf.py): tiny random models are no measure of that (4-bit rounding of a 2-layer random model
# moves its near-zero logits by ~100%).


def gguf_model(path: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)


def gguf_tokenizer(path: Path):
    return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def relative_difference(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def rounded_like_gguf(model, gtype: str):
    """The model with every weight rounded to what the GGUF of type `gtype` stores (1-D tensors stay F32; for q4_0
    the head, or the tied embedding, is Q8_0), in float32."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    from lora_cli.export.gguf_types import TYPES as GGUF_TYPES
    from lora_cli.export.gguf_types import ggml_type_for

    tied = model.config.tie_word_embeddings
    head = "model.embed_tokens.weight" if tied else "lm_head.weight"
    with torch.no_grad():
        for name, param in model.named_parameters():
            kind = ggml_type_for(GGUF_TYPES[gtype], tuple(param.shape), name == head)
            if kind != GGMLQuantizationType.F32:
                stored = quantize(param.detach().numpy(), kind)
                param.copy_(torch.from_numpy(dequantize(stored, kind).reshape(param.shape)))
    return model


def reader(path: Path):
    from gguf import GGUFReader

    return GGUFReader(path)


def field(gguf, key: str):
    return gguf.fields[key].contents()


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """arch -> (base folder, adapter folder) with a random all-linear adapter that moves the logits."""
    cache = {}

    def get(arch: str):
        if arch not in cache:
            root = tmp_path_factory.mktemp(f"gguf_{arch}")
            base = tiny.save_model(arch, root / "base")
            cache[arch] = base, make_our_adapter(base, root / "adapter", target_modules="all-linear")
        return cache[arch]

    return get


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("gtype", TYPES)
def test_every_type_loads_back_and_matches_the_merged_model(adapters, tmp_path, arch, gtype):
    _, adapter = adapters(arch)
    out = tmp_path / "merged"
    result = merge(adapter, out, "--gguf", gtype)
    assert result.exit_code == 0, result.output
    path = out / f"merged-{gtype}.gguf"
    assert path.is_file() and (out / "model.safetensors").is_file()
    assert f"GGUF saved to {path}" in result.output
    expected, actual = logits(rounded_like_gguf(load(out), gtype)), logits(gguf_model(path))
    assert torch.equal(actual, expected), relative_difference(actual, expected)


@pytest.mark.parametrize("arch", ["llama_tied", "mistral"])
def test_tied_llama_and_mistral(adapters, tmp_path, arch):
    _, adapter = adapters(arch)
    out = tmp_path / "m"
    assert merge(adapter, out, "--gguf", "f32").exit_code == 0
    path = out / "m-f32.gguf"
    names = {t.name for t in reader(path).tensors}
    assert ("output.weight" in names) == (arch == "mistral")  # a tied head is the embedding: no output tensor
    assert field(reader(path), "general.architecture") == "llama"
    assert torch.equal(logits(gguf_model(path)), logits(load(out)))


def test_layout_keys_and_types(adapters, tmp_path):
    """What llama.cpp reads: names, F32 norms and biases, the q/k rows permuted for llama, keys and the head at Q8_0
    in a q4_0 file."""
    base, adapter = adapters("qwen2")
    out = tmp_path / "q"
    assert merge(adapter, out, "--gguf", "q4_0").exit_code == 0
    gguf = reader(out / "q-q4_0.gguf")
    types = {t.name: t.tensor_type.name for t in gguf.tensors}
    assert types["blk.0.attn_q.bias"] == "F32" and types["blk.1.ffn_norm.weight"] == "F32"
    assert types["blk.0.attn_q.weight"] == "Q4_0" and types["output.weight"] == "Q8_0"
    config = json.loads((base / "config.json").read_text())
    assert field(gguf, "general.architecture") == "qwen2" and field(gguf, "general.file_type") == 2
    assert field(gguf, "qwen2.block_count") == config["num_hidden_layers"]
    assert field(gguf, "qwen2.context_length") == config["max_position_embeddings"]
    assert field(gguf, "qwen2.attention.head_count_kv") == config["num_key_value_heads"]
    assert field(gguf, "general.name") == "q"
    assert "qwen2.rope.dimension_count" not in gguf.fields


def test_llama_q_and_k_rows_are_permuted_per_head(adapters, tmp_path):
    base, adapter = adapters("llama")
    out = tmp_path / "p"
    assert merge(adapter, out, "--gguf", "f32").exit_code == 0
    gguf = reader(out / "p-f32.gguf")
    stored = {t.name: torch.from_numpy(t.data.copy()) for t in gguf.tensors}
    merged = load(out).state_dict()
    k = merged["model.layers.0.self_attn.k_proj.weight"]  # 2 kv heads of 8 rows: halves interleaved per head
    heads, half = 2, k.shape[0] // 4
    order = [h * 2 * half + i + part * half for h in range(heads) for i in range(half) for part in (0, 1)]
    assert torch.equal(stored["blk.0.attn_k.weight"], k[order])
    assert torch.equal(stored["blk.0.attn_v.weight"], merged["model.layers.0.self_attn.v_proj.weight"])


@pytest.mark.parametrize("arch,pre", [("llama", "gpt-2"), ("qwen2", "qwen2")])
def test_tokenizer_metadata_and_round_trip(adapters, tmp_path, arch, pre):
    """transformers 5 gives a qwen2 folder Qwen2's own pre-tokenizer: the file says so, and tokenizes the same."""
    base, adapter = adapters(arch)
    out = tmp_path / "t"
    assert merge(adapter, out, "--gguf", "q8_0").exit_code == 0
    path = out / "t-q8_0.gguf"
    gguf = reader(path)
    assert field(gguf, "tokenizer.ggml.model") == "gpt2" and field(gguf, "tokenizer.ggml.pre") == pre
    original = transformers.AutoTokenizer.from_pretrained(base)
    assert field(gguf, "tokenizer.ggml.eos_token_id") == original.eos_token_id
    assert field(gguf, "tokenizer.ggml.add_bos_token") is False
    assert field(gguf, "tokenizer.chat_template") == tiny.CHAT_TEMPLATE
    assert len(field(gguf, "tokenizer.ggml.tokens")) == tiny.VOCAB
    loaded = gguf_tokenizer(path)
    for text in ["Quillhaven is a small harbour town. 1847!", "<|im_start|>user\nhi 123<|im_end|>\n", CHECK_TEXT]:
        assert loaded(text)["input_ids"] == original(text)["input_ids"], text


def test_gguf_only_writes_just_the_gguf_and_modelfile(adapters, tmp_path):
    _, adapter = adapters("llama")
    streamed, in_memory, full = tmp_path / "s", tmp_path / "i", tmp_path / "full"
    assert merge(adapter, full, "--gguf", "q8_0").exit_code == 0
    result = merge(adapter, streamed, "--gguf", "q8_0", "--gguf-only", "--ollama")
    assert result.exit_code == 0, result.output
    assert "merged model saved" not in result.output and "ollama create s-q8_0 -f" in result.output
    assert sorted(p.name for p in streamed.iterdir()) == ["Modelfile", "s-q8_0.gguf"]
    result = merge(adapter, in_memory, "--gguf", "q8_0", "--gguf-only", "--verify-logits")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in in_memory.iterdir()) == ["i-q8_0.gguf"]
    # the same tensors whichever way the merge ran
    data = [{t.name: t.data.tobytes() for t in reader(p).tensors}
            for p in (full / "full-q8_0.gguf", streamed / "s-q8_0.gguf", in_memory / "i-q8_0.gguf")]
    assert data[0] == data[1] == data[2]


def test_modelfile_has_the_chatml_template_and_stops(adapters, tmp_path):
    _, adapter = adapters("qwen2")
    out = tmp_path / "o"
    assert merge(adapter, out, "--gguf", "q4_0", "--ollama").exit_code == 0
    text = (out / "Modelfile").read_text()
    assert text.startswith("FROM ./o-q4_0.gguf\n")
    assert 'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n' in text
    assert 'PARAMETER stop "<|im_end|>"' in text and "SYSTEM" not in text


LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] != 'system' %}<|start_header_id|>system<|end_header_id|>\n\n"
    "Be kind.<|eot_id|>{% endif %}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def test_modelfile_llama3_template_with_its_default_system_message(tmp_path):
    from lora_cli.export.modelfile import write_modelfile

    tokenizer = tiny.make_tokenizer()
    tokenizer.chat_template = LLAMA3_TEMPLATE
    result = write_modelfile(tmp_path, "x.gguf", tokenizer, add_bos=True)
    text = (tmp_path / "Modelfile").read_text()
    assert result.format == "Llama 3" and result.warning is None
    assert "<|start_header_id|>{{ .Role }}<|end_header_id|>" in text and 'SYSTEM """Be kind."""' in text
    assert 'PARAMETER stop "<|eot_id|>"' in text


def test_unknown_chat_template_is_a_warning_naming_what_to_write(adapters, tmp_path):
    base, adapter = adapters("llama")
    other = tmp_path / "base"
    other.mkdir()
    for item in base.iterdir():
        (other / item.name).write_bytes(item.read_bytes())
    tokenizer_config = json.loads((other / "tokenizer_config.json").read_text())
    tokenizer_config["chat_template"] = "{% for m in messages %}### {{ m['content'] }}\n{% endfor %}### "
    (other / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    (other / "chat_template.jinja").unlink(missing_ok=True)
    result = merge(adapter, tmp_path / "u", "--base", other, "--gguf", "f16", "--ollama")
    assert result.exit_code == 0, result.output
    assert "warning:" in result.output and "TEMPLATE" in result.output and "template.md" in result.output
    assert "TEMPLATE" not in (tmp_path / "u" / "Modelfile").read_text()


def test_llama3_rope_scaling_writes_rope_freqs(tmp_path):
    """Llama 3.1's rope scaling travels as the rope_freqs tensor (llama.cpp's formula, computed here by hand)."""
    config = tiny.ARCH_CONFIGS["llama"]()
    config.head_dim = 16
    config.rope_parameters = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    from lora_cli.export.gguf_arch import rope_factors

    factors = rope_factors(config).tolist()
    expected = []
    for i in range(0, 16, 2):
        wavelen = 2 * math.pi * 500000.0 ** (i / 16)
        if wavelen < 64 / 4.0:
            expected.append(1.0)
        elif wavelen > 64 / 1.0:
            expected.append(8.0)
        else:
            smooth = (64 / wavelen - 1.0) / (4.0 - 1.0)
            expected.append(1 / ((1 - smooth) / 8.0 + smooth))
    assert factors == pytest.approx(expected, rel=1e-5)
    assert 1.0 in expected and 8.0 in expected and any(1 < f < 8 for f in expected)  # all three regimes


# --- refused before anything is written ------------------------------------------------------------------------


def test_k_quants_and_unknown_types_exit_2_with_the_llama_quantize_command(adapters, tmp_path):
    _, adapter = adapters("llama")
    out = tmp_path / "k"
    result = merge(adapter, out, "--gguf", "q4_k_m")
    assert_error(result, "f32, f16, bf16, q8_0, q4_0", "llama-quantize", "--gguf f16", "Q4_K_M")
    result = merge(adapter, out, "--gguf", "int3")
    assert_error(result, "'int3' is not a type", "f32, f16, bf16, q8_0, q4_0")
    assert_error(merge(adapter, out, "--ollama"), "--ollama goes with --gguf TYPE")
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == []


def test_unsupported_architecture_exits_2_naming_the_supported(tiny_model_dir, tmp_path):
    adapter = make_our_adapter(tiny_model_dir("gpt2"), tmp_path / "adapter")
    out = tmp_path / "g"
    assert_error(merge(adapter, out, "--gguf", "q8_0"), "'gpt2' model", "llama, mistral, qwen2",
                 "convert_hf_to_gguf.py")
    assert not out.exists()


def test_unrecognised_pre_tokenizer_exits_2_by_name(adapters, tmp_path):
    base, adapter = adapters("llama")
    other = tmp_path / "base"
    other.mkdir()
    for item in base.iterdir():
        (other / item.name).write_bytes(item.read_bytes())
    spec = json.loads((other / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": r"\s+|\d"}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    (other / "tokenizer.json").write_text(json.dumps(spec))
    out = tmp_path / "x"
    assert_error(merge(adapter, out, "--base", other, "--gguf", "f16"), "pre-tokenizer", r"Split(\s+|\d)",
                 "gpt-2, llama-bpe, qwen2, smollm", "nothing was written")
    assert not out.exists()


# A real lora-merge --gguf that stops after writing its first tensor into the GGUF, until killed.
SLOW_EXPORT = """
import sys, time
import lora_cli.export.gguf_types as gguf_types
from lora_cli.cli import merge_app

convert, calls = gguf_types.convert, []
def convert_then_wait(*args):
    calls.append(1)
    if len(calls) == 3:
        print("CONVERTING", flush=True)
        time.sleep(120)
    return convert(*args)
gguf_types.convert = convert_then_wait
sys.argv = ["lora-merge", *sys.argv[1:]]
merge_app()
"""


@pytest.mark.parametrize("only", [False, True], ids=["with the folder", "gguf only"])
def test_sigkill_mid_export_leaves_no_gguf_and_the_next_run_succeeds(adapters, tmp_path, only):
    _, adapter = adapters("llama")
    work, out = tmp_path / "work", tmp_path / "work" / "merged"
    work.mkdir()
    flags = ["--gguf", "q8_0", *(["--gguf-only"] if only else [])]
    repo = str(Path(__file__).parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-c", SLOW_EXPORT, str(adapter), str(out), *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        for line in proc.stdout:
            if line.startswith("CONVERTING"):
                break
        else:
            raise AssertionError(f"the export ended before converting (exit {proc.wait()})")
        partial = [p for p in work.rglob("*") if ".gguf" in p.name]
        assert len(partial) == 1 and partial[0].stat().st_size > 0  # it really was mid-write ...
        assert not partial[0].name.endswith(".gguf")  # ... under a temporary name
    finally:
        proc.kill()
        proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists() and not list(work.rglob("*.gguf"))  # nothing that looks like a finished GGUF

    result = merge(adapter, out, *flags)
    assert result.exit_code == 0, result.output
    assert "note: removed" in result.output
    assert sorted(p.name for p in work.iterdir()) == ["merged"]
    assert (out / "merged-q8_0.gguf").is_file()


def _sentencepiece_base(folder: Path) -> Path:
    """A tiny llama whose tokenizer is SentencePiece-style BPE (▁ for spaces, byte fallback) with its pieces in a
    tokenizer.model, as Llama 2 and Mistral ship them."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers.convert_slow_tokenizer import import_protobuf

    backend = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    backend.train_from_iterator(tiny.CORPUS * 20, trainers.BpeTrainer(vocab_size=tiny.VOCAB, special_tokens=specials,
                                                                       show_progress=False))
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                                     unk_token="<unk>")
    model = tiny.make_model("llama")
    model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id = 1, 2, None
    model.generation_config.pad_token_id = None
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    proto = import_protobuf().ModelProto()
    proto.trainer_spec.model_type = 2  # BPE
    by_id = {i: token for token, i in backend.get_vocab().items()}
    for i in range(len(by_id)):
        piece = proto.pieces.add()
        piece.piece, piece.score = by_id[i], -float(i)
        piece.type = 2 if i == 0 else 3 if i in (1, 2) else 6 if by_id[i].startswith("<0x") else 1
    (folder / "tokenizer.model").write_bytes(proto.SerializeToString())
    return folder


def test_sentencepiece_vocabulary_from_tokenizer_model(tmp_path):
    base = _sentencepiece_base(tmp_path / "base")
    adapter = make_our_adapter(base, tmp_path / "adapter")
    out = tmp_path / "spm"
    result = merge(adapter, out, "--gguf", "f32")
    assert result.exit_code == 0, result.output
    gguf = reader(out / "spm-f32.gguf")
    from transformers.convert_slow_tokenizer import import_protobuf

    proto = import_protobuf().ModelProto()
    proto.ParseFromString((base / "tokenizer.model").read_bytes())
    assert field(gguf, "tokenizer.ggml.model") == "llama" and field(gguf, "tokenizer.ggml.pre") == "default"
    assert field(gguf, "tokenizer.ggml.tokens") == [p.piece for p in proto.pieces]
    assert field(gguf, "tokenizer.ggml.scores") == [p.score for p in proto.pieces]
    assert field(gguf, "tokenizer.ggml.token_type") == [p.type for p in proto.pieces]
    assert field(gguf, "tokenizer.ggml.bos_token_id") == 1 and field(gguf, "tokenizer.ggml.eos_token_id") == 2
    assert torch.equal(logits(gguf_model(out / "spm-f32.gguf")), logits(load(out)))
    original, loaded = transformers.AutoTokenizer.from_pretrained(base), gguf_tokenizer(out / "spm-f32.gguf")
    for text in ["Quillhaven is a small harbour town.", "The quick brown fox jumps over the lazy dog. 123"]:
        assert loaded(text)["input_ids"] == original(text)["input_ids"], text


def test_a_weight_beyond_float16_is_refused_for_f16_with_nothing_written(tmp_path):
    model = tiny.make_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = 1e5  # fine in the merged fp32 folder, inf in float16
    base = tmp_path / "base"
    model.save_pretrained(base)
    tiny.make_tokenizer().save_pretrained(base)
    adapter = make_our_adapter(base, tmp_path / "adapter")
    for flags in (["--gguf", "f16"], ["--gguf", "f16", "--gguf-only"]):
        assert_error(merge(adapter, tmp_path / "o", *flags), "model.layers.1.mlp.down_proj.weight",
                     "float16's range", "--gguf bf16 or f32")
        assert not (tmp_path / "o").exists()
    assert merge(adapter, tmp_path / "o", "--gguf", "bf16").exit_code == 0


def test_the_template_the_adapter_was_trained_with_goes_into_the_gguf(adapters, tmp_path):
    """data.chat_template saves its template with the adapter; the merge gives it to the tokenizer, so the GGUF and
    the Modelfile carry it, not the base model's."""
    import shutil

    from lora_cli.chat_templates import CHATML, TEMPLATE_FILE_NAME

    _, trained = adapters("llama")
    adapter = tmp_path / "adapter"
    shutil.copytree(trained, adapter)
    (adapter / TEMPLATE_FILE_NAME).write_text(CHATML)
    assert CHATML != tiny.CHAT_TEMPLATE
    out = tmp_path / "c"
    assert merge(adapter, out, "--gguf", "q8_0", "--gguf-only", "--ollama").exit_code == 0
    assert field(reader(out / "c-q8_0.gguf"), "tokenizer.chat_template") == CHATML
    assert "<|im_start|>{{ .Role }}" in (out / "Modelfile").read_text()
