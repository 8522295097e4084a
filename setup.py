"""Build alphanet_ext and its compiled module alphanet_ext._C.

CUDA kernels are compiled when ALPHANET_CUDA=1, skipped when ALPHANET_CUDA=0,
and on auto (unset) when both nvcc and a CUDA build of torch are present.
CUDA_HOME defaults to /usr/local/cuda when that exists.
"""
import glob
import os
import platform
import shutil

from setuptools import find_packages, setup

if "CUDA_HOME" not in os.environ and os.path.isdir("/usr/local/cuda"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")

import torch  # noqa: E402  (CUDA_HOME must be set before cpp_extension reads it)
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def want_cuda() -> bool:
    choice = os.environ.get("ALPHANET_CUDA", "auto").lower()
    if choice in ("0", "false", "no", "off"):
        return False
    has_nvcc = shutil.which("nvcc") is not None or os.path.exists(
        os.path.join(os.environ.get("CUDA_HOME", ""), "bin", "nvcc"))
    available = torch.version.cuda is not None and has_nvcc
    if choice in ("1", "true", "yes", "on"):
        if not available:
            raise RuntimeError("ALPHANET_CUDA=1 but nvcc or a CUDA build of torch is missing "
                               f"(torch.version.cuda={torch.version.cuda}, CUDA_HOME={os.environ.get('CUDA_HOME')})")
        return True
    return available


def extension():
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3", "-fvisibility=hidden"]
    if platform.machine() in ("x86_64", "AMD64") and os.environ.get("ALPHANET_NATIVE", "1") == "1":
        cxx.append("-march=native")
    if os.environ.get("ALPHANET_OPENMP", "1") == "1":
        cxx.append("-fopenmp")
    if want_cuda():
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        return CUDAExtension(
            "alphanet_ext._C", sources, define_macros=[("ALPHANET_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--expt-relaxed-constexpr",
                                                       "-lineinfo"]})
    # CPU builds on x86-64 Linux also compile the CUDA kernels as C++ for a CPU
    # emulator (csrc/emulation), so the CPU test suite runs them.
    macros = []
    if platform.system() == "Linux" and platform.machine() == "x86_64":
        sources += sorted(glob.glob("csrc/emulation/*.cpp"))
        macros.append(("ALPHANET_CUDA_EMULATION", None))
        cxx.append("-Wno-unknown-pragmas")  # the kernels' `#pragma unroll` is for nvcc
    return CppExtension("alphanet_ext._C", sources, define_macros=macros, extra_compile_args={"cxx": cxx},
                        extra_link_args=["-fopenmp"] if "-fopenmp" in cxx else [])


setup(
    name="alphanet_ext",
    version="0.1.0",
    description="Fast AlphaNet post-hoc correction of long-tailed classifiers (PyTorch C++/CUDA extension)",
    packages=find_packages(include=["alphanet_ext", "alphanet_ext.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "numpy"],
    extras_require={"cli": ["tqdm", "matplotlib", "safetensors"], "test": ["pytest"], "cupy": ["cupy"]},
    entry_points={"console_scripts": ["alphanet=alphanet_ext.cli:main"]},
)
