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
