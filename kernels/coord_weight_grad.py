"""Gradient of ``coord_weight``: ``G[co, kc] = sum_p grad_sum[co, p] * A[p, kc]``.

``grad_sum`` is ``grad_output.sum(0)`` (the coordinate term does not depend on the sample, so the
batch folds away before this kernel) and ``A`` is the coordinate im2col tile generated in-kernel by
:func:`coord_tile` — the same generator as the forward kernel, so both passes see the same values.
A GEMM over output positions ``p``, tiled over (co, kc); float32 accumulation (float64 for
float64).
"""

import triton
import triton.language as tl

from .coord_tile import coord_tile


@triton.jit
def coord_weight_grad_kernel(
    GS,
    GCW,
    COUT,
    DP,
    HP,
    WP,
    DO,
    HO,
    WO,
    ID,
    IH,
    IW,
    BD,
    BH,
    BW,
    SD,
    SH,
    SW,
    PD,
    PH,
    PW,
    DD,
    DH,
    DW,
    KD,
    KH,
    KW,
    K_COORD,
    NDIM: tl.constexpr,
    WITH_R: tl.constexpr,
    SEPARATE: tl.constexpr,
    PAD_MODE: tl.constexpr,
    IN_DTYPE: tl.constexpr,
    CT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_CO: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_co = tl.program_id(0)
    pid_k = tl.program_id(1)
    co = pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
    co_ok = co < COUT
    kk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    P = DO * HO * WO
    acc = tl.zeros((BLOCK_CO, BLOCK_K), dtype=CT)
    gs_rows = GS + co[:, None].to(tl.int64) * P
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        p_ok = p < P
        ow = p % WO
        t = p // WO
        oh = t % HO
        od = t // HO
        g = tl.load(gs_rows + p[None, :], mask=co_ok[:, None] & p_ok[None, :], other=0.0).to(CT)
        a = coord_tile(
            od[:, None],
            oh[:, None],
            ow[:, None],
            kk[None, :],
            K_COORD,
            DP,
            HP,
            WP,
            ID,
            IH,
            IW,
            BD,
            BH,
            BW,
            SD,
            SH,
            SW,
            PD,
            PH,
            PW,
            DD,
            DH,
            DW,
            KD,
            KH,
            KW,
            NDIM,
            WITH_R,
            SEPARATE,
            PAD_MODE,
            CT,
        )
        # Round to the input dtype, as the forward (and a concatenation) does.
        a = tl.where(p_ok[:, None], a.to(IN_DTYPE).to(CT), 0.0)
        acc = tl.dot(g, a, acc, input_precision=INPUT_PRECISION, out_dtype=CT)
    out = GCW + co[:, None].to(tl.int64) * K_COORD + kk[None, :]
    tl.store(out, acc.to(GCW.dtype.element_ty), mask=co_ok[:, None] & (kk < K_COORD)[None, :])
