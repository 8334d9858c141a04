"""Adapter folders in PEFT's format: ours load in PEFT, PEFT's load here, and bad input gets a clear UserError."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import tiny
from helpers import assert_close, assert_lora_matters, logits, make_peft, peft_adapter_state, randomise_lora, settings
from lora_cli.adapter import KEY_PREFIX, load_adapter, read_adapter_config, save_adapter
from lora_cli.errors import UserError
from lora_cli.inject import apply_lora, lora_layers, lora_state_dict

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"

ROUND_TRIP_CASES = {
    "llama-plain": ("llama", {}),
    "llama-rslora": ("llama", {"use_rslora": True}),
    "llama-dora": ("llama", {"use_dora": True}),
    "llama-all-linear": ("llama", {"target_modules": "all-linear"}),
    "gpt2-plain": ("gpt2", {}),
    "gpt2-dora": ("gpt2", {"use_dora": True}),
    "phi-regex": ("phi", {"target_modules": r".*\.1\..*\.(q_proj|dense|fc2)"}),
    "gpt2-layer1": ("gpt2", {"target_modules": ["c_attn", "c_fc"], "layers_to_transform": [1]}),
    "llama-patterns": ("llama", {"rank_pattern": {"v_proj": 2}, "alpha_pattern": {"q_proj": 32.0}}),
}


def our_adapter(arch: str, folder, **overrides):
    """Apply, randomise and save one of our adapters; returns (model, settings, report)."""
    model = tiny.make_model(arch)
    s = settings(**overrides)
    report = apply_lora(model, s)
    randomise_lora(model, seed=3)
    save_adapter(model, folder, s, report.target_modules, f"tiny-{arch}")
    return model.eval(), s, report


# --- 6. our adapters load in PEFT ----------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(ROUND_TRIP_CASES))
def test_our_adapter_format(case, tmp_path):
    arch, overrides = ROUND_TRIP_CASES[case]
    model, s, report = our_adapter(arch, tmp_path, **overrides)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG, WEIGHTS]

    text = (tmp_path / CONFIG).read_text()
    config = json.loads(text)
    assert list(config) == sorted(config)
    assert text == json.dumps(config, indent=2, sort_keys=True) + "\n"
    assert text.startswith('{\n  "')
    assert config["base_model_name_or_path"] == f"tiny-{arch}"
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["target_modules"] == report.target_modules
    assert config["fan_in_fan_out"] is (arch == "gpt2")
    assert config["r"] == s.r and config["lora_alpha"] == s.alpha
    assert config["use_dora"] is s.use_dora and config["use_rslora"] is s.use_rslora
    assert config["rank_pattern"] == s.rank_pattern and config["alpha_pattern"] == s.alpha_pattern

    with safe_open(str(tmp_path / WEIGHTS), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        names = sorted(f.keys())
    expected = sorted(
        f"{KEY_PREFIX}{path}.{t}"
        for path in report.wrapped
        for t in ("lora_A.weight", "lora_B.weight") + (("lora_magnitude_vector",) if s.use_dora else ())
    )
    assert names == expected
    # reading the config back gives the same settings, with the targets as resolved (written explicitly)
    assert read_adapter_config(tmp_path).settings == dataclasses.replace(s, target_modules=report.target_modules)


@pytest.mark.parametrize("case", list(ROUND_TRIP_CASES))
def test_our_adapter_loads_in_peft(case, tmp_path):
    from peft import PeftModel

    arch, overrides = ROUND_TRIP_CASES[case]
    model, _, _ = our_adapter(arch, tmp_path, **overrides)
    ours = logits(model)
    assert_lora_matters(ours, logits(tiny.make_model(arch)))
    peft_model = PeftModel.from_pretrained(tiny.make_model(arch), tmp_path).eval()
    # PEFT loads with strict=False and only warns: check that exactly the file's tensors landed, with its values.
    file_tensors = load_file(str(tmp_path / WEIGHTS))
    loaded = peft_adapter_state(peft_model)
    assert sorted(loaded) == sorted(file_tensors)
    for key, value in file_tensors.items():
        assert torch.equal(loaded[key], value), key
    assert_close(logits(peft_model), ours, 1e-5)
    # and our own loader reads it back to the same logits
    again = tiny.make_model(arch)
    load_adapter(again, tmp_path)
    assert_close(logits(again.eval()), ours, 1e-5)


# --- 6. PEFT's adapters load here ----------------------------------------------------------------------------

PEFT_CASES = {
    **ROUND_TRIP_CASES,
    "gpt2-all-linear": ("gpt2", {"target_modules": "all-linear"}),
    "gpt_neox-dora": ("gpt_neox", {"use_dora": True}),
    "llama-layer1": ("llama", {"target_modules": ["q_proj", "up_proj"], "layers_to_transform": [1]}),
}


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_peft_adapter_loads_here(case, tmp_path):
    arch, overrides = PEFT_CASES[case]
    peft_model = make_peft(arch, settings(**overrides))
    theirs = logits(peft_model)
    assert_lora_matters(theirs, logits(tiny.make_model(arch)))
    peft_model.save_pretrained(tmp_path)
    model = tiny.make_model(arch)
    config, report = load_adapter(model, tmp_path)
    assert config.settings.use_dora == overrides.get("use_dora", False)
    assert sorted(lora_state_dict(model)) == sorted(k[len(KEY_PREFIX):] for k in peft_adapter_state(peft_model))
    assert all(not layer.merged for layer in lora_layers(model).values())
    assert_close(logits(model.eval()), theirs, 1e-5)
    if overrides.get("rank_pattern"):
        assert {p.rsplit(".", 1)[-1]: layer.r for p, layer in lora_layers(model).items()} == {"q_proj": 4, "v_proj": 2}
        assert {p.rsplit(".", 1)[-1]: layer.alpha for p, layer in lora_layers(model).items()} == {
            "q_proj": 32.0, "v_proj": 8.0}


# --- 8. bad input --------------------------------------------------------------------------------------------


@pytest.fixture
def adapter(tmp_path):
    """A valid llama adapter folder (r=4 on q_proj, v_proj)."""
    folder = tmp_path / "adapter"
    our_adapter("llama", folder)
    return folder


def _edit_config(folder, **changes):
    path = folder / CONFIG
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def _edit_tensors(folder, edit):
    path = folder / WEIGHTS
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def _load_error(folder, arch="llama") -> str:
    model = tiny.make_model(arch)
    with pytest.raises(UserError) as err:
        load_adapter(model, folder)
    assert not lora_layers(model)  # nothing half-applied
    return str(err.value)


Q_A = f"{KEY_PREFIX}model.layers.0.self_attn.q_proj.lora_A.weight"


def test_missing_folder(tmp_path):
    msg = _load_error(tmp_path / "nope")
    assert "does not exist" in msg and "nope" in msg


def test_folder_without_config(adapter):
    (adapter / CONFIG).unlink()
    msg = _load_error(adapter)
    assert f"has no {CONFIG}" in msg and "not an adapter folder" in msg


def test_invalid_json_config(adapter):
    (adapter / CONFIG).write_text('{"peft_type": "LORA", ')
    assert "is not valid JSON" in _load_error(adapter)


def test_non_object_config(adapter):
    (adapter / CONFIG).write_text("[1, 2]")
    assert "must hold a JSON object" in _load_error(adapter)


def test_other_peft_type(adapter):
    _edit_config(adapter, peft_type="PREFIX_TUNING")
    msg = _load_error(adapter)
    assert "'PREFIX_TUNING' adapter" in msg and "LoRA adapters only" in msg


def test_modules_to_save_is_unsupported(adapter):
    _edit_config(adapter, modules_to_save=["lm_head"])
    msg = _load_error(adapter)
    assert "does not support" in msg and "modules_to_save=['lm_head']" in msg


def test_missing_safetensors(adapter):
    (adapter / WEIGHTS).unlink()
    msg = _load_error(adapter)
    assert f"no {WEIGHTS}" in msg and "weights are missing" in msg


def test_corrupt_safetensors(adapter):
    (adapter / WEIGHTS).write_bytes(b"\x00garbage, not a safetensors file" * 10)
    msg = _load_error(adapter)
    assert "not a readable safetensors file" in msg and WEIGHTS in msg


def test_truncated_safetensors(adapter):
    data = (adapter / WEIGHTS).read_bytes()
    (adapter / WEIGHTS).write_bytes(data[: len(data) // 2])
    assert "not a readable safetensors file" in _load_error(adapter)


def test_wrong_tensor_shape(adapter):
    _edit_tensors(adapter, lambda t: t.__setitem__(Q_A, torch.zeros(8, 32)))
    msg = _load_error(adapter)
    assert f"{Q_A}: expected shape [4, 32], found [8, 32]" in msg
    assert "1 problems" in msg and "tiny-llama" in msg


def test_missing_tensor(adapter):
    _edit_tensors(adapter, lambda t: t.pop(Q_A))
    msg = _load_error(adapter)
    assert f"missing {Q_A} (expected shape [4, 32])" in msg


def test_unexpected_tensor(adapter):
    extra = f"{KEY_PREFIX}model.layers.0.self_attn.k_proj.lora_A.weight"
    _edit_tensors(adapter, lambda t: t.__setitem__(extra, torch.zeros(4, 32)))
    msg = _load_error(adapter)
    assert f"unexpected {extra} (shape [4, 32])" in msg


def test_llama_adapter_on_gpt2_base(adapter):
    msg = _load_error(adapter, arch="gpt2")
    assert "does not fit this base model" in msg
    assert "q_proj" in msg and "c_attn" in msg  # what the adapter wants, and what the base has


# --- other spellings readers meet ----------------------------------------------------------------------------


def test_keys_with_adapter_name_and_legacy_bin_load(tmp_path):
    """Some tools leave PEFT's `.default` adapter name in the keys; old PEFT wrote adapter_model.bin."""
    model, _, _ = our_adapter("llama", tmp_path, use_dora=True)
    expected = logits(model)
    tensors = load_file(str(tmp_path / WEIGHTS))
    renamed = {k.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default.")
               .replace(".lora_magnitude_vector", ".lora_magnitude_vector.default"): v for k, v in tensors.items()}
    assert all(".default" in k for k in renamed) and any("magnitude" in k for k in renamed)
    (tmp_path / WEIGHTS).unlink()
    torch.save(renamed, tmp_path / "adapter_model.bin")
    again = tiny.make_model("llama")
    load_adapter(again, tmp_path)
    assert_close(logits(again.eval()), expected, 0)
