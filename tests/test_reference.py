"""The unfold reference (``backend="reference"``) against independent oracles.

1. A numpy float64 implementation written from RMI_SPEC.md sections 1 and 5 directly
   (``tests/volume_oracle.py``, 2-D here, volumes in ``test_volumes.py``): its own mask /
   one-hot, BCE / CE, pooling (avg, max, nearest + bilinear align_corners=True resize, by hand),
   region vectors window by window, covariances, inverse, Cholesky and log-det.
2. A near-verbatim transcription of the paper authors' ``RMILoss`` (``forward_sigmoid``,
   ``forward_softmax_sigmoid``, ``rmi_lower_bound``, ``map_get_pairs``, ``log_det_by_cholesky``),
   run on CPU in float64 without the authors' float32 cast of the per-class term, and with it.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import rmi_ext
import volume_oracle as vo
from conftest import make_inputs, rel_err


def ref_terms(x, labels, **opts):
    t = rmi_ext.rmi_loss_terms(x, labels, backend="reference", **opts)
    return t.loss.item(), t.base.item(), t.rmi.item()


def total(base, rmi, lam, lambda_way):
    return lam * base + (1 - lam) * rmi if lambda_way == 1 else base + lam * rmi


# ------------------------------------------------------------------------------------------------
# the numpy helpers themselves, on values worked out by hand
# ------------------------------------------------------------------------------------------------


def test_numpy_resize_helpers_by_hand():
    t = np.arange(5.0).reshape(1, 1, 1, 5) * np.ones((1, 1, 3, 1))  # rows 0..4 in every row
    # bilinear align_corners=True 5 -> 3: sources 0, 2, 4; 5 -> 2: sources 0, 4; 5 -> 4: 0, 4/3, ...
    assert np.allclose(vo.linear_ac(t, (3, 3))[0, 0, 0], [0.0, 2.0, 4.0])
    assert np.allclose(vo.linear_ac(t, (3, 4))[0, 0, 0], [0.0, 4 / 3, 8 / 3, 4.0])
    assert np.allclose(vo.linear_ac(t, (1, 1))[0, 0, 0], [0.0])
    # nearest 5 -> 2: floor(0 * 2.5) = 0, floor(1 * 2.5) = 2; 5 -> 3: 0, 1, 3
    assert np.array_equal(vo.nearest(t, (3, 2))[0, 0, 0], [0.0, 2.0])
    assert np.array_equal(vo.nearest(t, (3, 3))[0, 0, 0], [0.0, 1.0, 3.0])
    # avg 3x3 stride 2 pad 1 on a 1x1 map of value 9: one output, 9/9 = 1 (padding counted)
    assert np.allclose(vo.pool(np.full((1, 1, 1, 1), 9.0), "avg", (3, 3), (2, 2)), 1.0)
    assert np.allclose(vo.pool(np.full((1, 1, 1, 1), -9.0), "max", (3, 3), (2, 2)), -9.0)


def test_numpy_helpers_match_torch_ops():
    gen = torch.Generator().manual_seed(3)
    t = torch.rand(1, 2, 11, 9, generator=gen, dtype=torch.float64)
    tn = t.numpy()
    for k, s in ((2, 2), (3, 2), (5, 3), (3, 3), (4, 4)):
        assert np.allclose(vo.pool(tn, "avg", (k, k), (s, s)), F.avg_pool2d(t, k, s, k // 2).numpy(),
                           rtol=0, atol=1e-15)
        assert np.array_equal(vo.pool(tn, "max", (k, k), (s, s)), F.max_pool2d(t, k, s, k // 2).numpy())
    for size in ((5, 4), (3, 3), (2, 4), (1, 2)):
        assert np.array_equal(vo.nearest(tn, size), F.interpolate(t, size=size).numpy())
        ref = F.interpolate(t, size=size, mode="bilinear", align_corners=True).numpy()
        assert np.allclose(vo.linear_ac(tn, size), ref, rtol=0, atol=1e-15)


# ------------------------------------------------------------------------------------------------
# reference vs numpy oracle
# ------------------------------------------------------------------------------------------------


def _grid():
    cases = []
    i = 0
    for mode in ("sigmoid", "softmax"):
        for stride, pool, pool_size in ((1, "avg", None), (2, "avg", None), (3, "avg", None),
                                        (2, "max", None), (3, "max", None), (2, "interp", None),
                                        (3, "interp", None), (2, "avg", 3), (3, "max", 5)):
            for radius in (1, 2, 3):
                cases.append(pytest.param(
                    dict(mode=mode, stride=stride, pool=pool, pool_size=pool_size, radius=radius,
                         lambda_way=i % 2, weight_lambda=(0.5, 0.3, 0.8)[i % 3], seed=i),
                    id=f"{mode}-{pool}-s{stride}-k{pool_size or stride}-R{radius}-lw{i % 2}"))
                i += 1
    return cases


@pytest.mark.parametrize("opts", _grid())
def test_reference_matches_numpy(opts):
    opts = dict(opts)
    x, labels = make_inputs((2, 3, 11, 10), opts.pop("seed"), mode=opts["mode"],
                            requires_grad=False)
    loss, base, rmi = ref_terms(x, labels, **opts)
    nb, nr = vo.terms(x.numpy(), labels.numpy(), **{k: v for k, v in opts.items()
                                                   if k not in ("lambda_way", "weight_lambda")})
    assert rel_err(base, nb) < 1e-12
    assert rel_err(rmi, nr) < 1e-11
    assert rel_err(loss, total(nb, nr, opts["weight_lambda"], opts["lambda_way"])) < 1e-11


def test_reference_ignore_index_other_than_255():
    x, labels = make_inputs((2, 3, 9, 9), 5, ignore_index=1, invalid_labels=False,
                            requires_grad=False)
    for mode in ("sigmoid", "softmax"):
        _, base, rmi = ref_terms(x, labels, radius=2, stride=2, ignore_index=1, mode=mode)
        nb, nr = vo.terms(x.numpy(), labels.numpy(), radius=2, stride=2, ignore_index=1, mode=mode)
        assert rel_err(base, nb) < 1e-12 and rel_err(rmi, nr) < 1e-11


def test_reference_float64_in_float64_out():
    x, labels = make_inputs((1, 2, 8, 8), 0, requires_grad=False)
    t = rmi_ext.rmi_loss_terms(x, labels, backend="reference", radius=2, stride=2)
    assert all(v.dtype == torch.float64 for v in t)
    t32 = rmi_ext.rmi_loss_terms(x.float(), labels, backend="reference", radius=2, stride=2)
    assert all(v.dtype == torch.float32 for v in t32)
    assert rel_err(t32.loss, t.loss) < 1e-5


def test_bce_normalised_by_valid_plus_one():
    x, labels = make_inputs((2, 2, 7, 7), 11, requires_grad=False)
    _, base, _ = ref_terms(x, labels, radius=1, stride=1)
    m, y = vo.mask_onehot(labels.numpy(), 2, 255)
    s = vo.bce_sum(x.numpy(), y, m)
    assert rel_err(base, s / (m.sum() + 1)) < 1e-13
    assert rel_err(base, s / m.sum()) > 1e-3  # the +1 matters at this size


def test_ce_normalised_by_count():
    x, labels = make_inputs((2, 3, 7, 7), 12, mode="softmax", ignore_frac=0.3,
                            requires_grad=False)
    _, base, _ = ref_terms(x, labels, radius=1, stride=1, mode="softmax")
    s, count = vo.ce_sum_count(x.numpy(), labels.numpy(), 255)
    assert count < labels.numel()
    assert rel_err(base, s / count) < 1e-13
    assert rel_err(base, s / (count + 1)) > 1e-3
    # same as F.cross_entropy(reduction="mean"), the authors' call
    assert rel_err(base, F.cross_entropy(x, labels, ignore_index=255).item()) < 1e-13


@pytest.mark.parametrize("mode", ["sigmoid", "softmax"])
def test_probability_rule_plus_vs_clamp(mode):
    """Sigmoid mode uses ``sig*m + 1e-6``, softmax mode ``clamp(sig*m, 1e-6, 1)``.

    A constant shift does not change covariances, so the two rules differ only where the clamp
    acts (``sig < 1e-6``, logits about -14) and through the avg-pool zero padding. Logits mix
    0 and [-16, -13] so the two rules give measurably different RMI terms.
    """
    gen = torch.Generator().manual_seed(7)
    n, c, h, w = 2, 2, 10, 9
    low = -13.0 - 3.0 * torch.rand(n, c, h, w, generator=gen, dtype=torch.float64)
    mid = torch.randn(n, c, h, w, generator=gen, dtype=torch.float64)
    x = torch.where(torch.rand(n, c, h, w, generator=gen) < 0.5, low, mid)
    labels = torch.randint(0, c, (n, h, w), generator=gen)
    labels[:, 0, :3] = 255
    opts = dict(radius=2, stride=2, pool="avg", mode=mode)
    _, _, rmi = ref_terms(x, labels, **opts)
    right = "plus" if mode == "sigmoid" else "clamp"
    wrong = "clamp" if mode == "sigmoid" else "plus"
    _, nr_right = vo.terms(x.numpy(), labels.numpy(), probs_rule=right, **opts)
    _, nr_wrong = vo.terms(x.numpy(), labels.numpy(), probs_rule=wrong, **opts)
    assert rel_err(rmi, nr_right) < 1e-12
    assert rel_err(rmi, nr_wrong) > 1e3 * rel_err(rmi, nr_right) + 1e-10


def test_rmi_term_can_be_negative_and_rmi_sum_over_classes():
    """``rmi = sum_c mean_n rmi[n,c] / d``: check the class sum / batch mean on a 1-image batch."""
    x, labels = make_inputs((3, 2, 9, 9), 21, requires_grad=False)
    opts = dict(radius=2, stride=1)
    _, _, rmi_all = ref_terms(x, labels, **opts)
    per_image = [ref_terms(x[i:i + 1], labels[i:i + 1], **opts)[2] for i in range(3)]
    assert rel_err(rmi_all, sum(per_image) / 3) < 1e-12
    # near-perfect predictions: M is tiny, log det(M + aI) < 0, the surrogate is negative
    # (expected, see the spec) and the numpy oracle agrees
    onehot = F.one_hot(labels.clamp(0, 1), 2).permute(0, 3, 1, 2).double()
    good = 8.0 * (2.0 * onehot - 1.0)
    _, _, rmi_good = ref_terms(good, labels, **opts)
    assert rmi_good < 0
    assert rel_err(rmi_good, vo.terms(good.numpy(), labels.numpy(), **opts)[1]) < 1e-11


# ------------------------------------------------------------------------------------------------
# the authors' code, transcribed (CPU, float64 instead of torch.cuda.DoubleTensor)
# ------------------------------------------------------------------------------------------------


def _map_get_pairs(labels_4D, probs_4D, radius=3):
    h, w = labels_4D.size()[2], labels_4D.size()[3]
    new_h, new_w = h - (radius - 1), w - (radius - 1)
    la_ns, pr_ns = [], []
    for y in range(0, radius, 1):
        for x in range(0, radius, 1):
            la_ns.append(labels_4D[:, :, y:y + new_h, x:x + new_w])
            pr_ns.append(probs_4D[:, :, y:y + new_h, x:x + new_w])
    return torch.stack(la_ns, dim=2), torch.stack(pr_ns, dim=2)


def _log_det_by_cholesky(matrix):
    chol = torch.linalg.cholesky(matrix)
    return 2.0 * torch.sum(torch.log(torch.diagonal(chol, dim1=-2, dim2=-1) + 1e-8), dim=-1)


class AuthorsRMI:
    """Transcription of the authors' ``losses/rmi/rmi.py`` (``is_sum=1``, ``ignore_index=255``).

    ``pool_way``: 0 max, 1 avg, 2 interp. ``cast_float``: keep the authors' ``.float()`` of the
    per-class term (off for float64 comparisons, as the spec says).
    """

    def __init__(self, num_classes, rmi_radius=3, rmi_pool_way=1, rmi_pool_size=3,
                 rmi_pool_stride=3, loss_weight_lambda=0.5, lambda_way=1, cast_float=False):
        self.num_classes = num_classes
        self.rmi_radius, self.rmi_pool_way = rmi_radius, rmi_pool_way
        self.rmi_pool_size, self.rmi_pool_stride = rmi_pool_size, rmi_pool_stride
        self.weight_lambda, self.lambda_way = loss_weight_lambda, lambda_way
        self.half_d = self.rmi_radius * self.rmi_radius
        self.kernel_padding = self.rmi_pool_size // 2
        self.ignore_index = 255
        self.cast_float = cast_float

    def forward_softmax_sigmoid(self, logits_4D, labels_4D):
        normal_loss = F.cross_entropy(input=logits_4D, target=labels_4D.long(),
                                      ignore_index=self.ignore_index, reduction='mean')
        label_mask_3D = labels_4D < self.num_classes
        valid_onehot_labels_4D = F.one_hot(labels_4D.long() * label_mask_3D.long(),
                                           num_classes=self.num_classes).to(logits_4D.dtype)
        label_mask_3D = label_mask_3D.to(logits_4D.dtype)
        valid_onehot_labels_4D = valid_onehot_labels_4D * label_mask_3D.unsqueeze(dim=3)
        valid_onehot_labels_4D.requires_grad_(False)
        probs_4D = torch.sigmoid(logits_4D) * label_mask_3D.unsqueeze(dim=1)
        probs_4D = probs_4D.clamp(min=1e-6, max=1.0)
        valid_onehot_labels_4D = valid_onehot_labels_4D.permute(0, 3, 1, 2)
        rmi_loss = self.rmi_lower_bound(valid_onehot_labels_4D, probs_4D)
        return (self.weight_lambda * normal_loss + rmi_loss * (1 - self.weight_lambda)
                if self.lambda_way else normal_loss + rmi_loss * self.weight_lambda)

    def forward_sigmoid(self, logits_4D, labels_4D):
        label_mask_3D = labels_4D < self.num_classes
        valid_onehot_labels_4D = F.one_hot(labels_4D.long() * label_mask_3D.long(),
                                           num_classes=self.num_classes).to(logits_4D.dtype)
        label_mask_3D = label_mask_3D.to(logits_4D.dtype)
        label_mask_flat = label_mask_3D.view([-1, ])
        valid_onehot_labels_4D = valid_onehot_labels_4D * label_mask_3D.unsqueeze(dim=3)
        valid_onehot_labels_4D.requires_grad_(False)
        valid_onehot_label_flat = valid_onehot_labels_4D.view([-1, self.num_classes])
        logits_flat = logits_4D.permute(0, 2, 3, 1).contiguous().view([-1, self.num_classes])
        valid_pixels = torch.sum(label_mask_flat)
        binary_loss = F.binary_cross_entropy_with_logits(
            logits_flat, target=valid_onehot_label_flat, weight=label_mask_flat.unsqueeze(dim=1),
            reduction='sum')
        bce_loss = torch.div(binary_loss, valid_pixels + 1.0)
        probs_4D = logits_4D.sigmoid() * label_mask_3D.unsqueeze(dim=1) + 1e-6
        valid_onehot_labels_4D = valid_onehot_labels_4D.permute(0, 3, 1, 2)
        rmi_loss = self.rmi_lower_bound(valid_onehot_labels_4D, probs_4D)
        return (self.weight_lambda * bce_loss + rmi_loss * (1 - self.weight_lambda)
                if self.lambda_way else bce_loss + rmi_loss * self.weight_lambda)

    def rmi_lower_bound(self, labels_4D, probs_4D):
        p, s = self.rmi_pool_size, self.rmi_pool_stride
        if self.rmi_pool_stride > 1:
            if self.rmi_pool_way == 0:
                labels_4D = F.max_pool2d(labels_4D, kernel_size=p, stride=s,
                                         padding=self.kernel_padding)
                probs_4D = F.max_pool2d(probs_4D, kernel_size=p, stride=s,
                                        padding=self.kernel_padding)
            elif self.rmi_pool_way == 1:
                labels_4D = F.avg_pool2d(labels_4D, kernel_size=p, stride=s,
                                         padding=self.kernel_padding)
                probs_4D = F.avg_pool2d(probs_4D, kernel_size=p, stride=s,
                                        padding=self.kernel_padding)
            else:
                shape = labels_4D.size()
                new_h, new_w = shape[2] // s, shape[3] // s
                labels_4D = F.interpolate(labels_4D, size=(new_h, new_w), mode='nearest')
                probs_4D = F.interpolate(probs_4D, size=(new_h, new_w), mode='bilinear',
                                         align_corners=True)
        label_shape = labels_4D.size()
        n, c = label_shape[0], label_shape[1]
        la_vectors, pr_vectors = _map_get_pairs(labels_4D, probs_4D, radius=self.rmi_radius)
        la_vectors = la_vectors.view([n, c, self.half_d, -1]).double().requires_grad_(False)
        pr_vectors = pr_vectors.view([n, c, self.half_d, -1]).double()
        diag_matrix = torch.eye(self.half_d).unsqueeze(dim=0).unsqueeze(dim=0)
        la_vectors = la_vectors - la_vectors.mean(dim=3, keepdim=True)
        la_cov = torch.matmul(la_vectors, la_vectors.transpose(2, 3))
        pr_vectors = pr_vectors - pr_vectors.mean(dim=3, keepdim=True)
        pr_cov = torch.matmul(pr_vectors, pr_vectors.transpose(2, 3))
        pr_cov_inv = torch.inverse(pr_cov + diag_matrix.type_as(pr_cov) * 5e-4)
        la_pr_cov = torch.matmul(la_vectors, pr_vectors.transpose(2, 3))
        appro_var = la_cov - torch.matmul(la_pr_cov.matmul(pr_cov_inv), la_pr_cov.transpose(-2, -1))
        rmi_now = 0.5 * _log_det_by_cholesky(appro_var + diag_matrix.type_as(appro_var) * 5e-4)
        rmi_per_class = rmi_now.view([-1, self.num_classes]).mean(dim=0)
        if self.cast_float:
            rmi_per_class = rmi_per_class.float()
        rmi_per_class = torch.div(rmi_per_class, float(self.half_d))
        return torch.sum(rmi_per_class)


POOL_WAY = {"max": 0, "avg": 1, "interp": 2}


@pytest.mark.parametrize("mode", ["sigmoid", "softmax"])
@pytest.mark.parametrize("pool,stride,pool_size,radius",
                         [("avg", 4, 4, 3), ("avg", 3, 5, 2), ("max", 2, 3, 3), ("max", 2, 2, 2),
                          ("interp", 2, 2, 3), ("avg", 1, 1, 3)])
def test_reference_matches_authors_code_float64(mode, pool, stride, pool_size, radius):
    """Value and autograd gradient equal the authors' code (float64, no float32 cast).

    The authors' mask is ``labels < C`` only, so this uses labels in ``[0, C) + {255}``.
    """
    x, labels = make_inputs((2, 3, 17, 15), stride * 10 + radius, mode=mode, invalid_labels=False)
    for lambda_way in (0, 1):
        authors = AuthorsRMI(3, radius, POOL_WAY[pool], pool_size, stride, 0.4, lambda_way)
        fwd = authors.forward_sigmoid if mode == "sigmoid" else authors.forward_softmax_sigmoid
        xa = x.detach().clone().requires_grad_(True)
        expected = fwd(xa, labels)
        expected.backward()
        xr = x.detach().clone().requires_grad_(True)
        got = rmi_ext.rmi_loss(xr, labels, radius=radius, stride=stride, pool=pool,
                               pool_size=pool_size, weight_lambda=0.4, lambda_way=lambda_way,
                               mode=mode, backend="reference")
        got.backward()
        assert got.dtype == torch.float64
        assert rel_err(got, expected) < 1e-13
        assert rel_err(xr.grad, xa.grad) < 1e-12


@pytest.mark.parametrize("mode", ["sigmoid", "softmax"])
def test_reference_matches_authors_code_float32(mode):
    """With float32 logits (and the authors' float32 cast) the numbers agree to float32 level."""
    x, labels = make_inputs((2, 3, 17, 15), 99, dtype=torch.float32, mode=mode,
                            invalid_labels=False, requires_grad=False)
    authors = AuthorsRMI(3, 3, 1, 4, 4, 0.5, 1, cast_float=True)
    fwd = authors.forward_sigmoid if mode == "sigmoid" else authors.forward_softmax_sigmoid
    expected = fwd(x, labels)
    got = rmi_ext.rmi_loss(x, labels, mode=mode, backend="reference")
    assert got.dtype == torch.float32
    assert rel_err(got, expected) < 1e-6
