"""rtmdet.ops: the public ops (API.md). Every op takes backend="auto"|"torch"|"triton"|"cpp"|"cuda"."""
from ._backend import available_backends, backend_info
from . import _native  # noqa: F401  (fake kernels + autograd of the compiled ops, if built)
from ._checks import set_value_checks, value_checks
from .detr_cost import detr_match_cost, detr_match_cost_ref
from .dsla import DSLAssignment, dsl_assign, dsl_assign_ref, dsl_cost_ref
from .geometry import bbox2distance, box_iou, distance2bbox, grid_priors
from .nms import batched_nms, nms, nms_ref
from .hungarian import hungarian_match, hungarian_match_ref
from .losses import giou_loss, giou_loss_ref, quality_focal_loss, quality_focal_loss_ref

__all__ = [
    "available_backends", "backend_info", "set_value_checks", "value_checks",
    "box_iou", "distance2bbox", "bbox2distance", "grid_priors",
    "DSLAssignment", "dsl_assign", "dsl_assign_ref", "dsl_cost_ref",
    "quality_focal_loss", "quality_focal_loss_ref", "giou_loss", "giou_loss_ref",
    "nms", "batched_nms", "nms_ref",
    "hungarian_match", "hungarian_match_ref",
    "detr_match_cost", "detr_match_cost_ref",
]
