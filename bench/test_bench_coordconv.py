"""pytest-benchmark: CoordConv providers side by side against plain nn.Conv2d.

    pytest bench/ --benchmark-only --benchmark-group-by=group     (not part of the normal test run)

Groups are "shape | mode"; within a group compare `nn.Conv2d (floor)`, `naive cat` (the popular
ports), and a CoordConv2d per available backend and `auto`. `extra_info.held_bytes` is what the
provider keeps alive for backward. For the interleaved, paired comparison with targets, memory
peaks, a table and a plot, run `coordconv-fused bench --all-shapes`. Run with
GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736 (see README).
"""

import pytest
import torch

from coordconv_fused.backends import available_backends
from coordconv_fused.benchmark import FLOOR, NAIVE, STANDARD_SHAPES, default_backends, held_bytes, make_providers
from coordconv_fused.gpu_benchmark import GPU_SHAPES

BACKENDS = default_backends()
PROVIDERS = [FLOOR, NAIVE] + [f"coordconv[{b}]" for b in BACKENDS]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
@pytest.mark.parametrize("shape", STANDARD_SHAPES, ids=lambda s: s.name.replace(" ", "-"))
def test_coordconv_speed(benchmark, shape, mode, provider):
    fn = make_providers(shape, BACKENDS)[provider]
    x = torch.randn(shape.n, shape.c, shape.h, shape.w)
    benchmark.group = f"{shape} | {mode}"
    benchmark.extra_info["held_bytes"] = held_bytes(fn, x)
    if mode == "forward":

        def run():
            with torch.no_grad():
                fn(x)
    else:
        xg = x.clone().requires_grad_()

        def run():
            out = fn(xg)
            out.backward(torch.ones_like(out))

    benchmark.pedantic(run, rounds=10, iterations=1, warmup_rounds=2)


# ---- CUDA (where a GPU is visible): the GPU shapes in float32 and bfloat16 channels-last --------------
# Wall-clock around a synchronised call (pytest-benchmark's timer); the CUDA-event comparison with L2
# flushes, targets and a plot is `coordconv-fused bench --device cuda`.

CUDA_PROVIDERS = [FLOOR, NAIVE] + [f"coordconv[{b}]" for b in ["torch", "cuda", "triton", "auto"]]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU is visible")
@pytest.mark.parametrize("provider", CUDA_PROVIDERS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16-cl"])
@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
@pytest.mark.parametrize("shape", GPU_SHAPES[-5:], ids=lambda s: s.name.replace(" ", "-"))
def test_coordconv_speed_cuda(benchmark, shape, mode, dtype, provider):
    backend = provider[len("coordconv[") : -1] if provider.startswith("coordconv[") else None
    if backend not in (None, "auto") and backend not in available_backends("cuda"):
        pytest.skip(f"backend {backend!r} is not available here")
    fmt = torch.channels_last if dtype.endswith("-cl") else torch.contiguous_format
    dt = torch.bfloat16 if dtype.startswith("bfloat16") else torch.float32
    fn = make_providers(shape, [backend] if backend else [])[provider].to(device="cuda", dtype=dt)
    fn = fn.to(memory_format=fmt)
    x = torch.randn(shape.n, shape.c, shape.h, shape.w, device="cuda", dtype=dt).to(memory_format=fmt)
    benchmark.group = f"{shape} {dtype} | {mode} | cuda"
    xg = x.clone().requires_grad_()

    def run():
        if mode == "forward":
            with torch.no_grad():
                fn(x)
        else:
            out = fn(xg)
            out.backward(torch.ones_like(out))
        torch.cuda.synchronize()

    benchmark.pedantic(run, rounds=20, iterations=1, warmup_rounds=3)
