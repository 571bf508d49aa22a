"""Backend ``"cuda"``: the CUDA C++ kernels of ``csrc/cuda`` (built when CUDA is present)."""
import torch

from ._ops import backward_grad, forward_stats  # noqa: F401


def unavailable_reason():
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    if not torch._C._dispatch_has_kernel_for_dispatch_key("rmi_ext::forward_stats", "CUDA"):
        return "rmi_ext._C was built without CUDA kernels (no CUDA torch/nvcc at build time)"
    return None
