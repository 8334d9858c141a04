"""The training side of lora-train, one job per module; `lora_cli.train.train` wires them: setup -> fit -> finish.

state.py       what setup fixes (Run, frozen), what the loop changes (LoopState, holding TrainState), the result
plan.py        the epoch's micro batches and the number of optimizer steps
optim.py       optimizer (with LoRA+ groups) and learning-rate schedule
step.py        one optimizer step's forward and backward, on one process or several; attention kernels
loop.py        the loop itself (fit): updates, skipped steps, logging, evaluation, checkpoints, stop requests
evaluation.py  validation loss
(lora_cli/layout.py: every name in output_dir and in checkpoint-<step>/, below every module that reads them)
snapshot.py    what output_dir holds (result, checkpoints), read once
resume.py      where a run starts (fresh or from a checkpoint), as pure functions of a snapshot, and what a resumed
               run may change
start.py       the state a run starts from, its trackers and metrics sink
checkpoint.py  adapter folders and full-state checkpoints: writing, pruning, reading their tensors back
rng.py         the random generators: captured, restored, kept untouched
result.py      the end of a run: final evaluation, best weights, the result published, merge_at_end
outdir.py      the output folder's rules, its lock, leftovers of killed runs, the atomic publish
signals.py     Ctrl-C and SIGTERM: finish the step, checkpoint, stop
metrics.py     the one sink every record goes through (console, live metrics.jsonl, trackers)
trackers.py    TensorBoard / W&B through Accelerate's tracker classes
plot.py        loss.png
samples.py     sample answers to train.eval_prompts
console.py     progress bar, data summary, dry run
summary.py     the closing table
"""
