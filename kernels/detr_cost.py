"""DETR match cost (SPEC section 4) in Triton: `detr_match_cost_triton`.

Same maths as `rtmdet.ops.detr_match_cost_ref`, per query q and gt g of image b:
    cost = cls_w * cls + l1_w * L1 - giou_w * GIoU
    softmax: cls = -exp(x[q, L_g] - m_q) / s_q, m_q = max_k x[q, k], s_q = sum_k exp(x[q, k] - m_q)
    focal:   cls = pos - neg of p = sigmoid(x[q, L_g]) (mmdet's FocalLossCost, eps inside the logs)
    L1:      sum |.| of (cx, cy, w, h) / (img_w, img_h, img_w, img_h); GIoU with 1e-6 clamps.

Layout: one program per (block of BLOCK_Q queries, span of G_TILES * BLOCK_G gts, image).
It reads its queries' boxes once and, for "softmax", their logits rows once (m_q and s_q
by an online max/sum over BLOCK_K-wide chunks of the K classes; so once per query block
while G <= G_TILES * BLOCK_G, and again only per further span of gts), then per tile of BLOCK_G
gts gathers the logit at each gt's label and writes the (BLOCK_Q, BLOCK_G) tile of the
(B, Q, G) float32 output; nothing else is written. Inputs are read in place with any strides
and dtype (fp32/fp16/bf16 logits and boxes; arithmetic in fp32). Q, G, K, B are runtime
arguments. Padded gts (mask False) are read as a zero box with label 0, so their columns are
finite whatever they hold.

Precision: divisions are correctly rounded and, on the GPU, exp/log/pow come from libdevice,
so p = 1 / (1 + exp(-x)) rounds as PyTorch's sigmoid does; this matters because mmdet's
focal term log(1 - p + eps) is ill-conditioned where p is within a few ulps of 1.
"""
import os

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton
from triton.language.extra import libdevice

from .fastmath import exp_rn as _exp, log_rn as _log

# Tunables: queries per program, gts per tile, gt tiles per program (more tiles: fewer
# programs, softmax row statistics computed fewer times; both upper bounds, the launch sizes
# them to G), class chunk of the row pass, warps.
TUNING = dict(block_q=32, block_g=64, g_tiles=4, block_k=128, num_warps=4)


def _precise():
    """libdevice on the GPU; the interpreter (TRITON_INTERPRET=1) uses numpy's functions."""
    return os.environ.get("TRITON_INTERPRET", "0") != "1"


@triton.jit
def _pow(base, gamma, GAMMA_TWO: tl.constexpr, RN: tl.constexpr):
    """base ** gamma for base in [0, 1], gamma >= 0, with pow(0, 0) = 1 as in PyTorch."""
    if GAMMA_TWO:  # the usual gamma: one multiply, and PyTorch's pow(x, 2.0) is x * x too
        r = base * base
    elif RN:
        r = libdevice.pow(base, tl.zeros_like(base) + gamma)
    else:
        # in float64 so that the rounding of gamma * log2(base) does not show in fp32;
        # z is NaN only for 0 * log2(0), i.e. pow(0, 0) = 1 (pow(0, gamma > 0) = exp2(-inf) = 0)
        z = tl.log2(base.to(tl.float64)) * gamma
        r = tl.where(z != z, 1.0, tl.exp2(z).to(tl.float32))
    return r


@triton.jit
def _focal_cost(x, alpha, gamma, eps, GAMMA_TWO: tl.constexpr, RN: tl.constexpr):
    """pos - neg of mmdet's FocalLossCost at logit x (fp32, any shape)."""
    p = tl.math.div_rn(1.0, 1.0 + _exp(-x, RN))  # PyTorch's sigmoid, rounding included
    q = 1.0 - p
    neg = -_log(q + eps, RN) * (1.0 - alpha) * _pow(p, gamma, GAMMA_TWO, RN)
    pos = -_log(p + eps, RN) * alpha * _pow(q, gamma, GAMMA_TWO, RN)
    return pos - neg


@triton.jit
def _detr_cost_kernel(logits_ptr, pbox_ptr, gbox_ptr, glab_ptr, gmask_ptr, size_ptr, out_ptr,
                      Q, G, K,
                      s_lb, s_lq, s_lk, s_pb, s_pq, s_pc, s_gb, s_gg, s_gc,
                      s_tb, s_tg, s_mb, s_mg, s_sb, s_sc,
                      cls_w, l1_w, giou_w, alpha, gamma, eps,
                      FOCAL: tl.constexpr, GAMMA_TWO: tl.constexpr, BLOCK_Q: tl.constexpr,
                      BLOCK_G: tl.constexpr, G_TILES: tl.constexpr, BLOCK_K: tl.constexpr,
                      RN: tl.constexpr):
    if RN:  # torch.compile passes Python floats as fp64 scalars (the interpreter as floats)
        cls_w = cls_w.to(tl.float32)
        l1_w = l1_w.to(tl.float32)
        giou_w = giou_w.to(tl.float32)
        alpha = alpha.to(tl.float32)
        gamma = gamma.to(tl.float32)
        eps = eps.to(tl.float32)
    pid_q = tl.program_id(0)
    pid_g = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    q = pid_q.to(tl.int64) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_ok = q < Q
    rows = logits_ptr + b * s_lb + q * s_lq                                   # (BLOCK_Q,)

    if not FOCAL:
        # softmax statistics of each row, online over chunks of classes
        m = tl.full((BLOCK_Q,), float("-inf"), tl.float32)
        s = tl.zeros((BLOCK_Q,), tl.float32)
        k0 = 0
        while k0 < K:  # a while loop: the interpreter cannot range() over a runtime int
            k = k0 + tl.arange(0, BLOCK_K)
            ok = q_ok[:, None] & (k < K)[None, :]
            x = tl.load(rows[:, None] + k[None, :] * s_lk, mask=ok, other=float("-inf"))
            x = tl.where(q_ok[:, None], x.to(tl.float32), 0.0)  # rows past Q: finite, unused
            m_new = tl.maximum(m, tl.max(x, axis=1))
            s = s * _exp(m - m_new, RN) + tl.sum(_exp(x - m_new[:, None], RN), axis=1)
            m = m_new
            k0 += BLOCK_K

    # the queries' boxes, also as normalised (cx, cy, w, h)
    pb = pbox_ptr + b * s_pb + q * s_pq
    px1 = tl.load(pb, mask=q_ok, other=0.0).to(tl.float32)
    py1 = tl.load(pb + s_pc, mask=q_ok, other=0.0).to(tl.float32)
    px2 = tl.load(pb + 2 * s_pc, mask=q_ok, other=0.0).to(tl.float32)
    py2 = tl.load(pb + 3 * s_pc, mask=q_ok, other=0.0).to(tl.float32)
    img_h = tl.load(size_ptr + b * s_sb).to(tl.float32)
    img_w = tl.load(size_ptr + b * s_sb + s_sc).to(tl.float32)
    pcx = tl.math.div_rn((px1 + px2) * 0.5, img_w)
    pcy = tl.math.div_rn((py1 + py2) * 0.5, img_h)
    pw = tl.math.div_rn(px2 - px1, img_w)
    ph = tl.math.div_rn(py2 - py1, img_h)
    area_p = (px2 - px1) * (py2 - py1)

    out_rows = out_ptr + (b * Q + q) * G                                      # (BLOCK_Q,)
    for t in range(G_TILES):
        g = (pid_g * G_TILES + t).to(tl.int64) * BLOCK_G + tl.arange(0, BLOCK_G)
        g_ok = g < G
        real = tl.load(gmask_ptr + b * s_mb + g * s_mg, mask=g_ok, other=0) != 0
        lab = tl.load(glab_ptr + b * s_tb + g * s_tg, mask=g_ok, other=0).to(tl.int64)
        lab = tl.minimum(tl.maximum(tl.where(real, lab, 0), 0), K - 1)
        gb = gbox_ptr + b * s_gb + g * s_gg
        gx1 = tl.where(real, tl.load(gb, mask=g_ok, other=0.0).to(tl.float32), 0.0)
        gy1 = tl.where(real, tl.load(gb + s_gc, mask=g_ok, other=0.0).to(tl.float32), 0.0)
        gx2 = tl.where(real, tl.load(gb + 2 * s_gc, mask=g_ok, other=0.0).to(tl.float32), 0.0)
        gy2 = tl.where(real, tl.load(gb + 3 * s_gc, mask=g_ok, other=0.0).to(tl.float32), 0.0)

        tile_ok = q_ok[:, None] & g_ok[None, :]
        x = tl.load(rows[:, None] + lab[None, :] * s_lk, mask=tile_ok, other=0.0).to(tl.float32)
        if FOCAL:
            cls = _focal_cost(x, alpha, gamma, eps, GAMMA_TWO, RN)
        else:
            cls = -tl.math.div_rn(_exp(x - m[:, None], RN), s[:, None])

        gcx = tl.math.div_rn((gx1 + gx2) * 0.5, img_w)
        gcy = tl.math.div_rn((gy1 + gy2) * 0.5, img_h)
        gw = tl.math.div_rn(gx2 - gx1, img_w)
        gh = tl.math.div_rn(gy2 - gy1, img_h)
        l1 = (tl.abs(pcx[:, None] - gcx[None, :]) + tl.abs(pcy[:, None] - gcy[None, :])
              + tl.abs(pw[:, None] - gw[None, :])) + tl.abs(ph[:, None] - gh[None, :])

        area_g = (gx2 - gx1) * (gy2 - gy1)
        ax1, ay1, ax2, ay2 = px1[:, None], py1[:, None], px2[:, None], py2[:, None]
        bx1, by1, bx2, by2 = gx1[None, :], gy1[None, :], gx2[None, :], gy2[None, :]
        inter = (tl.maximum(tl.minimum(ax2, bx2) - tl.maximum(ax1, bx1), 0.0)
                 * tl.maximum(tl.minimum(ay2, by2) - tl.maximum(ay1, by1), 0.0))
        union = tl.maximum((area_p[:, None] + area_g[None, :]) - inter, 1e-6)
        enclose = (tl.maximum(tl.maximum(ax2, bx2) - tl.minimum(ax1, bx1), 0.0)
                   * tl.maximum(tl.maximum(ay2, by2) - tl.minimum(ay1, by1), 0.0))
        enclose = tl.maximum(enclose, 1e-6)
        giou = tl.math.div_rn(inter, union) - tl.math.div_rn(enclose - union, enclose)

        cost = (cls * cls_w + l1 * l1_w) - giou * giou_w
        tl.store(out_rows[:, None] + g[None, :], cost, mask=tile_ok)


@triton_op("rtmdet::detr_match_cost_triton", mutates_args=())
def _detr_match_cost_op(pred_logits: torch.Tensor, pred_boxes: torch.Tensor,
                        gt_boxes: torch.Tensor, gt_labels: torch.Tensor,
                        image_sizes: torch.Tensor, gt_mask: torch.Tensor, focal: bool,
                        cls_weight: float, l1_weight: float, giou_weight: float,
                        focal_alpha: float, focal_gamma: float, eps: float) -> torch.Tensor:
    B, Q, K = pred_logits.shape
    G = gt_boxes.shape[1]
    out = torch.empty((B, Q, G), dtype=torch.float32, device=pred_logits.device)
    if B == 0 or Q == 0 or G == 0:
        return out
    t = TUNING
    mask = gt_mask.to(torch.uint8)  # a copy: inductor (torch 2.11) cannot lower a bool->uint8 view
    # Tiles sized to G: a tile past G still computes (then masks) its whole block, focal
    # transcendentals included; with the fixed 4 x 64 gts a DINO step at G = 20 did 12.8x the
    # work. Six (block_g, g_tiles) variants in all: G <= 16, 32, 64, 128, 192, more.
    block_g = min(t["block_g"], max(16, triton.next_power_of_2(G)))
    g_tiles = min(t["g_tiles"], triton.cdiv(G, block_g))
    span = block_g * g_tiles
    grid = (triton.cdiv(Q, t["block_q"]), triton.cdiv(G, span), B)
    wrap_triton(_detr_cost_kernel)[grid](
        pred_logits, pred_boxes, gt_boxes, gt_labels, mask, image_sizes, out, Q, G, K,
        *pred_logits.stride(), *pred_boxes.stride(), *gt_boxes.stride(), *gt_labels.stride(),
        *mask.stride(), *image_sizes.stride(),
        cls_weight, l1_weight, giou_weight, focal_alpha, focal_gamma, eps,
        FOCAL=focal, GAMMA_TWO=focal_gamma == 2.0, BLOCK_Q=t["block_q"], BLOCK_G=block_g,
        G_TILES=g_tiles, BLOCK_K=min(max(triton.next_power_of_2(K), 16), t["block_k"]),
        RN=_precise(), num_warps=t["num_warps"])
    return out


@_detr_match_cost_op.register_fake
def _detr_match_cost_fake(pred_logits, pred_boxes, gt_boxes, gt_labels, image_sizes, gt_mask,
                          focal, cls_weight, l1_weight, giou_weight, focal_alpha, focal_gamma,
                          eps):
    # explicit, so that fake tensors never reach the kernel (the interpreter would run it)
    B, Q, _ = pred_logits.shape
    return pred_logits.new_empty((B, Q, gt_boxes.shape[1]), dtype=torch.float32)


def detr_match_cost_triton(pred_logits, pred_boxes, gt_boxes, gt_labels, image_sizes, gt_mask, *,
                           cls_cost="softmax", cls_weight=1.0, l1_weight=5.0, giou_weight=2.0,
                           focal_alpha=0.25, focal_gamma=2.0, eps=1e-12):
    """Batched DETR match cost (SPEC section 4), equal to `rtmdet.ops.detr_match_cost_ref`.

    pred_logits (B, Q, K); pred_boxes (B, Q, 4) xyxy; gt_boxes (B, G, 4) xyxy; gt_labels (B, G)
    int; image_sizes (B, 2) (h, w); gt_mask (B, G) bool -> (B, Q, G) float32. Inputs are
    assumed checked (rtmdet.ops.detr_match_cost does it); no gradient.
    """
    if cls_cost not in ("softmax", "focal"):
        raise ValueError(f"detr_match_cost_triton: cls_cost must be 'softmax' or 'focal', "
                         f"got {cls_cost!r}")
    return torch.ops.rtmdet.detr_match_cost_triton(
        pred_logits, pred_boxes, gt_boxes, gt_labels, image_sizes, gt_mask, cls_cost == "focal",
        float(cls_weight), float(l1_weight), float(giou_weight), float(focal_alpha),
        float(focal_gamma), float(eps))
