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
        self.fns, self.first_call_s, self.call_s, self.memory = {}, {}, {}, None
        with torch.no_grad():
            self.ref_terms = rmi_ext.rmi_loss_terms(self.logits, self.labels,
                                                    backend="reference", **case.options)

    def loss_fn(self, backend: str):
        """The loss function of ``backend``; on first use its loss is checked against the
        reference, and two forward+backward calls (the first compiles) are timed."""
        if backend not in self.fns:
            fn = rmi_bench.make_loss_fn(backend, self.case, self.labels)
            x, sync = self.logits, lambda: rmi_bench.sync(self.device)
            start = time.perf_counter()
            try:
                loss = fn(x)
            except (AttributeError, RuntimeError) as exc:
                if backend != "rmi-pytorch":
                    raise
                pytest.skip(f"rmi-pytorch fails on torch {torch.__version__}: {exc}")
            sync()
            forward_s = time.perf_counter() - start
            self.check(backend, loss)
            start = time.perf_counter()
            loss.backward()
            sync()
            self.first_call_s[backend] = forward_s + time.perf_counter() - start
            x.grad = None
            start = time.perf_counter()
            fn(x).backward()
            sync()
            self.call_s[backend] = time.perf_counter() - start
            x.grad = None
            self.fns[backend] = fn
        return self.fns[backend]

    def peak_memory(self, backend: str, session) -> dict:
        """Peak extra memory of ``backend``; the first call measures every backend whose
        forward+backward benchmark of this case is selected in this session, in one process."""
        if self.memory is None:
            backends = [item.callspec.params["backend"] for item in session.items
                        if getattr(item, "callspec", None) is not None
                        and item.callspec.params.get("case_id") == self.case.id
                        and item.callspec.params.get("phase") == "fwd+bwd"
                        and self.usable(item.callspec.params["backend"], session.config)]
            self.memory = rmi_bench.measure_peak_memory(self.case, backends, self.device)
        result = self.memory[backend]
        if "error" in result:
            raise RuntimeError(f"memory probe of {backend} on {self.case.id}:\n{result['error']}")
        return result

    def usable(self, backend: str, config) -> bool:
        return rmi_bench.why_unavailable(backend, self.case, self.device,
                                         config.getoption("--rmi-compile-all")) is None

    def check(self, backend: str, loss: torch.Tensor) -> None:
        """The benchmarked loss is finite and equals the reference's (rmi-pytorch: RMI term)."""
        if backend == "rmi-pytorch":
            # Its BCE is normalised differently (see rmi_bench.rmi_pytorch_module): compare the
            # RMI term alone, which it computes exactly as the authors do.
            target = rmi_bench.onehot_target(self.labels, self.case.shape[1])
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
    # Everything is warm (see CaseState.loss_fn); a forward+backward bounds every phase's time.
    budget = config.getoption("--rmi-budget")
    rounds = min(10, max(3, math.ceil(budget / state.call_s[backend]))) if benchmark.enabled else 1

    benchmark.group = f"{case.id} {phase}"
    benchmark.extra_info.update(
        case=case.id, backend=backend, phase=phase, device=device, shape=list(case.shape),
        **case.options, target=case.target, logits_bytes=case.logits_bytes,
        first_call_s=state.first_call_s[backend], second_call_s=state.call_s[backend])
    benchmark.pedantic(target, setup=setup, rounds=rounds, iterations=1)
    # Other work on the machine inflates times; the results table reports the load seen.
    benchmark.extra_info["loadavg_1min"] = os.getloadavg()[0]

    if phase == "fwd+bwd" and benchmark.enabled:
        memory = state.peak_memory(backend, request.session)
        benchmark.extra_info.update(memory)
        # The gradient alone is as large as the logits: a smaller peak means a broken probe.
        assert memory["peak_extra_bytes"] >= 0.9 * case.logits_bytes, memory
