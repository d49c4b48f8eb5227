"""Ahead-of-time compilation of every kernel variant for real GPUs, with no GPU present.

``python -m coordconv_fused.kernels.aot [--arch 80 90]`` compiles each variant (dtype, with_r,
separate filter, bias, padding rule, rank; and every autotune configuration of one variant) to a
cubin with Triton's bundled ptxas, and prints one line per compile. Run it without
``TRITON_INTERPRET`` (the interpreter replaces the kernels by Python functions).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import itertools
import json
import os
import sys
import time

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from .coord_conv_fwd import coord_conv_fwd_kernel
from .coord_weight_grad import coord_weight_grad_kernel
from .launch import _FWD_CONFIGS, _GRAD_CONFIGS

__all__ = ["Variant", "variants", "compile_variant"]

# Largest shared memory a block may use (opt-in), per compute capability.
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
_PTR = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16", "fp64": "*fp64"}
_TL = {"fp32": tl.float32, "fp16": tl.float16, "bf16": tl.bfloat16, "fp64": tl.float64}


@dataclasses.dataclass(frozen=True)
class Variant:
    kernel: str  # "fwd" or "coord_weight_grad"
    dtype: str
    with_r: bool
    separate: bool
    bias: bool = True
    ndim: int = 2
    pad_mode: int = 0
    precision: str = "ieee"
    config: dict = dataclasses.field(default_factory=dict, hash=False)
    num_warps: int = 4
    num_stages: int = 3

    def name(self) -> str:
        cfg = ",".join(f"{k}={v}" for k, v in self.config.items())
        return (
            f"{self.kernel}[{self.dtype},{self.precision},ndim={self.ndim},with_r={self.with_r},"
            f"separate={self.separate},bias={self.bias},pad_mode={self.pad_mode},{cfg},"
            f"warps={self.num_warps},stages={self.num_stages}]"
        )


_FWD_DEFAULT = {"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 32}
_GRAD_DEFAULT = {"BLOCK_CO": 32, "BLOCK_P": 64, "BLOCK_K": 16}


def variants() -> list[Variant]:
    """Every semantic variant once, plus every autotune configuration of one variant."""
    out = []
    for dtype, with_r, separate, bias in itertools.product(_PTR, (False, True), (False, True), (False, True)):
        prec = "tf32" if dtype == "fp32" else "ieee"
        out.append(Variant("fwd", dtype, with_r, separate, bias, precision=prec, config=_FWD_DEFAULT))
    out.append(Variant("fwd", "fp32", True, False, True, precision="ieee", config=_FWD_DEFAULT))
    for ndim, pad_mode in [(1, 0), (3, 0), (2, 1), (2, 2), (2, 3), (3, 1)]:
        out.append(Variant("fwd", "fp32", True, False, True, ndim, pad_mode, "tf32", _FWD_DEFAULT))
    for dtype, with_r, separate in itertools.product(_PTR, (False, True), (False, True)):
        prec = "tf32" if dtype == "fp32" else "ieee"
        out.append(Variant("coord_weight_grad", dtype, with_r, separate, precision=prec, config=_GRAD_DEFAULT))
    for cfg in _FWD_CONFIGS:
        out.append(
            Variant(
                "fwd",
                "fp16",
                True,
                False,
                True,
                config=dict(cfg.kwargs),
                num_warps=cfg.num_warps,
                num_stages=cfg.num_stages,
            )
        )
    for cfg in _GRAD_CONFIGS:
        out.append(
            Variant(
                "coord_weight_grad",
                "fp16",
                True,
                False,
                config=dict(cfg.kwargs),
                num_warps=cfg.num_warps,
                num_stages=cfg.num_stages,
            )
        )
    return out


def _source(v: Variant) -> ASTSource:
    ct = tl.float64 if v.dtype == "fp64" else tl.float32
    common = dict(
        NDIM=v.ndim,
        WITH_R=v.with_r,
        SEPARATE=v.separate,
        PAD_MODE=v.pad_mode,
        CT=ct,
        INPUT_PRECISION=v.precision,
        **v.config,
    )
    if v.kernel == "fwd":
        kernel = coord_conv_fwd_kernel
        pointers = {n: _PTR[v.dtype] for n in ("X", "W", "CW", "B", "Y")}
        constexprs = dict(common, HAS_BIAS=v.bias, DOT_F32=False)
    else:
        kernel = coord_weight_grad_kernel
        pointers = {"GS": "*fp64" if v.dtype == "fp64" else "*fp32", "GCW": _PTR[v.dtype]}
        constexprs = dict(common, IN_DTYPE=_TL[v.dtype])
    signature = {p.name: "constexpr" if p.is_constexpr else pointers.get(p.name, "i32") for p in kernel.params}
    return ASTSource(kernel, signature, constexprs=constexprs)


def compile_variant(v: Variant, arch: int) -> dict:
    """Compile one variant for ``sm_<arch>``; returns a summary (raises if compilation fails)."""
    t0 = time.perf_counter()
    compiled = triton.compile(
        _source(v), target=GPUTarget("cuda", arch, 32), options={"num_warps": v.num_warps, "num_stages": v.num_stages}
    )
    cubin = compiled.asm["cubin"]
    return {
        "variant": v.name(),
        "arch": arch,
        "seconds": round(time.perf_counter() - t0, 2),
        "cubin_bytes": len(cubin),
        "shared_bytes": compiled.metadata.shared,
        "shared_limit": SHARED_LIMIT.get(arch),
        "ok": bool(cubin) and compiled.metadata.shared <= SHARED_LIMIT.get(arch, 48 * 1024),
    }


def _compile_one(args):
    v, arch = args
    try:
        return compile_variant(v, arch)
    except Exception as e:  # report every failure, not just the first
        return {"variant": v.name(), "arch": arch, "ok": False, "error": f"{type(e).__name__}: {e}"[:2000]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", help="write the summaries here")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: the interpreter cannot compile kernels", file=sys.stderr)
        return 2
    jobs = [(v, a) for a in args.arch for v in variants()]
    with concurrent.futures.ProcessPoolExecutor(args.jobs) as pool:
        results = list(pool.map(_compile_one, jobs))
    for r in results:
        status = "ok  " if r["ok"] else "FAIL"
        detail = r.get("error") or f"{r['seconds']:.1f}s cubin={r['cubin_bytes']}B shared={r['shared_bytes']}B"
        print(f"{status} sm_{r['arch']} {r['variant']} {detail}")
    failed = sum(not r["ok"] for r in results)
    print(f"{len(results) - failed} compiled, {failed} failed")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
