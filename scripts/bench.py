#!/usr/bin/env python
"""Benchmark lora-cli against PEFT + transformers Trainer on the same model, data and hyperparameters.

    python scripts/bench.py                      # default ~35M Llama (random weights, 32k BPE vocab), both workloads
    python scripts/bench.py --model models/SmolLM2-135M-Instruct --steps 4
    python scripts/bench.py --gradient-checkpointing
    python scripts/bench.py --workloads variable --also-unpacked --repeats 3
    python scripts/bench.py --load-in-4bit       # QLoRA: both tools on an NF4 base (bitsandbytes)

Each run is its own subprocess (so peak memory is the run's own), runs alternate between the two tools
(A B A B ...), and the table shows the median over repeats. Both tools train the same tokenized examples with the
same LoRA rank, alpha, targets, micro batch, sequence length, steps, learning-rate schedule, clipping and
precision (fp32 on CPU). Measured are the steps after `--warmup` steps, from the end of one optimizer step to the end
of another (Accelerate's optimizer step, which both tools call, whether fp16's loss scaler applies or skips it):

* examples/s and tokens/s counting only non-padding tokens (every non-padding token is trained in both tools:
  lora-cli runs with data.train_on_inputs=true to match DataCollatorForLanguageModeling, which trains everything);
* peak memory: peak RSS of the run's process on CPU, torch.cuda.max_memory_allocated on GPU;
* the FLOP ceiling: measured fp32 matmul GFLOP/s / (4 x matmul parameters) tokens/s (forward 2N plus the
  input-gradient backward 2N; LoRA's own small matmuls and attention scores are not counted), and the fraction of
  it each run reaches.

Workloads:
  fixed     every example exactly --seq-len tokens (text format, truncated): raw speed, no padding anywhere.
  variable  chat-format instruction data, lengths spread like real chat data (log-normal, 20..512 tokens).
            lora-cli packs (data.packing=true); PEFT+Trainer uses its defaults (random order, pad to the longest).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = REPO / "runs" / "bench"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The default model: a small Llama (GQA, SwiGLU, tied embeddings like SmolLM2) with a realistic 32k vocabulary,
# so that the output head and the loss weigh in a step as they do in real models.
DEFAULT_MODEL = dict(
    vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=8,
    num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=True, rms_norm_eps=1e-5,
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# --------------------------------------------------------------------------------------------------------------
# Offline model, tokenizer and data


def _lexicon(rng: random.Random, size: int = 80000) -> list[str]:
    """Pseudo-words from syllables: a Zipf-distributed text over them trains a BPE vocabulary of realistic size."""
    cons = list("bcdfghjklmnprstvwz") + ["ch", "sh", "th", "qu", "br", "st", "tr", "pl"]
    vows = ["a", "e", "i", "o", "u", "ai", "ea", "ou", "y"]
    codas = ["", "", "", "n", "r", "s", "t", "l", "m", "nd", "st"]
    sylls = [c + v + k for c in cons for v in vows for k in codas]
    words: set[str] = set()
    while len(words) < size:
        words.add("".join(rng.choice(sylls) for _ in range(rng.choice([1, 2, 2, 3, 3, 4]))))
    lex = sorted(words)
    rng.shuffle(lex)
    return lex


class WordSource:
    def __init__(self, seed: int = 0):
        self.rng = random.Random(seed)
        self.lex = _lexicon(self.rng)
        self.cum = list(_cumsum([1.0 / (i + 10) for i in range(len(self.lex))]))

    def words(self, n: int) -> str:
        return " ".join(self.rng.choices(self.lex, cum_weights=self.cum, k=n))


def _cumsum(xs):
    total = 0.0
    for x in xs:
        total += x
        yield total


def build_default_model(folder: Path, vocab_size: int = 32000) -> Path:
    """A random ~35M-parameter Llama and a 32k byte-level BPE tokenizer, both built offline, saved as an HF folder.

    A `vocab_size` above 32000 widens only the model's embedding and head (the tokenizer never emits the extra ids):
    the compute and memory of a large-vocabulary model's output layer, on the same text."""
    if (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file():
        return folder
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    print(f"[bench] building the default model in {folder} (once)", flush=True)
    source = WordSource(seed=1)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=min(vocab_size, DEFAULT_MODEL["vocab_size"]), special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator((source.words(50) for _ in range(12000)), trainer)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|im_start|>", pad_token="<pad>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        **{**DEFAULT_MODEL, "vocab_size": vocab_size}, bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id,
    )
    model = transformers.LlamaForCausalLM(config)
    tmp = folder.with_name(folder.name + ".tmp")
    model.save_pretrained(tmp)
    fast.save_pretrained(tmp)
    tmp.rename(folder)
    return folder


def chat_length(rng: random.Random) -> int:
    """Total tokens of one instruction example: log-normal (median ~170, long tail), clipped to 20..512, which is
    roughly how Alpaca/ShareGPT-style data spreads."""
    return int(min(512, max(20, rng.lognormvariate(math.log(170), 0.75))))


def write_workloads(folder: Path, tokenizer, seq_len: int, n_fixed: int, n_variable: int) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    source = WordSource(seed=2)
    sample = source.words(2000)
    tokens_per_word = len(tokenizer(sample, add_special_tokens=False)["input_ids"]) / 2000
    fixed = folder / f"fixed_{seq_len}.jsonl"
    if not fixed.exists():
        words = int(seq_len / tokens_per_word * 1.3) + 8  # truncated to exactly seq_len by data.max_length
        rows = [{"text": source.words(words)} for _ in range(n_fixed)]
        fixed.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    variable = folder / "variable_chat.jsonl"
    if not variable.exists():
        rng = random.Random(3)
        rows = []
        for _ in range(n_variable):
            total = chat_length(rng) - 12  # the ChatML markup takes ~12 tokens
            prompt = max(3, int(total * rng.uniform(0.2, 0.5)))
            reply = max(3, total - prompt)
            rows.append({"messages": [
                {"role": "user", "content": source.words(max(2, int(prompt / tokens_per_word)))},
                {"role": "assistant", "content": source.words(max(2, int(reply / tokens_per_word)))},
            ]})
        variable.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return {"fixed": fixed, "variable": variable}


# --------------------------------------------------------------------------------------------------------------
# Machine and model figures


def matmul_gflops(device: str = "cpu", seconds: float = 3.0) -> float:
    """Best fp32 GFLOP/s of large square matmuls: the machine's practical peak for the ceiling."""
    import torch

    best = 0.0
    n = 2048 if device == "cpu" else 8192
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    torch.matmul(a, b)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        torch.matmul(a, b)
        if device == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * n**3 / (time.perf_counter() - t) / 1e9)
    return best


def matmul_params(model_dir: Path) -> tuple[int, int]:
    """(parameters in the matmuls of one token's forward pass: every Linear/Conv1D incl. the output head, total)."""
    import torch
    import transformers
    from transformers.pytorch_utils import Conv1D

    config = transformers.AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    n = sum(m.weight.numel() for m in model.modules() if isinstance(m, (torch.nn.Linear, Conv1D)))
    head = model.get_output_embeddings()
    if head is not None and not isinstance(head, (torch.nn.Linear, Conv1D)):
        n += head.weight.numel()
    total = sum(p.numel() for p in model.parameters())  # tied weights are counted once by parameters()
    return n, total


# --------------------------------------------------------------------------------------------------------------
# Child runs


class StepClock:
    """End time of every optimizer step, applied or skipped, with the number of batches collated by then.

    It wraps Accelerate's AcceleratedOptimizer.step, which both tools call once per optimizer step (lora-cli's loop
    and Trainer prepare their optimizer with Accelerate), so both are timed identically. A global optimizer-step hook
    would miss the steps that fp16's loss scaler skips (it never calls the optimizer's step then), and the timings
    would no longer line up with the batches. Pairing each end with the batch count also keeps any window that
    makes no optimizer step (lora-cli skips one with a non-finite loss) inside the measured interval it took time
    in. On CPU it also profiles the allocations of one extra step after the timed ones (`profile_after`), for the
    live-memory peak. Use it as a context manager: the wrapper is removed on exit.
    """

    def __init__(self, batches: list, profile_after: int | None = None):
        self.batches = batches
        self.ends: list[float] = []
        self.batches_at_end: list[int] = []
        self.skipped: list[bool] = []
        self.profile_after = profile_after
        self.profiler = None
        self.live_peak_mb: float | None = None
        self.peak_rss_before_profiling_mb: float | None = None
        self._restore = None

    def __enter__(self) -> "StepClock":
        from accelerate.optimizer import AcceleratedOptimizer

        original = AcceleratedOptimizer.step
        clock = self

        def step(optimizer, *args, **kwargs):
            scaler = optimizer.scaler
            scale = scaler.get_scale() if scaler is not None else None
            result = original(optimizer, *args, **kwargs)
            if optimizer.gradient_state.sync_gradients:  # a real step, not an accumulation micro batch
                # The scaler backs its scale off exactly when it found inf/NaN gradients and skipped the update.
                # (Accelerate's step_was_skipped misses that with a fused AdamW, Trainer's default: GradScaler then
                # calls its step, which skips inside the kernel.)
                clock._tick(skipped=scale is not None and scaler.get_scale() < scale)
            return result

        AcceleratedOptimizer.step = step
        self._restore = lambda: setattr(AcceleratedOptimizer, "step", original)
        return self

    def __exit__(self, *exc) -> None:
        self._restore()
        if self.profiler is not None:
            self.profiler.stop()
            self.profiler = None

    def _tick(self, skipped: bool):
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.ends.append(time.perf_counter())
        self.batches_at_end.append(len(self.batches))
        self.skipped.append(skipped)
        if self.profile_after is None:
            return
        if len(self.ends) == self.profile_after:
            from torch.profiler import ProfilerActivity, profile

            self.peak_rss_before_profiling_mb = _peak_rss_mb()  # the profiler's own memory must not count

            self.profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self.profiler.start()
        elif len(self.ends) == self.profile_after + 1 and self.profiler is not None:
            self.profiler.stop()
            self.live_peak_mb = _allocated_peak_mb(self.profiler)
            self.profiler = None

    def measured(self, warmup: int, steps: int) -> dict:
        """Seconds, batches and skipped steps of optimizer steps warmup+1 .. warmup+steps (counted from 1)."""
        w, s = warmup, steps
        if len(self.ends) < w + s:
            raise SystemExit(f"only {len(self.ends)} optimizer steps were seen; expected {w + s}")
        first, last = self.batches_at_end[w - 1], self.batches_at_end[w + s - 1]
        return {
            "seconds": self.ends[w + s - 1] - self.ends[w - 1],
            "batches": self.batches[first:last],
            "step_seconds": [b - a for a, b in zip(self.ends[w - 1 : w + s - 1], self.ends[w : w + s])],
            "skipped_steps": sum(self.skipped[w : w + s]),
            "skipped_before": sum(self.skipped[:w]),
        }


def _allocated_peak_mb(profiler) -> float:
    """Peak of PyTorch's allocated CPU bytes during the profiled step, above what was allocated when it began."""
    from memprofile import allocated_peak_bytes  # scripts/ is on sys.path when this file runs as a script

    return allocated_peak_bytes(profiler) / 2**20


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _profiles_memory() -> bool:
    import torch

    return not torch.cuda.is_available()


def _total_steps(args) -> int:
    return args.warmup + args.steps + (1 if _profiles_memory() else 0)  # + the step profiled for live memory


def _lora_targets(text: str):
    return text if text == "all-linear" else text.split(",")


def child_lora_cli(args, batches: list[tuple[int, int, int]]) -> None:
    """lora-cli's own product loop, train(cfg), observed (never changed) by wrapping its collate functions."""
    from lora_cli import data as data_lib
    from lora_cli.config import validate_config
    from lora_cli.train import train

    def counting(fn, packed: bool):
        def wrapper(items, *a, **k):
            batch = fn(items, *a, **k)
            examples = [ex for row in items for ex in row] if packed else list(items)
            batches.append((len(examples), sum(len(ex) for ex in examples), batch["input_ids"].numel()))
            return batch

        return wrapper

    data_lib.collate = counting(data_lib.collate, packed=False)
    if hasattr(data_lib, "collate_packed"):
        data_lib.collate_packed = counting(data_lib.collate_packed, packed=True)
    variable = args.workload == "variable"
    with tempfile.TemporaryDirectory() as out:
        cfg = validate_config({
            "model": {"name_or_path": str(args.model), "load_in_4bit": args.load_in_4bit},
            "lora": {"r": args.r, "alpha": args.alpha, "dropout": 0.0, "target_modules": _lora_targets(args.targets)},
            "data": {"path": str(args.data), "max_length": args.max_length if variable else args.seq_len,
                     "train_on_inputs": not args.prompt_masked, "packing": variable and not args.unpacked},
            "train": {"output_dir": out, "overwrite_output_dir": True, "max_steps": _total_steps(args),
                      "micro_batch_size": args.micro_batch, "learning_rate": 2e-4, "lr_scheduler": "linear",
                      "warmup_ratio": 0.0, "weight_decay": 0.0, "max_grad_norm": 1.0, "seed": 0,
                      "logging_steps": _total_steps(args), "precision": args.precision,
                      "gradient_checkpointing": args.gradient_checkpointing},
        })
        train(cfg, quiet=True)


def child_peft(args, batches: list[tuple[int, int, int]]) -> None:
    """PEFT + transformers Trainer with its defaults: DataCollatorForLanguageModeling, random order, pad to longest."""
    import datasets
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    from lora_cli.data import build_datasets  # only to hand both tools the very same token ids (not timed)

    tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
    variable = args.workload == "variable"
    bundle = build_datasets(str(args.data), tokenizer, max_length=args.max_length if variable else args.seq_len,
                            train_on_inputs=not args.prompt_masked, seed=0)
    if args.prompt_masked:  # lora-cli's labels (replies only), padded with -100: the usual SFT setup with Trainer
        dataset = datasets.Dataset.from_dict({"input_ids": [ex.input_ids for ex in bundle.train],
                                              "labels": [ex.labels for ex in bundle.train]})
        collator = transformers.DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100)
    else:
        dataset = datasets.Dataset.from_dict({"input_ids": [ex.input_ids for ex in bundle.train]})
        collator = transformers.DataCollatorForLanguageModeling(tokenizer, mlm=False)

    def counting_collator(features):
        batch = collator(features)
        batches.append((len(features), int(batch["attention_mask"].sum()), batch["input_ids"].numel()))
        return batch

    # The frozen base in the training precision, as lora-cli loads it (and as Trainer users load it on a GPU).
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    dtype = dtype if torch.cuda.is_available() else torch.float32  # lora-cli keeps fp32 weights on CPU
    if args.load_in_4bit:  # the usual PEFT QLoRA recipe, with lora-cli's quantization settings
        from peft import prepare_model_for_kbit_training

        compute = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
        quantization = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                       bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            args.model, dtype=dtype, quantization_config=quantization,
            device_map={"": torch.cuda.current_device() if torch.cuda.is_available() else "cpu"})
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.gradient_checkpointing)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    model = get_peft_model(model, LoraConfig(
        r=args.r, lora_alpha=args.alpha, lora_dropout=0.0, target_modules=_lora_targets(args.targets),
        task_type="CAUSAL_LM",
    ))
    with tempfile.TemporaryDirectory() as out:
        training_args = transformers.TrainingArguments(
            output_dir=out, per_device_train_batch_size=args.micro_batch, max_steps=_total_steps(args),
            learning_rate=2e-4, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
            logging_steps=10_000, save_strategy="no", report_to="none", seed=0, disable_tqdm=True,
            use_cpu=not torch.cuda.is_available(), bf16=args.precision == "bf16", fp16=args.precision == "fp16",
            gradient_checkpointing=args.gradient_checkpointing,
        )
        trainer = transformers.Trainer(model=model, args=training_args, train_dataset=dataset,
                                       data_collator=counting_collator)
        trainer.train()


def run_child(args) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    rss_start = _rss_mb()
    batches: list[tuple[int, int, int]] = []
    with StepClock(batches, profile_after=args.warmup + args.steps if _profiles_memory() else None) as clock:
        {"lora-cli": child_lora_cli, "peft": child_peft}[args.child](args, batches)
    timed = clock.measured(args.warmup, args.steps)
    measured = timed["batches"]
    result = {
        "tool": args.child,
        "seconds": timed["seconds"],
        "examples": sum(b[0] for b in measured),
        "tokens": sum(b[1] for b in measured),
        "padded_tokens": sum(b[2] for b in measured),
        "peak_rss_mb": clock.peak_rss_before_profiling_mb or _peak_rss_mb(),
        "rss_start_mb": rss_start,
        "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
        "live_step_peak_mb": clock.live_peak_mb,
        "step_seconds": timed["step_seconds"],
        # fp16: steps the loss scaler skipped (inf/NaN gradients); their time and batches count like the others.
        "skipped_steps": timed["skipped_steps"],
        "skipped_warmup_steps": timed["skipped_before"],
    }
    Path(args.result).write_text(json.dumps(result))


# --------------------------------------------------------------------------------------------------------------
# The loss alone: how the output head + cross-entropy is computed


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


# --------------------------------------------------------------------------------------------------------------
# Parent: alternate runs and print the table


def child_command(args, tool: str, workload: str, data: Path, result: Path, variant: str = "") -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", tool, "--workload", workload, "--data", str(data),
           "--result", str(result), "--model", str(args.model), "--steps", str(args.steps), "--warmup",
           str(args.warmup), "--micro-batch", str(args.micro_batch), "--seq-len", str(args.seq_len), "--max-length",
           str(args.max_length), "--r", str(args.r), "--alpha", str(args.alpha), "--targets", args.targets,
           "--precision", args.precision, "--threads", str(args.threads)]
    if args.gradient_checkpointing:
        cmd.append("--gradient-checkpointing")
    if args.load_in_4bit and "unquantized" not in variant:
        cmd.append("--load-in-4bit")
    if "unpacked" in variant:
        cmd.append("--unpacked")
    if "masked" in variant:
        cmd.append("--prompt-masked")
    return cmd


def run_one(args, tool, workload, data, variant="") -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = child_command(args, tool, workload, data, result, variant)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
            raise SystemExit(f"[bench] {tool} on {workload} failed (exit {proc.returncode}): {' '.join(cmd)}")
        run = json.loads(result.read_text())
        if run.get("skipped_steps"):
            print(f"[bench]   {run['skipped_steps']} of the {args.steps} measured steps were skipped by the fp16 loss "
                  "scaler (their time and batches are counted)", flush=True)
        return run


def summarise(runs: list[dict]) -> dict:
    def med(key):
        return statistics.median(key(r) for r in runs)

    mem = (lambda r: r["cuda_peak_mb"]) if runs[0]["cuda_peak_mb"] is not None else (lambda r: r["peak_rss_mb"])
    return {
        "examples_s": med(lambda r: r["examples"] / r["seconds"]),
        "tokens_s": med(lambda r: r["tokens"] / r["seconds"]),
        "tokens_s_runs": [r["tokens"] / r["seconds"] for r in runs],
        "padding": med(lambda r: 1 - r["tokens"] / r["padded_tokens"]),
        "peak_mb": med(mem),
        "peak_above_start_mb": med(lambda r: r["peak_rss_mb"] - r["rss_start_mb"]),
        "live_step_peak_mb": med(lambda r: r["live_step_peak_mb"] or 0.0),
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="HF model folder (default: build a ~35M Llama offline)")
    p.add_argument("--vocab-size", type=int, default=32000,
                   help="default model only: widen its embedding and head to this vocabulary (tokenizer stays 32k)")
    p.add_argument("--workloads", default="fixed,variable", help="comma list of: fixed, variable")
    p.add_argument("--steps", type=int, default=6, help="measured optimizer steps per run")
    p.add_argument("--warmup", type=int, default=2, help="steps run before measuring")
    p.add_argument("--repeats", type=int, default=2, help="runs per tool and workload, alternating A B A B")
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256, help="fixed workload: tokens per example")
    p.add_argument("--max-length", type=int, default=512, help="variable workload: data.max_length (packed row size)")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32)
    p.add_argument("--targets", default="all-linear", help="all-linear, or a comma list such as q_proj,v_proj")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--gradient-checkpointing", action="store_true", help="both tools, non-reentrant")
    p.add_argument("--load-in-4bit", action="store_true",
                   help="both tools on an NF4 4-bit base (QLoRA; PEFT with prepare_model_for_kbit_training), "
                        "and lora-cli on the unquantized base as well")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads in every run (default: torch's choice)")
    p.add_argument("--also-unpacked", action="store_true", help="variable workload: also lora-cli without packing")
    p.add_argument("--also-masked", action="store_true",
                   help="variable workload: also both tools with lora-cli's default prompt masking (loss on replies "
                        "only; PEFT+Trainer gets the same labels through DataCollatorForSeq2Seq)")
    p.add_argument("--loss-only", action="store_true", help="only time the output head + loss, several ways")
    p.add_argument("--loss-tokens", type=int, default=2048, help="--loss-only: tokens in the batch")
    p.add_argument("--json", type=Path, default=None, help="also write all results here")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where the default model and data are built")
    # internal: one measured run
    p.add_argument("--child", choices=["lora-cli", "peft"], help=argparse.SUPPRESS)
    p.add_argument("--workload", help=argparse.SUPPRESS)
    p.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--unpacked", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--prompt-masked", action="store_true", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> None:
    p = build_parser()
    args = p.parse_args(argv)
    if args.child:
        run_child(args)
        return
    if args.loss_only:
        args.model = (args.model or build_default_model(args.cache / "llama-35m-v32k")).resolve()
        bench_loss(args)
        return
    if args.warmup < 1:
        p.error("--warmup must be at least 1 (the first step is timed from the end of a warmup step)")

    import torch
    import transformers

    if args.model is None:
        name = "llama-35m-v32k" if args.vocab_size == 32000 else f"llama-v{args.vocab_size}"
        args.model = build_default_model(args.cache / name, args.vocab_size)
    args.model = args.model.resolve()
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
    n_fixed = max(64, (args.warmup + args.steps) * args.micro_batch * 2)
    data = write_workloads(args.cache / "data" / args.model.name, tokenizer, args.seq_len, n_fixed, 1000)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.threads:
        torch.set_num_threads(args.threads)
    gflops = matmul_gflops(device)
    n_matmul, n_total = matmul_params(args.model)
    ceiling = gflops * 1e9 / (4 * n_matmul)
    print("command: python " + " ".join(sys.argv))
    print(f"model {args.model.name}: {n_total / 1e6:.1f}M parameters, {n_matmul / 1e6:.1f}M in matmuls; "
          f"device {device}, {torch.get_num_threads()} threads")
    print(f"LoRA r={args.r} alpha={args.alpha:g} targets={args.targets}; micro batch {args.micro_batch}; "
          f"{args.warmup} warmup + {args.steps} measured steps; {args.repeats} alternating repeats; "
          f"precision {args.precision}; gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}"
          f"{'; 4-bit NF4 base' if args.load_in_4bit else ''}")

    results: dict = {"gflops": gflops, "matmul_params": n_matmul, "ceiling_tokens_s": ceiling, "workloads": {}}
    for workload in args.workloads.split(","):
        tools = [("lora-cli", "packed" if workload == "variable" else ""), ("peft", "")]
        if args.load_in_4bit:  # lora-cli on the unquantized base too: what 4 bits cost and save, same invocation
            tools.insert(1, ("lora-cli", "unquantized base"))
        if workload == "variable" and args.also_unpacked:
            tools.insert(1, ("lora-cli", "unpacked"))
        if workload == "variable" and args.also_masked:
            tools.insert(1, ("lora-cli", "packed, prompt masked"))
            tools.append(("peft", "prompt masked"))
        runs: dict[str, list] = {}
        for rep in range(args.repeats):
            order = tools if rep % 2 == 0 else tools[::-1]
            for tool, variant in order:
                name = f"{tool} {variant}".strip()
                print(f"[bench] {workload}: {name} (repeat {rep + 1}/{args.repeats})", flush=True)
                runs.setdefault(name, []).append(run_one(args, tool, workload, data[workload], variant))
        results["workloads"][workload] = {name: {"summary": summarise(r), "runs": r} for name, r in runs.items()}

    gflops2 = matmul_gflops(device)  # again after the runs: the machine is shared, take the better figure
    results["gflops"] = gflops = max(gflops, gflops2)
    results["ceiling_tokens_s"] = ceiling = gflops * 1e9 / (4 * n_matmul)
    print_table(results, ceiling, gflops, n_matmul, device)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def print_table(results: dict, ceiling: float, gflops: float, n_matmul: int, device: str) -> None:
    cpu = device == "cpu"
    mem_name = "peak RSS MB" if cpu else "peak CUDA MB"
    print()
    print(f"FLOP ceiling: {gflops:.1f} GFLOP/s fp32 matmul / (4 x {n_matmul / 1e6:.1f}M) = {ceiling:.0f} tokens/s")
    print()
    columns = ["workload", "tool", "examples/s", "tokens/s (non-pad)", "padding", mem_name, "peak above start MB"]
    columns += ["live step peak MB"] if cpu else []
    columns += ["of FLOP ceiling", "tokens/s per run"]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for workload, tools in results["workloads"].items():
        for name, entry in tools.items():
            s = entry["summary"]
            cells = [workload, name, f"{s['examples_s']:.2f}", f"{s['tokens_s']:.0f}", f"{s['padding']:.0%}",
                     f"{s['peak_mb']:.0f}", f"{s['peak_above_start_mb']:.0f}"]
            cells += [f"{s['live_step_peak_mb']:.0f}"] if cpu else []
            cells += [f"{s['tokens_s'] / ceiling:.0%}", ", ".join(f"{x:.0f}" for x in s["tokens_s_runs"])]
            print("| " + " | ".join(cells) + " |")
    print()
    columns = ["workload", "lora-cli / PEFT+Trainer", "examples/s", "tokens/s", "peak memory", "peak above start"]
    columns += ["live step peak"] if cpu else []
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for workload, tools in results["workloads"].items():
        for name, entry in tools.items():
            if name.startswith("peft"):
                continue
            # Every lora-cli row against PEFT+Trainer's defaults; a prompt-masked row also against PEFT+Trainer
            # trained on the same masked labels (the same objective).
            same_labels = "masked" in name and "peft prompt masked" in tools
            baselines = ["peft"] + (["peft prompt masked"] if same_labels else [])
            for baseline in baselines:
                base, s = tools[baseline]["summary"], entry["summary"]
                keys = ["examples_s", "tokens_s", "peak_mb", "peak_above_start_mb"]
                keys += ["live_step_peak_mb"] if cpu else []
                ratios = [f"{s[k] / base[k]:.2f}x" if base[k] else "-" for k in keys]
                label = name if baseline == "peft" else f"{name} (vs {baseline})"
                print("| " + " | ".join([workload, label] + ratios) + " |")


if __name__ == "__main__":
    main()
