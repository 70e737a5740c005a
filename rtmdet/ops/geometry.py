"""Box geometry (SPEC section 1): IoU/GIoU, the distance coder and the point priors.

Boxes are xyxy floats; zero-width and inverted boxes give finite values (the overlap
is clamped at 0 and the union and enclosing area at `eps`).
"""
import torch

from ._checks import check_same_device, check_tensor


def box_iou(boxes1, boxes2, mode="iou", aligned=False, eps=1e-6):
    """IoU or GIoU of xyxy boxes.

    aligned=False: (..., M, 4) x (..., K, 4) -> (..., M, K), batch dims broadcast.
    aligned=True:  (..., M, 4) x (..., M, 4) -> (..., M).
    IoU = inter / max(union, eps); GIoU = IoU - (enclose - union) / max(enclose, eps).
    """
    if mode not in ("iou", "giou"):
        raise ValueError(f"box_iou: mode must be 'iou' or 'giou', got {mode!r}")
    check_tensor("boxes1", boxes1, last=4, floating=True)
    check_tensor("boxes2", boxes2, last=4, floating=True)
    check_same_device(boxes1=boxes1, boxes2=boxes2)
    if boxes1.dim() < 2 or boxes2.dim() < 2:
        raise ValueError(f"box_iou: boxes must be (..., M, 4), got {tuple(boxes1.shape)} "
                         f"and {tuple(boxes2.shape)}")
    if aligned:
        if boxes1.shape[-2] != boxes2.shape[-2]:
            raise ValueError(f"box_iou(aligned=True): boxes1 and boxes2 must have the same number "
                             f"of boxes, got {tuple(boxes1.shape)} and {tuple(boxes2.shape)}")
        a, b = boxes1, boxes2
    else:
        a, b = boxes1[..., :, None, :], boxes2[..., None, :, :]
    return _iou(a, b, mode == "giou", eps)


def _iou(a, b, giou, eps):
    """Elementwise (broadcast) IoU or GIoU of xyxy boxes a and b (..., 4) -> (...)."""
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    w = (torch.minimum(a[..., 2], b[..., 2]) - torch.maximum(a[..., 0], b[..., 0])).clamp(min=0)
    h = (torch.minimum(a[..., 3], b[..., 3]) - torch.maximum(a[..., 1], b[..., 1])).clamp(min=0)
    inter = w * h
    union = (area_a + area_b - inter).clamp(min=eps)
    iou = inter / union
    if not giou:
        return iou
    ew = (torch.maximum(a[..., 2], b[..., 2]) - torch.minimum(a[..., 0], b[..., 0])).clamp(min=0)
    eh = (torch.maximum(a[..., 3], b[..., 3]) - torch.minimum(a[..., 1], b[..., 1])).clamp(min=0)
    enclose = (ew * eh).clamp(min=eps)
    return iou - (enclose - union) / enclose


def distance2bbox(points, distance):
    """Decode ltrb distances at points: (..., 2) + (..., 4) -> (..., 4) xyxy (x-l, y-t, x+r, y+b)."""
    check_tensor("points", points, last=None)
    if points.shape[-1] < 2:
        raise ValueError(f"distance2bbox: points must be (..., 2) (extra columns ignored), "
                         f"got {tuple(points.shape)}")
    check_tensor("distance", distance, last=4)
    x, y = points[..., 0], points[..., 1]
    return torch.stack([x - distance[..., 0], y - distance[..., 1],
                        x + distance[..., 2], y + distance[..., 3]], dim=-1)


def bbox2distance(points, boxes):
    """Encode xyxy boxes as ltrb distances from points: inverse of `distance2bbox`."""
    check_tensor("points", points)
    if points.shape[-1] < 2:
        raise ValueError(f"bbox2distance: points must be (..., 2), got {tuple(points.shape)}")
    check_tensor("boxes", boxes, last=4)
    x, y = points[..., 0], points[..., 1]
    return torch.stack([x - boxes[..., 0], y - boxes[..., 1],
                        boxes[..., 2] - x, boxes[..., 3] - y], dim=-1)


def grid_priors(featmap_sizes, strides=(8, 16, 32), offset=0.0, device=None, dtype=torch.float32):
    """Point priors of a feature pyramid: [(h, w), ...] -> (N, 4) rows (x, y, stride_w, stride_h).

    Level-major, row-major inside a level: prior (i, j) of stride s is at ((j+offset)s, (i+offset)s).
    A stride may be an int or a (stride_w, stride_h) pair.
    """
    if len(featmap_sizes) != len(strides):
        raise ValueError(f"grid_priors: got {len(featmap_sizes)} feature map sizes but "
                         f"{len(strides)} strides")
    levels = []
    for (h, w), s in zip(featmap_sizes, strides):
        sw, sh = (s, s) if isinstance(s, (int, float)) else s
        xs = (torch.arange(int(w), device=device, dtype=torch.float32) + offset) * sw
        ys = (torch.arange(int(h), device=device, dtype=torch.float32) + offset) * sh
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        n = int(h) * int(w)
        levels.append(torch.stack([xx.reshape(-1), yy.reshape(-1),
                                   xx.new_full((n,), float(sw)), xx.new_full((n,), float(sh))], -1))
    if not levels:
        return torch.zeros((0, 4), device=device, dtype=dtype)
    return torch.cat(levels).to(dtype)
