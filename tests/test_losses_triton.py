"""Fused Triton QFL and GIoU kernels (kernels/qfl.py, kernels/giou.py) against the references.

CPU tests run the kernels under the Triton interpreter (conftest sets TRITON_INTERPRET=1)
with small M; `gpu` tests use the realistic size M = 64 x 8400 and torch.compile.
"""
import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from rtmdet import ops  # noqa: E402
from rtmdet.kernels import giou as giou_mod  # noqa: E402
from rtmdet.kernels import qfl as qfl_mod  # noqa: E402
from rtmdet.kernels.giou import giou_loss_triton  # noqa: E402
from rtmdet.kernels.qfl import quality_focal_loss_triton  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # interpreter log2(0) etc.

LOW = (torch.float16, torch.bfloat16)


def qfl_inputs(M, C, seed, dtype=torch.float32, label_dtype=torch.int64, device="cpu",
               pos_frac=0.3, scale=4.0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(M, C, generator=g) * scale).to(device=device, dtype=dtype)
    labels = torch.randint(0, max(C, 1), (M,), generator=g)
    background = torch.rand(M, generator=g) > pos_frac
    # background as C, -1 and far outside [0, C): all must count as background
    labels[background] = torch.tensor([C, -1, C + 7])[torch.randint(0, 3, (int(background.sum()),),
                                                                    generator=g)]
    scores = torch.rand(M, generator=g)
    scores[labels == C] = 0.0
    return logits, labels.to(device=device, dtype=label_dtype), scores.to(device)


def grads(fn, x, *args, grad_out=None, **kwargs):
    x = x.detach().requires_grad_()
    y = fn(x, *args, **kwargs)
    g, = torch.autograd.grad(y, x, torch.ones_like(y) if grad_out is None else grad_out)
    return y.detach(), g


class LaunchSpy:
    """Replaces `wrap_triton` in a kernel module to record the tensors each launch receives."""

    def __init__(self, real):
        self.real, self.calls = real, []

    def __call__(self, kernel):
        launcher = self.real(kernel)

        class _Grid:
            def __getitem__(_, grid):
                def run(*args, **kwargs):
                    self.calls.append((kernel, args, kwargs))
                    return launcher[grid](*args, **kwargs)
                return run
        return _Grid()


# ----------------------------------------------------------------------------------------
# QFL
# ----------------------------------------------------------------------------------------

QFL_SHAPES = [(37, 11, 0), (5, 80, 1), (64, 1, 2), (19, 130, 3), (7, 144, 4),  # 144: 9 blocks
              (400, 11, 7)]  # 4400 elements: backward blocks starting mid-row


@pytest.mark.parametrize("M,C,seed", QFL_SHAPES)
@pytest.mark.parametrize("beta", [2.0, 1.5])
def test_qfl_fp32_matches_reference(M, C, seed, beta, device="cpu"):
    logits, labels, scores = qfl_inputs(M, C, seed, device=device)
    w = torch.rand(M, generator=torch.Generator().manual_seed(seed + 100)).to(device)
    got, g_got = grads(quality_focal_loss_triton, logits, labels, scores, beta, grad_out=w)
    want, g_want = grads(ops.quality_focal_loss_ref, logits, labels, scores, beta, grad_out=w)
    assert got.dtype == torch.float32 and got.shape == (M,)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_got, g_want, rtol=1e-5, atol=1e-5)


def test_qfl_extreme_logits_are_finite_and_match():
    x = torch.tensor([[-120.0, -30.0, -1e-3, 0.0, 1e-3, 30.0, 120.0]]).repeat(3, 1)
    labels = torch.tensor([0, 6, 7])
    scores = torch.tensor([1.0, 0.0, 0.0])
    got, g_got = grads(quality_focal_loss_triton, x, labels, scores)
    want, g_want = grads(ops.quality_focal_loss_ref, x, labels, scores)
    assert torch.isfinite(got).all() and torch.isfinite(g_got).all()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_got, g_want, rtol=1e-5, atol=1e-5)


def test_qfl_hand_computed():
    log2 = math.log(2.0)
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    sp = lambda v: math.log1p(math.exp(v))  # noqa: E731
    x = torch.tensor([[0.0, 0.0], [0.0, 0.0], [2.0, -1.0]])
    labels = torch.tensor([0, 1, 2])  # row 2 is background (label C)
    scores = torch.tensor([0.5, 1.0, 0.0])
    loss, g = grads(quality_focal_loss_triton, x, labels, scores)
    # row 0: negative class 1 gives log2 * 0.5^2; the positive has |0.5 - 0.5|^2 = 0
    # row 1: negative class 0 gives log2/4; positive BCE(0, 1) = log2 times |1 - 0.5|^2
    # row 2: two negatives sp(x) sigmoid(x)^2
    want = [log2 / 4, log2 / 4 + log2 / 4, sp(2.0) * sig(2.0) ** 2 + sp(-1.0) * sig(-1.0) ** 2]
    torch.testing.assert_close(loss, torch.tensor(want), rtol=1e-6, atol=1e-7)
    neg0 = 0.25 * (0.5 + 2 * 0.5 * log2)  # s^2 (s + 2 (1 - s) sp) at x = 0
    # positive, t = 1, x = 0: d = -1/2; d^3 + 2 bce s (1 - s) d = -1/8 - log2/4
    pos1 = -0.125 - log2 / 4
    neg = lambda v: sig(v) ** 2 * (sig(v) + 2 * (1 - sig(v)) * sp(v))  # noqa: E731
    want_g = [[0.0, neg0], [neg0, pos1], [neg(2.0), neg(-1.0)]]
    torch.testing.assert_close(g, torch.tensor(want_g), rtol=1e-6, atol=1e-7)


def qfl_exact(x, labels, scores, beta=2.0):
    """QFL in float64 throughout (the reference computes in float32, whose BCE loses the
    low bits of softplus(x) for very negative x)."""
    x = x.double()
    C = x.shape[1]
    s, sp, t = x.sigmoid(), F.softplus(x), scores.double()[:, None]
    cols = torch.arange(C, device=x.device)[None, :]
    own = (cols == labels.long()[:, None]) & (labels[:, None] >= 0)
    return torch.where(own, (sp - t * x) * (t - s).abs().pow(beta), sp * s.pow(beta)).sum(1)


def qfl_same_dtype(x, labels, scores, beta=2.0):
    """The reference's maths in the logits' own dtype: what PyTorch gives without upcasting."""
    C = x.shape[1]
    s, t = x.sigmoid(), scores.to(x.dtype)[:, None].expand_as(x)
    cols = torch.arange(C, device=x.device)[None, :]
    own = (cols == labels.long()[:, None]) & (labels[:, None] >= 0)
    neg = F.binary_cross_entropy_with_logits(x, torch.zeros_like(x), reduction="none") * s.pow(beta)
    pos = F.binary_cross_entropy_with_logits(x, t, reduction="none") * (t - s).abs().pow(beta)
    return torch.where(own, pos, neg).sum(1)


def ulp_error(got, exact, dtype):
    """max |got - exact| in units of the last place of exact rounded to dtype."""
    rounded = exact.to(dtype)
    up = torch.nextafter(rounded.abs(), torch.tensor(float("inf"), dtype=dtype, device=rounded.device)).double()
    ulp = (up - rounded.abs().double()).clamp_min(torch.finfo(dtype).smallest_normal
                                                  * torch.finfo(dtype).eps)
    return ((got.double() - exact).abs() / ulp).max().item()


@pytest.mark.parametrize("dtype", LOW)
def test_qfl_low_precision_error_within_torch_error(dtype):
    logits, labels, scores = qfl_inputs(50, 80, 4, dtype=dtype)
    w = torch.rand(50, generator=torch.Generator().manual_seed(4))
    got, g_got = grads(quality_focal_loss_triton, logits, labels, scores, grad_out=w)
    ref, g_ref = grads(ops.quality_focal_loss_ref, logits, labels, scores, grad_out=w)
    same, g_same = grads(qfl_same_dtype, logits, labels, scores, grad_out=w.to(dtype))
    exact, g_exact = grads(qfl_exact, logits.double(), labels, scores, grad_out=w.double())
    assert got.dtype == torch.float32 and g_got.dtype == dtype
    # the loss: fp32 arithmetic on the same (rounded) inputs, like the upcasting reference
    err = lambda a, b: (a.double() - b).abs().max().item()  # noqa: E731
    assert err(got, exact) <= 2 * err(ref, exact) + 1e-6
    assert err(got, exact) <= 2 * err(same, exact)
    # the gradient is rounded to the dtype twice (saved, then scaled): about 1 ulp where the
    # upcasting reference has 1/2 (the interpreter truncates to bf16: 2 ulps there); PyTorch
    # in the same dtype is far worse
    assert err(g_got, g_exact) <= 2 * err(g_same, g_exact)
    assert ulp_error(g_got, g_exact, dtype) <= (3.0 if dtype == torch.bfloat16 else 1.5)


def test_qfl_label_and_score_dtypes():
    logits, labels, scores = qfl_inputs(33, 7, 5)
    want = ops.quality_focal_loss_ref(logits, labels, scores)
    for lab in (labels.int(), labels.long()):
        for sc in (scores, scores.half(), scores.bfloat16()):
            got = quality_focal_loss_triton(logits, lab, sc)
            ref = ops.quality_focal_loss_ref(logits, lab, sc)
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(quality_focal_loss_triton(logits, labels.int(), scores), want,
                               rtol=1e-5, atol=1e-5)


def test_qfl_empty():
    for M, C in ((0, 80), (6, 0)):
        x = torch.zeros(M, C, requires_grad=True)
        loss = quality_focal_loss_triton(x, torch.zeros(M, dtype=torch.long), torch.zeros(M))
        assert loss.shape == (M,) and (loss == 0).all()
        loss.sum().backward()
        assert x.grad.shape == (M, C)
        assert ops.quality_focal_loss(x, torch.zeros(M, dtype=torch.long), torch.zeros(M),
                                      backend="triton").item() == 0.0


def test_qfl_view_of_bnc_is_read_in_place(monkeypatch):
    B, N, C = 3, 11, 9
    wide, dense = torch.randn(B, N, C + 5), torch.randn(B, N, C)
    # (M, C) views of (B, N, C) tensors: row stride C + 5 (a column slice), and C
    for base, x in ((wide, wide[..., :C].flatten(0, 1)), (dense, dense.view(-1, C))):
        assert x.data_ptr() == base.data_ptr() and x.stride(1) == 1
        _, labels, scores = qfl_inputs(B * N, C, 6)
        spy = LaunchSpy(qfl_mod.wrap_triton)
        monkeypatch.setattr(qfl_mod, "wrap_triton", spy)
        x = x.detach().requires_grad_()
        got = quality_focal_loss_triton(x, labels, scores)
        g_got, = torch.autograd.grad(got.sum(), x)
        monkeypatch.undo()
        kernel, args, _ = spy.calls[0]
        assert kernel is qfl_mod._qfl_fwd_kernel
        assert args[0].data_ptr() == base.data_ptr() and args[0].stride() == x.stride()
        assert args[4].shape == (B * N, C)  # the forward also wrote the gradient
        want, g_want = grads(ops.quality_focal_loss_ref, x, labels, scores)
        torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(g_got, g_want, rtol=1e-5, atol=1e-5)


def test_qfl_column_strided_logits_are_copied():
    logits, labels, scores = qfl_inputs(21, 6, 7)
    xt = logits.t().contiguous().t()  # stride (1, 21)
    got, g_got = grads(quality_focal_loss_triton, xt, labels, scores)
    want, g_want = grads(ops.quality_focal_loss_ref, logits, labels, scores)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_got, g_want, rtol=1e-5, atol=1e-5)
    # strided labels and scores are read through their strides
    lab2 = torch.stack([labels, labels], 1)[:, 0]
    sc2 = torch.stack([scores, scores], 1)[:, 1]
    torch.testing.assert_close(quality_focal_loss_triton(logits, lab2, sc2), want,
                               rtol=1e-5, atol=1e-5)


def test_qfl_skips_gradient_when_not_needed(monkeypatch):
    logits, labels, scores = qfl_inputs(9, 5, 8)
    spy = LaunchSpy(qfl_mod.wrap_triton)
    monkeypatch.setattr(qfl_mod, "wrap_triton", spy)
    quality_focal_loss_triton(logits, labels, scores)  # requires_grad False
    with torch.no_grad():
        quality_focal_loss_triton(logits.requires_grad_(), labels, scores)
    assert len(spy.calls) == 2
    for _, args, kwargs in spy.calls:
        assert args[4].numel() == 0 and kwargs["WRITE_GRAD"] is False


def test_qfl_backward_is_repeatable_and_rejects_score_grad():
    logits, labels, scores = qfl_inputs(12, 4, 9)
    x = logits.requires_grad_()
    loss = quality_focal_loss_triton(x, labels, scores).sum()
    g1, = torch.autograd.grad(loss, x, retain_graph=True)
    g2, = torch.autograd.grad(loss, x)
    assert torch.equal(g1, g2)  # the saved gradient is never scaled in place
    with pytest.raises(RuntimeError, match="scores"):
        quality_focal_loss_triton(x, labels, scores.clone().requires_grad_())
    with pytest.raises(ValueError, match="beta"):
        quality_focal_loss_triton(x, labels, scores, beta=0.0)


@pytest.mark.parametrize("reduction,avg_factor", [("none", None), ("sum", None), ("mean", None),
                                                  ("mean", 7.5)])
def test_qfl_public_op_reductions(reduction, avg_factor):
    logits, labels, scores = qfl_inputs(40, 13, 10)
    labels = labels.clamp(max=13)  # the public op accepts -1 and C as background, nothing else
    weight = torch.rand(40)
    kw = dict(weight=weight, reduction=reduction, avg_factor=avg_factor)
    got, g_got = grads(ops.quality_focal_loss, logits, labels, scores, backend="triton", **kw)
    want, g_want = grads(ops.quality_focal_loss, logits, labels, scores, backend="torch", **kw)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_got, g_want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------
# GIoU
# ----------------------------------------------------------------------------------------

def degenerate_boxes():
    """(pred, target) (K, 4) pairs: every degenerate case plus exact coordinate ties."""
    t = [0.0, 0.0, 10.0, 10.0]
    cases = [
        ([0.0, 0.0, 10.0, 10.0], t),    # identical: every min/max is a tie
        ([5.0, 5.0, 5.0, 5.0], t),      # zero-area point inside
        ([3.0, 2.0, 3.0, 8.0], t),      # zero-width line inside
        ([20.0, 20.0, 30.0, 30.0], t),  # disjoint
        ([10.0, 0.0, 20.0, 10.0], t),   # touching edge: w = 0 exactly
        ([2.0, 2.0, 8.0, 8.0], t),      # nested inside
        ([-5.0, -5.0, 15.0, 15.0], t),  # nested around
        ([8.0, 8.0, 2.0, 2.0], t),      # inverted
        ([12.0, 3.0, 4.0, 9.0], t),     # inverted in x only
        ([0.0, 0.0, 10.0, 5.0], t),     # shares three coordinates
        ([0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]),  # both empty: union and enclose at eps
        ([1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]),
        ([0.0, 0.0, 1e-4, 1e-4], [0.0, 0.0, 1e-4, 1e-4]),  # tiny: union < eps
        ([-3.0, 4.0, 6.0, 4.0], t),     # zero height across
    ]
    pred = torch.tensor([c[0] for c in cases], dtype=torch.float64)
    target = torch.tensor([c[1] for c in cases], dtype=torch.float64)
    return pred, target


def random_boxes(M, seed, inverted_frac=0.1):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(M, 2, 2, generator=g) * 100
    wh = torch.rand(M, 2, 2, generator=g) * 40
    boxes = torch.cat([xy, xy + wh], -1)  # (M, 2, 4)
    pred, target = boxes[:, 0].double(), boxes[:, 1].double()
    flip = torch.rand(M, generator=g) < inverted_frac
    pred[flip] = pred[flip][:, [2, 3, 0, 1]]
    return pred, target


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_giou_degenerate_boxes_match_autograd_of_reference(dtype):
    pred, target = degenerate_boxes()
    pred, target = pred.to(dtype), target.to(dtype)
    w = torch.linspace(0.5, 2.0, len(pred), dtype=dtype)
    got, g_got = grads(giou_loss_triton, pred, target, grad_out=w)
    want, g_want = grads(ops.giou_loss_ref, pred, target, grad_out=w)
    assert torch.isfinite(got).all() and torch.isfinite(g_got).all()
    assert got.dtype == dtype and g_got.dtype == dtype
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(got, want, **tol)
    # ties included: the 1/2 splits of min/max and clamp's x >= min are PyTorch's
    torch.testing.assert_close(g_got, g_want, **tol)


@pytest.mark.parametrize("seed", [0, 1])
def test_giou_random_boxes_match_reference(seed):
    pred, target = random_boxes(300, seed)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 2e-5)):
        got, g_got = grads(giou_loss_triton, pred.to(dtype), target.to(dtype))
        want, g_want = grads(ops.giou_loss_ref, pred.to(dtype), target.to(dtype))
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
        torch.testing.assert_close(g_got, g_want, rtol=tol, atol=tol)


def test_giou_hand_computed():
    pred = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0], [1.0, 1.0, 3.0, 3.0]])
    target = torch.tensor([[1.0, 1.0, 3.0, 3.0], [2.0, 2.0, 3.0, 3.0], [1.0, 1.0, 3.0, 3.0]])
    loss = giou_loss_triton(pred, target)
    # overlap: inter 1, union 7, enclose 9; disjoint: iou 0, union 2, enclose 9; identical: 0
    want = torch.tensor([1 - (1 / 7 - 2 / 9), 1 - (0 - 7 / 9), 0.0])
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", LOW)
def test_giou_low_precision_error_within_torch_error(dtype):
    pred, target = random_boxes(400, 3, inverted_frac=0.0)
    got, g_got = grads(giou_loss_triton, pred.to(dtype), target.to(dtype))
    # PyTorch's own error in this dtype (giou_loss_ref itself computes in float32)
    same_dtype = lambda p, t: 1 - ops.box_iou(p, t, mode="giou", aligned=True)  # noqa: E731
    torch_same, g_torch = grads(same_dtype, pred.to(dtype), target.to(dtype))
    exact, g_exact = grads(ops.giou_loss_ref, pred.to(dtype).double(), target.to(dtype).double())
    assert got.dtype == dtype and g_got.dtype == dtype
    for mine, theirs, ref in ((got, torch_same, exact), (g_got, g_torch, g_exact)):
        err = (mine.double() - ref).abs().max()
        torch_err = (theirs.double() - ref).abs().max()
        assert err <= 2 * torch_err + 1e-6, (err, torch_err)


def test_giou_empty_and_strided_inputs():
    p = torch.zeros(0, 4, requires_grad=True)
    loss = giou_loss_triton(p, torch.zeros(0, 4))
    assert loss.shape == (0,)
    loss.sum().backward()
    assert p.grad.shape == (0, 4)
    pred, target = random_boxes(50, 4)
    wide = torch.zeros(50, 8, dtype=torch.float64)
    wide[:, ::2] = pred  # column stride 2
    target_t = target.t().contiguous().t()  # column stride 50
    got, g_got = grads(giou_loss_triton, wide[:, ::2], target_t)
    want, g_want = grads(ops.giou_loss_ref, pred, target)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_got, g_want, rtol=1e-12, atol=1e-12)


def test_giou_skips_gradient_and_rejects_target_grad(monkeypatch):
    pred, target = random_boxes(10, 5)
    spy = LaunchSpy(giou_mod.wrap_triton)
    monkeypatch.setattr(giou_mod, "wrap_triton", spy)
    giou_loss_triton(pred, target)
    assert spy.calls[0][1][3].numel() == 0 and spy.calls[0][2]["WRITE_GRAD"] is False
    monkeypatch.undo()
    with pytest.raises(RuntimeError, match="target"):
        giou_loss_triton(pred.requires_grad_(), target.clone().requires_grad_())


@pytest.mark.parametrize("reduction,avg_factor,per_coord", [
    ("none", None, False), ("sum", None, True), ("mean", None, False), ("mean", 3.0, True)])
def test_giou_public_op_reductions(reduction, avg_factor, per_coord):
    pred, target = random_boxes(30, 6)
    weight = torch.rand(30, 4 if per_coord else 1, dtype=torch.float64).squeeze(1)
    kw = dict(weight=weight, reduction=reduction, avg_factor=avg_factor)
    got, g_got = grads(ops.giou_loss, pred, target, backend="triton", **kw)
    want, g_want = grads(ops.giou_loss, pred, target, backend="torch", **kw)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_got, g_want, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------
# GPU: realistic sizes, memory, opcheck, torch.compile
# ----------------------------------------------------------------------------------------

def _realistic_qfl(dtype, seed=0):
    """64 x 8400 priors, 80 classes, ~1% positives with IoU targets in (0, 1]."""
    B, N, C = 64, 8400, 80
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = (torch.randn(B, N, C, device="cuda", generator=g) * 3 - 4).to(dtype)
    labels = torch.full((B * N,), C, device="cuda", dtype=torch.long)
    pos = torch.rand(B * N, device="cuda", generator=g) < 0.01
    labels[pos] = torch.randint(0, C, (int(pos.sum()),), device="cuda", generator=g)
    scores = torch.where(pos, 1 - torch.rand(B * N, device="cuda", generator=g), 0.0)
    return x, labels, scores


@pytest.mark.gpu
def test_gpu_qfl_shapes_and_beta():
    """The CPU cases on the GPU, where the kernel uses hardware exp2/log2/rcp."""
    for M, C, seed in QFL_SHAPES + [(3000, 80, 5), (257, 2000, 6)]:
        for beta in (2.0, 1.5):
            test_qfl_fp32_matches_reference(M, C, seed, beta, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_qfl_realistic(dtype):
    x, labels, scores = _realistic_qfl(dtype)
    M, C = labels.numel(), x.shape[-1]
    w = torch.rand(M, device="cuda") / 100
    xv = x.view(-1, C)
    got, g_got = grads(quality_focal_loss_triton, xv, labels, scores, grad_out=w)
    want, g_want = grads(ops.quality_focal_loss_ref, xv, labels, scores, grad_out=w)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if dtype == torch.float32:
        torch.testing.assert_close(g_got, g_want, rtol=1e-5, atol=1e-7)
    else:
        # the kernel rounds to bf16 twice (saved gradient, then scaled), the reference once
        torch.testing.assert_close(g_got, g_want, rtol=2 ** -7, atol=1e-7)
        _, g_exact = grads(qfl_exact, xv.double(), labels, scores, grad_out=w.double())
        _, g_same = grads(qfl_same_dtype, xv[:65536], labels[:65536], scores[:65536],
                          grad_out=w[:65536].to(dtype))
        err = (g_got[:65536].double() - g_exact[:65536]).abs().max()
        assert err <= 2 * (g_same.double() - g_exact[:65536]).abs().max()
        assert ulp_error(g_got, g_exact, dtype) <= 2.0


@pytest.mark.gpu
def test_gpu_qfl_view_uses_one_logits_sized_buffer():
    x, labels, scores = _realistic_qfl(torch.float32, seed=1)
    leaf = x.requires_grad_()
    xv = leaf.view(-1, x.shape[-1])
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = quality_focal_loss_triton(xv, labels, scores)
    fwd_peak = torch.cuda.max_memory_allocated() - base
    assert xv.data_ptr() == leaf.data_ptr()
    # the saved gradient (M, C) and the (M,) loss, nothing logits-sized besides
    assert fwd_peak <= x.numel() * x.element_size() + 8 * labels.numel() + (1 << 20)
    loss.sum().backward()
    assert leaf.grad.shape == x.shape


@pytest.mark.gpu
def test_gpu_opcheck():
    x, labels, scores = qfl_inputs(300, 80, 0, device="cuda")
    x.requires_grad_()
    torch.library.opcheck(qfl_mod.qfl_triton_fwd, (x, labels, scores, 2.0, True))
    torch.library.opcheck(qfl_mod.qfl_triton_fwd, (x.detach(), labels, scores, 2.0, False))
    torch.library.opcheck(qfl_mod.qfl_triton_scale_rows,
                          (torch.rand(300, device="cuda"), torch.rand(300, 80, device="cuda")))
    pred, target = random_boxes(100, 0)
    pred = pred.float().cuda().requires_grad_()
    torch.library.opcheck(giou_mod.giou_loss_triton_fwd, (pred, target.float().cuda(), 1e-6, True))


@pytest.mark.gpu
def test_gpu_torch_compile_fullgraph():
    torch._dynamo.reset()
    reduce_loss = ops.losses.reduce_loss
    x, labels, scores = qfl_inputs(2000, 80, 1, device="cuda")
    pred, target = random_boxes(640, 1)
    pred, target = pred.float().cuda(), target.float().cuda()
    weight = torch.rand(2000, device="cuda")

    def step(x, labels, scores, pred, target, qfl, giou):
        cls = reduce_loss(qfl(x, labels, scores, 2.0), weight, "mean", 37.0)
        return cls + reduce_loss(giou(pred, target, 1e-6), None, "sum", None)

    def run(fn, qfl, giou):
        xs, ps = x.clone().requires_grad_(), pred.clone().requires_grad_()
        loss = fn(xs, labels, scores, ps, target, qfl, giou)
        loss.backward()
        return loss.detach(), xs.grad, ps.grad

    got = run(torch.compile(step, fullgraph=True), quality_focal_loss_triton, giou_loss_triton)
    want = run(step, ops.quality_focal_loss_ref, ops.giou_loss_ref)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    # the public ops compile too (graph breaks allowed around the argument checks)
    public = torch.compile(lambda x: ops.quality_focal_loss(x, labels, scores, weight=weight,
                                                            avg_factor=37.0, backend="triton"))
    xs = x.clone().requires_grad_()
    public(xs).backward()
    torch.testing.assert_close(xs.grad, want[1], rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
def test_gpu_giou_realistic():
    pred, target = random_boxes(6400, 2)
    for dtype, tol in ((torch.float32, 2e-5), (torch.float64, 1e-12)):
        p, t = pred.to("cuda", dtype), target.to("cuda", dtype)
        got, g_got = grads(giou_loss_triton, p, t)
        want, g_want = grads(ops.giou_loss_ref, p, t)
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
        torch.testing.assert_close(g_got, g_want, rtol=tol, atol=tol)
    p, t = degenerate_boxes()
    got, g_got = grads(giou_loss_triton, p.cuda(), t.cuda())
    want, g_want = grads(ops.giou_loss_ref, p.cuda(), t.cuda())
    torch.testing.assert_close(g_got, g_want, rtol=1e-12, atol=1e-12)
