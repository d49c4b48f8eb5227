"""run.sh's set-up is idempotent and fast when nothing changed: no pip, no rebuild."""

import os
import subprocess
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAMP = os.path.join(ROOT, "build", ".run-sh-install-stamp")


def test_setup_twice_does_not_rebuild():
    if not os.path.exists(STAMP):
        pytest.skip("the package was not installed through run.sh here (no set-up stamp to reuse)")
    start = time.monotonic()
    proc = subprocess.run(
        ["bash", os.path.join(ROOT, "run.sh"), "setup", "test"], capture_output=True, text=True, timeout=120
    )
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr
    assert "installed and up to date (no rebuild)" in proc.stderr, proc.stderr
    assert elapsed < 30, f"set-up with nothing to do took {elapsed:.0f} s"
