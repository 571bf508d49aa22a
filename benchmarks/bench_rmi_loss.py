"""Time forward, backward and forward+backward of the RMI loss, every backend beside the reference.

One benchmark per (case, backend, phase); benchmarks of one case and phase share a group, so
pytest-benchmark prints the backends side by side. The forward+backward benchmark also records
the peak extra memory of one forward+backward in ``extra_info`` (CPU: a fresh subprocess per
case; CUDA: ``torch.cuda.max_memory_allocated``). Before timing, each (case, backend) is checked
once against the reference value, so a fast wrong backend fails instead of winning.

Run: ``pytest benchmarks --benchmark-json=benchmarks/.results/latest.json``, then
``python python/make_results.py benchmarks/.results/latest.json``.
"""
import math
import os
import time

import pytest
import torch

import rmi_ext
import rmi_bench
from rmi_bench import BACKENDS, CASES, CASES_BY_ID, PHASES, Case

RTOL = 1e-4

PARAMS = [pytest.param(case.id, backend, phase, id=f"{case.id}-{backend}-{phase}")
          for case in CASES for backend in BACKENDS for phase in PHASES]


class CaseState:
    """Inputs, loss functions and reference terms of the case being run (one case at a time,
    parameters are ordered case-major, so a case's tensors are freed when the next begins)."""

    key = None

    @classmethod
    def get(cls, case: Case, device: str) -> "CaseState":
        if cls.key != (case.id, device):
            cls.current = None  # free the previous case's tensors first
            cls.current, cls.key = cls(case, device), (case.id, device)
        return cls.current

    def __init__(self, case: Case, device: str):
        self.case, self.device = case, device
        self.logits, self.labels = rmi_bench.make_inputs(case, device)
        self.fns, self.first_call_s, self.checked = {}, {}, set()
        with torch.no_grad():
            self.ref_terms = rmi_ext.rmi_loss_terms(self.logits, self.labels,
                                                    backend="reference", **case.options)

    def loss_fn(self, backend: str):
        """The loss function of ``backend``, called once (compiles) and checked on first use."""
        if backend not in self.fns:
            fn = rmi_bench.make_loss_fn(backend, self.case, self.labels)
            start = time.perf_counter()
            try:
                loss = fn(self.logits)
            except (AttributeError, RuntimeError) as exc:
                if backend != "rmi-pytorch":
                    raise
                pytest.skip(f"rmi-pytorch fails on torch {torch.__version__}: {exc}")
            rmi_bench.sync(self.device)
            self.first_call_s[backend] = time.perf_counter() - start
            self.check(backend, loss)
            self.fns[backend] = fn
        return self.fns[backend]

    def check(self, backend: str, loss: torch.Tensor) -> None:
        """The benchmarked loss is finite and equals the reference's (rmi-pytorch: RMI term)."""
        if backend == "rmi-pytorch":
            # Its BCE is normalised differently (see rmi_bench.rmi_pytorch_module): compare the
            # RMI term alone, which it computes exactly as the authors do.
            target = torch.nn.functional.one_hot(self.labels, self.case.shape[1])
            target = target.permute(0, 3, 1, 2).float()
            with torch.no_grad():
                loss = rmi_bench.rmi_pytorch_module(self.case, bce_weight=0.0)(self.logits,
                                                                                  target)
            expected = self.ref_terms.rmi
        else:
            expected = self.ref_terms.loss
        loss, expected = loss.detach().double().cpu(), expected.double().cpu()
        assert torch.isfinite(loss), f"{backend} loss is {loss.item()} on {self.case.id}"
        torch.testing.assert_close(loss, expected, rtol=RTOL, atol=0.0,
                                   msg=lambda m: f"{backend} vs reference on {self.case.id}: {m}")


def timed_call(setup, target) -> float:
    args, kwargs = setup()
    start = time.perf_counter()
    target(*args, **kwargs)
    return time.perf_counter() - start


@pytest.mark.parametrize("case_id,backend,phase", PARAMS)
def test_rmi_loss(benchmark, request, rmi_device, case_id, backend, phase):
    case, config = CASES_BY_ID[case_id], request.config
    if case.full and not config.getoption("--rmi-full"):
        pytest.skip("the paper's full batch runs only with --rmi-full")
    reason = rmi_bench.why_unavailable(backend, case, rmi_device,
                                       config.getoption("--rmi-compile-all"))
    if reason is not None:
        pytest.skip(f"{backend}: {reason}")

    state = CaseState.get(case, rmi_device)
    fn = state.loss_fn(backend)
    x, device = state.logits, rmi_device

    def clear_grad():
        x.grad = None
        return (), {}

    def forward():
        fn(x)
        rmi_bench.sync(device)

    def forward_for_backward():
        x.grad = None
        loss = fn(x)
        rmi_bench.sync(device)
        return (loss,), {}

    def backward(loss):
        loss.backward()
        rmi_bench.sync(device)

    def fwd_bwd():
        fn(x).backward()
        rmi_bench.sync(device)

    setup, target = {"fwd": (clear_grad, forward), "bwd": (forward_for_backward, backward),
                     "fwd+bwd": (clear_grad, fwd_bwd)}[phase]
    rounds = 1
    if benchmark.enabled:
        warm = timed_call(setup, target)  # also the warm-up round
        rounds = min(15, max(3, math.ceil(config.getoption("--rmi-budget") / warm)))

    benchmark.group = f"{case.id} {phase}"
    benchmark.extra_info.update(
        case=case.id, backend=backend, phase=phase, device=device, shape=list(case.shape),
        **case.options, logits_bytes=case.logits_bytes,
        first_call_s=state.first_call_s[backend])
    benchmark.pedantic(target, setup=setup, rounds=rounds, iterations=1)
    # Other work on the machine inflates times; the results table reports the load seen.
    benchmark.extra_info["loadavg_1min"] = os.getloadavg()[0]

    if phase == "fwd+bwd" and benchmark.enabled:
        memory = rmi_bench.measure_peak_memory(case, backend, device)
        benchmark.extra_info.update(memory)
        # The gradient alone is as large as the logits: a smaller peak means a broken probe.
        assert memory["peak_extra_bytes"] >= 0.9 * case.logits_bytes, memory
