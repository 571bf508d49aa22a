"""Backend "torch" specifics: how its stages are chunked over (n, c) planes per device."""
import torch

from conftest import make_inputs, rel_err
from test_backends import run


def test_torch_backend_chunks_cover_every_plane_once():
    """plane_chunks: every (n, c) plane exactly once; a GPU gets whole images per chunk (a few
    launches per stage), a CPU cache-sized class ranges."""
    from rmi_ext.torch_backend import plane_chunks

    for shape in ((16, 21, 513, 513), (8, 150, 129, 97), (3, 2, 9, 7), (1, 1, 4097, 4097)):
        for device in ("cpu", "cuda", "mps"):
            seen = torch.zeros(shape[:2], dtype=torch.int64)
            for n0, n1, c0, c1 in plane_chunks(shape, device):
                seen[n0:n1, c0:c1] += 1
            assert bool((seen == 1).all()), (shape, device)
    assert len(plane_chunks((16, 21, 513, 513), "cuda")) == 3  # was 16 * 21 = 336 plane chunks
    assert len(plane_chunks((16, 21, 513, 513), "cpu")) == 16 * 21


def test_torch_backend_gpu_chunking_matches_reference(monkeypatch):
    """The GPU chunk size (several images per chunk) on CPU tensors: same numbers, and the
    forward+backward runs a few hundred ops instead of one set per plane."""
    from torch.profiler import ProfilerActivity, profile

    from rmi_ext import torch_backend

    x, labels = make_inputs((5, 3, 21, 19), 21)
    ref_loss, ref_grad = run(x, labels, "reference", stride=2, radius=3)
    plane_ops = {}
    for budget in (21 * 19, torch_backend.CHUNK_ELEMENTS["cuda"]):  # one plane vs all images
        monkeypatch.setitem(torch_backend.CHUNK_ELEMENTS, "cpu", budget)
        loss, grad = run(x, labels, "torch", stride=2, radius=3)
        assert rel_err(loss, ref_loss) <= 1e-10 and rel_err(grad, ref_grad) <= 1e-10
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run(x, labels, "torch", stride=2, radius=3)
        plane_ops[budget] = sum(e.name.startswith("aten::") for e in prof.events())
    one_plane, all_images = plane_ops.values()
    assert all_images * 5 < one_plane, plane_ops
