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

from coordconv_fused.benchmark import FLOOR, NAIVE, STANDARD_SHAPES, default_backends, held_bytes, make_providers

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
