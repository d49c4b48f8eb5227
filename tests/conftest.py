import os

import torch

# Without a GPU, Triton's interpreter runs the kernels on CPU tensors; it must be chosen before any
# kernel is defined, i.e. before coordconv_fused.kernels is imported. With one, the kernels are
# compiled for it (the interpreter would run them on CUDA tensors, slowly, and Triton 3.6's fails
# under NumPy 2.4), and the CPU tests of the Triton kernels are skipped.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from coordconv_fused import available_backends
from coordconv_fused.testing import why_backend_may_be_missing

# Keep the suite deterministic and quiet on 2-core machines.
torch.set_num_threads(min(2, os.cpu_count() or 1))

# What the run could not test, and why: printed at the end (see pytest_terminal_summary).
_SKIPPED_BACKENDS: dict[tuple[str, str], str] = {}


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "backend(name, device='cpu'): the test needs this backend; it fails (never skips) "
        "where the backend should be available",
    )


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def exact_cuda():
    """TF32 off, so float32 is compared at float32's precision."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture
def device_path():
    """The ``torch`` backend's path off the CPU on CPU tensors, registered as backend
    "torch_device_path" for the test's duration."""
    from coordconv_fused import backends
    from coordconv_fused.testing import device_path_torch_backend

    with backends.temporary_backend(device_path_torch_backend()) as name:
        yield name


@pytest.fixture
def emulated_cuda():
    """The CUDA backend's host code and kernel bodies on the CPU (the test extension
    coordconv_fused._C_testing), registered as backend "cuda_emulated" for the test's duration."""
    from coordconv_fused import backends
    from coordconv_fused.testing import emulated_cuda_backend

    try:
        backend = emulated_cuda_backend()
    except ImportError as e:
        reason = why_backend_may_be_missing("cpp")
        if reason is None:
            pytest.fail(f"the test extension coordconv_fused._C_testing should be built here but is not: {e}")
        pytest.skip(f"the CUDA emulation: {reason}")
    with backends.temporary_backend(backend) as name:
        yield name


def _needed_backends(item) -> list[tuple[str, str]]:
    params = getattr(getattr(item, "callspec", None), "params", {})
    device = str(params.get("device", "cpu"))
    needed = []
    if isinstance(params.get("backend"), str):
        needed.append((params["backend"], device))
    for mark in item.iter_markers("backend"):
        needed.append((mark.args[0], mark.kwargs.get("device", mark.args[1] if len(mark.args) > 1 else device)))
    if device == "cuda" and not needed:
        needed.append(("torch", "cuda"))
    return needed


def pytest_runtest_setup(item):
    """A test that names a backend (a ``backend`` parameter or the ``backend`` marker) fails if that
    backend should be usable here and is not, and skips, saying why, where it legitimately is not
    (no GPU visible, an install without the extension, a torch without Triton)."""
    for name, device in _needed_backends(item):
        if device == "cuda" and not torch.cuda.is_available():
            _SKIPPED_BACKENDS[(name, device)] = "no CUDA GPU is visible"
            pytest.skip(f"backend {name!r} on cuda: no CUDA GPU is visible")
        if (name in ("auto", "reference", "torch") and device == "cpu") or name not in _registered():
            continue  # always there, or a backend the test registers itself
        reason = why_backend_may_be_missing(name, device)
        if reason is not None:
            _SKIPPED_BACKENDS[(name, device)] = reason
            pytest.skip(f"backend {name!r} on {device}: {reason}")
        if name != "auto" and name not in available_backends(device):
            from coordconv_fused.backends import get_backend

            why = get_backend(name).unavailable_reason() or f"it does not run on {device} tensors"
            pytest.fail(f"backend {name!r} should be usable on {device} here but is not: {why}", pytrace=False)


def _registered() -> list[str]:
    from coordconv_fused.backends import backend_names

    return backend_names()


def pytest_terminal_summary(terminalreporter):
    if _SKIPPED_BACKENDS:
        terminalreporter.section("coordconv-fused: backends not tested in this run")
        for (name, device), reason in sorted(_SKIPPED_BACKENDS.items()):
            terminalreporter.write_line(f"{name} on {device}: {reason}")
