"""Backend ``"cpu"``: the C++ kernels of ``csrc/cpu`` (``at::parallel_for``), 2-D maps and
volumes with per-axis options."""
from ._ops import backward_grad, forward_stats  # noqa: F401

supports_volumes = True


def unavailable_reason():
    return None
