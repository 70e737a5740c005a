"""Fast fp32 transcendentals shared by the QFL kernel and the DSLA S0 sum.

On the GPU (FAST=True) they are single hardware instructions through inline PTX:
ex2.approx.ftz (relative error ~2^-22), rcp.approx.ftz (1 ulp) and lg2.approx.ftz (absolute
error ~2^-22); Triton's tl.log2 / tl.exp may otherwise lower to the slower, exact libdevice
routines. Under TRITON_INTERPRET (FAST=False) they fall back to tl.exp2 / 1/x / tl.log2.

`softplus_sigmoid` is the element-wise core of both losses: for x it returns sigmoid(x),
sigmoid(-x) (exact where sigmoid(x) rounds to 1) and softplus(x) = BCE(x, 0), with
log1p(e) from its series for small e (where log2(1 + e) has lost e's low bits) and from
the hardware log2 elsewhere: relative error below 2e-6 everywhere.
"""
import os

import triton
import triton.language as tl
from triton.language.extra import libdevice

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


def fast_math_enabled():
    """Inline PTX on the GPU; the interpreter (TRITON_INTERPRET=1) cannot run it."""
    return os.environ.get("TRITON_INTERPRET", "0") != "1"


@triton.jit
def exp2_fast(x, FAST: tl.constexpr):
    if FAST:
        r = tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=r,r", [x],
                                      dtype=tl.float32, is_pure=True, pack=1)
    else:
        r = tl.exp2(x)
    return r


@triton.jit
def rcp_fast(x, FAST: tl.constexpr):
    if FAST:
        r = tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [x],
                                      dtype=tl.float32, is_pure=True, pack=1)
    else:
        r = 1.0 / x
    return r


@triton.jit
def log2_fast(x, FAST: tl.constexpr):
    if FAST:
        r = tl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=r,r", [x],
                                      dtype=tl.float32, is_pure=True, pack=1)
    else:
        r = tl.log2(x)
    return r


@triton.jit
def softplus_sigmoid(x, FAST: tl.constexpr):
    """x (fp32, any shape) -> (sigmoid(x), sigmoid(-x), softplus(x)), 3 hardware ops each."""
    e = exp2_fast(-tl.abs(x) * 1.4426950408889634, FAST)  # exp(-|x|) in (0, 1]
    w = 1.0 + e
    r = rcp_fast(w, FAST)
    er = e * r
    nonneg = x >= 0
    s = tl.where(nonneg, r, er)
    one_minus_s = tl.where(nonneg, er, r)
    # log1p(e): series up to e^7 below 1/8 (truncation < 1e-7 relative), hardware log2 above
    # (absolute error ~2e-7 on a value >= 0.117)
    series = e * (1.0 - e * (0.5 - e * (0.33333334 - e * (0.25 - e * (0.2 - e * (0.16666667 - e * 0.14285715))))))
    log1p_e = tl.where(e < 0.125, series, log2_fast(w, FAST) * 0.6931471805599453)
    return s, one_minus_s, tl.maximum(x, 0.0) + log1p_e


@triton.jit
def exp_rn(x, RN: tl.constexpr):
    """exp, correctly rounded as PyTorch's (libdevice) with RN; tl.exp otherwise (interpreter)."""
    if RN:
        r = libdevice.exp(x)
    else:
        r = tl.exp(x)
    return r


@triton.jit
def log_rn(x, RN: tl.constexpr):
    """log, correctly rounded as PyTorch's (libdevice) with RN; tl.log otherwise (interpreter)."""
    if RN:
        r = libdevice.log(x)
    else:
        r = tl.log(x)
    return r
