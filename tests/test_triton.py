"""Backend ``"triton"`` specifics: its GPU tiling and stages under the interpreter, the custom ops,
the kernels compiled for sm_80 / sm_90 without a GPU, memory, and the probe.

Its comparisons with the reference are in test_backends.py (the harness: interpreted on CPU
tensors, compiled on CUDA tensors). CPU tensors run the kernels under the interpreter
(``TRITON_INTERPRET=1``, set by tests/conftest.py without a CUDA device); the sm_80 / sm_90
compilations run in subprocesses without it.
"""
import functools
import json
import os
import subprocess
import sys

import pytest
import torch

import rmi_ext
from rmi_ext import torch_backend
from rmi_ext._config import make_config
from conftest import compare, make_inputs, peak_memory_ratio
from triton_interpreted import tb, triton  # noqa: F401



# ---- Triton's own tiling and stages ------------------------------------------------------

@pytest.mark.interpreted
@pytest.mark.parametrize("stride,pool,mode", [(1, "avg", "softmax"), (2, "max", "sigmoid")])
def test_gpu_block_sizes_float64(stride, pool, mode, monkeypatch):
    """The CUDA tiling (several pooled and full-resolution tiles per plane, window splits in the
    moment kernel) under the interpreter: the CPU default uses one block per plane."""
    monkeypatch.setattr(tb, "_INTERPRETER_BLOCKS", False)
    logits, labels = make_inputs((1, 2, 37, 70), 3, mode=mode)
    compare("triton", logits, labels, radius=2, stride=stride, pool=pool, mode=mode)


# ---- stages and errors ---------------------------------------------------------------------------

@pytest.mark.interpreted
@pytest.mark.parametrize("stride,mode", [(2, "sigmoid"), (1, "softmax")])
def test_forward_stats_match_torch_backend(stride, mode):
    logits, labels = make_inputs((2, 2, 12, 10), requires_grad=False)
    cfg = make_config(radius=3, stride=stride, pool="max", mode=mode)
    got = tb.forward_stats(logits, labels, cfg)
    want = torch_backend.forward_stats(logits, labels, cfg)
    for name, g, w in zip(("base_sum", "base_count", "nonfinite", "means", "cov"), got, want):
        assert g.dtype == w.dtype and g.shape == w.shape, name
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12, msg=name)
    sy_sp = got[4][:, :, :2]
    assert torch.equal(sy_sp, sy_sp.transpose(-2, -1))  # both halves filled, exactly symmetric


@pytest.mark.interpreted
@pytest.mark.parametrize("stride", [1, 2])
def test_moment_window_splits(stride):
    """Stage (b) with the windows split over programs (the GPU tiling), two offset blocks
    (d = 25 > 16 at stride 1) and arbitrary plane offsets: same moments as the torch stage."""
    logits, labels = make_inputs((2, 2, 12, 11), requires_grad=False)
    cfg = make_config(radius=5 if stride == 1 else 3, stride=stride, pool="avg")
    target = tb._target_args(labels)
    maps = tb._first_term_and_pooled_maps(logits, target, cfg, first_term=False,
                                          store_argmax=False)
    _, _, _, y, p = torch_backend.prepare_maps(logits, labels, cfg)
    want = torch_backend.moment_sums(y, p, cfg.radius)
    offsets = torch.tensor([[0.3, 0.7]], dtype=torch.float64).repeat(logits.shape[0] *
                                                                      logits.shape[1], 1)
    for tiling in [(16, 2)]:
        got = tb._moment_sums(logits, maps.p, maps.y, target, offsets, cfg, tiling=tiling)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12, msg=str(tiling))


@pytest.mark.interpreted
def test_nonfinite_logits_raise():
    logits, labels = make_inputs((1, 2, 8, 8), requires_grad=False)
    logits[0, 1, 3, 4] = float("nan")
    with pytest.raises(RuntimeError, match="NaN or Inf"):
        rmi_ext.rmi_loss(logits, labels, radius=2, stride=2, backend="triton")


@pytest.mark.interpreted
def test_torch_compile_fullgraph():
    """The custom ops' fake kernels let dynamo/AOTAutograd trace forward and backward."""
    torch._dynamo.reset()
    logits, labels = make_inputs((1, 2, 10, 9), dtype=torch.float32, requires_grad=False)

    def loss_fn(x, lab):
        return rmi_ext.rmi_loss(x, lab, radius=2, stride=2, pool="max", backend="triton")

    x = logits.clone().requires_grad_()
    loss_c = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")(x, labels)
    grad_c, = torch.autograd.grad(loss_c, x)
    loss_e = loss_fn(x, labels)
    grad_e, = torch.autograd.grad(loss_e, x)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad_c, grad_e, rtol=1e-5, atol=1e-8)


@pytest.mark.interpreted
def test_custom_ops_opcheck():
    logits, labels = make_inputs((1, 2, 8, 8), requires_grad=False)
    args = (logits, labels, [2, 2], [2, 2], "avg", [2, 2], 255, "sigmoid")
    torch.library.opcheck(torch.ops.rmi_ext.triton_forward_stats.default, args,
                          test_utils=("test_schema", "test_faketensor"))
    d = 4
    bargs = (logits, labels, torch.tensor(0.25, dtype=torch.float64),
             torch.randn(1, 2, 2, d, d, dtype=torch.float64),
             torch.randn(1, 2, d, dtype=torch.float64), [2, 2], [2, 2], "avg", [2, 2], 255,
             "sigmoid")
    torch.library.opcheck(torch.ops.rmi_ext.triton_backward_grad.default, bargs,
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.interpreted
def test_custom_ops_opcheck_volume():
    """The ops on a volume with per-axis options (one side per spatial axis)."""
    logits, labels = make_inputs((1, 2, 8, 8), mode="softmax", requires_grad=False)
    logits = torch.stack([logits, logits.flip(-1), logits.flip(-2)], dim=2)  # [1, 2, 3, 8, 8]
    labels = torch.stack([labels, labels.flip(-1), labels.flip(-2)], dim=1)
    sides = ([1, 2, 2], [1, 2, 2], "max", [1, 2, 2], 255, "softmax")
    torch.library.opcheck(torch.ops.rmi_ext.triton_forward_stats.default,
                          (logits, labels, *sides), test_utils=("test_schema", "test_faketensor"))
    d = 4
    bargs = (logits, labels, torch.tensor(0.25, dtype=torch.float64),
             torch.randn(1, 2, 2, d, d, dtype=torch.float64),
             torch.randn(1, 2, d, dtype=torch.float64), *sides)
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


def _compile_kernels(arch, logits, labels, cfg):
    """The backend's forward and backward with the compiled kernels (CUDA block sizes) put
    through the whole Triton pipeline down to a cubin for sm_<arch>, without a GPU: every launch
    only compiles. Returns ``[(kernel name, shared memory bytes)]`` in launch order. The host
    code runs as usual on the uninitialised outputs; ``logits`` and ``labels`` are never read.
    Needs compiled kernels: run by :func:`_compiled_in_subprocess`."""
    from triton.runtime.jit import JITFunction
    kernels = []
    run = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        kernels.append((self.__name__, kernel.metadata.shared))
        return kernel

    triton.runtime.driver.set_active(_FakeCudaDriver(arch))
    JITFunction.run = compile_only
    n, c = logits.shape[:2]
    d = cfg.for_rank(logits.dim() - 2).dim
    try:
        tb._forward_impl(logits, labels, cfg)
        tb._backward_impl(logits, labels, cfg, torch.tensor(0.5, dtype=torch.float64),
                          torch.zeros(n, c, 2, d, d, dtype=torch.float64),
                          torch.zeros(n, c, d, dtype=torch.float64))
    finally:
        JITFunction.run = run  # (the fake driver stays: this process only compiles)
        for value in vars(tb).values():  # no fake-target binders left for the next arch
            if isinstance(value, JITFunction):
                value.device_caches.clear()
    return kernels


def _compile_cases(cases):
    """:func:`_compile_kernels` for each ``(arch, shape, dtype name, channels_last, opts)``
    (per-axis options as JSON lists)."""
    results = []
    for arch, shape, dtype, channels_last, opts in cases:
        logits = torch.empty(shape, dtype=getattr(torch, dtype))
        if channels_last:
            logits = logits.to(memory_format=torch.channels_last if len(shape) == 4
                               else torch.channels_last_3d)
        labels = torch.empty((shape[0], *shape[2:]), dtype=torch.int64)
        opts = {k: tuple(v) if isinstance(v, list) else v for k, v in opts.items()}
        results.append(_compile_kernels(arch, logits, labels, make_config(**opts)))
    return results


@functools.lru_cache(maxsize=None)
def _compiled_in_subprocess(cases_json):
    """:func:`_compile_cases` of the JSON list ``cases_json`` in subprocesses without
    ``TRITON_INTERPRET`` (compiled kernels), one per core, each compiling every other case:
    one batch per test, for all its cases."""
    env = dict(os.environ, TRITON_INTERPRET="0")  # "0", not unset: conftest defaults it to 1
    here = os.path.dirname(os.path.abspath(__file__))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [here, env.get("PYTHONPATH")]))
    script = ("import json, sys, test_triton; "
              "print(json.dumps(test_triton._compile_cases(json.loads(sys.argv[1]))))")
    cases = json.loads(cases_json)
    workers = max(1, min(len(cases), os.cpu_count() or 1, 4))
    procs = [subprocess.Popen([sys.executable, "-c", script, json.dumps(cases[i::workers])],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(workers)]
    results = [None] * len(cases)
    for i, proc in enumerate(procs):
        out, err = proc.communicate(timeout=1800)
        assert proc.returncode == 0, out[-4000:] + err[-4000:]
        results[i::workers] = json.loads(out.strip().splitlines()[-1])
    return results


PLANE, VOLUME = (2, 3, 37, 41), (2, 3, 9, 21, 19)
SM90_CASES = [
    (PLANE, "float32", dict(radius=3, stride=4, pool="avg", mode="sigmoid")),
    (PLANE, "float64", dict(radius=10, stride=1, mode="softmax")),
    (PLANE, "bfloat16", dict(radius=2, stride=3, pool="max", pool_size=5, ignore_index=1)),
    (PLANE, "float16", dict(radius=3, stride=2, pool="interp", mode="softmax")),
    (PLANE, "float32", dict(radius=(2, 4), stride=(1, 2), pool="avg", pool_size=(3, 2))),
    (VOLUME, "float32", dict(radius=(1, 3, 3), stride=(1, 2, 2), pool="avg")),
    (VOLUME, "bfloat16", dict(radius=2, stride=2, pool="max", mode="softmax")),
    (VOLUME, "float16", dict(radius=(2, 2, 1), stride=(2, 1, 2), pool="interp")),
    (VOLUME, "float64", dict(radius=(2, 3, 3), stride=1, mode="softmax")),
]


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="test_cuda_compiled runs the real thing")
@pytest.mark.xdist_group("triton_compile")
@pytest.mark.parametrize("case", range(len(SM90_CASES)))
def test_kernels_compile_for_sm90(case):
    """Without a GPU: the compiled kernels (CUDA block sizes) go through the whole Triton
    pipeline down to a cubin for sm_90 (the interpreter accepts code the compiler rejects, e.g.
    a loop-carried variable changing type), for 2-D maps, per-axis options and volumes. Nothing
    is launched."""
    kernels = _compiled()[case]
    names = {name for name, _ in kernels}
    shape, _, opts = SM90_CASES[case]
    cfg = make_config(**opts).for_rank(len(shape) - 2)
    want = {"_first_term_and_pooled_maps_kernel", "_moment_sums_kernel",
            "_pooled_grad_stencil_kernel"}
    if cfg.pools:  # without pooling the stencil kernel writes the gradient
        want.add("_full_res_grad_kernel")
    if cfg.mode == "softmax":
        want.add("_first_term_lse_kernel")
    assert want <= names
    over = {name: shared for name, shared in kernels if shared > SHARED_LIMITS[90]}
    assert not over, over


#: Shared memory one block may use (the opt-in maximum) on A100 (sm_80) and H100/H200 (sm_90).
SHARED_LIMITS = {80: 166912, 90: 232448}
SHARED_SHAPES = [((16, 21, 513, 513), 4), ((8, 21, 513, 513), 1)]


def _shared_memory_cases():
    """Every kernel at the headline shapes: both modes, float32 and bfloat16 logits, every pool
    (stride > 1), for sm_80 and sm_90: ``[((arch, shape index), case), ...]``."""
    cases = []
    for arch in SHARED_LIMITS:
        for index, (shape, stride) in enumerate(SHARED_SHAPES):
            for dtype in ("float32", "bfloat16"):
                for mode in ("sigmoid", "softmax"):
                    for pool in ("avg", "max", "interp") if stride > 1 else ("avg",):
                        opts = dict(radius=3, stride=stride, pool=pool, mode=mode)
                        cases.append(((arch, index), (arch, shape, dtype, False, opts)))
    return cases


def _compiled():
    """The kernels of :data:`SM90_CASES` (channels_last, sm_90), then of
    :func:`_shared_memory_cases`, from one :func:`_compiled_in_subprocess` batch: the tests
    that read it share one xdist worker (``triton_compile``), so it is compiled once."""
    cases = [(90, shape, dtype, True, opts) for shape, dtype, opts in SM90_CASES]
    cases += [case for _, case in _shared_memory_cases()]
    return _compiled_in_subprocess(json.dumps(cases))


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="compiles with a fake driver")
@pytest.mark.xdist_group("triton_compile")
@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("shape,stride", SHARED_SHAPES)
def test_kernels_fit_shared_memory(shape, stride, arch):
    """Every kernel compiled for the headline shapes (both modes, float32 and bfloat16 logits,
    every pool) asks for no more shared memory per block than sm_<arch> has: a launch would
    fail with OutOfResources otherwise. The logits are never touched (address space only)."""
    cases = _shared_memory_cases()
    results = _compiled()[len(SM90_CASES):]
    used = {}
    for (key, case), kernels in zip(cases, results):
        if key != (arch, SHARED_SHAPES.index((shape, stride))):
            continue
        _, _, dtype, _, opts = case
        for name, shared in kernels:
            k = (name, dtype, opts["mode"], opts["pool"])
            used[k] = max(used.get(k, 0), shared)
    assert {k[0] for k in used} == {
        "_first_term_and_pooled_maps_kernel", "_first_term_lse_kernel", "_moment_sums_kernel",
        "_pooled_grad_stencil_kernel"} | ({"_full_res_grad_kernel"} if stride > 1 else set())
    over = {k: shared for k, shared in used.items() if shared > SHARED_LIMITS[arch]}
    assert not over, (SHARED_LIMITS[arch], over)




# ---- memory ------------------------------------------------------------------------------------

@pytest.mark.interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("stride", [1, 4])
def test_peak_memory_within_the_gradient_size(stride, dtype):
    """Forward + backward allocate at most 1.25x the logits in torch tensors, the gradient
    included (issue 13): at stride 1 no full-size map is stored (P/Y recomputed from the logits
    and labels, stencil and gradient fused), otherwise maps of the pooled size only. Measured
    with the benchmarks' profiler probe (the interpreter's own copies are not torch tensors).
    Stride 1 on a 128 x 128 image (4x faster interpreted than 256 x 256, and the per-plane
    sums weigh 4x more against the logits there: 1.07x / 1.15x instead of 1.02x / 1.04x)."""
    side = 128 if stride == 1 else 256
    torch.manual_seed(0)
    logits = (2 * torch.randn(1, 2, side, side)).to(dtype).requires_grad_()
    labels = torch.randint(0, 2, (1, side, side))
    ratio = peak_memory_ratio(logits, labels, radius=3, stride=stride, backend="triton")
    assert ratio <= 1.25, ratio


# ---- probe -------------------------------------------------------------------------------------

@pytest.mark.interpreted
def test_probe_launches_the_tiny_kernel():
    """``probe`` (called once per device by the dispatcher) runs its kernel: interpreted here."""
    assert tb.probe(torch.device("cpu")) is None


@pytest.mark.interpreted
def test_probe_reports_why_the_launch_fails(monkeypatch):
    def fail(device):
        raise RuntimeError("Failed to find C compiler")

    monkeypatch.setattr(tb, "_launch_probe", fail)
    assert tb.probe(torch.device("cpu")) == "RuntimeError: Failed to find C compiler"

    def wrong(device):
        return torch.zeros(16)

    monkeypatch.setattr(tb, "_launch_probe", wrong)
    assert tb.probe("cpu").startswith("the probe kernel wrote [0.0")
