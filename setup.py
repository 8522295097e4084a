"""Build alphanet_ext's compiled module alphanet_ext._C (metadata: pyproject.toml).

Build options (environment variables of the build, not of the library):
- ALPHANET_CUDA: 1 compiles the CUDA kernels, 0 skips them, unset: when both nvcc
  and a CUDA build of torch are present. CUDA_HOME defaults to /usr/local/cuda.
- TORCH_CUDA_ARCH_LIST: the GPU architectures; by default every one from 7.0
  (V100) to the newest that this nvcc supports, plus PTX of the newest.
- ALPHANET_NATIVE=1: compile for this machine's CPU (-march=native): faster here,
  but the binary may crash on another CPU. The default is portable x86-64; the
  kernels that need AVX2 are compiled for it on their own and chosen at run time.
- ALPHANET_OPENMP=0: build without OpenMP.
"""
import glob
import os
import platform
import re
import shutil
import subprocess

from setuptools import setup

if "CUDA_HOME" not in os.environ and os.path.isdir("/usr/local/cuda"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

# Architectures from Volta (7.0) to Blackwell (12.0): those nvcc can build get SASS; the newest also PTX,
# which newer GPUs compile when they load it.
WANTED_ARCHS = ("7.0", "7.5", "8.0", "8.6", "8.9", "9.0", "10.0", "12.0")


def nvcc_path():
    found = os.path.join(os.environ.get("CUDA_HOME", ""), "bin", "nvcc")
    return found if os.path.exists(found) else shutil.which("nvcc")


def default_arch_list(supported):
    """``TORCH_CUDA_ARCH_LIST`` for the compute capabilities nvcc supports (e.g. ``["7.5", "8.0"]``)."""
    archs = [arch for arch in WANTED_ARCHS if arch in supported]
    if not archs:
        raise RuntimeError(f"nvcc supports none of {WANTED_ARCHS} (it lists {supported})")
    return ";".join(archs) + "+PTX"


def nvcc_archs():
    listed = subprocess.run([nvcc_path(), "--list-gpu-arch"], capture_output=True, text=True).stdout.split()
    return [f"{int(name.split('_')[1]) // 10}.{int(name.split('_')[1]) % 10}" for name in listed
            if re.fullmatch(r"compute_\d+", name)]


def want_cuda(torch) -> bool:
    choice = os.environ.get("ALPHANET_CUDA", "auto").lower()
    if choice in ("0", "false", "no", "off"):
        return False
    available = torch.version.cuda is not None and nvcc_path() is not None
    if choice in ("1", "true", "yes", "on"):
        if not available:
            raise RuntimeError("ALPHANET_CUDA=1 but nvcc or a CUDA build of torch is missing "
                               f"(torch.version.cuda={torch.version.cuda}, CUDA_HOME={os.environ.get('CUDA_HOME')})")
        return True
    return available


def version_token(text: str) -> str:
    """``2.13.0+cpu`` -> ``2_13_0``: a token the preprocessor can turn into a string."""
    return "_".join(re.findall(r"\d+", text.split("+")[0])[:3])


def generated_headers() -> str:
    """Writes the headers generated from Python sources (the ops' check messages,
    alphanet_ext/messages.py, read as a file: the package itself is not imported)
    and gives their folder."""
    import runpy
    folder = os.path.join("build", "generated")
    os.makedirs(folder, exist_ok=True)
    header = runpy.run_path(os.path.join("alphanet_ext", "messages.py"))["c_header"]()
    path = os.path.join(folder, "alphanet_messages.h")
    if not os.path.exists(path) or open(path).read() != header:  # unchanged: no rebuild
        with open(path, "w") as stream:
            stream.write(header)
    return os.path.abspath(folder)


def extension():
    import torch  # CUDA_HOME must be set before cpp_extension reads it
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/knn/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3", "-fvisibility=hidden"]
    native = os.environ.get("ALPHANET_NATIVE", "0") == "1"
    if platform.machine() in ("x86_64", "AMD64") and native:
        cxx.append("-march=native")
    if os.environ.get("ALPHANET_OPENMP", "1") == "1":
        cxx.append("-fopenmp")
    include_dirs = [generated_headers()]
    macros = [("ALPHANET_TORCH_VERSION", version_token(torch.__version__)),
              ("ALPHANET_NATIVE_BUILD", "1" if native else "0")]
    if want_cuda(torch):
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            os.environ["TORCH_CUDA_ARCH_LIST"] = default_arch_list(nvcc_archs())
        archs = os.environ["TORCH_CUDA_ARCH_LIST"].replace("+PTX", "_PTX").replace(".", "").replace(";", "_")
        macros += [("ALPHANET_WITH_CUDA", None), ("ALPHANET_CUDA_ARCHS", "sm_" + re.sub(r"[^0-9A-Z_]", "", archs)),
                   ("ALPHANET_CUDA_VERSION", version_token(torch.version.cuda))]
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        return CUDAExtension(
            "alphanet_ext._C", sources, define_macros=macros, include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]})
    # CPU builds on x86-64 Linux also compile the CUDA kernels as C++ for a CPU
    # emulator (csrc/emulation), so the CPU test suite runs them.
    if platform.system() == "Linux" and platform.machine() == "x86_64":
        sources += sorted(glob.glob("csrc/emulation/*.cpp"))
        macros.append(("ALPHANET_CUDA_EMULATION", None))
        cxx.append("-Wno-unknown-pragmas")  # the kernels' `#pragma unroll` is for nvcc
    return CppExtension("alphanet_ext._C", sources, define_macros=macros, include_dirs=include_dirs,
                        extra_compile_args={"cxx": cxx},
                        extra_link_args=["-fopenmp"] if "-fopenmp" in cxx else [])


def build_ext_class():
    from torch.utils.cpp_extension import BuildExtension
    return BuildExtension.with_options(use_ninja=True)


if __name__ == "__main__":
    setup(ext_modules=[extension()], cmdclass={"build_ext": build_ext_class()})
