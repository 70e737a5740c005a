"""Fused Dynamic Soft Label Assigner (SPEC section 2) in Triton: `dsl_assign_triton`.

Same results as `rtmdet.ops.dsl_assign_ref` (ties: a gt prefers the lower prior index, a
contested prior the cheaper gt then the lower gt index), without any (B, N, G) tensor.

Passes (all on device, fixed grids, no host synchronisation; B, N, G are runtime ints):
  1. prior pass, grid (B * N/BLOCK): valid[b, n] (inside a real gt), zeroed selection state
     and counters, and per tile of BLOCK priors a descriptor: the box around its valid
     priors' centres and the box around its predicted boxes (B * N/BLOCK * 8 floats).
  2. gt pass, grid (B * G + S0 programs), one program per gt, its lists in registers (no
     (B, N, G) tensor):
     a. scan the tiles that can hold one of the TOPK largest IoUs (the gt's overlap with the
        tile's box of predictions bounds them), largest bound first -> k = int(their sum,
        added in descending order), at least 1;
     b. (mmdet) S0[b, n] = sum_c f(x[n, c], 0) for the valid priors (the only ones that get
        a cost; the other rows of logits are never read), in tiles claimed from a counter by
        the S0 programs (last in the grid: they run beside the gt programs where there is
        room) and by gt programs done with step a, so that the logits stream while the
        latency-bound scans run; then wait for the image's tiles;
     c. scan the valid priors, nearest tile first, for the k smallest keys
        (ordered(cost) << 32 | n), skipping every tile (from its descriptor, unread) and
        prior whose centre cost alone exceeds the k-th kept cost (a lower bound: the other
        terms are >= -margin), so only priors near the gt cost transcendentals and a gather;
     d. integer atomics per selected prior: count += 1, owner = max(owner, g); a prior
        reaching count 2 is appended to its image's list of contested priors.
  3. resolve, grid (B * CAP/BLOCK_P): each contested prior recomputes its cost against every
     real gt and keeps the cheapest (key (ordered(cost) << 32) | g, so ties go to lower g).
  4. finish, grid (B * N/BLOCK): gt index, label and the matched pair's IoU per prior.
Only integer atomics are used and the contested list's order does not affect any result,
so outputs are bitwise deterministic.

Precision: IoU and the centre distance are computed with correctly rounded operations
(no FMA contraction on the GPU), so IoUs, and hence dynamic k, match the reference exactly;
transcendental functions use libdevice on the GPU and numpy under TRITON_INTERPRET, except in
the S0 sum (hardware exp2/log2/rcp, kernels/fastmath.py, relative error < 2e-6 per term).
"""
import os

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton
from triton.language.extra import libdevice

from .fastmath import exp_rn as _exp, log_rn as _log, softplus_sigmoid
from .qfl import cdiv, column_block, eager_launch_ok

# Tunables: block_n priors per tile: one program of the prior and finish passes (num_warps_prior
# warps, at most block_c classes per step of the S0 sum) and one step of the per-gt scans
# (num_warps_gt warps, tile descriptors read tchunk at a time; small tiles prune more finely)
# plus s0_programs programs that compute the S0 sum meanwhile; block_p contested priors x
# block_g gts per tile of the resolve pass.
TUNING = dict(block_n=64, num_warps_gt=1, tchunk=64, s0_programs=1024, num_warps_prior=2,
              block_c=32, block_g=32, block_p=16, num_warps=4, prune=True,
              s0_mode="dense", s0_block_n=32, s0_warps=4)
# s0_mode "dense": S0 of every valid prior in a pass of its own between the prior and gt
# passes (many-warp programs, coalesced rows of logits: bandwidth-bound whatever the share of
# valid priors); "claim": S0 tiles claimed by one-warp programs inside the gt pass, beside the
# IoU scans (faster when few priors are valid, 2-3x slower when most are, e.g. early training).
MAX_TOPK = 32
_SENTINEL = tl.constexpr(0x7FFFFFFFFFFFFFFF)  # key of "no candidate": above every real key
_NO_SLOT = tl.constexpr(-0x7FFFFFFFFFFFFFFF)   # an inactive list slot: below every real key


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
def _load_rows4(ptr, rows, mask):
    """Rows of an (R, 4) float32 tensor -> its four columns, one 16-byte load per row (four
    strided 4-byte loads per row made the per-gt scans L1-bound)."""
    box = tl.load(ptr + rows[:, None] * 4 + tl.arange(0, 4)[None, :], mask=mask[:, None],
                  other=0.0)
    even, odd = tl.split(tl.reshape(box, (box.shape[0], 2, 2)))  # (c0, c2), (c1, c3)
    c0, c2 = tl.split(even)
    c1, c3 = tl.split(odd)
    return c0, c1, c2, c3


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
def _cost_of_key(key):
    """Inverse of `_key` for the cost part: the float32 cost a key was made from."""
    ordered = (key >> 32).to(tl.int32)
    bits = tl.where(ordered >= 0, ordered, ordered ^ 0x7FFFFFFF)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _keep_largest(top, low, cand, slot, KL: tl.constexpr):
    """top (KL,): the largest IoUs so far, low its minimum; cand (BLOCK,): this tile's IoUs
    above `low`, -1 elsewhere. Inserts them largest first, each replacing the current
    minimum; as many steps as candidates (at most KL)."""
    lane = tl.arange(0, cand.shape[0])
    steps = tl.minimum(tl.sum((cand >= 0.0).to(tl.int32), axis=0), KL)
    i = 0
    while i < steps:
        m = tl.max(cand, axis=0)
        cand = tl.where(lane == tl.argmax(cand, axis=0), -1.0, cand)
        top = tl.where(slot == tl.argmin(top, axis=0), tl.maximum(top, m), top)  # m > low only
        low = tl.min(top, axis=0)
        i += 1
    return top, low


@triton.jit
def _keep_smallest(keys, worst, cand, KL: tl.constexpr):
    """keys (KL,): the smallest candidate keys so far (SENTINEL = empty; inactive slots hold
    -1, never the maximum), worst their maximum; cand (BLOCK,): keys of this tile below
    `worst`, SENTINEL elsewhere (all distinct). Inserts them smallest first."""
    slot = tl.arange(0, KL)
    steps = tl.minimum(tl.sum((cand != _SENTINEL).to(tl.int32), axis=0), KL)
    i = 0
    while i < steps:
        m = tl.min(cand, axis=0)
        cand = tl.where(cand == m, _SENTINEL, cand)
        keys = tl.where(slot == tl.argmax(keys, axis=0), tl.minimum(keys, m), keys)  # m < worst only
        worst = tl.max(keys, axis=0)
        i += 1
    return keys, worst


@triton.jit
def _s0_block(logits_ptr, row, nmask, c, C, RN: tl.constexpr):
    """sum over the classes c (BLOCK_C,) of f(x[row, c], 0), for (BLOCK_N,) int64 rows."""
    m = nmask[:, None] & (c < C)[None, :]
    x = tl.load(logits_ptr + row[:, None] * C + c[None, :], mask=m, other=0.0).to(tl.float32)
    if RN:  # hardware transcendentals: the S0 terms are added in another order anyway
        sig, _, sp = softplus_sigmoid(x, True)
        f0 = sp * (sig * sig)
    else:
        f0 = _soft_cost0(x, RN)
    return tl.sum(tl.where(m, f0, 0.0), axis=1)


@triton.jit
def _row_s0(logits_ptr, row, nmask, C, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
            C_BLOCKS: tl.constexpr, RN: tl.constexpr):
    """S0 = sum_c f(x[row, c], 0) for a (BLOCK_N,) vector of int64 rows (0 where not nmask:
    those rows' logits are not read). Not unrolled: unrolling measured 1.8x slower here."""
    acc = tl.zeros((BLOCK_N,), tl.float32)
    for cb in range(C_BLOCKS):
        acc += _s0_block(logits_ptr, row, nmask, cb * BLOCK_C + tl.arange(0, BLOCK_C), C, RN)
    return acc


# ----------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------

@triton.jit
def _prior_kernel(priors_ptr, pred_ptr, gtb_ptr, gtm_ptr, valid_ptr, desc_ptr, tstride_ptr,
                  count_ptr, owner_ptr, ccount_ptr, done_ptr, claim_ptr, N, G, NT,
                  MMDET: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr):
    """Per prior: valid (inside a real gt) and the zeroed selection state; per image the zeroed
    counters (contested priors, S0 tiles done) and the S0 tile claim counter.
    Per tile of BLOCK_N priors (the per-gt scans' unit): its descriptor, 8 floats = the box
    around its valid priors' centres and the box around the predicted boxes that can take part
    in the IoU top-k (valid priors for mmdet, all for mmyolo), empty = (BIG, BIG, -BIG, -BIG);
    and (image 0 only) its largest stride."""
    pid = tl.program_id(0)
    b = pid // NT
    t = pid % NT
    n = t * BLOCK_N + tl.arange(0, BLOCK_N)
    nm = n < N
    px, py, stride, _ = _load_rows4(priors_ptr, n, nm)
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
    tl.store(count_ptr + row, tl.zeros((BLOCK_N,), tl.int32), mask=nm)
    tl.store(owner_ptr + row, tl.full((BLOCK_N,), -1, tl.int32), mask=nm)
    first_lane = (tl.arange(0, BLOCK_N) == 0) & (t == 0)
    zeros = tl.zeros((BLOCK_N,), tl.int32)
    tl.store(ccount_ptr + b + zeros, zeros, mask=first_lane)
    tl.store(done_ptr + b + zeros, zeros, mask=first_lane)
    tl.store(claim_ptr + zeros, zeros, mask=first_lane & (b == 0))

    valid = nm & (inside > 0)
    bx1, by1, bx2, by2 = _load_rows4(pred_ptr, row, nm)
    if MMDET:
        pool = valid
    else:
        pool = nm
    pool = pool & (bx2 > bx1) & (by2 > by1)  # only boxes with an area can overlap a gt
    BIG = 1.0e30  # beyond any coordinate, and BIG + BIG does not overflow
    j = tl.arange(0, 8)
    desc = tl.where(j == 0, tl.min(tl.where(valid, px, BIG), axis=0), BIG)
    desc = tl.where(j == 1, tl.min(tl.where(valid, py, BIG), axis=0), desc)
    desc = tl.where(j == 2, tl.max(tl.where(valid, px, -BIG), axis=0), desc)
    desc = tl.where(j == 3, tl.max(tl.where(valid, py, -BIG), axis=0), desc)
    desc = tl.where(j == 4, tl.min(tl.where(pool, bx1, BIG), axis=0), desc)
    desc = tl.where(j == 5, tl.min(tl.where(pool, by1, BIG), axis=0), desc)
    desc = tl.where(j == 6, tl.max(tl.where(pool, bx2, -BIG), axis=0), desc)
    desc = tl.where(j == 7, tl.max(tl.where(pool, by2, -BIG), axis=0), desc)
    tl.store(desc_ptr + pid.to(tl.int64) * 8 + j, desc)
    smax = tl.max(tl.where(nm, stride, 0.0), axis=0)
    tl.store(tstride_ptr + t + j, smax + 0.0 * desc, mask=(j == 0) & (b == 0))


@triton.jit
def _overlap_bound(desc_ptr, dbase, tt, tm, gx1, gy1, gx2, gy2):
    """(TCHUNK,) for tiles tt: the gt's overlap with the box around the tile's predicted boxes,
    >= every pair's intersection (0 for empty tiles)."""
    ux1, uy1, ux2, uy2 = _load_rows4(desc_ptr, (dbase + tt) * 2 + 1, tm)
    return (tl.maximum(tl.minimum(ux2, gx2) - tl.maximum(ux1, gx1), 0.0)
            * tl.maximum(tl.minimum(uy2, gy2) - tl.maximum(uy1, gy1), 0.0))


@triton.jit
def _centre_bound(desc_ptr, tstride_ptr, dbase, tt, tm, cx, cy):
    """(TCHUNK,) for tiles tt: d2 = squared distance from (cx, cy) to the box around the tile's
    valid prior centres (<= each one's), its largest stride, and whether it has a valid prior."""
    vx1, vy1, vx2, vy2 = _load_rows4(desc_ptr, (dbase + tt) * 2, tm)
    smax = tl.load(tstride_ptr + tt, mask=tm, other=1.0)
    ddx = tl.maximum(tl.maximum(vx1 - cx, cx - vx2), 0.0)
    ddy = tl.maximum(tl.maximum(vy1 - cy, cy - vy2), 0.0)
    return ddx * ddx + ddy * ddy, smax, tm & (vx1 <= vx2)


@triton.jit
def _claim_s0_tiles(logits_ptr, s0_ptr, valid_ptr, done_ptr, claim_ptr, N, C, NT, TOTAL,
                    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, C_BLOCKS: tl.constexpr,
                    RN: tl.constexpr):
    """Claim tiles (image, BLOCK_N priors) of the S0 sum until none is left; for each, write
    S0 = sum_c f(x[n, c], 0) of its valid priors (0 for the others, whose logits are not read)
    and count it done for its image (release, after a barrier: all lanes' stores first)."""
    lane = tl.arange(0, BLOCK_N)
    job = tl.atomic_add(claim_ptr, 1, sem="relaxed")
    while job < TOTAL:
        jb = job // NT
        n = (job % NT) * BLOCK_N + lane
        row = jb.to(tl.int64) * N + n
        valid = (tl.load(valid_ptr + row, mask=n < N, other=0) != 0) & (n < N)
        s0 = tl.zeros((BLOCK_N,), tl.float32)
        if tl.max(valid.to(tl.int32), axis=0) > 0:
            s0 = _row_s0(logits_ptr, row, valid, C, BLOCK_N, BLOCK_C, C_BLOCKS, RN)
        tl.store(s0_ptr + row, s0, mask=n < N)
        tl.debug_barrier()
        tl.atomic_add(done_ptr + jb, 1, sem="release")
        job = tl.atomic_add(claim_ptr, 1, sem="relaxed")


@triton.jit
def _s0_dense_kernel(logits_ptr, s0_ptr, valid_ptr, ROWS, C, BLOCK_N: tl.constexpr,
                     BLOCK_C: tl.constexpr, C_BLOCKS: tl.constexpr, RN: tl.constexpr):
    """S0[r] = sum_c f(x[r, c], 0) for the valid rows r of the (B * N, C) logits, 0 elsewhere
    (invalid rows are not read)."""
    row = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    inside = row < ROWS
    valid = (tl.load(valid_ptr + row, mask=inside, other=0) != 0) & inside
    s0 = tl.zeros((BLOCK_N,), tl.float32)
    if tl.max(valid.to(tl.int32), axis=0) > 0:
        s0 = _row_s0(logits_ptr, row, valid, C, BLOCK_N, BLOCK_C, C_BLOCKS, RN)
    tl.store(s0_ptr + row, s0, mask=inside)


@triton.jit
def _gt_kernel(priors_ptr, pred_ptr, logits_ptr, s0_ptr, valid_ptr, desc_ptr, tstride_ptr,
               gtb_ptr, gtl_ptr, gtm_ptr, count_ptr, owner_ptr, clist_ptr, ccount_ptr, done_ptr,
               claim_ptr, B, N, G, C, NT, CAP, radius, iou_weight, margin, MMDET: tl.constexpr,
               S0_READY: tl.constexpr, PRUNE: tl.constexpr, TOPK: tl.constexpr, KL: tl.constexpr, BLOCK_N: tl.constexpr,
               TCHUNK: tl.constexpr, BLOCK_C: tl.constexpr, C_BLOCKS: tl.constexpr,
               RN: tl.constexpr):
    """One program per (image, gt): dynamic k from its TOPK largest IoUs, then its k cheapest
    valid priors, registered with integer atomics (count, owner, contested list).

    Both scans visit tiles of BLOCK_N priors (the prior pass's tiles), best first within
    chunks of TCHUNK tile descriptors, and skip every tile whose descriptor bound shows it cannot
    contribute. Order changes no result (both lists keep exact top-k sets of distinct values /
    keys); it only makes the bounds prune sooner."""
    pid = tl.program_id(0)
    if RN:  # torch.compile passes Python floats as fp64 scalars (the interpreter as floats)
        radius = radius.to(tl.float32)
        iou_weight = iou_weight.to(tl.float32)
        margin = margin.to(tl.float32)
    if pid >= B * G:
        # Programs past the gts' only compute S0 tiles, alongside the gt programs' IoU scans
        # where there is room on the GPU (mmdet only; none for mmyolo). Measured faster
        # than placing them first, where they delay the gt programs.
        if MMDET and not S0_READY:
            _claim_s0_tiles(logits_ptr, s0_ptr, valid_ptr, done_ptr, claim_ptr, N, C, NT, B * NT,
                            BLOCK_N, BLOCK_C, C_BLOCKS, RN)
    else:
        b = pid // G
        g = pid % G
        if tl.load(gtm_ptr + pid) != 0:
            label = tl.minimum(tl.maximum(tl.load(gtl_ptr + pid), 0), C - 1).to(tl.int64)
            gx1 = tl.load(gtb_ptr + pid * 4)
            gy1 = tl.load(gtb_ptr + pid * 4 + 1)
            gx2 = tl.load(gtb_ptr + pid * 4 + 2)
            gy2 = tl.load(gtb_ptr + pid * 4 + 3)
            area_g = (gx2 - gx1) * (gy2 - gy1)
            slot = tl.arange(0, KL)
            lane = tl.arange(0, BLOCK_N)
            tlane = tl.arange(0, TCHUNK)
            base = b.to(tl.int64) * N
            dbase = b.to(tl.int64) * NT

            # 1. Dynamic k: the TOPK largest IoUs (mmdet: valid priors; mmyolo: all priors). The
            # list keeps the KL >= TOPK largest (0 = empty: IoUs are >= 0), `low` its minimum.
            # Tile bound: iou <= inter / area_g (union >= area_g) and inter <= `over`, the gt's
            # overlap with the box around the tile's predicted boxes; tiles with over < low *
            # area_g (slack for rounding) are skipped, the largest `over` goes first.
            top = tl.zeros((KL,), tl.float32)
            low = tl.min(top, axis=0)
            n_chunks = tl.cdiv(NT, TCHUNK)
            first = NT * 0  # the chunk holding the largest bound goes first
            top_bound = -1.0
            c = 0
            while c < n_chunks:
                tt = c * TCHUNK + tlane
                m = tl.max(_overlap_bound(desc_ptr, dbase, tt, tt < NT, gx1, gy1, gx2, gy2), axis=0)
                first = tl.where(m > top_bound, c, first)
                top_bound = tl.maximum(m, top_bound)
                c += 1
            c = 0
            while c < n_chunks:
                t0 = ((first + c) % n_chunks) * TCHUNK
                c += 1
                tt = t0 + tlane
                tm = tt < NT
                over = _overlap_bound(desc_ptr, dbase, tt, tm, gx1, gy1, gx2, gy2)
                left = tm & (over > 0.0)
                keep = left & (over >= low * area_g * 0.9999)
                while tl.max(keep.to(tl.int32), axis=0) > 0:
                    best = tl.argmax(tl.where(keep, over, -1.0), axis=0)
                    left = left & (tlane != best)
                    n = (t0 + best) * BLOCK_N + lane
                    nm = n < N
                    bx1, by1, bx2, by2 = _load_rows4(pred_ptr, base + n, nm)
                    # Cheap filter without a division: iou > low <=> inter > low * union (with
                    # slack for rounding); only tiles where some prior passes pay for the exact IoU.
                    w = tl.maximum(tl.minimum(bx2, gx2) - tl.maximum(bx1, gx1), 0.0)
                    h = tl.maximum(tl.minimum(by2, gy2) - tl.maximum(by1, gy1), 0.0)
                    inter = w * h
                    union = tl.maximum((bx2 - bx1) * (by2 - by1) + area_g - inter, 1e-6)
                    maybe = nm & (inter > 0.0) & (inter >= low * union * 0.99999)
                    if MMDET:
                        maybe = maybe & (tl.load(valid_ptr + base + n, mask=nm, other=0) != 0)
                    if tl.max(maybe.to(tl.int32), axis=0) > 0:
                        iou = _iou(bx1, by1, bx2, by2, gx1, gy1, gx2, gy2, RN)
                        counted = maybe & (iou > low)
                        # one insertion per candidate: faster than a bitonic tl.topk merge
                        top, low = _keep_largest(top, low, tl.where(counted, iou, -1.0), slot, KL)
                    keep = left & (over >= low * area_g * 0.9999)
            vals = top
            total = 0.0
            for i in range(TOPK):  # descending order, as the reference adds them
                total = total + tl.max(vals, axis=0)
                vals = tl.where(slot == tl.argmax(vals, axis=0), -1.0, vals)
            k = tl.maximum(total.to(tl.int32), 1)

            if MMDET and not S0_READY:
                # Help with the S0 tiles left, then wait for this image's. Only running programs
                # claim tiles and none waits before finishing its claims, so every tile gets
                # done and the wait ends, whatever the order programs are scheduled in.
                _claim_s0_tiles(logits_ptr, s0_ptr, valid_ptr, done_ptr, claim_ptr, N, C, NT,
                                B * NT, BLOCK_N, BLOCK_C, C_BLOCKS, RN)
                ready = tl.atomic_add(done_ptr + b, 0, sem="acquire")
                while ready < NT:
                    ready = tl.atomic_add(done_ptr + b, 0, sem="acquire")
                tl.debug_barrier()

            # 2. The k cheapest valid priors. The class cost is >= 0 and the IoU cost >=
            # -iou_weight * 1e-7, so cost >= centre cost - margin: once k candidates are kept, a
            # prior whose centre cost alone exceeds the k-th kept cost + margin cannot enter (nor
            # tie), i.e. its centre distance exceeds max_dist strides. A tile is skipped, before
            # any of its priors is read, when the box around its valid priors' centres is farther
            # than max_dist times its largest stride; the nearest tile (in strides) goes first.
            keys = tl.where(slot < k, _SENTINEL, _NO_SLOT)
            worst = tl.max(keys, axis=0)
            cx = (gx1 + gx2) * 0.5
            cy = (gy1 + gy2) * 0.5
            max_dist = 3.0e38
            first = NT * 0  # the chunk holding the nearest tile goes first
            top_near = 3.0e38
            c = 0
            while c < n_chunks:
                tt = c * TCHUNK + tlane
                d2, smax, left = _centre_bound(desc_ptr, tstride_ptr, dbase, tt, tt < NT, cx, cy)
                m = tl.min(tl.where(left, tl.minimum(d2 / (smax * smax), 1.0e38), 3.0e38), axis=0)
                first = tl.where(m < top_near, c, first)
                top_near = tl.minimum(m, top_near)
                c += 1
            c = 0
            while c < n_chunks:
                t0 = ((first + c) % n_chunks) * TCHUNK
                c += 1
                tt = t0 + tlane
                d2, smax, left = _centre_bound(desc_ptr, tstride_ptr, dbase, tt, tt < NT, cx, cy)
                near = tl.minimum(d2 / (smax * smax), 1.0e38)
                reach = tl.maximum(max_dist, 0.0) * smax
                keep = left & (d2 <= reach * reach * 1.0001)
                while tl.max(keep.to(tl.int32), axis=0) > 0:
                    best = tl.argmin(tl.where(keep, near, 3.0e38), axis=0)
                    left = left & (tlane != best)
                    n = (t0 + best) * BLOCK_N + lane
                    nm = n < N
                    valid = tl.load(valid_ptr + base + n, mask=nm, other=0) != 0
                    px, py, stride, _ = _load_rows4(priors_ptr, n, nm)
                    stride = tl.where(nm, stride, 1.0)
                    # dist <= max_dist without sqrt or division (slack for rounding; inf passes all)
                    dx = px - cx
                    dy = py - cy
                    reach_n = tl.maximum(max_dist, 0.0) * stride
                    need = valid & (dx * dx + dy * dy <= reach_n * reach_n * 1.00001)
                    if tl.max(need.to(tl.int32), axis=0) > 0:
                        bx1, by1, bx2, by2 = _load_rows4(pred_ptr, base + n, need)
                        iou = _iou(bx1, by1, bx2, by2, gx1, gy1, gx2, gy2, RN)
                        if MMDET:  # written by other programs of this launch: read from L2
                            s0 = tl.load(s0_ptr + base + n, mask=need, other=0.0, cache_modifier=".cg")
                        else:
                            s0 = 0.0
                        xl = tl.load(logits_ptr + (base + n) * C + label, mask=need, other=0.0).to(tl.float32)
                        cost = _pair_cost(iou, px, py, stride, s0, xl, gx1, gy1, gx2, gy2, radius,
                                          iou_weight, MMDET, RN)
                        key = _key(cost, n)
                        keys, worst = _keep_smallest(keys, worst, tl.where(need & (key < worst), key, _SENTINEL), KL)
                        if PRUNE:
                            if worst != _SENTINEL:
                                kth = _cost_of_key(worst)
                                bound = tl.maximum(kth + margin, 1e-30)
                                max_dist = radius + tl.log(bound) * 0.4342944819032518 + 1e-3
                    reach = tl.maximum(max_dist, 0.0) * smax
                    keep = left & (d2 <= reach * reach * 1.0001)

            # 3. Register the selection: integer atomics only, so any order gives the same state.
            sel = (slot < k) & (keys != _SENTINEL)
            n_sel = (keys & 0xFFFFFFFF).to(tl.int32)
            at = base + n_sel
            old = tl.atomic_add(count_ptr + at, 1, mask=sel)
            tl.atomic_max(owner_ptr + at, g.to(tl.int32) + 0 * n_sel, mask=sel)
            second = sel & (old == 1)  # the prior just became contested: list it once
            pos = tl.atomic_add(ccount_ptr + b + 0 * n_sel, 1, mask=second)
            tl.store(clist_ptr + b.to(tl.int64) * CAP + pos, n_sel, mask=second & (pos < CAP))


@triton.jit
def _resolve_kernel(priors_ptr, pred_ptr, logits_ptr, s0_ptr, gtb_ptr, gtl_ptr, gtm_ptr,
                    owner_ptr, clist_ptr, ccount_ptr, N, G, C, CAP, PT, radius, iou_weight,
                    MMDET: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_G: tl.constexpr,
                    RN: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // PT
    start = (pid % PT) * BLOCK_P
    if RN:
        radius = radius.to(tl.float32)
        iou_weight = iou_weight.to(tl.float32)
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
            soft_center_radius, iou_weight, mmyolo, out, launch=wrap_triton):
    """Run the passes, writing into out = (gt_index, labels, ious), each (B, N).
    launch: wrap_triton inside the op, the identity for direct eager launches."""
    t = TUNING
    B, N, C = pred_logits.shape
    G = gt_bboxes.shape[1]
    dev = pred_logits.device
    mmdet = not mmyolo
    rn = _precise()
    KL = max(_pow2_at_least(topk), 2)
    priors = priors.float().contiguous()
    preds = pred_bboxes.float().contiguous()
    logits = pred_logits.contiguous()
    gtb = gt_bboxes.float().contiguous()
    gtl = gt_labels.contiguous()
    gtm = gt_mask.to(torch.uint8).contiguous()

    BNP = t["block_n"]
    NT = cdiv(N, BNP)
    CAP = max(min(N, G * topk), 1)
    valid = torch.empty((B, N), dtype=torch.int8, device=dev)
    desc = torch.empty((B, NT, 8), dtype=torch.float32, device=dev)
    tile_stride = torch.empty((NT,), dtype=torch.float32, device=dev)
    s0 = torch.empty((B, N) if mmdet else (1,), dtype=torch.float32, device=dev)
    count = torch.empty((B, N), dtype=torch.int32, device=dev)
    owner = torch.empty((B, N), dtype=torch.int32, device=dev)
    ccount = torch.empty((B,), dtype=torch.int32, device=dev)
    sync = torch.empty((B + 1,), dtype=torch.int32, device=dev)  # S0 tiles done per image, claimed
    done, claim = sync[:B], sync[B:]
    clist = torch.empty((B, CAP), dtype=torch.int32, device=dev)
    launch(_prior_kernel)[(B * NT,)](
        priors, preds, gtb, gtm, valid, desc, tile_stride, count, owner, ccount, done, claim,
        N, G, NT, MMDET=mmdet, BLOCK_N=BNP, BLOCK_G=32, num_warps=t["num_warps_prior"])

    block_c = column_block(C, t["block_c"])
    dense = mmdet and t["s0_mode"] == "dense"
    if dense:
        BS = t["s0_block_n"]
        launch(_s0_dense_kernel)[(cdiv(B * N, BS),)](
            logits, s0, valid, B * N, C, BLOCK_N=BS, BLOCK_C=block_c,
            C_BLOCKS=cdiv(C, block_c), RN=rn, num_warps=t["s0_warps"])
    # a constant: no min() in a compiled grid
    s0_programs = t["s0_programs"] if mmdet and not dense else 0
    launch(_gt_kernel)[(B * G + s0_programs,)](
        priors, preds, logits, s0, valid, desc, tile_stride, gtb, gtl, gtm, count, owner, clist,
        ccount, done, claim, B, N, G, C, NT, CAP, soft_center_radius, iou_weight,
        1e-4 + 2e-7 * abs(iou_weight), MMDET=mmdet, S0_READY=dense, PRUNE=t["prune"],
        TOPK=topk, KL=KL,
        BLOCK_N=BNP, TCHUNK=t["tchunk"], BLOCK_C=block_c, C_BLOCKS=cdiv(C, block_c),
        RN=rn, num_warps=t["num_warps_gt"])

    BP = t["block_p"]
    PT = cdiv(CAP, BP)
    launch(_resolve_kernel)[(B * PT,)](
        priors, preds, logits, s0, gtb, gtl, gtm, owner, clist, ccount, N, G, C, CAP, PT,
        soft_center_radius, iou_weight, MMDET=mmdet, BLOCK_P=BP, BLOCK_G=t["block_g"], RN=rn,
        num_warps=t["num_warps"])

    gt_index, labels, ious = out
    launch(_finish_kernel)[(B * NT,)](
        preds, gtb, gtl, count, owner, gt_index, labels, ious, N, G, NT,
        BLOCK_N=BNP, RN=rn, num_warps=t["num_warps"])
    return out


def _empty_outputs(B, N, device):
    return (torch.empty((B, N), dtype=torch.int64, device=device),
            torch.empty((B, N), dtype=torch.int64, device=device),
            torch.empty((B, N), dtype=torch.float32, device=device))


def _dsl_assign_impl(priors, pred_bboxes, pred_logits, gt_bboxes, gt_labels, gt_mask, topk,
                     soft_center_radius, iou_weight, mmyolo, launch=wrap_triton):
    B, N, _ = pred_logits.shape
    G = gt_bboxes.shape[1]
    out = _empty_outputs(B, N, pred_logits.device)
    if B == 0 or N == 0 or G == 0:
        out[0].fill_(-1)
        out[1].fill_(-1)
        out[2].zero_()
        return out
    return _launch(priors, pred_bboxes, pred_logits, gt_bboxes, gt_labels, gt_mask, topk,
                   soft_center_radius, iou_weight, mmyolo, out, launch)


@triton_op("rtmdet::dsl_assign_triton", mutates_args=())
def _dsl_assign_op(priors: torch.Tensor, pred_bboxes: torch.Tensor, pred_logits: torch.Tensor,
                   gt_bboxes: torch.Tensor, gt_labels: torch.Tensor, gt_mask: torch.Tensor,
                   topk: int, soft_center_radius: float, iou_weight: float,
                   mmyolo: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _dsl_assign_impl(priors, pred_bboxes, pred_logits, gt_bboxes, gt_labels, gt_mask,
                            topk, soft_center_radius, iou_weight, mmyolo)


def _direct(kernel):
    return kernel


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
    args = (priors, pred_bboxes, pred_logits, gt_bboxes, gt_labels, gt_mask, topk,
            float(soft_center_radius), float(iou_weight), semantics == "mmyolo")
    if eager_launch_ok(*args[:6]):  # a plain eager call: skip the custom-op dispatch
        return _dsl_assign_impl(*args, launch=_direct)
    return torch.ops.rtmdet.dsl_assign_triton(*args)
