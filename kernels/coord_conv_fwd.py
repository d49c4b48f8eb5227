"""Fused CoordConv forward: one implicit-GEMM pass computing data convolution + coordinate term + bias.

The GEMM is ``Y[m, co] = sum_k A[m, k] B[k, co]`` with ``m`` = (n, od, oh, ow) and ``co`` the output
channel of one group. ``k`` runs first over the data taps (A read from ``x``, B from ``weight``) and
then over the coordinate taps (A *generated* by :func:`coord_tile` from indices — the coordinate
channels never exist in memory — and B from ``coord_weight``). Bias is added in the epilogue.
Accumulation is float32 (float64 for float64 tensors); ``INPUT_PRECISION`` selects tf32 or IEEE
float32 for ``tl.dot`` on GPUs. ``DOT_F32`` upcasts the operands to float32 before ``tl.dot``
(exact for 16-bit inputs); the launcher sets it only in Triton 3.8's interpreter, whose bfloat16
``tl.dot`` returns garbage.

Every problem is lifted to 3 spatial axes (1-D and 2-D as leading size-1 axes, an exact view).
Zero padding is applied in-kernel by masking; other padding modes arrive pre-padded (see
:mod:`coordconv_fused.ops`) and the coordinate padding rule is applied in-kernel.
"""

import triton
import triton.language as tl

from .coord_tile import coord_tile


@triton.jit
def coord_conv_fwd_kernel(
    X,
    W,
    CW,
    B,
    Y,
    M,
    C_G,
    COUT_G,
    DP,
    HP,
    WP,
    sxn,
    sxc,
    sxd,
    sxh,
    sxw,
    syn,
    syc,
    syd,
    syh,
    syw,
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
    K_DATA,
    K_COORD,
    NDIM: tl.constexpr,
    WITH_R: tl.constexpr,
    SEPARATE: tl.constexpr,
    PAD_MODE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    CT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    g = tl.program_id(2)

    # Output rows: m -> (n, od, oh, ow), in int64 so that N*DO*HO*WO may exceed 2**31.
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    ow = offs_m % WO
    t = offs_m // WO
    oh = t % HO
    t = t // HO
    od = t % DO
    n = t // DO
    # Output columns: channels of group g.
    co_local = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    co_ok = co_local < COUT_G
    co = (g * COUT_G + co_local).to(tl.int64)

    dtype = X.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=CT)
    taps = KD * KH * KW

    # Data taps: implicit im2col of x (zero padding by masking).
    x_rows = X + n[:, None] * sxn + (g * C_G).to(tl.int64) * sxc
    w_cols = W + co[None, :] * K_DATA
    for k0 in range(0, K_DATA, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < K_DATA
        ci = kk // taps
        tk = kk % taps
        pd = od[:, None] * SD - PD + (tk // (KH * KW))[None, :] * DD
        ph = oh[:, None] * SH - PH + ((tk // KW) % KH)[None, :] * DH
        pw = ow[:, None] * SW - PW + (tk % KW)[None, :] * DW
        a_ok = m_ok[:, None] & k_ok[None, :] & (pd >= 0) & (pd < DP) & (ph >= 0) & (ph < HP) & (pw >= 0) & (pw < WP)
        a = tl.load(x_rows + ci[None, :].to(tl.int64) * sxc + pd * sxd + ph * sxh + pw * sxw, mask=a_ok, other=0.0)
        b = tl.load(w_cols + kk[:, None], mask=k_ok[:, None] & co_ok[None, :], other=0.0)
        if DOT_F32:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION, out_dtype=CT)

    # Coordinate taps: A generated from indices, rounded to the input dtype like a concatenation.
    cw_cols = CW + co[None, :] * K_COORD
    for k0 in range(0, K_COORD, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
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
        ).to(dtype)
        b = tl.load(cw_cols + kk[:, None], mask=(kk < K_COORD)[:, None] & co_ok[None, :], other=0.0)
        if DOT_F32:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION, out_dtype=CT)

    if HAS_BIAS:
        acc += tl.load(B + co, mask=co_ok, other=0.0).to(CT)[None, :]

    y = Y + n[:, None] * syn + co[None, :] * syc + od[:, None] * syd + oh[:, None] * syh + ow[:, None] * syw
    tl.store(y, acc.to(dtype), mask=m_ok[:, None] & co_ok[None, :])
