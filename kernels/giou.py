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
from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .qfl import _no_double_backward, cdiv, eager_launch_ok

# Tunables: boxes per program and warps per program (the op is launch-bound at RTMDet sizes);
# the reduced op's programs take GIOU_SUM_BLOCK x GIOU_SUM_STEPS rows each, so that up to 8,192
# pairs need a single program writing the result itself (no second launch for the sum).
GIOU_BLOCK = 512
GIOU_NUM_WARPS = 4
GIOU_SUM_BLOCK = 1024
GIOU_SUM_STEPS = 8
GIOU_SUM_NUM_WARPS = 8


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
def _giou_rows(p, t, grad_ptr, rows, ok, stored, stride_pk, stride_tk, eps, gscale,
               WRITE_GRAD: tl.constexpr, F64: tl.constexpr):
    """Loss of the pairs at pointers p (pred) and t (target) for `rows` (loads masked by ok,
    0 elsewhere); with WRITE_GRAD also stores gscale * dloss/dpred where `stored` (gscale: a
    scalar or a per-row vector, 0 where not ok)."""
    ax1 = _load(p, ok, F64)
    ay1 = _load(p + stride_pk, ok, F64)
    ax2 = _load(p + 2 * stride_pk, ok, F64)
    ay2 = _load(p + 3 * stride_pk, ok, F64)
    bx1 = _load(t, ok, F64)
    by1 = _load(t + stride_tk, ok, F64)
    bx2 = _load(t + 2 * stride_tk, ok, F64)
    by2 = _load(t + 3 * stride_tk, ok, F64)

    wa = ax2 - ax1
    ha = ay2 - ay1
    wa_c = tl.maximum(wa, 0.0)  # an inverted box is empty: area 0 (keeps the loss in [0, 2])
    ha_c = tl.maximum(ha, 0.0)
    area_a = wa_c * ha_c
    area_b = tl.maximum(bx2 - bx1, 0.0) * tl.maximum(by2 - by1, 0.0)
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

    if WRITE_GRAD:
        # reverse mode from dloss = 1: dloss/diou = -1, dloss/d(gap / enclose) = +1
        d_enclose = 1.0 / enclose - gap / (enclose * enclose)
        d_union = -1.0 / enclose + inter / (union * union)
        d_inter = -1.0 / union
        d_enclose_raw = tl.where(enclose_raw >= eps, d_enclose, 0.0)
        d_ew = tl.where(ew_raw >= 0, d_enclose_raw * eh, 0.0)
        d_eh = tl.where(eh_raw >= 0, d_enclose_raw * ew, 0.0)
        d_union_raw = tl.where(union_raw >= eps, d_union, 0.0)
        d_wa = tl.where(wa >= 0, d_union_raw * ha_c, 0.0)  # area_a = clamp(wa) clamp(ha)
        d_ha = tl.where(ha >= 0, d_union_raw * wa_c, 0.0)
        d_inter = d_inter - d_union_raw
        d_w = tl.where(w_raw >= 0, d_inter * h, 0.0)
        d_h = tl.where(h_raw >= 0, d_inter * w, 0.0)
        # w_raw = min(ax2, bx2) - max(ax1, bx1); ew_raw = max(ax2, bx2) - min(ax1, bx1)
        g_x1 = (-d_wa - d_w * _tie_weight(ax1, bx1, True)
                - d_ew * _tie_weight(ax1, bx1, False))
        g_x2 = (d_wa + d_w * _tie_weight(ax2, bx2, False)
                + d_ew * _tie_weight(ax2, bx2, True))
        g_y1 = (-d_ha - d_h * _tie_weight(ay1, by1, True)
                - d_eh * _tie_weight(ay1, by1, False))
        g_y2 = (d_ha + d_h * _tie_weight(ay2, by2, False)
                + d_eh * _tie_weight(ay2, by2, True))
        gdt = grad_ptr.dtype.element_ty
        g = grad_ptr + rows * 4
        tl.store(g, (g_x1 * gscale).to(gdt), mask=stored)
        tl.store(g + 1, (g_y1 * gscale).to(gdt), mask=stored)
        tl.store(g + 2, (g_x2 * gscale).to(gdt), mask=stored)
        tl.store(g + 3, (g_y2 * gscale).to(gdt), mask=stored)
    return loss


@triton.jit
def _giou_fwd_kernel(pred_ptr, target_ptr, loss_ptr, grad_ptr, M, stride_pm, stride_pk,
                     stride_tm, stride_tk, eps, eps_lo, WRITE_GRAD: tl.constexpr, F64: tl.constexpr,
                     BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    rows = (pid * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    ok = rows < M
    if F64:
        # float scalars arrive as fp32: eps + eps_lo restores a float64 eps to ~48 bits
        eps = (tl.zeros((BLOCK,), tl.float64) + eps) + eps_lo
    loss = _giou_rows(pred_ptr + rows * stride_pm, target_ptr + rows * stride_tm, grad_ptr, rows,
                      ok, ok, stride_pk, stride_tk, eps, 1.0, WRITE_GRAD, F64)
    tl.store(loss_ptr + rows, loss.to(loss_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _giou_sum_kernel(pred_ptr, target_ptr, weight_ptr, divisor_ptr, index_ptr, partial_ptr,
                     grad_ptr, M, stride_pm, stride_pk, stride_tm, stride_tk, stride_w, N_IMG, G,
                     eps, eps_lo, scale, scale_lo, HAS_WEIGHT: tl.constexpr, HAS_DIVISOR: tl.constexpr,
                     GATHER: tl.constexpr, WRITE_GRAD: tl.constexpr, F64: tl.constexpr,
                     BLOCK: tl.constexpr, STEPS: tl.constexpr):
    """partial[pid] = scale / divisor * sum of w * loss over rows [pid, pid + 1) * BLOCK * STEPS
    (in a fixed order), and the gradient scale / divisor * w * dloss/dpred.

    GATHER: the target of row m = b * N_IMG + n is row index[m] of image b's gts (target_ptr a
    contiguous (B, G, 4) tensor); rows with index < 0 (background) count 0 and get gradient 0."""
    pid = tl.program_id(0)
    if F64:
        eps = (tl.zeros((BLOCK,), tl.float64) + eps) + eps_lo
        factor = (tl.zeros((BLOCK,), tl.float64) + scale) + scale_lo   # as eps: ~48 bits
    else:  # (torch.compile passes Python floats as fp64 scalars)
        eps = (tl.zeros((BLOCK,), tl.float32) + eps).to(tl.float32)
        factor = (tl.zeros((BLOCK,), tl.float32) + scale).to(tl.float32)
    if HAS_DIVISOR:
        factor = factor / tl.load(divisor_ptr).to(factor.dtype)
    acc = factor * 0.0
    for step in tl.static_range(STEPS):
        rows = ((pid * STEPS + step) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
        in_range = rows < M
        ok = in_range
        if GATHER:
            g = tl.load(index_ptr + rows, mask=ok, other=-1)
            ok = ok & (g >= 0)
            t = target_ptr + ((rows // N_IMG) * G + tl.maximum(g, 0)) * 4
        else:
            t = target_ptr + rows * stride_tm
        if HAS_WEIGHT:
            w = tl.load(weight_ptr + rows * stride_w, mask=ok, other=0.0).to(factor.dtype)
        else:
            w = tl.where(ok, 1.0, 0.0).to(factor.dtype)
        loss = _giou_rows(pred_ptr + rows * stride_pm, t, grad_ptr, rows, ok, in_range, stride_pk,
                          stride_tk, eps, w * factor, WRITE_GRAD, F64)
        acc += tl.where(ok, loss * w, 0.0)
    tl.store(partial_ptr + pid, tl.sum(acc * factor, axis=0).to(partial_ptr.dtype.element_ty))


@triton_op("rtmdet::giou_loss_triton_fwd", mutates_args=())
def giou_loss_triton_fwd(pred: torch.Tensor, target: torch.Tensor, eps: float,
                         compute_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """pred, target (M, 4) xyxy -> loss (M,), dloss/dpred ((M, 4) if compute_grad else (0, 4))."""
    M = pred.shape[0]
    loss = torch.empty((M,), device=pred.device, dtype=torch.result_type(pred, target))
    grad = torch.empty((M if compute_grad else 0, 4), device=pred.device, dtype=pred.dtype)
    if M > 0:
        f64 = pred.dtype == torch.float64 or target.dtype == torch.float64
        eps_hi, eps_lo = _eps_parts(eps)
        wrap_triton(_giou_fwd_kernel)[(cdiv(M, GIOU_BLOCK),)](
            pred, target, loss, grad, M, pred.stride(0),
            pred.stride(1), target.stride(0), target.stride(1), eps_hi, eps_lo,
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
    _no_double_backward("giou_loss")
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


# ----------------------------------------------------------------------------------------
# Reduced GIoU loss ("sum" / "mean"): one launch forward, one multiply backward
# ----------------------------------------------------------------------------------------

def _eps_parts(eps):
    eps_hi = struct.unpack("f", struct.pack("f", eps))[0]  # eps rounded to fp32
    return eps_hi, float(eps) - eps_hi


def _giou_sum_launch(kernel, pred, target, weight, divisor, eps, scale, compute_grad,
                     index=None):
    """The reduced loss (0-d) and the scaled gradient ((M, 4) or (0, 4)); with `index` (B, N)
    int, target is a (B, G, 4) gt tensor gathered per row (index < 0: background, no loss)."""
    M = pred.shape[0]
    dev = pred.device
    dtype = torch.result_type(pred, target)
    grad = torch.empty((M if compute_grad else 0, 4), device=dev, dtype=pred.dtype)
    if M == 0:
        return torch.zeros((), device=dev, dtype=dtype), grad
    # up to GIOU_SUM_BLOCK * GIOU_SUM_STEPS rows: one program that writes the result itself;
    # more: one block per program (a full GPU of them) and a sum of the partial sums
    steps = GIOU_SUM_STEPS if M <= GIOU_SUM_BLOCK * GIOU_SUM_STEPS else 1
    programs = cdiv(M, GIOU_SUM_BLOCK * steps)
    partial = torch.empty((programs,) if programs > 1 else (), device=dev, dtype=dtype)
    eps_hi, eps_lo = _eps_parts(eps)
    scale_hi, scale_lo = _eps_parts(scale)
    gather = index is not None
    if gather:
        target = target.contiguous()
        index = index.contiguous()
        n_img, G = index.shape[1], target.shape[1]
    else:
        n_img, G = 1, 1
    kernel[(programs,)](
        pred, target, pred if weight is None else weight, pred if divisor is None else divisor,
        index if gather else pred, partial, grad, M, pred.stride(0), pred.stride(1),
        target.stride(0) if not gather else 0, target.stride(-1),
        0 if weight is None else weight.stride(0), n_img, G, eps_hi, eps_lo, scale_hi, scale_lo,
        HAS_WEIGHT=weight is not None, HAS_DIVISOR=divisor is not None, GATHER=gather,
        WRITE_GRAD=compute_grad, F64=dtype == torch.float64 or pred.dtype == torch.float64,
        BLOCK=GIOU_SUM_BLOCK, STEPS=steps, num_warps=GIOU_SUM_NUM_WARPS)
    return (partial.sum() if programs > 1 else partial), grad


@triton_op("rtmdet::giou_loss_triton_sum", mutates_args=())
def giou_loss_triton_sum(pred: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor],
                         divisor: Optional[torch.Tensor], index: Optional[torch.Tensor],
                         eps: float, scale: float,
                         compute_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(0-d loss = scale / divisor * sum_m weight[m] * (1 - GIoU_m), its gradient w.r.t. pred
    ((M, 4) in pred's dtype if compute_grad, else (0, 4))). divisor: 0-d or None, a constant.
    index None: target (M, 4); else index (B, N) int and target (B, G, 4) gts, M = B * N."""
    return _giou_sum_launch(wrap_triton(_giou_sum_kernel), pred, target, weight, divisor, eps,
                            scale, compute_grad, index)


def _giou_sum_setup_context(ctx, inputs, output):
    ctx.compute_grad = inputs[7]
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(output[1] if ctx.needs_input_grad[0] else None)


def _giou_sum_backward(ctx, grad_loss, _grad_of_saved):
    if not ctx.needs_input_grad[0] or grad_loss is None:
        return None, None, None, None, None, None, None, None
    if not ctx.compute_grad:
        raise RuntimeError("rtmdet::giou_loss_triton_sum was called with compute_grad=False, "
                           "so it cannot give a gradient for pred; pass compute_grad=True")
    _no_double_backward("giou_loss")
    saved, = ctx.saved_tensors
    return saved * grad_loss.to(saved.dtype), None, None, None, None, None, None, None


giou_loss_triton_sum.register_autograd(_giou_sum_backward, setup_context=_giou_sum_setup_context)


class _GIoUSumEager(torch.autograd.Function):
    """rtmdet::giou_loss_triton_sum for eager calls, launching the kernel directly (the op's
    dispatch costs more host time than the whole GPU work at RTMDet sizes)."""

    @staticmethod
    def forward(ctx, pred, target, weight, divisor, index, eps, scale):
        loss, grad = _giou_sum_launch(_giou_sum_kernel, pred, target, weight, divisor, eps,
                                      scale, True, index)
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        _no_double_backward("giou_loss")
        saved, = ctx.saved_tensors
        return saved * grad_loss.to(saved.dtype), None, None, None, None, None, None


def giou_loss_triton_sum_public(pred, target, weight=None, divisor=None, eps=1e-6, scale=1.0,
                                index=None):
    """0-d scale / divisor * sum_m weight[m] * (1 - GIoU(pred[m], target[m])), differentiable
    w.r.t. pred: pred, target (M, 4) xyxy, weight (M,) or None, divisor 0-d or None.
    With index (B, N) int: target is (B, G, 4) and row m = b * N + n is paired with gt
    index[b, n] of image b (index < 0: background, loss and gradient 0)."""
    if torch.is_grad_enabled() and target.requires_grad:
        raise RuntimeError("giou_loss (triton) gives no gradient for target; detach it or use "
                           "backend='torch'")
    if divisor is not None:
        divisor = divisor.detach()
    needs_grad = torch.is_grad_enabled() and pred.requires_grad
    if eager_launch_ok(pred, target, weight, divisor, index):
        if needs_grad:
            return _GIoUSumEager.apply(pred, target, weight, divisor, index, float(eps),
                                       float(scale))
        return _giou_sum_launch(_giou_sum_kernel, pred, target, weight, divisor, float(eps),
                                float(scale), False, index)[0]
    loss, _ = torch.ops.rtmdet.giou_loss_triton_sum(pred, target, weight, divisor, index,
                                                    float(eps), float(scale), needs_grad)
    return loss
