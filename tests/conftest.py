import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "scripts"))  # synthetic.py, shared with the benchmarks

import tiny  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Tiny models: one thread is several times faster than two contending ones on a 2-core box."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tokenizer():
    return tiny.make_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Returns a function arch -> folder with a saved tiny model + tokenizer (built once per arch)."""
    cache = {}

    def get(arch: str = "llama") -> Path:
        if arch not in cache:
            cache[arch] = tiny.save_model(arch, tmp_path_factory.mktemp(f"model_{arch}"))
        return cache[arch]

    return get


@pytest.fixture(scope="session")
def trainable_model_dir(tmp_path_factory):
    """Like tiny_model_dir, but with weights wide enough (init 0.2) that LoRA can drive the loss down fast."""
    cache = {}

    def get(arch: str = "llama") -> Path:
        if arch not in cache:
            cache[arch] = tiny.save_model(arch, tmp_path_factory.mktemp(f"trainable_{arch}"), init_range=0.2)
        return cache[arch]

    return get
