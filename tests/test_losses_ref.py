"""Quality Focal Loss and GIoU loss (SPEC section 3): hand-computed values, reductions,
low-precision logits, float64 gradcheck, degenerate boxes, empty inputs."""
import math

import pytest
import torch

from rtmdet import ops
from tests.oracle import giou_loss_oracle, qfl_oracle

EPS32 = torch.finfo(torch.float32).eps


def _sigmoid(x):
    return 1 / (1 + math.exp(-x))


def _qfl_by_hand():
    """Two rows, C = 2: row 0 positive at class 1 with IoU 0.8; row 1 background (label 2)."""
    s = _sigmoid(0.5)
    row0 = math.log(1 + math.exp(0.5)) * s ** 2                       # class 0: BCE(0.5, 0) * s^2
    s = _sigmoid(-1.0)
    row0 += -(0.8 * math.log(s) + 0.2 * math.log(1 - s)) * (0.8 - s) ** 2  # class 1: BCE(-1, 0.8)
    row1 = math.log(1 + math.exp(2.0)) * _sigmoid(2.0) ** 2 + math.log(1 + math.exp(-0.3)) * _sigmoid(-0.3) ** 2
    logits = torch.tensor([[0.5, -1.0], [2.0, -0.3]])
    return logits, torch.tensor([1, 2]), torch.tensor([0.8, 0.0]), [row0, row1]


def test_qfl_by_hand():
    logits, labels, scores, want = _qfl_by_hand()

    def fn(*args, **kwargs):
        return ops.quality_focal_loss(*args, **kwargs, backend="torch")

    none = fn(logits, labels, scores, reduction="none")
    assert none.dtype == torch.float32 and none.shape == (2,)
    assert none.tolist() == pytest.approx(want, rel=1e-6)
    assert float(fn(logits, labels, scores, reduction="sum")) == pytest.approx(sum(want), rel=1e-6)
    assert float(fn(logits, labels, scores)) == pytest.approx(sum(want) / 2, rel=1e-6)
    assert float(fn(logits, labels, scores, avg_factor=3.0)) == pytest.approx(
        sum(want) / (3.0 + EPS32), rel=1e-6)
    w = torch.tensor([0.25, 2.0])
    assert fn(logits, labels, scores, weight=w, reduction="none").tolist() == pytest.approx(
        [want[0] * 0.25, want[1] * 2.0], rel=1e-6)
    assert float(fn(logits, labels, scores, weight=w, avg_factor=0.5)) == pytest.approx(
        (want[0] * 0.25 + want[1] * 2.0) / (0.5 + EPS32), rel=1e-6)
    # The reference itself, unreduced.
    assert ops.quality_focal_loss_ref(logits, labels, scores).tolist() == pytest.approx(want, rel=1e-6)


def test_qfl_background_labels_and_score_of_negatives_ignored():
    logits, _, _, _ = _qfl_by_hand()
    bg = ops.quality_focal_loss_ref(logits, torch.tensor([2, 2]), torch.tensor([0.7, 0.3]))
    minus = ops.quality_focal_loss_ref(logits, torch.tensor([-1, -1]), torch.tensor([0.0, 0.0]))
    assert torch.equal(bg, minus)   # scores only matter at a positive's own class
    row = [sum(math.log(1 + math.exp(x)) * _sigmoid(x) ** 2 for x in r) for r in logits.tolist()]
    assert bg.tolist() == pytest.approx(row, rel=1e-6)


@pytest.mark.parametrize("seed", [0, 1])
def test_qfl_matches_row_by_row_oracle(seed):
    gen = torch.Generator().manual_seed(seed)
    M, C = 37, 5
    logits = torch.randn(M, C, generator=gen) * 4
    labels = torch.randint(0, C + 1, (M,), generator=gen)
    scores = torch.rand(M, generator=gen)
    got = ops.quality_focal_loss_ref(logits, labels, scores)
    torch.testing.assert_close(got.double(), qfl_oracle(logits.double(), labels, scores.double()),
                               rtol=1e-5, atol=1e-6)
    # float64 logits are computed in float64.
    got64 = ops.quality_focal_loss_ref(logits.double(), labels, scores.double())
    torch.testing.assert_close(got64, qfl_oracle(logits.double(), labels, scores.double()),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype,rtol", [(torch.float16, 4e-3), (torch.bfloat16, 3e-2)])
def test_qfl_low_precision_logits_give_float32_loss(dtype, rtol):
    gen = torch.Generator().manual_seed(3)
    M, C = 64, 80
    logits = torch.randn(M, C, generator=gen) * 2 - 2
    labels = torch.randint(0, C + 1, (M,), generator=gen)
    scores = torch.rand(M, generator=gen)
    low = ops.quality_focal_loss(logits.to(dtype), labels, scores, reduction="none", backend="torch")
    assert low.dtype == torch.float32
    # Exactly the float32 computation on the rounded logits, and close to the unrounded one.
    torch.testing.assert_close(low, ops.quality_focal_loss_ref(logits.to(dtype).float(), labels, scores),
                               rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(low, ops.quality_focal_loss_ref(logits, labels, scores), rtol=rtol, atol=1e-4)


def test_qfl_gradcheck_float64():
    gen = torch.Generator().manual_seed(4)
    M, C = 6, 3
    logits = (torch.randn(M, C, generator=gen, dtype=torch.float64) * 3).requires_grad_()
    labels = torch.tensor([0, 1, 2, 3, 1, 3])
    scores = torch.rand(M, generator=gen, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: ops.quality_focal_loss_ref(x, labels, scores), (logits,))
    weight = torch.rand(M, generator=gen, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda x: ops.quality_focal_loss(x, labels, scores, weight=weight, avg_factor=2.5, backend="torch"),
        (logits,))


def test_giou_loss_by_hand():
    pred = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0], [1.0, 2.0, 5.0, 7.0], [0.0, 0.0, 4.0, 4.0]])
    target = torch.tensor([[1.0, 1.0, 3.0, 3.0], [2.0, 2.0, 3.0, 3.0], [1.0, 2.0, 5.0, 7.0], [1.0, 1.0, 2.0, 2.0]])
    want = [1 - (1 / 7 - 2 / 9), 1 + 7 / 9, 0.0, 1 - 1 / 16]
    got = ops.giou_loss(pred, target, reduction="none", backend="torch")
    assert got.shape == (4,) and got.tolist() == pytest.approx(want, abs=1e-6)
    assert ops.giou_loss_ref(pred, target).tolist() == pytest.approx(want, abs=1e-6)
    assert float(ops.giou_loss(pred, target, reduction="sum", backend="torch")) == pytest.approx(sum(want), rel=1e-6)
    assert float(ops.giou_loss(pred, target, backend="torch")) == pytest.approx(sum(want) / 4, rel=1e-6)
    w = torch.tensor([1.0, 0.5, 2.0, 0.0])
    weighted = sum(a * b for a, b in zip(want, w.tolist()))
    assert float(ops.giou_loss(pred, target, weight=w, reduction="sum", backend="torch")) == \
        pytest.approx(weighted, rel=1e-6)
    assert float(ops.giou_loss(pred, target, weight=w, avg_factor=7.0, backend="torch")) == \
        pytest.approx(weighted / (7.0 + EPS32), rel=1e-6)
    # mmdet also takes per-coordinate box weights (M, 4): their mean per row.
    assert float(ops.giou_loss(pred, target, weight=w[:, None].repeat(1, 4), reduction="sum",
                               backend="torch")) == pytest.approx(weighted, rel=1e-6)


def test_giou_loss_matches_oracle():
    gen = torch.Generator().manual_seed(5)
    xy = torch.rand(50, 2, 2, generator=gen, dtype=torch.float64) * 40
    wh = torch.rand(50, 2, 2, generator=gen, dtype=torch.float64) * 20
    pred, target = torch.cat([xy[:, 0], xy[:, 0] + wh[:, 0]], 1), torch.cat([xy[:, 1], xy[:, 1] + wh[:, 1]], 1)
    torch.testing.assert_close(ops.giou_loss_ref(pred, target), giou_loss_oracle(pred, target),
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ops.giou_loss_ref(pred.float(), target.float()).double(),
                               giou_loss_oracle(pred, target), rtol=1e-5, atol=1e-6)


def test_giou_loss_gradcheck_float64():
    # Generic boxes plus disjoint and nested pairs (differentiable: no coordinates tie).
    gen = torch.Generator().manual_seed(6)
    xy = torch.rand(8, 2, generator=gen, dtype=torch.float64) * 10
    pred = torch.cat([xy, xy + 1 + torch.rand(8, 2, generator=gen, dtype=torch.float64) * 5], 1)
    target = pred + torch.randn(8, 4, generator=gen, dtype=torch.float64)
    pred = torch.cat([pred, torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 4.0, 4.0]], dtype=torch.float64)])
    target = torch.cat([target, torch.tensor([[2.0, 3.0, 3.5, 4.5], [1.0, 1.5, 2.0, 2.5]], dtype=torch.float64)])
    target = torch.stack([torch.minimum(target[:, 0], target[:, 2]), torch.minimum(target[:, 1], target[:, 3]),
                          torch.maximum(target[:, 0], target[:, 2]), torch.maximum(target[:, 1], target[:, 3])], 1)
    pred.requires_grad_()
    assert torch.autograd.gradcheck(lambda p: ops.giou_loss_ref(p, target), (pred,))
    weight = torch.rand(10, generator=gen, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda p: ops.giou_loss(p, target, weight=weight, avg_factor=3.0, backend="torch"), (pred,))


DEGENERATE = {  # pred, target
    "zero-area pred": ([2.0, 2.0, 2.0, 5.0], [0.0, 0.0, 4.0, 4.0]),
    "point pred": ([2.0, 2.0, 2.0, 2.0], [0.0, 0.0, 4.0, 4.0]),
    "both points": ([2.0, 2.0, 2.0, 2.0], [2.0, 2.0, 2.0, 2.0]),
    "zero-area target": ([0.0, 0.0, 4.0, 4.0], [1.0, 1.0, 1.0, 3.0]),
    "identical": ([1.0, 2.0, 5.0, 7.0], [1.0, 2.0, 5.0, 7.0]),
    "disjoint": ([0.0, 0.0, 1.0, 1.0], [5.0, 5.0, 6.0, 6.0]),
    "touching": ([0.0, 0.0, 1.0, 1.0], [1.0, 0.0, 2.0, 1.0]),
    "nested": ([1.0, 1.0, 2.0, 2.0], [0.0, 0.0, 4.0, 4.0]),
    "inverted pred": ([3.0, 3.0, 1.0, 1.0], [0.0, 0.0, 4.0, 4.0]),
    "inverted x only": ([3.0, 0.0, 1.0, 4.0], [0.0, 0.0, 4.0, 4.0]),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_giou_loss_degenerate_boxes_finite_values_and_grads(dtype):
    pred = torch.tensor([p for p, _ in DEGENERATE.values()], dtype=dtype, requires_grad=True)
    target = torch.tensor([t for _, t in DEGENERATE.values()], dtype=dtype)
    loss = ops.giou_loss(pred, target, reduction="none", backend="torch")
    assert bool(torch.isfinite(loss).all()), dict(zip(DEGENERATE, loss.tolist()))
    torch.testing.assert_close(loss.double(), giou_loss_oracle(pred.detach(), target), rtol=1e-5, atol=1e-6)
    assert float(loss.detach()[list(DEGENERATE).index("identical")]) == pytest.approx(0.0, abs=1e-6)
    loss.sum().backward()
    assert bool(torch.isfinite(pred.grad).all()), pred.grad


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_empty_inputs_give_zero(reduction):
    logits = torch.zeros(0, 4, requires_grad=True)
    labels = torch.zeros(0, dtype=torch.long)
    scores = torch.zeros(0)
    qfl = ops.quality_focal_loss(logits, labels, scores, reduction=reduction, backend="torch")
    assert qfl.shape == () and float(qfl.detach()) == 0.0
    qfl.backward()
    assert logits.grad.shape == (0, 4)
    boxes = torch.zeros(0, 4, requires_grad=True)
    giou = ops.giou_loss(boxes, torch.zeros(0, 4), reduction=reduction, backend="torch")
    assert giou.shape == () and float(giou.detach()) == 0.0
    assert ops.giou_loss(boxes, torch.zeros(0, 4), reduction="none", backend="torch").shape == (0,)
    assert ops.quality_focal_loss(logits, labels, scores, reduction="none", backend="torch").shape == (0,)
    assert float(ops.giou_loss(boxes.detach(), torch.zeros(0, 4), avg_factor=1.0, backend="torch")) == 0.0
