"""The Triton interpreter for the Triton test modules' CPU tensors.

Triton kernels are interpreted iff ``TRITON_INTERPRET=1`` when triton and the backend are first
imported: tests/conftest.py sets it when no CUDA device is present. Elsewhere (compiled
kernels) the tests on CPU tensors are skipped (:data:`requires_interpreter`).
"""
import pytest

import rmi_ext

triton = pytest.importorskip("triton")
from rmi_ext import triton_backend as tb  # noqa: E402

#: True where the backend runs CPU tensors (interpreted kernels), else the reason it cannot.
ON_CPU = rmi_ext.backend_info("cpu")["available"]["triton"]
requires_interpreter = pytest.mark.skipif(ON_CPU is not True, reason=f"Triton on CPU: {ON_CPU}")
