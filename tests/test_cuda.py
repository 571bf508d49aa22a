"""Backend ``"cuda"`` (csrc/cuda): compile checks and a host emulation without a GPU, and the
compiled kernels against the unfold reference on a GPU.

Without a GPU (needs ``nvcc`` on PATH):

* ``csrc/cuda/check/compile_check.cu`` (torch-free) instantiates every kernel template of
  ``rmi_kernels.cuh``; it must compile with ``nvcc -c``.
* ``csrc/cuda/check/emulate.cu`` runs the kernels' per-element functions on the host, in the
  kernels' plan; wrapped as a backend below, it is checked against the reference (loss and
  gradient) exactly like the GPU kernels. Only the grid-stride loops, the block reductions and
  the torch glue (``rmi_cuda.cu``) are left to the GPU tests.
* ``RMI_TEST_CUDA_GLUE=1`` also compiles ``rmi_cuda.cu`` against the installed torch's headers
  (about a minute of CPU; off by default).

With a GPU and ``rmi_ext._C`` built with its CUDA kernels: ``backend="cuda"`` against
``backend="reference"`` for the loss and the gradient (tolerances as test_backends.py: float64
1e-10, float32 1e-5 / 1e-4; gradients as ``max |diff| / max |grad|``).
"""
from __future__ import annotations

import ctypes
import os
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

import rmi_ext
from conftest import make_inputs, rel_err
from rmi_ext import torch_backend
from rmi_ext._config import make_config
from rmi_ext._dispatch import LOADED
from rmi_ext.function import RMIFunction

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
NVCC = shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")

TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-5, 1e-4),
       torch.float16: (1e-5, 2e-3), torch.bfloat16: (1e-5, 1.6e-2)}  # (loss rel, grad rel to max)
GRAD_OUT = 1.7


def _cuda_reason():
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    try:
        from rmi_ext import cuda_backend
    except ImportError as exc:
        return f"rmi_ext._C cannot be imported: {exc}"
    return cuda_backend.unavailable_reason()


CUDA_REASON = _cuda_reason()
needs_cuda = pytest.mark.skipif(CUDA_REASON is not None, reason=str(CUDA_REASON))


# ---- comparison against the reference (shared by the emulation and the GPU tests) -------------


def _terms(x, labels, cfg, backend):
    """``(loss, grad)`` of a backend name, or of the ``Emulated`` kernels."""
    x = x.detach().clone().requires_grad_(True)  # clone keeps the memory format
    out_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    if isinstance(backend, Emulated):  # not a public backend: straight to the autograd.Function
        base, rmi = RMIFunction.apply(x, labels, cfg, backend.name)
        w_base, w_rmi = cfg.term_weights
        loss = w_base * base.to(out_dtype) + w_rmi * rmi.to(out_dtype)
    else:
        loss = rmi_ext.rmi_loss(x, labels, backend=backend, **cfg._asdict())
    grad, = torch.autograd.grad(loss, x, torch.tensor(GRAD_OUT, dtype=loss.dtype,
                                                      device=loss.device))
    return loss.detach(), grad


def check_against_reference(backend, x, labels, **opts):
    """Loss and gradient of ``backend`` vs the reference (fp16/bf16: float32 on the same values)."""
    cfg = make_config(**opts)
    dtype = x.dtype
    loss, grad = _terms(x, labels, cfg, backend)
    ref_x = x.detach().float() if dtype in (torch.float16, torch.bfloat16) else x.detach()
    ref_loss, ref_grad = _terms(ref_x.contiguous(), labels, cfg, "reference")
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert grad.dtype == dtype and grad.shape == x.shape
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    tol_loss, tol_grad = TOL[dtype]
    loss_err, grad_err = rel_err(loss, ref_loss), rel_err(grad, ref_grad)
    assert loss_err <= tol_loss, f"loss {loss.item()!r} vs reference {ref_loss.item()!r}"
    assert grad_err <= tol_grad, f"gradient differs from the reference by {grad_err:.3g}"


def pool_grid(radii):
    """mode x pool x DF 1..4 x radius (DF 1 once: without downsampling the pool is unused)."""
    cases = []
    for mode in ("sigmoid", "softmax"):
        for pool in ("avg", "max", "interp"):
            for stride in (1, 2, 3, 4):
                for radius in radii:
                    if stride > 1 or pool == "avg":
                        cases.append(pytest.param(mode, pool, stride, radius,
                                                  id=f"{mode}-{pool}-s{stride}-r{radius}"))
    return cases


def relayout(x, labels, layout):
    """``x`` channels-last, or ``x`` and ``labels`` with unusual strides on every axis
    (transposed spatial axes, a channel step of 2, a label map sliced along W)."""
    x = x.detach()
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last), labels
    x = x.transpose(2, 3).contiguous().transpose(2, 3)
    x = torch.cat([x, x], dim=1)[:, ::2]
    labels = torch.cat([labels, labels], dim=2)[:, :, ::2]
    return x, labels


def side(radius, stride):
    """An input side whose downsampled map holds about 3R x 3R pixels: enough windows for
    well-conditioned moments (with K < d windows even the torch backend drifts to 1e-8)."""
    return 3 * radius * stride + 5


# ---- without a GPU: nvcc builds ----------------------------------------------------------------


class Builds:
    """The nvcc builds of this module, started together (each takes tens of seconds)."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.procs = {}

    def start(self, name, args):
        self.procs[name] = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE,
                                            stderr=subprocess.STDOUT, text=True)

    def result(self, name):
        proc = self.procs[name]
        out, _ = proc.communicate(timeout=900)
        return proc.returncode, out


def _glue_command(out: Path):
    """nvcc command compiling rmi_cuda.cu against the installed torch (None if it cannot)."""
    from torch.utils import cpp_extension

    includes = cpp_extension.include_paths()
    if not any((Path(p) / "c10/cuda/CUDAStream.h").exists() for p in includes):
        return None
    # A CPU build of torch ships the c10/cuda headers but not the generated macros file.
    generated = any((Path(p) / "c10/cuda/impl/cuda_cmake_macros.h").exists() for p in includes)
    return ([NVCC, "-std=c++17", "-c", "-O0", "-w", "--expt-relaxed-constexpr",
             "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
             "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
             "-Xcompiler", "-fPIC", "-I", str(CSRC)]
            + ([] if generated else ["-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE"])
            + [f"-I{p}" for p in includes]
            + [str(CSRC / "cuda/rmi_cuda.cu"), "-o", str(out)])


@pytest.fixture(scope="module")
def builds():
    if NVCC is None:
        pytest.skip("nvcc is not on PATH")
    with tempfile.TemporaryDirectory(prefix="rmi_cuda_test_") as tmp:
        tmp = Path(tmp)
        b = Builds(tmp)
        check = CSRC / "cuda/check"
        b.start("compile_check", [NVCC, "-std=c++17", "-c", "-I", str(CSRC),
                                  str(check / "compile_check.cu"), "-o", str(tmp / "check.o")])
        b.start("emulate", [NVCC, "-std=c++17", "-O2", "-I", str(CSRC),
                            str(check / "emulate.cu"), "-o", str(tmp / "emulate")])
        glue = _glue_command(tmp / "glue.o")
        if os.environ.get("RMI_TEST_CUDA_GLUE") == "1" and glue is not None:
            b.start("glue", glue)
        yield b
        for proc in b.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate()


@needs_nvcc
def test_kernels_compile_without_torch(builds):
    rc, out = builds.result("compile_check")
    assert rc == 0, out


@needs_nvcc
def test_glue_compiles_against_torch_headers(builds):
    if "glue" not in builds.procs:
        pytest.skip("set RMI_TEST_CUDA_GLUE=1 (needs torch's c10/cuda headers)")
    rc, out = builds.result("glue")
    assert rc == 0, out[-20000:]


# ---- without a GPU: host emulation of the kernels ----------------------------------------------

_DTYPES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
_LABELS = {torch.uint8: 0, torch.int32: 1, torch.int64: 2}
_POOLS = {"avg": 0, "max": 1, "interp": 2}
_MODES = {"sigmoid": 0, "softmax": 1}


def _storage_bytes(t):
    """``(elements, bytes)`` of the storage span ``t`` reads, from its first element."""
    span = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    flat = torch.as_strided(t.detach(), (span,), (1,), t.storage_offset()).contiguous()
    return span, ctypes.string_at(flat.data_ptr(), span * flat.element_size())


def _tensor_bytes(t):
    t = t.detach().double().contiguous()
    return ctypes.string_at(t.data_ptr(), t.numel() * 8)


class Emulated:
    """A backend module (``forward_stats``/``backward_grad``) running check/emulate.cu; the
    ``emulated`` fixture registers it with ``RMIFunction`` under the name ``name``."""

    name = "cuda-emulated"

    def __init__(self, exe: Path):
        self.exe = exe

    def _run(self, op, logits, labels, cfg, extra=(), channels_last_out=False):
        xn, xb = _storage_bytes(logits)
        ln, lb = _storage_bytes(labels)
        header = [op, _DTYPES[logits.dtype], _LABELS[labels.dtype], *logits.shape,
                  *logits.stride(), xn, *labels.stride(), ln, cfg.radius, cfg.stride,
                  _POOLS[cfg.pool], cfg.pool_size, cfg.ignore_index, _MODES[cfg.mode],
                  int(channels_last_out)]
        with tempfile.TemporaryDirectory() as tmp:
            src, dst = Path(tmp) / "in", Path(tmp) / "out"
            src.write_bytes(struct.pack(f"<{len(header)}q", *header) + xb + lb
                            + b"".join(_tensor_bytes(t) for t in extra))
            subprocess.run([str(self.exe), str(src), str(dst)], check=True)
            return torch.frombuffer(bytearray(dst.read_bytes()), dtype=torch.float64)

    def forward_stats(self, logits, labels, cfg):
        n, c = logits.shape[:2]
        d = cfg.dim
        out = self._run(0, logits, labels, cfg)
        means = out[3:3 + n * c * 2 * d].view(n, c, 2, d)
        cov = out[3 + n * c * 2 * d:].view(n, c, 3, d, d)
        return out[0], out[1], out[2].long(), means, cov

    def backward_grad(self, logits, labels, cfg, base_scale, coef, shift):
        channels_last = (logits.shape[1] > 1 and not logits.is_contiguous()
                         and logits.is_contiguous(memory_format=torch.channels_last))
        grad = self._run(1, logits, labels, cfg, (base_scale.reshape(1), coef, shift),
                         channels_last)
        return grad.view(logits.shape).to(logits.dtype)


@pytest.fixture(scope="module")
def emulated(builds):
    rc, out = builds.result("emulate")
    assert rc == 0, out
    backend = Emulated(builds.tmp / "emulate")
    LOADED[backend.name] = backend
    yield backend
    LOADED.pop(backend.name, None)


@needs_nvcc
@pytest.mark.parametrize("mode,pool,stride,radius", pool_grid(radii=(1, 3)))
def test_emulated_kernels_float64(emulated, mode, pool, stride, radius):
    s = side(radius, stride)
    x, labels = make_inputs((2, 3, s, s + 2), 7 * stride + radius, mode=mode)
    check_against_reference(emulated, x, labels, mode=mode, pool=pool, stride=stride,
                            radius=radius)


@needs_nvcc
@pytest.mark.parametrize("radius,stride,pool,pool_size", [
    (2, 2, "max", None), (7, 1, "avg", None), (7, 2, "avg", None), (10, 1, "avg", None),
    (3, 2, "avg", 3), (3, 2, "max", 3), (2, 3, "max", 5), (3, 4, "avg", 1), (3, 4, "max", 2),
    (2, 3, "avg", 6)])
def test_emulated_kernels_radius_and_pool_size(emulated, radius, stride, pool, pool_size):
    s = side(radius, stride)
    x, labels = make_inputs((2, 3, s + 1, s), radius + stride)
    check_against_reference(emulated, x, labels, pool=pool, stride=stride, radius=radius,
                            pool_size=pool_size, lambda_way=0, weight_lambda=0.3)


@needs_nvcc
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode,pool,stride", [("sigmoid", "avg", 4), ("softmax", "max", 2),
                                              ("sigmoid", "interp", 3), ("softmax", "avg", 1)])
def test_emulated_kernels_low_precision(emulated, dtype, mode, pool, stride):
    x, labels = make_inputs((2, 4, 29, 31), stride, mode=mode, dtype=dtype)
    check_against_reference(emulated, x, labels, mode=mode, pool=pool, stride=stride)


@needs_nvcc
@pytest.mark.parametrize("label_dtype", [torch.uint8, torch.int32, torch.int64])
@pytest.mark.parametrize("layout", ["channels_last", "strided"])
def test_emulated_kernels_layouts(emulated, label_dtype, layout):
    x, labels = relayout(*make_inputs((2, 3, 31, 34), 3, label_dtype=label_dtype), layout)
    assert x.stride() != x.contiguous().stride()
    check_against_reference(emulated, x, labels, pool="max", stride=2, mode="sigmoid")


@needs_nvcc
def test_emulated_first_term_counts(emulated):
    """Non-finite logits are counted; all-ignored labels give zero first-term sums."""
    x, labels = make_inputs((2, 3, 13, 12), 0, requires_grad=False)
    x[0, 1, 2, 3], x[1, 2, 0, 0], x[1, 0, 5, 5] = float("nan"), float("inf"), -float("inf")
    cfg = make_config(stride=2)
    _, _, nonfinite, _, _ = emulated.forward_stats(x, labels, cfg)
    assert nonfinite.item() == 3
    for mode in ("sigmoid", "softmax"):
        cfg = make_config(stride=2, mode=mode)
        ignored = torch.full_like(labels, 255)
        base_sum, base_count, nonfinite, means, cov = emulated.forward_stats(
            x.nan_to_num(0.0, 0.0, 0.0), ignored, cfg)
        want = torch_backend.forward_stats(x.nan_to_num(0.0, 0.0, 0.0), ignored, cfg)
        assert base_sum.item() == 0.0 and base_count.item() == 0.0 and nonfinite.item() == 0
        torch.testing.assert_close(means, want[3], rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(cov, want[4], rtol=1e-12, atol=1e-15)


# ---- with a GPU: the compiled kernels ---------------------------------------------------------


def _cuda_inputs(shape, seed, **kw):
    x, labels = make_inputs(shape, seed, requires_grad=False, **kw)
    return x.cuda(), labels.cuda()


@needs_cuda
@pytest.mark.parametrize("mode,pool,stride,radius", pool_grid(radii=(1, 2, 3, 7)))
def test_cuda_float64(mode, pool, stride, radius):
    s = side(radius, stride)
    x, labels = _cuda_inputs((2, 3, s, s + 3), 7 * stride + radius, mode=mode)
    check_against_reference("cuda", x, labels, mode=mode, pool=pool, stride=stride,
                            radius=radius)


@needs_cuda
@pytest.mark.parametrize("mode", ["sigmoid", "softmax"])
@pytest.mark.parametrize("pool", ["avg", "max", "interp"])
@pytest.mark.parametrize("stride", [1, 4])
def test_cuda_float32(mode, pool, stride):
    x, labels = _cuda_inputs((2, 5, 64, 72), stride, mode=mode, dtype=torch.float32)
    check_against_reference("cuda", x, labels, mode=mode, pool=pool, stride=stride)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode,pool,stride", [("sigmoid", "avg", 4), ("softmax", "max", 2),
                                              ("sigmoid", "interp", 3), ("softmax", "avg", 1)])
def test_cuda_half(dtype, mode, pool, stride):
    x, labels = _cuda_inputs((2, 4, 48, 52), stride, mode=mode, dtype=dtype)
    check_against_reference("cuda", x, labels, mode=mode, pool=pool, stride=stride)


@needs_cuda
@pytest.mark.parametrize("radius,stride,pool,pool_size", [
    (3, 2, "avg", 3), (3, 2, "max", 3), (2, 3, "max", 5), (3, 4, "avg", 1), (3, 4, "max", 2),
    (2, 3, "avg", 6), (10, 1, "avg", None)])
def test_cuda_pool_size_and_lambda_way(radius, stride, pool, pool_size):
    s = side(radius, stride)
    x, labels = _cuda_inputs((2, 3, s + 1, s), radius + stride)
    check_against_reference("cuda", x, labels, pool=pool, stride=stride, radius=radius,
                            pool_size=pool_size, lambda_way=0, weight_lambda=0.3)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("label_dtype", [torch.uint8, torch.int32, torch.int64])
@pytest.mark.parametrize("layout", ["channels_last", "strided"])
def test_cuda_layouts(dtype, label_dtype, layout):
    x, labels = relayout(*_cuda_inputs((2, 3, 40, 46), 5, dtype=dtype, label_dtype=label_dtype),
                         layout)
    check_against_reference("cuda", x, labels, pool="max", stride=2)
    check_against_reference("cuda", x, labels, pool="avg", stride=1, mode="sigmoid")


@needs_cuda
@pytest.mark.parametrize("mode", ["sigmoid", "softmax"])
def test_cuda_all_ignored(mode):
    x, labels = _cuda_inputs((2, 3, 24, 24), 1, mode=mode)
    check_against_reference("cuda", x, torch.full_like(labels, 255), mode=mode, stride=2)


def _op_args(x, labels, cfg):
    return (x, labels, cfg.radius, cfg.stride, cfg.pool, cfg.pool_size, cfg.ignore_index,
            cfg.mode)


@needs_cuda
@pytest.mark.parametrize("pool", ["avg", "max", "interp"])
@pytest.mark.parametrize("mode", ["sigmoid", "softmax"])
def test_cuda_stages_match_torch_backend(pool, mode):
    """Stage-level comparison (localises a failure of the end-to-end tests)."""
    x, labels = _cuda_inputs((2, 3, 37, 41), 2, mode=mode)
    cfg = make_config(stride=3, pool=pool, mode=mode)
    got = torch.ops.rmi_ext.forward_stats(*_op_args(x, labels, cfg))
    want = torch_backend.forward_stats(x, labels, cfg)
    for name, a, b in zip(("base_sum", "base_count", "nonfinite", "means", "cov"), got, want):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert rel_err(a, b) <= 1e-12, name
    d = cfg.dim
    gen = torch.Generator().manual_seed(0)
    coef = torch.randn(2, 3, 2, d, d, generator=gen, dtype=torch.float64).cuda()
    shift = torch.randn(2, 3, d, generator=gen, dtype=torch.float64).cuda()
    base_scale = torch.tensor(0.37, dtype=torch.float64, device="cuda")
    got = torch.ops.rmi_ext.backward_grad(x, labels, base_scale, coef, shift,
                                          *_op_args(x, labels, cfg)[2:])
    want = torch_backend.backward_grad(x, labels, cfg, base_scale, coef, shift)
    assert rel_err(got, want) <= 1e-12


@needs_cuda
def test_cuda_nonfinite_count_and_determinism():
    x, labels = _cuda_inputs((2, 3, 33, 35), 4)
    cfg = make_config(stride=2)
    first = torch.ops.rmi_ext.forward_stats(*_op_args(x, labels, cfg))
    again = torch.ops.rmi_ext.forward_stats(*_op_args(x, labels, cfg))
    for a, b in zip(first, again):  # fixed reduction order: bitwise equal
        assert torch.equal(a, b)
    x[0, 1, 2, 3], x[1, 0, 4, 5] = float("nan"), float("inf")
    assert torch.ops.rmi_ext.forward_stats(*_op_args(x, labels, cfg))[2].item() == 2


@needs_cuda
def test_cuda_gradient_keeps_memory_format():
    x, labels = _cuda_inputs((2, 3, 20, 22), 6, dtype=torch.float32)
    x = x.contiguous(memory_format=torch.channels_last)
    cfg = make_config(stride=2)
    d = cfg.dim
    coef = torch.zeros(2, 3, 2, d, d, dtype=torch.float64, device="cuda")
    shift = torch.zeros(2, 3, d, dtype=torch.float64, device="cuda")
    base_scale = torch.tensor(1.0, dtype=torch.float64, device="cuda")
    grad = torch.ops.rmi_ext.backward_grad(x, labels, base_scale, coef, shift,
                                           *_op_args(x, labels, cfg)[2:])
    assert grad.stride() == x.stride() and grad.dtype == x.dtype


@needs_cuda
def test_cuda_argument_errors():
    x, labels = _cuda_inputs((1, 2, 16, 16), 0)
    cfg = make_config(stride=2)
    with pytest.raises(RuntimeError, match="labels must be on the logits' device"):
        torch.ops.rmi_ext.forward_stats(*_op_args(x, labels.cpu(), cfg))
    with pytest.raises(RuntimeError, match="labels must be uint8, int32 or int64"):
        torch.ops.rmi_ext.forward_stats(*_op_args(x, labels.short(), cfg))
    with pytest.raises(RuntimeError, match="smaller than the region radius"):
        torch.ops.rmi_ext.forward_stats(*_op_args(x, labels, make_config(stride=16)))
    with pytest.raises(RuntimeError, match="pool must be"):
        torch.ops.rmi_ext.forward_stats(x, labels, 3, 2, "mean", 2, 255, "sigmoid")
    with pytest.raises(RuntimeError, match="coef must have shape"):
        torch.ops.rmi_ext.backward_grad(
            x, labels, torch.tensor(1.0, dtype=torch.float64, device="cuda"),
            torch.zeros(1, 2, 2, 4, 4, dtype=torch.float64, device="cuda"),
            torch.zeros(1, 2, 9, dtype=torch.float64, device="cuda"),
            *_op_args(x, labels, cfg)[2:])


@needs_cuda
def test_cuda_opcheck():
    x, labels = _cuda_inputs((2, 3, 20, 22), 8)
    cfg = make_config(stride=2)
    tests = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.rmi_ext.forward_stats.default, _op_args(x, labels, cfg),
                          test_utils=tests)
    d = cfg.dim
    args = (x, labels, torch.tensor(0.5, dtype=torch.float64, device="cuda"),
            torch.randn(2, 3, 2, d, d, dtype=torch.float64, device="cuda"),
            torch.randn(2, 3, d, dtype=torch.float64, device="cuda"),
            *_op_args(x, labels, cfg)[2:])
    torch.library.opcheck(torch.ops.rmi_ext.backward_grad.default, args, test_utils=tests)
