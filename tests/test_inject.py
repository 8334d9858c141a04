"""Where LoRA goes: target resolution, freezing and parameter counts; lora_cli never imports peft."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import tiny
from helpers import logits, randomise_lora, settings
from lora_cli.errors import UserError
from lora_cli.inject import LoraSettings, apply_lora, lora_layers, resolve_target_paths, set_lora_enabled
from lora_cli.lora import LoraLinear

LAYERS = (0, 1)


def paths(model, **overrides) -> list[str]:
    return resolve_target_paths(model, LoraSettings(**overrides))[0]


# --- 4. trainable counts -------------------------------------------------------------------------------------


def _in_out(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    return tuple(module.weight.shape)  # Conv1D stores (in, out)


@pytest.mark.parametrize(
    "overrides",
    [{}, {"use_dora": True}, {"target_modules": "all-linear", "use_rslora": True},
     {"rank_pattern": {"v_proj": 2}, "use_dora": True}],
    ids=["plain", "dora", "all-linear", "rank-pattern"],
)
@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_trainable_counts(arch, overrides):
    if "rank_pattern" in overrides and arch in ("gpt2", "gpt_neox"):
        overrides = {**overrides, "rank_pattern": {"c_attn": 2, "query_key_value": 2}}
    model = tiny.make_model(arch)
    base_total = sum(p.numel() for p in model.parameters())
    s = settings(**overrides)
    chosen = resolve_target_paths(model, s)[0]
    shapes = {p: _in_out(model.get_submodule(p)) for p in chosen}
    report = apply_lora(model, s)
    assert report.wrapped == chosen
    ranks = {p: s.rank_pattern.get(p.rsplit(".", 1)[-1], s.r) for p in chosen}
    expected = sum(ranks[p] * (i + o) + (o if s.use_dora else 0) for p, (i, o) in shapes.items())
    assert report.trainable_params == expected
    assert report.total_params == base_total + expected
    assert sum(p.numel() for p in model.parameters()) == base_total + expected
    for name, param in model.named_parameters():
        assert param.requires_grad == (".lora_" in name), name
    assert sorted(lora_layers(model)) == sorted(chosen)
    assert {p: layer.r for p, layer in lora_layers(model).items()} == ranks
    assert "trainable params" in report.summary


def test_apply_twice_is_refused():
    model = tiny.make_model("llama")
    apply_lora(model, settings())
    with pytest.raises(UserError, match="already has LoRA layers"):
        apply_lora(model, settings())


def test_set_lora_enabled_toggles_the_update():
    model = tiny.make_model("llama")
    base = logits(model)
    apply_lora(model, settings())
    randomise_lora(model)
    with_lora = logits(model)
    assert not torch.allclose(with_lora, base)
    set_lora_enabled(model, False)
    assert torch.equal(logits(model), base)
    set_lora_enabled(model, True)
    assert torch.equal(logits(model), with_lora)


# --- 5. targets ----------------------------------------------------------------------------------------------

DEFAULTS = {
    "llama": ["model.layers.{i}.self_attn.q_proj", "model.layers.{i}.self_attn.v_proj"],
    "mistral": ["model.layers.{i}.self_attn.q_proj", "model.layers.{i}.self_attn.v_proj"],
    "qwen2": ["model.layers.{i}.self_attn.q_proj", "model.layers.{i}.self_attn.v_proj"],
    "opt": ["model.decoder.layers.{i}.self_attn.v_proj", "model.decoder.layers.{i}.self_attn.q_proj"],
    "gpt2": ["transformer.h.{i}.attn.c_attn"],
    "gpt_neox": ["gpt_neox.layers.{i}.attention.query_key_value"],
    "phi": ["model.layers.{i}.self_attn.q_proj", "model.layers.{i}.self_attn.v_proj",
            "model.layers.{i}.mlp.fc1", "model.layers.{i}.mlp.fc2"],
}


@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_default_targets_per_arch(arch):
    model = tiny.make_model(arch)
    found, written = resolve_target_paths(model, LoraSettings())
    assert sorted(found) == sorted(t.format(i=i) for i in LAYERS for t in DEFAULTS[arch])
    assert sorted(written) == sorted({t.rsplit(".", 1)[-1] for t in DEFAULTS[arch]})


@pytest.mark.parametrize("arch, expected", [("llama", ["q_proj", "v_proj"]), ("gpt2", ["c_attn"]),
                                            ("gpt_neox", ["query_key_value"])])
def test_unknown_architecture_found_by_structure(arch, expected):
    model = tiny.make_model(arch)
    model.config.model_type = "mystery"
    assert model.config.model_type == "mystery"
    found = paths(model)
    assert sorted({p.rsplit(".", 1)[-1] for p in found}) == expected
    assert len(found) == len(expected) * len(LAYERS)


class _Odd(nn.Module):
    """No attention naming anywhere: lora-cli cannot guess targets."""

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(model_type="mystery")
        self.blocks = nn.ModuleList(nn.ModuleDict({"mixer": nn.Linear(8, 8), "ff": nn.Linear(8, 8)}) for _ in LAYERS)


def test_unrecognisable_model_asks_for_explicit_targets():
    with pytest.raises(UserError) as err:
        paths(_Odd())
    msg = str(err.value)
    assert "lora.target_modules" in msg and "explicitly" in msg and "'mystery'" in msg
    assert "ff" in msg and "mixer" in msg  # the model's Linear names, to choose from
    assert paths(_Odd(), target_modules=["mixer"]) == ["blocks.0.mixer", "blocks.1.mixer"]


def test_list_entries_match_path_suffixes():
    model = tiny.make_model("llama")
    assert paths(model, target_modules=["q_proj"]) == [f"model.layers.{i}.self_attn.q_proj" for i in LAYERS]
    assert paths(model, target_modules=["mlp.down_proj", "self_attn.o_proj"]) == [
        p for i in LAYERS for p in (f"model.layers.{i}.self_attn.o_proj", f"model.layers.{i}.mlp.down_proj")]
    assert paths(model, target_modules=["model.layers.1.self_attn.k_proj"]) == ["model.layers.1.self_attn.k_proj"]
    with pytest.raises(UserError, match=r"\['proj'\] match no module"):  # a suffix stops at a '.' boundary
        paths(model, target_modules=["proj"])


def test_regex_target_is_a_full_match():
    model = tiny.make_model("llama")
    assert paths(model, target_modules=r".*\.0\.self_attn\.(q|k)_proj") == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"]
    with pytest.raises(UserError, match="matches no Linear module path"):
        paths(model, target_modules="q_proj")  # a string is a regex over the whole path, not a suffix
    with pytest.raises(UserError, match="not a valid regular expression"):
        paths(model, target_modules="(q_proj")
    # PEFT refuses a regex with layers_to_transform, so such an adapter could not be loaded there
    with pytest.raises(UserError, match="cannot be combined with a regex"):
        paths(model, target_modules=r".*\.q_proj", layers_to_transform=[1])
    assert len(paths(model, target_modules="all-linear", layers_to_transform=[1])) == 7


@pytest.mark.parametrize("arch", ["llama", "llama_tied", "gpt2", "gpt_neox", "phi"])
def test_all_linear_excludes_the_output_head(arch):
    model = tiny.make_model(arch)
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"]
    found, written = resolve_target_paths(model, LoraSettings(target_modules="all-linear"))
    head = next(n for n, m in model.named_modules() if m is model.get_output_embeddings())
    assert head == "lm_head"
    assert head in linear and head not in found
    assert found == [n for n in linear if n != head]
    assert written == sorted({n.rsplit(".", 1)[-1] for n in found})
    if arch.startswith("llama"):
        assert {"gate_proj", "up_proj", "down_proj", "q_proj", "o_proj"} <= set(written)


def test_layers_to_transform_filters():
    model = tiny.make_model("llama")
    expected = ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    assert paths(model, layers_to_transform=[1]) == expected
    assert len(paths(model, layers_to_transform=[0, 1])) == 4
    gpt2 = tiny.make_model("gpt2")
    assert paths(gpt2, target_modules="all-linear", layers_to_transform=[0]) == [
        "transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_fc",
        "transformer.h.0.mlp.c_proj"]
    with pytest.raises(UserError, match="selects no module"):
        paths(model, layers_to_transform=[5])


def test_unknown_target_lists_the_models_linear_names():
    with pytest.raises(UserError) as err:
        paths(tiny.make_model("llama"), target_modules=["q_proj", "query_proj"])
    msg = str(err.value)
    assert "'query_proj'" in msg
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj"):
        assert re.search(rf"\b{name}\b", msg), name


def test_non_linear_target_is_refused():
    with pytest.raises(UserError) as err:
        paths(tiny.make_model("llama"), target_modules=["embed_tokens"])
    msg = str(err.value)
    assert "embed_tokens" in msg and "Embedding" in msg and "Linear" in msg


@pytest.mark.parametrize("target", [["lm_head"], ["q_proj", "lm_head"], r"(lm_head|.*\.q_proj)"])
def test_tied_output_head_is_refused(target):
    model = tiny.make_model("llama_tied")
    with pytest.raises(UserError, match="tied"):
        paths(model, target_modules=target)
    with pytest.raises(UserError, match="tied"):
        apply_lora(model, LoraSettings(target_modules=target))
    assert not lora_layers(model)


def test_untied_output_head_is_allowed():
    model = tiny.make_model("llama")
    base = logits(model)
    report = apply_lora(model, settings(target_modules=["lm_head"]))
    assert report.wrapped == ["lm_head"]
    assert isinstance(model.lm_head, LoraLinear)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert torch.equal(logits(model), base)


# --- 9. lora_cli never imports peft --------------------------------------------------------------------------


def test_lora_cli_never_imports_peft():
    package = Path(__file__).resolve().parent.parent / "lora_cli"
    sources = sorted(package.rglob("*.py"))
    assert len(sources) >= 5
    pattern = re.compile(r"^\s*(import\s+peft\b|from\s+peft\b)|import_module\(\s*['\"]peft", re.MULTILINE)
    offenders = [f"{p.name}: {m.group(0).strip()}" for p in sources for m in pattern.finditer(p.read_text())]
    assert offenders == []
