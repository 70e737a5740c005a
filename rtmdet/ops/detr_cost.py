"""DETR match cost (SPEC section 4): public `detr_match_cost` and its PyTorch reference.

cost[b, q, g] = cls_weight * cls + l1_weight * L1 - giou_weight * GIoU, as mmdetection 3.x's
HungarianAssigner sums ClassificationCost or FocalLossCost, BBoxL1Cost(box_format='xywh')
and IoUCost(iou_mode='giou'):
  softmax: cls = -softmax(logits[q])[L_g] over all K = C + 1 outputs;
  focal:   cls = pos - neg at column L_g, p = sigmoid(logits[q, L_g]),
           pos = -log(p + eps) * alpha * (1 - p)^gamma,
           neg = -log(1 - p + eps) * (1 - alpha) * p^gamma;
  L1:      sum |pred - gt| of both boxes as (cx, cy, w, h) / (img_w, img_h, img_w, img_h);
  GIoU:    of the xyxy pixel boxes, union and enclosing area clamped at 1e-6 (SPEC section 1).
The cost is a matching input, not a loss: it carries no gradient.

The reference is vectorised over the batch ((B, Q, G) tensors, no Python loop, no host
synchronisation). backend "auto": CUDA tensors go to the Triton kernel (kernels/detr_cost.py),
CPU tensors to the C++ kernel (csrc/cpu/detr_cost_cpu.cpp: no (B, Q, K) or (B, Q, G)
intermediates, each logits row read once, the class cost computed once per distinct label),
or to the reference where the extension was built without it.
"""
import numbers

import torch

from . import _backend
from ._checks import (check_dim, check_same_device, check_tensor, check_values, describe,
                      is_finite_number, value_checks_active)

CLS_COSTS = ("softmax", "focal")
GIOU_EPS = 1e-6  # mmdet's bbox_overlaps default


def detr_match_cost(pred_logits, pred_boxes, gt_boxes, gt_labels, image_sizes, gt_mask=None, *,
                    cls_cost="softmax", cls_weight=1.0, l1_weight=5.0, giou_weight=2.0,
                    focal_alpha=0.25, focal_gamma=2.0, eps=1e-12, backend="auto"):
    """Pairwise DETR matching cost of queries against gts (SPEC section 4).

    pred_logits (B, Q, K) fp32/fp16/bf16 logits (K = C + 1 for "softmax", C for "focal");
    pred_boxes (B, Q, 4) xyxy pixels; gt_boxes (B, G, 4) xyxy pixels; gt_labels (B, G) int in
    [0, K); image_sizes (B, 2) (h, w) per image, positive (a tensor, or a nested sequence);
    gt_mask (B, G) bool, True = real gt (None = all real).
    Unbatched: (Q, K), (Q, 4), (G, 4), (G,), (2,), (G,) -> (Q, G).
    Returns the (B, Q, G) float32 cost, computed in float32, without gradient. Columns of
    padded gts (gt_mask False; their boxes and labels may hold anything) hold finite values
    of no meaning: the solver ignores them. Degenerate and zero-size boxes give finite costs.
    backend "auto": Triton for CUDA tensors, C++ for CPU tensors (the PyTorch reference if
    rtmdet._C lacks it).
    """
    if cls_cost not in CLS_COSTS:
        raise ValueError(f"detr_match_cost: cls_cost must be one of {CLS_COSTS}, got {cls_cost!r}")
    params = _check_params(cls_weight=cls_weight, l1_weight=l1_weight, giou_weight=giou_weight,
                           focal_alpha=focal_alpha, focal_gamma=focal_gamma, eps=eps)
    unbatched, tensors = _prepare(pred_logits, pred_boxes, gt_boxes, gt_labels, image_sizes,
                                  gt_mask)
    device = tensors[0].device
    impls = _implementations()
    if backend == "auto" and device.type != "cuda":
        # without the C++ op the reference is the CPU path: no fallback warning
        impl = "cpp" if device.type == "cpu" and "cpp" in impls else "torch"
    else:
        impl = _backend.resolve_backend("detr_match_cost", backend, device, impls)
    fn = detr_match_cost_ref if impl == "torch" else impls[impl]
    with torch.no_grad():
        out = fn(*tensors, cls_cost=cls_cost, **params)
    return out[0] if unbatched else out


def _implementations():
    impls = {}
    try:
        from rtmdet.kernels.detr_cost import detr_match_cost_triton
        impls["triton"] = detr_match_cost_triton
    except ImportError:
        pass
    if "detr_match_cost" in _backend.native_ops():
        impls["cpp"] = detr_match_cost_cpp
    return impls


def detr_match_cost_cpp(pred_logits, pred_boxes, gt_boxes, gt_labels, image_sizes, gt_mask, *,
                        cls_cost="softmax", cls_weight=1.0, l1_weight=5.0, giou_weight=2.0,
                        focal_alpha=0.25, focal_gamma=2.0, eps=1e-12):
    """torch.ops.rtmdet.detr_match_cost (csrc/cpu/detr_cost_cpu.cpp) with the reference's
    arguments: batched shapes as `detr_match_cost_ref`, gt_mask may be None; (B, Q, G) float32."""
    return torch.ops.rtmdet.detr_match_cost(
        pred_logits, pred_boxes, gt_boxes, gt_labels, image_sizes, gt_mask, cls_cost,
        float(cls_weight), float(l1_weight), float(giou_weight), float(focal_alpha),
        float(focal_gamma), float(eps))


def _check_params(*, cls_weight, l1_weight, giou_weight, focal_alpha, focal_gamma, eps):
    """The cost's parameters as floats, checked: all finite, alpha in [0, 1], gamma >= 0,
    eps > 0."""
    params = dict(cls_weight=cls_weight, l1_weight=l1_weight, giou_weight=giou_weight,
                  focal_alpha=focal_alpha, focal_gamma=focal_gamma, eps=eps)
    out = {}
    for name, v in params.items():
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not is_finite_number(v):
            raise ValueError(f"detr_match_cost: {name} must be a finite number, got {v!r}")
        out[name] = float(v)
    if not 0.0 <= out["focal_alpha"] <= 1.0:
        raise ValueError(f"detr_match_cost: focal_alpha must lie in [0, 1], got {focal_alpha!r}")
    if out["focal_gamma"] < 0:
        raise ValueError(f"detr_match_cost: focal_gamma must be >= 0, got {focal_gamma!r}")
    if out["eps"] <= 0:
        raise ValueError(f"detr_match_cost: eps must be > 0, got {eps!r}")
    return out


def _prepare(pred_logits, pred_boxes, gt_boxes, gt_labels, image_sizes, gt_mask):
    """Check the inputs and bring them to the batched form; returns (unbatched, tensors)."""
    check_tensor("pred_boxes", pred_boxes, ndim=(2, 3), last=4, floating=True)
    unbatched = pred_boxes.dim() == 2
    rank = 2 if unbatched else 3
    form = "unbatched (Q, ...)" if unbatched else "batched (B, Q, ...)"
    check_tensor("pred_logits", pred_logits, ndim=rank, floating=True)
    check_tensor("gt_boxes", gt_boxes, ndim=rank, last=4, floating=True)
    check_tensor("gt_labels", gt_labels, ndim=rank - 1, integer=True)
    if not isinstance(image_sizes, torch.Tensor):
        try:
            image_sizes = torch.as_tensor(image_sizes, dtype=torch.float32,
                                          device=pred_boxes.device)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TypeError(f"image_sizes must be a tensor or a sequence of (h, w) pairs, got "
                            f"{type(image_sizes).__name__} ({exc})") from None
    check_tensor("image_sizes", image_sizes, ndim=rank - 1, last=2)
    if image_sizes.dtype == torch.bool or image_sizes.is_complex():
        raise TypeError(f"image_sizes must hold real (h, w) numbers, got {describe(image_sizes)}")
    if gt_mask is not None:
        check_tensor("gt_mask", gt_mask, ndim=rank - 1)
        if gt_mask.dtype != torch.bool:
            raise TypeError(f"gt_mask must be a bool tensor, got {describe(gt_mask)}")
    check_same_device(pred_logits=pred_logits, pred_boxes=pred_boxes, gt_boxes=gt_boxes,
                      gt_labels=gt_labels, image_sizes=image_sizes, gt_mask=gt_mask)
    if unbatched:
        pred_logits, pred_boxes, gt_boxes, gt_labels, image_sizes = (
            t[None] for t in (pred_logits, pred_boxes, gt_boxes, gt_labels, image_sizes))
        gt_mask = None if gt_mask is None else gt_mask[None]
    B, Q, _ = pred_boxes.shape
    G = gt_boxes.shape[1]
    check_dim("pred_logits", pred_logits, 0, B, f"B, the batch size of pred_boxes; {form}")
    check_dim("pred_logits", pred_logits, 1, Q, "Q, the number of queries in pred_boxes")
    check_dim("gt_boxes", gt_boxes, 0, B, f"B, the batch size of pred_boxes; {form}")
    check_dim("gt_labels", gt_labels, 0, B, f"B, the batch size of pred_boxes; {form}")
    check_dim("gt_labels", gt_labels, 1, G, "G, the number of gts in gt_boxes")
    check_dim("image_sizes", image_sizes, 0, B, f"B, the batch size of pred_boxes; {form}")
    if gt_mask is None:
        gt_mask = torch.ones((B, G), dtype=torch.bool, device=gt_boxes.device)
    check_dim("gt_mask", gt_mask, 0, B, "B, the batch size")
    check_dim("gt_mask", gt_mask, 1, G, "G, the number of gts in gt_boxes")
    K = pred_logits.shape[2]
    if K == 0 and G > 0:
        raise ValueError(f"pred_logits must have at least one class, got {describe(pred_logits)}")
    if value_checks_active(pred_logits):
        _check_values(pred_logits, pred_boxes, gt_boxes, gt_labels, image_sizes, gt_mask, K)
    return unbatched, (pred_logits, pred_boxes, gt_boxes, gt_labels, image_sizes, gt_mask)


def _check_values(pred_logits, pred_boxes, gt_boxes, gt_labels, image_sizes, gt_mask, K):
    """NaN/Inf, label range and positive image sizes, with one host synchronisation."""
    # Padded gts may hold anything (zeros, -1 labels, NaN boxes): only real ones are checked.
    gt_real = gt_boxes.masked_fill(~gt_mask[..., None], 0)
    sizes_ok = (torch.isfinite(image_sizes) & (image_sizes > 0)).all()
    finite = [("pred_logits", pred_logits), ("pred_boxes", pred_boxes), ("gt_boxes", gt_real)]
    flags = [torch.isfinite(t).all() for _, t in finite]
    flags += [((gt_labels >= 0) & (gt_labels < K) | ~gt_mask).all(), sizes_ok]
    if bool(torch.stack(flags).all()):
        return
    check_values(finite=finite, labels=("gt_labels", gt_labels, 0, K, gt_mask))
    bad = (~(torch.isfinite(image_sizes) & (image_sizes > 0))).nonzero()[0].tolist()
    raise ValueError(f"image_sizes must be positive (h, w) sizes, found "
                     f"{image_sizes[tuple(bad)].item()} at index {tuple(bad)} "
                     f"({describe(image_sizes)})")


# ----------------------------------------------------------------------------------------
# PyTorch reference
# ----------------------------------------------------------------------------------------

def _cxcywh(boxes):
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], dim=-1)


@torch.no_grad()  # a matching input, not a loss (and the arithmetic is in place)
def detr_match_cost_ref(pred_logits, pred_boxes, gt_boxes, gt_labels, image_sizes, gt_mask, *,
                        cls_cost="softmax", cls_weight=1.0, l1_weight=5.0, giou_weight=2.0,
                        focal_alpha=0.25, focal_gamma=2.0, eps=1e-12):
    """Batched reference of SPEC section 4. Shapes as `detr_match_cost` (batched, gt_mask
    given); returns the (B, Q, G) float32 cost."""
    B, Q, K = pred_logits.shape
    G = gt_boxes.shape[1]
    if B == 0 or Q == 0 or G == 0:
        return pred_boxes.new_zeros((B, Q, G), dtype=torch.float32)
    real = gt_mask[..., None]
    gt = torch.where(real, gt_boxes.float(), torch.zeros((), device=gt_boxes.device))
    labels = torch.where(gt_mask, gt_labels.long(), 0).clamp(0, K - 1)
    x = pred_logits.float()
    if cls_cost == "softmax":
        per_class = -x.softmax(-1)
    else:
        p = x.sigmoid()
        neg = -(1 - p + eps).log() * (1 - focal_alpha) * p.pow(focal_gamma)
        pos = -(p + eps).log() * focal_alpha * (1 - p).pow(focal_gamma)
        per_class = pos - neg
    cls = torch.gather(per_class, 2, labels[:, None, :].expand(B, Q, G))

    h, w = image_sizes.float().unbind(-1)
    factor = torch.stack([w, h, w, h], dim=-1)[:, None, :]                 # (B, 1, 4)
    pred_n = _cxcywh(pred_boxes.float()) / factor
    gt_n = _cxcywh(gt) / factor
    l1 = torch.cdist(pred_n, gt_n, p=1)  # as mmdet's BBoxL1Cost

    giou = pairwise_giou(pred_boxes.float(), gt)
    # (cls * cls_weight + l1 * l1_weight) - giou * giou_weight, in place (same roundings)
    cls = cls.mul_(cls_weight).add_(l1.mul_(l1_weight))
    return cls.sub_(giou.mul_(giou_weight))


def pairwise_giou(pred, gt, eps=GIOU_EPS):
    """GIoU of every pred against every gt: (B, Q, 4) x (B, G, 4) xyxy -> (B, Q, G).

    The operations and their order are those of geometry._iou (so the values are the same),
    on contiguous (B, Q, 1) and (B, 1, G) coordinates and in place: at DINO sizes on the CPU
    that is twice as fast as broadcasting strided slices of (..., 4) boxes.
    """
    px1, py1, px2, py2 = (c[:, :, None].contiguous() for c in pred.unbind(-1))
    gx1, gy1, gx2, gy2 = (c[:, None, :].contiguous() for c in gt.unbind(-1))
    area_p = (px2 - px1) * (py2 - py1)
    area_g = (gx2 - gx1) * (gy2 - gy1)
    inter = (torch.minimum(px2, gx2) - torch.maximum(px1, gx1)).clamp_(min=0)
    inter *= (torch.minimum(py2, gy2) - torch.maximum(py1, gy1)).clamp_(min=0)
    union = ((area_p + area_g) - inter).clamp_(min=eps)
    enclose = (torch.maximum(px2, gx2) - torch.minimum(px1, gx1)).clamp_(min=0)
    enclose *= (torch.maximum(py2, gy2) - torch.minimum(py1, gy1)).clamp_(min=0)
    enclose.clamp_(min=eps)
    gap = (enclose - union).div_(enclose)
    return inter.div_(union).sub_(gap)
