"""PyTorch's allocated-bytes peak on CPU, from the profiler's memory events: the CPU counterpart of
torch.cuda.max_memory_allocated, free of the C allocator's retained pages that RSS counts.

Used by bench.py (the "live step peak" column) and check_estimate.py (the estimate's validation table).
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from pathlib import Path


def allocated_peak_bytes(profiler) -> int:
    """Peak of the bytes allocated while `profiler` ran (with profile_memory=True) and not yet freed: the peak
    above what was allocated when it began."""
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        profiler.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())
    events = events["traceEvents"] if isinstance(events, dict) else events
    totals = [e["args"].get("Total Allocated", 0) for e in events if e.get("name") == "[memory]"]
    return int(max(totals, default=0))


class PeakResult:
    bytes: int = 0


@contextlib.contextmanager
def allocated_peak():
    """`with allocated_peak() as peak: step()`; then peak.bytes holds the step's allocated-bytes peak."""
    from torch.profiler import ProfilerActivity, profile

    result = PeakResult()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        yield result
    result.bytes = allocated_peak_bytes(profiler)
