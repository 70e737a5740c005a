"""RTMDet head losses (SPEC section 3): Quality Focal Loss and GIoU loss, with references.

Reduction follows mmdetection: "none" -> (M,), "sum", "mean" (sum / M, or
sum / (avg_factor + float32 eps) when avg_factor is given, as mmdet's weight_reduce_loss).
The mean of zero elements is defined as 0. avg_factor must be finite and > 0 (a number or a
one-element tensor, treated as a constant: no gradient flows into it).

On the Triton backend "sum" and "mean" are one fused op each: the weight, the reduction and
the normalisation happen inside the kernels (QFL recomputes its gradient in the backward;
GIoU saves its (M, 4) gradient), so an eager call costs two or three launches.
"""
import torch
import torch.nn.functional as F

from . import _backend
from ._checks import (_is_fake, check_dim, check_real, check_same_device, check_tensor,
                      check_values, describe)

REDUCTIONS = ("none", "mean", "sum")
_impls_cache = {}  # the implementations found at first use (imports and the built extension)
_EPS32 = float(torch.finfo(torch.float32).eps)


def reduce_loss(loss, weight, reduction, avg_factor):
    """Apply per-row weight and mmdet's reduction to a (M,) loss."""
    if weight is not None:
        loss = loss * weight
    if reduction == "none":
        return loss
    if avg_factor is not None:
        if reduction != "mean":
            raise ValueError('avg_factor can only be used with reduction="mean"')
        if isinstance(avg_factor, torch.Tensor):
            avg_factor = avg_factor.detach()
        return loss.sum() / (avg_factor + _EPS32)
    if reduction == "sum" or loss.numel() == 0:
        return loss.sum()
    return loss.mean()


def _check_reduction(op, reduction, avg_factor):
    """Checks reduction and avg_factor; returns avg_factor as a float, a 0-d tensor or None."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"{op}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if avg_factor is None:
        return None
    if reduction != "mean":
        raise ValueError(f'{op}: avg_factor can only be used with reduction="mean", got {reduction!r}')
    if isinstance(avg_factor, torch.Tensor):
        if avg_factor.numel() != 1 or avg_factor.is_complex() or avg_factor.dtype == torch.bool:
            raise ValueError(f"{op}: avg_factor must be a number or a one-element real tensor, "
                             f"got {describe(avg_factor)}")
        return avg_factor.reshape(())  # its value is checked with the other values (one sync)
    return check_real(op, "avg_factor", avg_factor, positive=True)


def _mean_scale(reduction, avg_factor, M):
    """(scale, divisor) such that the reduced loss = scale / divisor * sum (divisor: 0-d or None)."""
    if reduction == "sum":
        return 1.0, None
    if avg_factor is None:
        return (1.0 / M if M else 1.0), None
    if isinstance(avg_factor, torch.Tensor):
        return 1.0, avg_factor.detach().float() + _EPS32
    return 1.0 / (avg_factor + _EPS32), None


def _tensor_avg(avg_factor):
    return avg_factor if isinstance(avg_factor, torch.Tensor) else None


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
    background; scores (M,) IoU targets in [0, 1]; weight (M,) or None; beta finite > 0.
    Per row: sum_c BCE(x_c, 0) sigmoid(x_c)^beta, except at a positive's own class
    BCE(x, score) |score - sigmoid(x)|^beta. Arithmetic in float32; loss float32.
    C = 0 (no classes) gives a loss of 0 for every row.
    """
    avg_factor = _check_reduction("quality_focal_loss", reduction, avg_factor)
    beta = check_real("quality_focal_loss", "beta", beta, positive=True)
    check_tensor("logits", logits, ndim=2, floating=True)
    check_tensor("labels", labels, ndim=1, integer=True)
    check_tensor("scores", scores, ndim=1, floating=True)
    M, C = logits.shape
    check_dim("labels", labels, 0, M, "M, the rows of logits")
    check_dim("scores", scores, 0, M, "M, the rows of logits")
    check_same_device(logits=logits, labels=labels, scores=scores, weight=weight,
                      avg_factor=_tensor_avg(avg_factor))
    weight = _check_weight("quality_focal_loss", weight, M, logits.device)
    check_values(finite=[("logits", logits), ("scores", scores), ("weight", weight)],
                 labels=("labels", labels, -1 if M else 0, C + 1, None),
                 positive=[("avg_factor", _tensor_avg(avg_factor))])
    impls = _qfl_impls()
    impl = _backend.resolve_backend("quality_focal_loss", backend, logits.device, impls)
    if impl == "triton" and reduction != "none":
        from rtmdet.kernels.qfl import quality_focal_loss_triton_sum
        scale, divisor = _mean_scale(reduction, avg_factor, M)
        return quality_focal_loss_triton_sum(logits, labels, scores, weight, divisor, beta, scale)
    if impl == "torch" or C == 0:
        loss = quality_focal_loss_ref(logits, labels, scores, beta=beta)
    else:
        loss = impls[impl](logits, labels, scores, beta)
    return reduce_loss(loss, weight, reduction, avg_factor)


def _qfl_impls():
    if _impls_cache.get("qfl") is not None:
        return _impls_cache["qfl"]
    impls = _impls_cache["qfl"] = {}
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
    written to be obviously right. C = 0: zeros."""
    x = logits.double() if logits.dtype == torch.float64 else logits.float()
    M, C = x.shape
    if C == 0:
        return x.sum(1)  # the empty sum, still connected to logits for autograd
    s = x.sigmoid()
    negative = F.binary_cross_entropy_with_logits(x, torch.zeros_like(x), reduction="none") * s.pow(beta)
    positive_row = (labels >= 0) & (labels < C)
    target = F.one_hot(labels.long().clamp(0, C - 1), C).bool() & positive_row[:, None]
    score = scores.to(x.dtype)[:, None].expand(M, C)
    positive = F.binary_cross_entropy_with_logits(x, score, reduction="none") * (score - s).abs().pow(beta)
    return torch.where(target, positive, negative).sum(1)


# ----------------------------------------------------------------------------------------
# GIoU loss
# ----------------------------------------------------------------------------------------

def giou_loss(pred, target, weight=None, reduction="mean", avg_factor=None, eps=1e-6,
              backend="auto"):
    """GIoU loss 1 - GIoU(pred, target) of aligned xyxy boxes (M, 4) x (M, 4); weight (M,);
    eps finite > 0. An inverted box (x2 < x1 or y2 < y1) counts as empty (area 0), so the
    loss is finite and in [0, 2] for any finite boxes (see `giou_loss_ref`)."""
    avg_factor = _check_reduction("giou_loss", reduction, avg_factor)
    eps = check_real("giou_loss", "eps", eps, positive=True)
    check_tensor("pred", pred, ndim=2, last=4, floating=True)
    check_tensor("target", target, ndim=2, last=4, floating=True)
    check_dim("target", target, 0, pred.shape[0], "M, the rows of pred")
    check_same_device(pred=pred, target=target, weight=weight,
                      avg_factor=_tensor_avg(avg_factor))
    weight = _check_weight("giou_loss", weight, pred.shape[0], pred.device)
    check_values(finite=[("pred", pred), ("target", target), ("weight", weight)],
                 positive=[("avg_factor", _tensor_avg(avg_factor))])
    impls = _giou_impls()
    impl = _backend.resolve_backend("giou_loss", backend, pred.device, impls)
    if impl == "triton" and reduction != "none":
        from rtmdet.kernels.giou import giou_loss_triton_sum_public
        scale, divisor = _mean_scale(reduction, avg_factor, pred.shape[0])
        return giou_loss_triton_sum_public(pred, target, weight, divisor, eps, scale)
    if impl == "torch":
        loss = giou_loss_ref(pred, target, eps=eps)
    else:
        loss = impls[impl](pred, target, eps)
    return reduce_loss(loss, weight, reduction, avg_factor)


def _giou_impls():
    if _impls_cache.get("giou") is not None:
        return _impls_cache["giou"]
    impls = _impls_cache["giou"] = {}
    try:
        from rtmdet.kernels.giou import giou_loss_triton
        impls["triton"] = giou_loss_triton
    except ImportError:
        pass
    if "giou_loss" in _backend.native_ops():
        impls["cpp"] = _giou_cpp
    return impls


def _inverted(boxes):
    return (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])


def _giou_cpp(pred, target, eps):
    """The C++ kernel predates the empty-box definition of inverted boxes (it takes their
    signed area): rows with an inverted box take the reference's value (CPU: no device sync)."""
    loss = torch.ops.rtmdet.giou_loss(pred, target, eps)
    inverted = _inverted(pred) | _inverted(target)
    if torch.compiler.is_compiling() or _is_fake(pred) or bool(inverted.any()):
        loss = torch.where(inverted, giou_loss_ref(pred, target, eps).to(loss.dtype), loss)
    return loss


def giou_loss_ref(pred, target, eps=1e-6):
    """Unreduced GIoU loss, (M, 4) x (M, 4) -> (M,) in the boxes' dtype, computed in float32
    (float64 for float64 boxes) like the kernels: fp16 areas overflow above 65504 px^2.

    As mmdetection's for proper boxes (union and enclosing area clamped at eps); the widths
    and heights that make the two areas are clamped at 0, so an inverted box is empty: the
    loss stays in [0, 2] (mmdetection's signed areas give e.g. -9.2e9 when both are inverted).
    """
    dtype = torch.promote_types(pred.dtype, target.dtype)  # (result_type breaks torch.compile)
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    pred, target = pred.to(wide), target.to(wide)
    area_p = (pred[:, 2] - pred[:, 0]).clamp(min=0) * (pred[:, 3] - pred[:, 1]).clamp(min=0)
    area_t = (target[:, 2] - target[:, 0]).clamp(min=0) * (target[:, 3] - target[:, 1]).clamp(min=0)
    w = (torch.minimum(pred[:, 2], target[:, 2]) - torch.maximum(pred[:, 0], target[:, 0])).clamp(min=0)
    h = (torch.minimum(pred[:, 3], target[:, 3]) - torch.maximum(pred[:, 1], target[:, 1])).clamp(min=0)
    inter = w * h
    union = (area_p + area_t - inter).clamp(min=eps)
    ew = (torch.maximum(pred[:, 2], target[:, 2]) - torch.minimum(pred[:, 0], target[:, 0])).clamp(min=0)
    eh = (torch.maximum(pred[:, 3], target[:, 3]) - torch.minimum(pred[:, 1], target[:, 1])).clamp(min=0)
    enclose = (ew * eh).clamp(min=eps)
    return (1 - (inter / union - (enclose - union) / enclose)).to(dtype)
