"""What the step benchmarks measure in each framework's child process: its own peak memory and
the seconds of its timed steps (after a warm-up step that compiles)."""

from __future__ import annotations

import resource
import time
from typing import Callable


def peak_mb(device_peak_bytes: float | None = None) -> dict:
    """Peak resident host memory of this process, and the accelerator's peak when there is one.
    VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork and exec, so a child would report
    at least its parent's peak (a parent that loaded torch, JAX and a converter)."""
    try:
        with open("/proc/self/status") as f:
            kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"peak_mb": kb / 1024}
    if device_peak_bytes:
        out["device_peak_mb"] = device_peak_bytes / 2**20
    return out


def timed(step: Callable[[int], float], steps: int) -> tuple[list[float], float]:
    """Runs step(t) for t = 0 (warm-up, compile) .. steps, each returning its loss once the step
    has finished; (losses, seconds of steps 1..)."""
    losses = [step(0)]
    t0 = time.perf_counter()
    losses += [step(t) for t in range(1, steps + 1)]
    return [float(x) for x in losses], time.perf_counter() - t0
