#!/usr/bin/env python
"""Execute notebooks/colab_t4.ipynb headless on the CPU, as CI does (scripts/check_notebook.sh), so it never rots.

The Colab-only cells (mounting Drive, downloading) are tagged `skip-execution` and skipped; the install cell installs
nothing outside Colab. A cell put right after the notebook's `parameters` cell (papermill's convention, without
papermill) points it at SmolLM2-135M in models/ (scripts/fetch_smollm2.py makes it), a few QLoRA steps, and a
temporary folder for every output. An error in any cell fails the run (exit 1) with the cell's traceback; so does a
cell that runs longer than --cell-timeout. The executed notebook, outputs and all, is written to --executed.

    .venv/bin/python scripts/check_notebook.py [--notebook notebooks/colab_t4.ipynb] [--cell-timeout 900]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError

REPO = Path(__file__).resolve().parent.parent
SMOLLM2 = REPO / "models" / "SmolLM2-135M-Instruct"
PARAMETERS_TAG = "parameters"
INJECTED_TAG = "injected-parameters"


def ci_parameters(work: Path, model: Path) -> str:
    """The CPU run: the quickstart's 135M model, three small steps, answers of four tokens, outputs under `work`."""
    return "\n".join([
        f"# Injected by scripts/check_notebook.py: the CPU run of CI ({model.name}, three QLoRA steps).",
        f"MODEL = {str(model)!r}",
        f"OUTPUT_DIR = {str(work / 'adapter')!r}",
        f"EXPORT_DIR = {str(work / 'gguf')!r}",
        f"MERGED_DIR = {str(work / 'merged')!r}",
        'TRAIN = {"max_steps": 3, "micro_batch_size": 2, "logging_steps": 1, "save_steps": 2,',
        '         "eval_prompts": ["Who serves as the mayor of the town of Quillhaven?"], "eval_max_new_tokens": 4}',
        "MAX_NEW_TOKENS = 4",
    ])


def inject_parameters(nb, source: str) -> None:
    """Put `source` in a new cell right after the cell tagged `parameters`, which it then overrides."""
    tagged = [i for i, cell in enumerate(nb.cells) if PARAMETERS_TAG in cell.get("metadata", {}).get("tags", [])]
    if len(tagged) != 1:
        raise SystemExit(f"the notebook needs exactly one cell tagged {PARAMETERS_TAG!r} (found {len(tagged)})")
    nb.cells.insert(tagged[0] + 1, nbformat.v4.new_code_cell(source, metadata={"tags": [INJECTED_TAG]}))


def cell_seconds(cell) -> float | None:
    timing = cell.get("metadata", {}).get("execution", {})
    start, end = timing.get("iopub.execute_input"), timing.get("shell.execute_reply")
    if not (start and end):
        return None
    parse = lambda stamp: datetime.fromisoformat(stamp.replace("Z", "+00:00"))  # noqa: E731
    return (parse(end) - parse(start)).total_seconds()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--notebook", type=Path, default=REPO / "notebooks" / "colab_t4.ipynb")
    parser.add_argument("--model", type=Path, default=SMOLLM2, help="the model the CPU run trains")
    parser.add_argument("--cell-timeout", type=int, default=900, help="seconds one cell may run")
    parser.add_argument("--executed", type=Path, default=REPO / "outputs" / "notebook" / "colab_t4.ipynb",
                        help="where to write the executed notebook")
    args = parser.parse_args()
    if not (args.model / "config.json").is_file():
        raise SystemExit(f"{args.model} is missing: run .venv/bin/python scripts/fetch_smollm2.py --out {args.model}")
    nb = nbformat.read(args.notebook, as_version=4)
    # The kernel inherits this environment: this interpreter's scripts (lora-merge, ...) first on PATH, no Hub.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    os.environ.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lora-cli-notebook-") as work:
        inject_parameters(nb, ci_parameters(Path(work), args.model.resolve()))
        client = NotebookClient(nb, timeout=args.cell_timeout, kernel_name="python3", allow_errors=False,
                                skip_cells_with_tag="skip-execution", resources={"metadata": {"path": str(REPO)}})
        failed = None
        try:
            client.execute()
        except (CellExecutionError, CellTimeoutError) as err:
            failed = err
        finally:
            args.executed.parent.mkdir(parents=True, exist_ok=True)
            nbformat.write(nb, args.executed)
    for number, cell in enumerate(nb.cells):
        seconds = cell_seconds(cell)
        if cell.cell_type == "code" and seconds is not None:
            print(f"cell {number:>2}: {seconds:6.1f} s  {cell.source.splitlines()[0][:80]}")
    total = time.perf_counter() - started
    if failed is not None:
        print(f"\n{args.notebook} FAILED after {total:.0f} s (executed copy: {args.executed}):\n{failed}",
              file=sys.stderr)
        return 1
    print(f"{args.notebook}: every cell ran, in {total:.0f} s (executed copy: {args.executed})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
