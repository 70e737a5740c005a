"""Python side of the compiled ops in csrc/: fake kernels (shapes for torch.compile and
opcheck) and autograd formulas for torch.ops.rtmdet.*.

Importing this module loads rtmdet._C (which registers the schemas and the CPU/CUDA kernels)
and registers the rest; without a built extension it does nothing.
"""
import torch

from . import _backend


def _compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _register():
    lib = "rtmdet::"

    @torch.library.register_fake(lib + "box_iou")
    def _(boxes1, boxes2, giou=False, aligned=False, eps=1e-6):
        dtype = torch.promote_types(boxes1.dtype, boxes2.dtype)
        shape = (boxes1.shape[0],) if aligned else (boxes1.shape[0], boxes2.shape[0])
        return boxes1.new_empty(shape, dtype=dtype)

    @torch.library.register_fake(lib + "dsl_assign")
    def _(priors, pred_bboxes, pred_logits, gt_bboxes, gt_labels, gt_mask, topk,
          soft_center_radius, iou_weight, mmyolo):
        B, N = pred_bboxes.shape[:2]
        return (pred_bboxes.new_empty((B, N), dtype=torch.long),
                pred_bboxes.new_empty((B, N), dtype=torch.long),
                pred_bboxes.new_empty((B, N), dtype=torch.float32))

    @torch.library.register_fake(lib + "quality_focal_loss")
    def _(logits, labels, scores, beta):
        return logits.new_empty((logits.shape[0],), dtype=_compute_dtype(logits.dtype))

    @torch.library.register_fake(lib + "quality_focal_loss_backward")
    def _(grad, logits, labels, scores, beta):
        return torch.empty_like(logits), scores.new_empty(scores.shape)

    @torch.library.register_fake(lib + "giou_loss")
    def _(pred, target, eps):
        return pred.new_empty((pred.shape[0],), dtype=torch.promote_types(pred.dtype, target.dtype))

    @torch.library.register_fake(lib + "giou_loss_backward")
    def _(grad, pred, target, eps):
        return torch.empty_like(pred), torch.empty_like(target)

    @torch.library.register_fake(lib + "nms")
    def _(boxes, scores, iou_threshold):
        kept = torch.library.get_ctx().new_dynamic_size()
        return boxes.new_empty((kept,), dtype=torch.long)

    if "detr_match_cost" in _backend.native_ops():  # (an older build may lack it)
        @torch.library.register_fake(lib + "detr_match_cost")
        def _(pred_logits, pred_boxes, gt_boxes, gt_labels, image_sizes, gt_mask, cls_cost,
              cls_weight, l1_weight, giou_weight, focal_alpha, focal_gamma, eps):
            B, Q, _ = pred_logits.shape
            return pred_logits.new_empty((B, Q, gt_boxes.shape[1]), dtype=torch.float32)

    # Autograd: losses are differentiable w.r.t. logits/scores and pred/target.
    def qfl_setup(ctx, inputs, output):
        logits, labels, scores, beta = inputs
        ctx.save_for_backward(logits, labels, scores)
        ctx.beta = beta

    def no_double_backward(op):
        # backward(create_graph=True) runs this with grad mode on; the C++ backward ops have no
        # derivative of their own, so a second derivative would silently come out as 0.
        if torch.is_grad_enabled():
            raise RuntimeError(f"{op} (cpp): double backward (create_graph=True) is not "
                               "implemented; use backend='torch' for higher-order gradients")

    def qfl_backward(ctx, grad):
        no_double_backward("quality_focal_loss")
        logits, labels, scores = ctx.saved_tensors
        grad_logits, grad_scores = torch.ops.rtmdet.quality_focal_loss_backward(
            grad.contiguous(), logits, labels, scores, ctx.beta)
        return (grad_logits if ctx.needs_input_grad[0] else None, None,
                grad_scores if ctx.needs_input_grad[2] else None, None)

    torch.library.register_autograd(lib + "quality_focal_loss", qfl_backward,
                                    setup_context=qfl_setup)

    def giou_setup(ctx, inputs, output):
        pred, target, eps = inputs
        ctx.save_for_backward(pred, target)
        ctx.eps = eps

    def giou_backward(ctx, grad):
        no_double_backward("giou_loss")
        pred, target = ctx.saved_tensors
        grad_pred, grad_target = torch.ops.rtmdet.giou_loss_backward(
            grad.contiguous(), pred, target, ctx.eps)
        return (grad_pred if ctx.needs_input_grad[0] else None,
                grad_target if ctx.needs_input_grad[1] else None, None)

    torch.library.register_autograd(lib + "giou_loss", giou_backward, setup_context=giou_setup)


REGISTERED = False
if _backend.native_module() is not None and hasattr(torch.ops.rtmdet, "dsl_assign"):
    _register()
    REGISTERED = True
