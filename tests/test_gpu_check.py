"""scripts/gpu_check.sh: without CUDA it says so and exits 0; its Python stages run end to end (on CPU, tiny)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA: the check would run")
def test_gpu_check_without_cuda_says_so_and_exits_0(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(tmp_path))
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh")], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA GPU here" in proc.stdout and "nothing to check" in proc.stdout
    assert list(tmp_path.iterdir()) == []  # no report for a check that did not run


def test_estimate_check_stage_runs_end_to_end(tmp_path):
    """The estimate-vs-measured stage with tiny shapes in fp32 (one on a 4-bit base): model, data, config,
    --estimate, three steps."""
    md = tmp_path / "estimate.md"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), "estimate-check", "--smoke",
                           "--workdir", str(tmp_path / "work"), "--md", str(md)],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = md.read_text().splitlines()
    assert table[0].startswith("| configuration | estimated allocated") and len(table) == 5
    assert "tiny llama packed" in table[3] and "tiny llama 4-bit" in table[4]
    for i in (1, 2):  # it really trained, also on the 4-bit base
        assert (tmp_path / "work" / f"out{i}" / "adapter_model.safetensors").is_file()
