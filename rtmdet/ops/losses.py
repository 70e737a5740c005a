"""RTMDet head losses (SPEC section 3): Quality Focal Loss and GIoU loss, with references.

Reduction follows mmdetection: "none" -> (M,), "sum", "mean" (sum / M, or
sum / (avg_factor + float32 eps) when avg_factor is given, as mmdet's weight_reduce_loss).
The mean of zero elements is defined as 0.
"""
import torch
import torch.nn.functional as F

from . import _backend
from ._checks import check_dim, check_same_device, check_tensor, check_values, describe
from .geometry import _iou

REDUCTIONS = ("none", "mean", "sum")


def reduce_loss(loss, weight, reduction, avg_factor):
    """Apply per-row weight and mmdet's reduction to a (M,) loss."""
    if weight is not None:
        loss = loss * weight
    if reduction == "none":
        return loss
    if avg_factor is not None:
        if reduction != "mean":
            raise ValueError('avg_factor can only be used with reduction="mean"')
        return loss.sum() / (avg_factor + torch.finfo(torch.float32).eps)
    if reduction == "sum" or loss.numel() == 0:
        return loss.sum()
    return loss.mean()


def _check_reduction(op, reduction, avg_factor):
    if reduction not in REDUCTIONS:
        raise ValueError(f"{op}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if avg_factor is not None and reduction != "mean":
        raise ValueError(f'{op}: avg_factor can only be used with reduction="mean", got {reduction!r}')


def _check_weight(op, weight, M, device):
    if weight is None:
        return None
    check_tensor("weight", weight, floating=True)
    if weight.dim() == 2 and weight.shape[1] == 4 and op == "giou_loss":
        weight = weight.mean(-1)  # mmdet accepts per-coordinate box weights
    if weight.shape != (M,):
        raise ValueError(f"{op}: weight must be (M,) = ({M},), got {describe(weight)}")
    check_same_device(input=torch.empty(0, device=device), weight=weight)
    return weight


# ----------------------------------------------------------------------------------------
# Quality Focal Loss
# ----------------------------------------------------------------------------------------

def quality_focal_loss(logits, labels, scores, weight=None, beta=2.0, reduction="mean",
                       avg_factor=None, backend="auto"):
    """Quality Focal Loss summed over classes.

    logits (M, C) fp32/fp16/bf16; labels (M,) int with C (or any value outside [0, C)) for
    background; scores (M,) IoU targets in [0, 1]; weight (M,) or None.
    Per row: sum_c BCE(x_c, 0) sigmoid(x_c)^beta, except at a positive's own class
    BCE(x, score) |score - sigmoid(x)|^beta. Arithmetic in float32; loss float32.
    """
    _check_reduction("quality_focal_loss", reduction, avg_factor)
    check_tensor("logits", logits, ndim=2, floating=True)
    check_tensor("labels", labels, ndim=1, integer=True)
    check_tensor("scores", scores, ndim=1, floating=True)
    M, C = logits.shape
    check_dim("labels", labels, 0, M, "M, the rows of logits")
    check_dim("scores", scores, 0, M, "M, the rows of logits")
    check_same_device(logits=logits, labels=labels, scores=scores, weight=weight)
    weight = _check_weight("quality_focal_loss", weight, M, logits.device)
    check_values(finite=[("logits", logits), ("scores", scores), ("weight", weight)],
                 labels=("labels", labels, -1 if M else 0, C + 1, None))
    impls = _qfl_impls()
    impl = _backend.resolve_backend("quality_focal_loss", backend, logits.device, impls)
    if impl == "torch":
        loss = quality_focal_loss_ref(logits, labels, scores, beta=beta)
    else:
        loss = impls[impl](logits, labels, scores, beta)
    return reduce_loss(loss, weight, reduction, avg_factor)


def _qfl_impls():
    impls = {}
    try:
        from rtmdet.kernels.qfl import quality_focal_loss_triton
        impls["triton"] = quality_focal_loss_triton
    except ImportError:
        pass
    if "quality_focal_loss" in _backend.native_ops():
        impls["cpp"] = lambda x, l, s, b: torch.ops.rtmdet.quality_focal_loss(x, l, s, b)
    return impls


def quality_focal_loss_ref(logits, labels, scores, beta=2.0):
    """Unreduced QFL, (M, C) logits -> (M,) float32 (float64 for float64 logits, for gradcheck),
    written to be obviously right."""
    x = logits.double() if logits.dtype == torch.float64 else logits.float()
    M, C = x.shape
    s = x.sigmoid()
    negative = F.binary_cross_entropy_with_logits(x, torch.zeros_like(x), reduction="none") * s.pow(beta)
    positive_row = (labels >= 0) & (labels < C)
    target = F.one_hot(labels.long().clamp(0, max(C - 1, 0)), C).bool() & positive_row[:, None]
    score = scores.to(x.dtype)[:, None].expand(M, C)
    positive = F.binary_cross_entropy_with_logits(x, score, reduction="none") * (score - s).abs().pow(beta)
    return torch.where(target, positive, negative).sum(1)


# ----------------------------------------------------------------------------------------
# GIoU loss
# ----------------------------------------------------------------------------------------

def giou_loss(pred, target, weight=None, reduction="mean", avg_factor=None, eps=1e-6,
              backend="auto"):
    """GIoU loss 1 - GIoU(pred, target) of aligned xyxy boxes (M, 4) x (M, 4); weight (M,)."""
    _check_reduction("giou_loss", reduction, avg_factor)
    check_tensor("pred", pred, ndim=2, last=4, floating=True)
    check_tensor("target", target, ndim=2, last=4, floating=True)
    check_dim("target", target, 0, pred.shape[0], "M, the rows of pred")
    check_same_device(pred=pred, target=target, weight=weight)
    weight = _check_weight("giou_loss", weight, pred.shape[0], pred.device)
    check_values(finite=[("pred", pred), ("target", target), ("weight", weight)])
    impls = _giou_impls()
    impl = _backend.resolve_backend("giou_loss", backend, pred.device, impls)
    if impl == "torch":
        loss = giou_loss_ref(pred, target, eps=eps)
    else:
        loss = impls[impl](pred, target, eps)
    return reduce_loss(loss, weight, reduction, avg_factor)


def _giou_impls():
    impls = {}
    try:
        from rtmdet.kernels.giou import giou_loss_triton
        impls["triton"] = giou_loss_triton
    except ImportError:
        pass
    if "giou_loss" in _backend.native_ops():
        impls["cpp"] = lambda p, t, e: torch.ops.rtmdet.giou_loss(p, t, e)
    return impls


def giou_loss_ref(pred, target, eps=1e-6):
    """Unreduced GIoU loss, (M, 4) x (M, 4) -> (M,) in the boxes' dtype."""
    return 1 - _iou(pred, target, True, eps)
