"""Fused Quality Focal Loss (SPEC section 3): loss and its gradient in one pass over the logits.

Maths, per element x of logits (M, C), with s = sigmoid(x), sp = softplus(x) = BCE(x, 0), b = beta:
    other classes:       loss = sp s^b             dloss/dx = s^b (s + b (1 - s) sp)
    a positive's own class, target t, d = s - t, bce = BCE(x, t) = sp - t x:
                         loss = bce |d|^b          dloss/dx = d |d|^b + b bce s (1 - s) |d|^b / d
(the last term is 0 where d == 0, as PyTorch's abs/pow backward gives for b > 1).
Row loss = sum over the C classes. The element-wise pass computes only the "other classes"
form (three hardware transcendentals per logit, kernels/fastmath.py); a positive's own class
is computed once per row from one gathered logit and substituted.

Memory layout and gradient contract:
- logits (M, C) with stride(1) == 1 and any row stride (e.g. a view of a (B, N, C) tensor, or a
  column slice of a wider one) is read in place; other layouts are copied once.
- The forward kernel reads the logits once and writes the (M,) float32 loss and, when autograd
  needs it, the (M, C) gradient in the logits' dtype (fp32 arithmetic throughout). That gradient
  is the only logits-sized buffer this op allocates in the forward pass.
- Backward is one more pass: grad_logits = grad_loss[:, None] * saved_grad, in fp32, stored in
  the logits' dtype (a small Triton kernel, so bf16 never goes through an fp32 temporary).

Both passes are `torch.library.triton_op`s, so torch.compile sees the kernels.
"""
import functools
from typing import Optional

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import FakeTensor as _FakeTensor
from torch.library import triton_op, wrap_triton
from torch.utils._python_dispatch import _get_current_dispatch_mode as _current_dispatch_mode

from .fastmath import exp2_fast, fast_math_enabled, log2_fast, softplus_sigmoid

# Tunables (the only ones): elements per program (BLOCK_M * BLOCK_C) and warps per program of
# the forward and of the backward (scaling) kernel, and the widest column block (wider class
# counts loop over column blocks).
QFL_ELEMENTS = 2048
QFL_NUM_WARPS = 16
QFL_SCALE_ELEMENTS = 4096
QFL_SCALE_NUM_WARPS = 8
QFL_MAX_BLOCK_C = 2048


@triton.jit
def _qfl_block(x_ptr, grad_ptr, rows64, row_ok, cols, label, g_own, C, stride_xm, beta,
               BETA_TWO: tl.constexpr, WRITE_GRAD: tl.constexpr, EVEN_C: tl.constexpr,
               FAST: tl.constexpr, row_scale):
    """Columns `cols` of rows `rows64`: stores the gradient (g_own at a positive's own class)
    times row_scale and returns the row sums of the loss over these columns, the own class
    left out."""
    mask = row_ok[:, None] & (cols < C)[None, :]
    x = tl.load(x_ptr + rows64[:, None] * stride_xm + cols[None, :], mask=mask,
                other=0.0).to(tl.float32)
    s, one_minus_s, sp = softplus_sigmoid(x, FAST)
    if BETA_TWO:
        s_pow = s * s
    else:
        s_pow = exp2_fast(beta * log2_fast(s, FAST), FAST)
    own = cols[None, :] == label[:, None]
    loss = tl.where(own, 0.0, sp * s_pow)
    if not EVEN_C:  # rows past M are never stored, so only short column blocks need masking
        loss = tl.where(mask, loss, 0.0)
    if WRITE_GRAD:
        g = tl.where(own, g_own, s_pow * (s + beta * one_minus_s * sp)) * row_scale
        tl.store(grad_ptr + rows64[:, None] * C + cols[None, :],
                 g.to(grad_ptr.dtype.element_ty), mask=mask)
    return tl.sum(loss, axis=1)


@triton.jit
def _own_class(x_ptr, label_ptr, score_ptr, rows64, row_ok, C, stride_xm, stride_label,
               stride_score, beta, BETA_TWO: tl.constexpr, FAST: tl.constexpr):
    """Per row: (label, -1 for background; the loss at a positive's own class, 0 for
    background; its gradient (BLOCK_M, 1)), from one gathered logit per row."""
    label = tl.load(label_ptr + rows64 * stride_label, mask=row_ok, other=-1)
    # background (any label outside [0, C)) -> -1, which no column index equals
    positive = row_ok & (label >= 0) & (label < C)
    label = tl.where(positive, label, -1).to(tl.int32)
    t = tl.load(score_ptr + rows64 * stride_score, mask=row_ok, other=0.0).to(tl.float32)

    # A positive's own class, once per row (one gathered logit): its loss and gradient.
    xl = tl.load(x_ptr + rows64 * stride_xm + tl.maximum(label, 0), mask=positive,
                 other=0.0).to(tl.float32)
    sl, one_minus_sl, spl = softplus_sigmoid(xl, FAST)
    bce = spl - t * xl
    d = sl - t
    if BETA_TWO:
        d_pow = d * d
        d_pow_over_d = d
    else:
        ad = tl.abs(d)
        d_pow = exp2_fast(beta * log2_fast(ad, FAST), FAST)  # log2(0) = -inf: 0 ** beta = 0
        d_pow_over_d = tl.where(ad > 0, d_pow / tl.where(ad > 0, d, 1.0), 0.0)
    own_loss = tl.where(positive, bce * d_pow, 0.0)
    g_own = (d * d_pow + beta * bce * sl * one_minus_sl * d_pow_over_d)[:, None]
    return label, own_loss, g_own



@triton.jit
def _qfl_fwd_kernel(x_ptr, label_ptr, score_ptr, loss_ptr, grad_ptr,
                    M, C, stride_xm, stride_label, stride_score, beta,
                    BETA_TWO: tl.constexpr, WRITE_GRAD: tl.constexpr, EVEN_C: tl.constexpr,
                    FAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
                    C_BLOCKS: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    rows64 = rows.to(tl.int64)  # M * C may exceed 2^31
    # torch.compile passes Python floats as fp64 scalars, its kernel analysis as Python floats
    # (where .to() fails): tl.full takes both
    beta = tl.full((BLOCK_M,), beta, tl.float32)
    label, acc, g_own = _own_class(x_ptr, label_ptr, score_ptr, rows64, row_ok, C, stride_xm,
                                   stride_label, stride_score, beta, BETA_TWO, FAST)
    beta = beta[:, None]

    # Every other class: loss sp s^b, gradient s^b (s + b (1 - s) sp).
    if C_BLOCKS <= 8:  # unrolled, so that every block's loads are in flight at once
        for cb in tl.static_range(C_BLOCKS):
            acc += _qfl_block(x_ptr, grad_ptr, rows64, row_ok, cb * BLOCK_C + tl.arange(0, BLOCK_C),
                              label, g_own, C, stride_xm, beta, BETA_TWO, WRITE_GRAD, EVEN_C, FAST, 1.0)
    else:
        for cb in range(C_BLOCKS):
            acc += _qfl_block(x_ptr, grad_ptr, rows64, row_ok, cb * BLOCK_C + tl.arange(0, BLOCK_C),
                              label, g_own, C, stride_xm, beta, BETA_TWO, WRITE_GRAD, EVEN_C, FAST, 1.0)
    tl.store(loss_ptr + rows64, acc, mask=row_ok)


@triton.jit
def _scale_rows_kernel(g_ptr, saved_ptr, out_ptr, total, stride_g, C: tl.constexpr,
                       BLOCK: tl.constexpr):
    """out.flat[i] = g[i // C] * saved.flat[i] for contiguous (M, C) saved / out: one flat,
    fully coalesced stream (C is a constexpr, so i // C is a multiply and a shift)."""
    start = tl.program_id(0).to(tl.int64) * BLOCK
    first_row = start // C
    j = (start % C).to(tl.int32) + tl.arange(0, BLOCK)  # column of the first element + offset
    i = start + tl.arange(0, BLOCK)
    m = i < total
    v = tl.load(saved_ptr + i, mask=m, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + (first_row + j // C) * stride_g, mask=m, other=0.0).to(tl.float32)
    tl.store(out_ptr + i, (v * g).to(out_ptr.dtype.element_ty), mask=m)


def cdiv(a, b):
    """ceil(a / b) for ints, on the host (triton.cdiv is a jit function: slower to call)."""
    return -(-a // b)


def column_block(C, widest):
    """Columns per block: the widest power of two >= 16 dividing C (80 -> 16: no masked-off
    lanes doing transcendental work), else C rounded up to a power of two, capped at `widest`."""
    for width in (128, 64, 32, 16):
        if width <= widest and C % width == 0:
            return width
    width = 1
    while width < C and width < widest:  # (plain ints or symbolic ones under torch.compile)
        width *= 2
    return min(width, widest)


def _blocks(C, elements):
    """(BLOCK_M, BLOCK_C, C_BLOCKS) for C classes and about `elements` per program.

    The column-block count is a constexpr (C is fixed for a model; a runtime loop bound also
    trips the Triton 3.6 interpreter with NumPy 2). Cached for plain ints (a symbolic C under
    torch.compile's dynamic shapes is not hashable).
    """
    if isinstance(C, int):
        return _blocks_of(C, elements)
    return _blocks_of.__wrapped__(C, elements)


@functools.lru_cache(maxsize=None)
def _blocks_of(C, elements):
    block_c = column_block(C, QFL_MAX_BLOCK_C)
    block_m = max(1, elements // block_c)
    return block_m, block_c, cdiv(C, block_c)


# ----------------------------------------------------------------------------------------
# Ops
# ----------------------------------------------------------------------------------------

@triton_op("rtmdet::qfl_triton_fwd", mutates_args=())
def qfl_triton_fwd(logits: torch.Tensor, labels: torch.Tensor, scores: torch.Tensor,
                   beta: float, compute_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, C) logits, (M,) labels, (M,) scores -> loss (M,) float32 and dloss/dlogits.

    The gradient is (M, C) contiguous in the logits' dtype when compute_grad, else (0, C).
    """
    M, C = logits.shape
    if logits.stride(1) != 1 and C > 1:
        logits = logits.contiguous()
    loss = torch.empty((M,), device=logits.device, dtype=torch.float32)
    grad = torch.empty((M if compute_grad else 0, C), device=logits.device, dtype=logits.dtype)
    if M > 0:
        block_m, block_c, c_blocks = _blocks(C, QFL_ELEMENTS)
        # without compute_grad, `grad` is an empty tensor that the kernel never touches
        wrap_triton(_qfl_fwd_kernel)[(cdiv(M, block_m),)](
            logits, labels, scores, loss, grad, M, C, logits.stride(0), labels.stride(0),
            scores.stride(0), float(beta), BETA_TWO=float(beta) == 2.0, WRITE_GRAD=compute_grad,
            EVEN_C=C % block_c == 0, FAST=fast_math_enabled(), BLOCK_M=block_m, BLOCK_C=block_c, C_BLOCKS=c_blocks, num_warps=QFL_NUM_WARPS)
    return loss, grad


@triton_op("rtmdet::qfl_triton_scale_rows", mutates_args=())
def qfl_triton_scale_rows(grad_loss: torch.Tensor, saved: torch.Tensor) -> torch.Tensor:
    """grad_loss (M,) * saved (M, C) contiguous -> (M, C) in saved's dtype, fp32 products."""
    M, C = saved.shape
    saved = saved.contiguous()  # a no-op for the forward's gradient
    out = torch.empty_like(saved, memory_format=torch.contiguous_format)
    if M > 0 and C > 0:
        wrap_triton(_scale_rows_kernel)[(cdiv(M * C, QFL_SCALE_ELEMENTS),)](
            grad_loss, saved, out, M * C, grad_loss.stride(0), C=C, BLOCK=QFL_SCALE_ELEMENTS,
            num_warps=QFL_SCALE_NUM_WARPS)
    return out


def _qfl_setup_context(ctx, inputs, output):
    logits, _, _, _, compute_grad = inputs
    ctx.compute_grad = compute_grad
    ctx.set_materialize_grads(False)  # never build a zero (M, C) tangent for the gradient output
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(output[1] if ctx.needs_input_grad[0] else None)


def _qfl_backward(ctx, grad_loss, _grad_of_saved):
    if not ctx.needs_input_grad[0] or grad_loss is None:
        return None, None, None, None, None
    if not ctx.compute_grad:
        raise RuntimeError("rtmdet::qfl_triton_fwd was called with compute_grad=False, so it "
                           "cannot give a gradient for logits; pass compute_grad=True")
    _no_double_backward("quality_focal_loss")
    saved, = ctx.saved_tensors
    return torch.ops.rtmdet.qfl_triton_scale_rows(grad_loss, saved), None, None, None, None


qfl_triton_fwd.register_autograd(_qfl_backward, setup_context=_qfl_setup_context)


def quality_focal_loss_triton(logits, labels, scores, beta=2.0):
    """Unreduced QFL: logits (M, C) fp32/fp16/bf16, labels (M,) int32/int64 (outside [0, C) is
    background), scores (M,) float -> (M,) float32, differentiable w.r.t. logits only."""
    if not beta > 0:
        raise ValueError(f"quality_focal_loss (triton): beta must be > 0, got {beta}")
    needs_grad = torch.is_grad_enabled()
    if needs_grad and scores.requires_grad:
        raise RuntimeError("quality_focal_loss (triton) gives no gradient for scores; detach "
                           "them (they are targets) or use backend='torch'")
    loss, _ = torch.ops.rtmdet.qfl_triton_fwd(logits, labels, scores, float(beta),
                             needs_grad and logits.requires_grad)
    return loss


# ----------------------------------------------------------------------------------------
# Reduced QFL (reduction "sum" / "mean"): one scalar, the gradient recomputed in the backward
# ----------------------------------------------------------------------------------------
# loss = sum_m w_m * QFL_m * scale / divisor. The forward reads the logits once and writes one
# partial sum per program (summed in a fixed order: deterministic); the backward reads them
# again and writes grad_out * scale / divisor * w_m * dQFL_m/dx straight into the gradient, so
# no logits-sized buffer is kept between the passes (3 logits-sized transfers in all instead
# of the saved-gradient design's 4) and the reduction, weight and normalisation cost no launch.

@triton.jit
def _qfl_sum_kernel(x_ptr, label_ptr, score_ptr, weight_ptr, divisor_ptr, grad_out_ptr,
                    partial_ptr, grad_ptr, M, C, stride_xm, stride_label, stride_score,
                    stride_weight, beta, scale, BETA_TWO: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                    HAS_DIVISOR: tl.constexpr, BACKWARD: tl.constexpr, EVEN_C: tl.constexpr,
                    FAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
                    C_BLOCKS: tl.constexpr):
    """Forward (BACKWARD=False): partial[pid] = scale / divisor * sum over this program's rows
    of w * QFL. Backward: grad[m, c] = grad_out * scale / divisor * w[m] * dQFL[m]/dx[m, c]."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    rows64 = rows.to(tl.int64)
    # fp32 vectors from the float arguments (fp64 scalars under torch.compile, Python floats in
    # its kernel analysis and in the interpreter: tl.full takes all of them)
    beta = tl.full((BLOCK_M,), beta, tl.float32)
    factor = tl.full((BLOCK_M,), scale, tl.float32)
    if HAS_DIVISOR:
        factor = factor / tl.load(divisor_ptr).to(tl.float32)
    label, acc, g_own = _own_class(x_ptr, label_ptr, score_ptr, rows64, row_ok, C, stride_xm,
                                   stride_label, stride_score, beta, BETA_TWO, FAST)
    beta = beta[:, None]
    if HAS_WEIGHT:
        w = tl.load(weight_ptr + rows64 * stride_weight, mask=row_ok, other=0.0).to(tl.float32)
    else:
        w = tl.where(row_ok, 1.0, 0.0)
    if BACKWARD:
        row_scale = (w * (factor * tl.load(grad_out_ptr).to(tl.float32)))[:, None]
        if C_BLOCKS <= 8:
            for cb in tl.static_range(C_BLOCKS):
                _qfl_block(x_ptr, grad_ptr, rows64, row_ok, cb * BLOCK_C + tl.arange(0, BLOCK_C),
                           label, g_own, C, stride_xm, beta, BETA_TWO, True, EVEN_C, FAST,
                           row_scale)
        else:
            for cb in range(C_BLOCKS):
                _qfl_block(x_ptr, grad_ptr, rows64, row_ok, cb * BLOCK_C + tl.arange(0, BLOCK_C),
                           label, g_own, C, stride_xm, beta, BETA_TWO, True, EVEN_C, FAST,
                           row_scale)
    else:
        if C_BLOCKS <= 8:
            for cb in tl.static_range(C_BLOCKS):
                acc += _qfl_block(x_ptr, grad_ptr, rows64, row_ok,
                                  cb * BLOCK_C + tl.arange(0, BLOCK_C), label, g_own, C,
                                  stride_xm, beta, BETA_TWO, False, EVEN_C, FAST, 1.0)
        else:
            for cb in range(C_BLOCKS):
                acc += _qfl_block(x_ptr, grad_ptr, rows64, row_ok,
                                  cb * BLOCK_C + tl.arange(0, BLOCK_C), label, g_own, C,
                                  stride_xm, beta, BETA_TWO, False, EVEN_C, FAST, 1.0)
        tl.store(partial_ptr + pid, tl.sum(acc * (w * factor), axis=0))


def _qfl_sum_launch(kernel, logits, labels, scores, weight, divisor, beta, scale, grad_out):
    """Runs `kernel` (the raw or the wrap_triton'd _qfl_sum_kernel): the 0-d float32 loss when
    grad_out is None, else the (M, C) gradient in the logits' dtype."""
    M, C = logits.shape
    dev = logits.device
    backward = grad_out is not None
    if M == 0 or C == 0:  # an empty sum: loss 0, gradient 0
        return (torch.zeros((M, C), device=dev, dtype=logits.dtype) if backward
                else torch.zeros((), device=dev, dtype=torch.float32))
    block_m, block_c, c_blocks = _blocks(C, QFL_ELEMENTS)
    programs = cdiv(M, block_m)
    # The written buffer is never also passed as another argument: if torch.compile's kernel
    # analysis fails it treats every argument as written, and aliases would then be copied
    # back over each other. The unused pointers get read-only inputs.
    if backward:
        grad, partial = torch.empty((M, C), device=dev, dtype=logits.dtype), scores
    else:
        grad, partial = scores, torch.empty((programs,), device=dev, dtype=torch.float32)
    kernel[(programs,)](
        logits, labels, scores, logits if weight is None else weight,
        scores if divisor is None else divisor, scores if grad_out is None else grad_out,
        partial, grad, M, C, logits.stride(0), labels.stride(0), scores.stride(0),
        0 if weight is None else weight.stride(0), float(beta), float(scale),
        BETA_TWO=float(beta) == 2.0, HAS_WEIGHT=weight is not None,
        HAS_DIVISOR=divisor is not None, BACKWARD=backward, EVEN_C=C % block_c == 0,
        FAST=fast_math_enabled(), BLOCK_M=block_m, BLOCK_C=block_c, C_BLOCKS=c_blocks,
        num_warps=QFL_NUM_WARPS)
    return grad if backward else partial.sum()


@triton_op("rtmdet::qfl_triton_sum", mutates_args=())
def qfl_triton_sum(logits: torch.Tensor, labels: torch.Tensor, scores: torch.Tensor,
                   weight: Optional[torch.Tensor], divisor: Optional[torch.Tensor], beta: float,
                   scale: float) -> torch.Tensor:
    """0-d float32: scale / divisor * sum_m weight[m] * QFL(logits[m], labels[m], scores[m]).

    logits (M, C) with stride(1) == 1; weight (M,) or None (= 1); divisor a 0-d tensor or None
    (= 1), a constant (no gradient). Differentiable w.r.t. logits (gradient recomputed)."""
    return _qfl_sum_launch(wrap_triton(_qfl_sum_kernel), logits, labels, scores, weight,
                           divisor, beta, scale, None)


@triton_op("rtmdet::qfl_triton_sum_backward", mutates_args=())
def qfl_triton_sum_backward(grad_out: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor,
                            scores: torch.Tensor, weight: Optional[torch.Tensor],
                            divisor: Optional[torch.Tensor], beta: float,
                            scale: float) -> torch.Tensor:
    """d qfl_triton_sum / d logits times the 0-d grad_out: (M, C) in the logits' dtype."""
    return _qfl_sum_launch(wrap_triton(_qfl_sum_kernel), logits, labels, scores, weight,
                           divisor, beta, scale, grad_out)


def _no_double_backward(op):
    if torch.is_grad_enabled():  # backward(create_graph=True): a second derivative was asked for
        raise RuntimeError(f"{op}: double backward (create_graph=True) is not implemented by the "
                           "fused kernels; use backend='torch' for higher-order gradients")


def _qfl_sum_setup_context(ctx, inputs, output):
    logits, labels, scores, weight, divisor, beta, scale = inputs
    ctx.save_for_backward(logits, labels, scores, weight, divisor)
    ctx.beta, ctx.scale = beta, scale


def _qfl_sum_backward_formula(ctx, grad_out):
    if not ctx.needs_input_grad[0]:
        return None, None, None, None, None, None, None
    _no_double_backward("quality_focal_loss")
    logits, labels, scores, weight, divisor = ctx.saved_tensors
    grad = torch.ops.rtmdet.qfl_triton_sum_backward(grad_out, logits, labels, scores, weight,
                                                     divisor, ctx.beta, ctx.scale)
    return grad, None, None, None, None, None, None


qfl_triton_sum.register_autograd(_qfl_sum_backward_formula, setup_context=_qfl_sum_setup_context)


class _QFLSumEager(torch.autograd.Function):
    """The same computation as rtmdet::qfl_triton_sum for eager calls: launches the kernels
    directly, skipping the custom-op dispatch (tens of microseconds a call on the host, where
    the eager loss is host-bound)."""

    @staticmethod
    def forward(ctx, logits, labels, scores, weight, divisor, beta, scale):
        ctx.save_for_backward(logits, labels, scores, weight, divisor)
        ctx.beta, ctx.scale = beta, scale
        return _qfl_sum_launch(_qfl_sum_kernel, logits, labels, scores, weight, divisor, beta,
                               scale, None)

    @staticmethod
    def backward(ctx, grad_out):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None, None
        _no_double_backward("quality_focal_loss")
        logits, labels, scores, weight, divisor = ctx.saved_tensors
        grad = _qfl_sum_launch(_qfl_sum_kernel, logits, labels, scores, weight, divisor,
                               ctx.beta, ctx.scale, grad_out.contiguous())
        return grad, None, None, None, None, None, None


def eager_launch_ok(*tensors):
    """True where kernels may be launched directly (a plain eager call on real tensors), False
    where the registered op must be used: torch.compile tracing, fake/meta tensors, dispatch
    modes (make_fx, FakeTensorMode, opcheck's)."""
    if torch.compiler.is_compiling() or _current_dispatch_mode() is not None:
        return False
    for t in tensors:
        if t is not None and (t.is_meta or isinstance(t, _FakeTensor)):
            return False
    return True


def quality_focal_loss_triton_sum(logits, labels, scores, weight=None, divisor=None, beta=2.0,
                                  scale=1.0):
    """0-d float32 scale / divisor * sum_m weight[m] * QFL_m, differentiable w.r.t. logits
    (one forward and one backward kernel). logits (M, C) fp32/fp16/bf16, labels (M,) int
    (outside [0, C) = background), scores (M,), weight (M,) or None, divisor 0-d or None."""
    if logits.stride(1) != 1 and logits.shape[1] > 1:
        logits = logits.contiguous()
    if torch.is_grad_enabled() and scores.requires_grad:
        raise RuntimeError("quality_focal_loss (triton) gives no gradient for scores; detach "
                           "them (they are targets) or use backend='torch'")
    if divisor is not None:
        divisor = divisor.detach()
    if eager_launch_ok(logits, labels, scores, weight, divisor):
        return _QFLSumEager.apply(logits, labels, scores, weight, divisor, float(beta),
                                  float(scale))
    return torch.ops.rtmdet.qfl_triton_sum(logits, labels, scores, weight, divisor, float(beta),
                                           float(scale))
