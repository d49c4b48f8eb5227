"""Build script: the Python package, the Triton kernels (as ``coordconv_fused.kernels``) and, once
``csrc/`` has sources, the C++/CUDA extension ``coordconv_fused._C``. Metadata is in pyproject.toml.

Install with ``pip install --no-build-isolation -e .`` so the build sees the installed torch.
"""

from setuptools import setup

setup(
    packages=["coordconv_fused", "coordconv_fused.kernels"],
    package_dir={"coordconv_fused": "coordconv_fused", "coordconv_fused.kernels": "kernels"},
)
