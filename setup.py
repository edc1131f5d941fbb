"""Build script: only the C++/CUDA extension lives here; metadata is in pyproject.toml.

Builds one abi3 extension, ``torchgraph/_C.abi3.so``, from ``csrc/*.cpp`` and
``csrc/cpu/*.cpp`` (always) plus ``csrc/cuda/*.cu`` (only when a CUDA toolkit is
usable). Environment switches:

* ``TORCHGRAPH_USE_CUDA=0``: never build the CUDA kernels.
* ``TORCHGRAPH_CPU_CAPABILITY=AVX512|AVX2|DEFAULT``: override the SIMD level that is
  otherwise read from ``torch.backends.cpu.get_cpu_capability()`` on the build machine.
* ``DEBUG=1``: ``-O0 -g`` instead of ``-O3 -g0``.
"""

import glob
import os
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
PY_LIMITED_API = "0x030A0000"  # CPython 3.10, the oldest Python in pyproject.toml


def _cpu_capability_flags(torch):
    """Defines + -m flags that make at::vec::Vectorized use real SIMD registers."""
    # NOTE: without CPU_CAPABILITY_* defines, Vectorized<float> falls back to its
    # scalar implementation (~10x slower). The -m flags make the whole .so require
    # that ISA, so a binary built here only runs on machines with the same level.
    capability = os.environ.get("TORCHGRAPH_CPU_CAPABILITY")
    capability = (capability or torch.backends.cpu.get_cpu_capability()).upper()
    if capability.startswith("AVX512"):
        return [
            "-DCPU_CAPABILITY=AVX512",
            "-DCPU_CAPABILITY_AVX512",
            "-mavx512f",
            "-mavx512bw",
            "-mavx512vl",
            "-mavx512dq",
            "-mfma",
        ]
    if capability == "AVX2":
        return ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma"]
    return []


def _use_cuda(torch, cuda_home):
    if os.environ.get("TORCHGRAPH_USE_CUDA", "1") == "0":
        print("torchgraph: TORCHGRAPH_USE_CUDA=0, skipping CUDA kernels")
        return False
    # NOTE: decide on the toolkit, not on a visible GPU (torchao's check), so that
    # GPU wheels can be built on CPU-only build machines that have nvcc.
    if torch.version.cuda is None or cuda_home is None:
        print("torchgraph: CUDA toolkit is not available, skipping CUDA kernels")
        return False
    return True


def get_extensions():
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension
    except ImportError:
        print("torchgraph: torch is not importable, building no C++ extension")
        return []

    debug = os.environ.get("DEBUG", "0") == "1"
    use_cuda = _use_cuda(torch, CUDA_HOME)

    cxx_flags = ["-O0", "-g"] if debug else ["-O3", "-g0"]
    cxx_flags += [f"-DPy_LIMITED_API={PY_LIMITED_API}", "-Wno-unknown-pragmas"]
    # NOTE: gcc 12 reports maybe-uninitialized inside its own AVX-512 intrinsic
    # headers (_mm512_undefined_*) for every Vectorized<T> use: pure noise.
    cxx_flags.append("-Wno-maybe-uninitialized")
    cxx_flags += _cpu_capability_flags(torch)
    link_flags = []
    if sys.platform.startswith("linux"):
        # NOTE: without -fopenmp at::parallel_for runs everything on one thread.
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    sources += sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    extra_compile_args = {"cxx": cxx_flags}
    extension = CppExtension
    if use_cuda:
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        extra_compile_args["nvcc"] = ["-O0", "-g", "-G"] if debug else ["-O3"]
        extension = CUDAExtension
    if not sources:
        return []

    return [
        extension(
            "torchgraph._C",
            sources,
            extra_compile_args=extra_compile_args,
            extra_link_args=link_flags,
            py_limited_api=True,
        )
    ]


def _cmdclass():
    try:
        from torch.utils.cpp_extension import BuildExtension
    except ImportError:
        return {}
    return {"build_ext": BuildExtension}


os.chdir(HERE)  # sources are globbed relative to the repository root
setup(
    ext_modules=get_extensions(),
    cmdclass=_cmdclass(),
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
