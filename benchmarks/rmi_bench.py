"""Cases, backends and measurements shared by the benchmark suite, its memory probe and the
training demo (``python/demo_measure.py`` measures its losses' peak memory with this module).

A *case* is one input shape and loss configuration; a *backend* is one way to compute the loss:
the unfold reference (eager, or under ``torch.compile``), every ``rmi_ext`` backend, and the
PyPI package ``rmi-pytorch`` when it is installed. Inputs have every label valid (no ignored
pixels), so ``rmi-pytorch`` computes the same RMI term as ``rmi_ext``.
"""
from __future__ import annotations

import ctypes
import gc
import importlib
import json
import math
import os
import re
import subprocess
import sys
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import rmi_ext
from rmi_ext.reference import reference_loss

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Case:
    """``logits [N, C, H, W]`` (or a volume ``[N, C, D, H, W]``) float32 with
    ``rmi_loss(radius=, stride=, pool=)``."""

    shape: tuple
    stride: int
    radius: int
    pool: str
    compile: bool = False  # time torch.compile of the reference in the default run
    full: bool = False  # only with --rmi-full
    target: str = "labels"  # "labels": integer class ids; "float": a soft float target

    @property
    def id(self) -> str:
        n, spatial = self.shape[0], self.shape[2:]
        size = str(spatial[0]) if len(spatial) == 2 else "vol" + "x".join(map(str, spatial))
        suffix = "" if self.target == "labels" else f"-{self.target}"
        return f"{size}b{n}-df{self.stride}-r{self.radius}-{self.pool}{suffix}"

    @property
    def is_volume(self) -> bool:
        return len(self.shape) == 5

    @property
    def options(self) -> dict:
        return dict(radius=self.radius, stride=self.stride, pool=self.pool)

    @property
    def logits_bytes(self) -> int:
        return math.prod(self.shape) * 4


PAPER = (4, 21, 513, 513)  # the paper's setting (VOC, 21 classes, 513 crops), batch cut to 4
SMALL = (2, 21, 257, 257)
VOLUME = (2, 4, 96, 96, 96)  # a 3-D segmentation batch (issue "Volumes")
CASES = [
    Case(PAPER, 4, 3, "avg", compile=True),
    Case((16, 21, 513, 513), 4, 3, "avg", compile=True, full=True),  # the paper's full batch
    *(Case(SMALL, s, 3, "avg", compile=True) for s in (1, 2, 4)),  # DF sweep
    *(Case(SMALL, 4, r, "avg") for r in (2, 5, 7)),  # R sweep (R 3 is above)
    *(Case(SMALL, 4, 3, pool) for pool in ("max", "interp")),  # pool modes (avg is above)
    *(Case(VOLUME, s, 3, "avg") for s in (1, 2)),  # volumes at DF 1 and 2
    Case(PAPER, 4, 3, "avg", target="float"),  # a soft float target (issue "Targets")
]
CASES_BY_ID = {case.id: case for case in CASES}

#: Row names: the reference first (every speed-up is relative to it), then the fast backends.
RMI_EXT_BACKENDS = ("torch", "cpu", "cuda", "triton")
BACKENDS = ("reference", "compiled-reference", *RMI_EXT_BACKENDS, "rmi-pytorch")
PHASES = ("fwd", "bwd", "fwd+bwd")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def why_unavailable(backend: str, case: Case, device: str, compile_all: bool = False):
    """``None`` if ``backend`` runs ``case`` on ``device`` in this run, else the reason why not."""
    if backend == "reference":
        return None
    if backend == "compiled-reference":
        if not (case.compile or compile_all):
            return ("torch.compile of the reference is timed only for the paper and DF-sweep "
                    "cases (each compile takes tens of seconds on CPU); pass --rmi-compile-all")
        return None
    if backend == "rmi-pytorch":
        try:
            import rmi  # noqa: F401
        except ImportError:
            return "rmi-pytorch is not installed (pip install rmi-pytorch)"
        if case.is_volume:
            return "rmi-pytorch is 2-D only"
        if case.target != "labels":
            return "the float-target cases compare rmi_ext's backends with integer labels"
        if case.pool not in ("avg", "max"):
            return f"rmi-pytorch has no {case.pool!r} pooling (only 'avg' and 'max')"
        return None
    info = rmi_ext.backend_info(device)
    if info["available"][backend] is not True:
        return info["available"][backend]
    if case.is_volume and backend not in info["volumes"]:
        return f"backend {backend!r} does not compute volumes"
    if case.target == "float" and backend not in info["float_targets"]:
        return f"backend {backend!r} does not compute float targets yet"
    if backend == "triton" and not device.startswith("cuda"):
        return "the Triton interpreter on CPU (TRITON_INTERPRET=1) is for tests, not timing"
    return None


def random_inputs(shape, device: str, seed: int = 0):
    """``logits`` float32 ``[N, C, *spatial]`` (requires grad) and ``labels`` int64 ``[N,
    *spatial]`` in ``[0, C)`` (every label valid), drawn on the CPU from ``seed``, then moved:
    deterministic."""
    gen = torch.Generator().manual_seed(seed)
    n, c, *spatial = shape
    logits = torch.randn(tuple(shape), generator=gen).to(device).requires_grad_()
    labels = torch.randint(0, c, (n, *spatial), generator=gen).to(device)
    return logits, labels


def make_inputs(case: Case, device: str, seed: int = 0):
    """``random_inputs`` of the case's shape; for a float-target case the labels become the
    float32 one-hot target with label smoothing 0.1 (``[N, C, *spatial]``, made before any
    measurement: like the labels, it is not counted as extra memory)."""
    logits, labels = random_inputs(case.shape, device, seed)
    if case.target == "float":
        c = case.shape[1]
        labels = onehot_target(labels, c).mul_(0.9).add_(0.1 / c)
    return logits, labels


def rmi_pytorch_module(case: Case, bce_weight: float = 0.5):
    """``rmi.RMILoss`` with the options that make it compute what ``rmi_ext`` does.

    Same radius, stride, pool (kernel = stride, padding = stride // 2), ridge 5e-4, float64,
    Cholesky log-det (its ``use_log_trace=True`` is the Cholesky form). It takes a one-hot float
    target and has no ignore mask; its BCE is a mean over all elements where ``rmi_ext`` (as the
    authors) sums over classes, so totals differ by that scale while the RMI terms agree.
    """
    import rmi

    return rmi.RMILoss(with_logits=True, radius=case.radius, bce_weight=bce_weight,
                       pool=case.pool, stride=case.stride, use_log_trace=True,
                       use_double_precision=True, epsilon=5e-4)


def onehot_target(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``labels [N, H, W]`` -> float32 one-hot ``[N, C, H, W]``, the target rmi-pytorch takes."""
    onehot = torch.nn.functional.one_hot(labels, num_classes).permute(0, 3, 1, 2)
    return onehot.to(torch.float32).contiguous()


def make_loss_fn(backend: str, case: Case, labels: torch.Tensor):
    """``fn(logits) -> 0-d loss`` for ``backend`` (compiles lazily: warm it up before timing)."""
    if backend == "compiled-reference":
        # One compiled graph per case: recompiling per shape/config is what a user gets, and
        # dynamic=False keeps a later case from switching earlier ones to dynamic shapes.
        dynamo = torch._dynamo.config
        limit = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"
        setattr(dynamo, limit, max(getattr(dynamo, limit), 64))
        cfg = rmi_ext.make_config(**case.options)
        compiled = torch.compile(reference_loss, dynamic=False)
        return lambda x: compiled(x, labels, cfg)
    if backend == "rmi-pytorch":
        module, target = rmi_pytorch_module(case), onehot_target(labels, case.shape[1])
        return lambda x: module(x, target)
    return lambda x: rmi_ext.rmi_loss(x, labels, backend=backend, **case.options)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


# --- peak memory ------------------------------------------------------------------------------

def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


def peak_extra_bytes_cpu(fwd_bwd) -> int:
    """Peak resident memory of ``fwd_bwd()`` above the resident memory before it, in bytes.

    Linux only: writing ``5`` to ``/proc/self/clear_refs`` resets the high-water mark VmHWM to
    the current VmRSS (``ru_maxrss`` cannot be reset and is inherited across exec). Run in a
    fresh process (see ``_memprobe.py``) with a fixed malloc mmap threshold, so that freed
    tensors leave RSS and a warm-up run (or an earlier backend) does not hide the measured
    run's allocations.
    """
    gc.collect()
    try:  # hand freed heap memory (an earlier backend's) back to the OS: glibc only
        ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError):
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _proc_status_kib("VmRSS")
    fwd_bwd()
    return (_proc_status_kib("VmHWM") - before) * 1024


def peak_extra_bytes_cuda(fwd_bwd, device=None) -> int:
    """Peak of ``torch.cuda.max_memory_allocated`` during ``fwd_bwd()`` above the allocation
    before it, in bytes, on ``device`` (default: the current GPU); exact tensor accounting, so
    it runs in-process."""
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fwd_bwd()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def peak_extra_bytes_torch(fwd_bwd) -> int:
    """Peak of the live torch allocations during ``fwd_bwd()`` above those before it, in bytes,
    on any device: the running sum of the ``[memory]`` events of ``torch.profiler`` with
    ``profile_memory=True`` (custom ops and interpreted Triton host code included; memory that
    is not a torch tensor, e.g. the Triton interpreter's own copies, is not counted)."""
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] * torch.cuda.is_available())
    with profile(activities=activities, profile_memory=True) as prof:
        fwd_bwd()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()  # > 0 for an allocation, < 0 for a free
        peak = max(peak, live)
    return peak


def probe_loss(loss_fn, logits: torch.Tensor, device: str) -> dict:
    """Peak extra memory of one ``loss_fn(logits).backward()`` after one warm-up call (which
    compiles and loads libraries): ``{"peak_extra_bytes", "peak_extra_x_logits",
    "logits_bytes", "memory_method"}``. The peak includes the logits' gradient (1x the logits).
    CPU: ``peak_extra_bytes_cpu``, meant for a fresh process (``measure_peak_memory_of``);
    CUDA: ``peak_extra_bytes_cuda``."""

    def fwd_bwd():
        loss_fn(logits).backward()
        sync(device)

    fwd_bwd()
    logits.grad = None
    if device.startswith("cuda"):
        extra = peak_extra_bytes_cuda(fwd_bwd, device)
        method = "torch.cuda.max_memory_allocated"
    else:
        extra, method = peak_extra_bytes_cpu(fwd_bwd), "VmHWM - VmRSS, a fresh process per case"
    logits_bytes = logits.numel() * logits.element_size()
    return dict(peak_extra_bytes=extra, peak_extra_x_logits=extra / logits_bytes,
                logits_bytes=logits_bytes, memory_method=method)


def probe(case: Case, backend: str, device: str) -> dict:
    """``probe_loss`` of ``backend`` on ``case``'s inputs."""
    logits, labels = make_inputs(case, device)
    return probe_loss(make_loss_fn(backend, case, labels), logits, device)


def probe_case(device: str, case: dict, backend: str) -> dict:
    """``probe`` with the case as ``dataclasses.asdict`` gives it (how a child process gets it)."""
    return probe(Case(**{**case, "shape": tuple(case["shape"])}), backend, device)


def run_probes(probe_name: str, calls: dict, device: str) -> dict:
    """``{key: fn(device=device, **kwargs)}`` for ``calls = {key: kwargs}``, one call after the
    other, where ``probe_name = "module:fn"`` names a function such as ``probe_case``. A call
    that raises gives ``{"error": traceback}``, and the calls after it still run."""
    module, _, name = probe_name.partition(":")
    fn = getattr(importlib.import_module(module), name)
    results = {}
    for key, kwargs in calls.items():
        try:
            results[key] = fn(device=device, **kwargs)
        except Exception:  # report it against this key, measure the others
            results[key] = {"error": traceback.format_exc()}
    return results


def measure_peak_memory_of(probe_name: str, calls: dict, device: str, import_dirs=()) -> dict:
    """``run_probes(probe_name, calls, device)``: CUDA in this process; CPU in one fresh process
    (``_memprobe.py``, a fixed malloc mmap threshold so that big frees go back to the OS) that
    imports the same ``rmi_ext`` as this one, and modules from ``import_dirs`` too. Raises
    ``RuntimeError`` if that process dies."""
    if device.startswith("cuda"):
        return run_probes(probe_name, calls, device)
    env = dict(os.environ)
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"  # fixed threshold: big frees go back to the OS
    rmi_root = str(Path(rmi_ext.__file__).resolve().parent.parent)
    paths = [rmi_root, *map(str, import_dirs), env.get("PYTHONPATH")]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, paths))
    cmd = [sys.executable, str(HERE / "_memprobe.py"),
           json.dumps(dict(probe=probe_name, calls=calls, device=device))]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        how = (f"was killed by signal {-proc.returncode} (out of memory?)" if proc.returncode < 0
               else f"exited with {proc.returncode}")
        raise RuntimeError(f"memory probe {how}: {' '.join(cmd)}\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_peak_memory(case: Case, backends, device: str) -> dict:
    """``{backend: {"peak_extra_bytes", "peak_extra_x_logits", ...} or {"error": ...}}``: the
    peak extra memory of one forward+backward per backend. CPU: one fresh process for the case,
    the backends measured one after the other (each from its own baseline); CUDA: in-process."""
    calls = {backend: dict(case=asdict(case), backend=backend) for backend in backends}
    return measure_peak_memory_of("rmi_bench:probe_case", calls, device)
