"""Build script: the Python package, the Triton kernels (as ``coordconv_fused.kernels``) and the
C++/CUDA extension ``coordconv_fused._C``. Metadata is in pyproject.toml.

Install with ``pip install --no-build-isolation -e .`` so the build sees the installed torch.

The extension always gets the CPU sources and the ops' autograd (csrc/*.cpp, csrc/cpu/,
csrc/autograd/); the test-only ops (csrc/testing/) are a second module,
``coordconv_fused._C_testing``, loaded by the tests alone. The CUDA sources (csrc/cuda/) are added
when a CUDA toolkit is found and either a GPU is visible or ``FORCE_CUDA=1`` (as torchvision does);
``TORCH_CUDA_ARCH_LIST`` picks the architectures (CI: "8.0;9.0").
``COORDCONV_NO_EXTENSION=1`` skips the extension: the pure-PyTorch backends still work.
"""

import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _extensions():
    if os.environ.get("COORDCONV_NO_EXTENSION") == "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp") + glob.glob("csrc/autograd/*.cpp"))
    # -fopenmp: ATen's at::parallel_for is inlined from its headers and runs its loop serially unless
    # the extension itself is compiled with OpenMP (libgomp is the one torch already loads).
    cxx = ["-O3", "-fopenmp"]
    link = ["-fopenmp"]
    force_cuda = os.environ.get("FORCE_CUDA") == "1"
    use_cuda = CUDA_HOME is not None and (torch.cuda.is_available() or force_cuda)
    if force_cuda and CUDA_HOME is None:
        sys.exit("FORCE_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME (e.g. /usr/local/cuda)")
    if use_cuda:
        include_dirs = []
        # pip's CUDA 13 wheels keep cuBLAS/cuSPARSE headers that torch's headers include here.
        for site in sys.path:
            candidate = os.path.join(site, "nvidia", "cu13", "include")
            if os.path.isdir(candidate):
                include_dirs.append(candidate)
                break
        ext = CUDAExtension(
            "coordconv_fused._C",
            sources + sorted(glob.glob("csrc/cuda/*.cu")),
            include_dirs=include_dirs,
            define_macros=[("COORDCONV_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--expt-relaxed-constexpr"]},
            extra_link_args=link,
        )
    else:
        ext = CppExtension("coordconv_fused._C", sources, extra_compile_args=cxx, extra_link_args=link)
    # Test-only ops (the CUDA backend's kernel bodies emulated on the CPU) in a module of their own,
    # which only the tests load.
    testing = CppExtension(
        "coordconv_fused._C_testing", sorted(glob.glob("csrc/testing/*.cpp")), extra_compile_args=cxx,
        extra_link_args=link,
    )  # fmt: skip
    return [ext, testing], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    # The Triton kernels live in the top-level kernels/ (the project's layout) and install as
    # coordconv_fused.kernels.
    packages=[
        "coordconv_fused",
        "coordconv_fused.backends",
        "coordconv_fused.ops",
        "coordconv_fused.paper",
        "coordconv_fused.kernels",
    ],
    package_dir={"coordconv_fused": "coordconv_fused", "coordconv_fused.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
