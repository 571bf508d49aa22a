"""Shared helpers for the rmi_ext test suite (CPU).

* ``make_inputs``: seeded random ``(logits, labels)`` with ignored pixels.
* ``fast_backends()``: the fused backends that can run on CPU tensors here ("torch" always; "cpu"
  once ``rmi_ext._C`` is built; "triton" only under ``TRITON_INTERPRET=1``).
* ``rel_err``: ``max |a - b| / max |b|`` (plain ``|a - b| / |b|`` for scalars).

The suite runs single-threaded by default (tiny tensors are ~10x faster that way on a busy
machine); set ``RMI_TEST_THREADS`` to change it. One test in ``test_backends.py`` runs the fast
backends with 2 threads on purpose.
"""
from __future__ import annotations

import os
import sys

import torch

try:
    import rmi_ext
except ImportError:  # plain `pytest` from a source checkout: use the package next to tests/
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import rmi_ext

torch.set_num_threads(int(os.environ.get("RMI_TEST_THREADS", "1")))

FAST_CANDIDATES = ("torch", "cpu", "triton")

#: ``(loss_err / tol, grad_err / tol, loss_err, grad_err, dtype)`` of every backend comparison
#: in test_backends.py; printed at the end of the run when ``RMI_TEST_REPORT=1``.
ERRORS: list = []


def fast_backends() -> list[str]:
    """The fused backends available for CPU tensors (never ``"reference"``)."""
    available = rmi_ext.backend_info("cpu")["available"]
    return [b for b in FAST_CANDIDATES if available[b] is True]


def rel_err(a, b) -> float:
    """``max |a - b| / max |b|`` in float64 (absolute error when ``b`` is all zero)."""
    a = a.detach().double() if torch.is_tensor(a) else torch.as_tensor(a, dtype=torch.float64)
    b = b.detach().double() if torch.is_tensor(b) else torch.as_tensor(b, dtype=torch.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    diff = (a - b).abs().max().item() if a.numel() else 0.0
    scale = b.abs().max().item() if b.numel() else 0.0
    return diff / scale if scale > 0 else diff


def make_inputs(shape, seed=0, *, dtype=torch.float64, mode="sigmoid", ignore_frac=0.2,
                invalid_labels=None, ignore_index=255, label_dtype=torch.int64, scale=2.0,
                requires_grad=True):
    """Seeded ``logits [N, C, H, W]`` (``scale * randn``) and ``labels [N, H, W]``.

    A fraction ``ignore_frac`` of the pixels is ignored. In sigmoid mode (``invalid_labels``
    defaults to True there) a third of those get a label ``>= C`` and, for signed label dtypes, a
    third a negative label; the rest ``ignore_index``. Softmax mode only uses ``ignore_index``
    (the reference's ``F.cross_entropy`` raises on any other out-of-range label).
    """
    n, c, h, w = shape
    gen = torch.Generator().manual_seed(seed)
    logits = (scale * torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype)
    labels = torch.randint(0, c, (n, h, w), generator=gen)
    if invalid_labels is None:
        invalid_labels = mode == "sigmoid"
    u = torch.rand((n, h, w), generator=gen)
    ignored = u < ignore_frac
    labels[ignored] = ignore_index
    if invalid_labels:
        labels[u < ignore_frac * 2 / 3] = c + 3 if c + 3 != ignore_index else c + 4
        labels[u < ignore_frac / 3] = c
        if label_dtype not in (torch.uint8,) and ignore_index != -1:
            labels[u < ignore_frac / 6] = -1
    labels = labels.to(label_dtype)
    if requires_grad:
        logits.requires_grad_(True)
    return logits, labels


def pytest_terminal_summary(terminalreporter):
    if os.environ.get("RMI_TEST_REPORT") != "1" or not ERRORS:
        return
    write = terminalreporter.write_line
    write(f"backend vs reference: {len(ERRORS)} comparisons; largest error/tolerance ratios:")
    for dtype in sorted({e[4] for e in ERRORS}):
        errs = [e for e in ERRORS if e[4] == dtype]
        worst_loss = max(errs, key=lambda e: e[0])
        worst_grad = max(errs, key=lambda e: e[1])
        write(f"  {dtype}: loss {worst_loss[2]:.2e} ({worst_loss[0]:.1e} of tol), "
              f"grad {worst_grad[3]:.2e} ({worst_grad[1]:.1e} of tol)")
