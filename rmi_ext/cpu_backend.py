"""Backend ``"cpu"``: the C++ kernels of ``csrc/cpu`` (``at::parallel_for``), 2-D maps and
volumes with per-axis options, integer labels, float targets and ``region_mi`` (whose gradient
to the target map is the torch backend's :func:`~rmi_ext.torch_backend.target_grad`)."""
from ._ops import backward_grad, forward_stats  # noqa: F401
from .torch_backend import target_grad  # noqa: F401

supports_volumes = True
supports_float_targets = True
supports_region_mi = True


def unavailable_reason():
    return None
