"""mmdetection 3.x drop-in: rtmdet's batched assigners and fused losses behind mmdet's classes.

`import rtmdet.integrations.mmdet` (or a config's `custom_imports`) registers, because mmdet
builds everything from its registries:
  TASK_UTILS: FusedDynamicSoftLabelAssigner, FusedHungarianAssigner
  MODELS:     FusedRTMDetHead, FusedRTMDetSepBNHead, FusedRTMDetInsSepBNHead,
              FusedDETRHead, FusedDeformableDETRHead, FusedDINOHead
Each takes the stock class's constructor and returns stock's structures (AssignResult, the
get_targets tuple, the loss dict). This file only translates: InstanceData lists become padded
(B, G) tensors for `rtmdet.ops.dsl_assign` / `detr_match_cost` / `hungarian_match`, and the
(B, N) results become mmdet's targets again. No assignment or loss arithmetic lives here.
"""
import copy
import inspect
import warnings
from collections.abc import Sequence

import torch

try:
    from mmdet.models.dense_heads import (DETRHead, DeformableDETRHead, DINOHead, RTMDetHead,
                                          RTMDetInsSepBNHead, RTMDetSepBNHead)
    from mmdet.models.losses import GIoULoss, QualityFocalLoss
    from mmdet.models.task_modules.assigners import (AssignResult, DynamicSoftLabelAssigner,
                                                     HungarianAssigner)
    from mmdet.models.task_modules.assigners.iou2d_calculator import BboxOverlaps2D
    from mmdet.models.task_modules.assigners.match_cost import (BBoxL1Cost, ClassificationCost,
                                                                FocalLossCost, IoUCost)
    from mmdet.models.task_modules.prior_generators import anchor_inside_flags
    from mmdet.registry import MODELS, TASK_UTILS
    from mmdet.structures.bbox import BaseBoxes, bbox_cxcywh_to_xyxy, bbox_xyxy_to_cxcywh
    from mmdet.utils import reduce_mean
    from mmengine.structures import InstanceData
except ImportError as exc:  # pragma: no cover - depends on the environment
    hint = (" mmdet.models imports mmcv.ops, which needs mmcv's compiled ops: install the full "
            "mmcv (mmcv-lite has none)." if "mmcv._ext" in str(exc) else "")
    raise ImportError("rtmdet.integrations.mmdet needs mmdetection 3.x: pip install "
                      f"mmdet==3.3.0 mmengine mmcv ({exc}).{hint}") from exc

from rtmdet import ops
from rtmdet.ops._checks import value_checks_active

INF = 1e8  # stock's max_overlaps fill once matching ran
_FLOAT_EPS = torch.finfo(torch.float32).eps  # mmdet's weight_reduce_loss: sum / (avg_factor + eps)


# ----------------------------------------------------------------------------------------
# mmdet structures <-> padded tensors
# ----------------------------------------------------------------------------------------

def _box_tensor(boxes, who):
    if isinstance(boxes, BaseBoxes):
        # Not converted silently: for box types stock's DSLA counts a prior on the box edge as
        # inside (HorizontalBoxes.find_inside_points), the tensor path and rtmdet.ops do not.
        raise TypeError(f"{who}: gt_instances.bboxes is a {type(boxes).__name__}; the adapters "
                        "take (G, 4) xyxy tensors, what mmdet's DetDataPreprocessor("
                        "boxtype2tensor=True) (the default) gives")
    return boxes


def pad_instances(batch_gt_instances, device, who="pad_instances"):
    """List of B InstanceData (bboxes (G_i, 4) xyxy, labels (G_i,)) -> (B, G, 4) boxes,
    (B, G) int64 labels, (B, G) bool mask, G = max(G_i, 1). No host sync: counts are host ints."""
    counts = [len(g) for g in batch_gt_instances]
    B, G = len(counts), max(counts + [1])
    boxes = [_box_tensor(g.bboxes, who) for g in batch_gt_instances]
    dtype = boxes[0].dtype if boxes else torch.float32
    out_boxes = torch.zeros((B * G, 4), dtype=dtype, device=device)
    out_labels = torch.zeros((B * G,), dtype=torch.long, device=device)
    mask = torch.zeros((B * G,), dtype=torch.bool, device=device)
    if sum(counts):
        slots = torch.cat([torch.arange(n) + b * G for b, n in enumerate(counts)]).to(device)
        out_boxes[slots] = torch.cat(boxes).to(device, dtype)
        out_labels[slots] = torch.cat([g.labels for g in batch_gt_instances]).to(device).long()
        mask[slots] = True
    return out_boxes.view(B, G, 4), out_labels.view(B, G), mask.view(B, G)


def to_assign_result(gt_index, labels, ious, num_gts):
    """One image's (N,) gt index (-1 = bg) / labels / IoU -> mmdet's DSLA AssignResult.

    gt_inds 1-based (0 = bg); max_overlaps the matched IoU at positives, elsewhere -1e8 once
    matching ran and 0 on stock's early returns (no gt, no prior, no valid prior). Every gt
    selects at least one valid prior, so "matching ran" == "some prior is positive"."""
    fg = gt_index >= 0
    fill = torch.where(fg.any(), -INF, 0.0).to(torch.float32)  # no host sync
    max_overlaps = torch.where(fg, ious.float(), fill)
    return AssignResult(num_gts, gt_index + 1, max_overlaps, labels=labels)


def _dsl_params(assigner, who):
    """(topk, soft_center_radius, iou_weight) of a DynamicSoftLabelAssigner, checked."""
    if not isinstance(assigner, DynamicSoftLabelAssigner):
        raise TypeError(f"{who}: train_cfg.assigner must be a DynamicSoftLabelAssigner (stock or "
                        f"FusedDynamicSoftLabelAssigner), got {type(assigner).__name__}")
    calc = assigner.iou_calculator
    if type(calc) is not BboxOverlaps2D or calc.scale != 1.0 or calc.dtype is not None:
        raise ValueError(f"{who}: iou_calculator must be BboxOverlaps2D() (fp32, scale 1): "
                         f"rtmdet.ops.dsl_assign computes the IoU itself; got {calc!r}")
    return dict(topk=assigner.topk, soft_center_radius=assigner.soft_center_radius,
                iou_weight=assigner.iou_weight)


@TASK_UTILS.register_module()
class FusedDynamicSoftLabelAssigner(DynamicSoftLabelAssigner):
    """mmdet's DynamicSoftLabelAssigner (same constructor) computed by `rtmdet.ops.dsl_assign`.

    assign(pred_instances (priors (N, 4) x, y, stride_w, stride_h; bboxes (N, 4) decoded xyxy;
    scores (N, C) logits), gt_instances (bboxes (G, 4), labels (G,))) -> stock's AssignResult.
    Gts with `masks` (RTMDet-Ins: stock measures the centre cost from the mask's centre of
    mass) raise NotImplementedError: dsl_assign takes the box centre.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._params = _dsl_params(self, type(self).__name__)

    def assign(self, pred_instances, gt_instances, gt_instances_ignore=None, **kwargs):
        if "masks" in gt_instances:
            raise NotImplementedError(
                "FusedDynamicSoftLabelAssigner: gt_instances has masks; stock then uses the mask "
                "centre of mass as the gt centre, which rtmdet.ops.dsl_assign does not implement "
                "(it uses the box centre). Use DynamicSoftLabelAssigner for mask gts, or "
                "FusedRTMDetInsSepBNHead, which calls it for them.")
        gt_bboxes = _box_tensor(gt_instances.bboxes, type(self).__name__)
        bboxes, N, G = pred_instances.bboxes, len(pred_instances.bboxes), len(gt_bboxes)
        if G == 0 or N == 0:  # stock's early return, in stock's dtypes
            return AssignResult(G, bboxes.new_zeros((N,), dtype=torch.long), bboxes.new_zeros((N,)),
                                labels=bboxes.new_full((N,), -1, dtype=torch.long))
        a = ops.dsl_assign(pred_instances.priors, bboxes, pred_instances.scores, gt_bboxes,
                           gt_instances.labels, semantics="mmdet", **self._params)
        return to_assign_result(a.gt_index, a.labels, a.ious, G)


# ----------------------------------------------------------------------------------------
# RTMDet heads
# ----------------------------------------------------------------------------------------

class _LazySamplingResults(Sequence):
    """Per-image SamplingResults, built (with stock's PseudoSampler) only when read: they cost
    a host sync per image, and only RTMDet-Ins's mask loss reads them."""

    def __init__(self, n, build):
        self._n, self._build, self._cache = n, build, {}

    def __len__(self):
        return self._n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self._n))]
        if not -self._n <= i < self._n:
            raise IndexError(f"sampling result {i} of {self._n} images")
        i %= self._n
        if i not in self._cache:
            self._cache[i] = self._build(i)
        return self._cache[i]


def _supported_losses(head):
    """None if the fused path implements head.loss_cls / loss_bbox, else the reason."""
    c, b = head.loss_cls, head.loss_bbox
    if type(c) is not QualityFocalLoss or not c.use_sigmoid or c.activated or c.reduction != "mean":
        return (f"loss_cls is {type(c).__name__}(use_sigmoid={getattr(c, 'use_sigmoid', None)}, "
                f"activated={getattr(c, 'activated', None)}, reduction={c.reduction!r})")
    if type(b) is not GIoULoss or b.reduction != "mean":
        return f"loss_bbox is {type(b).__name__}(reduction={b.reduction!r})"
    return None


class FusedRTMDetMixin:
    """RTMDetHead's get_targets and loss_by_feat over the whole batch.

    get_targets: one `ops.dsl_assign` call for all images (stock: one assigner call per image),
    same return tuple (per-level labels, label_weights, bbox_targets, assign_metrics; anchors;
    per-image SamplingResults built lazily). loss_by_feat: stock's dict (per-level lists) with
    QFL and GIoU from `ops.quality_focal_loss` / `ops.giou_loss` and no host sync. Loss types
    other than QualityFocalLoss(use_sigmoid=True) / GIoULoss fall back to stock's loss_by_feat
    (with a warning; the assignment stays batched). The assigner's hyper-parameters come from
    train_cfg.assigner (a DynamicSoftLabelAssigner).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        name = type(self).__name__
        self._dsl_params = _dsl_params(self.assigner, name) if self.train_cfg else None
        self._unsupported = _supported_losses(self)
        if self._unsupported:
            warnings.warn(f"{name}: {self._unsupported}, which the fused path does not implement "
                          "(QualityFocalLoss(use_sigmoid=True, activated=False) and GIoULoss); "
                          "using stock loss_by_feat with the batched assignment")

    # -- assignment -----------------------------------------------------------------------
    def _inside_flags(self, featmap_sizes, priors, metas):
        """Stock's per-image anchor_inside_flags as (B, N) bool, or None when all are inside
        (every image padded to the batch shape and allowed_border < 0; decided on the host)."""
        border = self.train_cfg["allowed_border"]
        strides = self.prior_generator.strides
        full = all(-(-m["pad_shape"][0] // s[1]) >= h and -(-m["pad_shape"][1] // s[0]) >= w
                   for m in metas for (h, w), s in zip(featmap_sizes, strides))
        if full and border < 0:
            return None
        flags = []
        for m in metas:
            valid = torch.cat(self.prior_generator.valid_flags(featmap_sizes, m["pad_shape"],
                                                               priors.device))
            flags.append(anchor_inside_flags(priors, valid, m["img_shape"][:2], border))
        return torch.stack(flags)

    def _assign(self, logits, bboxes, priors, inside, gts):
        """(B, N, C) logits, (B, N, 4) xyxy -> DSLAssignment of (B, N) and the padded gts."""
        boxes, labels, mask = pad_instances(gts, logits.device, type(self).__name__)
        if any("masks" in g for g in gts):
            # RTMDet-Ins: stock's centre cost uses the mask centre of mass, which dsl_assign
            # does not implement (see the report): stock's assigner per image, then the same
            # batched targets.
            a = self._assign_per_image(logits, bboxes, priors, inside, gts)
        else:
            a = ops.dsl_assign(priors, bboxes.detach(), logits.detach(), boxes, labels, mask,
                               semantics="mmdet", **self._dsl_params)
            if inside is not None and value_checks_active(boxes):
                pts = priors[None, :, None, :2]
                in_gt = ((pts > boxes[:, None, :, :2]) & (pts < boxes[:, None, :, 2:])).all(-1)
                if ((in_gt & mask[:, None]).any(-1) & ~inside).any():
                    raise ValueError(f"{type(self).__name__}: a gt box reaches priors outside "
                                     "its image's pad_shape; stock leaves those priors out of the "
                                     "assignment, the batched assigner cannot: clip gts to the "
                                     "image")
        return a, boxes, labels

    def _assign_per_image(self, logits, bboxes, priors, inside, gts):
        gt_index, ious = [], []
        for b, g in enumerate(gts):
            keep = slice(None) if inside is None else inside[b]
            pred = InstanceData(scores=logits[b][keep].detach(), bboxes=bboxes[b][keep].detach(),
                                priors=priors[keep])
            r = DynamicSoftLabelAssigner.assign(self.assigner, pred, g)
            idx = torch.full_like(logits[b, :, 0], -1, dtype=torch.long)
            idx[keep] = r.gt_inds - 1
            iou = torch.zeros_like(logits[b, :, 0], dtype=torch.float32)
            iou[keep] = r.max_overlaps.float()
            gt_index.append(idx)
            ious.append(iou)
        gt_index, ious = torch.stack(gt_index), torch.stack(ious)
        return ops.DSLAssignment(gt_index, None, torch.where(gt_index >= 0, ious, 0.0))

    def _batch_targets(self, logits, bboxes, priors, inside, gts):
        """Flat (B, N) targets in stock's meaning, plus lazy per-image SamplingResults."""
        if self._dsl_params is None:
            raise RuntimeError(f"{type(self).__name__}: the head was built without train_cfg, "
                               "so it has no assigner to compute training targets")
        B, N, C = logits.shape
        a, boxes, gt_labels = self._assign(logits, bboxes, priors, inside, gts)
        fg = a.gt_index >= 0
        index = a.gt_index.clamp(min=0)
        labels = torch.where(fg, gt_labels.gather(1, index), C)
        pos_weight = self.train_cfg["pos_weight"]
        label_weights = torch.where(fg, pos_weight if pos_weight > 0 else 1.0, 1.0)
        if inside is not None:
            label_weights = label_weights * inside
        targets = torch.gather(boxes, 1, index[..., None].expand(B, N, 4))
        bbox_targets = torch.where(fg[..., None], targets, 0).to(priors.dtype)
        metrics = torch.where(fg, a.ious.float(), 0.0)

        def sampling_result(b):
            keep = slice(None) if inside is None else inside[b]
            r = to_assign_result(a.gt_index[b][keep], torch.where(fg, labels, -1)[b][keep],
                                 metrics[b][keep], len(gts[b]))
            return self.sampler.sample(r, InstanceData(priors=priors[keep]), gts[b])

        return (labels, label_weights.float(), bbox_targets, metrics,
                _LazySamplingResults(B, sampling_result))

    def get_targets(self, cls_scores, bbox_preds, anchor_list, valid_flag_list,
                    batch_gt_instances, batch_img_metas, batch_gt_instances_ignore=None,
                    unmap_outputs=True):
        """Stock's signature and return tuple; (B, N, C) logits and (B, N, 4) decoded boxes."""
        if not unmap_outputs:
            raise ValueError(f"{type(self).__name__}.get_targets: only unmap_outputs=True")
        sizes = [a.shape[0] for a in anchor_list[0]]
        priors = torch.cat(anchor_list[0])
        valid = torch.stack([torch.cat(v) for v in valid_flag_list])
        inside = torch.stack([anchor_inside_flags(priors, v, m["img_shape"][:2],
                                                  self.train_cfg["allowed_border"])
                              for v, m in zip(valid, batch_img_metas)])
        *flat, sampling = self._batch_targets(cls_scores, bbox_preds, priors, inside,
                                              batch_gt_instances)
        B = len(batch_img_metas)
        levels = [list(t.split(sizes, 1)) for t in [priors.expand(B, -1, -1)] + flat]
        return (*levels, sampling)

    # -- losses ---------------------------------------------------------------------------
    def _fused_losses(self, cls_scores, bbox_preds, gts, metas):
        """Stock's loss_cls / loss_bbox per-level lists, and the per-image SamplingResults."""
        B, device = len(metas), cls_scores[0].device
        featmap_sizes = [c.shape[-2:] for c in cls_scores]
        sizes = [h * w for h, w in featmap_sizes]
        priors = torch.cat(self.prior_generator.grid_priors(featmap_sizes, device=device,
                                                            with_stride=True))
        inside = self._inside_flags(featmap_sizes, priors, metas)
        C = self.cls_out_channels
        logits = torch.cat([c.permute(0, 2, 3, 1).reshape(B, -1, C) for c in cls_scores], 1)
        dists = torch.cat([r.permute(0, 2, 3, 1).reshape(B, -1, 4) for r in bbox_preds], 1)
        bboxes = ops.distance2bbox(priors[None, :, :2], dists)
        labels, label_weights, bbox_targets, metrics, sampling = self._batch_targets(
            logits, bboxes, priors, inside, gts)
        qfl = ops.quality_focal_loss(logits.reshape(-1, C), labels.reshape(-1),
                                     metrics.reshape(-1), weight=label_weights.reshape(-1),
                                     beta=self.loss_cls.beta, reduction="none")
        # Background rows regress onto their own (detached) box with weight 0: no data-
        # dependent selection of the positives, same value and gradient as stock's pos_inds.
        target = torch.where((labels < C)[..., None], bbox_targets, bboxes.detach())
        giou = ops.giou_loss(bboxes.reshape(-1, 4), target.reshape(-1, 4),
                             weight=metrics.reshape(-1), reduction="none", eps=self.loss_bbox.eps)
        # Stock: per level loss_weight * sum / (1.0 + eps) (avg_factor=1.0), then / the batch's
        # clamped mean sum of metrics (cls and bbox factors are the same sum: bg metrics are 0).
        avg = reduce_mean(metrics.sum()).clamp(min=1)

        def per_level(loss, weight):
            return [x.sum() * (weight / (1.0 + _FLOAT_EPS)) / avg
                    for x in loss.view(B, -1).split(sizes, 1)]

        return dict(loss_cls=per_level(qfl, self.loss_cls.loss_weight),
                    loss_bbox=per_level(giou, self.loss_bbox.loss_weight)), sampling


class _FusedRTMDetLossMixin(FusedRTMDetMixin):
    def loss_by_feat(self, cls_scores, bbox_preds, batch_gt_instances, batch_img_metas,
                     batch_gt_instances_ignore=None):
        if self._unsupported:
            return super().loss_by_feat(cls_scores, bbox_preds, batch_gt_instances,
                                        batch_img_metas, batch_gt_instances_ignore)
        return self._fused_losses(cls_scores, bbox_preds, batch_gt_instances, batch_img_metas)[0]


@MODELS.register_module()
class FusedRTMDetHead(_FusedRTMDetLossMixin, RTMDetHead):
    """mmdet's RTMDetHead (same constructor and layers) with FusedRTMDetMixin's losses."""


@MODELS.register_module()
class FusedRTMDetSepBNHead(_FusedRTMDetLossMixin, RTMDetSepBNHead):
    """mmdet's RTMDetSepBNHead (same constructor and layers) with FusedRTMDetMixin's losses."""


@MODELS.register_module()
class FusedRTMDetInsSepBNHead(FusedRTMDetMixin, RTMDetInsSepBNHead):
    """mmdet's RTMDetInsSepBNHead with fused QFL/GIoU; stock's mask loss on our sampling results.

    Mask gts make stock's assigner use the mask centre of mass, which rtmdet.ops.dsl_assign does
    not implement: this head calls stock's DynamicSoftLabelAssigner per image for them (exact;
    the targets and losses are still batched)."""

    def loss_by_feat(self, cls_scores, bbox_preds, kernel_preds, mask_feat, batch_gt_instances,
                     batch_img_metas, batch_gt_instances_ignore=None):
        if self._unsupported:
            return super().loss_by_feat(cls_scores, bbox_preds, kernel_preds, mask_feat,
                                        batch_gt_instances, batch_img_metas,
                                        batch_gt_instances_ignore)
        device, B = cls_scores[0].device, len(batch_img_metas)
        for g in batch_gt_instances:  # as stock: masks become (G_i, H, W) bool tensors
            if hasattr(g.masks, "to_tensor"):
                g.masks = g.masks.to_tensor(dtype=torch.bool, device=device)
        losses, sampling = self._fused_losses(cls_scores, bbox_preds, batch_gt_instances,
                                              batch_img_metas)
        kernels = torch.cat([k.permute(0, 2, 3, 1).reshape(B, -1, self.num_gen_params)
                             for k in kernel_preds], 1)
        losses["loss_mask"] = self.loss_mask_by_feat(mask_feat, kernels, sampling,
                                                     batch_gt_instances)
        return losses


# ----------------------------------------------------------------------------------------
# DETR family: Hungarian matching
# ----------------------------------------------------------------------------------------

def _match_cost_params(match_costs, who):
    """mmdet's built match-cost objects -> rtmdet.ops.detr_match_cost keyword arguments."""
    params = dict(cls_cost="softmax", cls_weight=0.0, l1_weight=0.0, giou_weight=0.0)
    kinds = [type(c).__name__ for c in match_costs]
    if len(set(kinds)) < len(kinds) or {"ClassificationCost", "FocalLossCost"} <= set(kinds):
        raise ValueError(f"{who}: match_costs {kinds} must list each cost once and one "
                         "classification cost (ClassificationCost or FocalLossCost)")
    for c in match_costs:
        kind = type(c)
        if kind is ClassificationCost:
            params.update(cls_cost="softmax", cls_weight=float(c.weight))
        elif kind is FocalLossCost and not c.binary_input:
            params.update(cls_cost="focal", cls_weight=float(c.weight), focal_alpha=float(c.alpha),
                          focal_gamma=float(c.gamma), eps=float(c.eps))
        elif kind is BBoxL1Cost and c.box_format == "xywh":
            params.update(l1_weight=float(c.weight))
        elif kind is IoUCost and c.iou_mode == "giou":
            params.update(giou_weight=float(c.weight))
        else:
            detail = {BBoxL1Cost: f"box_format={getattr(c, 'box_format', None)!r}",
                      IoUCost: f"iou_mode={getattr(c, 'iou_mode', None)!r}",
                      FocalLossCost: f"binary_input={getattr(c, 'binary_input', None)}"}
            raise ValueError(
                f"{who}: match cost {kind.__name__}({detail.get(kind, '')}) is not implemented "
                "by rtmdet.ops.detr_match_cost, which sums one of ClassificationCost or "
                "FocalLossCost(binary_input=False), BBoxL1Cost(box_format='xywh') and "
                "IoUCost(iou_mode='giou'); use mmdet's HungarianAssigner for it")
    return params


def _image_sizes(metas, device):
    return torch.tensor([list(m["img_shape"][:2]) for m in metas], dtype=torch.float32,
                        device=device)  # (B, 2) (h, w)


@TASK_UTILS.register_module()
class FusedHungarianAssigner(HungarianAssigner):
    """mmdet's HungarianAssigner (same `match_costs`) computed by `rtmdet.ops.detr_match_cost`
    and `rtmdet.ops.hungarian_match` (an optimal matching; on exact cost ties it may pick
    another optimal one than scipy). assign(pred_instances (scores (Q, K) logits, bboxes (Q, 4)
    xyxy pixels), gt_instances, img_meta (img_shape)) -> stock's AssignResult: gt_inds 0 / g+1,
    labels -1 / gt label, max_overlaps None; G = 0: all 0; Q = 0: empty."""

    def __init__(self, match_costs):
        super().__init__(match_costs)
        self._params = _match_cost_params(self.match_costs, type(self).__name__)

    def assign(self, pred_instances, gt_instances, img_meta=None, **kwargs):
        gt_labels = gt_instances.labels
        G, Q, device = len(gt_instances), len(pred_instances), gt_labels.device
        gt_inds = torch.full((Q,), -1 if G else 0, dtype=torch.long, device=device)
        labels = torch.full((Q,), -1, dtype=torch.long, device=device)
        if G == 0 or Q == 0:
            return AssignResult(num_gts=G, gt_inds=gt_inds, max_overlaps=None, labels=labels)
        cost = ops.detr_match_cost(pred_instances.scores, pred_instances.bboxes,
                                   _box_tensor(gt_instances.bboxes, type(self).__name__),
                                   gt_labels, _image_sizes([img_meta], device)[0], **self._params)
        match = ops.hungarian_match(cost)
        fg = match >= 0
        gt_inds = torch.where(fg, match + 1, 0)
        labels = torch.where(fg, gt_labels.long()[match.clamp(min=0)], -1)
        return AssignResult(num_gts=G, gt_inds=gt_inds, max_overlaps=None, labels=labels)


class FusedDETRMixin:
    """DETRHead's get_targets with every image of a decoder layer matched in one batched call;
    loss_by_feat first solves all the step's matching problems (all decoder layers, and the
    encoder proposals of DeformableDETRHead/DINOHead; one call per query count) and then runs
    stock's loss_by_feat, whose get_targets reads the solved matchings. Costs: the parameters
    of train_cfg.assigner's match_costs. DINO's denoising queries are not matched (stock).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        assigner, name = getattr(self, "assigner", None), type(self).__name__
        if assigner is not None and not isinstance(assigner, HungarianAssigner):
            raise TypeError(f"{name}: train_cfg.assigner must be a HungarianAssigner (stock or "
                            f"FusedHungarianAssigner), got {type(assigner).__name__}")
        self._cost_params = None if assigner is None else _match_cost_params(
            assigner.match_costs, name)
        self._presolved = {}

    def _match(self, cls_scores, bbox_preds, gts, metas):
        """(P, B, Q, K) logits, (P, B, Q, 4) normalised cxcywh: P problems sharing the gts
        -> (P, B, Q) int64 matched gt index (-1 = unmatched)."""
        if self._cost_params is None:
            raise RuntimeError(f"{type(self).__name__}: built without train_cfg.assigner")
        P, B, Q, K = cls_scores.shape
        boxes, labels, mask = pad_instances(gts, cls_scores.device, type(self).__name__)
        hw = _image_sizes(metas, cls_scores.device)
        factor = hw.flip(-1).repeat(1, 2)[:, None]                            # (B, 1, 4) w h w h
        pred = bbox_cxcywh_to_xyxy(bbox_preds.detach()) * factor
        rep = (lambda t: t.repeat((P,) + (1,) * (t.dim() - 1)))
        cost = ops.detr_match_cost(cls_scores.detach().reshape(P * B, Q, K),
                                   pred.reshape(P * B, Q, 4), rep(boxes), rep(labels), rep(hw),
                                   rep(mask), **self._cost_params)
        return ops.hungarian_match(cost, rep(mask)).view(P, B, Q)

    @staticmethod
    def _key(cls_scores, bbox_preds):
        """Identifies one problem's (B, Q, K) / (Q, K) scores: get_targets sees image 0's view."""
        return cls_scores.data_ptr(), bbox_preds.data_ptr(), tuple(cls_scores.shape[-2:])

    def _problems(self, args, kwargs):
        """The (cls (L, B, Q, K), bbox (L, B, Q, 4), zero_labels) problems stock's loss_by_feat
        will solve, and its bound arguments, for the loss_by_feat implementations known here
        ([] for others: get_targets then still matches each layer's images in one call)."""
        owner = next(c for c in type(self).__mro__[1:]
                     if "loss_by_feat" in vars(c) and not issubclass(c, FusedDETRMixin))
        if owner not in (DETRHead, DeformableDETRHead, DINOHead):
            return [], {}
        a = inspect.signature(owner.loss_by_feat).bind(self, *args, **kwargs).arguments
        cls, box = a["all_layers_cls_scores"], a["all_layers_bbox_preds"]
        if owner is DINOHead:
            cls, box = self.split_outputs(cls, box, a["dn_meta"])[:2]
        problems = [(cls, box, False)]
        if owner is not DETRHead and a.get("enc_cls_scores") is not None:
            # Deformable DETR matches its encoder proposals against class-agnostic gts (label 0)
            problems.append((a["enc_cls_scores"][None], a["enc_bbox_preds"][None],
                             owner is DeformableDETRHead))
        return problems, a

    def loss_by_feat(self, *args, **kwargs):
        problems, a = self._problems(args, kwargs)
        groups = {}
        for cls, box, zero in problems:  # one batched solve per (query count, label set)
            groups.setdefault((cls.shape[2], zero), []).append((cls, box))
        presolved = {}
        for (_, zero), items in groups.items():
            gts = a["batch_gt_instances"]
            if zero:
                gts = [InstanceData(bboxes=g.bboxes, labels=torch.zeros_like(g.labels))
                       for g in gts]
            match = self._match(torch.cat([c for c, _ in items]),
                                torch.cat([b for _, b in items]), gts, a["batch_img_metas"])
            keys = [self._key(c[i], b[i]) for c, b in items for i in range(c.shape[0])]
            presolved.update(zip(keys, match.unbind()))
        self._presolved = presolved
        try:
            return super().loss_by_feat(*args, **kwargs)
        finally:
            self._presolved = {}

    def get_targets(self, cls_scores_list, bbox_preds_list, batch_gt_instances, batch_img_metas):
        """Stock's signature and tuple: per-image labels, label_weights, bbox_targets (normalised
        cxcywh), bbox_weights, and the host-known num_total_pos / num_total_neg."""
        cls, box = torch.stack(cls_scores_list), torch.stack(bbox_preds_list)
        match = self._presolved.pop(self._key(cls_scores_list[0], bbox_preds_list[0]), None)
        if match is None or match.shape != cls.shape[:2]:
            match = self._match(cls[None], box[None], batch_gt_instances, batch_img_metas)[0]
        B, Q = match.shape
        boxes, labels, _ = pad_instances(batch_gt_instances, box.device, type(self).__name__)
        fg, index = match >= 0, match.clamp(min=0)
        factor = _image_sizes(batch_img_metas, box.device).flip(-1).repeat(1, 2)[:, None]
        targets = bbox_xyxy_to_cxcywh(boxes / factor).to(boxes.dtype)
        targets = torch.gather(targets, 1, index[..., None].expand(B, Q, 4))
        out_labels = torch.where(fg, labels.gather(1, index), self.num_classes)
        bbox_targets = torch.where(fg[..., None], targets, 0)
        bbox_weights = fg[..., None].expand(B, Q, 4).to(boxes.dtype)
        label_weights = torch.ones((B, Q), dtype=boxes.dtype, device=box.device)
        num_pos = sum(min(Q, len(g)) for g in batch_gt_instances)  # an optimal matching's size
        return (list(out_labels), list(label_weights), list(bbox_targets), list(bbox_weights),
                num_pos, B * Q - num_pos)


@MODELS.register_module()
class FusedDETRHead(FusedDETRMixin, DETRHead):
    """mmdet's DETRHead (same constructor) with FusedDETRMixin's batched matching."""

    def __init__(self, num_classes, *args, loss_cls=None, **kwargs):
        # DETRHead turns loss_cls's bg_cls_weight into the no-object class weight only when
        # type(self) is DETRHead, so a subclass passes the converted config itself.
        default = inspect.signature(DETRHead.__init__).parameters["loss_cls"].default
        loss_cls = copy.deepcopy(default if loss_cls is None else loss_cls)
        class_weight = loss_cls.get("class_weight", None)
        convert = isinstance(class_weight, float)  # (stock asserts a float)
        if convert:
            bg_cls_weight = loss_cls.pop("bg_cls_weight", class_weight)
            weights = torch.full((num_classes + 1,), class_weight)
            weights[num_classes] = bg_cls_weight
            loss_cls["class_weight"] = weights
        super().__init__(num_classes, *args, loss_cls=loss_cls, **kwargs)
        if convert:
            self.bg_cls_weight = bg_cls_weight


@MODELS.register_module()
class FusedDeformableDETRHead(FusedDETRMixin, DeformableDETRHead):
    """mmdet's DeformableDETRHead (same constructor) with FusedDETRMixin's batched matching."""


@MODELS.register_module()
class FusedDINOHead(FusedDETRMixin, DINOHead):
    """mmdet's DINOHead (same constructor) with FusedDETRMixin's batched matching."""
