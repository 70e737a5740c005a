"""Literal oracles of SPEC sections 2 and 3, written step by step to be obviously right.

`dsla_oracle_image` follows SPEC section 2 for one image with loops over gts (each gt's
column of N priors is computed with float32 tensor ops, as upstream computes it) and over
priors where the SPEC speaks of single priors. It is slow on purpose: it builds the soft
one-hot label over all C classes for the mmdet class cost instead of using an identity,
sorts every candidate list, and resolves conflicts prior by prior.

`qfl_oracle` and `giou_loss_oracle` compute the losses row by row with `math` in float64.
"""
import math
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F

EPS = 1e-7


def f_cost(x, y):
    """f(x, y) = BCEWithLogits(x, y) * |y - sigmoid(x)|^2 in float32 (SPEC 2.3)."""
    return F.binary_cross_entropy_with_logits(x, y, reduction="none") * (y - x.sigmoid()).abs().pow(2.0)


def dsla_oracle_image(priors, pred_bboxes, pred_logits, gt_bboxes, gt_labels, *, topk=13,
                      soft_center_radius=3.0, iou_weight=3.0, semantics="mmdet"):
    """SPEC section 2 for one image with real gts only.

    priors (N, 4); pred_bboxes (N, 4); pred_logits (N, C) any float dtype (upcast to float32);
    gt_bboxes (G, 4); gt_labels (G,). Returns a dict with gt_index (N,) int64, labels (N,)
    int64, ious (N,) float32 and the intermediates valid (N,), iou (N, G), cost (N, G)
    (computed for every prior, used for valid ones), k_sum (G,) float32 and k (G,) int64.
    """
    assert semantics in ("mmdet", "mmyolo")
    N, G = priors.shape[0], gt_bboxes.shape[0]
    out = dict(gt_index=torch.full((N,), -1, dtype=torch.long),
               labels=torch.full((N,), -1, dtype=torch.long),
               ious=torch.zeros(N, dtype=torch.float32),
               valid=torch.zeros(N, dtype=torch.bool),
               iou=torch.zeros(N, G), cost=torch.zeros(N, G),
               k_sum=torch.zeros(G), k=torch.zeros(G, dtype=torch.long))
    # Step 1.
    if N == 0 or G == 0:
        return out
    P = priors.float().cpu()
    D = pred_bboxes.float().cpu()
    X = pred_logits.float().cpu()
    T = gt_bboxes.float().cpu()
    L = [int(v) for v in gt_labels.cpu()]
    C = X.shape[1]
    px, py, stride_w = P[:, 0], P[:, 1], P[:, 2]

    # Step 2: valid = strictly inside at least one gt.
    valid = torch.zeros(N, dtype=torch.bool)
    for g in range(G):
        x1, y1, x2, y2 = T[g]
        deltas = torch.stack([px - x1, py - y1, x2 - px, y2 - py], -1)
        valid |= deltas.min(-1).values > 0
    out["valid"] = valid
    if not bool(valid.any()):
        return out

    # Step 3: cost of every prior for every gt, one gt column at a time.
    iou = torch.zeros(N, G)
    cost = torch.zeros(N, G)
    area_pred = (D[:, 2] - D[:, 0]) * (D[:, 3] - D[:, 1])
    for g in range(G):
        x1, y1, x2, y2 = T[g]
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        distance = ((px - cx) ** 2 + (py - cy) ** 2).sqrt() / stride_w
        center_cost = torch.pow(10.0, distance - soft_center_radius)

        area_gt = (x2 - x1) * (y2 - y1)
        w = (torch.minimum(D[:, 2], x2) - torch.maximum(D[:, 0], x1)).clamp(min=0)
        h = (torch.minimum(D[:, 3], y2) - torch.maximum(D[:, 1], y1)).clamp(min=0)
        inter = w * h
        union = torch.maximum(area_pred + area_gt - inter, torch.tensor(1e-6))
        iou_g = inter / union
        iou_cost = -torch.log(iou_g + EPS) * iou_weight

        if semantics == "mmdet":
            # Upstream builds the soft one-hot label over all C classes and sums f over them.
            soft_label = torch.zeros(N, C)
            soft_label[:, L[g]] = iou_g
            cls_cost = f_cost(X, soft_label).sum(-1)
        else:
            cls_cost = f_cost(X[:, L[g]], iou_g)
        iou[:, g] = iou_g
        cost[:, g] = cls_cost + iou_cost + center_cost
    out["iou"], out["cost"] = iou, cost

    # Step 4: dynamic k, the float32 sum of the min(topk, V) largest IoUs, truncated, >= 1.
    valid_idx = valid.nonzero()[:, 0].numpy()
    k = []
    k_sum = []
    for g in range(G):
        pool = iou[valid_idx, g] if semantics == "mmdet" else iou[:, g]
        largest = sorted(pool.tolist(), reverse=True)[:min(topk, len(pool))]
        total = np.float32(0.0)
        for v in largest:
            total = np.float32(total + np.float32(v))
        k_sum.append(float(total))
        k.append(max(int(total), 1))
    out["k_sum"] = torch.tensor(k_sum, dtype=torch.float32)
    out["k"] = torch.tensor(k, dtype=torch.long)

    # Step 5: each gt takes its k lowest-cost valid priors; a stable sort keeps equal costs
    # (+inf included) in prior-index order.
    cost_np = cost.numpy()
    chosen_by = [[] for _ in range(N)]
    for g in range(G):
        order = np.argsort(cost_np[valid_idx, g], kind="stable")
        for n in valid_idx[order[:k[g]]]:
            chosen_by[int(n)].append(g)

    # Step 6: a prior chosen by several gts goes to the cheapest gt of its whole row.
    gt_index = out["gt_index"]
    for n in range(N):
        if len(chosen_by[n]) == 1:
            gt_index[n] = chosen_by[n][0]
        elif len(chosen_by[n]) > 1:
            row = [float(c) for c in cost_np[n]]
            gt_index[n] = min(range(G), key=lambda g: (row[g], g))

    # Step 7.
    for n in range(N):
        g = int(gt_index[n])
        if g >= 0:
            out["labels"][n] = L[g]
            out["ious"][n] = iou[n, g]
    return out


@contextmanager
def single_thread():
    """Run torch on one thread: the oracle's many small ops are ~50x slower when intra-op
    threads fight for a few busy cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def dsla_oracle(priors, pred_bboxes, pred_logits, gt_bboxes, gt_labels, gt_mask=None, **kwargs):
    """Batched oracle: image by image on the real gts, indices mapped back into G.

    Returns dict gt_index, labels (B, N) int64, ious (B, N) float32, k (B, G) (0 for padding).
    """
    with single_thread():
        return _dsla_oracle(priors, pred_bboxes, pred_logits, gt_bboxes, gt_labels, gt_mask, **kwargs)


def _dsla_oracle(priors, pred_bboxes, pred_logits, gt_bboxes, gt_labels, gt_mask, **kwargs):
    B, N = pred_bboxes.shape[:2]
    G = gt_bboxes.shape[1]
    if gt_mask is None:
        gt_mask = torch.ones(B, G, dtype=torch.bool)
    gt_index = torch.full((B, N), -1, dtype=torch.long)
    labels = torch.full((B, N), -1, dtype=torch.long)
    ious = torch.zeros(B, N)
    k = torch.zeros(B, G, dtype=torch.long)
    for b in range(B):
        real = gt_mask[b].cpu().nonzero()[:, 0]
        r = dsla_oracle_image(priors, pred_bboxes[b], pred_logits[b], gt_bboxes[b].cpu()[real],
                              gt_labels[b].cpu()[real], **kwargs)
        fg = r["gt_index"] >= 0
        gt_index[b, fg] = real[r["gt_index"][fg]]
        labels[b], ious[b] = r["labels"], r["ious"]
        k[b, real] = r["k"]
    return dict(gt_index=gt_index, labels=labels, ious=ious, k=k)


# ----------------------------------------------------------------------------------------
# Losses (SPEC section 3), float64 with math, one row at a time
# ----------------------------------------------------------------------------------------

def _bce(x, y):
    """BCE with logits of a single value: -(y log s + (1-y) log(1-s)), s = sigmoid(x)."""
    return max(x, 0.0) - x * y + math.log1p(math.exp(-abs(x)))


def qfl_oracle(logits, labels, scores, beta=2.0):
    """(M, C) logits, (M,) labels (C or outside [0, C) = background), (M,) scores -> (M,) float64."""
    M, C = logits.shape
    out = []
    for i in range(M):
        total = 0.0
        for c in range(C):
            x = float(logits[i, c])
            s = 1.0 / (1.0 + math.exp(-x))
            if int(labels[i]) == c:
                y = float(scores[i])
                total += _bce(x, y) * abs(y - s) ** beta
            else:
                total += _bce(x, 0.0) * s ** beta
        out.append(total)
    return torch.tensor(out, dtype=torch.float64)


def _areas(a, b, eps, empty_inverted=False):
    if empty_inverted:  # the GIoU loss's definition: an inverted box has area 0
        area_a = max(a[2] - a[0], 0.0) * max(a[3] - a[1], 0.0)
        area_b = max(b[2] - b[0], 0.0) * max(b[3] - b[1], 0.0)
    else:  # mmdetection's bbox_overlaps (the assigner's IoU): signed areas
        area_a = (a[2] - a[0]) * (a[3] - a[1])
        area_b = (b[2] - b[0]) * (b[3] - b[1])
    inter = max(min(a[2], b[2]) - max(a[0], b[0]), 0.0) * max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)
    union = max(area_a + area_b - inter, eps)
    enclose = max(max(a[2], b[2]) - min(a[0], b[0]), 0.0) * max(max(a[3], b[3]) - min(a[1], b[1]), 0.0)
    return inter, union, max(enclose, eps)


def iou_oracle(a, b, eps=1e-6):
    """IoU of two xyxy boxes given as 4 floats: inter / max(union, eps)."""
    inter, union, _ = _areas(a, b, eps)
    return inter / union


def giou_oracle(a, b, eps=1e-6, empty_inverted=False):
    """GIoU of two xyxy boxes given as 4 floats: IoU - (enclose - union) / max(enclose, eps)."""
    inter, union, enclose = _areas(a, b, eps, empty_inverted)
    return inter / union - (enclose - union) / enclose


def giou_loss_oracle(pred, target, eps=1e-6):
    """(M, 4) x (M, 4) -> (M,) float64 of 1 - GIoU, inverted boxes counted as empty (area 0)."""
    return torch.tensor([1.0 - giou_oracle([float(v) for v in p], [float(v) for v in t], eps, True)
                         for p, t in zip(pred, target)], dtype=torch.float64)
