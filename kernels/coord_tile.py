"""In-kernel coordinate generation: the values of the implicit coordinate channels, from indices.

This is the Triton transcription of :mod:`coordconv_fused.coords` (the one definition of the
convention): ``(2*i - (n-1)) / (n-1)`` with an integer numerator and one correctly rounded
division (``div_rn`` in float32), 0 on an axis of size 1, and the radius ``sqrt_rn`` of the sum of
squares. Every problem is lifted to three spatial axes (D, H, W); a 1-D or 2-D problem has leading
axes of size 1, whose coordinate is 0, so the radius formula needs no special case.

``coord_tile`` returns the ``[P, K]`` tile of the coordinate "im2col" matrix: row = output
position (od, oh, ow), column = coordinate-kernel index ``kc``. For the full filter ``kc`` runs over
(channel, tap) and the value is the coordinate of the input element that tap reads, padded like
the data; for the separate 1x1 filter ``kc`` is the channel and the value is the coordinate of the
receptive field's centre.
"""

import triton
import triton.language as tl

# padding_mode codes shared with the launchers.
PAD_MODES = {"zeros": 0, "reflect": 1, "replicate": 2, "circular": 3}


@triton.jit
def _axis_coord(num, size, CT: tl.constexpr):
    """``num / (size - 1)`` (0 when ``size == 1``), correctly rounded, in dtype ``CT``."""
    den = tl.maximum(size - 1, 1).to(CT)
    if CT == tl.float32:
        v = tl.div_rn(num.to(CT), den)
    else:
        v = num.to(CT) / den
    return tl.where(size > 1, v, 0.0)


@triton.jit
def _map_index(i, n, PAD_MODE: tl.constexpr):
    """Image index that padded index ``i`` (may be outside ``[0, n)``) reads under ``PAD_MODE``."""
    if PAD_MODE == 1:  # reflect (edge not repeated)
        i = tl.where(i < 0, -i, i)
        i = tl.where(i >= n, 2 * (n - 1) - i, i)
    elif PAD_MODE == 2:  # replicate
        i = tl.minimum(tl.maximum(i, 0), n - 1)
    elif PAD_MODE == 3:  # circular
        i = ((i % n) + n) % n
    return i


@triton.jit
def coord_tile(
    od,
    oh,
    ow,  # [P, 1] output position
    kc,  # [1, K] coordinate-kernel index
    K_COORD,  # number of valid kc
    DP,
    HP,
    WP,  # spatial size of the (explicitly pre-padded) input tensor
    ID,
    IH,
    IW,  # spatial size of the image (before the explicit pre-padding)
    BD,
    BH,
    BW,  # explicit pre-padding before the first element
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
    KW,  # stride, conv zero padding, dilation, kernel
    NDIM: tl.constexpr,
    WITH_R: tl.constexpr,
    SEPARATE: tl.constexpr,
    PAD_MODE: tl.constexpr,
    CT: tl.constexpr,
):
    if SEPARATE:
        c = kc
        # Centre of the receptive field: h* = o*s - pad_before + dil*(k-1)/2, so the numerator of
        # (2*h* - (n-1)) is an integer.
        vd = _axis_coord(2 * SD * od + (DD * (KD - 1) - 2 * (BD + PD) - (ID - 1)), ID, CT)
        vh = _axis_coord(2 * SH * oh + (DH * (KH - 1) - 2 * (BH + PH) - (IH - 1)), IH, CT)
        vw = _axis_coord(2 * SW * ow + (DW * (KW - 1) - 2 * (BW + PW) - (IW - 1)), IW, CT)
        valid = kc < K_COORD
    else:
        taps = KD * KH * KW
        c = kc // taps
        t = kc % taps
        td = t // (KH * KW)
        th = (t // KW) % KH
        tw = t % KW
        # Position read in the pre-padded input; outside it lies the convolution's zero padding.
        pd = od * SD - PD + td * DD
        ph = oh * SH - PH + th * DH
        pw = ow * SW - PW + tw * DW
        valid = (kc < K_COORD) & (pd >= 0) & (pd < DP) & (ph >= 0) & (ph < HP) & (pw >= 0) & (pw < WP)
        id_ = pd - BD
        ih = ph - BH
        iw = pw - BW
        if PAD_MODE == 0:
            valid = valid & (id_ >= 0) & (id_ < ID) & (ih >= 0) & (ih < IH) & (iw >= 0) & (iw < IW)
        else:
            id_ = _map_index(id_, ID, PAD_MODE)
            ih = _map_index(ih, IH, PAD_MODE)
            iw = _map_index(iw, IW, PAD_MODE)
        vd = _axis_coord(2 * id_ - (ID - 1), ID, CT)
        vh = _axis_coord(2 * ih - (IH - 1), IH, CT)
        vw = _axis_coord(2 * iw - (IW - 1), IW, CT)
    # Channel c < NDIM is the coordinate along axis (3 - NDIM + c); channel NDIM is the radius.
    axis = c + (3 - NDIM)
    v = tl.where(axis == 0, vd, tl.where(axis == 1, vh, vw))
    if WITH_R:
        sq = vd * vd + vh * vh + vw * vw
        if CT == tl.float32:
            r = tl.sqrt_rn(sq)
        else:
            r = tl.sqrt(sq)
        v = tl.where(c == NDIM, r, v)
    return tl.where(valid, v, 0.0)
