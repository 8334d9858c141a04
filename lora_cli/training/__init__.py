"""The training side of lora-train, one job per module; `lora_cli.train.train` wires them: setup -> fit -> finish.

state.py     where the run is (TrainState) and what it produced (TrainResult)
plan.py      the epoch's micro batches and the number of optimizer steps
optim.py     optimizer and learning-rate schedule
step.py      one optimizer step's forward and backward, on one process or several
evaluation.py  validation loss
checkpoint.py  adapter folders and checkpoints
metrics.py   the one sink every record goes through (console, metrics.jsonl)
console.py   what the user sees: progress bar, data summary, dry run
loop.py      the loop itself
"""
