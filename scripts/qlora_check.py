#!/usr/bin/env python
"""Measurements behind lora-cli's QLoRA choices (docs/BENCHMARKS.md, section QLoRA). CPU, offline.

    python scripts/qlora_check.py logits                   # the 4-bit base against the fp32 base
    python scripts/qlora_check.py upcast --dtype float16   # which unquantized parts to keep in half precision
    python scripts/qlora_check.py merge-gap outputs/quickstart_qlora   # lora-merge's result vs the trained model
    python scripts/qlora_check.py --threads 1 layer        # the LoRA layer over a 4-bit base: plain vs fused
    python scripts/qlora_check.py footprint                # weights and RSS after loading, fp32 vs 4-bit

`--model` defaults to models/SmolLM2-135M-Instruct (scripts/fetch_smollm2.py). Logits are compared where they
predict an answer's tokens: the quickstart's 48 training conversations (logits), its 5 held-out questions with the
4-bit model's greedy answers (merge-gap); upcast uses the first 8 training conversations.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from lora_cli.adapter import load_adapter  # noqa: E402
from lora_cli.inject import LoraSettings, apply_lora  # noqa: E402
from lora_cli.models import load_base_model, load_tokenizer  # noqa: E402

QUESTIONS = REPO / "data" / "quickstart" / "questions.jsonl"
TRAIN = REPO / "data" / "quickstart" / "train.jsonl"


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def answer_batch(tokenizer, conversations: list[list[dict]]):
    """(batch, mask): the rendered conversations, right-padded, and a mask of the positions whose logits predict a
    token of the last (assistant) message."""
    texts = [tokenizer.apply_chat_template(c, tokenize=False) for c in conversations]
    prompts = [tokenizer.apply_chat_template(c[:-1], tokenize=False, add_generation_prompt=True) for c in conversations]
    tokenizer.padding_side = "right"
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    mask = torch.zeros_like(batch["attention_mask"])
    for i, prompt in enumerate(prompts):
        start = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        mask[i, start - 1 : int(batch["attention_mask"][i].sum()) - 1] = 1
    return batch, mask


@torch.no_grad()
def compare(reference: torch.Tensor, other: torch.Tensor, mask: torch.Tensor) -> str:
    """Differences of `other` from `reference` over the real (unpadded) positions."""
    keep = mask.bool()
    a, b = reference[keep].float(), other[keep].float()
    log_a, log_b = a.log_softmax(-1), b.log_softmax(-1)
    kl = (log_a.exp() * (log_a - log_b)).sum(-1)
    agree = (a.argmax(-1) == b.argmax(-1)).float().mean()
    return (f"max |logit diff| {(a - b).abs().max():.3g} (max |logit| {a.abs().max():.3g}); RMS diff / logit std "
            f"{(a - b).pow(2).mean().sqrt() / a.std():.3f}; top-1 agreement {agree:.0%}; "
            f"KL(reference || other) mean {kl.mean():.3f}, max {kl.max():.3f} nats")


def cmd_logits(args) -> None:
    tokenizer = load_tokenizer(args.model)
    batch, mask = answer_batch(tokenizer, [r["messages"] for r in rows(TRAIN)])
    with torch.no_grad():
        fp32 = load_base_model(args.model)(**batch).logits
        nf4 = load_base_model(args.model, load_in_4bit=True)(**batch).logits
    print(f"{args.model}, {int(mask.sum())} answer tokens of the quickstart data: 4-bit NF4 base vs fp32 base")
    print("  " + compare(fp32, nf4, mask))


def cmd_upcast(args) -> None:
    half = {"float16": torch.float16, "bfloat16": torch.bfloat16}[args.dtype]
    tokenizer = load_tokenizer(args.model)
    texts = [tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in rows(TRAIN)[:8]]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)

    def run(dtype, compute, autocast, upcast=()):
        """Loss and LoRA gradient of one batch: 4-bit base, parts named in `upcast` moved to fp32."""
        model = load_base_model(args.model, dtype=dtype, load_in_4bit=True, compute_dtype=compute)
        for name, param in model.named_parameters():
            if any(part in name for part in upcast):
                param.data = param.data.float()
        torch.manual_seed(0)
        apply_lora(model, LoraSettings(r=16, alpha=32, target_modules="all-linear"))
        torch.manual_seed(1)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.01)
        model.train()
        with torch.autocast("cpu", dtype=half, enabled=autocast):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
        loss.backward()
        grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
        weights = sum(p.numel() * p.element_size() for p in model.parameters() if p.dtype != torch.uint8)
        return loss.item(), grad, weights

    ref_loss, ref_grad, _ = run(torch.float32, torch.float32, False)
    print(f"{args.model}, 4-bit base, LoRA all-linear r=16 (random B), one batch of 8 quickstart conversations; "
          f"reference: everything fp32, loss {ref_loss:.4f}")
    print(f"{args.dtype} autocast, 4-bit layers computing in {args.dtype}:")
    for label, upcast in [("everything unquantized in " + args.dtype, ()), ("norms fp32", ("norm",)),
                          ("norms, embedding, head fp32 (PEFT)", ("norm", "embed", "lm_head"))]:
        loss, grad, weights = run(half, half, True, upcast)
        err = ((grad - ref_grad).norm() / ref_grad.norm()).item()
        cos = torch.nn.functional.cosine_similarity(grad, ref_grad, 0).item()
        print(f"  {label}: loss {loss - ref_loss:+.4f} from the reference; LoRA gradient relative error {err:.3f} "
              f"(cosine {cos:.4f}); weights outside the 4-bit layers (LoRA included) {weights / 2**20:.0f} MB")


def cmd_merge_gap(args) -> None:
    from lora_cli.generate import generate_text

    tokenizer = load_tokenizer(args.model)
    merged = load_base_model(args.model)  # fp32 base + adapter: lora-merge's result to 1e-4 (its verify check)
    load_adapter(merged, args.adapter)
    trained = load_base_model(args.model, load_in_4bit=True)  # the model the QLoRA run trained
    load_adapter(trained, args.adapter)
    answers = {}
    for name, model in (("4-bit base + adapter", trained), ("fp32 base + adapter", merged)):
        answers[name] = [generate_text(model, tokenizer, r["question"], temperature=0, max_new_tokens=48)
                         for r in rows(QUESTIONS)]
        hits = sum(r["expect"].lower() in a.lower() for r, a in zip(rows(QUESTIONS), answers[name]))
        print(f"{name}: {hits} of {len(answers[name])} facts; " + " | ".join(answers[name]))
    conversations = [[{"role": "user", "content": r["question"]}, {"role": "assistant", "content": a}]
                     for r, a in zip(rows(QUESTIONS), answers["4-bit base + adapter"])]
    batch, mask = answer_batch(tokenizer, conversations)
    with torch.no_grad():
        a, b = merged(**batch).logits, trained(**batch).logits
    print(f"{args.adapter}, {int(mask.sum())} answer tokens: fp32 base + adapter (= lora-merge's output) vs 4-bit "
          "base + adapter (the model as trained)")
    print("  " + compare(b, a, mask))


def cmd_layer(args) -> None:
    """Forward + backward of one LoRA layer (r=16) over a 4-bit base, 1024 tokens, alternating, median of 20:
    the plain path lora-cli takes, and the fused node fed the dequantized W (an upper bound for a fused 4-bit path:
    it saves that 16-bit W for backward, which a real one could not afford)."""
    import statistics
    import time

    import bitsandbytes as bnb

    from lora_cli.lora import LoraLinear, _FusedLoraLinear

    for in_f, out_f in ((576, 1536), (1536, 576), (2048, 2048)):
        base = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=torch.float32, quant_type="nf4")
        base.weight = bnb.nn.Params4bit(torch.randn(out_f, in_f) * 0.02, requires_grad=False, quant_type="nf4")
        base = base.to("cpu")
        base.support_avx512bf16_for_cpu = False
        layer = LoraLinear.from_base(base, r=16, alpha=32)
        torch.nn.init.normal_(layer.lora_B.weight, std=0.01)
        x = torch.randn(1024, in_f, requires_grad=True)

        def plain():
            layer(x).sum().backward()

        def fused_dequantized():
            weight = layer.dense_weight()
            _FusedLoraLinear.apply(x, None, weight, None, layer.lora_A.weight, layer.lora_B.weight, layer.scaling,
                                   False).sum().backward()

        times = {f.__name__: [] for f in (plain, fused_dequantized)}
        for _ in range(21):
            for f in (plain, fused_dequantized):
                start = time.perf_counter()
                f()
                times[f.__name__].append(time.perf_counter() - start)
        ms = {name: statistics.median(t[1:]) * 1000 for name, t in times.items()}
        print(f"{in_f} -> {out_f}: plain {ms['plain']:.1f} ms, fused on the dequantized W "
              f"{ms['fused_dequantized']:.1f} ms ({ms['plain'] / ms['fused_dequantized']:.2f}x)")


def cmd_footprint(args) -> None:
    """Each load in its own process, so its RSS is its own."""
    import subprocess

    for four_bit in (False, True):
        code = (
            "import resource, torch; from lora_cli.models import load_base_model\n"
            f"m = load_base_model({args.model!r}, load_in_4bit={four_bit})\n"
            "rss = [int(l.split()[1]) / 1024 for l in open('/proc/self/status') if l.startswith('VmRSS')][0]\n"
            "peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024\n"
            "print(f'{m.get_memory_footprint() / 2**20:.0f} MB of weights; RSS after loading {rss:.0f} MB, peak "
            "while loading {peak:.0f} MB')\n"
        )
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
        print(f"{'4-bit NF4' if four_bit else 'fp32'} base: {result.stdout.strip() or result.stderr[-2000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(REPO / "models" / "SmolLM2-135M-Instruct"))
    parser.add_argument("--threads", type=int, default=0)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("logits")
    sub.add_parser("layer")
    sub.add_parser("footprint")
    upcast = sub.add_parser("upcast")
    upcast.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    gap = sub.add_parser("merge-gap")
    gap.add_argument("adapter")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    {"logits": cmd_logits, "upcast": cmd_upcast, "merge-gap": cmd_merge_gap, "layer": cmd_layer,
     "footprint": cmd_footprint}[args.command](args)


if __name__ == "__main__":
    main()
