"""Backend "torch" specifics: how its stages are split into row blocks, and their memory."""

import pytest
import torch

import rmi_ext
from conftest import make_inputs, peak_memory_ratio, rel_err
from test_backends import run


@pytest.mark.slow
def test_torch_backend_blocks_cover_every_element_once():
    """row_blocks: every (n, c, row) exactly once, for every flag; blocks of whole images when
    one fits, at least one row; a GPU gets larger blocks (and at DF 4, at most 20 plane groups)
    than a CPU on a large input."""
    from rmi_ext._config import RMIConfig
    from rmi_ext.torch_backend import block_elements, plane_groups, row_blocks

    for shape in ((16, 21, 513, 513), (8, 150, 129, 97), (3, 2, 9, 7), (1, 1, 4097, 4097)):
        sizes = {block_elements(shape, torch.float32, device) for device in ("cpu", "cuda", "mps")}
        for elements in sorted(sizes | {1, 1000}):
            for flags in ({}, {"all_classes": True}, {"whole_planes": True}):
                seen = torch.zeros(shape[:2] + shape[2:3], dtype=torch.int64)
                for n0, n1, c0, c1, r0, r1 in row_blocks(shape, elements, **flags):
                    seen[n0:n1, c0:c1, r0:r1] += 1
                    assert flags.get("all_classes") is not True or (c0, c1) == (0, shape[1])
                    assert flags.get("whole_planes") is not True or (r0, r1) == (0, shape[2])
                assert bool((seen == 1).all()), (shape, flags, elements)
    big = (16, 21, 513, 513)
    assert block_elements(big, torch.float32, "cuda") > 4 * block_elements(big, torch.float32, "cpu")
    for small in ((2, 3, 21, 19), (1, 4, 32, 32)):  # up to 4096 elements: one block
        assert len(row_blocks(small, block_elements(small, torch.float32, "cpu"))) == 1
    # DF 4: stages (b), (d) once per group of whole planes, few groups on a GPU (issue 13)
    groups = plane_groups(big, RMIConfig(stride=4), block_elements(big, torch.float32, "cuda"))
    assert len(groups) <= 20 and sum((n1 - n0) * (c1 - c0) for n0, n1, c0, c1 in groups) == 16 * 21
    assert plane_groups(big, RMIConfig(stride=1), 10**6) is None


@pytest.mark.slow
def test_torch_backend_block_size_matches_reference(monkeypatch):
    """One block for everything vs blocks of one row of one class: same numbers, and one block
    runs several times fewer ops."""
    from torch.profiler import ProfilerActivity, profile

    from rmi_ext import torch_backend

    x, labels = make_inputs((2, 3, 21, 19), 21)
    ref_loss, ref_grad = run(x, labels, "reference", stride=2, radius=2)
    ops = {}
    for elements in (1, 10**9):
        monkeypatch.setattr(torch_backend, "block_elements", lambda *args: elements)
        loss, grad = run(x, labels, "torch", stride=2, radius=2)
        assert rel_err(loss, ref_loss) <= 1e-10 and rel_err(grad, ref_grad) <= 1e-10
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run(x, labels, "torch", stride=2, radius=2)
        ops[elements] = sum(e.name.startswith("aten::") for e in prof.events())
    assert ops[10**9] * 5 < ops[1], ops


def _tiny_block_cases():
    cases = []
    for mode in ("sigmoid", "softmax"):
        for pool, stride, pool_size in (("avg", 1, None), ("avg", 2, None), ("avg", 3, 5),
                                        ("avg", 4, 2), ("max", 2, 3), ("max", 4, 6),
                                        ("interp", 3, None)):
            cases.append(pytest.param(mode, pool, stride, pool_size,
                                      id=f"{mode}-{pool}-s{stride}-k{pool_size}"))
    return cases


@pytest.mark.slow
@pytest.mark.parametrize("mode,pool,stride,pool_size", _tiny_block_cases())
def test_torch_backend_tiny_blocks_match_reference(monkeypatch, mode, pool, stride, pool_size):
    """Blocks of 1-3 rows (and one class) and small plane groups against the reference, float64:
    the row halos, the pooling windows cut by a block edge, the padded first / last rows."""
    from rmi_ext import torch_backend

    x, labels = make_inputs((1, 2, 41, 45), 7 * stride, mode=mode)
    for radius in (2, 5):
        opts = dict(mode=mode, pool=pool, stride=stride, pool_size=pool_size, radius=radius)
        ref_loss, ref_grad = run(x, labels, "reference", **opts)
        # 1 row of 1 class, 3 rows of 1 class / 1 row of all, plane groups (DF > 1) of 1-2
        # planes whose pooled maps are built from blocks of a few rows
        for elements in (1, 3 * 45, 700):
            monkeypatch.setattr(torch_backend, "block_elements", lambda *args: elements)
            loss, grad = run(x, labels, "torch", **opts)
            assert rel_err(loss, ref_loss) <= 1e-10, (radius, elements)
            assert rel_err(grad, ref_grad) <= 1e-10, (radius, elements)


def _peak_memory_cases():
    """Every dtype, DF, mode and pool on a small image of 2 classes; the 21-class shape (one
    block holds less than one row of all classes) for bfloat16 (the largest temporaries per
    logits byte) at DF 1 softmax (the worst) and DF 4 avg (plane groups of one plane)."""
    both = [("sigmoid", "avg"), ("softmax", "avg")]
    worst = [("softmax", "avg"), ("sigmoid", "max")]  # at DF 4: each mode, each pool
    # Logits of at least 2 MiB: on smaller ones BLOCK_BYTES_FLOOR sets the block size.
    cases = [((1, 8, 256, 256), 1, torch.float32, [("sigmoid", "avg")]),
             ((1, 16, 256, 256), 1, torch.bfloat16, [("softmax", "avg")]),
             ((1, 8, 256, 256), 4, torch.float32, worst),
             ((1, 16, 256, 256), 4, torch.bfloat16, worst),
             ((1, 21, 257, 257), 1, torch.bfloat16, [("softmax", "avg")]),
             ((1, 21, 257, 257), 4, torch.bfloat16, both)]
    return [pytest.param(*case, id=f"{'x'.join(map(str, shape))}-s{stride}-{str(dtype)[6:]}")
            for case in cases for shape, stride, dtype, _ in [case]]


@pytest.mark.slow
@pytest.mark.parametrize("shape,stride,dtype,modes_pools", _peak_memory_cases())
def test_peak_memory_within_the_gradient_size(shape, stride, dtype, modes_pools):
    """Forward + backward allocate at most 1.25x the logits in torch tensors, the gradient
    included (issue 13): the row blocks and plane groups keep the temporaries near
    ``logits_bytes / 8``. Measured with the benchmarks' profiler probe on the first call (the
    backend compiles nothing: a warm-up call would only cost time)."""
    torch.manual_seed(0)
    logits = (2 * torch.randn(shape)).to(dtype).requires_grad_()
    labels = torch.randint(0, shape[1], (shape[0], *shape[2:]))
    for mode, pool in modes_pools:
        ratio = peak_memory_ratio(logits, labels, radius=3, stride=stride, pool=pool, mode=mode,
                                  backend="torch", warm_up=False)
        assert ratio <= 1.25, (mode, pool, ratio)
