"""What is wrong with a model's files, told in the user's terms: truncated or missing weight files, and pickled
checkpoints torch refuses to unpickle. models.load_base_model asks here when transformers' own error is unclear.
"""

from __future__ import annotations

import json
import math
import re
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .errors import UserError
from .safetensors_io import SafetensorsFile


def unpickling_error(name_or_path: str, err: Exception) -> UserError:
    """torch.load(weights_only=True) refused a pytorch_model*.bin: it pickles more than tensors."""
    folder = Path(name_or_path).expanduser()
    files = sorted(str(f) for f in folder.glob("*.bin")) if folder.is_dir() else []
    named = ", ".join(files) if files else f"the pytorch_model*.bin of '{name_or_path}'"
    found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
    reason = f" (it holds a pickled {found.group(1)})" if found else ""
    source = files[0] if files else "pytorch_model.bin"
    target = str(Path(source).with_name("model.safetensors"))
    convert = (
        f"python -c \"import torch; from safetensors.torch import save_file; sd = torch.load('{source}', "
        f"weights_only=False); save_file({{k: v.clone().contiguous() for k, v in sd.items() if isinstance(v, "
        f"torch.Tensor)}}, '{target}', metadata={{'format': 'pt'}})\""
    )
    return UserError(
        f"Could not load the model '{name_or_path}': torch refused to unpickle its checkpoint {named} with "
        f"weights_only=True{reason}, because unpickling anything but tensors can run code. Use a copy of the model "
        "that ships safetensors, or, if you trust the file, convert it to model.safetensors once (transformers "
        f"prefers that to the .bin; a sharded checkpoint needs each shard converted and an index): {convert}"
    )


def _model_folder(name_or_path: str, revision: str | None) -> Path | None:
    """The local folder the weights are read from: the folder itself, or the Hub cache's snapshot of the model."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name_or_path, revision=revision, local_files_only=True))
    except Exception:  # not a Hub name, or not in the cache: nothing local to look at
        return None


# The order in which transformers (5.x, modeling_utils._get_resolved_checkpoint_files) picks a model's weights: a
# single file before an index, safetensors before pickles. A folder holding both model.safetensors and an index is
# loaded from model.safetensors alone; reading the index's shards instead would merge other weights.
WEIGHT_FILE_ORDER = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                     "pytorch_model.bin.index.json")


def _weight_files(folder: Path) -> tuple[list[Path], list[str]]:
    """The weight files transformers reads from `folder` (in its order, WEIGHT_FILE_ORDER), and missing shards."""
    for name in WEIGHT_FILE_ORDER:
        if not (folder / name).is_file():
            continue
        if not name.endswith(".index.json"):
            return [folder / name], []
        index = folder / name
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError, OSError):
            return [], [f"{index} (not a valid shard index)"]
        missing = [f"{folder / s} (missing, though {name} lists it)" for s in shards
                   if not (folder / s).is_file()]
        return [folder / s for s in shards if (folder / s).is_file()], missing
    return [], []


_HALF_AND_FULL = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}


def weights_dtype(name_or_path: str, revision: str | None = None) -> torch.dtype | None:
    """The dtype the model's weights are stored in, read from the header of the first safetensors file transformers
    would load: the float16/bfloat16/float32 type that holds most of its elements (a bf16 model may keep a few fp32
    tensors). For a config.json that does not say (no `dtype`): merging such a bf16 base to float32 doubles it.
    None when there is nothing local to read (a Hub model not in the cache, a pickle checkpoint)."""
    folder = _model_folder(name_or_path, revision)
    if folder is None:
        return None
    files, _ = _weight_files(folder)
    if not files or files[0].suffix != ".safetensors":
        return None
    try:
        header = SafetensorsFile(files[0])
    except (OSError, ValueError):
        return None
    elements: dict[torch.dtype, int] = {}
    for key in header.keys():
        dtype = _HALF_AND_FULL.get(header.entries[key].get("dtype"))
        if dtype is not None:
            elements[dtype] = elements.get(dtype, 0) + math.prod(header.shape(key))
    return max(elements, key=elements.get) if elements else None


def weight_file_problem(file: Path) -> str | None:
    """Why `file` cannot be a whole weights file (None if it looks whole): safetensors files are checked against
    their header's length, PyTorch zip archives for their closing directory (a cut file loses it)."""
    if file.suffix == ".safetensors":
        try:
            with safe_open(str(file), framework="pt"):
                return None
        except (SafetensorError, OSError) as err:
            return str(err)
    with open(file, "rb") as handle:
        head = handle.read(4)
    if not head:
        return "empty"
    if head.startswith(b"PK") and not zipfile.is_zipfile(file):
        return "a zip archive cut short"
    return None  # a legacy (pre-zip) PyTorch pickle, or a zip that at least ends properly


def damaged_weight_files(name_or_path: str, revision: str | None = None) -> list[str]:
    """The model's weight files that are truncated, unreadable or missing, each as 'path (why)'."""
    folder = _model_folder(name_or_path, revision)
    if folder is None:
        return []
    files, problems = _weight_files(folder)
    for file in files:
        problem = weight_file_problem(file)
        if problem is not None:
            problems.append(f"{file} ({problem})")
    return problems


def check_weight_files(name_or_path: str, revision: str | None = None) -> None:
    """Refuse a model whose weight files are truncated, unreadable or missing, naming each and the fix."""
    damaged = damaged_weight_files(name_or_path, revision)
    if damaged:
        raise damaged_error(name_or_path, revision, damaged)


def damaged_error(name_or_path: str, revision: str | None, damaged: list[str]) -> UserError:
    if Path(name_or_path).expanduser().is_dir():
        fix = "Re-download the model (or copy its folder again) and rerun."
    else:
        rev = f" --revision {revision}" if revision else ""
        fix = f"Re-download it with `hf download {name_or_path}{rev} --force-download` and rerun."
    return UserError(
        f"The weights of the model '{name_or_path}' are damaged or incomplete: {'; '.join(damaged)}. An "
        f"interrupted download or copy leaves files like this. {fix}"
    )
