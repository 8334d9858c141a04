"""scripts/bench.py's step timing: one end per optimizer step, applied or skipped by fp16's loss scaler, paired with
the batches collated by then (issue 14 item 1: skipped steps used to end the run with "only N steps ... were seen")."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

import amp_emulation
import bench_child  # scripts/ is on sys.path (conftest)
from lora_cli.training import plan


def load_bench(name: str = "bench_under_test"):
    """scripts/bench.py as a module (it is a script, not part of the package); its own modules (bench_child,
    synthetic, memprofile) import from scripts/, which conftest puts on sys.path as running the script does."""
    path = Path(__file__).resolve().parent.parent / "scripts" / "bench.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fixed_child_args(bench, tool: str, precision: str, seq_len: int, model_dir: Path, tmp_path: Path, monkeypatch,
                     text_repeats: int = 3):
    """The arguments of one bench child run on the fixed workload (3 measured steps of micro batch 2, after 1), with
    its data written: 32 rows of a sentence repeated `text_repeats` times, longer than `seq_len` tokens."""
    # The lora-cli child observes the training collate step to count batches: its observer is gone afterwards.
    monkeypatch.setattr(plan, "COLLATE_OBSERVERS", [])
    data = tmp_path / "fixed.jsonl"
    text = " ".join(["the lighthouse of quillhaven is painted green"] * text_repeats)
    data.write_text("".join(json.dumps({"text": f"{text} {i}"}) + "\n" for i in range(32)))
    return bench.build_parser().parse_args([
        "--child", tool, "--workload", "fixed", "--data", str(data), "--result", str(tmp_path / "result.json"),
        "--model", str(model_dir), "--steps", "3", "--warmup", "1", "--micro-batch", "2", "--seq-len",
        str(seq_len), "--max-length", "64", "--r", "4", "--alpha", "8", "--precision", precision,
    ])


@pytest.fixture(scope="module")
def bench():
    return load_bench()


def test_measured_steps_take_the_batches_collated_between_their_ends(bench):
    """Ends after steps 1..4; window 3 made no optimizer step (lora-cli skips a non-finite loss without one), so
    the step ending 4th consumed two batches: both lie in the measured interval, which they took time in."""
    batches = []
    clock = bench_child.StepClock(batches)
    for n_batches, skipped in [(1, False), (1, True), (2, False), (1, False)]:
        batches.extend([(1, 10 * (len(batches) + 1), 16)] * n_batches)
        clock._tick(skipped)
    timed = clock.measured(warmup=1, steps=3)
    assert timed["batches"] == batches[1:]  # all 4 batches after the first step's end
    assert timed["skipped_steps"] == 1 and timed["skipped_before"] == 0
    assert len(timed["step_seconds"]) == 3
    assert timed["seconds"] == pytest.approx(clock.ends[3] - clock.ends[0])
    with pytest.raises(SystemExit, match="only 4 optimizer steps"):
        clock.measured(warmup=2, steps=3)


@pytest.mark.parametrize("tool", ["lora-cli", "peft"])
def test_fp16_child_run_with_skipped_steps_times_every_batch(bench, tool, tiny_model_dir, tmp_path, monkeypatch):
    """Under emulated fp16 AMP with an initial loss scale of 2^22 the scaler skips every step of this tiny run:
    the child must still time all of them, against their batches, and say how many were skipped."""
    pytest.importorskip("peft")
    args = fixed_child_args(bench, tool, "fp16", 16, tiny_model_dir("llama"), tmp_path, monkeypatch)
    with amp_emulation.emulated_fp16(init_scale=2.0**22):
        bench.run_child(args)
    result = json.loads(Path(args.result).read_text())
    assert result["skipped_steps"] == 3 and result["skipped_warmup_steps"] == 1
    assert len(result["step_seconds"]) == 3 and result["seconds"] > 0
    assert result["examples"] == 3 * 2  # 3 measured steps of micro batch 2
    assert result["tokens"] == result["padded_tokens"] == 3 * 2 * 16  # every example truncated to seq_len
    # The clock is unhooked afterwards: Accelerate's optimizer step is the original again.
    from accelerate.optimizer import AcceleratedOptimizer

    assert AcceleratedOptimizer.step.__qualname__ == "AcceleratedOptimizer.step"
