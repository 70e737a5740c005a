"""Fused Dynamic Soft Label Assigner (SPEC section 2) in Triton: `dsl_assign_triton`.

Same results as `rtmdet.ops.dsl_assign_ref` (ties: a gt prefers the lower prior index, a
contested prior the cheaper gt then the lower gt index), without any (B, N, G) tensor.

Passes (all on device, fixed grids, no host synchronisation; B, N, G are runtime ints):
  1. prior pass, grid (B * N/BLOCK_N): valid[b, n] (inside a real gt) and, unless fused into
     pass 2, S0[b, n] = sum_c f(x[n, c], 0) (mmdet only), streaming each logits row once.
  2. candidate pass, grid (B * SPLITS * G/BLOCK_G): a (BLOCK_G, BLOCK_N) tile of IoU and cost
     in registers per step over the split's priors; keeps per gt the KL (16 or 32) largest
     IoUs and the KL smallest keys (ordered(cost) << 32 | n) of valid priors, merged with
     tl.sort. With one gt block (G <= BLOCK_G) it also computes S0 itself, so the gathers
     x[n, L_g] hit rows it has just streamed. Writes (B, G, SPLITS, KL) partial lists.
  3. select, grid (B * G/BLOCK_G2): merges the partial lists, k = int(sum of the topk largest
     IoUs, added in descending order), and for each of the k cheapest priors does integer
     atomics: count[b, n] += 1, owner[b, n] = max(owner, g); a prior reaching count 2 is
     appended (atomic counter) to a per-image list of contested priors.
  4. resolve, grid (B * CAP/BLOCK_P): each contested prior recomputes its cost against every
     real gt and keeps the cheapest (key (ordered(cost) << 32) | g, so ties go to lower g).
  5. finish, grid (B * N/BLOCK_N): gt index, label and the matched pair's IoU per prior.
Only integer atomics are used and the contested list's order does not affect any result,
so outputs are bitwise deterministic.

Precision: IoU and the centre distance are computed with correctly rounded operations
(no FMA contraction on the GPU), so IoUs, and hence dynamic k, match the reference exactly;
transcendental functions use libdevice on the GPU and numpy under TRITON_INTERPRET.
"""
import os

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton
from triton.language.extra import libdevice

# Tunables. BLOCK_N priors x BLOCK_G gts per candidate tile; TARGET_PROGRAMS sets how many
# splits of the priors pass 2 uses when B * G/BLOCK_G is small; FUSE_S0_MAX_GT: compute S0
# inside pass 2 when it has at most this many gt blocks (each re-streams the logits).
TUNING = dict(block_n=64, block_g=32, block_c=32, block_n_prior=128, block_g_select=16,
              block_p=16, target_programs=528, max_splits=64, fuse_s0_max_gt=1,
              num_warps_candidate=8, num_warps=4)
MAX_TOPK = 32
_SENTINEL = tl.constexpr(0x7FFFFFFFFFFFFFFF)  # key of "no candidate": above every real key


def _precise():
    """Use libdevice (correctly rounded mul/add, accurate exp/log/pow): not in the interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") != "1"


# ----------------------------------------------------------------------------------------
# Element-wise helpers (shared by every pass so that recomputed costs are bitwise equal)
# ----------------------------------------------------------------------------------------

@triton.jit
def _mul(a, b, RN: tl.constexpr):
    # Products that feed an addition go through mul_rn so the GPU cannot fuse them into an FMA
    # (the reference rounds every operation).
    if RN:
        r = libdevice.mul_rn(a, b)
    else:
        r = a * b
    return r


@triton.jit
def _exp(x, RN: tl.constexpr):
    if RN:
        r = libdevice.exp(x)
    else:
        r = tl.exp(x)
    return r


@triton.jit
def _log(x, RN: tl.constexpr):
    if RN:
        r = libdevice.log(x)
    else:
        r = tl.log(x)
    return r


@triton.jit
def _log1p(x, RN: tl.constexpr):
    if RN:
        r = libdevice.log1p(x)
    else:
        u = 1.0 + x  # Goldberg's trick: log(u) * x / (u - 1) is accurate for small x
        r = tl.where(u == 1.0, x, tl.log(u) * (x / tl.where(u == 1.0, 1.0, u - 1.0)))
    return r


@triton.jit
def _pow10(z, RN: tl.constexpr):
    if RN:
        r = libdevice.pow(tl.full(z.shape, 10.0, tl.float32), z)
    else:
        r = tl.exp2(z.to(tl.float64) * 3.321928094887362).to(tl.float32)
    return r


@triton.jit
def _soft_cost(x, y, RN: tl.constexpr):
    """f(x, y) = BCEWithLogits(x, y) * (y - sigmoid(x))^2 in fp32."""
    e = _exp(-tl.abs(x), RN)
    sig = tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    bce = (tl.maximum(x, 0.0) - _mul(x, y, RN)) + _log1p(e, RN)
    d = y - sig
    return _mul(bce, _mul(d, d, RN), RN)


@triton.jit
def _soft_cost0(x, RN: tl.constexpr):
    """f(x, 0)."""
    e = _exp(-tl.abs(x), RN)
    sig = tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    bce = tl.maximum(x, 0.0) + _log1p(e, RN)
    return _mul(bce, _mul(sig, sig, RN), RN)


@triton.jit
def _iou(bx1, by1, bx2, by2, gx1, gy1, gx2, gy2, RN: tl.constexpr):
    """IoU = inter / max(union, 1e-6), rounded as the reference (broadcasting arguments)."""
    area_b = _mul(bx2 - bx1, by2 - by1, RN)
    area_g = _mul(gx2 - gx1, gy2 - gy1, RN)
    w = tl.maximum(tl.minimum(bx2, gx2) - tl.maximum(bx1, gx1), 0.0)
    h = tl.maximum(tl.minimum(by2, gy2) - tl.maximum(by1, gy1), 0.0)
    inter = _mul(w, h, RN)
    union = tl.maximum((area_b + area_g) - inter, 1e-6)
    return tl.math.div_rn(inter, union)


@triton.jit
def _pair_cost(iou, px, py, stride, s0, xl, gx1, gy1, gx2, gy2, radius, iou_weight,
               MMDET: tl.constexpr, RN: tl.constexpr):
    """cost = cls_cost + iou_cost + center_cost (SPEC 2.3), added in the reference's order."""
    dx = px - (gx1 + gx2) * 0.5
    dy = py - (gy1 + gy2) * 0.5
    dist = tl.math.div_rn(tl.math.sqrt_rn(_mul(dx, dx, RN) + _mul(dy, dy, RN)), stride)
    center = _pow10(dist - radius, RN)
    iou_cost = _mul(-_log(iou + 1e-7, RN), iou_weight, RN)
    cls = _soft_cost(xl, iou, RN)
    if MMDET:
        cls = (s0 - _soft_cost0(xl, RN)) + cls
    return (cls + iou_cost) + center


@triton.jit
def _key(cost, idx):
    """(ordered int32 of cost) << 32 | idx as int64: signed order = (cost, idx) order."""
    cost = tl.where(cost == 0.0, 0.0, cost)  # -0.0 == +0.0
    bits = cost.to(tl.int32, bitcast=True)
    ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    return (ordered.to(tl.int64) << 32) | idx.to(tl.int64)


@triton.jit
def _insert_smallest(keys, tile, KL: tl.constexpr):
    """keys (R, KL): the KL smallest keys seen so far, unsorted (SENTINEL = empty slot);
    tile (R, M) of distinct keys. Inserts the tile's keys below the current worst kept one,
    smallest first, each replacing the worst: as many steps as the most improved row needs
    (usually 0 or 1 once the list is warm), never a sort."""
    slot = tl.arange(0, KL)[None, :]
    worst = tl.max(keys, axis=1)
    cand = tl.where(tile < worst[:, None], tile, _SENTINEL)
    steps = tl.minimum(tl.max(tl.sum((cand != _SENTINEL).to(tl.int32), axis=1)), KL)
    i = 0
    while i < steps:
        m = tl.min(cand, axis=1)
        cand = tl.where(cand == m[:, None], _SENTINEL, cand)
        at = tl.argmax(keys, axis=1)
        keys = tl.where((slot == at[:, None]) & (m < worst)[:, None], m[:, None], keys)
        worst = tl.max(keys, axis=1)
        i += 1
    return keys


@triton.jit
def _insert_largest(vals, tile, M: tl.constexpr, KL: tl.constexpr):
    """vals (R, KL): the KL largest IoUs seen so far (0 = empty, IoUs are >= 0); tile (R, M)."""
    slot = tl.arange(0, KL)[None, :]
    col = tl.arange(0, M)[None, :]
    low = tl.min(vals, axis=1)
    cand = tl.where(tile > low[:, None], tile, -1.0)
    steps = tl.minimum(tl.max(tl.sum((cand >= 0.0).to(tl.int32), axis=1)), KL)
    i = 0
    while i < steps:
        m = tl.max(cand, axis=1)
        cand = tl.where(col == tl.argmax(cand, axis=1)[:, None], -1.0, cand)
        at = tl.argmin(vals, axis=1)
        vals = tl.where((slot == at[:, None]) & (m > low)[:, None], m[:, None], vals)
        low = tl.min(vals, axis=1)
        i += 1
    return vals


@triton.jit
def _row_s0(logits_ptr, row, nmask, C, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
            C_BLOCKS: tl.constexpr, RN: tl.constexpr):
    """S0 = sum_c f(x[row, c], 0) for a (BLOCK_N,) vector of int64 rows."""
    acc = tl.zeros((BLOCK_N,), tl.float32)
    for cb in range(C_BLOCKS):
        c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
        m = nmask[:, None] & (c < C)[None, :]
        x = tl.load(logits_ptr + row[:, None] * C + c[None, :], mask=m, other=0.0).to(tl.float32)
        acc += tl.sum(tl.where(m, _soft_cost0(x, RN), 0.0), axis=1)
    return acc


# ----------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------

@triton.jit
def _prior_kernel(priors_ptr, logits_ptr, gtb_ptr, gtm_ptr, s0_ptr, valid_ptr, N, G, C, NT,
                  WITH_S0: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr,
                  BLOCK_C: tl.constexpr, C_BLOCKS: tl.constexpr, RN: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // NT
    n = (pid % NT) * BLOCK_N + tl.arange(0, BLOCK_N)
    nm = n < N
    px = tl.load(priors_ptr + n * 4, mask=nm, other=0.0).to(tl.float32)
    py = tl.load(priors_ptr + n * 4 + 1, mask=nm, other=0.0).to(tl.float32)
    inside = tl.zeros((BLOCK_N,), tl.int32)
    g0 = 0
    while g0 < G:
        g = g0 + tl.arange(0, BLOCK_G)
        g0 += BLOCK_G
        gm = g < G
        real = tl.load(gtm_ptr + b * G + g, mask=gm, other=0) != 0
        gb = gtb_ptr + (b * G + g) * 4
        x1 = tl.load(gb, mask=gm, other=0.0)[None, :]
        y1 = tl.load(gb + 1, mask=gm, other=0.0)[None, :]
        x2 = tl.load(gb + 2, mask=gm, other=0.0)[None, :]
        y2 = tl.load(gb + 3, mask=gm, other=0.0)[None, :]
        d = tl.minimum(tl.minimum(px[:, None] - x1, py[:, None] - y1),
                       tl.minimum(x2 - px[:, None], y2 - py[:, None]))
        hit = (d > 0) & real[None, :]
        inside = tl.maximum(inside, tl.max(hit.to(tl.int32), axis=1))
    row = b.to(tl.int64) * N + n
    tl.store(valid_ptr + row, inside.to(tl.int8), mask=nm)
    if WITH_S0:
        tl.store(s0_ptr + row, _row_s0(logits_ptr, row, nm, C, BLOCK_N, BLOCK_C, C_BLOCKS, RN), mask=nm)


@triton.jit
def _candidate_kernel(priors_ptr, pred_ptr, logits_ptr, s0_ptr, valid_ptr, gtb_ptr, gtl_ptr,
                      gtm_ptr, part_key_ptr, part_iou_ptr, N, G, C, GT, S, split_len,
                      radius, iou_weight, MMDET: tl.constexpr, FUSE_S0: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr,
                      C_BLOCKS: tl.constexpr, KL: tl.constexpr, RN: tl.constexpr):
    pid = tl.program_id(0)
    gblk = pid % GT
    s = (pid // GT) % S
    b = pid // (GT * S)
    g = gblk * BLOCK_G + tl.arange(0, BLOCK_G)
    gm = g < G
    real = (tl.load(gtm_ptr + b * G + g, mask=gm, other=0) != 0) & gm
    label = tl.load(gtl_ptr + b * G + g, mask=gm, other=0)
    label = tl.minimum(tl.maximum(label, 0), C - 1).to(tl.int64)
    gb = gtb_ptr + (b * G + g) * 4
    gx1 = tl.load(gb, mask=gm, other=0.0)[:, None]
    gy1 = tl.load(gb + 1, mask=gm, other=0.0)[:, None]
    gx2 = tl.load(gb + 2, mask=gm, other=0.0)[:, None]
    gy2 = tl.load(gb + 3, mask=gm, other=0.0)[:, None]

    keys = tl.full((BLOCK_G, KL), _SENTINEL, tl.int64)
    top_iou = tl.zeros((BLOCK_G, KL), tl.float32)
    n_lo = s * split_len
    n_hi = tl.minimum(n_lo + split_len, N)
    n0 = n_lo
    while n0 < n_hi:
        n = n0 + tl.arange(0, BLOCK_N)
        n0 += BLOCK_N
        nm = n < n_hi
        row = b.to(tl.int64) * N + n
        pb = pred_ptr + row * 4
        bx1 = tl.load(pb, mask=nm, other=0.0)[None, :]
        by1 = tl.load(pb + 1, mask=nm, other=0.0)[None, :]
        bx2 = tl.load(pb + 2, mask=nm, other=0.0)[None, :]
        by2 = tl.load(pb + 3, mask=nm, other=0.0)[None, :]
        valid = tl.load(valid_ptr + row, mask=nm, other=0) != 0
        iou = _iou(bx1, by1, bx2, by2, gx1, gy1, gx2, gy2, RN)         # (BLOCK_G, BLOCK_N)
        if MMDET:
            counted = valid[None, :] & real[:, None]
        else:
            counted = nm[None, :] & real[:, None]
        top_iou = _insert_largest(top_iou, tl.where(counted, iou, 0.0), BLOCK_N, KL)
        pair = valid[None, :] & real[:, None]
        if tl.max(pair.to(tl.int32)) > 0:
            px = tl.load(priors_ptr + n * 4, mask=nm, other=0.0)[None, :]
            py = tl.load(priors_ptr + n * 4 + 1, mask=nm, other=0.0)[None, :]
            stride = tl.load(priors_ptr + n * 4 + 2, mask=nm, other=1.0)[None, :]
            if MMDET:
                if FUSE_S0:
                    s0v = _row_s0(logits_ptr, row, nm & valid, C, BLOCK_N, BLOCK_C, C_BLOCKS, RN)
                    tl.store(s0_ptr + row, s0v, mask=nm & valid)   # pass 4 reads it back
                else:
                    s0v = tl.load(s0_ptr + row, mask=nm, other=0.0)
                s0 = s0v[None, :]
            else:
                s0 = 0.0
            xl = tl.load(logits_ptr + row[None, :] * C + label[:, None], mask=pair,
                         other=0.0).to(tl.float32)
            cost = _pair_cost(iou, px, py, stride, s0, xl, gx1, gy1, gx2, gy2, radius,
                              iou_weight, MMDET, RN)
            key = tl.where(pair, _key(cost, n[None, :]), _SENTINEL)
            keys = _insert_smallest(keys, key, KL)
    j = tl.arange(0, KL)[None, :]
    out = ((b * G + g).to(tl.int64)[:, None] * S + s) * KL + j
    tl.store(part_key_ptr + out, keys, mask=gm[:, None])
    tl.store(part_iou_ptr + out, top_iou, mask=gm[:, None])


@triton.jit
def _select_kernel(part_key_ptr, part_iou_ptr, gtm_ptr, count_ptr, owner_ptr, clist_ptr,
                   ccount_ptr, N, G, GT, CAP, TOPK: tl.constexpr, BLOCK_G: tl.constexpr,
                   SK: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // GT
    g = (pid % GT) * BLOCK_G + tl.arange(0, BLOCK_G)
    gm = g < G
    real = (tl.load(gtm_ptr + b * G + g, mask=gm, other=0) != 0) & gm
    col = tl.arange(0, SK)[None, :]
    off = (b * G + g).to(tl.int64)[:, None] * SK + col   # the gt's SPLITS partial lists
    vals = tl.load(part_iou_ptr + off, mask=gm[:, None], other=0.0)
    keys = tl.load(part_key_ptr + off, mask=gm[:, None], other=_SENTINEL)
    # Dynamic k: the TOPK largest IoUs added one by one in descending order, as the reference.
    total = tl.zeros((BLOCK_G,), tl.float32)
    for i in range(TOPK):
        total = total + tl.max(vals, axis=1)
        vals = tl.where(col == tl.argmax(vals, axis=1)[:, None], -1.0, vals)
    k = tl.maximum(total.to(tl.int32), 1)
    # The k cheapest candidates, in order (keys are distinct).
    for i in range(TOPK):
        m = tl.min(keys, axis=1)
        keys = tl.where(keys == m[:, None], _SENTINEL, keys)
        sel = (i < k) & (m != _SENTINEL) & real
        slot_ = b.to(tl.int64) * N + (m & 0xFFFFFFFF)
        old = tl.atomic_add(count_ptr + slot_, 1, mask=sel)
        tl.atomic_max(owner_ptr + slot_, g, mask=sel)
        second = sel & (old == 1)  # the prior just became contested: list it once
        pos = tl.atomic_add(ccount_ptr + b + 0 * g, 1, mask=second)
        tl.store(clist_ptr + b.to(tl.int64) * CAP + pos, (m & 0xFFFFFFFF).to(tl.int32),
                 mask=second & (pos < CAP))


@triton.jit
def _resolve_kernel(priors_ptr, pred_ptr, logits_ptr, s0_ptr, gtb_ptr, gtl_ptr, gtm_ptr,
                    owner_ptr, clist_ptr, ccount_ptr, N, G, C, CAP, PT, radius, iou_weight,
                    MMDET: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_G: tl.constexpr,
                    RN: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // PT
    start = (pid % PT) * BLOCK_P
    count = tl.load(ccount_ptr + b)
    if start < count:
        p = start + tl.arange(0, BLOCK_P)
        pm = p < count
        n = tl.load(clist_ptr + b.to(tl.int64) * CAP + p, mask=pm, other=0)
        row = b.to(tl.int64) * N + n
        pb = pred_ptr + row * 4
        bx1 = tl.load(pb, mask=pm, other=0.0)[:, None]
        by1 = tl.load(pb + 1, mask=pm, other=0.0)[:, None]
        bx2 = tl.load(pb + 2, mask=pm, other=0.0)[:, None]
        by2 = tl.load(pb + 3, mask=pm, other=0.0)[:, None]
        px = tl.load(priors_ptr + n * 4, mask=pm, other=0.0)[:, None]
        py = tl.load(priors_ptr + n * 4 + 1, mask=pm, other=0.0)[:, None]
        stride = tl.load(priors_ptr + n * 4 + 2, mask=pm, other=1.0)[:, None]
        if MMDET:
            s0 = tl.load(s0_ptr + row, mask=pm, other=0.0)[:, None]
        else:
            s0 = 0.0
        best = tl.full((BLOCK_P,), _SENTINEL, tl.int64)
        g0 = 0
        while g0 < G:
            g = g0 + tl.arange(0, BLOCK_G)
            g0 += BLOCK_G
            gm = g < G
            real = (tl.load(gtm_ptr + b * G + g, mask=gm, other=0) != 0) & gm
            label = tl.load(gtl_ptr + b * G + g, mask=gm, other=0)
            label = tl.minimum(tl.maximum(label, 0), C - 1).to(tl.int64)
            gb = gtb_ptr + (b * G + g) * 4
            gx1 = tl.load(gb, mask=gm, other=0.0)[None, :]
            gy1 = tl.load(gb + 1, mask=gm, other=0.0)[None, :]
            gx2 = tl.load(gb + 2, mask=gm, other=0.0)[None, :]
            gy2 = tl.load(gb + 3, mask=gm, other=0.0)[None, :]
            pair = pm[:, None] & real[None, :]
            xl = tl.load(logits_ptr + row[:, None] * C + label[None, :], mask=pair,
                         other=0.0).to(tl.float32)
            iou = _iou(bx1, by1, bx2, by2, gx1, gy1, gx2, gy2, RN)
            cost = _pair_cost(iou, px, py, stride, s0, xl, gx1, gy1, gx2, gy2, radius,
                              iou_weight, MMDET, RN)
            key = tl.where(pair, _key(cost, g[None, :]), _SENTINEL)
            best = tl.minimum(best, tl.min(key, axis=1))
        tl.store(owner_ptr + row, (best & 0xFFFFFFFF).to(tl.int32), mask=pm)


@triton.jit
def _finish_kernel(pred_ptr, gtb_ptr, gtl_ptr, count_ptr, owner_ptr, idx_ptr, lab_ptr,
                   iou_ptr, N, G, NT, BLOCK_N: tl.constexpr, RN: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // NT
    n = (pid % NT) * BLOCK_N + tl.arange(0, BLOCK_N)
    nm = n < N
    row = b.to(tl.int64) * N + n
    fg = (tl.load(count_ptr + row, mask=nm, other=0) > 0) & nm
    g = tl.where(fg, tl.load(owner_ptr + row, mask=nm, other=0), 0)
    gb = gtb_ptr + (b * G + g) * 4
    iou = _iou(tl.load(pred_ptr + row * 4, mask=nm, other=0.0),
               tl.load(pred_ptr + row * 4 + 1, mask=nm, other=0.0),
               tl.load(pred_ptr + row * 4 + 2, mask=nm, other=0.0),
               tl.load(pred_ptr + row * 4 + 3, mask=nm, other=0.0),
               tl.load(gb, mask=fg, other=0.0), tl.load(gb + 1, mask=fg, other=0.0),
               tl.load(gb + 2, mask=fg, other=0.0), tl.load(gb + 3, mask=fg, other=0.0), RN)
    label = tl.load(gtl_ptr + b * G + g, mask=fg, other=-1)
    tl.store(idx_ptr + row, tl.where(fg, g.to(tl.int64), -1), mask=nm)
    tl.store(lab_ptr + row, tl.where(fg, label.to(tl.int64), -1), mask=nm)
    tl.store(iou_ptr + row, tl.where(fg, iou, 0.0), mask=nm)


# ----------------------------------------------------------------------------------------
# Launcher, op registration, public function
# ----------------------------------------------------------------------------------------

def _pow2_at_least(x):
    return 1 << max(int(x) - 1, 0).bit_length()


def _launch(priors, pred_bboxes, pred_logits, gt_bboxes, gt_labels, gt_mask, topk,
            soft_center_radius, iou_weight, mmyolo, out):
    """Run passes 1-5, writing into out = (gt_index, labels, ious), each (B, N)."""
    t = TUNING
    B, N, C = pred_logits.shape
    G = gt_bboxes.shape[1]
    dev = pred_logits.device
    mmdet = not mmyolo
    rn = _precise()
    KL = 16 if topk <= 16 else 32
    BN, BG = max(t["block_n"], KL), t["block_g"]
    priors = priors.float().contiguous()
    preds = pred_bboxes.float().contiguous()
    logits = pred_logits.contiguous()
    gtb = gt_bboxes.float().contiguous()
    gtl = gt_labels.contiguous()
    gtm = gt_mask.contiguous().view(torch.uint8)

    valid = torch.empty((B, N), dtype=torch.int8, device=dev)
    s0 = torch.empty((B, N) if mmdet else (1,), dtype=torch.float32, device=dev)
    GT = triton.cdiv(G, BG)
    cb = triton.cdiv(C, t["block_c"])
    fuse = mmdet and GT <= t["fuse_s0_max_gt"]
    NT1 = triton.cdiv(N, t["block_n_prior"])
    wrap_triton(_prior_kernel)[(B * NT1,)](
        priors, logits, gtb, gtm, s0, valid, N, G, C, NT1, WITH_S0=mmdet and not fuse,
        BLOCK_N=t["block_n_prior"], BLOCK_G=32, BLOCK_C=t["block_c"], C_BLOCKS=cb, RN=rn,
        num_warps=t["num_warps"])

    # Splits of the priors so that pass 2 has about target_programs programs.
    NT = triton.cdiv(N, BN)
    S = min(_pow2_at_least(triton.cdiv(t["target_programs"], max(B * GT, 1))), t["max_splits"],
            _pow2_at_least(NT))
    split_len = triton.cdiv(NT, S) * BN
    part_key = torch.empty((B, G, S, KL), dtype=torch.int64, device=dev)
    part_iou = torch.empty((B, G, S, KL), dtype=torch.float32, device=dev)
    wrap_triton(_candidate_kernel)[(B * S * GT,)](
        priors, preds, logits, s0, valid, gtb, gtl, gtm, part_key, part_iou, N, G, C, GT, S,
        split_len, soft_center_radius, iou_weight, MMDET=mmdet, FUSE_S0=fuse, BLOCK_N=BN,
        BLOCK_G=BG, BLOCK_C=t["block_c"], C_BLOCKS=cb, KL=KL, RN=rn, num_warps=t["num_warps_candidate"])

    count = torch.zeros((B, N), dtype=torch.int32, device=dev)
    owner = torch.full((B, N), -1, dtype=torch.int32, device=dev)
    CAP = max(min(N, G * topk), 1)
    clist = torch.empty((B, CAP), dtype=torch.int32, device=dev)
    ccount = torch.zeros((B,), dtype=torch.int32, device=dev)
    BG2 = t["block_g_select"]
    GT2 = triton.cdiv(G, BG2)
    wrap_triton(_select_kernel)[(B * GT2,)](
        part_key, part_iou, gtm, count, owner, clist, ccount, N, G, GT2, CAP, TOPK=topk,
        BLOCK_G=BG2, SK=S * KL, num_warps=t["num_warps"])

    BP = t["block_p"]
    PT = triton.cdiv(CAP, BP)
    wrap_triton(_resolve_kernel)[(B * PT,)](
        priors, preds, logits, s0, gtb, gtl, gtm, owner, clist, ccount, N, G, C, CAP, PT,
        soft_center_radius, iou_weight, MMDET=mmdet, BLOCK_P=BP, BLOCK_G=BG, RN=rn,
        num_warps=t["num_warps"])

    gt_index, labels, ious = out
    NTF = triton.cdiv(N, t["block_n_prior"])
    wrap_triton(_finish_kernel)[(B * NTF,)](
        preds, gtb, gtl, count, owner, gt_index, labels, ious, N, G, NTF,
        BLOCK_N=t["block_n_prior"], RN=rn, num_warps=t["num_warps"])
    return out


def _empty_outputs(B, N, device):
    return (torch.empty((B, N), dtype=torch.int64, device=device),
            torch.empty((B, N), dtype=torch.int64, device=device),
            torch.empty((B, N), dtype=torch.float32, device=device))


@triton_op("rtmdet::dsl_assign_triton", mutates_args=())
def _dsl_assign_op(priors: torch.Tensor, pred_bboxes: torch.Tensor, pred_logits: torch.Tensor,
                   gt_bboxes: torch.Tensor, gt_labels: torch.Tensor, gt_mask: torch.Tensor,
                   topk: int, soft_center_radius: float, iou_weight: float,
                   mmyolo: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, N, _ = pred_logits.shape
    G = gt_bboxes.shape[1]
    out = _empty_outputs(B, N, pred_logits.device)
    if B == 0 or N == 0 or G == 0:
        out[0].fill_(-1)
        out[1].fill_(-1)
        out[2].zero_()
        return out
    return _launch(priors, pred_bboxes, pred_logits, gt_bboxes, gt_labels, gt_mask, topk,
                   soft_center_radius, iou_weight, mmyolo, out)


def _check_topk(topk):
    if not isinstance(topk, int) or not 1 <= topk <= MAX_TOPK:
        raise ValueError(f"dsl_assign_triton: topk must be an int in [1, {MAX_TOPK}] "
                         f"(the kernel keeps at most {MAX_TOPK} candidates per gt), got {topk!r}")


def dsl_assign_triton(priors, pred_bboxes, pred_logits, gt_bboxes, gt_labels, gt_mask, *,
                      topk=13, soft_center_radius=3.0, iou_weight=3.0, semantics="mmdet"):
    """Batched DSLA (SPEC section 2) on the GPU, equal to `rtmdet.ops.dsl_assign_ref`.

    priors (N, 4) (x, y, stride_w, stride_h); pred_bboxes (B, N, 4) xyxy; pred_logits
    (B, N, C) fp32/fp16/bf16; gt_bboxes (B, G, 4); gt_labels (B, G) int; gt_mask (B, G) bool.
    Returns (gt_index (B, N) int64 (-1 = background), labels (B, N) int64 (-1), ious (B, N)
    float32). Inputs are assumed checked (rtmdet.ops.dsl_assign does it); topk <= 32.
    """
    _check_topk(topk)
    if semantics not in ("mmdet", "mmyolo"):
        raise ValueError(f"dsl_assign_triton: semantics must be 'mmdet' or 'mmyolo', got {semantics!r}")
    return torch.ops.rtmdet.dsl_assign_triton(
        priors, pred_bboxes, pred_logits, gt_bboxes, gt_labels, gt_mask, topk,
        float(soft_center_radius), float(iou_weight), semantics == "mmyolo")
