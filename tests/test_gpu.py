"""The first GPU run: everything the CPU suite can only emulate, on a real CUDA device, in one command.

    pytest -m gpu tests/test_gpu.py -v        # about a minute; needs no internet (tiny models are built here)

Every test is marked `gpu` and skips cleanly without CUDA (plain `pytest` collects and skips them). Each test builds
what it needs and resets Accelerate's process-wide state before and after, so one failure does not cascade. bf16
cases skip below compute capability 8.0 (a T4): lora-cli never picks bf16 there.
"""

from __future__ import annotations

import collections
import importlib
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers
from typer.testing import CliRunner

import amp_emulation
import tiny

HAS_CUDA = torch.cuda.is_available()
CAPABILITY = torch.cuda.get_device_capability(0) if HAS_CUDA else (0, 0)
HAS_BF16 = CAPABILITY >= (8, 0)  # lora-cli's rule (precision.choose_precision), not torch.cuda.is_bf16_supported()
DEVICE = "cuda"

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU: run `pytest -m gpu tests/test_gpu.py` on a GPU machine"),
]
needs_bf16 = pytest.mark.skipif(not HAS_BF16, reason="bf16 needs compute capability 8.0+; lora-cli uses fp16 here")
HALF_DTYPES = [torch.float16, pytest.param(torch.bfloat16, marks=needs_bf16)]
REPO = Path(__file__).resolve().parent.parent
runner = CliRunner()


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Runs of different precisions in one process: Accelerate refuses a second mixed-precision setting."""
    amp_emulation.reset_accelerate_state()
    yield
    amp_emulation.reset_accelerate_state()


def relative_error(got: torch.Tensor, reference: torch.Tensor) -> float:
    """max |got - reference| / max |reference|, in float64."""
    got, reference = got.detach().double(), reference.detach().double()
    return float((got - reference).abs().max() / reference.abs().max().clamp_min(1e-30))


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# --- 1. the build runs on this GPU -------------------------------------------------------------------------------


def test_cuda_build_has_kernels_for_this_gpu():
    major, minor = CAPABILITY
    arches = torch.cuda.get_arch_list()
    parsed = []
    for arch in arches:  # sm_75, sm_90a, compute_90 ...
        found = re.match(r"(sm|compute)_(\d+)", arch)
        if found:
            digits = found.group(2)
            parsed.append((found.group(1), int(digits[:-1]), int(digits[-1])))
    # A cubin runs on its own major version at the same or a newer minor; PTX is JIT-compiled for newer devices.
    binary = any(kind == "sm" and m == major and n <= minor for kind, m, n in parsed)
    ptx = any(kind == "compute" and (m, n) <= (major, minor) for kind, m, n in parsed)
    name = torch.cuda.get_device_name(0)
    assert binary or ptx, (
        f"torch {torch.__version__} (CUDA {torch.version.cuda}) was built for {arches}, which has no kernels for "
        f"{name} (sm_{major}{minor}): install a torch build that lists sm_{major}{minor}"
    )
    x = torch.randn(256, 256, device=DEVICE, dtype=torch.float16)
    assert torch.isfinite((x @ x).float().softmax(-1).sum())


# --- 2. the fused LoRA node on CUDA: against the plain path and an fp64 reference ---------------------------------


class RecordingDropout(torch.nn.Dropout):
    """nn.Dropout that keeps its last output, so the fp64 reference can apply the very same mask."""

    def forward(self, x):
        self.last = super().forward(x)
        return self.last


def _cuda_lora_layer(kind: str, bias: bool, dropout: float, dtype: torch.dtype):
    from lora_cli.lora import LoraLinear

    torch.manual_seed(0)
    if kind == "conv1d":
        base = transformers.pytorch_utils.Conv1D(40, 48)  # 48 in, 40 out; W stored (in, out)
        if not bias:
            base.bias = None
    else:
        base = torch.nn.Linear(48, 40, bias=bias)
    base.requires_grad_(False)
    layer = LoraLinear.from_base(base.to(DEVICE, dtype), r=8, alpha=16.0, dropout=dropout)
    with torch.no_grad():
        layer.lora_B.weight.normal_(std=0.5)
    if dropout:
        layer.lora_dropout = RecordingDropout(dropout)
    return layer.train()


def _run_lora(layer, x, grad_out, fused: bool, dtype):
    from lora_cli.lora import LoraLinear

    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    LoraLinear.use_fused = fused
    try:
        torch.manual_seed(1)  # the same dropout mask for both paths
        with torch.autocast(DEVICE, dtype=dtype):
            out = layer(x)
        out.backward(grad_out.to(out.dtype))
    finally:
        LoraLinear.use_fused = True
    mask = layer.lora_dropout.last != 0 if isinstance(layer.lora_dropout, RecordingDropout) else None
    return out, {"lora_A": layer.lora_A.weight.grad, "lora_B": layer.lora_B.weight.grad, "x": x.grad}, mask


def _fp64_reference(layer, x, grad_out, mask, dropout: float):
    w = layer._oriented(layer.weight).double()
    a = layer.lora_A.weight.detach().double().requires_grad_(True)
    b = layer.lora_B.weight.detach().double().requires_grad_(True)
    x64 = x.detach().double().requires_grad_(True)
    dropped = x64 if mask is None else x64 * mask / (1 - dropout)
    out = x64 @ w.t() + layer.scaling * (dropped @ a.t()) @ b.t()
    if layer.bias is not None:
        out = out + layer.bias.double()
    out.backward(grad_out.double())
    return out, {"lora_A": a.grad, "lora_B": b.grad, "x": x64.grad}


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["no_dropout", "dropout"])
def test_fused_lora_layer_under_cuda_autocast(dtype, kind, bias, dropout):
    """A half base and fp32 LoRA weights under CUDA autocast, as lora-train runs them: the fused node agrees with
    the plain composition and both with an fp64 reference, and the gradients reach the fp32 LoRA weights."""
    layer = _cuda_lora_layer(kind, bias, dropout, dtype)
    generator = torch.Generator(device=DEVICE).manual_seed(2)
    x = torch.randn(3, 50, 48, device=DEVICE, generator=generator).to(dtype)
    grad_out = torch.randn(3, 50, 40, device=DEVICE, generator=generator)
    fused_out, fused_grads, fused_mask = _run_lora(layer, x, grad_out, True, dtype)
    plain_out, plain_grads, plain_mask = _run_lora(layer, x, grad_out, False, dtype)
    if dropout:
        assert torch.equal(fused_mask, plain_mask) and 0 < fused_mask.float().mean() < 1
    ref_out, ref_grads = _fp64_reference(layer, x, grad_out, fused_mask, dropout)
    tol = 1e-2 if dtype == torch.float16 else 4e-2
    assert fused_out.dtype == plain_out.dtype == dtype
    assert relative_error(fused_out, ref_out) < tol and relative_error(plain_out, ref_out) < tol
    assert relative_error(fused_out, plain_out) < tol
    for name, reference in ref_grads.items():
        got, plain = fused_grads[name], plain_grads[name]
        assert got is not None and torch.isfinite(got).all(), name
        assert got.dtype == (torch.float32 if name.startswith("lora") else dtype), name
        assert relative_error(got, reference) < tol, (name, relative_error(got, reference))
        assert relative_error(plain, reference) < tol, (name, relative_error(plain, reference))


# --- 3. the chunked loss on CUDA -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=["fp16", "bf16"])
def test_chunked_loss_matches_plain_cross_entropy_on_cuda(dtype):
    from lora_cli.losses import head_cross_entropy

    torch.manual_seed(0)
    head = torch.nn.Linear(64, 1000, bias=False).to(DEVICE, dtype).requires_grad_(False)
    hidden = torch.randn(300, 64, device=DEVICE).to(dtype).requires_grad_(True)
    targets = torch.randint(0, 1000, (300,), device=DEVICE)
    with torch.autocast(DEVICE, dtype=dtype):
        chunked = head_cross_entropy(head, hidden, targets, chunk_tokens=128)  # 3 chunks, one ragged
    (chunked_grad,) = torch.autograd.grad(chunked, hidden)
    with torch.autocast(DEVICE, dtype=dtype):
        plain = F.cross_entropy(head(hidden).float(), targets, reduction="sum")
    (plain_grad,) = torch.autograd.grad(plain, hidden)
    h64 = hidden.detach().double().requires_grad_(True)
    reference = F.cross_entropy(h64 @ head.weight.double().t(), targets, reduction="sum")
    (reference_grad,) = torch.autograd.grad(reference, h64)
    tol = 1e-2 if dtype == torch.float16 else 4e-2
    assert chunked.dtype == torch.float32
    assert abs(chunked.item() - reference.item()) < tol * abs(reference.item())
    assert abs(chunked.item() - plain.item()) < tol * abs(reference.item())
    assert chunked_grad.dtype == dtype
    assert relative_error(chunked_grad, reference_grad) < tol
    assert relative_error(plain_grad, reference_grad) < tol


def test_chunked_loss_backward_at_one_token_and_the_initial_loss_scale_on_cuda():
    """GradScaler's 2^16 over one trained token exceeds fp16's range; the loss's input gradient must not."""
    from lora_cli.losses import head_cross_entropy

    torch.manual_seed(0)
    head = torch.nn.Linear(64, 1000, bias=False).to(DEVICE, torch.float16).requires_grad_(False)
    hidden = torch.randn(1, 64, device=DEVICE).half().requires_grad_(True)
    target = torch.tensor([7], device=DEVICE)
    with torch.autocast(DEVICE, dtype=torch.float16):
        loss = head_cross_entropy(head, hidden, target)
    (loss * 2.0**16).backward()
    h64 = hidden.detach().double().requires_grad_(True)
    (F.cross_entropy(h64 @ head.weight.double().t(), target, reduction="sum") * 2.0**16).backward()
    assert torch.isfinite(hidden.grad).all()
    assert relative_error(hidden.grad, h64.grad) < 1e-2


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=["fp16", "bf16"])
def test_model_loss_and_lora_grads_match_transformers_on_cuda(dtype):
    """causal_lm_loss (decoder + chunked frozen head) vs transformers' own loss, on a half base with fp32 LoRA."""
    from helpers import padded_batch, plain_loss_sum, trainable
    from lora_cli.losses import causal_lm_loss

    model = _half_lora_model("llama", dtype)
    batch = {k: v.to(DEVICE) for k, v in padded_batch().items()}
    params = trainable(model)
    with torch.autocast(DEVICE, dtype=dtype):
        got, _ = causal_lm_loss(model, batch, chunk_tokens=7)
    got_grads = torch.autograd.grad(got, params)
    with torch.autocast(DEVICE, dtype=dtype):
        expected = plain_loss_sum(model, batch)
    expected_grads = torch.autograd.grad(expected, params)
    tol = 1e-2 if dtype == torch.float16 else 4e-2
    assert abs(got.item() - expected.item()) < tol * abs(expected.item())
    for g, e in zip(got_grads, expected_grads):
        assert g.dtype == torch.float32 and torch.isfinite(g).all()
        assert relative_error(g, e) < 5 * tol


def _half_lora_model(arch: str, dtype: torch.dtype, dropout: float = 0.0):
    """A tiny model, base in `dtype` and frozen, fp32 LoRA on all linear layers (randomised), on the GPU."""
    from helpers import randomise_lora
    from lora_cli.inject import LoraSettings, apply_lora

    model = tiny.make_model(arch, dtype=dtype)
    model.requires_grad_(False)
    apply_lora(model, LoraSettings(r=4, alpha=8.0, dropout=dropout, target_modules="all-linear"))
    with torch.no_grad():
        randomise_lora(model)
    return model.to(DEVICE).eval()


# --- 4. the real lora-train on CUDA ------------------------------------------------------------------------------


@pytest.fixture
def trained_models():
    """The model each training run trains: taken from the loss module the loop runs (losses.CausalLMLoss)."""
    from torch.nn.modules.module import register_module_forward_pre_hook

    from lora_cli.losses import CausalLMLoss

    models = []

    def hook(module, args):
        if isinstance(module, CausalLMLoss) and not any(m is module.model for m in models):
            models.append(module.model)

    handle = register_module_forward_pre_hook(hook)
    yield models
    handle.remove()


def _config(tmp_path: Path, model_dir: Path, **sections) -> Path:
    from helpers import make_config

    return make_config(tmp_path, model_dir, **sections)


@pytest.mark.parametrize("precision", ["auto", "fp16"])
def test_train_on_cuda(precision, tmp_path, trainable_model_dir, trained_models):
    """lora-train end to end on the GPU: everything on the device, the half base frozen, LoRA fp32, loss falls."""
    from lora_cli.cli import train_app

    expected = torch.bfloat16 if precision == "auto" and HAS_BF16 else torch.float16
    config = _config(tmp_path, trainable_model_dir("llama"), train={"precision": precision, "max_steps": 40})
    result = runner.invoke(train_app, [str(config)])
    assert result.exit_code == 0, result.output
    assert ("bf16" if expected == torch.bfloat16 else "fp16") in result.output.split("precision:")[1].splitlines()[0]
    (model,) = trained_models
    assert all(t.device.type == "cuda" for t in [*model.parameters(), *model.buffers()])
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    base = {n: p for n, p in model.named_parameters() if "lora_" not in n}
    assert lora and all(p.dtype == torch.float32 and p.requires_grad for p in lora.values())
    assert all(p.dtype == expected and not p.requires_grad for p in base.values())
    records = [r for r in metrics(tmp_path / "out") if "loss" in r]
    assert records[-1]["loss"] < 0.5 * records[0]["loss"], [r["loss"] for r in records]
    skipped = records[-1]["skipped_steps"]
    assert skipped <= (5 if expected == torch.float16 else 0), skipped  # the scaler's first steps at most
    finite = [r for r in records if r["grad_norm"] is not None and math.isfinite(r["grad_norm"])]
    assert len(finite) >= len(records) - skipped
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


def test_fp16_loss_scaler_skips_and_recovers_on_cuda(tmp_path, trainable_model_dir):
    """A 2^40 initial loss scale: the CUDA GradScaler skips ~25 steps, halving the scale each time, the run
    reports them, then trains. (Whether skipped steps count toward max_steps is the loop's business: issue 14.)"""
    from lora_cli.cli import train_app

    config = _config(tmp_path, trainable_model_dir("llama"),
                     train={"precision": "fp16", "max_steps": 40, "max_nonfinite_steps": 64})
    with amp_emulation.scaler_init_scale(2.0**40) as seen:
        result = runner.invoke(train_app, [str(config)])
    assert result.exit_code == 0, result.output
    scaler = seen["accelerators"][-1].scaler
    assert isinstance(scaler, torch.amp.GradScaler) and scaler._device == "cuda"
    skipped = round(math.log2(2.0**40 / scaler.get_scale()))
    assert skipped >= 10
    records = [r for r in metrics(tmp_path / "out") if "loss" in r]
    assert records[-1]["skipped_steps"] == skipped
    assert "skipped" in result.output
    assert records[-1]["loss"] < records[0]["loss"]
    # Applied steps have finite grad norms (the scaler may still back off once more near its new level).
    assert any(r["grad_norm"] is not None and math.isfinite(r["grad_norm"]) for r in records[-5:])


def test_gradient_checkpointing_with_dropout_gives_the_same_grads_on_cuda(tmp_path, trainable_model_dir):
    """Checkpointing recomputes each layer in backward: on CUDA it must replay the same dropout masks (CUDA RNG
    state) under the same autocast, so the gradients equal those without checkpointing."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    from lora_cli.config import load_config
    from lora_cli.train import train

    grads: list[list[torch.Tensor]] = []
    handle = register_optimizer_step_pre_hook(
        lambda opt, args, kwargs: grads.append([p.grad.detach().clone() for g in opt.param_groups for p in g["params"]])
    )
    runs = []
    try:
        for name, checkpointing, seed in (("plain", False, 0), ("checkpointed", True, 0), ("other_seed", False, 1)):
            folder = tmp_path / name
            folder.mkdir()
            config = _config(folder, trainable_model_dir("llama"), lora={"dropout": 0.3},
                             train={"precision": "fp16", "max_steps": 4, "gradient_checkpointing": checkpointing,
                                    "seed": seed})
            grads.clear()
            amp_emulation.reset_accelerate_state()
            train(load_config(config), quiet=True)
            runs.append([list(step) for step in grads])
    finally:
        handle.remove()
    plain, checkpointed, other_seed = runs
    assert len(plain) == len(checkpointed) >= 1  # applied steps (fp16's scaler may skip one early on)
    for step, (a_grads, b_grads) in enumerate(zip(plain, checkpointed), start=1):
        for a, b in zip(a_grads, b_grads):
            # Atomics in CUDA attention backward may differ in the last bits; a different mask differs by O(1).
            assert relative_error(b, a) < 1e-2, f"step {step}"
    assert max(relative_error(b, a) for a, b in zip(plain[-1], other_seed[-1])) > 0.1  # the masks matter


# --- 5. packing on CUDA attention --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=["fp16", "bf16"])
def test_packing_on_cuda_with_the_memory_efficient_kernel(dtype):
    """What a T4 has (no flash attention below compute capability 8.0): a packed batch of a grouped-query model
    trained with only sdpa's memory-efficient kernel allowed gives the loss and LoRA gradients of the padded one."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from helpers import examples, trainable
    from lora_cli import data
    from lora_cli.losses import causal_lm_loss
    from lora_cli.packing import check_packing_supported, packed_attention

    model = _half_lora_model("llama", dtype)  # grouped-query attention: 4 query heads, 2 k/v heads
    exs = examples([11, 4, 8, 6, 13])
    padded = {k: v.to(DEVICE) for k, v in data.collate(exs, pad_token_id=3).items()}
    packed = {k: v.to(DEVICE) for k, v in data.collate_packed([exs[:3], exs[3:]], pad_token_id=3).items()}

    def loss_and_grads(batch):
        with torch.autocast(DEVICE, dtype=dtype):
            loss, n_tokens = causal_lm_loss(model, batch)
        return loss, n_tokens, torch.autograd.grad(loss, trainable(model))

    expected, expected_n, expected_grads = loss_and_grads(padded)
    check_packing_supported(model, DEVICE)
    with packed_attention(model, DEVICE):  # runs the packing check on the model too
        # Only the packed batch is pinned to the memory-efficient kernel: transformers' own sdpa passes
        # enable_gqa for an unpadded batch (the packing check's), which that kernel does not take (math runs).
        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
            got, got_n, got_grads = loss_and_grads(packed)
    tol = 1e-2 if dtype == torch.float16 else 4e-2
    assert got_n == expected_n
    assert abs(got.item() - expected.item()) < tol * abs(expected.item())
    for g, e in zip(got_grads, expected_grads):
        assert relative_error(g, e) < 5 * tol


def test_packed_training_on_cuda(tmp_path, trainable_model_dir):
    from lora_cli.config import load_config
    from lora_cli.train import train

    config = _config(tmp_path, trainable_model_dir("llama"), data={"packing": True},
                     train={"max_steps": 30, "micro_batch_size": 1})
    train(load_config(config), quiet=True)
    curve = [r["loss"] for r in metrics(tmp_path / "out") if "loss" in r]
    assert curve[-1] < 0.5 * curve[0], curve


# --- 6. generation on CUDA ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapter_folders(tmp_path_factory):
    """A tiny llama base and a randomised adapter for it (built on the CPU)."""
    from helpers import randomise_lora
    from lora_cli.adapter import save_adapter
    from lora_cli.inject import LoraSettings, apply_lora
    from lora_cli.models import load_base_model

    root = tmp_path_factory.mktemp("gpu_generate")
    base = tiny.save_model("llama", root / "base")
    model = load_base_model(str(base))
    settings = LoraSettings(r=4, alpha=8.0, target_modules="all-linear")
    report = apply_lora(model, settings)
    randomise_lora(model, seed=3)
    adapter = save_adapter(model, root / "adapter", settings, report.target_modules, str(base))
    return {"base": str(base), "adapter": str(adapter)}


def test_generation_on_cuda(adapter_folders):
    gen = importlib.import_module("lora_cli.generate")

    base, adapter = adapter_folders["base"], adapter_folders["adapter"]
    unmerged, tokenizer = gen.load_for_generation(base, adapter, dtype="float32")
    merged, _ = gen.load_for_generation(base, adapter, merge=True, dtype="float32")
    assert next(unmerged.parameters()).device.type == "cuda"
    greedy = dict(temperature=0, max_new_tokens=12)
    text = gen.generate_text(unmerged, tokenizer, "hello", **greedy)
    assert text and gen.generate_text(merged, tokenizer, "hello", **greedy) == text
    sampled = gen.generate_text(unmerged, tokenizer, "hello", seed=5, max_new_tokens=12)
    assert gen.generate_text(unmerged, tokenizer, "hello", seed=5, max_new_tokens=12) == sampled
    # auto: the GPU's half dtype (bf16 from compute capability 8.0, else fp16); the adapter's LoRA stays fp32.
    auto, _ = gen.load_for_generation(base, adapter)
    half = torch.bfloat16 if HAS_BF16 else torch.float16
    assert auto.get_input_embeddings().weight.dtype == half
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]], device=DEVICE)
    with torch.no_grad():
        assert relative_error(auto(ids).logits, unmerged(ids).logits) < 5e-2
    assert gen.generate_text(auto, tokenizer, "hello", **greedy)


@pytest.mark.parametrize("decoding", [["--temperature", "0"], ["--temperature", "0.7", "--seed", "0"]],
                         ids=["greedy", "sampling"])
def test_generation_fp16_overflow_exits_2_on_cuda(tmp_path, decoding):
    from lora_cli.cli import generate_app

    model_dir = amp_emulation.save_overflowing_model(tmp_path / "overflowing")

    def generate(dtype: str):
        args = [str(model_dir), "--prompt", "hello", "--max-new-tokens", "6", "--dtype", dtype, *decoding]
        return runner.invoke(generate_app, args)

    result = generate("float16")
    assert result.exit_code == 2, result.output
    assert "overflowed float16" in result.output and "--dtype float32" in result.output
    assert "Traceback" not in result.output
    fine = generate("float32")  # the advice works
    assert fine.exit_code == 0, fine.output


# --- 7. merge_at_end on CUDA vs lora-merge on the CPU -------------------------------------------------------------


def test_merge_at_end_on_cuda_matches_lora_merge_on_cpu(tmp_path, trainable_model_dir):
    from safetensors.torch import load_file

    from lora_cli.config import load_config
    from lora_cli.merge import merge_adapter
    from lora_cli.train import train

    config = _config(tmp_path, trainable_model_dir("llama"), train={"max_steps": 10, "merge_at_end": True})
    result = train(load_config(config), quiet=True)
    out = tmp_path / "out"
    on_gpu = Path(result.merged_dir) if result.merged_dir else out / "merged"
    on_cpu = merge_adapter(out, tmp_path / "merged_cpu").output_dir
    gpu_tensors = {k: v for f in sorted(on_gpu.glob("*.safetensors")) for k, v in load_file(f).items()}
    cpu_tensors = {k: v for f in sorted(Path(on_cpu).glob("*.safetensors")) for k, v in load_file(f).items()}
    assert gpu_tensors.keys() == cpu_tensors.keys()
    for name, cpu_tensor in cpu_tensors.items():
        # The GPU run's base may be half precision: its rounding is the tolerance.
        assert relative_error(gpu_tensors[name], cpu_tensor) < 1e-2, name
    ids = tiny.sample_input_ids()
    with torch.no_grad():
        gpu_logits = transformers.AutoModelForCausalLM.from_pretrained(on_gpu, dtype=torch.float32)(ids).logits
        cpu_logits = transformers.AutoModelForCausalLM.from_pretrained(on_cpu, dtype=torch.float32)(ids).logits
    assert relative_error(gpu_logits, cpu_logits) < 3e-2


# --- 8. bench.py on CUDA -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bench_module():
    from test_bench import load_bench

    return load_bench("bench_on_gpu")


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("tool", ["lora-cli", "peft"])
def test_bench_child_run_on_cuda(bench_module, tool, precision, tmp_path, tiny_model_dir, monkeypatch):
    """One measured bench run per tool and precision, in this process (seconds): every step timed with its batch,
    skipped steps reported (fp16 starts at a loss scale of 2^16)."""
    from test_bench import fixed_child_args

    if tool == "peft":
        pytest.importorskip("peft")
    args = fixed_child_args(bench_module, tool, precision, 32, tiny_model_dir("llama"), tmp_path, monkeypatch,
                            text_repeats=4)
    bench_module.run_child(args)
    result = json.loads(Path(args.result).read_text())
    assert len(result["step_seconds"]) == 3 and result["seconds"] > 0
    assert result["examples"] == 6 and result["tokens"] == 6 * 32
    assert result["cuda_peak_mb"] and result["cuda_peak_mb"] > 0
    if precision == "fp32":
        assert result["skipped_steps"] == 0


def test_bench_script_fp16_end_to_end(tmp_path, tiny_model_dir):
    """The command a T4 user runs, shrunk: parent + both child processes, fp16, the table printed."""
    cmd = [sys.executable, str(REPO / "scripts" / "bench.py"), "--model", str(tiny_model_dir("llama")),
           "--workloads", "fixed", "--steps", "2", "--warmup", "1", "--repeats", "1", "--seq-len", "32",
           "--micro-batch", "2", "--precision", "fp16", "--cache", str(tmp_path / "cache"),
           "--json", str(tmp_path / "bench.json")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "bench.json").read_text())
    assert set(results["workloads"]["fixed"]) == {"lora-cli", "peft"}
    assert "| fixed | lora-cli |" in proc.stdout


# --- 9. QLoRA: a 4-bit base on CUDA -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wide_model_dir(tmp_path_factory):
    """A trainable tiny llama of hidden size 64 (4-bit quantizes in blocks of 64 values)."""
    from helpers import save_wide

    return save_wide("llama", tmp_path_factory.mktemp("wide_llama"), init_range=0.2)


@pytest.mark.parametrize("precision", ["fp16", pytest.param("bf16", marks=needs_bf16)])
def test_qlora_trains_on_cuda(precision, tmp_path, wide_model_dir, trained_models):
    """model.load_in_4bit on the GPU: the linear layers are NF4 Linear4bit computing in the training precision, LoRA
    fp32 on the GPU, the loss falls, and the adapter reloads on a 4-bit base for lora-generate --load-in-4bit."""
    pytest.importorskip("bitsandbytes")
    from lora_cli.cli import generate_app, train_app

    config = _config(tmp_path, wide_model_dir, model={"load_in_4bit": True},
                     train={"precision": precision, "max_steps": 40, "gradient_checkpointing": True})
    result = runner.invoke(train_app, [str(config)])
    assert result.exit_code == 0, result.output
    (model,) = trained_models
    compute = torch.float16 if precision == "fp16" else torch.bfloat16
    # Our LoRA layer keeps the Linear4bit it wraps beside it (not as a child module), with the same weight.
    from lora_cli.inject import lora_layers

    four_bit = [layer._base_holder[0] for layer in lora_layers(model).values()]
    assert four_bit and all(type(m).__name__ == "Linear4bit" for m in four_bit)
    assert all(m.compute_dtype == compute and m.weight.device.type == "cuda" for m in four_bit)
    assert all(m.weight.quant_state.quant_type == "nf4" for m in four_bit)
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    assert lora and all(p.dtype == torch.float32 and p.device.type == "cuda" for p in lora)
    records = [r for r in metrics(tmp_path / "out") if "loss" in r]
    assert records[-1]["loss"] < 0.5 * records[0]["loss"], [r["loss"] for r in records]
    answer = runner.invoke(generate_app, [str(wide_model_dir), "--adapter", str(tmp_path / "out"), "--load-in-4bit",
                                          "--prompt", "hello", "--temperature", "0", "--max-new-tokens", "8"])
    assert answer.exit_code == 0, answer.output


def test_qlora_lora_grads_match_the_dequantized_reference_on_cuda(wide_model_dir):
    """LoRA gradients on the 4-bit base equal those on a 16-bit model holding the dequantized weights."""
    pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as bnb_functional

    from lora_cli.inject import LoraSettings, apply_lora
    from lora_cli.losses import causal_lm_loss
    from lora_cli.models import load_base_model

    quantized = load_base_model(str(wide_model_dir), torch.float16, load_in_4bit=True, compute_dtype=torch.float16,
                                device="cuda")
    reference = load_base_model(str(wide_model_dir), torch.float16, device="cuda")
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if type(module).__name__ == "Linear4bit":
                weight = bnb_functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
                reference.get_submodule(name).weight.copy_(weight.to(torch.float16))
    grads = []
    for model in (quantized, reference):
        apply_lora(model, LoraSettings(r=8, alpha=16, target_modules="all-linear"))
        torch.manual_seed(0)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_" in name:
                    param.copy_(torch.randn_like(param) * 0.1)
        ids = tiny.sample_input_ids().to(DEVICE)
        with torch.autocast("cuda", dtype=torch.float16):
            loss, n = causal_lm_loss(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if "lora_" in n})
    for name, grad in grads[1].items():
        assert relative_error(grads[0][name], grad) < 2e-2, name


# --- 10. the sync-free step, packed attention in one call per layer, fused AdamW (issue 21) ----------------------


def _packed_and_padded(dtype):
    """A grouped-query tiny model in `dtype` with fp32 LoRA, and the same five examples as a padded batch and as two
    packed rows (with the layout the training collate step makes), on the GPU."""
    from helpers import examples
    from lora_cli import data
    from lora_cli.losses import loss_positions
    from lora_cli.packing import PackedLayout

    exs = examples([11, 4, 8, 6, 13])
    padded = data.collate(exs, pad_token_id=3)
    rows = [exs[:3], exs[3:]]
    packed = data.collate_packed(rows, pad_token_id=3)
    packed["packed_layout"] = PackedLayout.from_lengths([[len(e) for e in row] for row in rows],
                                                        packed["input_ids"].shape[1])
    from lora_cli.training.step import to_device

    batches = [to_device({**b, **loss_positions(b["labels"])}, torch.device(DEVICE)) for b in (padded, packed)]
    return _half_lora_model("llama", dtype), *batches


def _loss_and_grads(model, batch, dtype):
    from helpers import trainable
    from lora_cli.losses import causal_lm_loss

    with torch.autocast(DEVICE, dtype=dtype):
        loss, n_tokens = causal_lm_loss(model, batch)
    return loss, n_tokens, torch.autograd.grad(loss, trainable(model))


@pytest.mark.parametrize("kernel", ["varlen", "block-mask"])
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=["fp16", "bf16"])
def test_packed_rows_in_one_attention_call_per_layer_equal_the_padded_batch(dtype, kernel, monkeypatch):
    """lora-cli's training attention on packed rows: one varlen flash call per layer (compute capability 8.0+) or,
    as on a T4 (flash disabled), one memory-efficient sdpa call with a block-diagonal mask: the padded batch's loss
    and LoRA gradients either way, with no read of the position ids and one attention call per layer."""
    import lora_cli.packing as packing

    if kernel == "varlen" and not HAS_BF16:
        pytest.skip("varlen flash attention needs compute capability 8.0+")
    model, padded, packed = _packed_and_padded(dtype)
    expected, expected_n, expected_grads = _loss_and_grads(model, padded, dtype)
    calls = collections.Counter()
    for name in ("_attend_varlen", "_attend_per_example", "_sdpa"):
        real = getattr(packing, name)
        monkeypatch.setattr(packing, name, (lambda real, name: lambda *a, **k: calls.update([name]) or real(*a, **k))(
            real, name))
    flash_before = torch.backends.cuda.flash_sdp_enabled()
    torch.backends.cuda.enable_flash_sdp(kernel == "varlen")
    try:
        with packing.packed_attention(model, DEVICE):
            assert model.config._attn_implementation == packing.TRAIN_SDPA
            calls.clear()  # (the packing check's forward)
            torch.cuda.set_sync_debug_mode("error")
            try:
                got, got_n, got_grads = _loss_and_grads(model, packed, dtype)
            finally:
                torch.cuda.set_sync_debug_mode("default")
    finally:
        torch.backends.cuda.enable_flash_sdp(flash_before)
    layers = model.config.num_hidden_layers
    assert calls == ({"_attend_varlen": layers} if kernel == "varlen" else {"_sdpa": layers})
    tol = 1e-2 if dtype == torch.float16 else 4e-2
    assert got_n == expected_n
    assert abs(got.item() - expected.item()) < tol * abs(expected.item())
    for g, e in zip(got_grads, expected_grads):
        assert relative_error(g, e) < 5 * tol


def test_fused_adamw_on_cuda_matches_foreach_and_loads_its_state():
    """make_optimizer's fused AdamW on CUDA updates as foreach AdamW does (within fp32 rounding), and each loads
    the other's state_dict and goes on alike (a checkpoint written by either resumes in either)."""
    from helpers import trainable
    from lora_cli.config import validate_config
    from lora_cli.training.optim import make_optimizer

    cfg = validate_config({"model": {"name_or_path": "x"}, "data": {"path": "x"},
                           "train": {"learning_rate": 1e-2, "weight_decay": 0.01}})
    models = [_half_lora_model("llama", torch.float16) for _ in range(2)]
    fused = make_optimizer(models[0], cfg)
    assert fused.defaults["fused"]
    plain = torch.optim.AdamW(trainable(models[1]), lr=1e-2, weight_decay=0.01, foreach=True)
    torch.manual_seed(0)
    grads = [[torch.randn_like(p) for p in trainable(models[0])] for _ in range(3)]

    def step(model, optimizer, g):
        for p, gp in zip(trainable(model), g):
            p.grad = gp.clone()
        optimizer.step()

    for g in grads[:2]:
        step(models[0], fused, g)
        step(models[1], plain, g)
    for a, b in zip(trainable(models[0]), trainable(models[1])):
        assert relative_error(a, b) < 1e-5
    swapped_fused = make_optimizer(models[1], cfg)
    swapped_fused.load_state_dict(plain.state_dict())
    swapped_plain = torch.optim.AdamW(trainable(models[0]), lr=1e-2, weight_decay=0.01, foreach=True)
    swapped_plain.load_state_dict(fused.state_dict())
    step(models[1], swapped_fused, grads[2])
    step(models[0], swapped_plain, grads[2])
    for a, b in zip(trainable(models[0]), trainable(models[1])):
        assert relative_error(a, b) < 1e-5


@pytest.mark.parametrize("packing", [False, True], ids=["unpacked", "packed"])
@pytest.mark.parametrize("precision", ["fp16", pytest.param("bf16", marks=needs_bf16)])
def test_a_plain_training_step_never_syncs_on_cuda(precision, packing, tmp_path, trainable_model_dir, monkeypatch):
    """The real lora-train loop, with torch.cuda.set_sync_debug_mode("error") over optimizer steps 2 and 3 (neither
    logs, evaluates nor checkpoints): any host-device synchronisation in them (a read of a loss, a flag, a position,
    a pageable copy) raises. fp16 with its loss scaler, bf16; packed rows and padded batches."""
    from helpers import make_config
    from lora_cli.config import load_config
    from lora_cli.train import train
    from lora_cli.training import loop
    from test_host_syncs import CHAT_ROWS

    windows = [0]
    real = loop.accumulate_gradients

    def marked(*args, **kwargs):
        windows[0] += 1
        torch.cuda.set_sync_debug_mode("error" if windows[0] in (2, 3) else "default")
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "accumulate_gradients", marked)
    config = make_config(tmp_path, trainable_model_dir("llama"), rows=CHAT_ROWS,
                         data={"packing": packing, "max_length": 64},
                         train={"max_steps": 5, "logging_steps": 5, "micro_batch_size": 2, "precision": precision,
                                "gradient_accumulation_steps": 2, "max_grad_norm": 1.0})
    try:
        result = train(load_config(config), quiet=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert windows[0] >= 4 and result.state.global_step == 5
