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


def timed_calls(call: Callable[[], object], iters: int) -> dict:
    """The first call's wall seconds (JAX: the compile), then the wall and process-CPU seconds of
    each of `iters` calls: on a shared machine the CPU time says how much work a call takes,
    whatever other jobs leave free. `call` must wait for its result."""
    t0 = time.perf_counter()
    call()
    out = {"first_s": time.perf_counter() - t0, "times_s": [], "cpu_s": []}
    for _ in range(iters):
        t0, c0 = time.perf_counter(), time.process_time()
        call()
        out["times_s"].append(time.perf_counter() - t0)
        out["cpu_s"].append(time.process_time() - c0)
    return out


def agreement(ours, ref, dtype: str, what: str) -> tuple[float, float]:
    """(max |ours - ref| / max |ref|, smallest cosine similarity of a row) of two outputs with
    the feature axis last; stops the benchmark unless they agree: 1e-4 relative in float32,
    every row's cosine >= 0.999 in bfloat16 (both sides round differently there)."""
    import numpy as np

    ours = np.asarray(ours, np.float64).reshape(-1, np.shape(ours)[-1])
    ref = np.asarray(ref, np.float64).reshape(-1, np.shape(ref)[-1])
    rel = float(np.abs(ours - ref).max() / np.abs(ref).max())
    cos = float(np.min(np.sum(ours * ref, 1) / np.linalg.norm(ours, axis=1)
                       / np.linalg.norm(ref, axis=1)))
    if dtype == "float32" and not rel <= 1e-4:
        raise SystemExit(f"{what}: outputs differ by {rel:.2e} of the largest value")
    if dtype == "bfloat16" and not cos >= 0.999:
        raise SystemExit(f"{what}: bfloat16 outputs differ: a row's cosine similarity is {cos:.5f}")
    return rel, cos


def compare(results: dict, batch: int, one: str, many: str) -> dict:
    """The JSON fields both framework children give, from their `timed_calls` + `peak_mb`
    results ({"jax": ..., "torch": ...}): items per second (median wall time), CPU seconds per
    item, peak memory, the compile, the raw times, versions and the machine's state."""
    import os
    import platform
    import statistics

    rate = {fw: batch / statistics.median(r["times_s"]) for fw, r in results.items()}
    return {
        f"jax_{many}_per_s": round(rate["jax"], 3), f"torch_{many}_per_s": round(rate["torch"], 3),
        "jax_over_torch": round(rate["jax"] / rate["torch"], 3),
        **{f"{fw}_peak_mb": round(r["peak_mb"]) for fw, r in results.items()},
        **{f"{fw}_device_peak_mb": round(r["device_peak_mb"]) for fw, r in results.items()
           if "device_peak_mb" in r},  # on an accelerator
        **{f"{fw}_cpu_s_per_{one}": round(statistics.median(r["cpu_s"]) / batch, 3)
           for fw, r in results.items()},
        "jax_compile_and_first_s": round(results["jax"]["first_s"], 2),
        **{f"{fw}_times_s": [round(t, 3) for t in r["times_s"]] for fw, r in results.items()},
        "torch_threads": results["torch"]["threads"], "jax": results["jax"]["version"],
        "torch": results["torch"]["version"], "cpu_count": os.cpu_count(),
        "load_avg": os.getloadavg()[0], "machine": platform.machine(),
    }


def print_comparison(result: dict, results: dict, one: str, many: str,
                     columns: tuple[tuple[str, object], ...] = ()) -> None:
    """A row per framework of a `compare` result: label, `columns`, rate, CPU s per item,
    peak MB, first call (compile) s."""
    head = ["label", *(name for name, _ in columns), "framework", f"{many}/s", f"cpu s/{one}",
            "peak MB", "first s"]
    print("".join(f"{h:>14}" for h in head))
    for fw in ("torch", "jax"):
        row = [result["label"], *(str(v) for _, v in columns), fw,
               f"{result[f'{fw}_{many}_per_s']:.3f}", f"{result[f'{fw}_cpu_s_per_{one}']:.2f}",
               f"{results[fw]['peak_mb']:.0f}", f"{results[fw]['first_s']:.1f}"]
        print("".join(f"{c:>14}" for c in row))


def write_json(path: str, result: dict) -> None:
    """Atomically (a reader never sees half a file), creating the folder."""
    import json
    import os

    from astroclip_jax import files

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with files.atomic_path(path) as tmp_path, open(tmp_path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {path}")
