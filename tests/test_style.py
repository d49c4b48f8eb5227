"""The code style is checked, not hoped for: ruff (lint and format) on the Python, clang-format on
csrc/. The tools come with the test extras (pyproject.toml)."""

import glob
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = ["coordconv_fused", "kernels", "tests", "bench", "setup.py"]


def _tool(name: str) -> str:
    # next to this Python first (a virtual environment's scripts, activated or not), then on PATH
    beside = os.path.join(os.path.dirname(sys.executable), name)
    path = beside if os.access(beside, os.X_OK) else shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: pip install -e '.[test]' brings it")
    return path


def test_ruff_lint():
    proc = subprocess.run(
        [_tool("ruff"), "check", "--output-format", "concise", *PYTHON], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_ruff_format():
    proc = subprocess.run([_tool("ruff"), "format", "--check", *PYTHON], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, "run `ruff format`:\n" + proc.stdout + proc.stderr


def test_clang_format():
    sources = sorted(
        f for ext in ("cpp", "h", "cu", "cuh") for f in glob.glob(f"{ROOT}/csrc/**/*.{ext}", recursive=True)
    )
    assert sources
    proc = subprocess.run(
        [_tool("clang-format"), "--dry-run", "--Werror", *sources], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, "run `clang-format -i` on csrc/:\n" + proc.stderr[-3000:]


def test_mypy():
    proc = subprocess.run([_tool("mypy")], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-2000:]
