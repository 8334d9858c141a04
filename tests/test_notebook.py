"""notebooks/colab_t4.ipynb as CI runs it (scripts/check_notebook.py executes it; these checks need no kernel): the
CPU run overrides every Colab path, and nothing Colab-only or installing runs outside Colab."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

import check_notebook  # noqa: E402


@pytest.fixture
def notebook():
    nb = nbformat.read(REPO / "notebooks" / "colab_t4.ipynb", as_version=4)
    nbformat.validate(nb)
    return nb


def assigned_names(source: str) -> dict[str, object]:
    """Top-level NAME = literal assignments of a cell."""
    found = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            found[node.targets[0].id] = ast.literal_eval(node.value)
    return found


def test_the_cpu_run_overrides_every_path_on_colab(notebook, tmp_path):
    check_notebook.inject_parameters(notebook, check_notebook.ci_parameters(tmp_path, tmp_path / "model"))
    [index] = [i for i, c in enumerate(notebook.cells) if "parameters" in c.metadata.get("tags", [])]
    colab, ci = (assigned_names(notebook.cells[i].source) for i in (index, index + 1))
    assert "injected-parameters" in notebook.cells[index + 1].metadata["tags"]
    on_colab = {name for name, value in colab.items() if "/content" in repr(value)}
    assert on_colab == {"OUTPUT_DIR", "EXPORT_DIR", "MERGED_DIR"}
    assert on_colab <= set(ci) and all(str(ci[name]).startswith(str(tmp_path)) for name in on_colab)
    assert ci["MODEL"] == str(tmp_path / "model") and ci["TRAIN"]["max_steps"] == 3
    assert set(ci) <= set(colab)  # the CPU run sets only what the notebook defines


def test_nothing_colab_only_or_installing_runs_in_ci(notebook):
    for cell in notebook.cells:
        if cell.cell_type != "code":
            continue
        skipped = "skip-execution" in cell.metadata.get("tags", [])
        lines = cell.source.splitlines()
        assert not any(line.lstrip().startswith(("!", "%pip", "%cd")) for line in lines), cell.source
        if "google.colab import" in cell.source:
            assert skipped, cell.source
        if "pip" in cell.source and not skipped:
            assert "if IN_COLAB:" in cell.source and 'IN_COLAB = "google.colab" in sys.modules' in cell.source
    mounts = [c for c in notebook.cells if "drive.mount(" in c.source]
    assert len(mounts) == 1 and mounts[0].metadata["tags"] == ["skip-execution"]


def test_one_parameters_cell_is_required(notebook):
    notebook.cells.append(nbformat.v4.new_code_cell("X = 1", metadata={"tags": ["parameters"]}))
    with pytest.raises(SystemExit, match="exactly one cell tagged 'parameters' \\(found 2\\)"):
        check_notebook.inject_parameters(notebook, "X = 2")


def test_the_notebook_exports_gguf_and_a_modelfile_and_downloads_them(notebook):
    """Issue 22's steps in order: merge, export GGUF + Modelfile (lora-merge --gguf --ollama), load the GGUF back with
    its own tokenizer and ask it, download the GGUF, the Modelfile and the adapter."""
    code = [c.source for c in notebook.cells if c.cell_type == "code"]
    merged = next(i for i, s in enumerate(code) if "lora_cli.merge(result.adapter_dir, MERGED_DIR" in s)
    exported = next(i for i, s in enumerate(code) if "gguf=GGUF_TYPE" in s)
    assert "ollama=True" in code[exported] and "EXPORT_DIR" in code[exported]
    asked = next(i for i, s in enumerate(code) if "gguf_file=gguf_file.name" in s and "generate_text(" in s)
    assert "AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)" in code[asked]
    downloaded = next(i for i, s in enumerate(code) if "files.download" in s)
    assert merged < exported < asked < downloaded
    assert "gguf_file" in code[downloaded] and '"Modelfile"' in code[downloaded]
    parameters = assigned_names(next(c.source for c in notebook.cells if "parameters" in c.metadata.get("tags", [])))
    assert parameters["GGUF_TYPE"] == "q8_0"
