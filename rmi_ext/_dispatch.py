"""Backend registry: which backends can run on a device, and what ``"auto"`` picks."""
from __future__ import annotations

import functools
import importlib
import warnings
from types import ModuleType

import torch

from ._config import BACKENDS

# Fastest first: what "auto" tries on each device type.
_AUTO_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpu", "torch")}
_MODULES = {"torch": "torch_backend", "cpu": "cpu_backend", "cuda": "cuda_backend",
            "triton": "triton_backend"}


def _load(name: str):
    """Import a backend module; returns ``(module, None)`` or ``(None, reason it cannot load)``."""
    try:
        module = importlib.import_module(f"rmi_ext.{_MODULES[name]}")
    except ImportError as exc:  # a backend whose kernels are not built/installed
        return None, f"{type(exc).__name__}: {exc}"
    reason = getattr(module, "unavailable_reason", lambda: None)()
    return (None, reason) if reason else (module, None)


def _device_reason(name: str, device: torch.device) -> str | None:
    """Why backend ``name`` cannot run on ``device`` (``None`` when it can, once loaded)."""
    if name in ("reference", "torch"):
        return None
    if device.type == "cuda" and name in ("cuda", "triton") and not torch.cuda.is_available():
        return "no CUDA device is available"
    if name == "cpu" and device.type != "cpu":
        return f"backend 'cpu' runs on CPU tensors only, got a {device.type} tensor"
    if name == "cuda" and device.type != "cuda":
        return f"backend 'cuda' runs on CUDA tensors only, got a {device.type} tensor"
    if name == "triton" and device.type not in ("cuda", "cpu"):  # CPU: the probe decides
        return (f"backend 'triton' runs on CUDA tensors (or on CPU tensors under "
                f"TRITON_INTERPRET=1), got a {device.type} tensor")
    return None


@functools.lru_cache(maxsize=None)
def _probe(name: str, device: str) -> str | None:
    """Run the backend's ``probe(device)`` once per device (e.g. Triton compiles and launches a
    tiny kernel: a missing C compiler or a driver mismatch shows here, not in a training step).
    ``None`` when it works or the backend has no probe, else the reason."""
    module = _load(name)[0]
    probe = getattr(module, "probe", None)
    return None if probe is None else probe(torch.device(device))


def why_unavailable(name: str, device) -> str | None:
    """``None`` if backend ``name`` can run on ``device``, else the reason it cannot."""
    device = torch.device(device)
    reason = _device_reason(name, device)
    if reason is None and name not in ("reference", "torch"):
        reason = _load(name)[1] or _probe(name, str(device))
    return reason


def auto_backend(device) -> str:
    """The backend ``backend="auto"`` uses for tensors on ``device``: the fastest that runs.
    A backend that imports but fails its probe is skipped with one warning naming the cause."""
    device = torch.device(device)
    for name in _AUTO_ORDER.get(device.type, ("torch",)):
        reason = why_unavailable(name, device)
        if reason is None:
            return name
        if _load(name)[0] is not None and _device_reason(name, device) is None:
            warn_once(f"rmi_ext: backend 'auto' skips {name!r} on {device}: {reason}")
    return "torch"


@functools.lru_cache(maxsize=None)
def warn_once(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=3)


#: Backend modules resolved so far, by name (read by rmi_ext.function, also under torch.compile).
LOADED: dict[str, ModuleType] = {}


@torch.compiler.assume_constant_result
def resolve_backend(name: str, device: str) -> str:
    """The backend that runs for ``backend=name`` on ``device`` (a ``str``, e.g. ``"cpu"``).

    Raises ``ValueError`` for an unknown name and ``RuntimeError`` (with the reason) for a
    backend that cannot run on ``device``: a requested backend never silently falls back.
    After it returns, ``LOADED[name]`` holds the module (not for ``"reference"``). Under
    ``torch.compile`` its result is a trace-time constant.
    """
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if name == "auto":
        name = auto_backend(device)
    if name == "reference":
        return name
    reason = why_unavailable(name, device)  # the probe's result is cached per device
    if reason is not None:
        raise RuntimeError(f"rmi_loss backend {name!r} cannot run on {torch.device(device)}: "
                           f"{reason}")
    LOADED[name] = _load(name)[0]
    return name


#: Features beyond planar integer-label losses, by the module attribute that declares them.
FEATURES = {"volumes": "supports_volumes", "float_targets": "supports_float_targets",
            "region_mi": "supports_region_mi"}
#: What each feature is, for messages.
FEATURE_NAMES = {"volumes": "3-D logits [N, C, D, H, W] and per-axis radius/stride/pool_size",
                 "float_targets": "float targets", "region_mi": "region_mi"}


@torch.compiler.assume_constant_result
def supports(name: str, feature: str) -> bool:
    """Whether backend ``name`` computes ``feature`` (a key of :data:`FEATURES`: its module sets
    the attribute to ``True``; the reference computes everything). ``False`` if it cannot load."""
    return name == "reference" or bool(getattr(_load(name)[0], FEATURES[feature], False))


def supports_volumes(name: str) -> bool:
    """Whether backend ``name`` computes volumes and per-axis options."""
    return supports(name, "volumes")


@torch.compiler.assume_constant_result
def auto_backend_for(device: str, features: tuple[str, ...]) -> str:
    """What ``"auto"`` runs on ``device`` when the call needs ``features``: the fastest
    available backend that :func:`supports` them all, else ``"reference"``."""
    device = torch.device(device)
    for name in _AUTO_ORDER.get(device.type, ("torch",)):
        if all(supports(name, f) for f in features) and why_unavailable(name, device) is None:
            return name
    return "reference"


def auto_volume_backend(device: str) -> str:
    """What ``"auto"`` runs for volumes and per-axis options on ``device``."""
    return auto_backend_for(device, ("volumes",))


def backend_info(device="cpu") -> dict:
    """What runs on ``device``: ``{"device", "auto", "available": {name: True or reason}}`` and,
    per feature of :data:`FEATURES` (``"volumes"``: volumes and per-axis options,
    ``"float_targets"``, ``"region_mi"``), ``feature``: the backends that compute it and
    ``auto_<feature>``: what ``"auto"`` runs for it."""
    device = torch.device(device)
    available = {}
    for name in BACKENDS[1:]:
        reason = why_unavailable(name, device)
        available[name] = True if reason is None else reason
    info = {"device": str(device), "auto": auto_backend(device)}
    info.update({f"auto_{f}": auto_backend_for(str(device), (f,)) for f in FEATURES})
    info["available"] = available
    info.update({f: [name for name in BACKENDS[1:] if supports(name, f)] for f in FEATURES})
    return info
