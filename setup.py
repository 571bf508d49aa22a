"""Build ``rmi_ext._C``: C++ CPU kernels always, CUDA kernels when CUDA torch and nvcc are present.

Environment overrides (as in pytorch_scatter): ``FORCE_ONLY_CPU=1`` never builds CUDA sources,
``FORCE_CUDA=1`` builds them even without a visible GPU (needs a CUDA build of torch and nvcc),
``RMI_EXT_PORTABLE=1`` compiles the CPU kernels without ``-march=native``.
``pip install .`` and ``pip install --no-build-isolation .`` both build against the torch already
installed (pyproject.toml and build_backend.py); torch must be installed first.

Oldest versions tested in CI (.ci/run): torch 2.11 and, for the Triton backend, triton 3.6.
"""
import glob
import os
import sys

MIN_TORCH = (2, 11)
try:
    import torch
except ImportError:
    sys.exit("rmi_ext builds against the torch you have installed, and none was found: install "
             "torch first (e.g. `pip install torch`), then run `pip install .` again.")
if tuple(int(v) for v in torch.__version__.split(".")[:2]) < MIN_TORCH:
    sys.exit(f"rmi_ext needs torch >= {MIN_TORCH[0]}.{MIN_TORCH[1]}, found {torch.__version__}: "
             "upgrade torch, then run `pip install .` again.")
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))


def use_cuda() -> bool:
    if os.getenv("FORCE_ONLY_CPU", "0") == "1":
        return False
    cuda_torch = torch.version.cuda is not None and CUDA_HOME is not None
    if os.getenv("FORCE_CUDA", "0") == "1":
        if not cuda_torch:
            sys.exit("FORCE_CUDA=1 needs a CUDA build of torch and a CUDA toolkit (nvcc)")
        return True
    return cuda_torch and torch.cuda.is_available()


def extensions():
    rel = lambda pattern: sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))
    sources = rel("csrc/*.cpp") + rel("csrc/cpu/*.cpp")
    openmp = sys.platform.startswith("linux")
    # -fno-trapping-math lets the compiler if-convert (and so vectorise) the masked row loops.
    cxx = ["-O3", "-fno-trapping-math", "-fno-math-errno"] + (["-fopenmp"] if openmp else [])
    # The row loops are written to vectorise; -march=native lets them use AVX2/AVX-512 where the
    # build machine has it. RMI_EXT_PORTABLE=1 builds for the baseline ISA (e.g. for wheels).
    if os.getenv("RMI_EXT_PORTABLE", "0") != "1" and sys.platform.startswith("linux"):
        cxx.append("-march=native")
    args = dict(include_dirs=[os.path.join(HERE, "csrc")],
                extra_compile_args={"cxx": cxx},
                extra_link_args=["-fopenmp"] if openmp else [])
    if use_cuda():
        args["extra_compile_args"]["nvcc"] = ["-O3"]
        args["define_macros"] = [("WITH_CUDA", None)]
        return [CUDAExtension("rmi_ext._C", sources + rel("csrc/cuda/*.cu"), **args)]
    return [CppExtension("rmi_ext._C", sources, **args)]


setup(
    name="rmi_ext",
    version="0.1.0",
    description="Fast, memory-lean Region Mutual Information (RMI) loss for PyTorch",
    packages=find_packages(include=["rmi_ext", "rmi_ext.*"]),
    python_requires=">=3.9",
    install_requires=[f"torch>={MIN_TORCH[0]}.{MIN_TORCH[1]}"],
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
