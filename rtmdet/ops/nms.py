"""Non-maximum suppression for inference: class-aware (batched) NMS without torchvision."""
import torch

from . import _backend
from ._checks import check_dim, check_same_device, check_tensor
from .geometry import _iou


def nms(boxes, scores, iou_threshold, backend="auto"):
    """Greedy NMS: (M, 4) xyxy, (M,) scores -> kept indices (K,) int64, by decreasing score.

    A box is dropped when its IoU with a kept, higher-scoring box is > iou_threshold.
    Equal scores keep the lower index first.
    """
    check_tensor("boxes", boxes, ndim=2, last=4, floating=True)
    check_tensor("scores", scores, ndim=1, floating=True)
    check_dim("scores", scores, 0, boxes.shape[0], "M, the rows of boxes")
    check_same_device(boxes=boxes, scores=scores)
    impls = _nms_impls()
    impl = _backend.resolve_backend("nms", backend, boxes.device, impls)
    if impl != "torch":
        return impls[impl](boxes, scores, float(iou_threshold))
    return nms_ref(boxes, scores, float(iou_threshold))


def batched_nms(boxes, scores, idxs, iou_threshold, backend="auto"):
    """Class-aware NMS: boxes of different `idxs` (M,) never suppress each other.

    Returns kept indices (K,) int64 by decreasing score. Boxes are offset per class so one
    NMS pass handles all classes (the offset exceeds every coordinate).
    """
    check_tensor("idxs", idxs, ndim=1, integer=True)
    check_dim("idxs", idxs, 0, boxes.shape[0], "M, the rows of boxes")
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    span = boxes.max() - boxes.min() + 1
    shifted = boxes - boxes.min() + (idxs.to(boxes.dtype) * span)[:, None]
    return nms(shifted, scores, iou_threshold, backend=backend)


def _nms_impls():
    impls = {}
    if "nms" in _backend.native_ops():
        impls["cpp"] = impls["cuda"] = lambda b, s, t: torch.ops.rtmdet.nms(b, s, t)
    return impls


def nms_ref(boxes, scores, iou_threshold):
    """Reference greedy NMS over a precomputed IoU matrix; loops over boxes on the host."""
    order = torch.sort(scores, descending=True, stable=True).indices
    if order.numel() == 0:
        return order
    b = boxes[order]
    iou = _iou(b[:, None, :], b[None, :, :], False, 0.0).cpu()
    suppressed = torch.zeros(len(order), dtype=torch.bool)
    keep = []
    for i in range(len(order)):
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= iou[i] > iou_threshold
    return order[torch.tensor(keep, dtype=torch.long, device=order.device)]
