"""mmyolo 0.6 drop-in: `FusedBatchDynamicSoftLabelAssigner` in mmyolo's TASK_UTILS.

Importing this module registers the class (mmyolo builds assigners from configs by name, so
it must be in its registry). A config switches with two lines::

    custom_imports = dict(imports=["rtmdet.integrations.mmyolo"], allow_failed_imports=False)
    model = dict(train_cfg=dict(assigner=dict(type="FusedBatchDynamicSoftLabelAssigner")))

(the assigner keeps the base config's num_classes, topk and iou_calculator). The assignment
is `rtmdet.ops.dsl_assign(..., semantics="mmyolo")`; this file only translates mmyolo's padded
tensors and its result dict.

Where the result differs from mmyolo's `BatchDynamicSoftLabelAssigner` (SPEC section 2, step
5 and the batched form; these are defects of the stock class, ours follows the per-image
definition):

- A padded gt never wins a prior. Stock resolves a prior claimed by several gts with an argmin
  over the whole cost row, padded columns included (a zero box costs about 48.4 + the centre
  term), so a padded gt can take the prior: it then gets class `gt_labels[pad]` (0), a zero
  target box and metric 0. Ours gives it to the cheapest real gt.
- An invalid prior (centre inside no gt) is never selected. Stock's dynamic k counts IoUs over
  all priors, and when k exceeds the number of valid priors it selects priors whose cost is its
  1e8 padding value, in torch.sort's (unstable) order. Ours selects only valid priors.
- Padding may sit anywhere in the gt axis. Stock loops over the first `pad_bbox_flag.sum()`
  slots, i.e. assumes mmyolo's own trailing padding.
- Exact cost ties go to the lower prior index (stock: unspecified sort order).
"""
from collections.abc import Mapping

import torch
from torch import nn

try:
    from mmyolo.registry import TASK_UTILS
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("rtmdet.integrations.mmyolo needs mmyolo 0.6 (with mmdet 3.x, mmengine "
                      "and mmcv): pip install mmyolo==0.6.0") from e

from rtmdet import ops

__all__ = ["FusedBatchDynamicSoftLabelAssigner"]

# Overlap calculators computing SPEC section 1's IoU (mmdet's BboxOverlaps2D, mode "iou").
_IOU_CALCULATORS = ("BboxOverlaps2D", "mmdet.BboxOverlaps2D")


def _check_iou_calculator(cfg):
    """Accept only the plain 2-D IoU (a config or a built calculator): what dsl_assign computes."""
    if isinstance(cfg, Mapping):
        extra = dict(cfg)
        name = extra.pop("type", None)
        name = getattr(name, "__name__", name)
    else:
        name, extra = type(cfg).__name__, vars(cfg)
    if name not in _IOU_CALCULATORS or extra.get("scale", 1.0) != 1.0 or extra.get("dtype"):
        raise ValueError("FusedBatchDynamicSoftLabelAssigner: iou_calculator must be "
                         "dict(type='mmdet.BboxOverlaps2D') (plain IoU of xyxy boxes, no scale "
                         f"or dtype cast), got {cfg!r}")


@TASK_UTILS.register_module()
class FusedBatchDynamicSoftLabelAssigner(nn.Module):
    """`BatchDynamicSoftLabelAssigner` on `rtmdet.ops.dsl_assign` (one fused call per batch).

    Same constructor; `batch_iou` is accepted and has no effect (stock uses it to choose
    between a batched and a per-image IoU, which give the same numbers). `backend` is passed
    to `dsl_assign` ("auto": Triton on CUDA, C++ on CPU).
    """

    def __init__(self, num_classes, soft_center_radius: float = 3.0, topk: int = 13,
                 iou_weight: float = 3.0, iou_calculator=dict(type="mmdet.BboxOverlaps2D"),
                 batch_iou: bool = True, *, backend: str = "auto") -> None:
        super().__init__()
        _check_iou_calculator(iou_calculator)
        self.num_classes = int(num_classes)
        self.soft_center_radius = float(soft_center_radius)
        self.topk = int(topk)
        self.iou_weight = float(iou_weight)
        self.batch_iou = batch_iou
        self.backend = backend

    @torch.no_grad()
    def forward(self, pred_bboxes, pred_scores, priors, gt_labels, gt_bboxes, pad_bbox_flag):
        """pred_bboxes (B, N, 4) decoded xyxy, pred_scores (B, N, C) logits, priors (N, 4)
        (x, y, stride_w, stride_h), gt_labels (B, M, 1), gt_bboxes (B, M, 4) zero-padded,
        pad_bbox_flag (B, M, 1) with 1 = real gt.

        Returns mmyolo's dict: assigned_labels (B, N) int64 with C = background,
        assigned_labels_weights (B, N) ones, assigned_bboxes (B, N, 4) (0 for background),
        assign_metrics (B, N) IoU of the matched pair (0 for background); float tensors in
        gt_bboxes' dtype.
        """
        B, N = pred_scores.shape[:2]
        for name, t in (("gt_labels", gt_labels), ("pad_bbox_flag", pad_bbox_flag)):
            if t.dim() != 3 or tuple(t.shape) != (B, gt_bboxes.shape[1], 1):
                raise ValueError(f"FusedBatchDynamicSoftLabelAssigner: {name} must be (B, M, 1) "
                                 f"with B={B} and M={gt_bboxes.shape[1]} from gt_bboxes "
                                 f"{tuple(gt_bboxes.shape)}, got {tuple(t.shape)}")
        labels = gt_bboxes.new_full((B, N), self.num_classes, dtype=torch.long)
        weights = gt_bboxes.new_ones((B, N))
        boxes = gt_bboxes.new_zeros((B, N, 4))
        metrics = gt_bboxes.new_zeros((B, N))
        if gt_bboxes.shape[1] == 0 or N == 0:
            return dict(assigned_labels=labels, assigned_labels_weights=weights,
                        assigned_bboxes=boxes, assign_metrics=metrics)

        gt_mask = pad_bbox_flag[..., 0] > 0
        # Padded slots may hold any label; dsl_assign checks the real ones' range.
        gt_cls = torch.where(gt_mask, gt_labels[..., 0].long(), 0)
        a = ops.dsl_assign(priors, pred_bboxes, pred_scores, gt_bboxes, gt_cls, gt_mask,
                           topk=self.topk, soft_center_radius=self.soft_center_radius,
                           iou_weight=self.iou_weight, semantics="mmyolo", backend=self.backend)
        fg = a.gt_index >= 0
        matched = torch.gather(gt_bboxes, 1, a.gt_index.clamp(min=0)[..., None].expand(B, N, 4))
        return dict(assigned_labels=torch.where(fg, a.labels, labels),
                    assigned_labels_weights=weights,
                    assigned_bboxes=torch.where(fg[..., None], matched, boxes),
                    assign_metrics=a.ious.to(metrics.dtype))
