"""Triton and the backend module for the Triton test modules (skipped without triton).

Triton kernels are interpreted iff ``TRITON_INTERPRET=1`` when triton and the backend are first
imported: tests/conftest.py sets it when no CUDA device is present. The tests that run kernels
on CPU tensors carry ``@pytest.mark.interpreted``: conftest skips them where the kernels are
compiled, and puts them in the slow tier.
"""
import pytest

triton = pytest.importorskip("triton")
from rmi_ext import triton_backend as tb  # noqa: E402
