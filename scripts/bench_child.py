"""scripts/bench.py's measured runs: one tool (lora-cli or PEFT + transformers Trainer) trains in this process while
`StepClock` times its optimizer steps, counts the host syncs of the measured ones (CUDA) and profiles memory (CPU).

`python scripts/bench.py` starts each run as `python scripts/bench.py --child TOOL ...` (its own process, so peak
memory is the run's own) and reads the result file it writes.
"""

from __future__ import annotations

import json
import resource
import tempfile
import time
import warnings
from pathlib import Path


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

    def __init__(self, batches: list, profile_after: int | None = None, count_syncs: tuple[int, int] | None = None):
        self.batches = batches
        self.count_syncs = count_syncs  # (first, last) step ends to count host syncs between (CUDA)
        self.syncs: int | None = None
        self._caught = None
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
        if self._caught is not None:
            import torch

            torch.cuda.set_sync_debug_mode("default")
            self._caught.__exit__(None, None, None)
            self._caught = None
        if self.profiler is not None:
            self.profiler.stop()
            self.profiler = None

    def _tick(self, skipped: bool):
        import torch

        if torch.cuda.is_available():
            mode = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode(0)  # the clock's own wait is not the tool's
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode(mode)
        self.ends.append(time.perf_counter())
        if self.count_syncs is not None:
            self._count_syncs(len(self.ends))
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

    def _count_syncs(self, step_ends: int) -> None:
        """Between the chosen step ends, every host-device synchronisation the tool makes is a warning of
        torch.cuda.set_sync_debug_mode("warn"): count them."""
        import torch

        first, last = self.count_syncs
        if step_ends == first:
            self._caught = warnings.catch_warnings(record=True)
            self._records = self._caught.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        elif step_ends == last and self._caught is not None:
            torch.cuda.set_sync_debug_mode("default")
            self._caught.__exit__(None, None, None)
            self.syncs = sum("synchroniz" in str(w.message) for w in self._records)
            self._caught = None

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
    """lora-cli's own product loop, train(cfg), observed (never changed) through its collate observers."""
    from lora_cli.config import validate_config
    from lora_cli.train import train
    from lora_cli.training import loop, plan

    if args.pad_multiple:  # lora-train pads unpacked GPU batches to loop.PAD_MULTIPLE: measure another multiple
        loop.PAD_MULTIPLE = args.pad_multiple

    def observe(rows, batch):
        examples = [ex for row in rows for ex in row]
        batches.append((len(examples), sum(len(ex) for ex in examples), batch["input_ids"].numel()))

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
        plan.COLLATE_OBSERVERS.append(observe)
        try:
            train(cfg, quiet=True)
        finally:
            plan.COLLATE_OBSERVERS.remove(observe)


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
    if args.no_flash:  # what a T4 (compute capability 7.5) gets: no flash attention
        torch.backends.cuda.enable_flash_sdp(False)
    if args.memory_cap_gib and torch.cuda.is_available():  # a smaller card's memory (a T4: 15 GiB)
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_cap_gib * 2**30 / total))
    rss_start = _rss_mb()
    batches: list[tuple[int, int, int]] = []
    syncs = (args.warmup, args.warmup + args.steps) if torch.cuda.is_available() else None
    with StepClock(batches, profile_after=args.warmup + args.steps if _profiles_memory() else None,
                   count_syncs=syncs) as clock:
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
        # host-device synchronisations per measured step (CUDA: set_sync_debug_mode("warn") warnings)
        "syncs_per_step": clock.syncs / args.steps if clock.syncs is not None else None,
    }
    Path(args.result).write_text(json.dumps(result))
