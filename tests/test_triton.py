"""Backend ``"triton"`` against the unfold reference: loss terms and gradients.

CPU tensors run the Triton kernels under the interpreter, which is exact (float64 included) but
slow, so shapes are tiny. ``TRITON_INTERPRET=1`` is set before triton is imported and while this
module's tests run (the dispatcher accepts CPU tensors for "triton" only then); the backend runs
CPU tensors on interpreted kernels and CUDA tensors on compiled ones whatever the variable was
at import. The CUDA test runs the same comparison compiled, in a subprocess.
"""
from triton_interpreted import interpreted, tb, tbi, triton  # noqa: F401  (first: see there)

import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import rmi_ext  # noqa: E402
from rmi_ext import torch_backend  # noqa: E402
from rmi_ext._config import make_config  # noqa: E402

TOLS = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-5, 1e-4),
        torch.float16: (1e-5, 2e-2), torch.bfloat16: (1e-5, 5e-2)}  # (loss rel, grad rel to max)
GRAD_OUT = 1.7


@pytest.fixture(autouse=True, scope="module")
def _interpreter():
    """``TRITON_INTERPRET=1`` while this module runs, and the interpreter's int32-overflow
    sanitizer off: it about doubles the run time, and no index can overflow at these sizes."""
    yield from interpreted(False, sanitize_overflow=False)


def _inputs(n=2, c=2, h=13, w=11, dtype=torch.float64, seed=0, ignored=True, out_of_range=False,
            label_dtype=torch.int64, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    logits = (2.0 * torch.randn(n, c, h, w, generator=gen, dtype=torch.float64)).to(dtype)
    labels = torch.randint(0, c, (n, h, w), generator=gen)
    if ignored:
        labels[0, : h // 3, : w // 2] = 255
    if out_of_range:  # ignored by the mask (sigmoid mode only: the reference CE raises on them)
        labels[-1, -2:, :] = c
        labels[-1, -1, ::3] = -1
    return logits.to(device), labels.to(label_dtype).to(device)


def _terms_and_grad(logits, labels, backend, **kw):
    x = logits.detach().clone().requires_grad_()
    terms = rmi_ext.rmi_loss_terms(x, labels, backend=backend, **kw)
    (GRAD_OUT * terms.loss).backward()
    return [t.detach() for t in terms], x.grad


def _compare(logits, labels, **kw):
    """Triton vs reference on the same inputs: total, both terms and the gradient."""
    ref_terms, ref_grad = _terms_and_grad(logits, labels, "reference", **kw)
    tri_terms, tri_grad = _terms_and_grad(logits, labels, "triton", **kw)
    loss_tol, grad_tol = TOLS[logits.dtype]
    for name, t, r in zip(("loss", "base", "rmi"), tri_terms, ref_terms):
        assert t.dtype == r.dtype, name
        assert torch.isfinite(t), name
        err = (t.double() - r.double()).abs().item()
        assert err <= loss_tol * max(r.double().abs().item(), 1e-3), (name, t.item(), r.item())
    assert tri_grad.dtype == logits.dtype and tri_grad.shape == logits.shape
    assert torch.isfinite(tri_grad).all()
    diff = (tri_grad.double() - ref_grad.double()).abs().max().item()
    scale = ref_grad.double().abs().max().item()
    assert diff <= grad_tol * scale, (diff, scale)
    return tri_grad


# ---- float64: every pool mode x both modes, strides, radii, odd sizes ----------------------------

@pytest.mark.parametrize("mode", ["sigmoid", "softmax"])
@pytest.mark.parametrize("pool", ["avg", "max", "interp"])
def test_pool_modes_float64(pool, mode):
    logits, labels = _inputs(c=3, out_of_range=mode == "sigmoid")
    _compare(logits, labels, radius=2, stride=2, pool=pool, mode=mode)


@pytest.mark.parametrize("mode", ["sigmoid", "softmax"])
def test_no_downsampling_float64(mode):
    logits, labels = _inputs(h=11, w=10, out_of_range=mode == "sigmoid")
    _compare(logits, labels, radius=3, stride=1, mode=mode)


@pytest.mark.parametrize("pool,mode", [("avg", "sigmoid"), ("max", "softmax"),
                                       ("interp", "sigmoid")])
def test_stride3_float64(pool, mode):
    logits, labels = _inputs(h=16, w=14)
    _compare(logits, labels, radius=2, stride=3, pool=pool, mode=mode)


@pytest.mark.parametrize("radius,stride,size", [(1, 2, (9, 7)), (3, 2, (15, 13)),
                                                (5, 1, (13, 12))])
def test_radius_float64(radius, stride, size):
    logits, labels = _inputs(h=size[0], w=size[1])
    _compare(logits, labels, radius=radius, stride=stride, pool="avg")


@pytest.mark.parametrize("pool,pool_size", [("avg", 3), ("max", 3), ("avg", 1)])
def test_pool_size_float64(pool, pool_size):
    """Overlapping (k > s) and sparse (k < s) windows, padding k // 2."""
    logits, labels = _inputs(h=14, w=13)
    _compare(logits, labels, radius=2, stride=2, pool=pool, pool_size=pool_size)


@pytest.mark.parametrize("stride,pool", [(1, "avg"), (2, "max")])
def test_channels_last_float64(stride, pool):
    logits, labels = _inputs(h=12, w=11)
    logits = logits.to(memory_format=torch.channels_last)
    grad = _compare(logits, labels, radius=2, stride=stride, pool=pool)
    assert grad.is_contiguous(memory_format=torch.channels_last)


def test_strided_views_float64():
    """Non-contiguous logits (a strided slice) and labels (a transposed int32 view)."""
    big, _ = _inputs(n=2, c=4, h=13, w=23)
    logits = big[:, 1:3, :, ::2]
    _, labels = _inputs(h=12, w=13, label_dtype=torch.int32)
    labels = labels.transpose(1, 2)
    assert not logits.is_contiguous() and not labels.is_contiguous()
    _compare(logits, labels, radius=2, stride=2, pool="avg", mode="softmax")


@pytest.mark.parametrize("mode", ["sigmoid", "softmax"])
def test_options_float64(mode):
    """uint8 labels, ignore_index 1 (a value Triton would specialise), lambda_way 0."""
    logits, labels = _inputs(c=3, h=10, w=12, ignored=False, label_dtype=torch.uint8)
    _compare(logits, labels, radius=2, stride=2, pool="max", ignore_index=1, lambda_way=0,
             weight_lambda=0.3, mode=mode)


@pytest.mark.parametrize("stride,pool", [(1, "avg"), (2, "max")])
def test_uint8_labels_with_256_classes_float64(stride, pool):
    """uint8 labels where 255 is a class (C = 256, ignore_index 7): the kernels' padded lanes
    (the 9x10 image fills no block) must not read as label 255."""
    logits, labels = _inputs(n=1, c=256, h=9, w=10, ignored=False)
    labels[0, 0, :4] = 255
    _compare(logits, labels.to(torch.uint8), radius=2, stride=stride, pool=pool, ignore_index=7)


@pytest.mark.parametrize("mode", ["sigmoid", "softmax"])
def test_all_ignored_and_single_class_float64(mode):
    logits, labels = _inputs(n=2, c=1, h=9, w=10)
    labels[0] = 255  # an all-ignored image
    _compare(logits, labels, radius=2, stride=2, pool="avg", mode=mode)


@pytest.mark.parametrize("stride,pool,mode", [(1, "avg", "softmax"), (2, "max", "sigmoid")])
def test_gpu_block_sizes_float64(stride, pool, mode, monkeypatch):
    """The CUDA tiling (several pooled and full-resolution tiles per plane, window splits in the
    moment kernel) under the interpreter: the CPU default uses one block per plane."""
    monkeypatch.setattr(tbi, "_interpreted", lambda t: False)
    logits, labels = _inputs(n=1, h=37, w=70)
    _compare(logits, labels, radius=2, stride=stride, pool=pool, mode=mode)


# ---- float32 and half precision ------------------------------------------------------------------

@pytest.mark.parametrize("pool,mode,stride,radius", [("avg", "sigmoid", 2, 3),
                                                     ("max", "softmax", 2, 2),
                                                     ("interp", "sigmoid", 2, 2),
                                                     ("avg", "softmax", 1, 2)])
def test_float32(pool, mode, stride, radius):
    logits, labels = _inputs(dtype=torch.float32, h=15, w=13)
    _compare(logits, labels, radius=radius, stride=stride, pool=pool, mode=mode)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    logits, labels = _inputs(dtype=dtype, h=12, w=12)
    _compare(logits, labels, radius=2, stride=2, pool="avg")


# ---- stages and errors ---------------------------------------------------------------------------

@pytest.mark.parametrize("stride,mode", [(2, "sigmoid"), (1, "softmax")])
def test_forward_stats_match_torch_backend(stride, mode):
    logits, labels = _inputs(h=12, w=10)
    cfg = make_config(radius=3, stride=stride, pool="max", mode=mode)
    got = tb.forward_stats(logits, labels, cfg)
    want = torch_backend.forward_stats(logits, labels, cfg)
    for name, g, w in zip(("base_sum", "base_count", "nonfinite", "means", "cov"), got, want):
        assert g.dtype == w.dtype and g.shape == w.shape, name
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12, msg=name)
    sy_sp = got[4][:, :, :2]
    assert torch.equal(sy_sp, sy_sp.transpose(-2, -1))  # both halves filled, exactly symmetric


@pytest.mark.parametrize("stride", [1, 2])
def test_moment_window_splits(stride):
    """Stage (b) with the windows split over programs (the GPU tiling), two offset blocks
    (d = 25 > 16 at stride 1) and arbitrary plane offsets: same moments as the torch stage."""
    logits, labels = _inputs(h=12, w=11)
    cfg = make_config(radius=5 if stride == 1 else 3, stride=stride, pool="avg")
    pmap, ymap, _, _, _ = tbi._main_pass(logits, labels, cfg, do_base=False, store_argmax=False)
    _, _, _, y, p = torch_backend.prepare_maps(logits, labels, cfg)
    want = torch_backend.moment_sums(y, p, cfg.radius)
    offsets = torch.tensor([[0.3, 0.7]], dtype=torch.float64).repeat(logits.shape[0] *
                                                                      logits.shape[1], 1)
    for tiling in [(16, 2)]:
        got = tbi._moments(logits, pmap, ymap, labels, offsets, cfg, tiling=tiling)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12, msg=str(tiling))


def test_nonfinite_logits_raise():
    logits, labels = _inputs(n=1, c=2, h=8, w=8)
    logits[0, 1, 3, 4] = float("nan")
    with pytest.raises(RuntimeError, match="NaN or Inf"):
        rmi_ext.rmi_loss(logits, labels, radius=2, stride=2, backend="triton")


def test_torch_compile_fullgraph():
    """The custom ops' fake kernels let dynamo/AOTAutograd trace forward and backward."""
    torch._dynamo.reset()
    logits, labels = _inputs(n=1, h=10, w=9, dtype=torch.float32)

    def loss_fn(x, lab):
        return rmi_ext.rmi_loss(x, lab, radius=2, stride=2, pool="max", backend="triton")

    x = logits.clone().requires_grad_()
    loss_c = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")(x, labels)
    grad_c, = torch.autograd.grad(loss_c, x)
    loss_e = loss_fn(x, labels)
    grad_e, = torch.autograd.grad(loss_e, x)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad_c, grad_e, rtol=1e-5, atol=1e-8)


def test_custom_ops_opcheck():
    logits, labels = _inputs(n=1, c=2, h=8, w=8)
    args = (logits, labels, 2, 2, "avg", 2, 255, "sigmoid")
    torch.library.opcheck(torch.ops.rmi_ext.triton_forward_stats.default, args,
                          test_utils=("test_schema", "test_faketensor"))
    d = 4
    bargs = (logits, labels, torch.tensor(0.25, dtype=torch.float64),
             torch.randn(1, 2, 2, d, d, dtype=torch.float64),
             torch.randn(1, 2, d, dtype=torch.float64), 2, 2, "avg", 2, 255, "sigmoid")
    torch.library.opcheck(torch.ops.rmi_ext.triton_backward_grad.default, bargs,
                          test_utils=("test_schema", "test_faketensor"))


# ---- CUDA, compiled (no interpreter) -------------------------------------------------------------

class _FakeCudaDriver:
    """Just enough of a triton driver to compile (never launch) for an sm_<arch> target."""

    def __init__(self, arch=90):
        self.arch = arch

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget
        return GPUTarget("cuda", self.arch, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


def _compile_kernels(monkeypatch, arch, logits, labels, cfg):
    """The backend's forward and backward with the compiled kernels (CUDA block sizes) put
    through the whole Triton pipeline down to a cubin for sm_<arch>, without a GPU: every launch
    only compiles. Returns ``[(kernel name, CompiledKernel)]`` in launch order. The host code
    runs as usual on the uninitialised outputs; ``logits`` and ``labels`` are never read."""
    from triton.runtime.jit import JITFunction
    try:
        compiled = tb._module_for(torch.empty(0, device="meta"))
    except Exception as exc:  # pragma: no cover - depends on the triton build
        pytest.skip(f"cannot build the compiled kernels here: {exc!r}")
    kernels = []
    with monkeypatch.context() as mp:
        mp.setattr(triton.runtime.driver, "_active", _FakeCudaDriver(arch))
        run = JITFunction.run

        def compile_only(self, *args, grid, warmup, **kwargs):
            kernels.append((self.__name__, run(self, *args, grid=grid, warmup=True, **kwargs)))
            return kernels[-1][1]

        mp.setattr(JITFunction, "run", compile_only)
        mp.setattr(compiled, "_interpreted", lambda t: False)
        mp.setattr(compiled, "_module_for", lambda t: compiled)
        n, c = logits.shape[:2]
        d = cfg.dim
        try:
            compiled._forward_impl(logits, labels, cfg)
            compiled._backward_impl(logits, labels, cfg, torch.tensor(0.5, dtype=torch.float64),
                                    torch.zeros(n, c, 2, d, d, dtype=torch.float64),
                                    torch.zeros(n, c, d, dtype=torch.float64))
        finally:
            for value in vars(compiled).values():  # no fake-target binders left for a device
                if isinstance(value, JITFunction):
                    value.device_caches.clear()
    return kernels


@pytest.mark.skipif(torch.cuda.is_available(), reason="test_cuda_compiled runs the real thing")
@pytest.mark.parametrize("dtype,opts", [
    (torch.float32, dict(radius=3, stride=4, pool="avg", mode="sigmoid")),
    (torch.float64, dict(radius=10, stride=1, mode="softmax")),
    (torch.bfloat16, dict(radius=2, stride=3, pool="max", pool_size=5, ignore_index=1)),
    (torch.float16, dict(radius=3, stride=2, pool="interp", mode="softmax")),
])
def test_kernels_compile_for_sm90(dtype, opts, monkeypatch):
    """Without a GPU: the compiled kernels (CUDA block sizes) go through the whole Triton
    pipeline down to a cubin for sm_90 (the interpreter accepts code the compiler rejects, e.g.
    a loop-carried variable changing type). Nothing is launched."""
    cfg = make_config(**opts)
    logits, labels = _inputs(n=2, c=3, h=37, w=41, dtype=dtype)
    logits = logits.to(memory_format=torch.channels_last)
    names = {name for name, _ in _compile_kernels(monkeypatch, 90, logits, labels, cfg)}
    want = {"_main_pass_kernel", "_moment_kernel", "_stencil_kernel"}
    if cfg.stride > 1:  # stride 1: the stencil kernel writes the gradient
        want.add("_grad_kernel")
    if cfg.mode == "softmax":
        want.add("_lse_kernel")
    assert want <= names


#: Shared memory one block may use (the opt-in maximum) on A100 (sm_80) and H100/H200 (sm_90).
SHARED_LIMITS = {80: 166912, 90: 232448}


@pytest.mark.skipif(torch.cuda.is_available(), reason="compiles with a fake driver")
@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("shape,stride", [((16, 21, 513, 513), 4), ((8, 21, 513, 513), 1)])
def test_kernels_fit_shared_memory(shape, stride, arch, monkeypatch):
    """Every kernel compiled for the headline shapes (both modes, float32 and bfloat16 logits,
    every pool) asks for no more shared memory per block than sm_<arch> has: a launch would
    fail with OutOfResources otherwise. The logits are never touched (address space only)."""
    n, c, h, w = shape
    labels = torch.empty((n, h, w), dtype=torch.int64)
    used = {}
    for dtype in (torch.float32, torch.bfloat16):
        logits = torch.empty(shape, dtype=dtype)
        for mode in ("sigmoid", "softmax"):
            for pool in ("avg", "max", "interp") if stride > 1 else ("avg",):
                cfg = make_config(radius=3, stride=stride, pool=pool, mode=mode)
                for name, kernel in _compile_kernels(monkeypatch, arch, logits, labels, cfg):
                    key = (name, str(dtype), mode, pool)
                    used[key] = max(used.get(key, 0), kernel.metadata.shared)
    assert {key[0] for key in used} == {"_main_pass_kernel", "_lse_kernel", "_moment_kernel",
                                        "_stencil_kernel"} | ({"_grad_kernel"} if stride > 1 else set())
    over = {key: shared for key, shared in used.items() if shared > SHARED_LIMITS[arch]}
    assert not over, (SHARED_LIMITS[arch], over)


_CUDA_SCRIPT = textwrap.dedent("""
    import torch, rmi_ext
    torch.manual_seed(0)
    TOLS = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-5, 1e-4),
            torch.float16: (1e-4, 2e-2), torch.bfloat16: (1e-4, 5e-2)}
    def run(dtype, n=2, c=4, h=37, w=45, channels_last=False, **kw):
        x = (2 * torch.randn(n, c, h, w, dtype=torch.float64, device="cuda")).to(dtype)
        lab = torch.randint(0, c, (n, h, w), device="cuda")
        lab[0, : h // 3, : w // 2] = 255
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        out = []
        for be in ("reference", "triton"):
            xx = x.detach().clone().requires_grad_()
            terms = rmi_ext.rmi_loss_terms(xx, lab, backend=be, **kw)
            (1.7 * terms.loss).backward()
            out.append((terms, xx.grad))
        (rt, rg), (tt, tg) = out
        lt, gt = TOLS[dtype]
        for a, b in zip(tt, rt):
            assert abs(a.item() - b.item()) <= lt * max(abs(b.item()), 1e-3), (kw, a, b)
        err = ((tg.double() - rg.double()).abs().max() / rg.double().abs().max()).item()
        assert err <= gt, (kw, dtype, err)
        print("ok", dtype, kw, err)
    for dtype in (torch.float64, torch.float32):
        for pool in ("avg", "max", "interp"):
            for mode in ("sigmoid", "softmax"):
                run(dtype, pool=pool, mode=mode, radius=3, stride=4)
        run(dtype, radius=3, stride=1, h=29, w=31)
        run(dtype, radius=2, stride=3, pool="max", pool_size=5, channels_last=True)
        run(dtype, radius=10, stride=2, h=70, w=66)
        run(dtype, radius=1, stride=2, ignore_index=1, mode="softmax")
    for dtype in (torch.float16, torch.bfloat16):
        run(dtype, radius=3, stride=4, h=64, w=64)
    big = torch.randn(2, 19, 256, 256, device="cuda", requires_grad=True)
    lab = torch.randint(0, 19, (2, 256, 256), device="cuda")
    for stride in (1, 4):
        l_ref = rmi_ext.rmi_loss(big, lab, stride=stride, backend="torch")
        l_tri = rmi_ext.rmi_loss(big, lab, stride=stride, backend="triton")
        assert abs(l_ref.item() - l_tri.item()) <= 1e-5 * abs(l_ref.item()), (l_ref, l_tri)
    print("all ok")
""")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(rmi_ext.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-c", _CUDA_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


# ---- memory ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("stride", [1, 4])
def test_peak_memory_within_the_gradient_size(stride, dtype):
    """Forward + backward allocate at most 1.25x the logits in torch tensors, the gradient
    included (issue 13): at stride 1 no full-size map is stored (P/Y recomputed from the logits
    and labels, stencil and gradient fused), otherwise maps of the pooled size only. Measured
    with the benchmarks' profiler probe (the interpreter's own copies are not torch tensors)."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
    try:
        from rmi_bench import peak_extra_bytes_torch
    finally:
        sys.path.pop(0)
    torch.manual_seed(0)
    logits = (2 * torch.randn(1, 2, 256, 256)).to(dtype).requires_grad_()
    labels = torch.randint(0, 2, (1, 256, 256))

    def fwd_bwd():
        rmi_ext.rmi_loss(logits, labels, radius=3, stride=stride, backend="triton").backward()
        logits.grad = None

    fwd_bwd()  # warm-up: one-time allocations
    ratio = peak_extra_bytes_torch(fwd_bwd) / (logits.numel() * logits.element_size())
    assert ratio <= 1.25, ratio


# ---- probe -------------------------------------------------------------------------------------

def test_probe_launches_the_tiny_kernel():
    """``probe`` (called once per device by the dispatcher) runs its kernel: interpreted here."""
    assert tb.probe(torch.device("cpu")) is None


def test_probe_reports_why_the_launch_fails(monkeypatch):
    def fail(device):
        raise RuntimeError("Failed to find C compiler")

    monkeypatch.setattr(tb, "_launch_probe", fail)
    assert tb.probe(torch.device("cpu")) == "RuntimeError: Failed to find C compiler"

    def wrong(device):
        return torch.zeros(16)

    monkeypatch.setattr(tb, "_launch_probe", wrong)
    assert tb.probe("cpu").startswith("the probe kernel wrote [0.0")
