"""RTMDet head loss (SPEC section 3) from raw head outputs, batched over images.

One batched `ops.dsl_assign` call, QFL over all B*N priors and GIoU over all B*N rows
weighted by the assigned metric (0 for background), so that no shape depends on the data:
no per-image loop, no `nonzero`, no `.item()`. (The ops' optional NaN/label value checks
do synchronise; switch them off with `rtmdet.ops.set_value_checks(False)` in training.)

On CUDA with the Triton backend the losses are two fused ops that take the assignment as it
comes (background label -1, the gts gathered by index inside the GIoU kernel, the
normaliser as a device scalar): about 14 launches forward and 4 backward for the whole
head loss, since an eager training step is bound by the host's launch and dispatch time.
The priors and the decoding table are cached per (feature map sizes, strides, device).
"""
from typing import Dict, List, Sequence, Union

import torch
import torch.distributed as dist

from . import ops
from .ops._checks import check_tensor, describe

BBOX_LOSS_WEIGHT = 2.0
GIOU_EPS = 1e-6
_prior_cache = {}


def pad_gts(gt_bboxes, gt_labels, gt_mask=None, device=None):
    """Bring gts to the padded batch form: (B, G, 4) float, (B, G) int64, (B, G) bool.

    gt_bboxes/gt_labels: padded tensors (with gt_mask, None = all real) or lists of B tensors
    (G_i, 4) / (G_i,). G is at least 1 (an all-padding column when no image has a gt) so
    that gathering matched gts never indexes an empty dimension.
    """
    if isinstance(gt_bboxes, (list, tuple)):
        if not isinstance(gt_labels, (list, tuple)) or len(gt_labels) != len(gt_bboxes):
            raise ValueError("head_loss: with a list of gt_bboxes, gt_labels must be a list of "
                             "the same length (one (G_i,) tensor per image)")
        if gt_mask is not None:
            raise ValueError("head_loss: gt_mask is only for padded (B, G, 4) gt_bboxes")
        B = len(gt_bboxes)
        for i, (b, l) in enumerate(zip(gt_bboxes, gt_labels)):
            check_tensor(f"gt_bboxes[{i}]", b, ndim=2, last=4, floating=True)
            check_tensor(f"gt_labels[{i}]", l, ndim=1, integer=True)
            if l.shape[0] != b.shape[0]:
                raise ValueError(f"gt_labels[{i}] must have G_i = {b.shape[0]} entries like "
                                 f"gt_bboxes[{i}], got {describe(l)}")
        G = max([b.shape[0] for b in gt_bboxes] + [1])
        dev = device if device is not None else (gt_bboxes[0].device if B else None)
        dtype = gt_bboxes[0].dtype if B else torch.float32
        boxes = torch.zeros((B, G, 4), dtype=dtype, device=dev)
        labels = torch.zeros((B, G), dtype=torch.long, device=dev)
        mask = torch.zeros((B, G), dtype=torch.bool, device=dev)
        for i, (b, l) in enumerate(zip(gt_bboxes, gt_labels)):
            boxes[i, :b.shape[0]] = b
            labels[i, :b.shape[0]] = l
            mask[i, :b.shape[0]] = True
        return boxes, labels, mask
    check_tensor("gt_bboxes", gt_bboxes, ndim=3, last=4, floating=True)
    check_tensor("gt_labels", gt_labels, ndim=2, integer=True)
    B, G, _ = gt_bboxes.shape
    if gt_labels.shape != (B, G):
        raise ValueError(f"gt_labels must be (B, G) = ({B}, {G}) like gt_bboxes, got {describe(gt_labels)}")
    if gt_mask is None:
        gt_mask = torch.ones((B, G), dtype=torch.bool, device=gt_bboxes.device)
    elif gt_mask.shape != (B, G) or gt_mask.dtype != torch.bool:
        raise ValueError(f"gt_mask must be a (B, G) = ({B}, {G}) bool tensor, got {describe(gt_mask)}")
    gt_labels = gt_labels.long()
    if G == 0:
        gt_bboxes = gt_bboxes.new_zeros((B, 1, 4))
        gt_labels = gt_labels.new_zeros((B, 1))
        gt_mask = gt_mask.new_zeros((B, 1))
    return gt_bboxes, gt_labels, gt_mask


def flatten_levels(cls_scores, bbox_preds):
    """Per-level (B, C, H, W) / (B, 4, H, W) -> (B, N, C), (B, N, 4), level-major, row-major."""
    if len(cls_scores) != len(bbox_preds) or not cls_scores:
        raise ValueError(f"head_loss: cls_scores and bbox_preds must be non-empty lists with one "
                         f"entry per level, got {len(cls_scores)} and {len(bbox_preds)}")
    B, C = cls_scores[0].shape[:2]
    for i, (c, r) in enumerate(zip(cls_scores, bbox_preds)):
        check_tensor(f"cls_scores[{i}]", c, ndim=4, floating=True)
        check_tensor(f"bbox_preds[{i}]", r, ndim=4, floating=True)
        if c.shape[:2] != (B, C) or r.shape != (B, 4) + c.shape[2:]:
            raise ValueError(f"level {i}: cls_scores must be (B, C, H, W) = ({B}, {C}, H, W) and "
                             f"bbox_preds (B, 4, H, W) with the same H, W; got cls_scores "
                             f"{describe(c)}, bbox_preds {describe(r)}")
    logits = torch.cat([c.permute(0, 2, 3, 1).reshape(B, -1, C) for c in cls_scores], 1)
    dists = torch.cat([r.permute(0, 2, 3, 1).reshape(B, -1, 4) for r in bbox_preds], 1)
    return logits, dists


def _mean_over_processes(x):
    """Average across torch.distributed processes; all_reduce stays on the device (no host sync)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        x = x.clone()
        dist.all_reduce(x)
        x = x / dist.get_world_size()
    return x


def head_loss(cls_scores: Sequence[torch.Tensor], bbox_preds: Sequence[torch.Tensor],
              gt_bboxes: Union[torch.Tensor, List[torch.Tensor]],
              gt_labels: Union[torch.Tensor, List[torch.Tensor]],
              gt_mask=None, strides=(8, 16, 32), backend="auto") -> Dict[str, torch.Tensor]:
    """RTMDet head loss (SPEC section 3) -> {"loss_cls": scalar, "loss_bbox": scalar}.

    cls_scores: per level (B, C, H_l, W_l) logits; bbox_preds: per level (B, 4, H_l, W_l) ltrb
    distances in pixels (already x stride); gts: (B, G, 4) xyxy + (B, G) labels + (B, G) bool
    mask, or lists of B tensors (G_i, 4) / (G_i,).
    loss_cls = QFL sum / max(sum of metrics, 1); loss_bbox = 2 * sum(metric * (1 - GIoU)) /
    max(sum of positive metrics, 1); metric = IoU of the assigned pair (0 for background);
    under torch.distributed both factors are first averaged across processes.
    """
    if len(strides) != len(cls_scores):
        raise ValueError(f"head_loss: got {len(cls_scores)} levels but {len(strides)} strides")
    logits, dists = flatten_levels(cls_scores, bbox_preds)
    B, N, C = logits.shape
    device = logits.device
    gt_bboxes, gt_labels, gt_mask = pad_gts(gt_bboxes, gt_labels, gt_mask, device=device)
    if gt_bboxes.shape[0] != B:
        raise ValueError(f"head_loss: got {gt_bboxes.shape[0]} images of gts for a batch of {B}")
    priors, corners, signs = _prior_tables([tuple(c.shape[-2:]) for c in cls_scores], strides,
                                           device)
    # distance2bbox as one op: (x, y, x, y) + (l, t, r, b) * (-1, -1, 1, 1), bitwise equal
    pred_bboxes = torch.addcmul(corners, dists.float(), signs)               # (B, N, 4)
    a = ops.dsl_assign(priors, pred_bboxes.detach(), logits.detach(), gt_bboxes, gt_labels,
                       gt_mask, backend=backend)
    metric = a.ious                                                          # 0 for background
    # Background metrics are 0, so the sum of positive weights equals the sum of metrics.
    avg = _mean_over_processes(metric.sum()).clamp(min=1.0)

    if _fused_losses(backend, device):
        from .kernels.giou import giou_loss_triton_sum_public
        from .kernels.qfl import quality_focal_loss_triton_sum
        # labels -1 (background) lie outside [0, C): the QFL kernel's background
        loss_cls = quality_focal_loss_triton_sum(logits.reshape(B * N, C), a.labels.reshape(-1),
                                                 metric.reshape(-1), None, avg, 2.0, 1.0)
        loss_bbox = giou_loss_triton_sum_public(pred_bboxes.reshape(B * N, 4), gt_bboxes.float(),
                                                metric.reshape(-1), avg, GIOU_EPS,
                                                BBOX_LOSS_WEIGHT, index=a.gt_index)
        return {"loss_cls": loss_cls, "loss_bbox": loss_bbox}

    fg = a.gt_index >= 0
    labels = torch.where(fg, a.labels, torch.full_like(a.labels, C))
    # Background rows get their own (detached) prediction as target: a finite loss that
    # weight 0 removes, without a data-dependent selection of the positives.
    index = a.gt_index.clamp(min=0)[..., None].expand(B, N, 4)
    target = torch.gather(gt_bboxes.float(), 1, index)
    target = torch.where(fg[..., None], target, pred_bboxes.detach())
    loss_cls = ops.quality_focal_loss(logits.reshape(B * N, C), labels.reshape(-1),
                                      metric.reshape(-1), reduction="sum", backend=backend)
    loss_bbox = ops.giou_loss(pred_bboxes.reshape(B * N, 4), target.reshape(B * N, 4),
                              weight=metric.reshape(-1), reduction="sum", backend=backend)
    return {"loss_cls": loss_cls / avg, "loss_bbox": loss_bbox * BBOX_LOSS_WEIGHT / avg}


def _fused_losses(backend, device):
    """Whether both losses run on the Triton backend here (what ops.* would pick)."""
    if not (backend == "triton" or (backend == "auto" and device.type == "cuda")):
        return False
    impl = ops._backend.resolve_backend("quality_focal_loss", backend, device,
                                        ops.losses._qfl_impls())
    return impl == "triton"


def _prior_tables(featmap_sizes, strides, device):
    """(priors (N, 4), corners (N, 4) = (x, y, x, y), signs (4,) = (-1, -1, 1, 1)), cached per
    (sizes, strides, device) outside torch.compile tracing and CUDA graph capture (a tensor
    made during capture holds no values until the graph is replayed)."""
    key = (tuple(featmap_sizes), tuple(strides), str(device))
    tables = _prior_cache.get(key)
    if tables is not None:
        return tables
    priors = ops.grid_priors(list(featmap_sizes), strides, offset=0.0, device=device)
    corners = priors[:, :2].repeat(1, 2)
    signs = torch.tensor([-1.0, -1.0, 1.0, 1.0], device=device)
    tables = (priors, corners, signs)
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    if not torch.compiler.is_compiling() and not capturing:
        if len(_prior_cache) > 64:  # many input sizes (multi-scale training): start over
            _prior_cache.clear()
        _prior_cache[key] = tables
    return tables
