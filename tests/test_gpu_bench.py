"""scripts/gpu_bench.sh / gpu_bench.py, the prepared GPU benchmark of issue 21: what can run without a GPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import gpu_bench  # scripts/ is on sys.path (conftest)

REPO = Path(__file__).resolve().parent.parent


def test_the_plan_covers_both_models_settings_and_workloads():
    args = gpu_bench.build_parser().parse_args([])
    runs = gpu_bench.plan_runs(args)
    assert len(runs) == 2 * (5 + 6)  # the native setting also runs lora-cli unpacked without rounding
    assert {r[:2] for r in runs} == {(m, s) for m in ("smollm2-135m", "llama-3.2-1b") for s in ("t4", "native")}
    assert ("llama-3.2-1b", "t4", "variable", "lora-cli", "unpacked") in runs
    t4 = gpu_bench.bench_args(args, Path("m"), "t4")
    assert t4.precision == "fp16" and t4.no_flash and t4.memory_cap_gib == 15 and not t4.pad_multiple
    assert gpu_bench.bench_args(args, Path("m"), "native", "unpacked, pad 1").pad_multiple == 1
    only = gpu_bench.build_parser().parse_args(["--workloads", "fixed", "--settings", "native"])
    assert {r[2] for r in gpu_bench.plan_runs(only)} == {"fixed"}


def test_the_table_pairs_each_lora_cli_row_with_peft_and_lists_what_is_owed():
    def run(tokens, seconds, peak, syncs):
        return {"tokens": tokens, "seconds": seconds, "cuda_peak_mb": peak, "peak_rss_mb": 1.0,
                "syncs_per_step": syncs}

    results = {
        ("smollm2-135m", "native", "fixed", "lora-cli"): run(3000, 1.0, 700.0, 0.0),
        ("smollm2-135m", "native", "fixed", "peft"): run(2000, 1.0, 1000.0, 8.0),
        ("smollm2-135m", "native", "variable", "lora-cli packed"): run(6000, 2.0, 500.0, 0.0),
    }
    owed = [("llama-3.2-1b", "t4", "fixed", "peft")]
    lines = gpu_bench.table(results, owed, {"native": "bf16"})
    assert lines[0].startswith("| model | setting | workload | lora-cli tokens/s | PEFT tokens/s | ratio")
    assert lines[2] == "| smollm2-135m | native (bf16) | fixed | 3000 | 2000 | 1.50x | 700 | 1000 | 0.70x | 0.0 | 8.0 |"
    assert lines[3] == "| smollm2-135m | native (bf16) | variable packed | 3000 | - | - | 500 | - | - | 0.0 | - |"
    assert lines[4].startswith("| llama-3.2-1b | t4 | fixed | owed: peft |")
    assert len(lines) == 5


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA: the bench would run")
def test_the_shell_command_without_cuda_says_so_and_exits_0(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(tmp_path))
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_bench.sh")], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA GPU here" in proc.stdout
    assert list(tmp_path.iterdir()) == []


def test_a_dry_run_measures_both_tools_and_writes_the_table(tmp_path):
    """The whole path on the CPU with a tiny model, one step a run: models, data, both tools' child runs, the files."""
    pytest.importorskip("peft")
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_bench.py"), "--dry-run", "--out",
                           str(tmp_path), "--cache", str(tmp_path / "cache"), "--models", "smollm2-135m",
                           "--settings", "native", "--workloads", "fixed", "--budget", "600"],
                          capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = (tmp_path / "gpu_bench.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| smollm2-135m | native"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == "fixed" and float(cells[3]) > 0 and float(cells[4]) > 0 and cells[5].endswith("x")
    assert (tmp_path / "gpu_bench.json").is_file() and "owed" not in text
