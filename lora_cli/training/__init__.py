"""The training side of lora-train, one job per module; `lora_cli.train.train` wires them: setup -> fit -> finish.

state.py       where the run is (TrainState) and what it works with (Run)
plan.py        the epoch's micro batches and the number of optimizer steps
optim.py       optimizer (with LoRA+ groups) and learning-rate schedule
step.py        one optimizer step's forward and backward, on one process or several; attention kernels
loop.py        the loop itself: updates, skipped steps, logging, evaluation, checkpoints, stop requests
evaluation.py  validation loss
checkpoint.py  adapter folders and full-state checkpoints: writing, finding, reading back
resume.py      where a run starts (fresh or from a checkpoint) and what a resumed run may change
outdir.py      the output folder's rules, its lock, and the result published as one atomic swap
signals.py     Ctrl-C and SIGTERM: finish the step, checkpoint, stop
metrics.py     the one sink every record goes through (console, live metrics.jsonl, trackers)
trackers.py    TensorBoard / W&B through Accelerate's tracker classes
plot.py        loss.png
samples.py     sample answers to train.eval_prompts
console.py     progress bar, data summary, dry run
summary.py     the closing table
"""
