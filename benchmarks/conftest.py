"""Options of the benchmark suite: ``--rmi-full``, ``--rmi-compile-all``, ``--rmi-device``."""
import importlib.util
import sys
import time
from pathlib import Path

import pytest

_START = time.monotonic()  # conftest is imported before collection

# Without an install, use the package from this checkout (an installed rmi_ext wins).
if importlib.util.find_spec("rmi_ext") is None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def pytest_addoption(parser):
    group = parser.getgroup("rmi", "RMI loss benchmarks")
    group.addoption("--rmi-full", action="store_true", default=False,
                    help="also run the paper's full batch [16, 21, 513, 513] (meant for a GPU)")
    group.addoption("--rmi-compile-all", action="store_true", default=False,
                    help="time torch.compile of the reference in every case, not only the "
                         "paper and DF-sweep cases")
    group.addoption("--rmi-device", default=None,
                    help="device to benchmark on (default: cuda if available, else cpu)")
    group.addoption("--rmi-budget", type=float, default=1.0,
                    help="seconds of timed calls to aim for per benchmark (3 to 10 rounds)")


@pytest.fixture(scope="session")
def rmi_device(request):
    import rmi_bench

    return request.config.getoption("--rmi-device") or rmi_bench.default_device()


def pytest_benchmark_update_machine_info(config, machine_info):
    """Record what the results table needs to say where the numbers came from."""
    import os

    import torch

    import rmi_bench

    device = config.getoption("--rmi-device") or rmi_bench.default_device()
    cpu_model = None
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu_model = next((line.split(":", 1)[1].strip() for line in f
                              if line.startswith("model name")), None)
    try:
        from importlib.metadata import PackageNotFoundError, version

        rmi_pytorch = version("rmi-pytorch")
    except PackageNotFoundError:
        rmi_pytorch = None
    machine_info["rmi"] = {
        "device": device,
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "gpu": torch.cuda.get_device_name(device) if device.startswith("cuda") else None,
        "cuda_version": torch.version.cuda,
        "rmi_pytorch_version": rmi_pytorch,
        "options": {name: config.getoption(name) for name in
                    ("--rmi-full", "--rmi-compile-all", "--rmi-budget")},
        "session_wall_s": time.monotonic() - _START,  # up to writing the JSON
    }
