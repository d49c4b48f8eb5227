import os

# Triton's interpreter runs the kernels on CPU tensors; it must be chosen before any kernel is
# defined, i.e. before coordconv_fused.kernels is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

# Keep the suite deterministic and quiet on 2-core machines.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
