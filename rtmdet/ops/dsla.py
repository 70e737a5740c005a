"""Dynamic Soft Label Assigner (SPEC section 2): public `dsl_assign` and its PyTorch reference.

The reference is vectorised over the whole batch: (B, N, G) tensors, never (B, N, G, C)
(the mmdet class cost uses the per-prior identity of SPEC 2.3), no Python loop over
images or gts and no host synchronisation, so it also serves as the fallback on
machines without the fast paths.
"""
from typing import NamedTuple

import torch
import torch.nn.functional as F

from . import _backend
from ._checks import (check_dim, check_int, check_real, check_same_device, check_tensor,
                      check_values, describe, value_checks_active)
from .geometry import _iou

EPS = 1e-7
INF = 1e8
SEMANTICS = ("mmdet", "mmyolo")


class DSLAssignment(NamedTuple):
    """Per-prior assignment; shapes (B, N) for a batched call, (N,) for an unbatched one."""
    gt_index: torch.Tensor  # int64, matched gt's index into G, -1 = background
    labels: torch.Tensor    # int64, matched gt's label, -1 = background
    ious: torch.Tensor      # float32, IoU of the matched pair, 0 for background


def dsl_assign(priors, pred_bboxes, pred_logits, gt_bboxes, gt_labels, gt_mask=None, *,
               topk=13, soft_center_radius=3.0, iou_weight=3.0, semantics="mmdet",
               backend="auto"):
    """Assign priors to gts with RTMDet's Dynamic Soft Label Assigner (SPEC section 2).

    priors (N, 4) rows (x, y, stride_w, stride_h); pred_bboxes (B, N, 4) decoded xyxy;
    pred_logits (B, N, C) fp32/fp16/bf16; gt_bboxes (B, G, 4) xyxy; gt_labels (B, G) in
    [0, C); gt_mask (B, G) bool, True = real gt, padding anywhere (None = all real).
    Unbatched: (N, 4), (N, C), (G, 4), (G,) -> outputs of shape (N,).
    Ties: a gt prefers the lower prior index; a contested prior the lower gt index.
    topk: an integer >= 1 (numpy integers too); soft_center_radius, iou_weight: finite >= 0.
    The outputs are never differentiable (on every backend), whatever requires_grad says.
    Returns DSLAssignment(gt_index, labels, ious).
    """
    topk = check_int("dsl_assign", "topk", topk, low=1)
    soft_center_radius = check_real("dsl_assign", "soft_center_radius", soft_center_radius, low=0.0)
    iou_weight = check_real("dsl_assign", "iou_weight", iou_weight, low=0.0)
    args = _prepare(priors, pred_bboxes, pred_logits, gt_bboxes, gt_labels, gt_mask,
                    topk, semantics)
    unbatched, (priors, pred_bboxes, pred_logits, gt_bboxes, gt_labels, gt_mask) = args
    impls = _implementations()
    impl = _backend.resolve_backend("dsl_assign", backend, priors.device, impls)
    fn = dsl_assign_ref if impl == "torch" else impls[impl]
    with torch.no_grad():  # an assignment is a discrete choice: no backend gives a gradient
        out = fn(priors, pred_bboxes, pred_logits, gt_bboxes, gt_labels, gt_mask,
                 topk=topk, soft_center_radius=soft_center_radius,
                 iou_weight=iou_weight, semantics=semantics)
    out = DSLAssignment(*out)
    if unbatched:
        out = DSLAssignment(*(t[0] for t in out))
    return out


def _implementations():
    """Fast implementations of dsl_assign by backend name, filled in as they are imported."""
    impls = {}
    try:
        from rtmdet.kernels.dsla import dsl_assign_triton
        impls["triton"] = dsl_assign_triton
    except ImportError:
        pass
    if "dsl_assign" in _backend.native_ops():
        impls["cpp"] = _native_dsl_assign  # CPU only: on CUDA the Triton kernels win
    return impls


def _native_dsl_assign(priors, pred_bboxes, pred_logits, gt_bboxes, gt_labels, gt_mask, *,
                       topk, soft_center_radius, iou_weight, semantics):
    return torch.ops.rtmdet.dsl_assign(priors, pred_bboxes, pred_logits, gt_bboxes, gt_labels,
                                       gt_mask, topk, soft_center_radius, iou_weight,
                                       semantics == "mmyolo")


def _prepare(priors, pred_bboxes, pred_logits, gt_bboxes, gt_labels, gt_mask, topk, semantics):
    """Check the inputs and bring them to the batched form; returns (unbatched, tensors)."""
    if semantics not in SEMANTICS:
        raise ValueError(f"dsl_assign: semantics must be one of {SEMANTICS}, got {semantics!r}")
    check_tensor("priors", priors, ndim=2, floating=True)
    if priors.shape[1] != 4:
        raise ValueError(f"priors must be (N, 4) rows (x, y, stride_w, stride_h), got {describe(priors)}")
    check_tensor("pred_bboxes", pred_bboxes, ndim=(2, 3), last=4, floating=True)
    unbatched = pred_bboxes.dim() == 2
    rank = 2 if unbatched else 3
    form = "unbatched (N, ...)" if unbatched else "batched (B, N, ...)"
    check_tensor("pred_logits", pred_logits, ndim=rank, floating=True)
    check_tensor("gt_bboxes", gt_bboxes, ndim=rank, last=4, floating=True)
    check_tensor("gt_labels", gt_labels, ndim=rank - 1, integer=True)
    if gt_mask is not None:
        check_tensor("gt_mask", gt_mask, ndim=rank - 1)
        if gt_mask.dtype != torch.bool:
            raise TypeError(f"gt_mask must be a bool tensor, got {describe(gt_mask)}")
    check_same_device(priors=priors, pred_bboxes=pred_bboxes, pred_logits=pred_logits,
                      gt_bboxes=gt_bboxes, gt_labels=gt_labels, gt_mask=gt_mask)
    if unbatched:
        pred_bboxes, pred_logits, gt_bboxes, gt_labels = (
            t[None] for t in (pred_bboxes, pred_logits, gt_bboxes, gt_labels))
        gt_mask = None if gt_mask is None else gt_mask[None]
    B, N, _ = pred_bboxes.shape
    G = gt_bboxes.shape[1]
    check_dim("pred_bboxes", pred_bboxes, 1, priors.shape[0], "N, the number of priors")
    check_dim("pred_logits", pred_logits, 0, B, f"B, the batch size of pred_bboxes; {form}")
    check_dim("pred_logits", pred_logits, 1, N, "N, the number of priors")
    check_dim("gt_bboxes", gt_bboxes, 0, B, f"B, the batch size of pred_bboxes; {form}")
    check_dim("gt_labels", gt_labels, 0, B, f"B, the batch size of pred_bboxes; {form}")
    check_dim("gt_labels", gt_labels, 1, G, "G, the number of gts in gt_bboxes")
    if gt_mask is None:
        gt_mask = torch.ones((B, G), dtype=torch.bool, device=gt_bboxes.device)
    check_dim("gt_mask", gt_mask, 0, B, "B, the batch size")
    check_dim("gt_mask", gt_mask, 1, G, "G, the number of gts in gt_bboxes")
    C = pred_logits.shape[2]
    if C == 0 and G > 0:
        raise ValueError(f"pred_logits must have at least one class, got {describe(pred_logits)}")
    # Padded gts may hold anything (zeros, -1 labels, NaN boxes): only real ones are checked.
    # The masked copy is made only when the checks run (not in training with checks off).
    if value_checks_active(pred_logits):
        check_values(finite=[("priors", priors), ("pred_bboxes", pred_bboxes),
                             ("pred_logits", pred_logits),
                             ("gt_bboxes", gt_bboxes.masked_fill(~gt_mask[..., None], 0))],
                     labels=("gt_labels", gt_labels, 0, C, gt_mask))
    return unbatched, (priors, pred_bboxes, pred_logits, gt_bboxes, gt_labels.long(), gt_mask)


# ----------------------------------------------------------------------------------------
# PyTorch reference
# ----------------------------------------------------------------------------------------

def soft_cls_cost(x, y):
    """f(x, y) = BCEWithLogits(x, y) * |y - sigmoid(x)|^2, elementwise in float32."""
    return F.binary_cross_entropy_with_logits(x, y, reduction="none") * (y - x.sigmoid()).square()


def dsl_cost_ref(priors, pred_bboxes, pred_logits, gt_bboxes, gt_labels, gt_mask, *,
                 soft_center_radius=3.0, iou_weight=3.0, semantics="mmdet"):
    """Cost terms of SPEC 2.2-2.3 for a padded batch.

    Returns valid (B, N) bool, iou (B, N, G) float32 and cost (B, N, G) float32
    (cost = cls_cost + iou_cost + center_cost, +inf where the centre term overflows;
    defined for every prior, meaningful for valid ones and real gts).
    """
    B, N, _ = pred_bboxes.shape
    G = gt_bboxes.shape[1]
    px, py, stride = (priors[:, i].float()[None, :, None] for i in range(3))
    gt = gt_bboxes.float()[:, None, :, :]                                  # (B, 1, G, 4)
    x1, y1, x2, y2 = gt.unbind(-1)
    dmin = torch.minimum(torch.minimum(px - x1, py - y1), torch.minimum(x2 - px, y2 - py))
    valid = ((dmin > 0) & gt_mask[:, None, :]).any(-1)                      # (B, N)
    dist = ((px - (x1 + x2) / 2).square() + (py - (y1 + y2) / 2).square()).sqrt() / stride
    center_cost = torch.pow(10.0, dist - soft_center_radius)
    iou = _iou(pred_bboxes.float()[:, :, None, :], gt, False, 1e-6)         # (B, N, G)
    iou_cost = -torch.log(iou + EPS) * iou_weight
    x = pred_logits.float()
    C = x.shape[2]
    labels = gt_labels.clamp(0, max(C - 1, 0))[:, None, :].expand(B, N, G)
    x_gt = torch.gather(x, 2, labels) if C > 0 else x.new_zeros(B, N, G)  # logit at the gt class
    cls_cost = soft_cls_cost(x_gt, iou)
    if semantics == "mmdet":
        # sum_c f(x_c, 0) with the gt class's term swapped for f(x_L, iou)
        s0 = soft_cls_cost(x, torch.zeros_like(x)).sum(-1, keepdim=True)
        cls_cost = (s0 - soft_cls_cost(x_gt, torch.zeros_like(x_gt))) + cls_cost
    cost = cls_cost + iou_cost + center_cost
    return valid, iou, cost


def ordered_key(x):
    """Map float32 to int64 in [0, 2^32) with the same order (+0.0 == -0.0, +inf largest)."""
    x = torch.where(x == 0, torch.zeros_like(x), x.float())
    bits = x.view(torch.int32).long()
    return torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF) + (1 << 31)


def dynamic_ks(iou, valid, gt_mask, topk, semantics):
    """Dynamic k per gt (SPEC 2.4): (B, N, G) ious -> (B, G) int64 in [1, topk].

    Sum of the min(topk, V) largest IoUs (valid priors for mmdet, all priors for mmyolo),
    added in descending order in float32, truncated, at least 1.
    """
    B, N, G = iou.shape
    if semantics == "mmdet":
        iou = torch.where(valid[:, :, None], iou, torch.zeros_like(iou))
    kk = min(topk, N)
    top = torch.topk(iou, kk, dim=1).values                                 # (B, kk, G) descending
    total = top[:, 0]
    for i in range(1, kk):
        total = total + top[:, i]
    return total.long().clamp(min=1)


def dsl_assign_ref(priors, pred_bboxes, pred_logits, gt_bboxes, gt_labels, gt_mask, *,
                   topk=13, soft_center_radius=3.0, iou_weight=3.0, semantics="mmdet"):
    """Batched reference of SPEC section 2. Shapes as `dsl_assign` (batched form, gt_mask given).

    Returns (gt_index, labels, ious), each (B, N).
    """
    B, N, _ = pred_bboxes.shape
    G = gt_bboxes.shape[1]
    device = pred_bboxes.device
    if N == 0 or G == 0:
        return (torch.full((B, N), -1, dtype=torch.long, device=device),
                torch.full((B, N), -1, dtype=torch.long, device=device),
                torch.zeros((B, N), dtype=torch.float32, device=device))
    valid, iou, cost = dsl_cost_ref(priors, pred_bboxes, pred_logits, gt_bboxes, gt_labels,
                                    gt_mask, soft_center_radius=soft_center_radius,
                                    iou_weight=iou_weight, semantics=semantics)
    k = dynamic_ks(iou, valid, gt_mask, topk, semantics)                    # (B, G)

    # Step 5: each gt's k lowest-cost valid priors, ties to the lower prior index. The key
    # orders (invalid, cost, prior index) so that every key is distinct and topk is exact.
    cost_key = ordered_key(cost)
    prior_index = torch.arange(N, device=device)[None, :, None]
    select_key = ((~valid).long()[:, :, None] << 56) | (cost_key << 24) | prior_index
    kk = min(topk, N)
    candidates = torch.topk(select_key, kk, dim=1, largest=False).indices  # (B, kk, G)
    rank = torch.arange(kk, device=device)[None, :, None]
    chosen = (rank < k[:, None, :]) & torch.gather(valid, 1, candidates.flatten(1)).view(B, kk, G)
    chosen &= gt_mask[:, None, :]
    matching = torch.zeros((B, N, G), dtype=torch.bool, device=device)
    matching.scatter_(1, candidates, chosen)

    # Step 6: a prior chosen by several gts goes to its row's cheapest real gt (lower index on ties).
    count = matching.sum(-1)
    only_gt = matching.byte().argmax(-1)
    row_key = cost_key | ((~gt_mask).long()[:, None, :] << 32)
    cheapest_gt = row_key.argmin(-1)
    gt_index = torch.where(count > 1, cheapest_gt, only_gt)
    gt_index = torch.where(count > 0, gt_index, torch.full_like(gt_index, -1))
    return finish_assignment(gt_index, gt_labels, iou)


def finish_assignment(gt_index, gt_labels, iou):
    """(B, N) gt index (-1 = background) -> (gt_index, labels, ious) of SPEC 2.7."""
    fg = gt_index >= 0
    safe = gt_index.clamp(min=0)
    labels = torch.where(fg, torch.gather(gt_labels.long(), 1, safe), torch.full_like(safe, -1))
    matched_iou = torch.gather(iou, 2, safe[..., None])[..., 0]
    ious = torch.where(fg, matched_iou, torch.zeros_like(matched_iou))
    return gt_index, labels, ious
