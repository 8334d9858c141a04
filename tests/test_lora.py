"""LoraLinear math: fresh adapters change nothing, logits match PEFT's, merge/unmerge, fp16 and AMP.

The shared helpers (PEFT builders, randomising, logits) are in helpers.py; weight copying is here.
PEFT is a test oracle only: lora_cli itself never imports it.
"""

from __future__ import annotations

import pytest
import torch
import transformers

import tiny
from helpers import (
    IDS,
    VARIANTS,
    assert_close,
    assert_lora_matters,
    logits,
    make_peft,
    peft_adapter_state,
    randomise_lora,
    settings,
)
from lora_cli.adapter import KEY_PREFIX
from lora_cli.errors import UserError
from lora_cli.inject import LoraSettings, apply_lora, lora_layers, lora_state_dict, merge_lora
from lora_cli.lora import LoraLinear

# --- helpers -------------------------------------------------------------------------------------------------


def peft_wrapped_paths(peft_model) -> list[str]:
    from peft.tuners.lora import LoraLayer

    return [n[len(KEY_PREFIX):] for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)]


@torch.no_grad()
def copy_adapter_into_ours(model, adapter_state: dict[str, torch.Tensor]) -> None:
    """Copy tensors named as in an adapter file (`base_model.model.<path>.lora_A.weight`) into our model.

    The key sets must be identical: this is also the check that our parameter names are PEFT's.
    """
    ours = lora_state_dict(model)
    theirs = {k[len(KEY_PREFIX):]: v for k, v in adapter_state.items()}
    assert sorted(ours) == sorted(theirs)
    params = dict(model.named_parameters())
    for key, value in theirs.items():
        assert params[key].shape == value.shape, key
        params[key].copy_(value)


def ours_like_peft(arch: str, s: LoraSettings, peft_model):
    model = tiny.make_model(arch)
    report = apply_lora(model, s)
    copy_adapter_into_ours(model, peft_adapter_state(peft_model))
    return model.eval(), report


# --- 1. a fresh adapter changes nothing ----------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["plain", "dora"])
@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_fresh_adapter_is_bit_identical(arch, variant):
    ref = logits(tiny.make_model(arch))
    model = tiny.make_model(arch)
    apply_lora(model, settings(**VARIANTS[variant]))
    assert lora_layers(model)
    assert torch.equal(logits(model), ref)


# --- 2. same numbers as PEFT ---------------------------------------------------------------------------------

PARITY_CASES = {
    **{f"{arch}-{v}": (arch, VARIANTS[v]) for arch in tiny.ARCHS for v in ("plain", "dora")},
    "llama-rslora": ("llama", {"use_rslora": True}),
    "gpt2-rslora-dora": ("gpt2", {"use_rslora": True, "use_dora": True}),
    "llama-all-linear": ("llama", {"target_modules": "all-linear"}),
    "gpt2-all-linear": ("gpt2", {"target_modules": "all-linear"}),
    "phi-all-linear-dora": ("phi", {"target_modules": "all-linear", "use_dora": True}),
    "llama-dropout": ("llama", {"dropout": 0.1}),
    "llama-dropout-dora": ("llama", {"dropout": 0.1, "use_dora": True}),
    "gpt2-dropout-dora": ("gpt2", {"dropout": 0.1, "use_dora": True}),
    "llama-layer1": ("llama", {"layers_to_transform": [1], "target_modules": ["q_proj", "v_proj", "down_proj"]}),
    "gpt2-layer1": ("gpt2", {"layers_to_transform": [1]}),
    "llama-regex": ("llama", {"target_modules": r".*\.(q_proj|o_proj|up_proj)"}),
    "llama-patterns": ("llama", {"rank_pattern": {"v_proj": 2}, "alpha_pattern": {"q_proj": 32.0}}),
}


@pytest.mark.parametrize("case", list(PARITY_CASES))
def test_logits_match_peft(case):
    arch, overrides = PARITY_CASES[case]
    s = settings(**overrides)
    peft_model = make_peft(arch, s)
    model, report = ours_like_peft(arch, s, peft_model)
    assert report.wrapped == peft_wrapped_paths(peft_model)
    theirs = logits(peft_model)
    assert_lora_matters(theirs, logits(tiny.make_model(arch)))
    assert_close(logits(model), theirs, 1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_dora_dropout_in_training_matches_peft(arch):
    """Train mode with dropout: DoRA recomputes the base part on the dropped-out input, as PEFT does."""
    s = settings(dropout=0.3, use_dora=True)
    peft_model = make_peft(arch, s)
    model, _ = ours_like_peft(arch, s, peft_model)
    peft_model.train()
    model.train()
    torch.manual_seed(7)
    theirs = peft_model(IDS).logits
    torch.manual_seed(7)
    ours = model(IDS).logits
    assert_close(ours, theirs, 1e-5)
    assert_lora_matters(ours, logits(model))  # dropout really acted (differs from eval mode)


# --- 3. merge ------------------------------------------------------------------------------------------------


def lora_model(arch, variant="plain", dtype=torch.float32, seed=0, **overrides):
    model = tiny.make_model(arch, dtype=dtype)
    apply_lora(model, settings(**VARIANTS[variant], **overrides))
    randomise_lora(model, seed=seed)
    return model


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_merged_equals_unmerged_fp32(arch, variant):
    base = tiny.make_model(arch)
    model = lora_model(arch, variant)
    unmerged = logits(model)
    assert_lora_matters(unmerged, logits(base))
    assert merge_lora(model) is model
    assert not any(isinstance(m, LoraLinear) for m in model.modules())
    assert list(model.state_dict()) == list(base.state_dict())
    assert {n: type(m) for n, m in model.named_modules()} == {n: type(m) for n, m in base.named_modules()}
    assert_close(logits(model), unmerged, 1e-5)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("arch", ["llama", "gpt2", "phi"])
def test_merged_equals_unmerged_fp16(arch, variant):
    """An fp16 base: the merged weight is rounded to fp16 once, so logits differ by fp16 rounding only.

    fp16 has a relative precision of 2**-11 (about 5e-4) per rounding; a 2-layer model accumulates a few such
    roundings per activation, so we allow 1e-2 of the logit scale (about 20 roundings' worth) and check that
    the adapter's own effect on the logits is far larger than that allowance.
    """
    base_logits = logits(tiny.make_model(arch, dtype=torch.float16))
    model = lora_model(arch, variant, dtype=torch.float16)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if ".lora_" in n)
    unmerged = logits(model)
    tol = 1e-2 * unmerged.abs().max().item()
    assert_lora_matters(unmerged, base_logits, at_least=10 * tol)
    merge_lora(model)
    assert all(p.dtype == torch.float16 for p in model.parameters())
    assert_close(logits(model), unmerged, tol)


@pytest.mark.parametrize("arch, variant", [("llama", "plain"), ("gpt2", "dora"), ("llama_tied", "rslora")])
def test_merged_model_saves_and_reloads(arch, variant, tmp_path):
    model = lora_model(arch, variant)
    merge_lora(model)
    merged = logits(model)
    assert_lora_matters(merged, logits(tiny.make_model(arch)))
    model.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert list(reloaded.state_dict()) == list(tiny.make_model(arch).state_dict())
    assert_close(logits(reloaded), merged, 1e-5)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_unmerge_restores_weights(arch, variant):
    model = lora_model(arch, variant)
    layers = lora_layers(model)
    before = {n: layer.weight.detach().clone() for n, layer in layers.items()}
    unmerged = logits(model)
    for layer in layers.values():
        layer.merge()
        assert layer.merged
    assert any(not torch.equal(layer.weight, before[n]) for n, layer in layers.items())
    assert_close(logits(model), unmerged, 1e-5)  # merged LoraLinear skips the LoRA branch
    for name, layer in layers.items():
        layer.unmerge()
        assert not layer.merged
        # Undone arithmetically, DoRA too (its cached per-row scale divided out, as PEFT does), not from a kept copy
        # of the weight: W + s B A rounds away bits of W (a multiply then a divide rounds again), so no unmerge that
        # keeps less than a whole weight's worth of corrections is exact. Measured: at most 3e-8 off (fp32 ulps of
        # |W| < 0.08) for plain, rslora and dora alike; the plain merge was never exact either.
        assert_close(layer.weight, before[name], 1e-6)
    assert_close(logits(model), unmerged, 1e-5)


def test_merge_keeps_tied_embeddings_tied():
    model = lora_model("llama_tied", target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    embed = model.get_input_embeddings().weight.detach().clone()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    merge_lora(model)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.model.embed_tokens.weight, embed)


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("which", [0, -1])  # the first layer merged, and the last (after all others)
def test_merge_refuses_non_finite_and_writes_nothing(which):
    model = lora_model("llama")
    layers = list(lora_layers(model).values())
    with torch.no_grad():
        layers[which].lora_B.weight.fill_(float("inf"))
    before = _weights(model)
    with pytest.raises(UserError, match="non-finite"):
        merge_lora(model)
    after = _weights(model)
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before if not k.endswith("lora_B.weight"))
    assert all(isinstance(layer, LoraLinear) and not layer.merged for layer in lora_layers(model).values())
    assert len(lora_layers(model)) == len(layers)


def test_merge_refuses_fp16_overflow():
    """A delta finite in fp32 but beyond fp16's range (65504) must not be written as inf."""
    model = lora_model("llama", dtype=torch.float16)
    layer = next(iter(lora_layers(model).values()))
    with torch.no_grad():
        layer.lora_B.weight.fill_(1e6)
    before = layer.weight.detach().clone()
    with pytest.raises(UserError, match="non-finite"):
        layer.merge()
    assert torch.equal(layer.weight, before)
    assert not layer.merged


# --- 7. fp16 base under AMP with GradScaler -------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["plain", "dora"])
def test_fp16_base_amp_gradscaler_step(variant):
    """CPU autocast fp16 (supported by this torch) + GradScaler: LoRA params are fp32, so unscale_ works."""
    model = tiny.make_model("llama", dtype=torch.float16).train()
    apply_lora(model, settings(**VARIANTS[variant]))
    lora = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert lora and all(p.dtype == torch.float32 for p in lora.values())
    before = {n: p.detach().clone() for n, p in lora.items()}
    opt = torch.optim.AdamW(lora.values(), lr=1e-2)
    # A moderate initial scale: the default 2**16 can overflow fp16 activations' grads on the very first step,
    # which GradScaler handles by skipping the step; we want the step taken.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    with torch.autocast("cpu", dtype=torch.float16):
        out = model(IDS, labels=IDS)
    assert torch.isfinite(out.loss)
    scaler.scale(out.loss).backward()
    scaler.unscale_(opt)  # raises "Attempting to unscale FP16 gradients" if LoRA params were fp16
    for name, param in lora.items():
        assert param.grad is not None and param.grad.dtype == torch.float32, name
        assert torch.isfinite(param.grad).all(), name
    assert any(param.grad.abs().sum() > 0 for param in lora.values())
    scaler.step(opt)
    scaler.update()
    assert all(p.dtype == torch.float32 for p in lora.values())
    assert all(not p.requires_grad for n, p in model.named_parameters() if n not in lora)
    changed = [n for n, p in lora.items() if not torch.equal(p, before[n])]
    assert any("lora_B" in n for n in changed)
    assert scaler.get_scale() == 2.0**8  # no inf/nan found: the step was not skipped


# --- 8. the fused LoRA node: same outputs and gradients as the plain composition, and as PEFT ---------------


def _layer(kind: str, bias: bool, dropout: float, dtype=torch.float32) -> LoraLinear:
    torch.manual_seed(0)
    if kind == "conv1d":
        base = transformers.pytorch_utils.Conv1D(24, 16)  # nx=16 in, nf=24 out; W stored (in, out)
        if not bias:
            base.bias = None
    else:
        base = torch.nn.Linear(16, 24, bias=bias)
    base.requires_grad_(False)
    layer = LoraLinear.from_base(base.to(dtype), r=4, alpha=8.0, dropout=dropout)
    with torch.no_grad():
        layer.lora_B.weight.normal_(std=0.5)
    return layer.train()


def _output_and_grads(layer: LoraLinear, x: torch.Tensor, fused: bool, autocast_dtype=None, seed: int = 1):
    """(output, {name: grad}) with the fused node on or off; the same dropout mask both times (same seed)."""
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(x.requires_grad)
    LoraLinear.use_fused = fused
    try:
        torch.manual_seed(seed)
        with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            out = layer(x)
        grad_out = torch.linspace(-1, 1, out.numel()).view(out.shape).to(out.dtype)
        out.backward(grad_out)
    finally:
        LoraLinear.use_fused = True
    grads = {"A": layer.lora_A.weight.grad, "B": layer.lora_B.weight.grad}
    if x.requires_grad:
        grads["x"] = x.grad
    return out, grads


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("x_needs_grad", [True, False])
def test_fused_node_matches_plain_fp32(kind, bias, dropout, x_needs_grad):
    layer = _layer(kind, bias, dropout)
    x = torch.randn(3, 5, 16, requires_grad=x_needs_grad)
    out, grads = _output_and_grads(layer, x, fused=True)
    ref_out, ref_grads = _output_and_grads(layer, x, fused=False)
    assert out.shape == ref_out.shape == (3, 5, 24)
    assert_close(out, ref_out, 1e-5)
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        assert grads[name] is not None and grads[name].dtype == ref_grads[name].dtype, name
        assert ref_grads[name].abs().max() > 1e-3, name  # a gradient that is really there
        assert_close(grads[name], ref_grads[name], 1e-5)


@pytest.mark.parametrize("base_dtype,autocast_dtype", [(torch.float32, torch.bfloat16), (torch.float16, torch.float16)])
def test_fused_node_under_autocast_matches_plain(base_dtype, autocast_dtype):
    """The T4/bf16 path: half-precision matmuls, fp32 LoRA params receiving fp32 gradients."""
    layer = _layer("linear", True, 0.0, dtype=base_dtype)
    x = torch.randn(2, 7, 16, dtype=base_dtype, requires_grad=True)
    out, grads = _output_and_grads(layer, x, fused=True, autocast_dtype=autocast_dtype)
    ref_out, ref_grads = _output_and_grads(layer, x, fused=False, autocast_dtype=autocast_dtype)
    assert out.dtype == ref_out.dtype == autocast_dtype
    tol = 2e-2 if autocast_dtype == torch.bfloat16 else 2e-3
    assert_close(out, ref_out, tol * ref_out.abs().max().item())
    assert grads["A"].dtype == grads["B"].dtype == torch.float32
    assert grads["x"].dtype == base_dtype
    for name in ref_grads:
        assert_close(grads[name], ref_grads[name], tol * ref_grads[name].abs().max().item())


def test_fused_node_is_skipped_where_it_does_not_apply():
    """DoRA, a trainable base weight, and an fp16 base with fp32 LoRA outside autocast take the plain path."""
    x = torch.randn(2, 16)
    assert _layer("linear", True, 0.0)._fused_compute_dtype(x) == torch.float32
    dora = LoraLinear.from_base(torch.nn.Linear(16, 24), r=4, alpha=8.0, use_dora=True)
    assert dora._fused_compute_dtype(x) is None
    trainable_base = _layer("linear", True, 0.0)
    trainable_base.weight.requires_grad_(True)
    assert trainable_base._fused_compute_dtype(x) is None
    half = _layer("linear", True, 0.0, dtype=torch.float16)
    assert half._fused_compute_dtype(x.half()) is None
    with torch.autocast("cpu", dtype=torch.float16):
        assert half._fused_compute_dtype(x.half()) == torch.float16


@pytest.mark.parametrize("variant", ["plain", "rslora", "dora"])
@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_lora_gradients_match_peft(arch, variant):
    """One training loss through the whole model: our LoRA gradients equal PEFT's, tensor by tensor."""
    s = settings(target_modules="all-linear", **VARIANTS[variant])
    theirs = make_peft(arch, s)  # eval mode: the tiny configs' own dropout (gpt2, phi) would differ by chance
    ours, _ = ours_like_peft(arch, s, theirs)
    for model in (ours, theirs):
        model.zero_grad(set_to_none=True)
        model(IDS, labels=IDS).loss.backward()
    # PEFT's parameter names carry the adapter name, and its DoRA magnitude is a module's ".weight".
    their_grads = {k[len(KEY_PREFIX):].replace(".default", "").replace("lora_magnitude_vector.weight",
                                                                   "lora_magnitude_vector"): p.grad
                   for k, p in theirs.named_parameters() if p.requires_grad}
    our_grads = {k: p.grad for k, p in ours.named_parameters() if p.requires_grad}
    assert sorted(our_grads) == sorted(their_grads)
    scale = max(g.abs().max().item() for g in their_grads.values())
    assert scale > 1e-4
    for name, grad in our_grads.items():
        assert grad is not None, name
        assert_close(grad, their_grads[name], 1e-5 * max(scale, 1.0))
