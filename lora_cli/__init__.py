"""lora-cli: LoRA fine-tuning of Hugging Face causal language models from the command line, and from Python:

    import lora_cli
    result = lora_cli.train("configs/quickstart.yaml", train={"max_steps": 20})
    lora_cli.merge(result.adapter_dir, "merged/quickstart")
    print(lora_cli.generate("merged/quickstart", "Who is the mayor of Quillhaven?", temperature=0))

See lora_cli/api.py and the README's "Python API" section.
"""

from __future__ import annotations

import sys
import types

from .api import estimate, generate, merge, train
from .errors import TrainingStopped, UserError

__version__ = "0.1.0"
__all__ = ["TrainingStopped", "UserError", "estimate", "generate", "merge", "train"]

_API_NAMES = frozenset({"estimate", "generate", "merge", "train"})


class _Package(types.ModuleType):
    """Keeps lora_cli.train, .estimate, .merge and .generate the API functions. Modules of the same names exist
    (lora_cli/train.py, ...), and Python's import system sets every submodule it loads as an attribute of its
    package: the first `from lora_cli.train import ...` (the API itself does one) would replace the function
    lora_cli.train with the module. So reach those modules with `from lora_cli.train import NAME` or
    importlib.import_module("lora_cli.train"), not as attributes of the package."""

    def __setattr__(self, name: str, value) -> None:
        if name in _API_NAMES and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
