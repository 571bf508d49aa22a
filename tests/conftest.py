"""The test harness of the rmi_ext suite: inputs, backends x devices, and one comparison with the
reference under one tolerance table.

* ``BACKEND_DEVICES``: ``pytest.param(backend, device)`` for every fused backend on every device
  type (torchvision's ``cpu_and_cuda()`` idea): ``torch``, ``cpu``, ``triton`` on CPU tensors
  (Triton interpreted, under ``TRITON_INTERPRET=1``), ``torch``, ``cuda``, ``triton`` on CUDA
  tensors. A pair that cannot run here is skipped with the reason ``rmi_ext`` gives.
* ``make_inputs``: seeded random ``(logits, labels)`` with ignored pixels, on any device.
* ``run`` / ``compare``: loss and gradient of a backend; ``compare`` checks them against
  ``backend="reference"`` with :data:`TOL` and returns the errors.
* ``rel_err``: ``max |a - b| / max |b|`` (plain ``|a - b| / |b|`` for scalars).

Interpreted Triton is ~50x slower than the other CPU backends: on it (a ``backend`` parameter
"triton" with a CPU ``device`` or none), each test runs every ``INTERPRETED_SAMPLE``-th (8) of its
parametrised cases and at least one (a fixed choice by the test's name), unless the test is
marked ``@pytest.mark.every_case``; compiled on a GPU every case runs.
``RMI_TEST_INTERPRETED_SAMPLE=1`` runs them all. Interpreted launches patch ``triton.language``
once per launch instead of once per ``@triton.jit`` call (a session fixture, ~25% faster).

Two tiers. ``pytest tests`` runs the quick tier: every test except the slow ones, which are the
tests that interpret Triton kernels (:func:`interprets_triton`), those that need test_cuda.py's
nvcc builds (:data:`NVCC_BUILD_FIXTURES`) and those marked ``@pytest.mark.slow`` (peak-memory
probes, ``torch.compile`` of the torch backend, subprocess runs, 2^15 classes, Triton's sm_90
compilation). ``--full`` runs both tiers; CI runs the quick tier (the README's command) and then
``--full -m slow``, and the stack legs and the GPU check run ``--full``.

The suite runs single-threaded by default (tiny tensors are ~10x faster that way on a busy
machine); set ``RMI_TEST_THREADS`` to change it. The README runs it in one process per core
(``pytest -n auto --dist loadgroup``, pytest-xdist): the tests are independent, except the
modules of :data:`ONE_WORKER_MODULES`, whose tests stay in one worker.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import zlib

# Triton kernels are interpreted (for CPU tensors) iff TRITON_INTERPRET=1 when triton and
# rmi_ext are first imported: without a CUDA device, the suite interprets them.
if not any(name[6:].isdigit() for name in os.listdir("/dev") if name.startswith("nvidia")):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

try:
    import rmi_ext
except ImportError:  # plain `pytest` from a source checkout: use the package next to tests/
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import rmi_ext

torch.set_num_threads(int(os.environ.get("RMI_TEST_THREADS", "1")))

#: Relative tolerances ``(loss, gradient)`` against the reference, by logits dtype (gradients as
#: ``max |diff| / max |grad|``). fp16/bf16 logits are compared with the float32 reference on the
#: same rounded values: every backend computes in float32 and rounds the gradient once.
TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-5, 1e-4),
       torch.float16: (1e-5, 2e-3), torch.bfloat16: (1e-5, 1.6e-2)}

FAST_BACKENDS = {"cpu": ("torch", "cpu", "triton"), "cuda": ("torch", "cuda", "triton")}
INTERPRETED_SAMPLE = int(os.environ.get("RMI_TEST_INTERPRETED_SAMPLE", "8"))

#: ``(loss_err / tol, grad_err / tol, loss_err, grad_err, dtype)`` of every :func:`compare`;
#: printed at the end of the run when ``RMI_TEST_REPORT=1``.
ERRORS: list = []


def _backend_device_params():
    params = []
    for device, backends in FAST_BACKENDS.items():
        for backend in backends:
            reason = rmi_ext.backend_info(device)["available"][backend]
            if device == "cuda" and not torch.cuda.is_available():
                reason = "no CUDA device is available"
            marks = () if reason is True else pytest.mark.skip(reason=f"{backend} on {device}: "
                                                                      f"{reason}")
            params.append(pytest.param(backend, device, marks=marks, id=f"{backend}-{device}"))
    return params


BACKEND_DEVICES = _backend_device_params()


def feature_params(feature: str) -> list:
    """:data:`BACKEND_DEVICES` of the backends that compute ``feature`` (a key of
    ``rmi_ext._dispatch.FEATURES``, e.g. ``"float_targets"``); unavailable ones stay as skips."""
    return [p for p in BACKEND_DEVICES if p.values[0] in rmi_ext.backend_info("cpu")[feature]]


def fast_backends(device: str = "cpu") -> list[str]:
    """The fused backends that run on ``device`` here (never ``"reference"``)."""
    available = rmi_ext.backend_info(device)["available"]
    return [b for b in FAST_BACKENDS[device] if available[b] is True]


def peak_memory_ratio(logits: torch.Tensor, labels: torch.Tensor, *, warm_up: bool = True,
                      **options) -> float:
    """Peak torch allocation of one ``rmi_loss(logits, labels, **options).backward()`` over the
    logits' bytes, the gradient included: the benchmarks' profiler probe (running sum of the
    ``[memory]`` events). ``warm_up``: after one unprofiled call (a backend's one-time
    allocations, e.g. compiled kernels, are then not counted); without it the first call is
    measured, one-time allocations included (a bound at least as strict)."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
    try:
        from rmi_bench import peak_extra_bytes_torch
    finally:
        sys.path.pop(0)

    def fwd_bwd():
        rmi_ext.rmi_loss(logits, labels, **options).backward()
        logits.grad = None

    if warm_up:
        fwd_bwd()
    return peak_extra_bytes_torch(fwd_bwd) / (logits.numel() * logits.element_size())


def pytest_addoption(parser):
    parser.addoption("--full", action="store_true",
                     help="run the slow tier too (interpreted Triton, nvcc builds, memory "
                          "probes, subprocess runs: what CI runs); `--full -m slow` runs it alone")


def pytest_configure(config):
    config.addinivalue_line("markers", "every_case: run every case on interpreted Triton too")
    config.addinivalue_line("markers", "slow: the slow tier, run with --full (seconds to minutes "
                                       "a test)")
    config.addinivalue_line("markers", "interpreted: runs Triton kernels on CPU tensors (under "
                                       "TRITON_INTERPRET=1); skipped where they are compiled")
    config.addinivalue_line("markers", "xdist_group(name): tests that share one pytest-xdist "
                                       "worker (`--dist loadgroup`)")


#: Test modules whose tests share a module-scoped fixture too costly to build in two workers
#: (test_cuda.py: the nvcc builds), kept in one worker under ``pytest -n N --dist loadgroup``.
ONE_WORKER_MODULES = ("test_cuda.py",)


#: test_cuda.py's module fixtures that run nvcc (the torch-free compile check, the host emulation
#: build: minutes on 2 cores); the tests that use them are in the slow tier.
NVCC_BUILD_FIXTURES = ("builds", "emulated")

#: Where the "triton" backend runs CPU tensors (interpreted kernels): True, else the reason not.
TRITON_ON_CPU = rmi_ext.backend_info("cpu")["available"]["triton"]


def _case_params(item) -> dict:
    """The parameters of a parametrised test case (``{}`` otherwise)."""
    return getattr(getattr(item, "callspec", None), "params", {})


def interprets_triton(item) -> bool:
    """The test runs Triton kernels through the interpreter: marked ``interpreted``, or a case
    of the "triton" backend on CPU tensors (a ``backend`` parameter, with a CPU ``device`` or
    none)."""
    params = _case_params(item)
    return (item.get_closest_marker("interpreted") is not None
            or (params.get("backend") == "triton" and params.get("device", "cpu") == "cpu"))


def is_slow(item) -> bool:
    """In the slow tier (run with ``--full``): see the module docstring."""
    return (item.get_closest_marker("slow") is not None or interprets_triton(item)
            or any(name in getattr(item, "fixturenames", ()) for name in NVCC_BUILD_FIXTURES))


def _interpreted_sample(items):
    """The interpreted Triton cases to run: of each test function's cases that run the
    "triton" backend on CPU tensors (unless marked ``every_case``), every
    ``INTERPRETED_SAMPLE``-th in name order from a start chosen by the function's name, so
    that every test function keeps at least one. Returns the items to deselect."""
    by_function = {}
    for item in items:
        if (_case_params(item).get("backend") == "triton" and interprets_triton(item)
                and item.get_closest_marker("every_case") is None):
            by_function.setdefault(item.nodeid.split("[")[0], []).append(item)
    drop = []
    for function, cases in by_function.items():
        cases.sort(key=lambda item: item.name)
        start = zlib.crc32(function.encode()) % min(INTERPRETED_SAMPLE, len(cases))
        drop += [item for i, item in enumerate(cases) if (i - start) % INTERPRETED_SAMPLE]
    return drop


@pytest.hookimpl(tryfirst=True)  # before ``-m``, which then sees the ``slow`` marks
def pytest_collection_modifyitems(config, items):
    """``xdist_group`` marks for :data:`ONE_WORKER_MODULES`; ``interpreted`` tests skipped where
    Triton does not run CPU tensors; the ``slow`` mark on the slow tier (:func:`is_slow`), which
    is deselected unless ``--full``; interpreted Triton: a sample of each test's cases
    (:func:`_interpreted_sample`)."""
    for item in items:
        if item.path.name in ONE_WORKER_MODULES:
            item.add_marker(pytest.mark.xdist_group(item.path.name))
        if item.get_closest_marker("interpreted") and TRITON_ON_CPU is not True:
            item.add_marker(pytest.mark.skip(reason=f"Triton on CPU: {TRITON_ON_CPU}"))
    slow = {item for item in items if is_slow(item)}
    for item in slow:
        item.add_marker(pytest.mark.slow)
    drop = set() if config.getoption("full") else set(slow)
    if INTERPRETED_SAMPLE > 1:
        drop.update(_interpreted_sample([item for item in items if item not in drop]))
    if drop:
        config.hook.pytest_deselected(items=list(drop))
        items[:] = [item for item in items if item not in drop]


def pytest_report_header(config):
    if config.getoption("full"):
        return "rmi_ext tests: both tiers (--full)"
    return "rmi_ext tests: the quick tier (--full adds the slow tier, as CI runs it)"


def interpreter_options(required: bool, **builder_options):
    """Body of a fixture: the Triton interpreter builder's options replaced (e.g.
    ``sanitize_overflow``) until the fixture ends. ``required=False`` keeps going without triton
    or on a triton whose interpreter lacks those options."""
    mp = pytest.MonkeyPatch()
    try:
        from triton.runtime import interpreter

        builder = interpreter.interpreter_builder
        mp.setattr(builder, "options", dataclasses.replace(builder.options, **builder_options))
    except (ImportError, AttributeError, TypeError):
        if required:
            raise
    yield
    mp.undo()


@pytest.fixture(autouse=True, scope="session")
def _interpreter_without_overflow_sanitizer():
    """Interpreted Triton runs without its int32-overflow sanitizer (about 2x faster; no index
    can overflow at the suite's sizes). test_triton_limits.py turns it on for its own module."""
    yield from interpreter_options(False, sanitize_overflow=False)


@pytest.fixture(autouse=True, scope="session")
def _interpreter_patches_triton_language_once_per_launch():
    """The Triton interpreter swaps the builtins of ``triton.language`` (and ``.core``) for
    interpreted ones when a launch starts (and restores them when it ends), and again at every
    call of a ``@triton.jit`` function inside the launch (ours and ``tl.sum``'s kind): the same
    substitution repeated, about a quarter of the interpreter's time on the backend's kernels.
    Here a launch swaps both modules once and the calls inside it swap nothing; the kernels and
    their results are unchanged. On a triton without these internals (``_patch_lang``) the
    interpreter is left as it is."""
    try:
        import types

        import triton.language as tl
        from triton.runtime import interpreter

        patch_lang, empty_scope = interpreter._patch_lang, interpreter._LangPatchScope
    except (ImportError, AttributeError):
        yield
        return
    sees_both = types.SimpleNamespace(__globals__={"tl": tl, "core": tl.core})
    in_launch = False

    def patch_once(fn):
        nonlocal in_launch
        if in_launch:
            return empty_scope()
        scope = patch_lang(sees_both)
        restore = scope.restore

        def restore_and_end_launch():
            nonlocal in_launch
            in_launch = False
            restore()

        scope.restore, in_launch = restore_and_end_launch, True
        return scope

    mp = pytest.MonkeyPatch()
    mp.setattr(interpreter, "_patch_lang", patch_once)
    yield
    mp.undo()


def rel_err(a, b) -> float:
    """``max |a - b| / max |b|`` in float64 (absolute error when ``b`` is all zero)."""
    a = a.detach().double() if torch.is_tensor(a) else torch.as_tensor(a, dtype=torch.float64)
    b = b.detach().double() if torch.is_tensor(b) else torch.as_tensor(b, dtype=torch.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    a, b = a.cpu(), b.cpu()
    diff = (a - b).abs().max().item() if a.numel() else 0.0
    scale = b.abs().max().item() if b.numel() else 0.0
    return diff / scale if scale > 0 else diff


def make_inputs(shape, seed=0, *, dtype=torch.float64, mode="sigmoid", ignore_frac=0.2,
                invalid_labels=None, ignore_index=255, label_dtype=torch.int64, scale=2.0,
                requires_grad=True, device="cpu"):
    """Seeded ``logits [N, C, H, W]`` (``scale * randn``) and ``labels [N, H, W]`` on ``device``.

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
    logits, labels = logits.to(device), labels.to(label_dtype).to(device)
    if requires_grad:
        logits.requires_grad_(True)
    return logits, labels


def run(x, labels, backend, grad_output=None, **opts):
    """``(loss, grad)`` of ``rmi_loss`` with ``x`` used as given (strides and memory format kept).
    ``backend``: a name, or a callable ``(logits, labels, **opts) -> loss`` (e.g. emulated
    kernels that are not a public backend)."""
    leaf = x.detach().requires_grad_(True) if x.is_leaf else x
    if callable(backend):
        loss = backend(leaf, labels, **opts)
    else:
        loss = rmi_ext.rmi_loss(leaf, labels, backend=backend, **opts)
    grad, = torch.autograd.grad(loss, leaf, grad_output)
    return loss.detach(), grad


def gradcheck_entries(fn, inputs, max_elems=None, seed=0, **kwargs) -> bool:
    """``torch.autograd.gradcheck`` (full mode) of scalar ``fn(*inputs)``; an input of more than
    ``max_elems`` entries is checked on a seeded random subset of ``max_elems`` of them, its
    first and last entry included (both image corners), the rest held fixed: the Jacobian
    columns of those entries are checked in full. (gradcheck's ``fast_mode`` is not used: its
    single random direction missed a deliberate 1% error on one pooled pixel's gradient.)"""
    if max_elems is None or all(t.numel() <= max_elems for t in inputs):
        return torch.autograd.gradcheck(fn, tuple(inputs), **kwargs)
    gen = torch.Generator().manual_seed(seed)
    flat, picks = [], []
    for t in inputs:
        n = t.numel()
        if n <= max_elems:
            idx = torch.arange(n)
        else:
            idx = torch.randperm(n - 2, generator=gen)[:max_elems - 2] + 1
            idx = torch.cat([idx, torch.tensor([0, n - 1])])
        flat.append(t.detach().reshape(-1))
        picks.append(idx)

    def on_entries(*values):
        return fn(*(base.index_put((idx,), v).view_as(t)
                    for base, idx, v, t in zip(flat, picks, values, inputs)))

    entries = tuple(base[idx].clone().requires_grad_(True) for base, idx in zip(flat, picks))
    return torch.autograd.gradcheck(on_entries, entries, **kwargs)


#: Entries per input of a gradcheck through interpreted Triton kernels (each entry costs two
#: interpreted forwards, about a second; the whole Jacobian took six minutes a test).
INTERPRETED_GRADCHECK_ENTRIES = 16


def gradcheck_max_elems(backend: str, device: str = "cpu"):
    """``max_elems`` of :func:`gradcheck_entries` for ``backend``: every entry, except for the
    interpreted Triton kernels (:data:`INTERPRETED_GRADCHECK_ENTRIES`)."""
    return INTERPRETED_GRADCHECK_ENTRIES if backend == "triton" and device == "cpu" else None


def compare(backend, x, labels, grad_output=None, ref_dtype=None, **opts):
    """Check ``backend`` against the reference; returns ``(loss_err, grad_err)``.

    The reference runs on a contiguous copy on the same device, in ``ref_dtype`` (default: the
    logits' dtype; fp16/bf16 logits are compared with float32 on the same rounded values).
    """
    x = x.detach()
    dtype = x.dtype
    if ref_dtype is None:
        ref_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    loss, grad = run(x, labels, backend, grad_output, **opts)
    ref_go = None if grad_output is None else grad_output.to(ref_dtype)
    ref_loss, ref_grad = run(x.to(ref_dtype).contiguous(), labels, "reference", ref_go, **opts)
    assert loss.dtype == out_dtype and loss.dim() == 0
    assert grad.dtype == dtype and grad.shape == x.shape and grad.device == x.device
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        assert grad.is_contiguous(memory_format=torch.channels_last), "gradient not channels_last"
    tol_loss, tol_grad = TOL[dtype]
    loss_err, grad_err = rel_err(loss, ref_loss), rel_err(grad, ref_grad)
    ERRORS.append((loss_err / tol_loss, grad_err / tol_grad, loss_err, grad_err, str(dtype)))
    assert loss_err <= tol_loss, f"loss {loss.item()!r} vs reference {ref_loss.item()!r}"
    assert grad_err <= tol_grad, f"gradient differs from the reference by {grad_err:.3g}"
    return loss_err, grad_err


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
