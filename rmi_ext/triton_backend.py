"""Backend ``"triton"``: the fused-plan stages as Triton kernels, compiled for CUDA tensors, or
interpreted for CPU tensors when ``TRITON_INTERPRET=1`` is set before this module (and triton)
is imported: one or the other per process, as Triton decides (:func:`probe` says why a device
cannot run).

One file holds the ``@triton.jit`` kernels, the host functions that launch them and the op
registration (the Liger-Kernel layout). Stage names match :mod:`rmi_ext.torch_backend`:

(a) first_term + pooled_maps: :func:`_first_term_and_pooled_maps_kernel` (plus
    :func:`_first_term_lse_kernel`, the log-sum-exp, in softmax mode): one pass over
    ``logits``/``labels`` per ``(n, c)`` plane tile: masked sigmoid, first-term partial sums,
    counts, pooled ``P``/``Y`` maps (and, in the backward, the max-pool arg-max).
(b) moment_sums: :func:`_moment_sums_kernel`: ``d x d`` product sums of the region vectors
    (``tl.dot`` in float64 on tiles of offsets x windows), split over windows, centred on the
    host.
(c) linalg: :mod:`rmi_ext.linalg` (shared, torch float64).
(d) pooled_grad_stencil: :func:`_pooled_grad_stencil_kernel`: ``dloss/dP`` on the pooled map
    from the stencil coefficients.
(e) pool_adjoint + full_res_grad: :func:`_full_res_grad_kernel`: pooling adjoint, ``dP/dx``
    and the first-term gradient at full resolution, in the logits' dtype and memory format.

Geometry: every kernel addresses a plane as a volume ``[Z, H, W]`` (pooled ``[z, h, w]``),
with the radius, stride and pool size of each axis as constexprs; 2-D maps are volumes of depth
1 (:class:`Geometry`, :func:`_volume_view`), so ``[N, C, H, W]`` and ``[N, C, D, H, W]`` logits
and per-axis options run the same code. The ``(dz, dy, dx)`` of region offset ``i`` is
:func:`_region_offset` (row-major, as the reference's ``unfold``).

Without pooling (every stride 1, where the pooled maps are the full-resolution ones): no map is
stored; stages (b) and (d) recompute ``P``/``Y`` from the logits and labels, and (d) also does
(e) (``FUSE_GRAD``), so forward+backward allocate no full-size tensor but the gradient. With
pooling: the backward runs (a), (d) and (e) on blocks of planes (:func:`_plane_blocks`), its
pooled maps within 1/16 of the logits. Tile sizes: :data:`TILES`.

Targets: integer labels, or a float target of the logits' shape and its mask (``TARGET`` 1,
:func:`_target`; softmax mode: the soft CE and the per-pixel sum of the target over classes in
:func:`_first_term_lse_kernel`); ``region_mi`` is ``MODE`` 2 (``P`` the map itself).

Precision: the per-pixel math runs in float32 (float64 for float64 logits). Per-program partial
sums of the first term are combined in float64; moment sums and the stencil accumulate in float64.
No host syncs; inputs of any strides are read in place.
"""
import contextlib
import gc
import math
import os
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from ._config import RMIConfig
from .function import fake_backward_grad, fake_forward_stats, op_sides
from .targets import FloatTarget, as_target, labels_and_mask as _labels_and_mask
from .torch_backend import compute_dtype as _compute_dtype
from .torch_backend import target_grad  # noqa: F401  (region_mi's gradient to the target map)

_POOL_IDS = {"avg": 0, "max": 1, "interp": 2}
_MODE_IDS = {"sigmoid": 0, "softmax": 1, "region": 2}  # region: region_mi, P = the map

#: Volumes and per-axis options, float targets and region_mi run here
#: (:func:`rmi_ext.loss._backend_for`): the kernels address every map as a volume
#: (:class:`Geometry`; 2-D maps have depth 1), read either target through :func:`_target`, and
#: run region_mi as ``MODE`` 2.
supports_volumes = True
supports_float_targets = True
supports_region_mi = True

#: Whether the kernels are interpreted (CPU tensors) rather than compiled (CUDA tensors): Triton
#: decides when ``@triton.jit`` decorates, from ``TRITON_INTERPRET`` (so do ``tl.sum`` and the
#: other jit functions of ``triton.language``, when triton is imported).
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
#: Whether the host functions pick the interpreter's block sizes (fewer, larger blocks: the
#: interpreter's cost is per op, not per element) rather than :data:`TILES`; tests turn it off
#: to run the CUDA tiling under the interpreter.
_INTERPRETER_BLOCKS = _INTERPRETED


def unavailable_reason():
    """``None``: triton imported (the device check is :func:`probe`'s)."""
    return None


# ================================================================================================
# Per-element helpers (the conventions of csrc/rmi_math.h)
# ================================================================================================

# Loops with run-time bounds (``range(lo, hi, STEP)`` with ``hi`` a kernel argument or computed)
# are scf.for loops when compiled, which the compiler pipelines. The interpreter runs them as
# Python ``range`` on its scalars, 1-element numpy arrays: triton 3.6's ``tensor.__index__`` is
# ``int(array)``, which numpy >= 2.4 rejects for 1-d arrays (3.9 squeezes first). So run-time
# bounds go through ``_loop_bound``: the identity when compiled (inlined: the IR is unchanged),
# a Python int when interpreted.
if _INTERPRETED:
    def _loop_bound(x):
        return x if isinstance(x, int) else int(x.handle.data.item())
else:
    @triton.jit
    def _loop_bound(x):
        return x


@triton.jit
def _exact_div(a, b):
    """IEEE-rounded division (Triton's fp32 ``/`` is approximate on NVIDIA GPUs)."""
    if a.dtype == tl.float32:
        return tl.math.div_rn(a, b)
    else:
        return a / b


@triton.jit
def _linear_scale(n_in, n_out, DT: tl.constexpr):
    """Bilinear (``align_corners=True``) source scale ``(n_in-1) / (n_out-1)``; 0 if n_out == 1."""
    scale = _exact_div(tl.cast(n_in - 1, DT), tl.cast(tl.maximum(n_out - 1, 1), DT))
    return tl.where(n_out > 1, scale, 0.0)


@triton.jit
def _bilinear_source(o, lin, n_in, DT: tl.constexpr):
    """Source of output index ``o`` along one axis of an ``align_corners=True`` resize with
    scale ``lin``: the two input indices ``i0 <= i1 < n_in`` and the weight ``frac`` of ``i1``."""
    f = lin * o.to(DT)
    i0 = f.to(tl.int32)
    frac = tl.minimum(tl.maximum(f - i0.to(DT), 0.0), 1.0)
    i1 = i0 + tl.where(i0 < n_in - 1, 1, 0)
    return i0, i1, frac


@triton.jit
def _bilinear_weight(o, i, lin, n_in, DT: tl.constexpr):
    """Weight of input index ``i`` in output ``o`` of that resize (0 when ``i`` is no source)."""
    i0, i1, frac = _bilinear_source(o, lin, n_in, DT)
    return tl.where(i0 == i, 1.0 - frac, 0.0) + tl.where(i1 == i, frac, 0.0)


@triton.jit
def _masked_by(cond, mask):
    """``mask & cond`` for a bool block ``mask`` and a bool scalar ``cond`` (the depth index's
    test): through ``where``, since triton 3.9's interpreter splats a bool scalar to int32,
    which ``&`` would make an int32 block, not a mask."""
    return tl.where(cond, mask, False)


@triton.jit
def _load_labels(ptrs, mask):
    """Labels as int64, -1 (never a valid class) outside ``mask``. Masking after the load, not
    through ``other=-1``: that would read as 255 for uint8 labels, a class when C > 255."""
    return tl.where(mask, tl.load(ptrs, mask=mask, other=0).to(tl.int64), -1)


@triton.jit
def _label_parts(lab, c, C, ignore_index):
    """``valid`` (0 <= label < C, label != ignore_index) and the one-hot bit ``label == c``."""
    valid = (lab >= 0) & (lab < C) & (lab != ignore_index)
    return valid, valid & (lab == c)


@triton.jit
def _target(lrow, mrow, cols, mask, c, C, ignore_index, slw, smw, TARGET: tl.constexpr,
            DT: tl.constexpr):
    """``(valid, Y)`` of plane ``c`` at columns ``cols`` of the rows whose target pointers are
    ``lrow`` (the plane's, class offset included) and mask pointers ``mrow``. ``TARGET`` 0:
    integer labels (valid: 0 <= label < C and label != ignore_index; ``Y`` the one-hot bit);
    1: a float target (valid: the mask; ``Y`` the target where valid, else 0)."""
    cols64 = cols.to(tl.int64)
    if TARGET == 0:
        valid, hot = _label_parts(_load_labels(lrow + cols64 * slw, mask), c, C, ignore_index)
        return valid, tl.where(hot, 1.0, 0.0).to(DT)
    else:
        valid = mask & (tl.load(mrow + cols64 * smw, mask=mask, other=0) != 0)
        return valid, tl.load(lrow + cols64 * slw, mask=valid, other=0.0).to(DT)


class _Pixel(NamedTuple):
    """One pixel of plane ``c`` (:func:`_pixel`): sigmoid, ``P`` and BCE term."""
    sig: tl.tensor  # sigmoid(x)
    p: tl.tensor  # sig*m + 1e-6, or clamp(sig*m, 1e-6, 1) in softmax mode
    bce: tl.tensor  # masked BCE term


@triton.jit
def _pixel(x, valid, y, MODE: tl.constexpr):
    """:class:`_Pixel` of ``x`` where the pixel counts (``valid``) and its target is ``y``
    (:func:`_target`): ``sig``, ``P`` (``sig*m + 1e-6``, or ``clamp(sig*m, 1e-6, 1)`` in
    softmax mode) and the masked BCE term.

    One helper rather than several: unused results are dead code on the GPU, while the
    interpreter pays per call. ``sig`` and ``log1p(exp(-|x|))`` come from one exp; ``log1p`` uses
    Goldberg's trick (no libdevice call, so the interpreter runs it too).
    """
    e = tl.exp(-tl.abs(x))
    inv = 1.0 / (1.0 + e)
    sig = tl.where(x >= 0, inv, e * inv)
    pm = tl.where(valid, sig, 0.0)
    if MODE == 0:
        p = pm + 1e-6
    elif MODE == 1:
        p = tl.minimum(tl.maximum(pm, 1e-6), 1.0)
    else:  # region_mi: P is the map itself
        p = tl.where(valid, x, 0.0)
    u = 1.0 + e
    log1p_e = tl.where(u == 1.0, e, tl.log(u) * (e / (u - 1.0)))
    bce = tl.where(valid, tl.maximum(x, 0.0) - x * y + log1p_e, 0.0)
    return _Pixel(sig, p, bce)


@triton.jit
def _rmi_prob_slope(sig, valid, MODE: tl.constexpr):
    """``dP/dx``: ``m*sig*(1-sig)``; softmax mode also 0 where ``sig*m`` is clamped; region
    mode ``m``."""
    if MODE == 2:
        return tl.where(valid, 1.0, 0.0)
    slope = tl.where(valid, sig * (1.0 - sig), 0.0)
    if MODE == 1:
        slope = tl.where((sig >= 1e-6) & (sig <= 1.0), slope, 0.0)
    return slope


@triton.jit
def _full_res_grad_value(g_full, x, valid, y, lse_ptrs, hw, mask, scale_ptr, MODE: tl.constexpr,
                         TARGET: tl.constexpr):
    """Stage (e) at pixels ``x`` (``valid``, ``y``: :func:`_target`): ``g_full * dP/dx +
    base_scale * d(first term)/dx``, where ``g_full`` is the pooling adjoint of ``dloss/dP``
    (in the compute dtype); the softmax mode reads the pixels' ``lse`` at ``lse_ptrs`` (where
    ``mask``) and, for a float target, the sum over classes of ``Y`` ``hw`` elements further
    (the soft CE's gradient is ``softmax * sum_c Y_c - Y``)."""
    px = _pixel(x, valid, y, MODE)
    grad = g_full * _rmi_prob_slope(px.sig, valid, MODE).to(g_full.dtype)
    if MODE == 2:  # region_mi: no first term
        return grad
    if MODE == 0:
        base = tl.where(valid, px.sig - y, 0.0)
    else:
        soft = tl.exp(x - tl.load(lse_ptrs, mask=mask, other=0.0))
        if TARGET == 1:
            soft = soft * tl.load(lse_ptrs + hw, mask=mask, other=0.0)
        base = tl.where(valid, soft - y, 0.0)
    return grad + tl.load(scale_ptr).to(g_full.dtype) * base


@triton.jit
def _load_y(ymap_plane, lbase, mbase, zs, rows, cols, mask, h, w, c, C, ignore_index, slz, slh,
            slw, smz, smh, smw, Y_FROM_LABELS: tl.constexpr, TARGET: tl.constexpr,
            DT: tl.constexpr):
    """Pooled ``Y`` at ``(zs, rows, cols)`` (``zs`` 0 for 2-D maps): from the stored
    ``[z, h, w]`` map, or (no pooling) from the target (:func:`_target`; ``lbase``, ``mbase``:
    the plane's pointers)."""
    if Y_FROM_LABELS:
        z64 = zs.to(tl.int64)
        r64 = rows.to(tl.int64)
        return _target(lbase + z64 * slz + r64 * slh, mbase + z64 * smz + r64 * smh, cols, mask,
                       c, C, ignore_index, slw, smw, TARGET, DT)[1]
    else:
        return tl.load(ymap_plane + (zs * h + rows) * w + cols, mask=mask, other=0.0).to(DT)


@triton.jit
def _load_p(pplane, xbase, lbase, mbase, zs, rows, cols, mask, h, w, c, C, ignore_index, sxz,
            sxh, sxw, slz, slh, slw, smz, smh, smw, P_FROM_LOGITS: tl.constexpr,
            MODE: tl.constexpr, TARGET: tl.constexpr, DT: tl.constexpr):
    """Pooled ``P`` at ``(zs, rows, cols)`` in ``DT`` (0 outside ``mask``): from the stored map,
    or (no pooling, where the pooled map is the full-resolution one) recomputed from the logits
    and the target (``xbase``, ``lbase``, ``mbase``: the plane's pointers), so no full-size map
    is allocated."""
    if P_FROM_LOGITS:
        z64 = zs.to(tl.int64)
        r64 = rows.to(tl.int64)
        c64 = cols.to(tl.int64)
        x = tl.load(xbase + z64 * sxz + r64 * sxh + c64 * sxw, mask=mask, other=0.0).to(DT)
        valid, y = _target(lbase + z64 * slz + r64 * slh, mbase + z64 * smz + r64 * smh, cols,
                           mask, c, C, ignore_index, slw, smw, TARGET, DT)
        return tl.where(mask, _pixel(x, valid, y, MODE).p, 0.0)
    else:
        return tl.load(pplane + (zs * h + rows) * w + cols, mask=mask, other=0.0).to(DT)


@triton.jit
def _region_offset(i, RH: tl.constexpr, RW: tl.constexpr):
    """Offset ``i`` of a region vector (row-major over the ``RZ x RH x RW`` region) as its
    ``(dz, dy, dx)``."""
    return i // (RH * RW), (i // RW) % RH, i % RW


# ================================================================================================
# Stage (a): first_term and pooled_maps
# ================================================================================================

@triton.jit(do_not_specialize=["C", "Z", "H", "W", "ignore_index"])
def _first_term_lse_kernel(x_ptr, lab_ptr, m_ptr, lse_ptr, part_ptr, C, Z, H, W, sxn, sxc, sxz,
                           sxh, sxw, sln, slc, slz, slh, slw, smn, smz, smh, smw, ignore_index,
                           STORE_LSE: tl.constexpr, CE_SUMS: tl.constexpr, TARGET: tl.constexpr,
                           DT: tl.constexpr, BC: tl.constexpr, BP: tl.constexpr):
    """Softmax mode, per pixel: ``lse = logsumexp_c x`` (online over channel blocks).

    Grid ``(cdiv(Z*H*W, BP), N)`` (``N <= 65535``: a 1-D grid would lift that, but its div/mod
    cost 28 more registers on sm_90 with triton 3.6). ``STORE_LSE``: write ``lse [N, Z*H*W]``
    (backward; a float target: ``[N, 2, Z*H*W]``, then the sum over classes of ``Y``).
    ``CE_SUMS``: write this program's ``(sum CE, valid count)`` to ``part_ptr[pid, 0:2]``,
    ``pid = n * cdiv(Z*H*W, BP) + pblk`` (a float target: the soft CE ``sum_c Y_c (lse - x_c)``
    over the masked pixels, a second pass over the classes).
    """
    pblk = tl.program_id(0)
    n = tl.program_id(1)
    pix = pblk * BP + tl.arange(0, BP)
    size = Z * H * W
    pmask = pix < size
    zz = (pix // (H * W)).to(tl.int64)
    hh = ((pix // W) % H).to(tl.int64)
    ww = (pix % W).to(tl.int64)
    xbase = x_ptr + n.to(tl.int64) * sxn + zz * sxz + hh * sxh + ww * sxw  # [BP] pointers
    run_max = tl.full([BP], float("-inf"), DT)
    run_sum = tl.full([BP], 0, DT)
    for c0 in range(0, _loop_bound(C), BC):
        cc = c0 + tl.arange(0, BC)[:, None]
        xv = tl.load(xbase[None, :] + cc.to(tl.int64) * sxc, mask=(cc < C) & pmask[None, :],
                     other=0.0).to(DT)
        xv = tl.where(cc < C, xv, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(xv, 0))
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(xv - new_max[None, :]), 0)
        run_max = new_max
    lse = run_max + tl.log(run_sum)
    lbase = lab_ptr + n.to(tl.int64) * sln + zz * slz + hh * slh + ww * slw  # [BP] pointers
    if TARGET == 1:
        valid = pmask & (tl.load(m_ptr + n.to(tl.int64) * smn + zz * smz + hh * smh + ww * smw,
                                 mask=pmask, other=0) != 0)
        y_sum = tl.full([BP], 0, DT)
        ce = tl.full([BP], 0, DT)
        for c0 in range(0, _loop_bound(C), BC):
            cc = c0 + tl.arange(0, BC)[:, None]
            m2 = (cc < C) & valid[None, :]
            xv = tl.load(xbase[None, :] + cc.to(tl.int64) * sxc, mask=m2, other=0.0).to(DT)
            yv = tl.load(lbase[None, :] + cc.to(tl.int64) * slc, mask=m2, other=0.0).to(DT)
            y_sum += tl.sum(yv, 0)
            ce += tl.sum(yv * (lse[None, :] - xv), 0)
        if STORE_LSE:
            row = lse_ptr + n.to(tl.int64) * 2 * size + pix
            tl.store(row, lse, mask=pmask)
            tl.store(row + size, y_sum, mask=pmask)
        if CE_SUMS:
            pid = n.to(tl.int64) * tl.num_programs(0) + pblk
            tl.store(part_ptr + pid * 2, tl.sum(tl.where(valid, ce, 0.0), 0).to(tl.float64))
            tl.store(part_ptr + pid * 2 + 1, tl.sum(valid.to(tl.int32), 0).to(tl.float64))
    elif STORE_LSE:
        tl.store(lse_ptr + n.to(tl.int64) * size + pix, lse, mask=pmask)
    if CE_SUMS and TARGET == 0:
        lab = _load_labels(lbase, pmask)
        valid = pmask & (lab >= 0) & (lab < C) & (lab != ignore_index)
        x_lab = tl.load(xbase + tl.where(valid, lab, 0) * sxc, mask=valid, other=0.0).to(DT)
        ce = tl.sum(tl.where(valid, lse - x_lab, 0.0), 0)
        pid = n.to(tl.int64) * tl.num_programs(0) + pblk
        tl.store(part_ptr + pid * 2, ce.to(tl.float64))
        tl.store(part_ptr + pid * 2 + 1, tl.sum(valid.to(tl.int32), 0).to(tl.float64))


@triton.jit(do_not_specialize=["C", "Z", "H", "W", "z", "h", "w", "TH", "ignore_index",
                               "plane0"])
def _first_term_and_pooled_maps_kernel(
        x_ptr, lab_ptr, m_ptr, pmap_ptr, ymap_ptr, amax_ptr, part_ptr, cnt_ptr, C, Z, H, W, z, h,
        w, TH, sxn, sxc, sxz, sxh, sxw, sln, slc, slz, slh, slw, smn, smz, smh, smw,
        ignore_index, plane0, SZ: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
        KZ: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, VOLUME: tl.constexpr,
        POOL: tl.constexpr, MODE: tl.constexpr, FIRST_TERM: tl.constexpr,
        STORE_P: tl.constexpr, STORE_Y: tl.constexpr, STORE_ARGMAX: tl.constexpr,
        TARGET: tl.constexpr, DT: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr):
    """Stage (a) for one ``(n, c)`` plane tile. Grid ``(planes, TZ * TH, TW)``: planes
    ``plane0 + program_id(0)`` of the ``N*C`` (the maps and partial sums hold these ``planes``
    only), tile ``(tz, th, tw)`` with ``program_id(1) = tz * TH + th``. 2-D maps are volumes of
    depth ``Z == 1`` (``VOLUME`` 0: no depth taps in interp).

    Pooled part: the ``BH x BW`` pooled outputs of tile ``(th, tw)`` in pooled slice ``tz``:
    ``P`` (``STORE_P``, ``[planes, z, h, w]``), ``Y`` (``STORE_Y``), arg-max flat index
    ``(iz*H + ih)*W + iw`` (``STORE_ARGMAX``), and their plane partial sums. Pool windows
    ``KZ x KH x KW`` at strides ``SZ, SH, SW``; no pooling is passed as avg pooling with
    ``K* == S* == 1``. Full-resolution part (``FIRST_TERM``): the disjoint pixel block
    ``[tz*SZ, (tz+1)*SZ) x [th*BH*SH, (th+1)*BH*SH) x [tw*BW*SW, (tw+1)*BW*SW)``, visited as
    ``BH x BW`` sub-blocks: BCE sum (sigmoid mode), valid-pixel count (plane ``c == 0`` only)
    and non-finite count. Partials: ``part_ptr[pid] = (base_sum, sum P, sum Y)`` float64,
    ``cnt_ptr[pid] = (valid, nonfinite)`` int32.
    """
    local = tl.program_id(0)  # plane of this block
    plane = plane0 + local
    tz = tl.program_id(1) // TH
    th = tl.program_id(1) % TH
    tw = tl.program_id(2)
    n = plane // C
    c = plane % C
    xbase = x_ptr + n.to(tl.int64) * sxn + c.to(tl.int64) * sxc
    lbase = lab_ptr + n.to(tl.int64) * sln + c.to(tl.int64) * slc  # slc 0 for labels
    mbase = m_ptr + n.to(tl.int64) * smn
    oh = th * BH + tl.arange(0, BH)[:, None]
    ow = tw * BW + tl.arange(0, BW)[None, :]
    omask = _masked_by(tz < z, (oh < h) & (ow < w))
    PZ: tl.constexpr = KZ // 2
    PH: tl.constexpr = KH // 2
    PW: tl.constexpr = KW // 2

    # ---- pooled P and Y ----
    if POOL == 2:
        # interp: Y nearest (PyTorch's float32 scale), P (tri/bi)linear, align_corners=True.
        near_z = tl.math.div_rn(tl.cast(Z, tl.float32), tl.cast(z, tl.float32))
        near_h = tl.math.div_rn(tl.cast(H, tl.float32), tl.cast(h, tl.float32))
        near_w = tl.math.div_rn(tl.cast(W, tl.float32), tl.cast(w, tl.float32))
        src_z = tl.minimum(tl.floor(tz.to(tl.float32) * near_z).to(tl.int32), Z - 1).to(tl.int64)
        src_h = tl.minimum(tl.floor(oh.to(tl.float32) * near_h).to(tl.int32), H - 1)
        src_w = tl.minimum(tl.floor(ow.to(tl.float32) * near_w).to(tl.int32), W - 1)
        y_out = _target(lbase + src_z * slz + src_h.to(tl.int64) * slh,
                        mbase + src_z * smz + src_h.to(tl.int64) * smh, src_w, omask, c, C,
                        ignore_index, slw, smw, TARGET, DT)[1]
        z0, z1, lz = _bilinear_source(tz, _linear_scale(Z, z, DT), Z, DT)
        h0, h1, lh = _bilinear_source(oh, _linear_scale(H, h, DT), H, DT)
        w0, w1, lw = _bilinear_source(ow, _linear_scale(W, w, DT), W, DT)
        p_out = tl.full([BH, BW], 0, DT)
        for dz in range(1 + VOLUME):
            iz = tl.where(dz == 0, z0, z1).to(tl.int64)
            wz = tl.where(dz == 0, 1.0 - lz, lz)
            for tap in range(4):
                ih = tl.where(tap // 2 == 0, h0, h1)
                iw = tl.where(tap % 2 == 0, w0, w1)
                wgt = tl.where(tap // 2 == 0, 1.0 - lh, lh) * tl.where(tap % 2 == 0, 1.0 - lw, lw)
                x = tl.load(xbase + iz * sxz + ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw,
                            mask=omask, other=0.0).to(DT)
                valid, y = _target(lbase + iz * slz + ih.to(tl.int64) * slh,
                                   mbase + iz * smz + ih.to(tl.int64) * smh, iw, omask, c, C,
                                   ignore_index, slw, smw, TARGET, DT)
                p = _pixel(x, valid, y, MODE).p
                if VOLUME:
                    p_out += (wz * wgt) * p
                else:
                    p_out += wgt * p
    else:
        # avg (count_include_pad: always / (KZ*KH*KW)) or max (-inf padding, first max wins).
        # Y too: region_mi's target may be < 0.
        if POOL == 1:
            p_out = tl.full([BH, BW], float("-inf"), DT)
            y_out = tl.full([BH, BW], float("-inf"), DT)
        else:
            p_out = tl.full([BH, BW], 0, DT)
            y_out = tl.full([BH, BW], 0, DT)
        arg = tl.full([BH, BW], 0, tl.int32)
        for kz in range(KZ):
            iz = tz * SZ - PZ + kz
            mz = _masked_by((iz >= 0) & (iz < Z), omask)
            iz64 = iz.to(tl.int64)
            for kh in range(KH):
                ih = oh * SH - PH + kh
                mh = mz & (ih >= 0) & (ih < H)
                xrow = xbase + iz64 * sxz + ih.to(tl.int64) * sxh
                lrow = lbase + iz64 * slz + ih.to(tl.int64) * slh
                mrow = mbase + iz64 * smz + ih.to(tl.int64) * smh
                for kw in range(KW):
                    iw = ow * SW - PW + kw
                    m = mh & (iw >= 0) & (iw < W)
                    x = tl.load(xrow + iw.to(tl.int64) * sxw, mask=m, other=0.0).to(DT)
                    valid, yv = _target(lrow, mrow, iw, m, c, C, ignore_index, slw, smw, TARGET,
                                        DT)
                    p = _pixel(x, valid, yv, MODE).p
                    if POOL == 1:
                        upd = m & (p > p_out)
                        p_out = tl.where(upd, p, p_out)
                        arg = tl.where(upd, (iz * H + ih) * W + iw, arg)
                        y_out = tl.where(m, tl.maximum(y_out, yv), y_out)
                    else:
                        p_out += tl.where(m, p, 0.0)
                        y_out += yv
        if POOL == 0:
            p_out = _exact_div(p_out, tl.full([BH, BW], KZ * KH * KW, DT))
            y_out = _exact_div(y_out, tl.full([BH, BW], KZ * KH * KW, DT))
    p_out = tl.where(omask, p_out, 0.0)
    y_out = tl.where(omask, y_out, 0.0)
    pooled_off = local.to(tl.int64) * z * h * w + (tz * h + oh) * w + ow
    if STORE_P:
        tl.store(pmap_ptr + pooled_off, p_out, mask=omask)
    if STORE_Y:
        tl.store(ymap_ptr + pooled_off, y_out, mask=omask)
    if STORE_ARGMAX:
        tl.store(amax_ptr + pooled_off, arg, mask=omask)
    pid = (local.to(tl.int64) * tl.num_programs(1) + tl.program_id(1)) * tl.num_programs(2) + tw
    tl.store(part_ptr + pid * 3 + 1, tl.sum(p_out).to(tl.float64))
    tl.store(part_ptr + pid * 3 + 2, tl.sum(y_out).to(tl.float64))

    # ---- full-resolution sums over this program's disjoint pixel block ----
    if FIRST_TERM:
        base = tl.full([BH, BW], 0, DT)
        n_valid = tl.full([BH, BW], 0, tl.int32)
        n_bad = tl.full([BH, BW], 0, tl.int32)
        for sz in range(SZ):
            iz = tz * SZ + sz
            iz64 = iz.to(tl.int64)
            for sh in range(SH):
                ih = (th * SH + sh) * BH + tl.arange(0, BH)[:, None]
                xrow = xbase + iz64 * sxz + ih.to(tl.int64) * sxh
                lrow = lbase + iz64 * slz + ih.to(tl.int64) * slh
                mrow = mbase + iz64 * smz + ih.to(tl.int64) * smh
                for sw in range(SW):
                    iw = (tw * SW + sw) * BW + tl.arange(0, BW)[None, :]
                    m = _masked_by(iz < Z, (ih < H) & (iw < W))
                    x = tl.load(xrow + iw.to(tl.int64) * sxw, mask=m, other=0.0).to(DT)
                    n_bad += (m & ((x != x) | (tl.abs(x) == float("inf")))).to(tl.int32)
                    if MODE == 0:
                        valid, y = _target(lrow, mrow, iw, m, c, C, ignore_index, slw, smw,
                                           TARGET, DT)
                        base += _pixel(x, valid, y, MODE).bce
                        n_valid += valid.to(tl.int32)
        tl.store(part_ptr + pid * 3, tl.sum(base).to(tl.float64))
        n_valid_sum = tl.sum(n_valid)
        tl.store(cnt_ptr + pid * 2, tl.where(c == 0, n_valid_sum, 0))
        tl.store(cnt_ptr + pid * 2 + 1, tl.sum(n_bad))


# ================================================================================================
# Stage (b): moment_sums on the pooled maps
# ================================================================================================

@triton.jit(do_not_specialize=["C", "z", "h", "w", "ignore_index", "CHUNKS"])
def _moment_sums_kernel(pmap_ptr, ymap_ptr, x_ptr, lab_ptr, m_ptr, off_ptr, raw_ptr, sums_ptr,
                        C, z, h, w, sxn, sxc, sxz, sxh, sxw, sln, slc, slz, slh, slw, smn, smz,
                        smh, smw, ignore_index, CHUNKS, RZ: tl.constexpr, RH: tl.constexpr,
                        RW: tl.constexpr, D: tl.constexpr, NB: tl.constexpr,
                        Y_FROM_LABELS: tl.constexpr, P_FROM_LOGITS: tl.constexpr,
                        MODE: tl.constexpr, TARGET: tl.constexpr, DT: tl.constexpr,
                        BD: tl.constexpr, BK: tl.constexpr):
    """Grid ``(N*C, NB*NB, KS)``: plane, offset-block pair ``(ib, jb)`` of ``BD`` offsets each,
    and split ``ks`` of the ``K`` windows (``CHUNKS`` chunks of ``BK`` windows per split) of the
    ``[z, h, w]`` pooled map, regions ``RZ x RH x RW`` (``D`` offsets, :func:`_region_offset`).

    For each chunk, gathers the ``[BD, BK]`` region-vector tiles of offsets ``i`` and ``j`` minus
    the plane offset ``off`` (the plane mean, so the raw sums do not cancel) and accumulates their
    ``tl.dot`` products (no pooling: ``P`` and ``Y`` recomputed from the logits and labels, in
    ``DT`` as stage (a) would store them). float64 throughout, also for float32 maps: float32
    products are exact in float64, while float32 partials measurably degraded the gradient on
    small, ill-conditioned maps (1e-4 relative vs 2e-6). Writes this split's raw product sums ``raw [N*C, KS, 3, D, D]``
    (``Sy``, ``Sp`` only computed for ``jb >= ib`` and stored to both halves; ``B`` for all) and,
    for ``jb == 0``, the region-vector sums ``sums [N*C, KS, 2, D]``. Centring is done on the host.
    """
    plane = tl.program_id(0)
    blk = tl.program_id(1)
    split = tl.program_id(2)
    ib = blk // NB
    jb = blk % NB
    n = plane // C
    c = plane % C
    sym = jb >= ib
    gi = ib * BD + tl.arange(0, BD)
    gj = jb * BD + tl.arange(0, BD)
    mi = gi < D
    mj = gj < D
    dzi, dyi, dxi = _region_offset(gi[:, None], RH, RW)
    dzj, dyj, dxj = _region_offset(gj[:, None], RH, RW)
    off_y = tl.load(off_ptr + plane.to(tl.int64) * 2)
    off_p = tl.load(off_ptr + plane.to(tl.int64) * 2 + 1)
    pplane = pmap_ptr + plane.to(tl.int64) * z * h * w
    yplane = ymap_ptr + plane.to(tl.int64) * z * h * w
    lbase = lab_ptr + n.to(tl.int64) * sln + c.to(tl.int64) * slc
    mbase = m_ptr + n.to(tl.int64) * smn
    xbase = x_ptr + n.to(tl.int64) * sxn + c.to(tl.int64) * sxc
    nw = w - RW + 1
    nhw = (h - RH + 1) * nw
    K = (z - RZ + 1) * nhw
    s_yy = tl.full([BD, BD], 0, tl.float64)
    s_pp = tl.full([BD, BD], 0, tl.float64)
    s_yp = tl.full([BD, BD], 0, tl.float64)
    sum_yi = tl.full([BD], 0, tl.float64)
    sum_pi = tl.full([BD], 0, tl.float64)
    k_begin = split * CHUNKS * BK
    k_end = tl.minimum(K, k_begin + CHUNKS * BK)
    for k0 in range(_loop_bound(k_begin), _loop_bound(k_end), BK):
        kk = k0 + tl.arange(0, BK)
        mk = (kk < k_end)[None, :]
        e = (kk // nhw)[None, :]  # window start (e, a, b)
        a = ((kk // nw) % (h - RH + 1))[None, :]
        b = (kk % nw)[None, :]
        m_i = mi[:, None] & mk
        m_j = mj[:, None] & mk
        yi = _load_y(yplane, lbase, mbase, e + dzi, a + dyi, b + dxi, m_i, h, w, c, C,
                     ignore_index, slz, slh, slw, smz, smh, smw, Y_FROM_LABELS, TARGET,
                     DT).to(tl.float64)
        pi = _load_p(pplane, xbase, lbase, mbase, e + dzi, a + dyi, b + dxi, m_i, h, w, c, C,
                     ignore_index, sxz, sxh, sxw, slz, slh, slw, smz, smh, smw, P_FROM_LOGITS,
                     MODE, TARGET, DT).to(tl.float64)
        yj = _load_y(yplane, lbase, mbase, e + dzj, a + dyj, b + dxj, m_j, h, w, c, C,
                     ignore_index, slz, slh, slw, smz, smh, smw, Y_FROM_LABELS, TARGET,
                     DT).to(tl.float64)
        pj = _load_p(pplane, xbase, lbase, mbase, e + dzj, a + dyj, b + dxj, m_j, h, w, c, C,
                     ignore_index, sxz, sxh, sxw, slz, slh, slw, smz, smh, smw, P_FROM_LOGITS,
                     MODE, TARGET, DT).to(tl.float64)
        yi = tl.where(m_i, yi - off_y, 0.0)
        pi = tl.where(m_i, pi - off_p, 0.0)
        yj = tl.where(m_j, yj - off_y, 0.0)
        pj = tl.where(m_j, pj - off_p, 0.0)
        if P_FROM_LOGITS:
            # float64 tl.dot of operands computed from 16/32-bit loads fails in triton 3.6's
            # MMAv2 lowering on sm_80 ("fp64 don't support largeK MMA"): broadcast products.
            s_yp += tl.sum(yi[:, None, :] * pj[None, :, :], 2)
        else:
            s_yp = tl.dot(yi, tl.trans(pj), s_yp, input_precision="ieee", out_dtype=tl.float64)
        if sym:
            s_yy = tl.dot(yi, tl.trans(yj), s_yy, input_precision="ieee", out_dtype=tl.float64)
            if P_FROM_LOGITS:
                s_pp += tl.sum(pi[:, None, :] * pj[None, :, :], 2)
            else:
                s_pp = tl.dot(pi, tl.trans(pj), s_pp, input_precision="ieee",
                              out_dtype=tl.float64)
        sum_yi += tl.sum(yi, 1)
        sum_pi += tl.sum(pi, 1)
    raw_base = raw_ptr + (plane.to(tl.int64) * tl.num_programs(2) + split) * 3 * D * D
    ii = gi[:, None]
    jj = gj[None, :]
    m2 = mi[:, None] & mj[None, :]
    tl.store(raw_base + 2 * D * D + ii * D + jj, s_yp, mask=m2)
    if sym:
        upper = m2 & (ii <= jj)
        tl.store(raw_base + ii * D + jj, s_yy, mask=upper)
        tl.store(raw_base + jj * D + ii, s_yy, mask=upper)
        tl.store(raw_base + D * D + ii * D + jj, s_pp, mask=upper)
        tl.store(raw_base + D * D + jj * D + ii, s_pp, mask=upper)
    if jb == 0:
        sums_base = sums_ptr + (plane.to(tl.int64) * tl.num_programs(2) + split) * 2 * D
        tl.store(sums_base + gi, sum_yi, mask=mi)
        tl.store(sums_base + D + gi, sum_pi, mask=mi)


# ================================================================================================
# Stage (d): pooled_grad_stencil
# ================================================================================================

@triton.jit(do_not_specialize=["NPL", "C", "z", "h", "w", "ignore_index", "plane0"])
def _pooled_grad_stencil_kernel(
        pmap_ptr, ymap_ptr, x_ptr, lab_ptr, m_ptr, coef_ptr, shift_ptr, lse_ptr, scale_ptr, g_ptr,
        NPL, C, z, h, w, sxn, sxc, sxz, sxh, sxw, sln, slc, slz, slh, slw, smn, smz, smh, smw,
        son, soc, soz, soh, sow, ignore_index, plane0, RZ: tl.constexpr, RH: tl.constexpr,
        RW: tl.constexpr, D: tl.constexpr, Y_FROM_LABELS: tl.constexpr,
        P_FROM_LOGITS: tl.constexpr, FUSE_GRAD: tl.constexpr, MODE: tl.constexpr,
        TARGET: tl.constexpr, DT: tl.constexpr, BJ: tl.constexpr, BLOCK: tl.constexpr):
    """Grid ``(NPL * cdiv(z*h*w, BLOCK),)``, planes fastest (``NPL`` planes ``plane0 ...`` of the
    ``N*C``, whose maps ``P``, ``Y`` and ``G`` hold these planes only; a 1-D grid has no 65535
    limit): ``dloss/dP`` at ``BLOCK`` pooled pixels ``u`` of one plane (``[z, h, w]``, ``z`` 1
    for 2-D maps; regions ``RZ x RH x RW``, :func:`_region_offset`).

    ``G[u] = sum_i [window u - o_i valid] (c_i + sum_j Cp[i,j] P[u-o_i+o_j] + Cy[i,j] Y[...])``,
    accumulated in float64 (``j`` vectorised in blocks of ``BJ``), stored in ``DT`` to ``g_ptr``
    (``[NPL, z, h, w]``). No pooling (``P_FROM_LOGITS``, ``Y_FROM_LABELS``): ``P``/``Y``
    recomputed from the logits and labels. ``FUSE_GRAD`` (no pooling only, where pooled pixel
    ``u`` is pixel ``u``): stage (e) too, ``grad = G * dP/dx + base_scale * first-term grad`` as
    :func:`_full_res_grad_kernel` computes it from ``G`` rounded to ``DT``, written to ``g_ptr``
    with the gradient's strides ``so*``: no full-size map of ``G``.
    """
    local = tl.program_id(0) % NPL  # plane of this block
    plane = plane0 + local
    u = (tl.program_id(0) // NPL) * BLOCK + tl.arange(0, BLOCK)
    n = plane // C
    c = plane % C
    mu = u < z * h * w
    uz = u // (h * w)
    ua = (u // w) % h
    ub = u % w
    pplane = pmap_ptr + local.to(tl.int64) * z * h * w
    yplane = ymap_ptr + local.to(tl.int64) * z * h * w
    lbase = lab_ptr + n.to(tl.int64) * sln + c.to(tl.int64) * slc
    mbase = m_ptr + n.to(tl.int64) * smn
    xbase = x_ptr + n.to(tl.int64) * sxn + c.to(tl.int64) * sxc
    cp_base = coef_ptr + plane.to(tl.int64) * 2 * D * D
    cy_base = cp_base + D * D
    # Summed over i and j elementwise; one reduction over the j axis at the end.
    acc = tl.full([BJ, BLOCK], 0, tl.float64)
    acc_shift = tl.full([BLOCK], 0, tl.float64)
    for i in range(D):
        oz, oy, ox = _region_offset(i, RH, RW)
        we = uz - oz  # window start (we, wa, wb)
        wa = ua - oy
        wb = ub - ox
        wv = (mu & (we >= 0) & (we <= z - RZ) & (wa >= 0) & (wa <= h - RH) & (wb >= 0)
              & (wb <= w - RW))
        acc_shift += tl.where(wv, tl.load(shift_ptr + plane.to(tl.int64) * D + i), 0.0)
        for j0 in range(0, D, BJ):
            jj = j0 + tl.arange(0, BJ)
            mj = jj < D
            cp = tl.load(cp_base + i * D + jj, mask=mj, other=0.0)[:, None]
            cy = tl.load(cy_base + i * D + jj, mask=mj, other=0.0)[:, None]
            jz, jy, jx = _region_offset(jj[:, None], RH, RW)
            zs = we[None, :] + jz
            rows = wa[None, :] + jy
            cols = wb[None, :] + jx
            m2 = mj[:, None] & wv[None, :]  # invalid windows and offsets load 0
            pv = _load_p(pplane, xbase, lbase, mbase, zs, rows, cols, m2, h, w, c, C,
                         ignore_index, sxz, sxh, sxw, slz, slh, slw, smz, smh, smw,
                         P_FROM_LOGITS, MODE, TARGET, DT).to(tl.float64)
            yv = _load_y(yplane, lbase, mbase, zs, rows, cols, m2, h, w, c, C, ignore_index,
                         slz, slh, slw, smz, smh, smw, Y_FROM_LABELS, TARGET, DT).to(tl.float64)
            acc += cp * pv + cy * yv
    g = tl.sum(acc, 0) + acc_shift
    if FUSE_GRAD:
        uz64 = uz.to(tl.int64)
        ua64 = ua.to(tl.int64)
        ub64 = ub.to(tl.int64)
        x = tl.load(xbase + uz64 * sxz + ua64 * sxh + ub64 * sxw, mask=mu, other=0.0).to(DT)
        valid, y = _target(lbase + uz64 * slz + ua64 * slh, mbase + uz64 * smz + ua64 * smh, ub,
                           mu, c, C, ignore_index, slw, smw, TARGET, DT)
        lse_row = lse_ptr + n.to(tl.int64) * (1 + TARGET) * z * h * w  # lse, then sum_c Y_c
        grad = _full_res_grad_value(g.to(DT), x, valid, y, lse_row + u, z * h * w, mu,
                                    scale_ptr, MODE, TARGET)
        tl.store(g_ptr + n.to(tl.int64) * son + c.to(tl.int64) * soc + uz64 * soz + ua64 * soh
                 + ub64 * sow, grad.to(g_ptr.dtype.element_ty), mask=mu)
    else:
        tl.store(g_ptr + local.to(tl.int64) * z * h * w + u, g.to(DT), mask=mu)


# ================================================================================================
# Stage (e): pool_adjoint + full_res_grad
# ================================================================================================

@triton.jit(do_not_specialize=["C", "Z", "H", "W", "z", "h", "w", "TH", "ignore_index",
                               "plane0"])
def _full_res_grad_kernel(x_ptr, lab_ptr, m_ptr, g_ptr, amax_ptr, lse_ptr, scale_ptr, out_ptr,
                          C, Z, H, W, z, h, w, TH, sxn, sxc, sxz, sxh, sxw, sln, slc, slz, slh,
                          slw, smn, smz, smh, smw, son, soc, soz, soh, sow, ignore_index, plane0,
                          SZ: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
                          KZ: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
                          VOLUME: tl.constexpr, POOL: tl.constexpr, MODE: tl.constexpr,
                          TARGET: tl.constexpr, WIDE: tl.constexpr, DT: tl.constexpr,
                          BH: tl.constexpr, BW: tl.constexpr):
    """Grid ``(planes, Z * TH, cdiv(W, BW))``, ``TH = cdiv(H, BH)``: ``grad_logits`` of a
    ``BH x BW`` pixel tile of slice ``iz = program_id(1) // TH`` of plane ``plane0 +
    program_id(0)``, from ``dloss/dP`` (``g_ptr``, ``[planes, z, h, w]``) and the arg-max map
    of these ``planes`` only.

    ``grad = adjoint(G) * dP/dx + base_scale * first-term grad`` where the pooling adjoint gathers
    from the pooled outputs whose window holds the pixel (avg: ``1/(KZ*KH*KW)``; max: where the
    stored arg-max is this pixel; interp: (tri/bi)linear weights, at most 3 candidates per axis
    (one in depth unless ``VOLUME``), around ``ih * (h - 1) // (H - 1)``, computed in int64 when
    ``WIDE``, else int32).
    """
    local = tl.program_id(0)  # plane of this block
    plane = plane0 + local
    n = plane // C
    c = plane % C
    iz = tl.program_id(1) // TH
    ih = (tl.program_id(1) % TH) * BH + tl.arange(0, BH)[:, None]
    iw = tl.program_id(2) * BW + tl.arange(0, BW)[None, :]
    m = (ih < H) & (iw < W)
    iz64 = iz.to(tl.int64)
    ih64 = ih.to(tl.int64)
    iw64 = iw.to(tl.int64)
    x = tl.load(x_ptr + n.to(tl.int64) * sxn + c.to(tl.int64) * sxc + iz64 * sxz + ih64 * sxh
                + iw64 * sxw, mask=m, other=0.0).to(DT)
    valid, y = _target(lab_ptr + n.to(tl.int64) * sln + c.to(tl.int64) * slc + iz64 * slz
                       + ih64 * slh, m_ptr + n.to(tl.int64) * smn + iz64 * smz + ih64 * smh, iw,
                       m, c, C, ignore_index, slw, smw, TARGET, DT)
    gplane = g_ptr + local.to(tl.int64) * z * h * w
    PZ: tl.constexpr = KZ // 2
    PH: tl.constexpr = KH // 2
    PW: tl.constexpr = KW // 2
    gp = tl.full([BH, BW], 0, DT)
    if POOL == 2:
        lin_z = _linear_scale(Z, z, DT)
        lin_h = _linear_scale(H, h, DT)
        lin_w = _linear_scale(W, w, DT)
        if WIDE:  # ih * (h - 1) past 2^31: int64 (a 64-bit division costs ~40 registers)
            cz = ((iz64 * (z - 1)) // tl.maximum(Z - 1, 1)).to(tl.int32)
            ch = ((ih64 * (h - 1)) // tl.maximum(H - 1, 1)).to(tl.int32)
            cw = ((iw64 * (w - 1)) // tl.maximum(W - 1, 1)).to(tl.int32)
        else:
            cz = (iz * (z - 1)) // tl.maximum(Z - 1, 1)
            ch = (ih * (h - 1)) // tl.maximum(H - 1, 1)
            cw = (iw * (w - 1)) // tl.maximum(W - 1, 1)
        for tz in range(1 + 2 * VOLUME):
            oz = cz - VOLUME + tz
            wz = _bilinear_weight(oz, iz, lin_z, Z, DT)
            vz = (oz >= 0) & (oz < z)
            for th in range(3):
                oh = ch - 1 + th
                wh = _bilinear_weight(oh, ih, lin_h, H, DT)
                vh = _masked_by(vz, (oh >= 0) & (oh < h))
                if VOLUME:
                    wh = wz * wh
                for tw in range(3):
                    ow = cw - 1 + tw
                    ww = _bilinear_weight(ow, iw, lin_w, W, DT)
                    mm = m & vh & (ow >= 0) & (ow < w)
                    g = tl.load(gplane + (oz * h + oh) * w + ow, mask=mm, other=0.0).to(DT)
                    gp += tl.where(mm, wh * ww * g, 0.0)
    else:
        qz = (iz + PZ) // SZ
        qh = (ih + PH) // SH
        qw = (iw + PW) // SW
        for tz in range((KZ + SZ - 1) // SZ):
            oz = qz - tz
            vz = (oz >= 0) & (oz < z) & (iz < oz * SZ - PZ + KZ)
            for th in range((KH + SH - 1) // SH):
                oh = qh - th
                vh = _masked_by(vz, (oh >= 0) & (oh < h) & (ih < oh * SH - PH + KH))
                for tw in range((KW + SW - 1) // SW):
                    ow = qw - tw
                    mm = m & vh & (ow >= 0) & (ow < w) & (iw < ow * SW - PW + KW)
                    off = (oz * h + oh) * w + ow
                    g = tl.load(gplane + off, mask=mm, other=0.0).to(DT)
                    if POOL == 1:
                        idx = tl.load(amax_ptr + local.to(tl.int64) * z * h * w + off, mask=mm,
                                      other=-1)
                        g = tl.where(idx == (iz * H + ih) * W + iw, g, 0.0)
                    gp += g
        if POOL == 0:
            gp = _exact_div(gp, tl.full([BH, BW], KZ * KH * KW, DT))
    size = Z * H * W
    lse_row = lse_ptr + n.to(tl.int64) * (1 + TARGET) * size  # lse, then sum_c Y_c
    grad = _full_res_grad_value(gp, x, valid, y, lse_row + (iz * H + ih) * W + iw, size, m,
                                scale_ptr, MODE, TARGET)
    tl.store(out_ptr + n.to(tl.int64) * son + c.to(tl.int64) * soc + iz64 * soz + ih64 * soh
             + iw64 * sow, grad.to(out_ptr.dtype.element_ty), mask=m)


# ================================================================================================
# Probe
# ================================================================================================

@triton.jit
def _probe_kernel(out_ptr, BLOCK: tl.constexpr):
    """Writes ``1, 2, ..., BLOCK`` (float32) to ``out_ptr``: :func:`probe`'s tiny kernel."""
    offs = tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, offs.to(tl.float32) + 1.0)


# ================================================================================================
# Host side
# ================================================================================================

_TL_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64}

#: Tile and block sizes of the compiled kernels (CUDA), read by the host functions at each call:
#: benchmarks/gpu_check.py times candidates by replacing entries. Powers of two where a block
#: size is derived from them. Interpreted launches (CPU tensors) use fewer, larger blocks.
#: ``lse`` (:func:`_first_term_lse_kernel`): channels ``BC`` and pixels ``BP`` per block.
#: ``main_pass`` (:func:`_first_term_and_pooled_maps_kernel`): pooled outputs per tile
#: (``pixels``), at most ``BW`` wide. ``moment`` (:func:`_moment_sums_kernel`): ``BK`` windows per
#: chunk, ``BD`` offsets per block, window splits until ``programs`` programs (each with at least
#: ``min_chunks`` chunks). ``stencil`` (:func:`_pooled_grad_stencil_kernel`): ``BJ`` offsets ``j``
#: per step, ``BJ * BLOCK <= elements``. ``grad`` (:func:`_full_res_grad_kernel`): pixels per
#: tile, at most ``BW`` wide.
TILES = {
    "lse": {"BC": 16, "BP": 128},
    "main_pass": {"pixels": 512, "BW": 32},
    "moment": {"BK": 32, "BD": 16, "programs": 2048, "min_chunks": 8},
    "stencil": {"BJ": 32, "elements": 2048, "num_warps": 8},
    "grad": {"pixels": 1024, "BW": 64, "num_warps": 8},
}


def _collect_interpreter_garbage():
    """Interpreted (CPU tensors): the interpreter leaves each launch's arguments in reference
    cycles, which would keep the storages of dropped maps alive until the next cyclic garbage
    collection; collect them, so that CPU memory follows the compiled plan (no full-size map but
    the gradient at stride 1, maps of the pooled size otherwise)."""
    if _INTERPRETED:
        gc.collect()


def _pow2(x, cap):
    return min(triton.next_power_of_2(max(int(x), 1)), cap)


#: Index arithmetic: whatever scales with the plane, image or program index (plane offsets
#: ``n*sxn + c*sxc``, ``plane*h*w`` into the maps, partial-sum rows) is int64, so tensors of any
#: size (past 2^31 elements) are addressed correctly; offsets inside one image plane (``ih*W +
#: iw``, the arg-max map, pooled and window indices, and block starts that overshoot the plane
#: by at most a block) stay int32, hence at most ``_MAX_PLANE`` pixels per image plane.
_MAX_PLANE = 2**30
_MAX_GRID = (2**31 - 1, 65535, 65535)  # CUDA's launch grid limits


class Geometry(NamedTuple):
    """A problem's sizes and options on three spatial axes ``(depth, height, width)``, as the
    kernels take them: 2-D maps are volumes of depth 1 (radius, stride and pool size 1 on that
    axis). From :meth:`RMIConfig.for_rank` and :meth:`RMIConfig.pooled_size` (the shape rules
    every backend shares)."""
    size: tuple  # (Z, H, W) full resolution
    pooled: tuple  # (z, h, w) after downsampling (== size without pooling)
    radius: tuple  # (RZ, RH, RW) region sides
    stride: tuple  # (SZ, SH, SW); all 1 without pooling
    pool_size: tuple  # (KZ, KH, KW) pool windows; all 1 without pooling
    pool: int  # POOL: _POOL_IDS[cfg.pool], or 0 (avg over 1 pixel) without pooling
    pools: bool  # whether the maps are downsampled (else P/Y are recomputed, never stored)
    volume: int  # 1 for 3-D logits [N, C, D, H, W] (depth taps in interp), else 0
    dim: int  # d, the length of a region vector
    windows: int  # K, the regions per plane

    @property
    def pixels(self) -> int:
        """Full-resolution pixels per plane, ``Z*H*W``."""
        return math.prod(self.size)

    @property
    def pooled_pixels(self) -> int:
        """Pooled pixels per plane, ``z*h*w``."""
        return math.prod(self.pooled)


def _geometry(logits, cfg) -> Geometry:
    """:class:`Geometry` of ``logits [N, C, H, W]`` or ``[N, C, D, H, W]`` under ``cfg``."""
    spatial = tuple(logits.shape[2:])
    cfg = cfg.for_rank(len(spatial))
    pad = (1,) * (3 - len(spatial))
    pooled = pad + tuple(cfg.pooled_size(*spatial))
    radius = pad + tuple(cfg.radii)
    if cfg.pools:
        stride, pool_size, pool = pad + cfg.strides, pad + cfg.pool_sizes, _POOL_IDS[cfg.pool]
    else:
        stride, pool_size, pool = (1, 1, 1), (1, 1, 1), 0
    return Geometry(pad + spatial, pooled, radius, stride, pool_size, pool, cfg.pools,
                    int(len(spatial) == 3), math.prod(radius),
                    math.prod(p - r + 1 for p, r in zip(pooled, radius)))


def _volume_view(t, axis):
    """``t`` with a depth axis of size 1 inserted at ``axis`` if it is a 2-D map (``axis`` 2
    for logits ``[N, C, H, W]``, 1 for a label map ``[N, H, W]``), else ``t``: the kernels
    address every map as a volume."""
    return t.unsqueeze(axis) if t.dim() == axis + 2 else t


#: Index arithmetic: whatever scales with the plane, image or program index (plane offsets
#: ``n*sxn + c*sxc``, ``plane*z*h*w`` into the maps, partial-sum rows) is int64, so tensors of
#: any size (past 2^31 elements) are addressed correctly; offsets inside one image plane or
#: volume (``(iz*H + ih)*W + iw``, the arg-max map, pooled and window indices, and block starts
#: that overshoot the plane by at most a block) stay int32, hence at most ``_MAX_PLANE`` pixels
#: per image plane (or volume).
_MAX_PLANE = 2**30
_MAX_GRID = (2**31 - 1, 65535, 65535)  # CUDA's launch grid limits


def _check_plane(logits):
    spatial = tuple(logits.shape[2:])
    pixels = math.prod(spatial)
    if pixels >= _MAX_PLANE:
        what = "an image plane" if len(spatial) == 2 else "a volume"
        raise ValueError(f"rmi_loss backend 'triton': {what} of {' x '.join(map(str, spatial))} "
                         f"= {pixels} pixels (logits of shape {tuple(logits.shape)}) is too "
                         f"large, the limit is {_MAX_PLANE - 1} pixels per plane")


def _checked_grid(grid, t, what):
    """``grid``, or a ValueError naming the sizes when it exceeds CUDA's launch limits."""
    if any(g > limit for g, limit in zip(grid, _MAX_GRID)):
        raise ValueError(f"rmi_loss backend 'triton': the {what} kernel for a tensor of shape "
                         f"{tuple(t.shape)} needs a launch grid {grid}, beyond CUDA's limits "
                         f"{_MAX_GRID[:len(grid)]}")
    return grid


class TargetArgs(NamedTuple):
    """The target as the kernels read it (:func:`_target`), with a depth axis (1 for 2-D)."""
    values: torch.Tensor  # labels [N, Z, H, W], or a float target's values [N, C, Z, H, W]
    mask: torch.Tensor  # a float target's mask [N, Z, H, W] (a zero-stride view of ones when
    #                     it has none); the labels again for labels (never read)
    strides: tuple  # sln, slc, slz, slh, slw, smn, smz, smh, smw (slc 0 for labels)
    kind: int  # TARGET: 0 labels, 1 a float target


def _target_args(labels) -> TargetArgs:
    """:class:`TargetArgs` of a label map (``[N, *spatial]``) or a
    :class:`~rmi_ext.targets.FloatTarget`."""
    if not isinstance(labels, FloatTarget):
        labels = _volume_view(labels, 1)
        sln, slz, slh, slw = labels.stride()
        return TargetArgs(labels, labels, (sln, 0, slz, slh, slw, 0, 0, 0, 0), 0)
    values = _volume_view(labels.values, 2)
    mask = labels.mask
    if mask is None:
        n, _, *spatial = values.shape
        mask = torch.ones((), dtype=torch.bool, device=values.device).expand(n, *spatial)
    mask = _volume_view(mask, 1)
    return TargetArgs(values, mask, (*values.stride(), *mask.stride()), 1)


class LogSumExp(NamedTuple):
    """Softmax mode, stage (a): :func:`_first_term_lse`."""
    lse: torch.Tensor  # [N, Z*H*W] (a float target: [N, 2, Z*H*W], then sum_c Y_c), compute
    #                    dtype (or a [1] placeholder)
    ce_partials: torch.Tensor  # [programs, 2] float64: (sum CE, valid count) (or [1])


def _first_term_lse(logits, target: TargetArgs, cfg, *, store_lse, ce_sums) -> LogSumExp:
    """Softmax mode: the per-pixel log-sum-exp (``store_lse``) and the CE partial sums of the
    first term (``ce_sums``)."""
    x = _volume_view(logits, 2)
    n, c, *size = x.shape
    pixels = math.prod(size)
    dt = _compute_dtype(logits)
    bc = _pow2(c, TILES["lse"]["BC"])
    bp = _pow2(pixels, 4096 if _INTERPRETER_BLOCKS else TILES["lse"]["BP"])
    grid = _checked_grid((triton.cdiv(pixels, bp), n), logits, "logsumexp")
    shape = (n, pixels) if target.kind == 0 else (n, 2, pixels)
    lse = torch.empty(shape if store_lse else (1,), dtype=dt, device=logits.device)
    part = torch.empty((grid[0] * grid[1], 2) if ce_sums else (1,), dtype=torch.float64,
                       device=logits.device)
    _first_term_lse_kernel[grid](
        x, target.values, target.mask, lse, part, c, *size, *x.stride(), *target.strides,
        cfg.ignore_index, STORE_LSE=store_lse, CE_SUMS=ce_sums, TARGET=target.kind,
        DT=_TL_DTYPES[dt], BC=bc, BP=bp)
    return LogSumExp(lse, part)


class PooledMaps(NamedTuple):
    """Stage (a) on a block of planes: :func:`_first_term_and_pooled_maps`."""
    p: torch.Tensor  # [planes, *pooled], compute dtype (when pooling; else a [1] placeholder)
    y: torch.Tensor  # [planes, *pooled], compute dtype (when pooling; else a [1] placeholder)
    argmax: torch.Tensor  # [planes, *pooled] int32, flat index (iz*H + ih)*W + iw (max pool;
    #                       else [1])
    partial_sums: torch.Tensor  # [programs, 3] float64: (first-term sum, sum P, sum Y)
    counts: torch.Tensor  # [programs, 2] int32: (valid pixels, non-finite logits)


def _first_term_and_pooled_maps(logits, target: TargetArgs, cfg, *, first_term, store_argmax,
                                planes=None) -> PooledMaps:
    """Stage (a) on ``planes`` (a ``range`` of the ``N*C`` planes; default all): pooled ``P``
    and ``Y`` (stored when pooling; without, the later stages recompute them from the logits
    and labels), the arg-max map (``store_argmax``), and per-program partial sums, the first
    term's included when ``first_term``."""
    geo = _geometry(logits, cfg)
    x = _volume_view(logits, 2)
    n, c = x.shape[:2]
    planes = range(n * c) if planes is None else planes
    (zd, hgt, wid), (pz, ph, pw), (sz, sh, sw) = geo.size, geo.pooled, geo.stride
    dt = _compute_dtype(logits)
    cap = 4096 if _INTERPRETER_BLOCKS else TILES["main_pass"]["pixels"]
    bw = _pow2(pw, 64 if _INTERPRETER_BLOCKS else TILES["main_pass"]["BW"])
    bh = _pow2(ph, max(1, cap // bw))
    tz = max(pz, triton.cdiv(zd, sz))
    th = max(triton.cdiv(ph, bh), triton.cdiv(hgt, bh * sh))
    tw = max(triton.cdiv(pw, bw), triton.cdiv(wid, bw * sw))
    grid = _checked_grid((len(planes), tz * th, tw), logits, "main pass")
    dev = logits.device
    maps = (len(planes), *cfg.pooled_size(*logits.shape[2:]))
    pmap = torch.empty(maps if geo.pools else (1,), dtype=dt, device=dev)
    ymap = torch.empty(maps if geo.pools else (1,), dtype=dt, device=dev)
    amax = torch.empty(maps if store_argmax else (1,), dtype=torch.int32, device=dev)
    programs = len(planes) * tz * th * tw
    part = torch.zeros((programs, 3), dtype=torch.float64, device=dev)
    cnt = torch.zeros((programs, 2), dtype=torch.int32, device=dev)
    _first_term_and_pooled_maps_kernel[grid](
        x, target.values, target.mask, pmap, ymap, amax, part, cnt, c, *geo.size, *geo.pooled,
        th, *x.stride(), *target.strides, cfg.ignore_index, planes.start, SZ=sz, SH=sh, SW=sw,
        KZ=geo.pool_size[0], KH=geo.pool_size[1], KW=geo.pool_size[2], VOLUME=geo.volume,
        POOL=geo.pool, MODE=_MODE_IDS[cfg.mode], FIRST_TERM=first_term, STORE_P=geo.pools,
        STORE_Y=geo.pools, STORE_ARGMAX=store_argmax, TARGET=target.kind, DT=_TL_DTYPES[dt],
        BH=bh, BW=bw)
    return PooledMaps(pmap, ymap, amax, part, cnt)


class Moments(NamedTuple):
    """Stage (b): :func:`_moment_sums`."""
    means: torch.Tensor  # [N, C, 2, d] float64: means of the Y and P region vectors
    cov: torch.Tensor  # [N, C, 3, d, d] float64: centred (YY, PP, YP) product sums


def _moment_sums(logits, pmap, ymap, target: TargetArgs, offsets, cfg, tiling=None) -> Moments:
    """Stage (b) from the pooled maps of :func:`_first_term_and_pooled_maps` on all planes
    (no pooling: placeholders, ``P``/``Y`` come from ``logits``/``labels``).

    ``offsets [N*C, 2]`` (``off_y, off_p``) are subtracted before the products; the raw sums of
    the ``KS`` window splits are added and centred here, in float64. ``tiling = (BK, KS)``
    overrides the heuristic (tests).
    """
    geo = _geometry(logits, cfg)
    x = _volume_view(logits, 2)
    n, c = x.shape[:2]
    d, windows = geo.dim, geo.windows
    tiles = TILES["moment"]
    bd = 16 if _INTERPRETER_BLOCKS else tiles["BD"]
    nb = triton.cdiv(d, bd)
    if tiling is not None:
        bk, splits = tiling
    elif _INTERPRETER_BLOCKS:  # one chunk per program: the interpreter pays per op
        bk, splits = _pow2(windows, 4096), 1
    else:  # enough programs to fill the GPU, each with at least 8 chunks, partials <= 64 MiB
        bk = tiles["BK"]
        chunks_total = triton.cdiv(windows, bk)
        splits = min(triton.cdiv(tiles["programs"], n * c * nb * nb),
                     triton.cdiv(chunks_total, tiles["min_chunks"]),
                     max(1, (64 << 20) // (n * c * 3 * d * d * 8)))
        splits = max(splits, 1)
    chunks = triton.cdiv(triton.cdiv(windows, bk), splits)
    splits = triton.cdiv(triton.cdiv(windows, bk), chunks)
    dev = logits.device
    raw = torch.empty((n * c, splits, 3, d, d), dtype=torch.float64, device=dev)
    sums = torch.empty((n * c, splits, 2, d), dtype=torch.float64, device=dev)
    rz, rh, rw = geo.radius
    _moment_sums_kernel[_checked_grid((n * c, nb * nb, splits), logits, "moment")](
        pmap, ymap, x, target.values, target.mask, offsets, raw, sums, c, *geo.pooled,
        *x.stride(), *target.strides, cfg.ignore_index, chunks, RZ=rz, RH=rh, RW=rw, D=d, NB=nb,
        Y_FROM_LABELS=not geo.pools, P_FROM_LOGITS=not geo.pools, MODE=_MODE_IDS[cfg.mode],
        TARGET=target.kind, DT=_TL_DTYPES[_compute_dtype(logits)], BD=bd, BK=bk)
    raw, sums = raw.sum(dim=1), sums.sum(dim=1)  # [N*C, 3, d, d], [N*C, 2, d]
    s_y, s_p = sums.unbind(dim=1)
    outer = lambda u, v: u.unsqueeze(-1) * v.unsqueeze(-2)
    cov = raw - torch.stack((outer(s_y, s_y), outer(s_p, s_p), outer(s_y, s_p)), dim=1) / windows
    means = sums / windows + offsets.unsqueeze(-1)
    return Moments(means.view(n, c, 2, d), cov.view(n, c, 3, d, d))


def _pooled_grad_stencil(logits, pmap, ymap, target: TargetArgs, coef, shift, cfg, *, planes=None,
                         lse=None, scale=None, grad_out=None):
    """Stage (d) on ``planes`` (a ``range``; default all): ``dloss/dP [planes, *pooled]`` in
    the compute dtype, from the maps of :func:`_first_term_and_pooled_maps` on these planes (no
    pooling: from ``logits``/``labels``). With ``grad_out`` (no pooling, all planes): stages
    (d)+(e) in one kernel, writing ``grad_out`` (returned), from ``scale`` (the first term's
    weight, ``[1]`` float64) and ``lse`` (softmax mode)."""
    geo = _geometry(logits, cfg)
    x = _volume_view(logits, 2)
    n, c = x.shape[:2]
    planes = range(n * c) if planes is None else planes
    d, pooled = geo.dim, geo.pooled_pixels
    dt = _compute_dtype(logits)
    tiles = TILES["stencil"]
    if _INTERPRETER_BLOCKS:
        bj, block = _pow2(d, 128), _pow2(pooled, 4096)
    else:
        bj = _pow2(d, tiles["BJ"])
        block = _pow2(pooled, max(1, tiles["elements"] // bj))
    fused = grad_out is not None
    if fused:
        assert not geo.pools and len(planes) == n * c
        g = grad_out
        g_strides = _volume_view(grad_out, 2).stride()
    else:
        g = torch.empty((len(planes), *cfg.pooled_size(*logits.shape[2:])), dtype=dt,
                        device=logits.device)
        g_strides = (0,) * 5
    lse = shift if lse is None else lse  # read in softmax mode only
    scale = shift if scale is None else scale  # read when fused only
    grid = _checked_grid((len(planes) * triton.cdiv(pooled, block),), logits, "stencil")
    rz, rh, rw = geo.radius
    _pooled_grad_stencil_kernel[grid](
        pmap, ymap, x, target.values, target.mask, coef, shift, lse, scale, g, len(planes),
        c, *geo.pooled, *x.stride(), *target.strides, *g_strides, cfg.ignore_index,
        planes.start, RZ=rz, RH=rh, RW=rw, D=d, Y_FROM_LABELS=not geo.pools,
        P_FROM_LOGITS=not geo.pools, FUSE_GRAD=fused, MODE=_MODE_IDS[cfg.mode],
        TARGET=target.kind, DT=_TL_DTYPES[dt], BJ=bj, BLOCK=block, num_warps=tiles["num_warps"])
    return g


def _full_res_grad(logits, target: TargetArgs, g, argmax, lse, scale, grad_out, cfg, planes):
    """Stage (e) on ``planes`` (a ``range``): writes their planes of ``grad_out`` (the logits'
    shape, dtype and strides) from ``dloss/dP`` ``g [planes, *pooled]`` and the arg-max map
    (max pool) of these planes, ``lse [N, Z*H*W]`` (softmax mode, else ``None``) and
    ``scale``."""
    geo = _geometry(logits, cfg)
    x = _volume_view(logits, 2)
    (zd, hgt, wid), (pz, ph, pw) = geo.size, geo.pooled
    tiles = TILES["grad"]
    bw = _pow2(wid, 64 if _INTERPRETER_BLOCKS else tiles["BW"])
    bh = _pow2(hgt, max(1, (4096 if _INTERPRETER_BLOCKS else tiles["pixels"]) // bw))
    th = triton.cdiv(hgt, bh)
    grid = _checked_grid((len(planes), zd * th, triton.cdiv(wid, bw)), logits, "gradient")
    # interp: whether iz * (z - 1), ih * (h - 1) or iw * (w - 1) can pass int32 (padded rows
    # and columns included)
    wide = max((zd - 1) * (pz - 1), (th * bh - 1) * (ph - 1),
               (grid[2] * bw - 1) * (pw - 1)) >= 2**31
    sz, sh, sw = geo.stride
    kz, kh, kw = geo.pool_size
    _full_res_grad_kernel[grid](
        x, target.values, target.mask, g, argmax, g if lse is None else lse, scale,
        _volume_view(grad_out, 2), x.shape[1], *geo.size, *geo.pooled, th, *x.stride(),
        *target.strides, *_volume_view(grad_out, 2).stride(), cfg.ignore_index, planes.start,
        SZ=sz, SH=sh, SW=sw, KZ=kz, KH=kh, KW=kw, VOLUME=geo.volume, POOL=geo.pool,
        MODE=_MODE_IDS[cfg.mode], TARGET=target.kind, WIDE=geo.pool == 2 and wide,
        DT=_TL_DTYPES[g.dtype], BH=bh, BW=bw, num_warps=tiles["num_warps"])


#: When pooling, the backward runs stages (a), (d) and (e) on blocks of planes, so that the
#: pooled maps it holds (``P``, ``Y``, arg-max, ``dloss/dP``) take at most this fraction of the
#: logits' bytes (at least one plane), as the CUDA backend does: few, large blocks.
_BACKWARD_MAPS_FRACTION = 1 / 16


def _plane_blocks(logits, cfg) -> list:
    """The ``range``\\ s of planes the pooling backward runs one after another."""
    n, c = logits.shape[:2]
    geo = _geometry(logits, cfg)
    map_bytes = 3 * _compute_dtype(logits).itemsize + (4 if cfg.pool == "max" else 0)
    plane_bytes = geo.pooled_pixels * map_bytes
    budget = logits.numel() * logits.element_size() * _BACKWARD_MAPS_FRACTION
    size = max(1, int(budget // max(plane_bytes, 1)))
    return [range(p0, min(p0 + size, n * c)) for p0 in range(0, n * c, size)]


def _forward_impl(logits, labels, cfg):
    _check_plane(logits)
    n, c = logits.shape[:2]
    geo = _geometry(logits, cfg)
    target = _target_args(labels)
    maps = _first_term_and_pooled_maps(logits, target, cfg, first_term=True,
                                       store_argmax=False)
    if cfg.mode == "softmax":
        ce = _first_term_lse(logits, target, cfg, store_lse=False, ce_sums=True).ce_partials
        base_sum, base_count = ce[:, 0].sum(), ce[:, 1].sum()
    else:  # sigmoid mode; region mode has no first term (its sums are 0)
        base_sum = maps.partial_sums[:, 0].sum()
        base_count = maps.counts[:, 0].sum(dtype=torch.int64).double()
    nonfinite = maps.counts[:, 1].sum(dtype=torch.int64)
    # Plane means of the pooled maps: the moment kernel subtracts them (covariances unchanged).
    offsets = (maps.partial_sums[:, 1:].reshape(n * c, -1, 2).sum(dim=1)
               / float(geo.pooled_pixels))
    offsets = offsets.flip(1)  # (off_y, off_p) per plane; flip, not a list index: no H2D copy
    means, cov = _moment_sums(logits, maps.p, maps.y, target, offsets, cfg)
    del maps
    _collect_interpreter_garbage()
    return base_sum, base_count, nonfinite, means, cov


def _backward_impl(logits, labels, cfg, base_scale, coef, shift):
    _check_plane(logits)
    target = _target_args(labels)
    lse = None
    if cfg.mode == "softmax":
        lse = _first_term_lse(logits, target, cfg, store_lse=True, ce_sums=False).lse
    scale = base_scale.to(device=logits.device, dtype=torch.float64).reshape(1)
    coef, shift = coef.contiguous(), shift.contiguous()
    _collect_interpreter_garbage()
    grad = torch.empty_like(logits)
    if not _geometry(logits, cfg).pools:  # stages (d)+(e) fused, P/Y recomputed: no full-size
        # map but the gradient
        return _pooled_grad_stencil(logits, logits, logits, target, coef, shift, cfg, lse=lse,
                                    scale=scale, grad_out=grad)
    for planes in _plane_blocks(logits, cfg):
        maps = _first_term_and_pooled_maps(logits, target, cfg, first_term=False,
                                           store_argmax=cfg.pool == "max", planes=planes)
        g = _pooled_grad_stencil(logits, maps.p, maps.y, target, coef, shift, cfg,
                                 planes=planes)
        _full_res_grad(logits, target, g, maps.argmax, lse, scale, grad, cfg, planes)
        del maps, g
        _collect_interpreter_garbage()
    return grad


def _launch_probe(device):
    """Compile (or interpret, for CPU) and launch :func:`_probe_kernel` on ``device``; returns
    its 16-element output."""
    out = torch.zeros(16, dtype=torch.float32, device=device)
    with _device_guard(out):
        _probe_kernel[(1,)](out, BLOCK=16)
    return out


def probe(device) -> str | None:
    """``None`` if a tiny kernel compiles, launches and writes the right values on ``device``,
    else the reason. Called once per device by :mod:`rmi_ext._dispatch`; ``backend="auto"``
    skips this backend where it fails (a missing C compiler or a driver mismatch shows here
    rather than in a training step). The kernels are interpreted, for CPU tensors only, when
    ``TRITON_INTERPRET=1`` was set as this module was imported; else compiled, for CUDA."""
    device = torch.device(device)
    if device.type == "cpu" and not _INTERPRETED:
        return ("Triton kernels run on CPU tensors only under TRITON_INTERPRET=1 set before "
                "rmi_ext is imported")
    if device.type != "cpu" and _INTERPRETED:
        return (f"TRITON_INTERPRET=1 is set: Triton kernels are interpreted on the host, not "
                f"compiled for {device.type}")
    if type(tl.sum) is not type(_probe_kernel):
        return ("triton was imported before TRITON_INTERPRET was changed: set it before torch, "
                "triton and rmi_ext are imported")
    try:
        out = _launch_probe(device)
        want = torch.arange(1, 17, dtype=torch.float32)
        if not torch.equal(out.cpu(), want):
            return f"the probe kernel wrote {out.cpu().tolist()}, expected {want.tolist()}"
    except Exception as exc:  # noqa: BLE001 - any failure is the reason
        return f"{type(exc).__name__}: {exc}"
    return None


# ---- custom ops (opaque to torch.compile, with fake kernels for tracing) -----------------------

def _device_guard(t):
    """Triton launches on the current CUDA device: make it the tensor's."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _cfg(radius, stride, pool, pool_size, ignore_index, mode):
    """The op's arguments (one side per spatial axis) as an :class:`RMIConfig`."""
    return RMIConfig(radius=None, stride=None, pool=pool, pool_size=None,
                     ignore_index=ignore_index, mode=mode, radii=tuple(radius),
                     strides=tuple(stride), pool_sizes=tuple(pool_size))


def _forward_stats_impl(logits: torch.Tensor, labels: torch.Tensor, radius: list[int],
                        stride: list[int], pool: str, pool_size: list[int], ignore_index: int,
                        mode: str, mask: Optional[torch.Tensor] = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                   torch.Tensor]:
    cfg = _cfg(radius, stride, pool, pool_size, ignore_index, mode)
    with _device_guard(logits):
        return _forward_impl(logits, as_target(labels, mask), cfg)


def _backward_grad_impl(logits: torch.Tensor, labels: torch.Tensor, base_scale: torch.Tensor,
                        coef: torch.Tensor, shift: torch.Tensor, radius: list[int],
                        stride: list[int], pool: str, pool_size: list[int], ignore_index: int,
                        mode: str, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    cfg = _cfg(radius, stride, pool, pool_size, ignore_index, mode)
    with _device_guard(logits):
        return _backward_impl(logits, as_target(labels, mask), cfg, base_scale, coef, shift)


_forward_stats_op = torch.library.custom_op(
    "rmi_ext::triton_forward_stats", _forward_stats_impl, mutates_args=())
_forward_stats_op.register_fake(fake_forward_stats)  # shape/dtype checks, as every backend
_backward_grad_op = torch.library.custom_op(
    "rmi_ext::triton_backward_grad", _backward_grad_impl, mutates_args=())
_backward_grad_op.register_fake(fake_backward_grad)


# ---- the backend interface used by rmi_ext.function ---------------------------------------------

def forward_stats(logits, labels, cfg: RMIConfig):
    """Stages (a)+(b): ``(base_sum, base_count, nonfinite, means, cov)``; see
    :mod:`rmi_ext.function`. ``labels``: a label map or a
    :class:`~rmi_ext.targets.FloatTarget`."""
    radius, stride, pool_size = op_sides(logits, cfg)
    labels, mask = _labels_and_mask(labels)
    return _forward_stats_op(logits, labels, radius, stride, cfg.pool, pool_size,
                             cfg.ignore_index, cfg.mode, mask)


def backward_grad(logits, labels, cfg: RMIConfig, base_scale, coef, shift):
    """Stages (d)+(e): ``grad_logits`` (recomputes the pooled maps rather than storing them)."""
    radius, stride, pool_size = op_sides(logits, cfg)
    labels, mask = _labels_and_mask(labels)
    return _backward_grad_op(logits, labels, base_scale, coef, shift, radius, stride, cfg.pool,
                             pool_size, cfg.ignore_index, cfg.mode, mask)
