"""ultralytics 8.x drop-ins: RTMDet's Dynamic Soft Label Assigner for YOLO detection training.

- `DSLAssigner`: `TaskAlignedAssigner`'s call and return tuple, computed by
  `rtmdet.ops.dsl_assign` in one batched call (no per-image retry loop, whatever the number of
  gts per image).
- `DSLADetectionLoss`: `v8DetectionLoss` with `DSLAssigner`.
- `DSLADetectionTrainer`: `DetectionTrainer` whose model builds that loss::

      YOLO("yolov8s.yaml").train(data="coco8.yaml", trainer=DSLADetectionTrainer)

  The override is class-level (`DSLADetectionModel.init_criterion`), so EMA's deep copy and the
  DDP workers (which re-import the trainer class by module and name) keep it. Checkpoints it
  saves pickle a `DSLADetectionModel`: loading them needs rtmdet installed.

Target scores: stock puts the task-alignment metric, rescaled per gt, at the assigned class.
Ours puts the IoU of the matched pair there, RTMDet's soft label (SPEC section 3).
`v8DetectionLoss` then trains BCE against those soft labels, weights each positive's box and
DFL loss by its score and divides both by the score sum, i.e. RTMDet's normalisation by the
sum of IoUs.

Anchors: ultralytics' anchors sit at cell centres ((j + 0.5) * stride), RTMDet's priors on the
corners; the points are used as given (validity, centre cost and decoding all take them as
they are).
"""
import torch
from torch import nn

try:
    from ultralytics.models.yolo.detect import DetectionTrainer
    from ultralytics.nn.tasks import DetectionModel
    from ultralytics.utils import RANK
    from ultralytics.utils.loss import v8DetectionLoss
    from ultralytics.utils.tal import make_anchors
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("rtmdet.integrations.ultralytics needs ultralytics 8.x (and torchvision): "
                      "pip install 'ultralytics>=8.3,<9'") from e

from rtmdet import ops
from rtmdet.ops._checks import value_checks_active

__all__ = ["DSLAssigner", "DSLADetectionLoss", "DSLADetectionModel", "DSLADetectionTrainer"]


def _safe_logit(p):
    """sigmoid probabilities -> float32 logits; 0 and 1 (saturated sigmoids) stay finite."""
    f = torch.finfo(torch.float32)
    p = p.float().clamp(f.tiny, 1.0 - f.eps / 2)  # the largest float32 below 1
    return torch.log(p) - torch.log1p(-p)


class DSLAssigner(nn.Module):
    """`TaskAlignedAssigner` replacement running RTMDet's DSLA (SPEC section 2).

    topk, soft_center_radius, iou_weight, semantics ("mmdet" | "mmyolo") and backend are
    `dsl_assign`'s. `stride`: the model's strides, used to recover each anchor's stride from its
    position when the caller does not pass `stride_tensor` (cell centres (j + 0.5) * s identify
    s when the strides have distinct powers of two, as 8/16/32/64 do).
    """

    def __init__(self, topk: int = 13, num_classes: int = 80, soft_center_radius: float = 3.0,
                 iou_weight: float = 3.0, stride=None, *, semantics: str = "mmdet",
                 backend: str = "auto"):
        super().__init__()
        self.topk = int(topk)
        self.num_classes = int(num_classes)
        self.soft_center_radius = float(soft_center_radius)
        self.iou_weight = float(iou_weight)
        self.stride = [float(s) for s in (stride if stride is not None else [8, 16, 32])]
        self.semantics = semantics
        self.backend = backend

    @torch.no_grad()
    def forward(self, pd_scores, pd_bboxes, anc_points, gt_labels, gt_bboxes, mask_gt, *,
                stride_tensor=None, pd_logits=None):
        """pd_scores (B, A, C) sigmoid scores, pd_bboxes (B, A, 4) xyxy pixels, anc_points (A, 2)
        pixels, gt_labels (B, M, 1), gt_bboxes (B, M, 4) xyxy pixels, mask_gt (B, M, 1).
        Optional: stride_tensor (A, 1) per-anchor strides, pd_logits (B, A, C) raw logits
        (exact, where the scores' sigmoid saturated).

        Returns (target_labels (B, A) int64, target_bboxes (B, A, 4), target_scores (B, A, C),
        fg_mask (B, A) bool, target_gt_idx (B, A) int64), stock's conventions: background
        anchors have fg_mask False, gt index 0, gt 0's label and box and zero scores.
        """
        B, A, C = pd_scores.shape
        M = gt_bboxes.shape[1]
        if M == 0:  # stock's early return, dtypes included
            one = pd_scores[..., 0]
            return (torch.full_like(one, self.num_classes), torch.zeros_like(pd_bboxes),
                    torch.zeros_like(pd_scores), torch.zeros_like(one, dtype=torch.bool),
                    torch.zeros_like(one))
        for name, t in (("gt_labels", gt_labels), ("mask_gt", mask_gt)):
            if t.dim() != 3 or tuple(t.shape) != (B, M, 1):
                raise ValueError(f"DSLAssigner: {name} must be (B, M, 1) = ({B}, {M}, 1) from "
                                 f"pd_scores and gt_bboxes, got {tuple(t.shape)}")
        if anc_points.dim() != 2 or tuple(anc_points.shape) != (A, 2):
            raise ValueError(f"DSLAssigner: anc_points must be (A, 2) = ({A}, 2) pixel points, "
                             f"got {tuple(anc_points.shape)}")
        strides = (self._infer_strides(anc_points) if stride_tensor is None
                   else stride_tensor.reshape(-1).to(anc_points))
        if strides.shape[0] != A:
            raise ValueError(f"DSLAssigner: stride_tensor must hold one stride per anchor ({A}), "
                             f"got {tuple(stride_tensor.shape)}")
        priors = torch.cat([anc_points, strides[:, None], strides[:, None]], 1).float()
        logits = _safe_logit(pd_scores) if pd_logits is None else pd_logits
        gt_mask = mask_gt[..., 0] > 0
        labels = gt_labels[..., 0].long()
        a = ops.dsl_assign(priors, pd_bboxes, logits, gt_bboxes, torch.where(gt_mask, labels, 0),
                           gt_mask, topk=self.topk, soft_center_radius=self.soft_center_radius,
                           iou_weight=self.iou_weight, semantics=self.semantics,
                           backend=self.backend)

        fg_mask = a.gt_index >= 0
        target_gt_idx = a.gt_index.clamp(min=0)
        target_labels = torch.gather(labels, 1, target_gt_idx).clamp_(min=0)
        target_bboxes = torch.gather(gt_bboxes, 1, target_gt_idx[..., None].expand(B, A, 4))
        dtype = torch.promote_types(pd_scores.dtype, pd_bboxes.dtype)
        target_scores = torch.zeros((B, A, C), dtype=dtype, device=pd_scores.device)
        target_scores.scatter_(2, target_labels[..., None], a.ious[..., None].to(dtype))  # 0: bg
        return target_labels, target_bboxes, target_scores, fg_mask, target_gt_idx

    def _infer_strides(self, anc_points):
        """Per-anchor stride s such that 2x/s and 2y/s are odd integers (a cell centre)."""
        s = torch.tensor(self.stride, dtype=torch.float32, device=anc_points.device)
        q = anc_points.float()[:, None, :] * 2 / s[None, :, None]              # (A, L, 2)
        r = q.round()
        hit = (((q - r).abs() < 1e-3) & (r.remainder(2) == 1)).all(-1)          # (A, L)
        if value_checks_active(anc_points) and not (hit.sum(-1) == 1).all():
            raise ValueError(f"DSLAssigner: cannot tell every anchor's stride from its position "
                             f"(cell centres of strides {self.stride} expected); pass "
                             "stride_tensor=(A, 1) per-anchor strides")
        return (hit.float() * s).amax(-1)


class DSLADetectionLoss(v8DetectionLoss):
    """`v8DetectionLoss` assigning with `DSLAssigner`, which receives the exact per-anchor
    strides and raw logits. Keyword arguments go to `DSLAssigner` (topk defaults to RTMDet's 13)."""

    def __init__(self, model, topk: int = 13, **assigner_kwargs):
        super().__init__(model)
        self.assigner = DSLAssigner(topk=topk, num_classes=self.nc, stride=self.stride.tolist(),
                                    **assigner_kwargs)

    def get_assigned_targets_and_loss(self, preds, batch, **assign_kwargs):
        # The stock method passes extra keywords through to the assigner's call.
        _, stride_tensor = make_anchors(preds["feats"], self.stride, 0.5)
        logits = preds["scores"].detach().permute(0, 2, 1)
        return super().get_assigned_targets_and_loss(preds, batch, stride_tensor=stride_tensor,
                                                     pd_logits=logits, **assign_kwargs)


class DSLADetectionModel(DetectionModel):
    """`DetectionModel` whose training loss is `DSLADetectionLoss`."""

    def init_criterion(self):
        if getattr(self.model[-1], "one2one_cv2", None) is not None:
            raise ValueError("DSLADetectionModel: end-to-end (one-to-one) heads such as YOLOv10's "
                             "or YOLO26's train with E2ELoss; DSLA replaces v8DetectionLoss's "
                             "assigner only (use a yolov8/yolo11 model yaml)")
        return DSLADetectionLoss(self)


class DSLADetectionTrainer(DetectionTrainer):
    """`DetectionTrainer` training a `DSLADetectionModel`; pass it as `trainer=`."""

    def get_model(self, cfg=None, weights=None, verbose=True):
        model = DSLADetectionModel(cfg, nc=self.data["nc"], ch=self.data["channels"],
                                   verbose=verbose and RANK == -1)
        model = self.set_model_names_for_load(model)
        if weights:
            model.load(weights)
        return model
