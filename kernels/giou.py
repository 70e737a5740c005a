"""Fused GIoU loss (SPEC section 3): 1 - GIoU of aligned xyxy boxes, loss and gradient in one pass.

Maths (`giou_loss_ref`, i.e. rtmdet.ops.geometry._iou), per pair of pred a and target b:
    w = clamp(min(ax2, bx2) - max(ax1, bx1), 0), h likewise; inter = w h
    union = max(area_a + area_b - inter, eps); iou = inter / union
    ew = clamp(max(ax2, bx2) - min(ax1, bx1), 0), eh likewise; enclose = max(ew eh, eps)
    loss = 1 - (iou - (enclose - union) / enclose)
The gradient w.r.t. pred is the chain rule written out with PyTorch's subgradients, so that
it equals autograd through the reference also at ties: clamp(min=m) passes the gradient
where x >= m; minimum/maximum split it 1/2 : 1/2 where both arguments are equal. Zero-area,
identical, disjoint, nested and inverted boxes give finite values and gradients.

Layout and gradient contract: pred, target (M, 4) with any strides; the forward kernel writes
the (M,) loss (in the boxes' result dtype) and, when autograd needs it, the (M, 4) gradient in
pred's dtype; arithmetic in fp32 (fp64 for fp64 boxes). Backward is grad_loss[:, None] * saved.
"""
import struct

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

# Tunables: boxes per program and warps per program (the op is launch-bound at RTMDet sizes).
GIOU_BLOCK = 512
GIOU_NUM_WARPS = 4


@triton.jit
def _tie_weight(x, y, take_larger: tl.constexpr):
    """d max(x, y)/dx (take_larger) or d min(x, y)/dx, with PyTorch's 1/2 at ties."""
    if take_larger:
        w = tl.where(x > y, 1.0, 0.0)
    else:
        w = tl.where(x < y, 1.0, 0.0)
    return tl.where(x == y, 0.5, w)


@triton.jit
def _load(ptr, ok, F64: tl.constexpr):
    """A coordinate in the compute dtype: fp64 for fp64 boxes, else fp32."""
    v = tl.load(ptr, mask=ok, other=0.0)
    if F64:
        return v.to(tl.float64)
    else:
        return v.to(tl.float32)


@triton.jit
def _giou_fwd_kernel(pred_ptr, target_ptr, loss_ptr, grad_ptr, M, stride_pm, stride_pk,
                     stride_tm, stride_tk, eps, eps_lo, WRITE_GRAD: tl.constexpr, F64: tl.constexpr,
                     BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    rows = (pid * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    ok = rows < M
    p = pred_ptr + rows * stride_pm
    t = target_ptr + rows * stride_tm
    ax1 = _load(p, ok, F64)
    ay1 = _load(p + stride_pk, ok, F64)
    ax2 = _load(p + 2 * stride_pk, ok, F64)
    ay2 = _load(p + 3 * stride_pk, ok, F64)
    bx1 = _load(t, ok, F64)
    by1 = _load(t + stride_tk, ok, F64)
    bx2 = _load(t + 2 * stride_tk, ok, F64)
    by2 = _load(t + 3 * stride_tk, ok, F64)
    if F64:
        # float scalars arrive as fp32: eps + eps_lo restores a float64 eps to ~48 bits
        eps = (ax1 * 0.0 + eps) + eps_lo

    wa = ax2 - ax1
    ha = ay2 - ay1
    area_a = wa * ha
    area_b = (bx2 - bx1) * (by2 - by1)
    w_raw = tl.minimum(ax2, bx2) - tl.maximum(ax1, bx1)
    h_raw = tl.minimum(ay2, by2) - tl.maximum(ay1, by1)
    w = tl.maximum(w_raw, 0.0)
    h = tl.maximum(h_raw, 0.0)
    inter = w * h
    union_raw = area_a + area_b - inter
    union = tl.maximum(union_raw, eps)
    iou = inter / union
    ew_raw = tl.maximum(ax2, bx2) - tl.minimum(ax1, bx1)
    eh_raw = tl.maximum(ay2, by2) - tl.minimum(ay1, by1)
    ew = tl.maximum(ew_raw, 0.0)
    eh = tl.maximum(eh_raw, 0.0)
    enclose_raw = ew * eh
    enclose = tl.maximum(enclose_raw, eps)
    gap = enclose - union
    loss = 1.0 - (iou - gap / enclose)
    tl.store(loss_ptr + rows, loss.to(loss_ptr.dtype.element_ty), mask=ok)

    if WRITE_GRAD:
        # reverse mode from dloss = 1: dloss/diou = -1, dloss/d(gap / enclose) = +1
        d_enclose = 1.0 / enclose - gap / (enclose * enclose)
        d_union = -1.0 / enclose + inter / (union * union)
        d_inter = -1.0 / union
        d_enclose_raw = tl.where(enclose_raw >= eps, d_enclose, 0.0)
        d_ew = tl.where(ew_raw >= 0, d_enclose_raw * eh, 0.0)
        d_eh = tl.where(eh_raw >= 0, d_enclose_raw * ew, 0.0)
        d_union_raw = tl.where(union_raw >= eps, d_union, 0.0)
        d_area_a = d_union_raw
        d_inter = d_inter - d_union_raw
        d_w = tl.where(w_raw >= 0, d_inter * h, 0.0)
        d_h = tl.where(h_raw >= 0, d_inter * w, 0.0)
        # w_raw = min(ax2, bx2) - max(ax1, bx1); ew_raw = max(ax2, bx2) - min(ax1, bx1)
        g_x1 = (-d_area_a * ha - d_w * _tie_weight(ax1, bx1, True)
                - d_ew * _tie_weight(ax1, bx1, False))
        g_x2 = (d_area_a * ha + d_w * _tie_weight(ax2, bx2, False)
                + d_ew * _tie_weight(ax2, bx2, True))
        g_y1 = (-d_area_a * wa - d_h * _tie_weight(ay1, by1, True)
                - d_eh * _tie_weight(ay1, by1, False))
        g_y2 = (d_area_a * wa + d_h * _tie_weight(ay2, by2, False)
                + d_eh * _tie_weight(ay2, by2, True))
        gdt = grad_ptr.dtype.element_ty
        g = grad_ptr + rows * 4
        tl.store(g, g_x1.to(gdt), mask=ok)
        tl.store(g + 1, g_y1.to(gdt), mask=ok)
        tl.store(g + 2, g_x2.to(gdt), mask=ok)
        tl.store(g + 3, g_y2.to(gdt), mask=ok)


@triton_op("rtmdet::giou_loss_triton_fwd", mutates_args=())
def giou_loss_triton_fwd(pred: torch.Tensor, target: torch.Tensor, eps: float,
                         compute_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """pred, target (M, 4) xyxy -> loss (M,), dloss/dpred ((M, 4) if compute_grad else (0, 4))."""
    M = pred.shape[0]
    loss = torch.empty((M,), device=pred.device, dtype=torch.result_type(pred, target))
    grad = torch.empty((M if compute_grad else 0, 4), device=pred.device, dtype=pred.dtype)
    if M > 0:
        f64 = pred.dtype == torch.float64 or target.dtype == torch.float64
        eps_hi = struct.unpack("f", struct.pack("f", eps))[0]  # eps rounded to fp32
        wrap_triton(_giou_fwd_kernel)[(triton.cdiv(M, GIOU_BLOCK),)](
            pred, target, loss, grad, M, pred.stride(0),
            pred.stride(1), target.stride(0), target.stride(1), eps_hi, float(eps) - eps_hi,
            WRITE_GRAD=compute_grad, F64=f64, BLOCK=GIOU_BLOCK, num_warps=GIOU_NUM_WARPS)
    return loss, grad


def _giou_setup_context(ctx, inputs, output):
    ctx.compute_grad = inputs[3]
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(output[1] if ctx.needs_input_grad[0] else None)


def _giou_backward(ctx, grad_loss, _grad_of_saved):
    if not ctx.needs_input_grad[0] or grad_loss is None:
        return None, None, None, None
    if not ctx.compute_grad:
        raise RuntimeError("rtmdet::giou_loss_triton_fwd was called with compute_grad=False, "
                           "so it cannot give a gradient for pred; pass compute_grad=True")
    saved, = ctx.saved_tensors
    return (saved * grad_loss[:, None]).to(saved.dtype), None, None, None


giou_loss_triton_fwd.register_autograd(_giou_backward, setup_context=_giou_setup_context)


def giou_loss_triton(pred, target, eps=1e-6):
    """Unreduced GIoU loss: pred, target (M, 4) xyxy -> (M,), differentiable w.r.t. pred only."""
    needs_grad = torch.is_grad_enabled()
    if needs_grad and target.requires_grad:
        raise RuntimeError("giou_loss (triton) gives no gradient for target; detach it or use "
                           "backend='torch'")
    loss, _ = torch.ops.rtmdet.giou_loss_triton_fwd(pred, target, float(eps),
                                                    needs_grad and pred.requires_grad)
    return loss
