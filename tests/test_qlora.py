"""QLoRA: a 4-bit NF4 base (bitsandbytes, which runs its NF4 path on the CPU too) under our own LoRA layers.

The reference for every 4-bit number is the fp32 model whose linear weights are replaced by the dequantized 4-bit
ones: the same function computed without bitsandbytes, so loss, logits and LoRA gradients must agree to fp32
rounding. How far the 4-bit model is from the original fp32 model is a property of NF4, measured and stated below.

The models are the tiny test architectures widened to hidden size 64: bitsandbytes' CPU kernels quantize rows
shorter than its 64-value block badly (measured on the hidden-32 models: 13-42% relative error for in_features 32,
against 9% for 64 and up, as for Gaussian data). Real models have rows of 576 values and more.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import transformers
from torch import nn
from typer.testing import CliRunner

from helpers import IDS, save_wide
from lora_cli.adapter import load_adapter, save_adapter
from lora_cli.errors import UserError
from lora_cli.inject import LoraSettings, apply_lora, lora_layers, merge_lora, resolve_target_paths
from lora_cli.lora import LoraLinear, is_4bit_linear
from lora_cli.models import load_base_model

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as bnb_functional  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    cache = {}

    def get(arch: str = "llama", init_range: float | None = None) -> Path:
        if (arch, init_range) not in cache:
            cache[arch, init_range] = save_wide(arch, tmp_path_factory.mktemp(f"wide_{arch}"), init_range)
        return cache[arch, init_range]

    return get


def load_4bit(folder) -> nn.Module:
    return load_base_model(str(folder), load_in_4bit=True)


def four_bit_layers(model) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if type(m).__name__ == "Linear4bit"}


def dequantized_copy(folder, quantized) -> nn.Module:
    """The fp32 model with every linear weight replaced by the dequantized 4-bit one (Conv1D stores W^T)."""
    model = load_base_model(str(folder))
    with torch.no_grad():
        for name, layer in four_bit_layers(quantized).items():
            weight = bnb_functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
            target = model.get_submodule(name)
            target.weight.copy_(weight if isinstance(target, nn.Linear) else weight.t())
    return model


def randomise_b(model, seed: int = 0) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "lora_magnitude" in name:
                param.add_(torch.randn_like(param) * 0.1)


@torch.no_grad()
def logits(model) -> torch.Tensor:
    return model(IDS).logits.float()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


# --- loading -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_decoder_linears_are_nf4_double_quantized_and_the_rest_is_not(model_dir, arch):
    model = load_4bit(model_dir(arch))
    layers = four_bit_layers(model)
    # Every decoder projection, GPT-2's Conv1D included (transformers turns them into Linear4bit).
    assert len(layers) == {"llama": 14, "gpt2": 8}[arch]
    for layer in layers.values():
        state = layer.weight.quant_state
        assert (state.quant_type, state.nested, state.blocksize) == ("nf4", True, 64)
        assert layer.compute_dtype == torch.float32  # CPU trains in fp32
        assert layer.weight.dtype == torch.uint8 and not layer.weight.requires_grad
    head = model.get_output_embeddings()
    assert type(head) is nn.Linear and head.weight.dtype == torch.float32  # the output head is never quantized
    assert model.get_input_embeddings().weight.dtype == torch.float32
    assert not any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_4bit_logits_equal_the_dequantized_model_and_are_near_fp32(model_dir, arch):
    folder = model_dir(arch)
    quantized = load_4bit(folder)
    reference = dequantized_copy(folder, quantized)
    # The same function: only fp32 rounding in a different order.
    assert rel(logits(quantized), logits(reference)) < 1e-5
    # NF4 itself moves each weight by ~9% of its matrix's RMS: relative Frobenius error 0.089-0.095 measured on every
    # layer of these models, 0.093 on SmolLM2-135M, 0.092 on Gaussian data.
    fp32 = load_base_model(str(folder))
    for name, layer in four_bit_layers(quantized).items():
        original = fp32.get_submodule(name)
        weight = original.weight if isinstance(original, nn.Linear) else original.weight.t()  # Conv1D: W^T
        nf4 = bnb_functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
        assert 0.07 < ((nf4 - weight).norm() / weight.norm()).item() < 0.11, name
    # Through two random layers that moves the logits by 9-10% RMS of their spread (measured: llama 0.103, gpt2
    # 0.086, qwen2 0.104); bound 0.2. A transposed, unquantized or badly quantized weight lands far outside.
    expected = logits(fp32)
    spread = ((logits(quantized) - expected).pow(2).mean().sqrt() / expected.std()).item()
    assert 0.03 < spread < 0.2, spread


@pytest.mark.parametrize("capability,compute",
                         [((7, 5), torch.float16), ((8, 0), torch.bfloat16), (None, torch.float32)])
def test_the_4bit_layers_compute_in_the_training_precision_on_its_device(capability, compute):
    from lora_cli.precision import base_quantization, choose_precision
    from lora_cli.quantization import quantization_kwargs

    precision = choose_precision("auto", capability=capability)
    assert base_quantization(True, precision) == {"load_in_4bit": True, "compute_dtype": compute,
                                                  "device": "cpu" if capability is None else "cuda"}
    assert base_quantization(False, precision) == {}
    kwargs = quantization_kwargs(compute, "cpu")
    config = kwargs["quantization_config"]
    assert (config.load_in_4bit, config.bnb_4bit_quant_type, config.bnb_4bit_use_double_quant) == (True, "nf4", True)
    assert config.bnb_4bit_compute_dtype == compute and kwargs["device_map"] == {"": "cpu"}


def test_4bit_layers_are_lora_targets_except_the_head(model_dir):
    model = load_4bit(model_dir("llama"))
    default, _ = resolve_target_paths(model, LoraSettings())
    assert [p.rsplit(".", 1)[1] for p in default] == ["q_proj", "v_proj"] * 2
    every, written = resolve_target_paths(model, LoraSettings(target_modules="all-linear"))
    assert set(every) == set(four_bit_layers(model)) and "lm_head" not in every
    assert written == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def test_an_8bit_layer_is_not_a_lora_target():
    layer = bnb.nn.Linear8bitLt(64, 64, has_fp16_weights=False)
    assert isinstance(layer, nn.Linear) and not is_4bit_linear(layer)
    with pytest.raises(TypeError):
        LoraLinear.from_base(layer, r=4, alpha=8)


# --- the LoRA layer over a 4-bit base ------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("variant", [{}, {"use_rslora": True}, {"use_dora": True}])
def test_lora_gradients_on_the_4bit_base_match_the_dequantized_reference(model_dir, arch, variant):
    folder = model_dir(arch)
    quantized = load_4bit(folder)
    reference = dequantized_copy(folder, quantized)
    settings = LoraSettings(r=4, alpha=8, target_modules="all-linear", **variant)
    for model in (quantized, reference):
        torch.manual_seed(0)
        apply_lora(model, settings)
        randomise_b(model)
    for layer in lora_layers(quantized).values():
        assert layer.quantized and layer.lora_A.weight.dtype == torch.float32  # LoRA weights stay fp32
        assert layer._fused_compute_dtype(torch.zeros(1, layer.in_features)) is None  # no W to multiply by
    assert not any(layer.quantized for layer in lora_layers(reference).values())
    losses = []
    for model in (quantized, reference):  # eval mode: the tiny configs' own dropout would differ by chance
        loss = model(IDS, labels=IDS).loss
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    grads = {n: p.grad for n, p in quantized.named_parameters() if p.requires_grad}
    expected = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    assert grads.keys() == expected.keys() and len(grads) > 0
    for name, grad in grads.items():
        assert grad.abs().max() > 0, name
        assert rel(grad, expected[name]) < 1e-5, name


def test_lora_dropout_on_a_4bit_base_trains(model_dir):
    model = load_4bit(model_dir("llama"))
    apply_lora(model, LoraSettings(r=4, alpha=8, dropout=0.5, use_dora=True, target_modules="all-linear"))
    randomise_b(model)
    model.train()
    model(IDS, labels=IDS).loss.backward()
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in model.parameters() if p.requires_grad)


def test_gradient_checkpointing_on_a_4bit_base_gives_the_same_gradients(model_dir):
    from lora_cli.train import enable_gradient_checkpointing

    grads = []
    for checkpointing in (False, True):
        model = load_4bit(model_dir("llama"))
        torch.manual_seed(0)
        apply_lora(model, LoraSettings(r=4, alpha=8, target_modules="all-linear"))
        randomise_b(model)
        if checkpointing:
            enable_gradient_checkpointing(model)
        model.train()
        model(IDS, labels=IDS).loss.backward()
        grads.append([p.grad for p in model.parameters() if p.requires_grad])
    assert all(g is not None for g in grads[1])
    for plain, checkpointed in zip(*grads):
        assert torch.allclose(plain, checkpointed, rtol=1e-5, atol=1e-7)


def test_merging_into_a_4bit_base_is_refused_and_changes_nothing(model_dir):
    model = load_4bit(model_dir("llama"))
    apply_lora(model, LoraSettings(r=4, alpha=8))
    randomise_b(model)
    before = logits(model)
    with pytest.raises(UserError, match="4-bit .*lora-merge"):
        merge_lora(model)
    assert len(lora_layers(model)) == 4 and torch.equal(logits(model), before)


# --- the adapter a QLoRA run writes ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qlora_adapter(model_dir, tmp_path_factory):
    """(base folder, adapter folder, logits of the 4-bit base + adapter) for an all-linear adapter."""
    folder = model_dir("llama")
    model = load_4bit(folder)
    settings = LoraSettings(r=4, alpha=8, target_modules="all-linear")
    report = apply_lora(model, settings)
    randomise_b(model)
    out = save_adapter(model, tmp_path_factory.mktemp("qlora_adapter"), settings, report.target_modules, str(folder))
    return folder, out, logits(model)


def test_qlora_adapter_is_the_same_format_and_loads_on_fp32_and_4bit_bases(qlora_adapter, model_dir):
    folder, adapter, quantized_logits = qlora_adapter
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == str(folder)
    assert "loraplus_lr_ratio" not in config and "quantization_config" not in config
    fp32 = load_base_model(str(folder))
    load_adapter(fp32, adapter)  # shapes from in/out features match the fp32 layers
    again = load_4bit(folder)
    load_adapter(again, adapter)  # and the 4-bit ones, whose packed weights have another shape
    assert torch.equal(logits(again), quantized_logits)
    # A wrong rank names the in_features, not the packed weight's shape.
    wrong = load_4bit(folder)
    apply_lora(wrong, LoraSettings(r=2, alpha=8, target_modules="all-linear"))
    bad = save_adapter(wrong, adapter.parent / "rank2", LoraSettings(r=4, alpha=8), "all-linear", str(folder))
    with pytest.raises(UserError, match=r"expected shape \[4, 64\], found \[2, 64\]"):
        load_adapter(load_4bit(folder), bad)


def test_qlora_adapter_round_trips_through_peft(qlora_adapter):
    peft = pytest.importorskip("peft")
    folder, adapter, quantized_logits = qlora_adapter
    # On the fp32 base: PEFT and lora-cli compute the same model.
    ours = load_base_model(str(folder))
    load_adapter(ours, adapter)
    theirs = peft.PeftModel.from_pretrained(load_base_model(str(folder)), adapter)
    assert rel(logits(theirs), logits(ours)) < 1e-5
    # On the 4-bit base (PEFT's own bitsandbytes LoRA layer): the model that was trained.
    theirs_4bit = peft.PeftModel.from_pretrained(load_4bit(folder), adapter)
    assert rel(logits(theirs_4bit), quantized_logits) < 1e-5


def test_lora_merge_of_a_qlora_adapter_merges_into_the_unquantized_base(qlora_adapter, tmp_path):
    from lora_cli.merge import merge_adapter

    folder, adapter, quantized_logits = qlora_adapter
    result = merge_adapter(adapter, tmp_path / "merged", dtype="float32")
    assert all(check.ok for check in result.checks)
    merged = load_base_model(str(tmp_path / "merged"))
    assert not four_bit_layers(merged)  # a plain fp32 model
    expected = load_base_model(str(folder))
    load_adapter(expected, adapter)
    assert rel(logits(merged), logits(expected)) < 1e-4  # lora-merge's own tolerance
    # What the merged model is not: the 4-bit model the adapter was trained on. The difference is NF4's rounding
    # of the base (the test above), not the adapter: the same bound holds.
    spread = ((logits(merged) - quantized_logits).pow(2).mean().sqrt() / quantized_logits.std()).item()
    assert spread < 0.2


# --- command line ---------------------------------------------------------------------------------------------


def test_lora_generate_load_in_4bit_runs_the_adapter_on_the_4bit_base(qlora_adapter):
    from lora_cli.cli import generate_app
    from lora_cli.generate import generate_text, load_for_generation

    folder, adapter, _ = qlora_adapter
    args = [str(folder), "--adapter", str(adapter), "--prompt", "hello", "--temperature", "0",
            "--max-new-tokens", "6", "--load-in-4bit"]
    result = CliRunner().invoke(generate_app, args)
    assert result.exit_code == 0, result.output
    assert "4-bit NF4" in result.output
    model, tokenizer = load_for_generation(str(folder), adapter, load_in_4bit=True)
    assert lora_layers(model) and all(layer.quantized for layer in lora_layers(model).values())
    expected = generate_text(model, tokenizer, "hello", temperature=0, max_new_tokens=6)
    assert expected in result.output
    merged = CliRunner().invoke(generate_app, args + ["--merge"])
    assert merged.exit_code == 2 and "--merge and --load-in-4bit" in merged.output


def test_missing_bitsandbytes_is_a_config_error_before_the_model_loads(tmp_path, model_dir, monkeypatch):
    import transformers

    from helpers import make_config
    from lora_cli.cli import generate_app, train_app

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes -> ImportError

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the missing package was reported")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_loading)
    config = make_config(tmp_path, model_dir("llama"), model={"load_in_4bit": True})
    result = CliRunner().invoke(train_app, [str(config)])
    text = " ".join(result.output.split())  # the terminal width wraps lines
    assert result.exit_code == 2, result.output
    assert "model.load_in_4bit" in text and 'pip install -e ".[qlora]"' in text and "Traceback" not in text
    result = CliRunner().invoke(generate_app, [str(model_dir("llama")), "--prompt", "hi", "--load-in-4bit"])
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and "--load-in-4bit" in text and 'pip install -e ".[qlora]"' in text


# --- training -------------------------------------------------------------------------------------------------


def test_lora_train_with_a_4bit_base_learns_and_writes_a_normal_adapter(tmp_path, model_dir):
    from helpers import losses, make_config
    from lora_cli.cli import merge_app, train_app
    from lora_cli.config import load_config

    folder = model_dir("llama", init_range=0.2)  # wide weights: LoRA can drive the loss down fast
    config = make_config(tmp_path, folder, model={"quantization_bit": 4},
                         train={"gradient_checkpointing": True, "merge_at_end": True})
    result = CliRunner().invoke(train_app, [str(config)])
    assert result.exit_code == 0, result.output
    assert "base: linear layers in 4-bit NF4 (double quantization, computing in fp32); embeddings, norms and head " \
           "in float32" in " ".join(result.output.split())  # the console says the base is 4-bit
    out = tmp_path / "out"
    curve = losses(out)
    assert curve[-1] < 0.5 * curve[0], curve
    assert load_config(out / "lora_config.yaml").model.load_in_4bit is True
    # The adapter holds fp32 tensors and reloads on the 4-bit base it was trained on.
    model = load_4bit(folder)
    load_adapter(model, out)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "lora_" in n)
    # lora-merge puts it into the unquantized fp32 base and verifies the merge there.
    merged = CliRunner().invoke(merge_app, [str(out), str(tmp_path / "merged"), "--dtype", "float32"])
    assert merged.exit_code == 0, merged.output
    assert not four_bit_layers(load_base_model(str(tmp_path / "merged")))
    # train.merge_at_end runs the same merge from the base on disk: the same unquantized merged model.
    from safetensors.torch import load_file

    at_end = load_file(out / "merged" / "model.safetensors")
    by_hand = load_file(tmp_path / "merged" / "model.safetensors")
    assert at_end.keys() == by_hand.keys() and all(torch.equal(at_end[k], by_hand[k]) for k in at_end)


def test_a_4bit_base_in_the_other_half_type_than_the_precision_is_refused_before_loading(tmp_path, model_dir,
                                                                                          monkeypatch):
    """Linear4bit returns model.dtype (float16) under bf16 autocast, whose torch.cat then raised 'Unexpected
    floating ScalarType in at::autocast::prioritize' mid-forward; refused up front, CPU and CUDA alike."""
    from helpers import make_config
    from lora_cli.cli import train_app
    from lora_cli.precision import PrecisionChoice, check_4bit_dtype

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the dtype mix-up was reported")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_loading)
    config = make_config(tmp_path, model_dir("llama"), model={"load_in_4bit": True, "dtype": "float16"},
                         train={"precision": "bf16"})
    result = CliRunner().invoke(train_app, [str(config)])
    text = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert "model.dtype=float16 with model.load_in_4bit cannot train in train.precision=bf16 (on CPU)" in text
    assert "Set model.dtype=auto (or bfloat16, or float32" in text and "Traceback" not in text
    t4 = PrecisionChoice("fp16", "cuda", "fp16 mixed precision")
    with pytest.raises(UserError, match="model.dtype=bfloat16 with model.load_in_4bit cannot train in "
                                        r"train.precision=fp16 \(on CUDA\).*or float16, or float32"):
        check_4bit_dtype("bfloat16", True, t4)
    for dtype, load_in_4bit, precision in [("float16", True, t4), ("float32", True, t4), ("auto", True, t4),
                                           ("bfloat16", False, t4),
                                           ("float16", True, PrecisionChoice("fp32", "cpu", "no GPU"))]:
        check_4bit_dtype(dtype, load_in_4bit, precision)  # matching, fp32 parts, 16-bit base, no autocast: fine


def test_a_qlora_run_on_gpt2_writes_fan_in_fan_out_true_and_the_adapter_is_the_same_model_everywhere(
        tmp_path, model_dir):
    """transformers turns GPT-2's Conv1D layers into Linear4bit (weight transposed); the adapter still describes
    the Conv1D checkpoint, as a 16-bit run's does (it wrote false, which PEFT corrected with a warning)."""
    import warnings

    peft = pytest.importorskip("peft")
    from helpers import make_config
    from lora_cli.cli import merge_app, train_app

    folder = model_dir("gpt2")
    config = make_config(tmp_path, folder, model={"load_in_4bit": True}, train={"max_steps": 2})
    result = CliRunner().invoke(train_app, [str(config)])
    assert result.exit_code == 0, result.output
    adapter = tmp_path / "out"
    assert json.loads((adapter / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    trained = load_4bit(folder)
    load_adapter(trained, adapter)
    assert {type(layer.weight).__name__ for layer in lora_layers(trained).values()} == {"Params4bit"}
    quantized_logits = logits(trained)
    reference = dequantized_copy(folder, load_4bit(folder))  # the trained function, computed in fp32 on Conv1D
    load_adapter(reference, adapter)
    assert rel(logits(reference), quantized_logits) < 1e-4
    assert rel(logits(reference), logits(dequantized_copy(folder, load_4bit(folder)))) > 1e-3  # B moved
    # On the unquantized Conv1D base: lora-cli, PEFT (without its fan_in_fan_out correction) and lora-merge agree.
    ours = load_base_model(str(folder))
    load_adapter(ours, adapter)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        theirs = peft.PeftModel.from_pretrained(load_base_model(str(folder)), adapter)
    assert not [w for w in caught if "fan_in_fan_out" in str(w.message)]
    assert rel(logits(theirs), logits(ours)) < 1e-5
    merged = CliRunner().invoke(merge_app, [str(adapter), str(tmp_path / "merged"), "--dtype", "float32"])
    assert merged.exit_code == 0, merged.output
    assert rel(logits(load_base_model(str(tmp_path / "merged"))), logits(ours)) < 1e-4
    # and the unquantized model is the trained one up to NF4's rounding of the base (as for the Llama adapter)
    spread = ((logits(ours) - quantized_logits).pow(2).mean().sqrt() / quantized_logits.std()).item()
    assert spread < 0.2
