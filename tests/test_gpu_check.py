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


def _wheel(folder: Path, name: str, body: str) -> None:
    """A minimal pure-Python wheel holding one module `name` (pip needs only METADATA, WHEEL and RECORD)."""
    import zipfile

    folder.mkdir(exist_ok=True)
    info = f"{name}-1.0.dist-info"
    with zipfile.ZipFile(folder / f"{name}-1.0-py3-none-any.whl", "w") as wheel:
        wheel.writestr(f"{name}.py", body)
        wheel.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
        wheel.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                        "Tag: py3-none-any\n")
        wheel.writestr(f"{info}/RECORD", "")


def _install_wheels(root: Path) -> subprocess.CompletedProcess:
    """scripts/gpu_common.sh's install_wheels, as gpu_check.sh and gpu_bench.sh source it, in `root`."""
    script = (f'source {REPO / "scripts" / "gpu_common.sh"}; install_wheels gpu_check "$ROOT/wheels.log"; '
              # from / : python -c puts its working directory before PYTHONPATH
              'echo "PYTHONPATH=$PYTHONPATH"; cd / && "$PY" -c "import wheeled; print(wheeled.WHERE)"')
    env = dict(os.environ, PY=sys.executable, ROOT=str(root), WHEEL_SITE=str(root / "site"))
    env.pop("PYTHONPATH", None)
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, cwd=root, timeout=120)


def test_the_wheels_in_dot_whl_are_installed_first_on_the_path(tmp_path):
    (tmp_path / "wheeled.py").write_text("WHERE = 'checkout'\n")  # the same name in the checkout loses to the wheel
    _wheel(tmp_path / ".whl", "wheeled", "WHERE = 'wheel'\n")
    proc = _install_wheels(tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [f"PYTHONPATH={tmp_path / 'site'}:{tmp_path}", "wheel"]


def test_a_wheel_that_does_not_install_is_reported_and_the_checkout_stays_on_the_path(tmp_path):
    (tmp_path / "wheeled.py").write_text("WHERE = 'checkout'\n")
    (tmp_path / ".whl").mkdir()
    (tmp_path / ".whl" / "broken-1.0-py3-none-any.whl").write_text("not a zip file")
    proc = _install_wheels(tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [f"gpu_check: installing .whl/ failed (see {tmp_path}/wheels.log)",
                                        f"PYTHONPATH={tmp_path}", "checkout"]
