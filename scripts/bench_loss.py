"""The output head + cross-entropy alone (`python scripts/bench.py --loss-only`): transformers' full logits against
lora-cli's fused chunks at several sizes and checkpointed chunks, on a model's (vocab, hidden) shape."""

from __future__ import annotations

import statistics
import time


def bench_loss(args) -> None:
    """Forward + backward of head and cross-entropy alone, on the model's (vocab, hidden) shape, three ways:
    transformers' full logits, lora-cli's fused chunks at several sizes, and checkpointed chunks (recompute)."""
    import torch
    import torch.nn.functional as F
    import transformers
    from torch.utils.checkpoint import checkpoint

    from lora_cli.losses import chunk_rows, head_cross_entropy

    if args.threads:
        torch.set_num_threads(args.threads)
    config = transformers.AutoConfig.from_pretrained(args.model)
    vocab, hidden_size, n = config.vocab_size, config.hidden_size, args.loss_tokens
    head = torch.nn.Linear(hidden_size, vocab, bias=False).requires_grad_(False)
    targets = torch.randint(0, vocab, (n,))

    def plain(h):  # what model(..., labels=...) does: all logits, upcast, log-softmax, NLL
        return F.cross_entropy(head(h).float(), targets, reduction="sum")

    def checkpointed(rows):
        def loss(h):
            return sum(checkpoint(lambda a, b: F.cross_entropy(head(a).float(), b, reduction="sum"),
                                  h[i : i + rows], targets[i : i + rows], use_reentrant=False)
                       for i in range(0, n, rows))
        return loss

    default = chunk_rows(vocab)
    sizes = [r for r in sorted({64, 128, 256, 512, 1024, 2048, default}) if r <= n]
    candidates = {"full logits (transformers)": plain}
    candidates.update({f"fused, {r} rows{' (default)' if r == default else ''}":
                       (lambda r: lambda h: head_cross_entropy(head, h, targets, r))(r) for r in sizes})
    candidates.update({f"checkpointed, {r} rows": checkpointed(r) for r in (default, 1024)})
    times: dict[str, list[float]] = {k: [] for k in candidates}
    for rep in range(args.repeats + 1):  # the first round warms up
        for name, fn in candidates.items():
            h = torch.randn(n, hidden_size, requires_grad=True)
            start = time.perf_counter()
            fn(h).backward()
            if rep:
                times[name].append(time.perf_counter() - start)
    flops = 4 * vocab * hidden_size * n
    print(f"loss alone: {n} tokens, vocab {vocab}, hidden {hidden_size}; {args.repeats} alternating repeats, median")
    print("| method | ms | GFLOP/s (4·V·H per token) | largest fp32 logits tensor |")
    print("|---|---|---|---|")
    for name, ts in times.items():
        ms = statistics.median(ts) * 1000
        rows = n if name.startswith("full") else int(name.split(", ")[1].split()[0])
        print(f"| {name} | {ms:.0f} | {flops / ms / 1e6:.1f} | {rows * vocab * 4 / 2**20:.0f} MiB |")
