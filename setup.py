"""Builds the native extension ``fastbptt._C`` from ``csrc/``.

* C++ CPU kernels are always built.
* CUDA kernels are built when the installed torch has CUDA and nvcc is found (never merely
  because a GPU is visible). ``FASTBPTT_CUDA=1`` forces them (and fails loudly if impossible),
  ``FASTBPTT_CUDA=0`` skips them. ``FASTBPTT_CUDA_ARCH`` sets the architectures (default:
  ``TORCH_CUDA_ARCH_LIST`` if set, else ``8.0;8.6;8.9;9.0``). ``MAX_JOBS`` bounds ninja's parallel compiles.
* ``FASTBPTT_SKIP_EXTENSION=1`` installs the pure-Python package only.

Install against the torch already installed: ``pip install --no-build-isolation -e .``
"""
import glob
import os

from setuptools import setup

CUDA_ARCH_DEFAULT = "8.0;8.6;8.9;9.0"


def _flag(name: str, default: str = "auto") -> str:
    value = os.environ.get(name, default).strip().lower()
    if value not in ("auto", "0", "1"):
        raise SystemExit(f"{name} must be 0, 1 or auto, got {value!r}")
    return value


def ext_modules_and_cmdclass():
    if _flag("FASTBPTT_SKIP_EXTENSION", "0") == "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    want = _flag("FASTBPTT_CUDA")
    have_cuda = torch.version.cuda is not None and CUDA_HOME is not None
    if want == "1" and not have_cuda:
        raise SystemExit("FASTBPTT_CUDA=1 but the installed torch has no CUDA or nvcc was not found "
                         f"(torch.version.cuda={torch.version.cuda}, CUDA_HOME={CUDA_HOME})")
    build_cuda = have_cuda and want != "0"

    sources = ["csrc/ops.cpp", "csrc/cell_ops.cpp", "csrc/cell_chain.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    # -fno-math-errno/-fno-trapping-math (torch's own flags) let the fused row loops in
    # csrc/cpu vectorize; no -march: AVX2 clones are picked at load time (csrc/cpu/common.h)
    # -fopenmp: at::parallel_for is a header-only `#pragma omp parallel`, so without it every
    # parallel_for in the extension runs on the calling thread.
    cxx_flags = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-fopenmp"]
    extra = {"cxx": cxx_flags}
    if build_cuda:
        # FASTBPTT_CUDA_ARCH wins over a TORCH_CUDA_ARCH_LIST that a CUDA image may set globally
        if "FASTBPTT_CUDA_ARCH" in os.environ:
            os.environ["TORCH_CUDA_ARCH_LIST"] = os.environ["FASTBPTT_CUDA_ARCH"]
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", CUDA_ARCH_DEFAULT)
        sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
        extra["nvcc"] = ["-O3", "--use_fast_math", "-lineinfo"]
        cxx_flags.append("-DFASTBPTT_WITH_CUDA")
        ext = CUDAExtension("fastbptt._C", sources, extra_compile_args=extra, extra_link_args=["-fopenmp"])
    else:
        ext = CppExtension("fastbptt._C", sources, extra_compile_args=extra, extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = ext_modules_and_cmdclass()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
