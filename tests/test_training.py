"""Issue 7: the loss in real training code: autocast, torch.compile, opcheck, DDP."""
from __future__ import annotations

import datetime
import os
import socket
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import rmi_ext

CPP = rmi_ext.backend_info("cpu")["available"]["cpu"] is True
BACKENDS = ["torch"] + (["cpu"] if CPP else [])


def _inputs(n=2, c=4, h=29, w=27, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g, dtype=dtype)
    y = torch.randint(0, c, (n, h, w), generator=g)
    y[:, :3, :5] = 255
    return x, y


class TinyNet(torch.nn.Module):
    def __init__(self, c_in=3, classes=4):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Conv2d(c_in, 8, 3, padding=1), torch.nn.ReLU(),
                                        torch.nn.Conv2d(8, classes, 3, padding=1))

    def forward(self, x):
        return self.body(x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_cpu_bf16_model(backend):
    torch.manual_seed(0)
    net = TinyNet()
    img = torch.randn(2, 3, 29, 27)
    _, labels = _inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = net(img)
        assert logits.dtype == torch.bfloat16
        loss = rmi_ext.rmi_loss(logits, labels, stride=2, backend=backend)
    assert loss.dtype == torch.float32
    grad_logits, = torch.autograd.grad(loss, logits)
    assert grad_logits.dtype == torch.bfloat16
    ref = rmi_ext.rmi_loss(logits.detach().float(), labels, stride=2, backend="reference")
    assert torch.isfinite(loss)
    assert abs(loss.item() - ref.item()) <= 1e-4 * max(1.0, abs(ref.item()))


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph_matches_eager(backend):
    torch._dynamo.reset()
    torch.manual_seed(0)
    net = TinyNet()
    img = torch.randn(2, 3, 21, 19)
    _, labels = _inputs(h=21, w=19)

    def step(model, image, lab):
        return rmi_ext.rmi_loss(model(image), lab, stride=2, radius=2, backend=backend)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss_c = compiled(net, img, labels)
    grads_c = torch.autograd.grad(loss_c, list(net.parameters()))
    loss_e = step(net, img, labels)
    grads_e = torch.autograd.grad(loss_e, list(net.parameters()))
    assert torch.allclose(loss_c, loss_e, rtol=1e-6, atol=0)
    for gc, ge in zip(grads_c, grads_e):
        assert torch.allclose(gc, ge, rtol=1e-5, atol=1e-7)


@pytest.mark.skipif(not CPP, reason="C++ extension not built")
@pytest.mark.parametrize("mode", ["sigmoid", "softmax"])
@pytest.mark.parametrize("pool", ["avg", "max", "interp"])
def test_opcheck_custom_ops(pool, mode):
    from torch.library import opcheck

    from rmi_ext import linalg
    x, y = _inputs(dtype=torch.float64)
    x3 = x.detach()[:, :, None].expand(-1, -1, 3, -1, -1).contiguous()  # a [N, C, 3, H, W] volume
    y3 = y[:, None].expand(-1, 3, -1, -1).contiguous()
    for x, y, sides in ((x, y, ([2, 2], [2, 2], [3, 3])),
                        (x3, y3, ([1, 2, 3], [1, 2, 2], [1, 3, 2]))):
        radius, stride, pool_size = sides
        args = (x, y, radius, stride, pool, pool_size, 255, mode)
        opcheck(torch.ops.rmi_ext.forward_stats.default, args)
        _, _, _, means, cov = torch.ops.rmi_ext.forward_stats(*args)
        _, (a, chol) = linalg.rmi_from_moments(cov)
        coef, shift = linalg.stencil_coefficients(cov, means, a, chol,
                                                  torch.tensor(0.3, dtype=torch.float64))
        opcheck(torch.ops.rmi_ext.backward_grad.default,
                (x, y, torch.tensor(0.1, dtype=torch.float64), coef, shift, radius, stride,
                 pool, pool_size, 255, mode))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, backend, lam, state, img, labels, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # A bounded wait: a rank whose peer never comes up fails instead of waiting 30 minutes.
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    torch.manual_seed(0)
    net = TinyNet()
    net.load_state_dict(state)
    ddp = torch.nn.parallel.DistributedDataParallel(net)
    per = img.shape[0] // world
    sl = slice(rank * per, (rank + 1) * per)
    loss = rmi_ext.rmi_loss(ddp(img[sl]), labels[sl], stride=2, weight_lambda=lam, backend=backend)
    loss.backward()
    if rank == 0:
        # numpy copies are pickled by value (torch tensors would go through shared memory that
        # disappears when this process exits)
        out.put((loss.item(), [p.grad.numpy().copy() for p in net.parameters()]))
    dist.barrier()
    dist.destroy_process_group()


def _grads(net, loss):
    net.zero_grad()
    loss.backward()
    return [p.grad.clone() for p in net.parameters()]


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS[-1:])
def test_ddp_two_processes_match_single_process(backend):
    """RMI statistics are per image and the RMI term is a mean over images, so DDP (which
    averages the ranks' gradients) gives exactly the gradient of the concatenated batch for the
    RMI term (weight_lambda=0). The BCE term is normalised by each rank's own valid-pixel count,
    like any mean-reduced loss under DDP, so the full loss equals the mean of per-rank losses."""
    torch.manual_seed(0)
    net = TinyNet()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    img = torch.randn(2, 3, 29, 27)
    _, labels = _inputs()
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    for lam in (0.0, 0.5):
        port = _free_port()
        procs = [ctx.Process(target=_ddp_worker,
                             args=(r, 2, port, backend, lam, state, img, labels, out))
                 for r in range(2)]
        for p in procs:
            p.start()
        try:
            loss0, ddp_grads = out.get(timeout=300)
            for p in procs:
                p.join(timeout=60)
                if p.exitcode is None:
                    # Seen on a loaded 2-core machine: a rank that has delivered its result never
                    # returns from gloo's teardown. The result is what this test checks; a rank
                    # that failed before it would have exited non-zero or not delivered.
                    warnings.warn(f"DDP rank {p.name} hung in teardown after its result; killed")
                    p.kill()
                    continue
                assert p.exitcode == 0
        finally:  # a failed rank must not leave its peer running: pytest would wait for it
            for p in procs:
                if p.is_alive():
                    p.kill()
        loss = lambda i: rmi_ext.rmi_loss(net(img[i]), labels[i], stride=2, weight_lambda=lam,
                                          backend=backend)
        if lam == 0.0:  # exact: the concatenated batch in one process
            expected = _grads(net, loss(slice(0, 2)))
        else:  # the mean of the ranks' losses
            expected = [(a + b) / 2 for a, b in zip(_grads(net, loss(slice(0, 1))),
                                                    _grads(net, loss(slice(1, 2))))]
        single0 = loss(slice(0, 1)).item()
        assert abs(loss0 - single0) <= 1e-6 * max(1.0, abs(single0))
        for g, e in zip(ddp_grads, expected):
            assert torch.allclose(torch.from_numpy(g), e, rtol=1e-5, atol=1e-7)


def test_fake_kernels_check_shapes_and_dtypes():
    """The ops' fake kernels (what torch.compile traces) reject what the C++ checks reject."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    import rmi_ext._ops  # noqa: F401

    ops = torch.ops.rmi_ext
    R, S = [3, 3], [2, 2]  # radius, stride = pool_size: one side per spatial axis
    with FakeTensorMode():
        x = torch.empty(2, 3, 16, 16)
        y = torch.empty(2, 16, 16, dtype=torch.int64)
        stats = ops.forward_stats(x, y, R, S, "avg", S, 255, "sigmoid")
        assert [tuple(t.shape) for t in stats] == [(), (), (), (2, 3, 2, 9), (2, 3, 3, 9, 9)]
        assert [t.dtype for t in stats] == [torch.float64] * 2 + [torch.int64] + [torch.float64] * 2
        x3, y3 = torch.empty(2, 3, 5, 16, 16), torch.empty(2, 5, 16, 16, dtype=torch.uint8)
        stats = ops.forward_stats(x3, y3, [1, 2, 3], [1, 2, 2], "max", [1, 2, 2], 255, "softmax")
        assert [tuple(t.shape) for t in stats][3:] == [(2, 3, 2, 6), (2, 3, 3, 6, 6)]
        for bad_x, bad_y, radius, message in (
                (x, y.float(), R, "labels must be uint8"),
                (x, y[:, :8], R, "do not match logits"),
                (x3, y3[:, 0], [1, 3, 3], r"labels must be \[N, \*spatial\]"),
                (x3, y3, R, "one side per spatial axis"),
                (x, y, [3, 11], r"radius must be in \[1, 10\]"),
                (x[0], y, R, r"logits must be \[N, C, H, W\] or \[N, C, D, H, W\]")):
            with pytest.raises(Exception, match=message):
                ops.forward_stats(bad_x, bad_y, radius, [1] * len(radius), "avg",
                                  [1] * len(radius), 255, "sigmoid")
        coef = torch.empty(2, 3, 2, 9, 9, dtype=torch.float64)
        shift = torch.empty(2, 3, 9, dtype=torch.float64)
        scale = torch.empty((), dtype=torch.float64)
        grad = ops.backward_grad(x, y, scale, coef, shift, R, S, "avg", S, 255, "sigmoid")
        assert grad.shape == x.shape and grad.dtype == x.dtype
        with pytest.raises(Exception, match=r"coef must have shape \(2, 3, 2, 9, 9\)"):
            ops.backward_grad(x, y, scale, coef[:, :, :, :4], shift, R, S, "avg", S, 255,
                              "sigmoid")
        with pytest.raises(Exception, match="shift must be float64"):
            ops.backward_grad(x, y, scale, coef, shift.float(), R, S, "avg", S, 255, "sigmoid")
