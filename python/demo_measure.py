"""Time and peak memory of the training demo's losses alone (forward + backward to the logits).

Inputs are ``rmi_bench.random_inputs`` of the training batch's shape: seeded float32 logits
``[N, C, H, W]`` and int64 labels ``[N, H, W]``, every label valid. The peak-memory probe is
the benchmark suite's (``benchmarks/rmi_bench.py``): on the CPU the rise of the
resident-memory high-water mark, measured in one fresh process (``benchmarks/_memprobe.py``)
that calls ``probe_criterion`` below once per loss; on a GPU ``torch.cuda.max_memory_allocated``
in this process. Either way the logits' gradient (1x the logits) is included.
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path

from demo_losses import make_criterion

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "benchmarks"))
import rmi_bench  # noqa: E402


def memory_method(device) -> str:
    """How the peak memory was measured on ``device`` (a torch.device), for the report."""
    if device.type == "cuda":
        return ("torch.cuda.max_memory_allocated during one loss forward+backward, minus the "
                "memory allocated before.")
    return ("rise of the resident-memory high-water mark (VmHWM, reset through "
            "/proc/self/clear_refs) over the RSS before one loss forward+backward, "
            "measured in a fresh process; it includes the logits' gradient.")


def probe_criterion(device: str, shape, run: str, options: dict) -> dict:
    """``rmi_bench.probe_loss`` of ``make_criterion(run, **options)`` on random logits of
    ``shape``: ``{"peak_extra_bytes", ...}``. Called through ``rmi_bench.run_probes``."""
    logits, labels = rmi_bench.random_inputs(shape, device)
    crit = make_criterion(run, **options)
    return rmi_bench.probe_loss(lambda x: crit(x, labels), logits, device)


def peak_memory(criteria: dict, shape, device) -> dict:
    """``{name: peak extra bytes}`` of one forward+backward of each loss, NaN (and a printed
    line) where it could not be measured; ``criteria = {name: (run, options)}``."""
    calls = {name: dict(shape=list(shape), run=run, options=options)
             for name, (run, options) in criteria.items()}
    try:
        results = rmi_bench.measure_peak_memory_of("demo_measure:probe_criterion", calls,
                                                   str(device), import_dirs=[HERE])
    except RuntimeError as exc:  # the probe process died
        results = {name: {"error": str(exc)} for name in calls}
    peaks = {}
    for name, result in results.items():
        if "error" in result:
            last_line = (result["error"].strip().splitlines() or ["?"])[-1]
            print(f"  (memory measurement of {name} failed: {last_line})")
        peaks[name] = result.get("peak_extra_bytes", float("nan"))
    return peaks


def time_loss(crit, shape, device, reps=5) -> float:
    """Median seconds of one loss forward+backward (in-process, after a warm-up)."""
    logits, labels = rmi_bench.random_inputs(shape, device)
    times = []
    for _ in range(reps + 1):
        rmi_bench.sync(str(device))
        t0 = time.perf_counter()
        logits.grad = None
        crit(logits, labels).backward()
        rmi_bench.sync(str(device))
        times.append(time.perf_counter() - t0)
    times = sorted(times[1:])
    return times[len(times) // 2]


def measure_losses(criteria: dict, shape, device) -> dict:
    """Peak memory and time of each loss alone on logits of ``shape`` (float32) on ``device``;
    ``criteria = {name: (run, options)}``, make_criterion's arguments. Returns ``{"shape",
    "logits_bytes", name: {"extra_bytes", "seconds"} for each name}``."""
    peaks = peak_memory(criteria, shape, device)
    meas = {"shape": list(shape), "logits_bytes": 4 * math.prod(shape)}
    for name, (run, options) in criteria.items():
        seconds = time_loss(make_criterion(run, **options), shape, device)
        meas[name] = {"extra_bytes": peaks[name], "seconds": seconds}
    return meas
