"""The installed package really has its compiled kernels (CI sets RMI_EXT_REQUIRE_CPP=1)."""
import os

import pytest
import torch

import rmi_ext


@pytest.mark.skipif(os.environ.get("RMI_EXT_REQUIRE_CPP") != "1",
                    reason="set RMI_EXT_REQUIRE_CPP=1 to require the built C++ extension")
def test_cpp_extension_loaded_and_auto_uses_it():
    info = rmi_ext.backend_info("cpu")
    assert info["available"]["cpu"] is True, info["available"]["cpu"]
    assert info["auto"] == "cpu"
    assert torch._C._dispatch_has_kernel_for_dispatch_key("rmi_ext::forward_stats", "CPU")


@pytest.mark.skipif(os.environ.get("RMI_EXT_REQUIRE_CUDA_BUILD") != "1",
                    reason="set RMI_EXT_REQUIRE_CUDA_BUILD=1 to require CUDA kernels in the build")
def test_cuda_build_registers_both_devices_and_reports_cuda_backend():
    """A CUDA build (.ci/stack.sh): kernels for CPU and CUDA under one signature, and
    backend_info("cuda") says why the cuda backend cannot run when no GPU is visible."""
    import rmi_ext._ops  # noqa: F401  (loads rmi_ext._C)

    assert torch.version.cuda is not None
    for op in ("forward_stats", "backward_grad"):
        for key in ("CPU", "CUDA"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"rmi_ext::{op}", key), (op, key)
    info = rmi_ext.backend_info("cuda")
    if torch.cuda.is_available():
        assert info["available"]["cuda"] is True, info
    else:
        assert info["available"]["cuda"] == "no CUDA device is available", info
        assert info["available"]["triton"] == "no CUDA device is available", info
        assert info["auto"] == "torch"
