"""The random generators training draws from (python, numpy, torch, CUDA): captured as plain values and tensors,
put back, and kept unchanged around work that must not draw from them (sample answers, a tracker's start-up).

Checkpoints write every process's capture (rng_state.pth), so a resumed run continues the same random streams.
"""

from __future__ import annotations

import contextlib
import random
from typing import Iterator

import numpy as np
import torch


def rng_state() -> dict:
    """This process's RNG states, as plain values and tensors (loadable with torch.load(weights_only=True))."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def untouched_rng() -> Iterator[None]:
    """Whatever runs inside may draw random numbers: the generators are put back as they were afterwards."""
    saved = rng_state()
    try:
        yield
    finally:
        set_rng_state(saved)
