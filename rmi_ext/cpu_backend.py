"""Backend ``"cpu"``: the C++ kernels of ``csrc/cpu`` (``at::parallel_for``), 2-D maps and
volumes with per-axis options, integer labels and float targets (not ``region_mi``)."""
from ._ops import backward_grad, forward_stats  # noqa: F401

supports_volumes = True
supports_float_targets = True


def unavailable_reason():
    return None
