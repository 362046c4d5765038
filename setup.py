"""Builds helios._C with torch.utils.cpp_extension + ninja.

HELIOS_BUILD_EXT = auto | cpu | cuda | none (default auto):
  auto  C++ CPU ops always; CUDA kernels too when torch itself has CUDA (torch.version.cuda) and nvcc exists.
  cpu   C++ CPU ops only (also what HELIOS_SKIP_CUDA=1 forces).
  cuda  require the CUDA build.
  none  no extension (the package imports, but the engine refuses to start and says how to build).
Torch is a build dependency but not in [build-system].requires on purpose: install with
`pip install --no-build-isolation` so that pip never pulls another torch build.
"""

import os
import sys

from setuptools import find_packages, setup

CSRC = "csrc"
CPU_SOURCES = [f"{CSRC}/bindings.cpp", f"{CSRC}/block_allocator.cpp", f"{CSRC}/cpu/cache_ops.cpp",
               f"{CSRC}/cpu/softmax_ops.cpp", f"{CSRC}/cpu/layer_ops.cpp",
               f"{CSRC}/cpu/quant_ops.cpp", f"{CSRC}/cpu/linear_ops.cpp",
               f"{CSRC}/cpu/decode_stack.cpp", f"{CSRC}/cpu/head_ops.cpp"]
CUDA_SOURCES = [f"{CSRC}/cuda/cache_kernels.cu", f"{CSRC}/cuda/cache_ops_cuda.cpp"]


def build_mode() -> str:
    mode = os.environ.get("HELIOS_BUILD_EXT", "auto").lower()
    if mode not in {"auto", "cpu", "cuda", "none"}:
        sys.exit(f"HELIOS_BUILD_EXT must be auto, cpu, cuda or none, got {mode!r}")
    if os.environ.get("HELIOS_SKIP_CUDA", "") in {"1", "true", "TRUE"} and mode == "auto":
        mode = "cpu"
    return mode


def extensions():
    mode = build_mode()
    if mode == "none":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        sys.exit("helios-serve builds against the installed torch: `pip install torch` first, "
                 "then `pip install --no-build-isolation .`")
    want_cuda = mode == "cuda" or (mode == "auto" and torch.version.cuda is not None and CUDA_HOME is not None)
    if mode == "cuda" and (torch.version.cuda is None or CUDA_HOME is None):
        sys.exit("HELIOS_BUILD_EXT=cuda needs a CUDA build of torch and nvcc (CUDA_HOME)")
    cxx = ["-O3", "-fopenmp", "-fno-math-errno"]  # the C++ standard is torch's choice (C++20 for torch 2.13)
    if os.environ.get("HELIOS_NATIVE", "1") == "1":
        cxx.append("-march=native")  # source builds run where they are built; HELIOS_NATIVE=0 for portable wheels
    if want_cuda:
        ext = CUDAExtension(
            "helios._C", CPU_SOURCES + CUDA_SOURCES,
            define_macros=[("HELIOS_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--use_fast_math"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension("helios._C", CPU_SOURCES, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()

setup(
    packages=find_packages(include=["helios", "helios.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
