"""Backend ``"cuda"``: the CUDA C++ kernels of ``csrc/cuda`` (built when CUDA is present): 2-D
maps with one radius, stride and pool size, integer labels, float targets and ``region_mi``
(whose gradient to the target map is the torch backend's
:func:`~rmi_ext.torch_backend.target_grad`)."""
import torch

from ._ops import backward_grad, forward_stats  # noqa: F401
from .torch_backend import target_grad  # noqa: F401

supports_float_targets = True
supports_region_mi = True


def unavailable_reason():
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    if not torch._C._dispatch_has_kernel_for_dispatch_key("rmi_ext::forward_stats", "CUDA"):
        return "rmi_ext._C was built without CUDA kernels (no CUDA torch/nvcc at build time)"
    return None
