"""Backend ``"triton"`` past 2^31 elements: int64 offsets, checked on CPU with the interpreter.

Tensors of more than 2^31 elements cost little here: ``torch.empty`` only reserves address
space (untouched pages are never resident) and the interpreter reads CPU tensors in place (it
neither copies nor rewrites their storage). So the kernels run on views whose image or channel
planes start past element 2^31 of a 4 GiB buffer, with only the viewed elements filled.

The interpreter's int32-overflow sanitizer is on in this module (with ``debug``, which its
checks need): an int32 product or sum that overflows, as ``n * stride_n`` would without a cast
to int64, fails the test with an assertion instead of reading some other address.
"""
import pytest
import torch

import rmi_ext
from rmi_ext._config import make_config
from conftest import interpreter_options
from triton_interpreted import tb

interpreter = pytest.importorskip("triton.runtime.interpreter")

BIG = 2**31
GRAD_OUT = 1.7

pytestmark = pytest.mark.interpreted


@pytest.fixture(autouse=True, scope="module")
def _interpreter():
    """The interpreter's int32-overflow sanitizer on (its checks are device asserts: they need
    ``debug`` too)."""
    yield from interpreter_options(True, sanitize_overflow=True, debug=True)


def _virtual(numel, dtype):
    """An uninitialised 1-d CPU tensor: address space only, or a skip where it is refused."""
    try:
        return torch.empty(numel, dtype=dtype)
    except RuntimeError as exc:  # e.g. strict overcommit (vm.overcommit_memory=2)
        pytest.skip(f"cannot reserve {numel} elements of {dtype}: {exc}")


def _random(shape, seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    return (2.0 * torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype)


def _random_labels(shape, c, seed):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, c, shape, generator=gen)
    labels[..., : shape[-2] // 3, : shape[-1] // 2] = 255
    return labels.to(torch.uint8)


def _terms_and_grad(logits, labels, backend, **kw):
    x = logits.detach().requires_grad_()
    terms = rmi_ext.rmi_loss_terms(x, labels, backend=backend, **kw)
    (GRAD_OUT * terms.loss).backward()
    return torch.stack([t.detach().double() for t in terms]), x.grad


# ---- inputs whose planes start past element 2^31 (end to end) -----------------------------------

@pytest.mark.parametrize("layout,mode,stride,pool", [("images", "softmax", 1, "avg"),
                                                     ("channels", "sigmoid", 2, "max")])
def test_input_planes_past_2_31_elements(layout, mode, stride, pool):
    """Logits and uint8 labels as views into 2^31+ element buffers, planes ``2^30 + 13``
    elements apart: image 2 (``layout="images"``: ``n * stride_n``) or channel 2 (``"channels"``:
    ``c * stride_c``) of the logits, and image 2 of the labels, start past element 2^31. The
    loss terms and the gradient equal the triton backend's on a contiguous copy of the same
    values (exactly: the same kernels on the same values) and match the reference."""
    n, c, h, w = 3, 3, 13, 11
    far = 2**30 + 13  # < 2^31: passed as int32, so n * far overflows int32 for n = 2
    small = _random((n, c, h, w), 0, torch.float16)
    labels_small = _random_labels((n, h, w), c, 1)
    buf = _virtual(2 * far + n * c * h * w, torch.float16)
    strides = (far, h * w, w, 1) if layout == "images" else (h * w, far, w, 1)
    logits = buf.as_strided((n, c, h, w), strides)
    logits.copy_(small)  # writes the viewed elements only
    label_buf = _virtual(2 * far + h * w, torch.uint8)
    labels = label_buf.as_strided((n, h, w), (far, w, 1))
    labels.copy_(labels_small)
    assert logits.storage_offset() == 0 and 2 * far >= BIG
    kw = dict(radius=2, stride=stride, pool=pool, mode=mode)

    got_terms, got_grad = _terms_and_grad(logits, labels, "triton", **kw)
    want_terms, want_grad = _terms_and_grad(small, labels_small, "triton", **kw)
    assert torch.equal(got_terms, want_terms), (got_terms, want_terms)
    assert got_grad.shape == small.shape and torch.equal(got_grad, want_grad)

    ref_terms, ref_grad = _terms_and_grad(small, labels_small, "reference", **kw)
    torch.testing.assert_close(got_terms, ref_terms, rtol=1e-5, atol=1e-8)
    scale = ref_grad.double().abs().max().item()
    assert (got_grad.double() - ref_grad.double()).abs().max().item() <= 2e-2 * scale


# ---- maps with planes past element 2^31: one plane of a virtual problem -------------------------

class _OnePlane:
    """``kernel[grid](...)`` that runs only the programs of one plane: the interpreter is told
    the whole grid (``tl.num_programs``) and hands the kernel that plane's program ids, so the
    plane's offsets are the real ones while the other planes cost nothing."""

    def __init__(self, kernel, select):
        self.kernel = kernel
        self.select = select  # full grid -> (grid to loop over, its index -> full index)

    def __getitem__(self, grid):
        full = tuple(grid) + (1,) * (3 - len(grid))
        sub, to_full = self.select(full)

        def launch(*args, **kwargs):
            builder = interpreter.interpreter_builder
            set_dim, set_idx = builder.set_grid_dim, builder.set_grid_idx
            builder.set_grid_dim = lambda *_: set_dim(*full)
            builder.set_grid_idx = lambda x, y, z: set_idx(*to_full(x, y, z))
            try:
                return self.kernel[sub](*args, **kwargs)
            finally:
                del builder.set_grid_dim, builder.set_grid_idx  # the class's methods again

        return launch


def _only_plane(monkeypatch, n, c, plane):
    """Every kernel of the interpreted module runs only plane ``plane`` (image ``plane // c``)."""
    image = plane // c

    def plane_axis0(g):  # grid (N*C, ...): pooled maps, moment sums, full-resolution gradient
        return (1, g[1], g[2]), lambda x, y, z: (plane, y, z)

    def image_axis1(g):  # grid (blocks, N): logsumexp
        return (g[0], 1, 1), lambda x, y, z: (x, image, z)

    def plane_blocks(g):  # 1-d grid (N*C * blocks,), planes fastest: stencil
        return (g[0] // (n * c),), lambda x, y, z: (x * n * c + plane, y, z)

    for name, select in [("_first_term_and_pooled_maps_kernel", plane_axis0),
                         ("_moment_sums_kernel", plane_axis0),
                         ("_full_res_grad_kernel", plane_axis0),
                         ("_first_term_lse_kernel", image_axis1),
                         ("_pooled_grad_stencil_kernel", plane_blocks)]:
        monkeypatch.setattr(tb, name, _OnePlane(getattr(tb, name), select))
    # the backward in one block of all planes: its maps past element 2^31 too
    monkeypatch.setattr(tb, "_plane_blocks", lambda logits, cfg: [range(n * c)])


class _GradInto:
    """``torch`` for the backend module, except that ``empty_like(logits)`` is ``out``."""

    def __init__(self, logits, out):
        self._logits, self._out = logits, out

    def __getattr__(self, name):
        return getattr(torch, name)

    def empty_like(self, t, *args, **kwargs):
        return self._out if t is self._logits else torch.empty_like(t, *args, **kwargs)


def _plane_rows(part, planes, plane):
    """The rows of the partial sums ``part [planes * k, ...]`` that plane ``plane`` wrote."""
    k = part.shape[0] // planes
    return part[plane * k:(plane + 1) * k]


def _stages(logits, labels, cfg, coef, shift, image, channel):
    """Every stage's output for plane ``(image, channel)``, in stage order: pooled maps and
    partial sums, ``lse`` and CE partial sums (softmax), the stencil's ``dloss/dP``, means and
    covariances, the gradient. Copies: the full-size results are dropped at once."""
    n, c = logits.shape[:2]
    plane = image * c + channel
    out = {}
    store_argmax = cfg.stride > 1 and cfg.pool == "max"
    target = tb._target_args(labels)
    maps = tb._first_term_and_pooled_maps(logits, target, cfg, first_term=True,
                                          store_argmax=store_argmax)
    for name, t in (("P", maps.p), ("Y", maps.y), ("arg-max", maps.argmax)):
        if t.dim() == 3:  # stored maps only
            out[name] = t[plane].clone()
    out["pooled-maps partial sums"] = _plane_rows(maps.partial_sums, n * c, plane).clone()
    out["counts"] = _plane_rows(maps.counts, n * c, plane).clone()
    out["dloss/dP"] = tb._pooled_grad_stencil(logits, maps.p, maps.y, target, coef, shift,
                                              cfg)[plane].clone()
    del maps
    if cfg.mode == "softmax":
        lse, part = tb._first_term_lse(logits, target, cfg, store_lse=True, ce_sums=True)
        out["lse"] = lse[image].clone()
        out["CE partial sums"] = _plane_rows(part, n, image).clone()
        del lse
    means, cov = tb._forward_impl(logits, labels, cfg)[3:]
    out["means"], out["cov"] = means[image, channel].clone(), cov[image, channel].clone()
    grad = tb._backward_impl(logits, labels, cfg, torch.tensor(0.3, dtype=torch.float64),
                             coef, shift)
    out["gradient"] = grad[image, channel].clone()
    return out


@pytest.mark.parametrize("mode,stride,pool,c,size", [("sigmoid", 1, "avg", 2, (250, 262)),
                                                     ("softmax", 1, "avg", 1, (250, 262)),
                                                     ("sigmoid", 2, "max", 2, (500, 522))])
def test_map_planes_past_2_31_elements(mode, stride, pool, c, size, monkeypatch):
    """A virtual problem of ``N x C`` planes whose last plane starts past element 2^31 of the
    pooled maps (and, with ``C = 1``, of the ``lse [N, H*W]`` map; stride 1: of the gradient):
    only that plane's programs run (:class:`_OnePlane`), on a view whose last image holds the
    data. Every stage's output for that plane equals the same stage's output for a one-image
    problem of that image, bit for bit. Without int64 plane offsets the sanitizer reports the
    int32 overflow, or the maps are read and written elsewhere."""
    hgt, wid = size
    cfg = make_config(radius=2, stride=stride, pool=pool, mode=mode)
    ph, pw = cfg.pooled_size(hgt, wid)
    image = -(-BIG // (c * ph * pw))  # the last image: its planes start past 2^31 map elements
    n = image + 1
    assert image * c * ph * pw >= BIG and (mode == "sigmoid" or image * hgt * wid >= BIG)
    _virtual(n * c * ph * pw, torch.float32)  # (freed at once) the backend reserves such maps

    logits_one = _random((1, c, hgt, wid), 2, torch.float16)
    labels_one = _random_labels((1, hgt, wid), c, 3)
    d = cfg.dim
    coef_one = 0.01 * _random((1, c, 2, d, d), 4, torch.float64)
    shift_one = 0.01 * _random((1, c, d), 5, torch.float64)
    want = _stages(logits_one, labels_one, cfg, coef_one, shift_one, 0, c - 1)
    assert torch.count_nonzero(want["gradient"]) > 0

    # Images 2^31 / image + 1 elements apart (they overlap: only the last one is read).
    step = BIG // image + 1
    logits = _virtual(image * step + c * hgt * wid, torch.float16).as_strided(
        (n, c, hgt, wid), (step, hgt * wid, wid, 1))
    logits[image].copy_(logits_one[0])
    labels = _virtual(image * step + hgt * wid, torch.uint8).as_strided(
        (n, hgt, wid), (step, wid, 1))
    labels[image].copy_(labels_one[0])
    coef = torch.zeros((n, c, 2, d, d), dtype=torch.float64)
    coef[image] = coef_one[0]
    shift = torch.zeros((n, c, d), dtype=torch.float64)
    shift[image] = shift_one[0]
    if stride > 1:  # empty_like(logits) would reserve 4x the pooled maps: all planes share out
        out = torch.empty((c, hgt, wid), dtype=logits.dtype).as_strided(
            (n, c, hgt, wid), (0, hgt * wid, wid, 1))
        monkeypatch.setattr(tb, "torch", _GradInto(logits, out))
    _only_plane(monkeypatch, n, c, image * c + c - 1)
    got = _stages(logits, labels, cfg, coef, shift, image, c - 1)

    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


# ---- interp pooling of a tall image: ih * (h - 1) past 2^31 --------------------------------------

def test_interp_gradient_tall_image_float64():
    """Interp pooling of a 65538-row image (stride 2: h = 32769): the gradient kernel's
    candidate rows ``ih * (h - 1) // (H - 1)`` pass 2^31 (int64 there, ``WIDE``). Loss terms and
    gradient match the C++ CPU kernels in float64. (Not the reference: PyTorch's CPU bilinear
    ``F.interpolate`` is off by ~1e-3 in float64 past ~8k rows, the fused plans are exact.)"""
    if rmi_ext.backend_info("cpu")["available"]["cpu"] is not True:
        pytest.skip("needs the C++ CPU kernels (rmi_ext._C)")
    n, c, h, w = 1, 2, 65538, 5
    logits = _random((n, c, h, w), 6, torch.float64)
    labels = _random_labels((n, h, w), c, 7).long()
    assert (h - 1) * (h // 2 - 1) >= BIG
    kw = dict(radius=2, stride=2, pool="interp")
    got_terms, got_grad = _terms_and_grad(logits, labels, "triton", **kw)
    want_terms, want_grad = _terms_and_grad(logits, labels, "cpu", **kw)
    torch.testing.assert_close(got_terms, want_terms, rtol=1e-10, atol=1e-12)
    scale = want_grad.abs().max().item()
    assert (got_grad - want_grad).abs().max().item() <= 1e-10 * scale


# ---- sizes the kernels cannot index: a clear error ----------------------------------------------

def test_oversized_plane_raises():
    """More than 2^30 pixels in one image plane (int32 offsets inside a plane): a ValueError
    naming the sizes, before anything is allocated or launched."""
    logits = torch.empty((1, 1, 1, 1)).expand(1, 2, 2**15, 2**15)
    labels = torch.zeros((1, 1, 1), dtype=torch.int64).expand(1, 2**15, 2**15)
    cfg = make_config(radius=2, stride=2)
    with pytest.raises(ValueError, match=r"32768 x 32768 = 1073741824 pixels"):
        tb._forward_impl(logits, labels, cfg)
    with pytest.raises(ValueError, match=r"32768 x 32768"):
        tb._backward_impl(logits, labels, cfg, torch.tensor(1.0, dtype=torch.float64),
                           torch.zeros(1, 2, 2, 4, 4, dtype=torch.float64),
                           torch.zeros(1, 2, 4, dtype=torch.float64))


def test_grid_limits_raise(monkeypatch):
    """A launch grid beyond CUDA's limits is a ValueError naming the logits' shape, not a
    launch failure: a 2^24 x 2 image with the CUDA tiling needs 65536 row tiles of 256; softmax
    mode takes at most 65535 images."""
    monkeypatch.setattr(tb, "_INTERPRETER_BLOCKS", False)
    logits = torch.empty((1, 1, 1, 1)).expand(1, 1, 2**24, 2)
    labels = torch.zeros((1, 1, 1), dtype=torch.int64).expand(1, 2**24, 2)
    with pytest.raises(ValueError, match=r"main pass .* shape \(1, 1, 16777216, 2\) needs a "
                                         r"launch grid \(1, 65536, 1\)"):
        tb._forward_impl(logits, labels, make_config(radius=2, stride=1))
    # softmax: images on the grid's second axis, at most 65535 of them
    logits = torch.empty((1, 1, 1, 1)).expand(65536, 2, 1, 1)
    labels = torch.zeros((1, 1, 1), dtype=torch.int64).expand(65536, 1, 1)
    with pytest.raises(ValueError, match=r"logsumexp .* launch grid \(1, 65536\)"):
        tb._first_term_lse(logits, tb._target_args(labels), make_config(mode="softmax"),
                           store_lse=False, ce_sums=True)
