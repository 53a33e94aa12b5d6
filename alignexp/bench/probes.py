"""What the benchmarks measure besides time: the peak of live tensor bytes and of the resident set during a
step (described in ``alignexp/bench/__init__.py``), and the machine's load."""

from __future__ import annotations

import ctypes
import gc
import os
from collections.abc import Callable


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def rss_step_delta_mb(step: Callable[[], None]) -> float | None:
    """Resident-set high-water mark during ``step()`` minus the resident set before it, in MB.

    Free heap memory is handed back first (``malloc_trim``) so that it does not hide the step's
    growth; None where ``/proc/self/clear_refs`` cannot reset the mark (not Linux).
    """
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current VmRSS
    except OSError:
        return None
    before = _rss_kb("VmRSS")
    step()
    return (_rss_kb("VmHWM") - before) / 1024


def tensor_peak_mb(step: Callable[[], None]) -> float:
    """Peak of live CPU tensor bytes during ``step()`` above the bytes live when it started, in MB.

    From the allocator events (+ allocation, - free) that ``torch.profiler`` records with
    ``profile_memory=True``, summed in time order.
    """
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak / 2**20


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())
