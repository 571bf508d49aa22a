"""Backend ``"cpu"``: the C++ kernels of ``csrc/cpu`` (``at::parallel_for``)."""
from ._ops import backward_grad, forward_stats  # noqa: F401


def unavailable_reason():
    return None
