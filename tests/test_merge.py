"""lora-merge: merged folders reload cleanly and reproduce base + adapter (ours and PEFT's); bad input fails cleanly.

Adapters are made directly with the library (apply_lora + randomised lora_B + save_adapter) and with PEFT, which
is only a test oracle here.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open

import tiny
from helpers import (
    VARIANTS,
    assert_close,
    assert_error,
    base_plus_adapter,
    load,
    logits,
    make_our_adapter,
    make_peft_adapter,
    merge,
)
from lora_cli.inject import LoraSettings, apply_lora, merge_lora
from lora_cli.layout import CONFIG_NAME, WEIGHTS_NAME
from lora_cli.lora import LoraLinear
from lora_cli.merge import MERGED_ADAPTER_CONFIG_NAME, merge_adapter, save_merged
from lora_cli.merge import stream as merge_stream
from lora_cli.models import load_tokenizer

# --- helpers -------------------------------------------------------------------------------------------------


def assert_clean_reload(folder: Path, dtype=torch.float32):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


# --- merged = base + adapter ---------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("maker", ["ours", "peft"])
def test_merged_folder_reloads_and_equals_base_plus_adapter(tiny_model_dir, tmp_path, maker, arch, variant):
    base_dir = tiny_model_dir(arch)
    if maker == "ours":
        adapter = make_our_adapter(base_dir, tmp_path / "adapter", variant)
        peft_merged = None
    else:
        adapter, peft_merged = make_peft_adapter(base_dir, tmp_path / "adapter", arch, variant)
    out = tmp_path / "merged"

    result = merge(adapter, out)  # base from the adapter's base_model_name_or_path

    assert result.exit_code == 0, result.output
    assert "shard by shard" in result.output and "merged weights reproduce W x + scaling B A x" in result.output
    merged = assert_clean_reload(out)
    assert merged.dtype == torch.float32  # the tiny base is stored in fp32
    expected = logits(base_plus_adapter(base_dir, adapter))
    assert (expected - logits(load(base_dir))).abs().max() > 1e-2  # the adapter really changes the output
    assert_close(logits(merged), expected, 1e-4)
    # the copy of the adapter config must not be named adapter_config.json (transformers would load it as PEFT)
    assert not (out / CONFIG_NAME).exists()
    assert json.loads((out / MERGED_ADAPTER_CONFIG_NAME).read_text())["use_dora"] == (variant == "dora")
    assert (out / "generation_config.json").is_file() and (out / "tokenizer_config.json").is_file()
    assert load_tokenizer(str(out)).chat_template == tiny.CHAT_TEMPLATE
    if peft_merged is not None:  # same weights and logits as PEFT's own merge_and_unload()
        ours_state = merged.state_dict()
        for name, tensor in peft_merged.state_dict().items():
            assert_close(ours_state[name], tensor, 1e-5)
        assert_close(logits(merged), logits(peft_merged), 1e-4)


def test_all_linear_adapter_merges(tiny_model_dir, tmp_path):
    base_dir = tiny_model_dir("llama")
    adapter = make_our_adapter(base_dir, tmp_path / "adapter", "dora", target_modules="all-linear")
    result = merge(adapter, tmp_path / "merged")
    assert result.exit_code == 0, result.output
    assert_close(logits(assert_clean_reload(tmp_path / "merged")), logits(base_plus_adapter(base_dir, adapter)), 1e-4)


def test_float16_output(tiny_model_dir, tmp_path):
    base_dir = tiny_model_dir("llama")
    adapter = make_our_adapter(base_dir, tmp_path / "adapter", "dora")
    out = tmp_path / "merged"
    result = merge(adapter, out, "--dtype", "float16", "--verify-logits")
    assert result.exit_code == 0, result.output
    assert "merged (float16 weights) vs base + adapter" in result.output and "shard by shard" not in result.output
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}
    assert dtypes == {torch.float16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"
    merged = assert_clean_reload(out, dtype=torch.float32)  # fp16 weights, fp32 arithmetic
    assert_close(logits(merged), logits(base_plus_adapter(base_dir, adapter)), 1e-2)


def test_default_dtype_is_the_base_stored_dtype(tmp_path):
    base_dir = tmp_path / "base_bf16"
    model = tiny.make_model("llama").to(torch.bfloat16)
    model.save_pretrained(base_dir)
    tiny.make_tokenizer().save_pretrained(base_dir)
    adapter = make_our_adapter(base_dir, tmp_path / "adapter")
    result = merge(adapter, tmp_path / "merged")
    assert result.exit_code == 0, result.output
    with safe_open(str(tmp_path / "merged" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}


def test_small_shards_write_an_index_and_reload(tiny_model_dir, tmp_path):
    base_dir = tiny_model_dir("llama")
    adapter = make_our_adapter(base_dir, tmp_path / "adapter")
    out = tmp_path / "merged"
    result = merge(adapter, out, "--max-shard-size", "30KB", "--no-verify")  # the old flag name still works
    assert result.exit_code == 0, result.output
    assert "shard by shard" in result.output and "logit" not in result.output
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    assert_close(logits(assert_clean_reload(out)), logits(base_plus_adapter(base_dir, adapter)), 1e-4)


def test_tied_embeddings_stay_tied(tiny_model_dir, tmp_path):
    base_dir = tmp_path / "tied"
    tiny.save_model("llama_tied", base_dir)
    adapter = make_our_adapter(base_dir, tmp_path / "adapter", target_modules="all-linear")
    result = merge(adapter, tmp_path / "merged")
    assert result.exit_code == 0, result.output
    merged = assert_clean_reload(tmp_path / "merged")
    assert merged.config.tie_word_embeddings
    assert merged.get_output_embeddings().weight is merged.get_input_embeddings().weight


def test_save_merged_unties_a_head_that_differs(tmp_path):
    """A config saying "tied" with a head that differs would make transformers re-tie it on load, losing it."""
    model = tiny.make_model("llama_tied")
    head = model.get_output_embeddings()
    head.weight = torch.nn.Parameter(head.weight.detach().clone() + 0.5)
    save_merged(model, tiny.make_tokenizer(), tmp_path / "out")
    reloaded = assert_clean_reload(tmp_path / "out")
    assert not reloaded.config.tie_word_embeddings
    assert torch.equal(reloaded.get_output_embeddings().weight, head.weight)
    assert torch.equal(reloaded.get_input_embeddings().weight, model.get_input_embeddings().weight)


def test_save_merged_refuses_unmerged_model(tmp_path):
    from lora_cli.errors import UserError

    model = tiny.make_model("llama")
    apply_lora(model, LoraSettings(r=2))
    with pytest.raises(UserError, match="still has LoRA layers"):
        save_merged(model, tiny.make_tokenizer(), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    save_merged(merge_lora(model), tiny.make_tokenizer(), tmp_path / "out", dtype=torch.bfloat16,
                adapter_config={"r": 2})
    assert json.loads((tmp_path / "out" / MERGED_ADAPTER_CONFIG_NAME).read_text()) == {"r": 2}
    assert assert_clean_reload(tmp_path / "out", dtype=None).dtype == torch.bfloat16


def test_library_result_reports_checks(tiny_model_dir, tmp_path):
    base_dir = tiny_model_dir("gpt2")
    adapter = make_our_adapter(base_dir, tmp_path / "adapter", "dora")
    messages = []
    result = merge_adapter(adapter, tmp_path / "merged", base=str(base_dir), dtype="bf16", log=messages.append,
                           verify_logits=True)
    assert result.dtype == torch.bfloat16 and result.adapter_effect > 1e-2 and not result.streamed
    assert [c.ok for c in result.checks] == [True, True]
    assert result.checks[0].max_diff < 1e-4 < result.checks[1].max_diff  # bf16 rounding is visible, and tolerated
    assert any("verify" in m for m in messages)


# --- refusals ------------------------------------------------------------------------------------------------


def test_existing_output_refused_without_overwrite(tiny_model_dir, tmp_path):
    adapter = make_our_adapter(tiny_model_dir("llama"), tmp_path / "adapter")
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("precious")

    result = merge(adapter, out)

    assert_error(result, "already exists", "--overwrite")
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"
    result = merge(adapter, out, "--overwrite")
    assert result.exit_code == 0, result.output
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()


@pytest.mark.parametrize("path", ["streamed", "in memory"])
def test_verify_failure_writes_nothing(tiny_model_dir, tmp_path, monkeypatch, path):
    adapter = make_our_adapter(tiny_model_dir("llama"), tmp_path / "adapter")
    out = tmp_path / "out" / "merged"
    # A broken merge: the update is silently dropped (W stays W).
    if path == "streamed":  # caught by the per-tensor check
        monkeypatch.setattr(merge_stream, "merged_weight", lambda weight, *args, **kwargs: weight.float())
        result = merge(adapter, out)
        assert_error(result, "Verification failed for model.layers.0.self_attn.q_proj.weight", "nothing was written")
    else:  # caught by the logits check
        monkeypatch.setattr(LoraLinear, "merged_weight", lambda self: self.weight.detach().clone())
        result = merge(adapter, out, "--verify-logits")
        assert_error(result, "Verification failed", "nothing was written", "without --verify-logits")
    assert not out.exists() and not out.parent.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temp folders left behind


def _corrupt_weights(adapter: Path) -> None:
    (adapter / WEIGHTS_NAME).write_bytes(b"\x00garbage, not safetensors")


def _drop_base_name(adapter: Path) -> None:
    config = json.loads((adapter / CONFIG_NAME).read_text())
    config["base_model_name_or_path"] = None
    (adapter / CONFIG_NAME).write_text(json.dumps(config))


@pytest.mark.parametrize(
    "case",
    ["missing-adapter", "not-an-adapter", "corrupt-safetensors", "llama-adapter-on-gpt2", "no-base-name",
     "base-missing", "output-under-a-file", "output-is-adapter", "bad-dtype", "bad-shard-size", "huge-shard-size",
     "rank-pattern-bad-regex", "alpha-pattern-bad-regex", "float8-tensor"],
)
def test_bad_input_exits_2(tiny_model_dir, tmp_path, case):
    adapter = make_our_adapter(tiny_model_dir("llama"), tmp_path / "adapter")
    out, extra = tmp_path / "merged", []
    expected: tuple[str, ...]
    if case == "missing-adapter":
        adapter, expected = tmp_path / "nope", ("does not exist",)
    elif case == "not-an-adapter":
        adapter, expected = tiny_model_dir("llama"), ("has no adapter_config.json",)
    elif case == "corrupt-safetensors":
        _corrupt_weights(adapter)
        expected = ("not a readable safetensors file",)
    elif case == "llama-adapter-on-gpt2":
        extra, expected = ["--base", str(tiny_model_dir("gpt2"))], ("does not fit this base model",)
    elif case == "no-base-name":
        _drop_base_name(adapter)
        expected = ("base_model_name_or_path", "--base")
    elif case == "base-missing":
        extra, expected = ["--base", str(tmp_path / "no-model")], ("does not exist",)
    elif case == "output-under-a-file":
        (tmp_path / "file.txt").write_text("x")
        out, expected = tmp_path / "file.txt" / "merged", ("is a file",)
    elif case == "output-is-adapter":
        out, extra, expected = adapter, ["--overwrite"], ("which the merge reads from",)
    elif case == "bad-dtype":
        extra, expected = ["--dtype", "float8"], ("Unknown dtype", "bfloat16")
    elif case == "huge-shard-size":
        extra, expected = ["--max-shard-size", "9" * 400 + "GB"], ("--max-shard-size", "larger than any disk")
    elif case.endswith("-pattern-bad-regex"):
        field = case.split("-")[0] + "_pattern"
        config = json.loads((adapter / CONFIG_NAME).read_text())
        config[field] = {"(": 4}
        (adapter / CONFIG_NAME).write_text(json.dumps(config))
        expected = (str(adapter / CONFIG_NAME), f'{field} key "(" is not a valid regular expression')
    elif case == "float8-tensor":
        from safetensors.torch import load_file, save_file

        tensors = load_file(adapter / WEIGHTS_NAME)
        key = next(k for k in tensors if "lora_A" in k)
        tensors[key] = tensors[key].to(torch.float8_e4m3fn)
        save_file(tensors, adapter / WEIGHTS_NAME)
        expected = (str(adapter / WEIGHTS_NAME), f"{key} (float8_e4m3fn)", "not float32, float16 or bfloat16")
    else:
        extra, expected = ["--max-shard-size", "two gigs"], ("--max-shard-size",)
    before = sorted(p.name for p in tmp_path.iterdir())

    result = merge(adapter, out, *extra)

    assert_error(result, *expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written anywhere
    if case == "output-is-adapter":
        assert (adapter / WEIGHTS_NAME).is_file()


def test_console_script_entry_point():
    script = Path(sys.executable).parent / "lora-merge"
    exe = [str(script)] if script.exists() else [shutil.which("lora-merge") or "lora-merge"]
    proc = subprocess.run(exe + ["--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "ADAPTER_DIR" in proc.stdout and "--max-shard-size" in proc.stdout and "--verify-logits" in proc.stdout


def test_fp16_overflow_is_refused_even_without_verify(tiny_model_dir, tmp_path):
    base_dir = tmp_path / "big"
    model = tiny.make_model("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = 1e6  # fine in fp32, inf in fp16
    model.save_pretrained(base_dir)
    tiny.make_tokenizer().save_pretrained(base_dir)
    adapter = make_our_adapter(base_dir, tmp_path / "adapter")
    for flag in ("--verify", "--no-verify"):
        result = merge(adapter, tmp_path / "merged", "--dtype", "float16", flag)
        assert_error(result, "bfloat16")
        assert not (tmp_path / "merged").exists()


def test_a_quantized_base_is_refused_before_loading_and_names_base(tiny_model_dir, tmp_path, monkeypatch):
    """A pre-quantized base (config.json with quantization_config, as save_pretrained writes after a bitsandbytes
    load) cannot be merged into: refused before the model loads, advising --base with the unquantized model."""
    base_dir = tmp_path / "base_q4"
    shutil.copytree(tiny_model_dir("llama"), base_dir)
    config = json.loads((base_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
                                     "bnb_4bit_quant_type": "nf4"}
    (base_dir / "config.json").write_text(json.dumps(config))
    adapter = make_our_adapter(tiny_model_dir("llama"), tmp_path / "adapter")

    def refuse(*args, **kwargs):
        raise AssertionError("a quantized base must be refused before the model loads")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    result = merge(adapter, tmp_path / "merged", "--base", base_dir)

    assert_error(result, "is quantized (bitsandbytes 4-bit", f"lora-merge {adapter} {tmp_path / 'merged'} --base "
                 "UNQUANTIZED_BASE")
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize("verify", [False, True], ids=["streamed", "in memory"])
def test_default_dtype_is_the_stored_weights_when_config_json_does_not_say(tmp_path, verify):
    base_dir = tmp_path / "base_bf16_no_dtype"
    tiny.make_model("llama").to(torch.bfloat16).save_pretrained(base_dir)
    tiny.make_tokenizer().save_pretrained(base_dir)
    config = json.loads((base_dir / "config.json").read_text())
    config.pop("dtype", None), config.pop("torch_dtype", None)
    (base_dir / "config.json").write_text(json.dumps(config))
    adapter = make_our_adapter(base_dir, tmp_path / "adapter")

    result = merge(adapter, tmp_path / "merged", *(["--verify-logits"] if verify else []))

    assert result.exit_code == 0, result.output
    assert "(bfloat16)" in result.output
    with safe_open(str(tmp_path / "merged" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["dtype"] == "bfloat16"
