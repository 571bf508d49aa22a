"""Backend ``"cuda"`` (csrc/cuda): compile checks and a host emulation without a GPU, and the
compiled kernels against the unfold reference on a GPU.

Without a GPU (needs ``nvcc`` on PATH):

* ``csrc/cuda/check/compile_check.cu`` (torch-free) instantiates every kernel template of
  ``rmi_kernels.cuh`` with the types ``rmi_cuda.cu`` dispatches; it must compile for sm_80 and
  sm_90, and ptxas' resource report (``-Xptxas -v``) must show no register spills in the hot
  kernels (``test_kernel_resources`` prints the registers / spills / stack table).
* ``csrc/cuda/check/emulate.cu`` runs the kernels' per-element functions on the host, in the
  kernels' plans (the moment kernel's shared-memory tiles, the backward's blocks of planes);
  wrapped as a backend below, it is checked against the reference (loss and gradient) exactly
  like the GPU kernels: DF 1 without any map (P and Y recomputed from the logits in the moment
  tiles and in the fused stencil + gradient pass), DF > 1 in blocks of planes (forced small
  with ``Emulated.max_block_planes``). Only the grid-stride loops, the block reductions, the
  tiles' synchronisation and the torch glue (``rmi_cuda.cu``) are left to the GPU tests. Its
  ``--selftest`` checks the kernels' index division (FastDivmod) and the precomputed interp
  scales, its ``--taps`` the interp taps against ``F.interpolate``, and its ``--plan`` the
  launch plans at sizes past 2^31 elements and 65535 planes (grid limits) and their memory
  (``test_memory_plan``), without allocating anything.
* ``RMI_TEST_CUDA_GLUE=1`` also compiles ``rmi_cuda.cu`` against the installed torch's headers
  (about a minute of CPU; off by default).

With a GPU and ``rmi_ext._C`` built with its CUDA kernels, the comparisons with the reference
run in test_backends.py (the harness, ``cuda-cuda`` cases; the emulation here uses the same
``conftest.compare`` and tolerances); this file keeps what is specific to the CUDA kernels: the
stages against the torch backend, sizes past 2^31 elements, the peak extra memory of a
forward+backward (``test_cuda_peak_memory``: at most 1.25x the logits' bytes), determinism, the
gradient's memory format, the op checks and opcheck.
"""
from __future__ import annotations

import ctypes
import gc
import os
import re
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import rmi_ext
from conftest import compare, make_inputs, rel_err, run
from rmi_ext import torch_backend
from rmi_ext._config import make_config
from rmi_ext._dispatch import LOADED
from rmi_ext.function import RegionMIFunction, RMIFunction
from rmi_ext.targets import as_target, labels_and_mask

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
#: ``RMI_TEST_SKIP_NVCC=1`` skips the nvcc builds (compile check, emulation): they do not depend
#: on torch, so .ci/run runs them once, in the main suite, not again in each stack leg.
SKIP_NVCC = os.environ.get("RMI_TEST_SKIP_NVCC") == "1"
NVCC = None if SKIP_NVCC else shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="RMI_TEST_SKIP_NVCC=1" if SKIP_NVCC
                                else "nvcc is not on PATH")

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


# ---- inputs shared by the emulation and the GPU tests ----------------------------------------


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
        pytest.skip("RMI_TEST_SKIP_NVCC=1" if SKIP_NVCC else "nvcc is not on PATH")
    with tempfile.TemporaryDirectory(prefix="rmi_cuda_test_") as tmp:
        tmp = Path(tmp)
        b = Builds(tmp)
        check = CSRC / "cuda/check"
        b.start("compile_check", [NVCC, "-std=c++17", "-c", "-O3", "-I", str(CSRC)]
                + [f"-gencode=arch=compute_{a},code=sm_{a}" for a in RESOURCE_ARCHS]
                + ["-Xptxas", "-v", str(check / "compile_check.cu"), "-o", str(tmp / "check.o")])
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


# ---- without a GPU: registers and spills of the compiled kernels ------------------------------

RESOURCE_ARCHS = ("80", "90")
#: Kernels on the hot path (per pixel or per pooled pixel), which must not spill.
HOT_KERNELS = ("first_term_kernel", "pooled_maps_kernel", "moment_sums_offsets_kernel",
               "moment_sums_partials_kernel", "pooled_grad_stencil_kernel", "full_res_grad_kernel")
#: No kernel is exempt today. A kernel that spills for a reason that cannot be fixed without
#: measuring on a GPU goes here, as {"kernel_name": "why"}; it is then reported, not asserted.
SPILL_EXEMPT: dict = {}
_LOGITS = ("float", "double", "__half", "__nv_bfloat16")
_LABEL_TYPES = ("unsigned char", "int", "long")


def _demangle(names):
    cxxfilt = shutil.which("c++filt") or shutil.which("cu++filt")
    if cxxfilt is None:
        return list(names)
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True)
    lines = out.stdout.splitlines()
    return lines if out.returncode == 0 and len(lines) == len(names) else list(names)


def parse_ptxas(text):
    """Entry functions of a ``-Xptxas -v`` report: dicts with ``kernel`` (the bare name, e.g.
    ``full_res_grad_kernel``), ``signature`` (demangled, template arguments included), ``arch``,
    ``registers``, ``spill_stores``, ``spill_loads``, ``stack`` (bytes of stack frame)."""
    rows, current = [], None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '(\S+)' for '(sm_\d+)'", line)
        if m:
            current = {"mangled": m.group(1), "arch": m.group(2)}
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, "
                      r"(\d+) bytes spill loads", line)
        if m:
            current.update(stack=int(m.group(1)), spill_stores=int(m.group(2)),
                           spill_loads=int(m.group(3)))
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m:
            current["registers"] = int(m.group(1))
            rows.append(current)
            current = None
    for row, name in zip(rows, _demangle([r["mangled"] for r in rows])):
        row["signature"] = re.sub(r"\(.*", "", name).replace("rmi::cuda::", "").replace(
            "void ", "")
        m = re.match(r"_ZN3rmi4cuda(\d+)", row["mangled"])
        row["kernel"] = (row["mangled"][m.end():m.end() + int(m.group(1))] if m
                         else row["signature"].split("<")[0])
    return rows


def resource_table(rows):
    lines = [f"{'kernel':58} {'arch':6} {'regs':>4} {'spill st/ld':>12} {'stack':>6}"]
    for r in sorted(rows, key=lambda r: (r["kernel"], r["signature"], r["arch"])):
        lines.append(f"{r['signature']:58} {r['arch']:6} {r['registers']:>4} "
                     f"{r['spill_stores']:>5}/{r['spill_loads']:<6} {r['stack']:>6}")
    return "\n".join(lines)


@needs_nvcc
def test_kernel_resources(builds):
    """ptxas registers / spills / stack of every kernel for sm_80 and sm_90 (printed: run with
    ``-s`` or ``-rA`` to see the table); no spills in the hot kernels; every instantiation that
    rmi_cuda.cu launches is in the report."""
    rc, out = builds.result("compile_check")
    assert rc == 0, out
    rows = parse_ptxas(out)
    table = resource_table(rows)
    print("\n" + table)
    seen = {(r["kernel"], r["arch"]) for r in rows}
    signatures = {(r["signature"].replace(" ", ""), r["arch"]) for r in rows}
    for arch in RESOURCE_ARCHS:
        for kernel in HOT_KERNELS + ("first_term_lse_kernel", "moment_sums_finalize_kernel",
                                     "first_term_final_kernel"):
            assert (kernel, f"sm_{arch}") in seen, f"{kernel} missing for sm_{arch}\n{table}"
        if any(r["signature"].startswith("_Z") for r in rows):
            continue  # no demangler: the template arguments cannot be read
        # 4 logits types x the targets (3 label types, a float target in the logits' type and
        # in the compute type, region_mi's) x (first term, its log-sum-exp, full_res_grad fused and not, 3
        # pool kinds of pooled maps, moment offsets and partials)
        for x in _LOGITS:
            acc = "double" if x == "double" else "float"
            for target in [f"LabelTarget<{label}>" for label in _LABEL_TYPES] + [
                    f"FloatTarget<{x}>", f"FloatTarget<{acc}>", f"RegionTarget<{acc}>"]:
                for name, extra in [("first_term_kernel", ""), ("first_term_lse_kernel", ""),
                                    ("full_res_grad_kernel", ",true"),
                                    ("full_res_grad_kernel", ",false")] + [
                        (kernel, f",{kind}") for kind in (0, 1, 2) for kernel in (
                            "pooled_maps_kernel", "moment_sums_offsets_kernel",
                            "moment_sums_partials_kernel")]:
                    sig = f"{name}<{x},{acc},{target}{extra}>".replace(" ", "")
                    assert (sig, f"sm_{arch}") in signatures, f"{sig} sm_{arch} missing\n{table}"
    spilling = [r for r in rows if r["kernel"] in HOT_KERNELS
                and (r["spill_stores"] or r["spill_loads"]) and r["kernel"] not in SPILL_EXEMPT]
    assert not spilling, "hot kernels spill registers:\n" + resource_table(spilling)


def test_parse_ptxas_report():
    """The parser on a fixed excerpt of a ptxas -v report (its format, as of CUDA 12-13)."""
    name = ("_ZN3rmi4cuda26pooled_grad_stencil_kernelIfEEvPKT_S4_PKdS6_NS_7ProblemENS0_8Divisors"
            "EPS2_")
    text = f"""ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '{name}' for 'sm_90'
ptxas info    : Function properties for {name}
    16 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 48 registers, used 0 barriers, 560 bytes cmem[0]
"""
    row, = parse_ptxas(text)
    assert row["kernel"] == "pooled_grad_stencil_kernel" and row["arch"] == "sm_90"
    assert (row["registers"], row["spill_stores"], row["spill_loads"], row["stack"]) == (
        48, 8, 4, 16)


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
_MODES = {"sigmoid": 0, "softmax": 1, "region": 2}


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
    target_grad = staticmethod(torch_backend.target_grad)  # region_mi's, as cuda_backend's

    def __init__(self, exe: Path):
        self.exe = exe
        #: Backward: cap of the planes of a block of plan_backward (0: the plan's own choice).
        self.max_block_planes = 0

    def _run(self, op, logits, labels, cfg, extra=(), channels_last_out=False):
        xn, xb = _storage_bytes(logits)
        values, mask = labels_and_mask(labels)
        mask_bytes, c_stride = b"", 0
        if values.dtype.is_floating_point:  # as rmi_cuda.cu's kernel_target and dispatch_target
            kind = 3 if values.dtype == logits.dtype else 4
            kind = 5 if cfg.mode == "region" else kind
            if kind != 3:
                values = values.to(torch_backend.compute_dtype(logits))
            c_stride, strides = values.stride(1), values[:, 0].stride()
            if mask is not None:
                mask_bytes = mask.contiguous().numpy().tobytes()
        else:
            kind, strides = _LABELS[values.dtype], values.stride()
        ln, lb = _storage_bytes(values)
        header = [op, _DTYPES[logits.dtype], kind, *logits.shape,
                  *logits.stride(), xn, *strides, ln, cfg.radius, cfg.stride,
                  _POOLS[cfg.pool], cfg.pool_size, cfg.ignore_index, _MODES[cfg.mode],
                  int(channels_last_out), self.max_block_planes, c_stride, len(mask_bytes)]
        with tempfile.TemporaryDirectory() as tmp:
            src, dst = Path(tmp) / "in", Path(tmp) / "out"
            src.write_bytes(struct.pack(f"<{len(header)}q", *header) + xb + lb + mask_bytes
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

    def __call__(self, logits, labels, mask=None, **opts):
        """The loss of ``rmi_ext.rmi_loss(logits, labels, mask=mask, **opts)`` on the emulated
        kernels (for ``conftest.compare``): straight to the autograd.Function, not a public
        backend."""
        cfg = make_config(**opts)
        out_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        base, rmi = RMIFunction.apply(logits, labels, mask, cfg, self.name)
        w_base, w_rmi = cfg.term_weights
        return w_base * base.to(out_dtype) + w_rmi * rmi.to(out_dtype)

    def backward_grad(self, logits, labels, cfg, base_scale, coef, shift):
        channels_last = (logits.shape[1] > 1 and not logits.is_contiguous()
                         and logits.is_contiguous(memory_format=torch.channels_last))
        grad = self._run(1, logits, labels, cfg, (base_scale.reshape(1), coef, shift),
                         channels_last)
        # read back in logical order; the glue's output has the logits' format (empty_like)
        return torch.empty_like(logits).copy_(grad.view(logits.shape))


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
    compare(emulated, x, labels, mode=mode, pool=pool, stride=stride,
                            radius=radius)


@needs_nvcc
@pytest.mark.parametrize("radius,stride,pool,pool_size", [
    (2, 2, "max", None), (7, 1, "avg", None), (7, 2, "avg", None), (10, 1, "avg", None),
    (3, 2, "avg", 3), (3, 2, "max", 3), (2, 3, "max", 5), (3, 4, "avg", 1), (3, 4, "max", 2),
    (2, 3, "avg", 6)])
def test_emulated_kernels_radius_and_pool_size(emulated, radius, stride, pool, pool_size):
    s = side(radius, stride)
    x, labels = make_inputs((2, 3, s + 1, s), radius + stride)
    compare(emulated, x, labels, pool=pool, stride=stride, radius=radius,
                            pool_size=pool_size, lambda_way=0, weight_lambda=0.3)


@needs_nvcc
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode,pool,stride", [("sigmoid", "avg", 4), ("softmax", "max", 2),
                                              ("sigmoid", "interp", 3), ("softmax", "avg", 1)])
def test_emulated_kernels_low_precision(emulated, dtype, mode, pool, stride):
    x, labels = make_inputs((2, 4, 29, 31), stride, mode=mode, dtype=dtype)
    compare(emulated, x, labels, mode=mode, pool=pool, stride=stride)


@needs_nvcc
@pytest.mark.parametrize("label_dtype", [torch.uint8, torch.int32, torch.int64])
@pytest.mark.parametrize("layout", ["channels_last", "strided"])
def test_emulated_kernels_layouts(emulated, label_dtype, layout):
    x, labels = relayout(*make_inputs((2, 3, 31, 34), 3, label_dtype=label_dtype), layout)
    assert x.stride() != x.contiguous().stride()
    compare(emulated, x, labels, pool="max", stride=2, mode="sigmoid")


@needs_nvcc
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("mode", ["sigmoid", "softmax"])
def test_emulated_stride_1_on_the_fly(emulated, dtype, layout, mode):
    """Factor 1 keeps no map: the moments stage P and Y of each tile from the logits, and the
    fused full_res_grad pass recomputes the stencil's P and Y from the logits, in both visiting
    orders (NCHW, and N, H, W, C for a channels-last gradient) and through any strides."""
    x, labels = make_inputs((2, 3, 23, 27), 17, mode=mode, dtype=dtype)
    if layout != "contiguous":
        x, labels = relayout(x, labels, layout)
    compare(emulated, x, labels, mode=mode, stride=1, radius=3)


@needs_nvcc
@pytest.mark.parametrize("shape,radius,stride", [
    ((1, 2, 12, 200), 3, 1),   # 4 column tiles (a tile is at most 64 map columns)
    ((1, 2, 300, 8), 3, 1),    # 2 row tiles in one chunk (2048 / 8 = 256 map rows a tile)
    ((1, 2, 40, 150), 7, 1),   # R 7: halo of 6 rows and columns around every tile
    ((1, 2, 70, 263), 2, 2),   # pooled 36 x 132: column tiles of pooled maps
])
def test_emulated_moment_tiles(emulated, shape, radius, stride):
    """Maps wider or taller than one shared-memory tile: the tiles of a chunk cover its windows
    once (emulate.cu checks it) and their halos give the same moments as the reference."""
    x, labels = make_inputs(shape, radius + shape[3])
    compare(emulated, x, labels, stride=stride, radius=radius)


@pytest.fixture
def small_blocks(emulated):
    """The emulated backward in blocks of at most ``emulated.max_block_planes`` planes."""
    yield emulated
    emulated.max_block_planes = 0


@needs_nvcc
@pytest.mark.parametrize("max_block_planes", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("pool,stride,layout", [
    ("avg", 2, "contiguous"), ("max", 2, "channels_last"), ("interp", 3, "strided"),
    ("max", 3, "contiguous"), ("avg", 4, "channels_last")])
def test_emulated_backward_blocks(small_blocks, max_block_planes, pool, stride, layout):
    """Factor > 1 runs the backward in blocks of planes with block-sized scratch maps: channel
    ranges of one image (1, 2 planes with C = 3: the last range is shorter), whole images (3, 4
    -> one image, 7 -> two), in both visiting orders; the emulator fills the scratch with NaN
    before every block and checks that the blocks cover every plane once."""
    small_blocks.max_block_planes = max_block_planes
    mode = "softmax" if pool == "max" else "sigmoid"
    x, labels = make_inputs((3, 3, 23, 26), 5 * stride + max_block_planes, mode=mode)
    if layout != "contiguous":
        x, labels = relayout(x, labels, layout)
    compare(small_blocks, x, labels, pool=pool, stride=stride, mode=mode)


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


# ---- without a GPU: float targets and region_mi on the emulated kernels -------------------------


def soft_target(shape, seed, kind="soft", dtype=torch.float64):
    """A float target (``soft``: rows summing to 1; ``multi``: multi-label 0/1) and a mask with
    about a fifth of the pixels off."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "soft":
        target = torch.softmax(2 * torch.randn(shape, generator=gen, dtype=torch.float64), 1)
    else:
        target = (torch.rand(shape, generator=gen, dtype=torch.float64) < 0.4).double()
    mask = torch.rand((shape[0], *shape[2:]), generator=gen) > 0.2
    return target.to(dtype), mask


@needs_nvcc
@pytest.mark.parametrize("kind", ["soft", "multi"])
@pytest.mark.parametrize("mode,pool,stride,radius", pool_grid(radii=(2,)))
def test_emulated_float_targets(emulated, kind, mode, pool, stride, radius):
    """A float target with and without a mask (FloatTarget: the BCE or the soft CE with the
    target, Y = target * mask), every pool mode and factor, DF 1 without any map."""
    s = side(radius, stride)
    x, _ = make_inputs((2, 3, s, s + 1), 3 * stride + radius, mode=mode)
    target, mask = soft_target(x.shape, stride, kind)
    for m in (mask, None):
        compare(emulated, x, target, mode=mode, pool=pool, stride=stride, radius=radius, mask=m)


@needs_nvcc
@pytest.mark.parametrize("mode", ["sigmoid", "softmax"])
@pytest.mark.parametrize("pool,stride", [("avg", 1), ("max", 2), ("interp", 3)])
def test_emulated_one_hot_target_equals_labels(emulated, mode, pool, stride):
    """A one-hot float target with the valid pixels as its mask gives the integer labels' loss
    and gradient on the emulated kernels."""
    x, labels = make_inputs((2, 3, 19, 17), 5, mode=mode, ignore_frac=0.2)
    valid = (labels >= 0) & (labels < 3) & (labels != 255)
    onehot = F.one_hot(torch.where(valid, labels.long(), 0), 3).movedim(-1, 1).double()
    opts = dict(mode=mode, pool=pool, stride=stride)
    with_labels = run(x, labels, emulated, **opts)
    with_target = run(x, onehot * valid.unsqueeze(1), emulated, mask=valid, **opts)
    for a, b in zip(with_target, with_labels):
        assert rel_err(a, b) <= 1e-12


@needs_nvcc
@pytest.mark.parametrize("dtype,target_dtype", [
    (torch.float32, torch.float32), (torch.float32, torch.float64),
    (torch.float16, torch.float16), (torch.bfloat16, torch.float32),
    (torch.float16, torch.bfloat16)])
def test_emulated_float_target_dtypes(emulated, dtype, target_dtype):
    """The target in the logits' dtype is read as it is (FloatTarget<scalar_t>), any other float
    dtype through a copy in the compute type (FloatTarget<acc_t>), as rmi_cuda.cu does."""
    x, _ = make_inputs((2, 3, 21, 18), 8, dtype=dtype)
    target, mask = soft_target(x.shape, 2, dtype=target_dtype)
    compare(emulated, x, target, stride=2, mask=mask)
    compare(emulated, x, target, stride=1, mode="softmax", mask=mask)
    compare(emulated, x, target, stride=3, pool="interp", mode="softmax")


@needs_nvcc
def test_emulated_float_target_layouts(emulated):
    """A channels-last logits and target, a strided target and mask, ``grad_output != 1``."""
    x, _ = make_inputs((2, 4, 18, 17), 9)
    target, mask = soft_target(x.shape, 4, "multi")
    compare(emulated, x.contiguous(memory_format=torch.channels_last),
            target.contiguous(memory_format=torch.channels_last), mask=mask, stride=2)
    wide = torch.cat([target, target], dim=3)[..., ::2]
    compare(emulated, x, wide, torch.tensor(-1.7, dtype=torch.float64), mask=mask.mT.mT,
            stride=3, pool="max", mode="softmax")
    compare(emulated, x, wide, mask=mask[:, :, :].transpose(1, 2).contiguous().transpose(1, 2),
            stride=1, radius=2)


def _emulated_region_mi(backend, pred, target, mask, weights, **opts):
    """``region_mi(pred, target, reduction="none")`` and the gradients of ``sum(weights * rmi)``
    to both maps: through RegionMIFunction for the emulated kernels (``backend`` not a str)."""
    p, t = pred.detach().requires_grad_(), target.detach().requires_grad_()
    if isinstance(backend, str):
        rmi = rmi_ext.region_mi(p, t, mask=mask, reduction="none", backend=backend, **opts)
    else:
        cfg = make_config(**opts)._replace(mode="region")
        rmi = RegionMIFunction.apply(p, t, mask, cfg, backend.name) / cfg.dim
    gp, gt = torch.autograd.grad((rmi * weights).sum(), (p, t))
    return rmi.detach(), gp, gt


@needs_nvcc
@pytest.mark.parametrize("pool,stride", [("avg", 1), ("avg", 2), ("max", 2), ("max", 3),
                                         ("interp", 2), ("interp", 3)])
def test_emulated_region_mi(emulated, pool, stride):
    """region_mi on the emulated kernels (mode "region": P is the map times the mask, its slope
    the mask, no first term) against the reference, values and both gradients; signed maps
    (max pooling starts from the window's first pixel, not from 0)."""
    gen = torch.Generator().manual_seed(stride)
    pred = torch.randn((2, 3, 17, 19), generator=gen, dtype=torch.float64) - 0.5
    target = torch.randn(pred.shape, generator=gen, dtype=torch.float64) - 0.5
    mask = torch.rand((2, 17, 19), generator=gen) > 0.15
    weights = torch.randn((2, 3), generator=gen, dtype=torch.float64)
    for m in (mask, None):
        opts = dict(pool=pool, stride=stride, radius=3)
        got = _emulated_region_mi(emulated, pred, target, m, weights, **opts)
        want = _emulated_region_mi("reference", pred, target, m, weights, **opts)
        for a, b in zip(got, want):
            assert rel_err(a, b) <= 1e-10


@needs_nvcc
def test_emulated_float_target_first_term_counts(emulated):
    """With a float target: non-finite logits are counted, a mask with no pixel on gives zero
    first-term sums, region mode counts nothing."""
    x, _ = make_inputs((2, 3, 13, 12), 0, requires_grad=False)
    target, mask = soft_target(x.shape, 1)
    x[0, 1, 2, 3], x[1, 2, 0, 0] = float("nan"), float("inf")
    _, _, nonfinite, _, _ = emulated.forward_stats(x, as_target(target, mask),
                                                    make_config(stride=2))
    assert nonfinite.item() == 2
    x = x.nan_to_num(0.0, 0.0, 0.0)
    off = torch.zeros_like(mask)
    for mode in ("sigmoid", "softmax", "region"):
        cfg = make_config(stride=2)._replace(mode=mode)
        for m in ((off, mask) if mode != "region" else (mask,)):
            base_sum, base_count, _, means, cov = emulated.forward_stats(
                x, as_target(target, m), cfg)
            want = torch_backend.forward_stats(x, as_target(target, m), cfg)
            if mode == "region" or m is off:
                assert base_sum.item() == 0.0 and base_count.item() == 0.0
            else:
                assert base_count.item() == m.sum().item()
                torch.testing.assert_close(base_sum, want[0], rtol=1e-12, atol=0)
            torch.testing.assert_close(means, want[3], rtol=1e-12, atol=1e-15)
            torch.testing.assert_close(cov, want[4], rtol=1e-12, atol=1e-15)


@needs_nvcc
@pytest.mark.parametrize("mode", ["sigmoid", "softmax"])
@pytest.mark.parametrize("stride,pool_size", [(2, None), (3, 5), (2, 3), (4, 2)])
def test_emulated_max_pool_ties(emulated, mode, stride, pool_size):
    """Max pooling with many exact ties in a window (integer logits in [-2, 2], so equal P at
    valid pixels, and 40% ignored pixels): the gradient goes to the first maximum in row-major
    order, the one the pooled-maps pass records, as max_pool2d picks it; overlapping windows
    (pool_size > stride) and windows clipped at the border included."""
    x, labels = make_inputs((2, 3, 23, 26), 11 + stride, mode=mode, ignore_frac=0.4)
    x = x.detach().round().clamp(-2, 2)
    compare(emulated, x, labels, mode=mode, pool="max", stride=stride,
                            pool_size=pool_size)


@needs_nvcc
def test_emulated_fast_divmod(emulated):
    """FastDivmod (the kernels' index division) against plain division: edge and random
    divisors in [1, 2^63) and dividends in [0, 2^63); the precomputed interp scales against the
    per-call ones of rmi_math.h, bit for bit."""
    out = subprocess.run([str(emulated.exe), "--selftest"], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert " 0 failures" in out.stdout


def _interp_axes():
    """``(n_in, n_out)`` axes of the interp taps test: every factor 1..8 of small sides, factors
    up to 16 of large ones (a float scale's rounding shows at large indices)."""
    axes = [(n_in, max(n_in // s, 1)) for n_in in range(1, 81) for s in range(1, 9)]
    return axes + [(n_in, n_in // s) for n_in in (513, 1000, 1023, 4097, 100003)
                   for s in range(1, 17)]


def _bit_planes(n_in):
    """``[1 + bits, n_in]`` float64: a row of ones, then bit b of the index i in row 1 + b. A
    linear map of them shows every tap's indices and weights (products by 0 or 1 are exact)."""
    i = torch.arange(n_in)
    bits = torch.stack([(i >> b) & 1 for b in range(max(1, (n_in - 1).bit_length()))])
    return torch.cat([torch.ones(1, n_in, dtype=torch.long), bits]).double()


@needs_nvcc
def test_emulated_interp_taps_match_torch(emulated):
    """The kernels' interp taps (precomputed scales, ``emulate --taps``) against F.interpolate
    on CPU, the torch backend's pooling: nearest source indices (a float scale, as torch
    computes it for float32) and bilinear align_corners=True maps applied to bit planes of the
    index, bit for bit in float32. In float64 within a few ulps of the source index, except
    that torch's CPU kernel floors the float64 source index in float32 (``floorf``; its CUDA
    kernel, which the kernels follow, does not): where the index is within a float32 ulp below
    an integer, torch moves the small weight w0 onto the next pixel. The selftest checks the
    float64 taps bit for bit against rmi_math.h's per-call formula."""
    axes = _interp_axes()
    out = subprocess.run([str(emulated.exe), "--taps", *(str(v) for a in axes for v in a)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    blocks = out.stdout.split("axis ")[1:]
    assert len(blocks) == len(axes)
    for (n_in, n_out), block in zip(axes, blocks):
        head, *rows = block.strip().split("\n")
        assert tuple(map(int, head.split())) == (n_in, n_out) and len(rows) == n_out
        cols = list(zip(*(row.split() for row in rows)))
        assert [int(v) for v in cols[0]] == list(range(n_out))
        index = torch.arange(n_in, dtype=torch.float32).view(1, 1, n_in, 1)
        nearest = F.interpolate(index, size=(n_out, 1), mode="nearest").view(-1).long()
        assert torch.equal(torch.tensor([int(v) for v in cols[1]]), nearest), (n_in, n_out)
        planes = _bit_planes(n_in)
        for dtype, k in ((torch.float32, 2), (torch.float64, 6)):
            i0, i1 = (torch.tensor([int(v) for v in cols[j]]) for j in (k, k + 1))
            w0, w1 = (torch.tensor([float.fromhex(v) for v in cols[j]], dtype=dtype)
                      for j in (k + 2, k + 3))
            mapped = w0 * planes[:, i0].to(dtype) + w1 * planes[:, i1].to(dtype)
            x = planes.to(dtype).view(1, -1, n_in, 1)
            want = F.interpolate(x, size=(n_out, 1), mode="bilinear",
                                 align_corners=True).view(-1, n_out)
            if dtype == torch.float32:
                assert torch.equal(mapped, want), (n_in, n_out)
            else:
                floorf = torch.where(w0 <= n_in * torch.finfo(torch.float32).eps, w0, 0.0)
                bound = 4 * n_in * torch.finfo(dtype).eps + floorf
                assert ((mapped - want).abs() <= bound).all(), (n_in, n_out)


def _launch_plan(exe, shape, radius, stride, pool, pool_size=None, logit_bytes=4):
    args = [*shape, radius, stride, _POOLS[pool], stride if pool_size is None else pool_size,
            logit_bytes]
    out = subprocess.run([str(exe), "--plan", *map(str, args)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    rows = {}
    for line in out.stdout.splitlines():
        name, *values = line.split()
        rows[name] = values if name in ("decode", "blocks") else [int(v) for v in values]
    return rows


@needs_nvcc
@pytest.mark.parametrize("shape,radius,stride,pool", [
    ((16, 150, 1024, 1024), 3, 4, "avg"),   # 2.5e9 elements (the ADE20K-like case)
    ((16, 150, 1024, 1024), 3, 1, "avg"),   # 2.5e9 pooled elements too
    ((16, 150, 1024, 1024), 10, 2, "max"),  # d = 100: 20300 moment entries per plane
    ((8, 19, 4096, 4096), 3, 2, "interp"),  # 2.5e9 elements, 1 plane of 16.7M pixels
    ((70000, 3, 8, 8), 2, 1, "avg"),        # 210000 planes > 65535
    ((1 << 20, 4096, 4, 4), 1, 1, "avg"),   # 2^32 planes, 2^36 elements: grid-x caps
    ((1, 1, 3, 3_000_000_000), 1, 1, "max"),  # one row past 2^31
    ((1, 2, 3, 3_000_000_000), 1, 2, "max"),  # a pooled row past 2^31, blocks of one plane
])
def test_launch_plan_past_2_31(emulated, shape, radius, stride, pool):
    """Every launch of a call, at sizes past 2^31 elements and 65535 planes (nothing is
    allocated): grid.x <= 2^31 - 1, grid.y and grid.z <= 65535, the moment chunks cover the
    window rows, the moment tiles fit their shared memory, the backward's blocks of planes
    cover every plane once, and the FastDivmod decoding of every flat index space (the blocks'
    local ones included) matches division."""
    plan = _launch_plan(emulated.exe, shape, radius, stride, pool)
    assert plan["decode"] == ["ok"] and plan["blocks"] == ["ok"]
    for name, values in plan.items():
        if name in ("decode", "blocks", "moments", "memory", "backward"):
            continue
        gx, gy, gz, elements = values
        assert 1 <= gx <= 2**31 - 1 and 1 <= gy <= 65535 and 1 <= gz <= 65535, (name, values)
        assert elements >= 1
    entries, chunks, rows_per_chunk, window_rows, tile_rows, tile_cols = plan["moments"]
    gx, gy, gz, planes = plan["moment_sums_partials"]
    assert gy == chunks and gz * 256 >= entries and chunks * rows_per_chunk >= window_rows
    assert (chunks - 1) * rows_per_chunk < window_rows  # no empty chunk
    assert radius <= tile_rows <= rows_per_chunk + radius - 1 and radius <= tile_cols <= 64
    assert tile_rows * tile_cols <= 2048
    # Blocks loop over planes past grid.x: every plane is reached.
    assert gx == min(planes, 2**30) and plan["moment_sums_offsets"][0] == gx
    n, c, h, w = shape
    images, channels, blocks, scratch_planes = plan["backward"]
    assert planes == n * c and (channels == c or images == 1)
    assert plan["full_res_grad"][3] == images * channels * h * w
    if stride == 1:
        assert (images, channels, blocks, scratch_planes) == (n, c, 1, 0)
        assert "pooled_maps" not in plan


def memory_per_logit(emulated, shape, radius, stride, pool, logit_bytes):
    """``(forward, backward)`` extra bytes per logit of the kernels' plans (moment partials;
    backward scratch, the gradient excluded) at ``shape``."""
    partials, scratch, logits_bytes = _launch_plan(emulated.exe, shape, radius, stride, pool,
                                                   logit_bytes=logit_bytes)["memory"]
    numel = logits_bytes / logit_bytes
    return partials / numel, scratch / numel


@needs_nvcc
@pytest.mark.parametrize("logit_bytes", [4, 2])
@pytest.mark.parametrize("pool", ["avg", "max", "interp"])
@pytest.mark.parametrize("stride", [1, 2, 3, 4, 8])
def test_memory_plan(emulated, stride, pool, logit_bytes):
    """The memory formula of the plans at the issue's shape [2, 21, 129, 129], R 3, and at a
    large one: no pooled map in the forward (moment partials <= 1/4 byte per logit), none in
    the backward at factor 1, and at factor > 1 scratch <= 1/16 of the logits' bytes; with the
    gradient (1x) and the O(N C d^2) matrices that keeps the peak under 1.25x the logits."""
    if stride == 1 and pool != "avg":
        pytest.skip("without downsampling the pool is unused")
    for shape in ((2, 21, 129, 129), (16, 150, 513, 513)):
        fwd, bwd = memory_per_logit(emulated, shape, 3, stride, pool, logit_bytes)
        assert fwd <= 0.25, (shape, fwd)
        if stride == 1:
            assert bwd == 0
        assert bwd <= logit_bytes / 16, (shape, bwd)


# ---- with a GPU: the compiled kernels ---------------------------------------------------------


def _cuda_inputs(shape, seed, **kw):
    return make_inputs(shape, seed, requires_grad=False, device="cuda", **kw)


@needs_cuda
@pytest.mark.parametrize("pool", ["avg", "max"])
def test_cuda_past_2_31_elements(pool):
    """Logits of 2.1e9 elements and 524296 planes (> 2^31, > 65535), made by expanding a small
    problem along N with stride 0 (the kernels read through strides, so only the gradient and
    bounded scratch are allocated, ~10 GB): every image's statistics and gradient equal the
    small problem's, the last image's included (its offsets are past 2^31)."""
    free, total = torch.cuda.mem_get_info()
    if free < 24 * 2**30:
        pytest.skip(f"needs 24 GiB of free GPU memory, {free / 2**30:.1f} GiB free")
    x1, labels1 = _cuda_inputs((1, 8, 64, 64), 3, dtype=torch.float32)
    n = 2**31 // (8 * 64 * 64) + 1
    x, labels = x1.expand(n, -1, -1, -1), labels1.expand(n, -1, -1)
    assert x.numel() > 2**31 and n * 8 > 65535
    cfg = make_config(stride=4, pool=pool)
    small = torch.ops.rmi_ext.forward_stats(*_op_args(x1, labels1, cfg))
    big = torch.ops.rmi_ext.forward_stats(*_op_args(x, labels, cfg))
    assert rel_err(big[0], small[0] * n) <= 1e-9 and big[1].item() == small[1].item() * n
    assert big[2].item() == 0
    for i in (0, n // 2, n - 1):
        assert rel_err(big[3][i], small[3][0]) <= 1e-10, i
        assert rel_err(big[4][i], small[4][0]) <= 1e-10, i
    del big
    d = cfg.dim
    gen = torch.Generator().manual_seed(1)
    coef1 = torch.randn(1, 8, 2, d, d, generator=gen, dtype=torch.float64).cuda()
    shift1 = torch.randn(1, 8, d, generator=gen, dtype=torch.float64).cuda()
    base_scale = torch.tensor(0.37, dtype=torch.float64, device="cuda")
    tail = _op_args(x1, labels1, cfg)[2:]
    want = torch.ops.rmi_ext.backward_grad(x1, labels1, base_scale, coef1, shift1, *tail)
    grad = torch.ops.rmi_ext.backward_grad(x, labels, base_scale, coef1.expand(n, -1, -1, -1, -1),
                                           shift1.expand(n, -1, -1), *tail)
    assert grad.shape == x.shape and grad.is_contiguous()
    for i in (0, n // 2, n - 1):
        assert rel_err(grad[i], want[0]) <= 1e-6, i


def peak_extra_bytes_cuda(fwd_bwd) -> int:
    """Peak of ``torch.cuda.max_memory_allocated`` during ``fwd_bwd()`` above the allocation
    before it (as benchmarks/rmi_bench.py measures it)."""
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fwd_bwd()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("stride,pool", [(1, "avg"), (4, "avg"), (2, "avg"), (4, "max"),
                                         (3, "interp")])
def test_cuda_peak_memory(dtype, stride, pool):
    """Issue 13: the peak extra memory of a forward+backward at [2, 21, 129, 129], R 3, is at
    most 1.25x the logits' bytes (the gradient itself, 1x, included): no full-resolution pooled
    map at DF 1, block-sized scratch at DF > 1 (see rmi_kernels.cuh, "Memory")."""
    x, labels = _cuda_inputs((2, 21, 129, 129), 13, dtype=dtype)
    x.requires_grad_(True)

    def fwd_bwd():
        rmi_ext.rmi_loss(x, labels, backend="cuda", radius=3, stride=stride, pool=pool).backward()

    fwd_bwd()  # warm-up: first-call allocations (cuBLAS/cuSOLVER workspaces, ...)
    x.grad = None
    extra = peak_extra_bytes_cuda(fwd_bwd)
    logits_bytes = x.numel() * x.element_size()
    assert x.grad is not None and x.grad.dtype == dtype
    assert extra <= 1.25 * logits_bytes, (
        f"peak extra {extra} bytes = {extra / logits_bytes:.3f}x the logits ({logits_bytes})")


def _op_args(x, labels, cfg):
    from rmi_ext._ops import _sides
    radius, stride, pool_size = _sides(x, cfg)
    return (x, labels, radius, stride, cfg.pool, pool_size, cfg.ignore_index, cfg.mode)


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
    with pytest.raises(RuntimeError, match="labels must be uint8, int8, int16, int32 or int64"):
        torch.ops.rmi_ext.forward_stats(*_op_args(x, labels.bool(), cfg))
    with pytest.raises(RuntimeError, match="a float target must have the logits' shape"):
        torch.ops.rmi_ext.forward_stats(*_op_args(x, labels.float(), cfg))
    with pytest.raises(RuntimeError, match="mode 'region' takes a float target"):
        torch.ops.rmi_ext.forward_stats(*_op_args(x, labels, cfg._replace(mode="region")))
    target = torch.rand_like(x)
    with pytest.raises(RuntimeError, match="mask must be a bool"):
        torch.ops.rmi_ext.forward_stats(*_op_args(x, target, cfg), labels)
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
@pytest.mark.parametrize("pool", ["avg", "max", "interp"])
@pytest.mark.parametrize("mode", ["sigmoid", "softmax", "region"])
def test_cuda_float_target_stages_match_torch_backend(pool, mode):
    """The ops with a float target (with and without a mask; mode "region": region_mi's)
    against the torch backend, stage by stage; DF 1 (the fused backward) too."""
    x, _ = _cuda_inputs((2, 3, 37, 41), 2)
    target, mask = (t.cuda() for t in soft_target(x.shape, 3))
    gen = torch.Generator().manual_seed(0)
    for stride, m in ((3, mask), (3, None), (1, mask)):
        cfg = make_config(stride=stride, pool=pool)._replace(mode=mode)
        got = torch.ops.rmi_ext.forward_stats(*_op_args(x, target, cfg), m)
        want = torch_backend.forward_stats(x, as_target(target, m), cfg)
        for name, a, b in zip(("base_sum", "base_count", "nonfinite", "means", "cov"), got, want):
            assert a.dtype == b.dtype and a.shape == b.shape, name
            assert rel_err(a, b) <= 1e-12, name
        d = cfg.dim
        coef = torch.randn(2, 3, 2, d, d, generator=gen, dtype=torch.float64).cuda()
        shift = torch.randn(2, 3, d, generator=gen, dtype=torch.float64).cuda()
        base_scale = torch.tensor(0.37, dtype=torch.float64, device="cuda")
        got = torch.ops.rmi_ext.backward_grad(x, target, base_scale, coef, shift,
                                              *_op_args(x, target, cfg)[2:], m)
        want = torch_backend.backward_grad(x, as_target(target, m), cfg, base_scale, coef, shift)
        assert rel_err(got, want) <= 1e-12


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_float_target_peak_memory(dtype):
    """A float32 soft target (read as it is: the logits' dtype or the compute type) and a mask
    add no more than the softmax backward's second per-pixel map: peak extra memory at most
    1.25x the logits' bytes, as with integer labels."""
    x, _ = _cuda_inputs((2, 21, 129, 129), 14, dtype=dtype)
    target, mask = (t.cuda() for t in soft_target(x.shape, 5, dtype=torch.float32))
    x.requires_grad_(True)
    for mode, stride in (("sigmoid", 1), ("softmax", 4)):
        def fwd_bwd():
            rmi_ext.rmi_loss(x, target, mask=mask, backend="cuda", mode=mode,
                             stride=stride).backward()

        fwd_bwd()
        x.grad = None
        extra = peak_extra_bytes_cuda(fwd_bwd)
        logits_bytes = x.numel() * x.element_size()
        assert extra <= 1.25 * logits_bytes, (mode, stride, extra / logits_bytes)
        x.grad = None


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
    target, mask = (t.cuda() for t in soft_target(x.shape, 2))
    for mode in ("softmax", "region"):
        c = cfg._replace(mode=mode)
        torch.library.opcheck(torch.ops.rmi_ext.forward_stats.default,
                              (*_op_args(x, target, c), mask), test_utils=tests)
        torch.library.opcheck(torch.ops.rmi_ext.backward_grad.default,
                              (x, target, *args[2:5], *_op_args(x, target, c)[2:], mask),
                              test_utils=tests)
