"""The ``cpp`` backend's measured kernel choices, kept in a file between processes.

The first call of each layer times the candidate implementations (see
:func:`coordconv_fused.backends.native.kernel_choices`); a process that saves its choices lets the
next one skip those measurements. A file records the machine it was measured on -- the CPU model
and its flags, the ISA caps in effect, the torch and package versions -- and is loaded only on the
same: a choice measured elsewhere is a guess, and measuring again costs a few calls. Within a
machine, a loaded choice is used only while its implementation is still a candidate for the layer
(otherwise the layer is measured again), and it never changes results beyond floating-point
reassociation (every candidate computes the same sums).

``COORDCONV_CPU_KERNEL_CACHE=path``: load the file at import if it exists, and save every choice
(those loaded and those measured since) when the process exits.
"""

from __future__ import annotations

import atexit
import hashlib
import importlib.metadata
import json
import os
import platform
import warnings

import torch

from . import native

__all__ = ["cpu_model_and_flags", "isa_caps", "machine_fingerprint", "save_kernel_choices", "load_kernel_choices"]

ENV_VAR = "COORDCONV_CPU_KERNEL_CACHE"
_FORMAT = 1
ISA_CAP_VARIABLES = ("COORDCONV_NO_AVX512", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")
"""Environment variables that cap the vector ISA: this package's AVX-512 kernels off, oneDNN's and
ATen's limits (with all at AVX2 a process computes as on an AVX2-only CPU)."""


def cpu_model_and_flags(cpuinfo: str = "/proc/cpuinfo") -> tuple[str, set[str]]:
    """The CPU's model name, with its family and model numbers where the file gives them (a virtual
    machine may show only "AMD EPYC": a Zen 1 and a Zen 3 then differ only there), and its feature
    flags (from ``cpuinfo``; the platform's processor name and no flags where there is none)."""
    model, flags = platform.processor() or platform.machine(), set()
    numbers: dict[str, str] = {}
    try:
        with open(cpuinfo) as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model in ("", platform.machine(), platform.processor()):
                    model = value.strip()
                elif key in ("cpu family", "model") and key not in numbers:
                    numbers[key] = value.strip()
                elif key == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    if len(numbers) == 2:
        model += f", family {numbers['cpu family']} model {numbers['model']}"
    return model, flags


def isa_caps() -> list[str]:
    """The ISA caps in effect, as ``NAME=value`` (see :data:`ISA_CAP_VARIABLES`)."""
    return [f"{k}={os.environ[k]}" for k in ISA_CAP_VARIABLES if os.environ.get(k)]


def machine_fingerprint() -> dict[str, str]:
    """What a measured choice depends on beyond the layer: the CPU (model, a hash of its feature
    flags), the ISA caps in the environment, and the torch and coordconv-fused versions."""
    model, flags = cpu_model_and_flags()
    try:
        version = importlib.metadata.version("coordconv-fused")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return {
        "cpu": model,
        "cpu_flags_sha256": hashlib.sha256(" ".join(sorted(flags)).encode()).hexdigest()[:16],
        "isa_caps": " ".join(isa_caps()),
        "torch": torch.__version__,
        "coordconv_fused": version,
    }


def save_kernel_choices(path: str | os.PathLike) -> int:
    """Write every choice of this process (measured or loaded) to ``path`` (JSON, replaced
    atomically); returns how many."""
    choices = native.kernel_choices()
    data = {"format": _FORMAT, "machine": machine_fingerprint(), "choices": choices}
    tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)
    return len(choices)


def load_kernel_choices(path: str | os.PathLike) -> int:
    """Add the choices saved in ``path`` to this process's (layers already measured here keep
    theirs); returns how many were added. A file from another machine, CPU feature set, ISA cap or
    version is not used (a warning says why); a file that is not a saved choice list raises."""
    if native.LOAD_ERROR is not None:
        return 0
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict) or data.get("format") != _FORMAT or not isinstance(data.get("choices"), list):
        raise ValueError(f"{os.fspath(path)!r} is not a file of coordconv-fused kernel choices (format {_FORMAT})")
    here = machine_fingerprint()
    saved = data.get("machine", {})
    differ = [f"{k}: {saved.get(k)!r} there, {v!r} here" for k, v in here.items() if saved.get(k) != v]
    if differ:
        warnings.warn(
            f"kernel choices in {os.fspath(path)!r} were measured elsewhere ({'; '.join(differ)}): "
            "not used, layers are measured again",
            stacklevel=2,
        )
        return 0
    return int(native._C.add_kernel_choices(data["choices"]))


def _from_environment() -> None:
    path = os.environ.get(ENV_VAR)
    if not path or native.LOAD_ERROR is not None:
        return
    if os.path.exists(path):
        load_kernel_choices(path)
    atexit.register(save_kernel_choices, path)


_from_environment()
