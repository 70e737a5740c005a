"""DETR match cost (SPEC section 4): `ops.detr_match_cost`, its reference and the Triton kernel.

- reference vs real mmdetection 3.3 (ClassificationCost / FocalLossCost + BBoxL1Cost('xywh')
  + IoUCost('giou'), summed as HungarianAssigner does, one image at a time, real gts only);
- reference vs a few values worked out by hand;
- Triton (TRITON_INTERPRET=1 on the CPU, small shapes and small blocks) vs the reference;
- input errors; GPU (@pytest.mark.gpu): DINO size, torch.compile(fullgraph=True), CUDA graphs.

Tolerances. The reference rounds as mmdet does (fp32 throughout), so against mmdet it is held to
1e-6 relative. The kernel's softmax sums in another order and its exp/log/pow come from other
libraries: 1e-5 relative. The focal term -log(1 - p + eps) is ill-conditioned where
p = sigmoid(x) is within a few ulps of 1 (x in ~[9, 17]): one ulp of p moves the cost by up to
~8 there, whichever library computes p. So the kernel is held, element by element, to what a
2-ulp change of the reference's fp32 p does to mmdet's formula (`_focal_slack`), plus 1e-5;
saturated logits (|x| >= 20, where p rounds to exactly 0 or 1 everywhere) get no slack.
fp16/bf16 inputs are upcast exactly and computed in fp32, so they share the fp32 tolerances.
The C++ kernel (auto's CPU path) does the reference's float32 operations in its order; only
libm's expf/logf (correctly rounded nearly always) and PyTorch's vectorised Sleef ones (<= 1 ulp)
round differently, and the softmax sum runs in another order (in double, rounded once). Measured
over ~500k costs: 98-99.9% bitwise equal, the rest within 2e-7 * (1 + |ref|), except where the
two round 1 + exp(-x) one ulp apart (p two of its ulps apart) inside the ill-conditioned focal
range; PyTorch itself does that between its vectorised body and its scalar tail (std::exp). So
it is held to 1e-6 * (1 + |ref|) (~8 ulps at |cost| ~ 1) plus the kernel's 2-ulp focal slack;
against mmdet to that plus the reference's own 1e-6.
"""
import math

import pytest
import torch

from rtmdet import ops
from rtmdet.ops import _backend
from rtmdet.ops.detr_cost import detr_match_cost_cpp, detr_match_cost_ref

try:
    from rtmdet.kernels import detr_cost as kernel
except ImportError:  # no triton here: the kernel tests are skipped
    kernel = None

needs_triton = pytest.mark.skipif(kernel is None, reason="triton is not importable")
HAS_CPP = "detr_match_cost" in _backend.native_ops()
needs_cpp = pytest.mark.skipif(not HAS_CPP, reason="rtmdet._C without detr_match_cost (rebuild)")
CPU_BACKENDS = ["torch", pytest.param("cpp", marks=needs_cpp)]
CPP_RTOL = 1e-6  # see the module docstring
# The kernel tests run under the interpreter on the CPU and on the GPU where there is one
# (conftest.py sets TRITON_INTERPRET only without CUDA); references always run on the CPU.
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# numpy under TRITON_INTERPRET: exp(-x) overflows to inf for x << 0 (p = 0, as intended) and
# log2(0), 0 * -inf are the pow(0, gamma) cases that the kernel resolves explicitly
pytestmark = [pytest.mark.filterwarnings("ignore:overflow encountered in exp"),
              pytest.mark.filterwarnings("ignore:divide by zero encountered in log2"),
              pytest.mark.filterwarnings("ignore:invalid value encountered in multiply")]

DETR = dict(cls_cost="softmax", cls_weight=1.0, l1_weight=5.0, giou_weight=2.0)
DINO = dict(cls_cost="focal", cls_weight=2.0, l1_weight=5.0, giou_weight=2.0)


# ----------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------

def make_boxes(g, shape, h, w, kind="random"):
    """xyxy pixel boxes (B, n, 4) inside (or, for "border", straddling) images h, w (B, 1)."""
    h, w = h.float(), w.float()
    u = torch.rand((*shape, 4), generator=g)
    x1 = u[..., 0] * w * 0.9
    y1 = u[..., 1] * h * 0.9
    bw = u[..., 2] * (w - x1) * 0.8 + 0.5
    bh = u[..., 3] * (h - y1) * 0.8 + 0.5
    if kind == "degenerate":  # zero width, zero height, points, inverted
        z = torch.randint(0, 4, shape, generator=g)
        bw = torch.where(z == 0, torch.zeros_like(bw), torch.where(z == 3, -bw, bw))
        bh = torch.where(z == 1, torch.zeros_like(bh), bh)
        bw = torch.where(z == 2, torch.zeros_like(bw), bw)
        bh = torch.where(z == 2, torch.zeros_like(bh), bh)
    if kind == "border":
        x1 = x1 - 0.5 * w * u[..., 2]
    if kind == "huge":  # far outside the image: coordinates ~1e10, areas ~1e19 (finite in fp32)
        x1, y1, bw, bh = x1 * 1e7, y1 * -1e7, bw * 1e6, bh * 1e7
    if kind == "point":  # every box the same point: union and enclose at the 1e-6 clamp
        x1, y1 = torch.full_like(x1, 7.0), torch.full_like(y1, 3.0)
        bw, bh = torch.zeros_like(bw), torch.zeros_like(bh)
    x2 = x1 + bw
    return torch.stack([x1, y1, x2, y1 + bh], dim=-1)


def make_case(seed, B, Q, G, K, *, pad=0.0, kind="random", logit_scale=3.0):
    """Random batched inputs; padded gts (pad = fraction) hold NaN boxes and -1 labels."""
    g = torch.Generator().manual_seed(seed)
    sizes = torch.stack([torch.randint(200, 1333, (B,), generator=g),
                         torch.randint(200, 1333, (B,), generator=g)], -1)
    h, w = sizes[:, 0, None], sizes[:, 1, None]
    logits = torch.randn((B, Q, K), generator=g) * logit_scale
    pred = make_boxes(g, (B, Q), h, w, kind)
    gt = make_boxes(g, (B, G), h, w, kind)
    if kind == "duplicate" and Q and G:  # queries exactly on gts: GIoU 1, L1 0
        n = min(Q, G)
        pred[:, :n] = gt[:, :n]
    labels = torch.randint(0, max(K, 1), (B, G), generator=g)
    mask = torch.rand((B, G), generator=g) >= pad
    gt = gt.masked_fill(~mask[..., None], float("nan"))
    labels = labels.masked_fill(~mask, -1)
    return dict(pred_logits=logits, pred_boxes=pred, gt_boxes=gt, gt_labels=labels,
                image_sizes=sizes, gt_mask=mask)


def args_of(case):
    return (case["pred_logits"], case["pred_boxes"], case["gt_boxes"], case["gt_labels"],
            case["image_sizes"], case["gt_mask"])


def on(case, device=None):
    return {k: v.to(device or KERNEL_DEVICE) for k, v in case.items()}


def real_columns(cost, mask):
    return cost.masked_select(mask[:, None, :].expand_as(cost))


# ----------------------------------------------------------------------------------------
# mmdetection's classes
# ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mmdet_costs():
    pytest.importorskip("mmdet")
    from tests.mmcv_stub import install_mmcv_ext_stub
    install_mmcv_ext_stub()
    from mmdet.models.task_modules.assigners import match_cost
    from mmengine.structures import InstanceData
    return match_cost, InstanceData


def mmdet_cost(mmdet_costs, case, cls_cost, cls_weight, l1_weight, giou_weight,
               focal_alpha=0.25, focal_gamma=2.0, eps=1e-12):
    """Per image, real gts only: (B, Q, G) with NaN in padded columns (fp32 inputs)."""
    mc, InstanceData = mmdet_costs
    if cls_cost == "softmax":
        cls = mc.ClassificationCost(weight=cls_weight)
    else:
        cls = mc.FocalLossCost(alpha=focal_alpha, gamma=focal_gamma, eps=eps, weight=cls_weight)
    costs = [cls, mc.BBoxL1Cost(box_format="xywh", weight=l1_weight),
             mc.IoUCost(iou_mode="giou", weight=giou_weight)]
    logits, pred, gt, labels, sizes, mask = args_of(case)
    B, Q, _ = logits.shape
    out = torch.full((B, Q, gt.shape[1]), float("nan"))
    for b in range(B):
        real = mask[b]
        pi = InstanceData(scores=logits[b].float(), bboxes=pred[b].float())
        gi = InstanceData(labels=labels[b][real], bboxes=gt[b][real].float())
        meta = dict(img_shape=tuple(int(v) for v in sizes[b]))
        out[b][:, real] = torch.stack([c(pred_instances=pi, gt_instances=gi, img_meta=meta)
                                       for c in costs]).sum(0)
    return out


def assert_mmdet_close(ours, ref, case, weights, backend):
    """The reference: 1e-6 (it rounds as mmdet does); C++: that plus its own CPP_RTOL and the
    2-ulp focal slack (module docstring). Real columns only (mmdet has no padding)."""
    mask = case["gt_mask"]
    if backend == "torch":
        torch.testing.assert_close(real_columns(ours, mask), real_columns(ref, mask),
                                   rtol=1e-6, atol=1e-6)
        return
    assert_costs_close(ours, ref, case, weights, rtol=1e-6 + CPP_RTOL, ulps=2, context="mmdet")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("weights", [DETR, DINO, dict(cls_cost="focal", cls_weight=1.5,
                                                      l1_weight=0.5, giou_weight=3.0)])
@pytest.mark.parametrize("shape", [(2, 30, 7, 92), (3, 1, 5, 81), (1, 50, 1, 2), (2, 17, 40, 80)])
def test_reference_matches_mmdet(mmdet_costs, shape, weights, backend):
    B, Q, G, K = shape
    for seed, pad in ((0, 0.0), (1, 0.4)):
        case = make_case(seed, B, Q, G, K, pad=pad)
        ours = ops.detr_match_cost(*args_of(case), backend=backend, **weights)
        ref = mmdet_cost(mmdet_costs, case, **weights)
        assert ours.shape == (B, Q, G) and ours.dtype == torch.float32
        assert torch.isfinite(ours).all()  # padded columns included
        assert_mmdet_close(ours, ref, case, weights, backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", ["degenerate", "border", "duplicate", "huge", "point"])
@pytest.mark.parametrize("cls_cost", ["softmax", "focal"])
def test_reference_matches_mmdet_special_boxes(mmdet_costs, kind, cls_cost, backend):
    case = make_case(2, 2, 24, 9, 12, kind=kind)
    weights = DETR if cls_cost == "softmax" else DINO
    ours = ops.detr_match_cost(*args_of(case), backend=backend, **weights)
    ref = mmdet_cost(mmdet_costs, case, **weights)
    assert torch.isfinite(ours).all()
    assert_mmdet_close(ours, ref, case, weights, backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("params", [dict(focal_alpha=0.0, focal_gamma=0.0),
                                    dict(focal_alpha=1.0, focal_gamma=1.5, eps=1e-6),
                                    dict(focal_alpha=0.5, focal_gamma=3.0, eps=1e-8)])
def test_reference_matches_mmdet_focal_parameters(mmdet_costs, params, backend):
    case = make_case(3, 2, 20, 6, 10, logit_scale=8.0)  # saturated sigmoids included
    weights = dict(DINO, **params)
    ours = ops.detr_match_cost(*args_of(case), backend=backend, **weights)
    ref = mmdet_cost(mmdet_costs, case, **weights)
    assert_mmdet_close(ours, ref, case, weights, backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_hand_computed_values(backend):
    # one 100 x 200 (h x w) image; query box = gt 0, gt 1 shifted right by its width.
    logits = torch.tensor([[0.0, math.log(3.0)]])             # softmax (0.25, 0.75)
    pred = torch.tensor([[10.0, 20.0, 50.0, 60.0]])
    gt = torch.tensor([[10.0, 20.0, 50.0, 60.0], [50.0, 20.0, 90.0, 60.0]])
    labels = torch.tensor([1, 0])
    size = torch.tensor([100, 200])
    cost = ops.detr_match_cost(logits, pred, gt, labels, size, backend=backend, **DETR)
    # gt 0: -0.75 + 5 * 0 - 2 * 1. gt 1: touching boxes, IoU 0, enclose 80 x 40 = union:
    # GIoU 0; L1 = |dcx| / w = 40 / 200 -> -0.25 + 5 * 0.2 - 0.
    torch.testing.assert_close(cost, torch.tensor([[-2.75, 0.75]]), rtol=0, atol=1e-6)

    # focal at logit 0: p = 1/2, pos = neg * alpha / (1 - alpha) -> pos - neg = -log(1/2) * (
    # 0.25 - 0.75) / 4 with eps negligible; disjoint boxes 1 px apart vertically.
    logits = torch.tensor([[0.0]])
    pred = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    gt = torch.tensor([[0.0, 11.0, 10.0, 21.0]])
    cost = ops.detr_match_cost(logits, pred, gt, torch.tensor([0]), torch.tensor([100, 100]),
                               cls_cost="focal", cls_weight=1.0, l1_weight=1.0, giou_weight=1.0,
                               backend=backend)
    cls = math.log(2.0) * (0.25 - 0.75) / 4
    l1 = 11.0 / 100
    giou = 0.0 - (10 * 21 - 200) / (10 * 21)
    torch.testing.assert_close(cost, torch.tensor([[cls + l1 - giou]]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["random", "degenerate", "border", "huge", "point"])
def test_pairwise_giou_equals_box_iou(kind):
    from rtmdet.ops.detr_cost import pairwise_giou
    case = make_case(19, 3, 11, 8, 2, kind=kind)
    pred, gt = case["pred_boxes"], case["gt_boxes"]
    torch.testing.assert_close(pairwise_giou(pred, gt), ops.box_iou(pred, gt, mode="giou"),
                               rtol=0, atol=0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_unbatched_and_sequence_sizes(backend):
    case = make_case(4, 1, 12, 5, 9)
    batched = ops.detr_match_cost(*args_of(case), backend=backend, **DINO)
    one = [t[0] for t in args_of(case)]
    torch.testing.assert_close(ops.detr_match_cost(*one, backend=backend, **DINO), batched[0],
                               rtol=0, atol=0)
    seq = args_of(case)[:4] + ([[int(v) for v in case["image_sizes"][0]]],)
    torch.testing.assert_close(ops.detr_match_cost(*seq, backend=backend, **DINO), batched,
                               rtol=0, atol=0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("weights", [DETR, DINO])
def test_padded_columns_do_not_change_real_ones(backend, weights):
    # the same real gts with and without padding slots (NaN boxes, -1 labels) between them
    case = make_case(5, 2, 15, 12, 7, pad=0.5)
    full = ops.detr_match_cost(*args_of(case), backend=backend, **weights)
    for b in range(2):
        real = case["gt_mask"][b]
        alone = ops.detr_match_cost(case["pred_logits"][b], case["pred_boxes"][b],
                                    case["gt_boxes"][b][real], case["gt_labels"][b][real],
                                    case["image_sizes"][b], backend=backend, **weights)
        torch.testing.assert_close(full[b][:, real], alone, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpp", marks=needs_cpp),
                                     pytest.param("triton", marks=needs_triton)])
def test_empty_inputs(backend):
    for B, Q, G, K in ((2, 5, 0, 4), (2, 0, 3, 4), (0, 5, 3, 4), (2, 5, 0, 0)):
        case = make_case(6, B, Q, G, K)
        if backend == "triton":
            case = on(case)
        out = ops.detr_match_cost(*args_of(case), backend=backend)
        assert out.shape == (B, Q, G) and out.dtype == torch.float32


def test_no_gradient_and_auto_on_cpu(recwarn, monkeypatch):
    case = make_case(7, 2, 6, 4, 5)
    logits = case["pred_logits"].requires_grad_()
    out = ops.detr_match_cost(logits, *args_of(case)[1:])
    assert not out.requires_grad
    assert not [w for w in recwarn if "detr_match_cost" in str(w.message)]  # no fallback warning
    # "auto" on the CPU: the C++ kernel where rtmdet._C has it, else the reference
    expected = ops.detr_match_cost(*args_of(case), backend="cpp" if HAS_CPP else "torch")
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    # an extension without the op: the reference, still without a warning
    monkeypatch.setattr(_backend, "native_ops", lambda: frozenset())
    out = ops.detr_match_cost(*args_of(case))
    torch.testing.assert_close(out, ops.detr_match_cost(*args_of(case), backend="torch"),
                               rtol=0, atol=0)
    assert not [w for w in recwarn if "detr_match_cost" in str(w.message)]


# ----------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------

def _bad(case, **changes):
    args = dict(case)
    kwargs = {k: changes.pop(k) for k in list(changes) if k not in args}
    args.update(changes)
    return lambda: ops.detr_match_cost(*args_of(args), **kwargs)


@pytest.mark.parametrize("change, message", [
    (dict(cls_cost="sigmoid"), "cls_cost must be one of"),
    (dict(cls_weight=float("nan")), "cls_weight must be a finite number"),
    (dict(l1_weight=float("inf")), "l1_weight must be a finite number"),
    (dict(giou_weight="2"), "giou_weight must be a finite number"),
    (dict(focal_alpha=1.5), r"focal_alpha must lie in \[0, 1\]"),
    (dict(focal_gamma=-1.0), "focal_gamma must be >= 0"),
    (dict(eps=0.0), "eps must be > 0"),
    (dict(backend="cuda"), "backend='cuda' is not available"),
    (dict(pred_logits=torch.zeros(2, 6)), "pred_logits must have 3 dimensions"),
    (dict(pred_boxes=torch.zeros(2, 6, 5)), "pred_boxes must have last dimension 4"),
    (dict(pred_boxes=torch.zeros(2, 6, 4, dtype=torch.long)), "pred_boxes must be a floating"),
    (dict(gt_boxes=torch.zeros(2, 4, 4, dtype=torch.int32)), "gt_boxes must be a floating"),
    (dict(gt_labels=torch.zeros(2, 4)), "gt_labels must be an integer tensor"),
    (dict(gt_labels=torch.zeros(2, 3, dtype=torch.long)), "gt_labels dimension 1 must be 4"),
    (dict(pred_logits=torch.zeros(3, 6, 5)), "pred_logits dimension 0 must be 2"),
    (dict(pred_logits=torch.zeros(2, 7, 5)), "pred_logits dimension 1 must be 6"),
    (dict(image_sizes=torch.ones(3, 2)), "image_sizes dimension 0 must be 2"),
    (dict(image_sizes=torch.ones(2, 3)), "image_sizes must have last dimension 2"),
    (dict(image_sizes=torch.tensor([[100, 0], [100, 100]])), "image_sizes must be positive"),
    (dict(image_sizes=torch.tensor([[100.0, float("nan")], [1.0, 1.0]])),
     "image_sizes must be positive"),
    (dict(gt_mask=torch.ones(2, 4, dtype=torch.uint8)), "gt_mask must be a bool tensor"),
    (dict(gt_mask=torch.ones(2, 5, dtype=torch.bool)), "gt_mask dimension 1 must be 4"),
    (dict(gt_labels=torch.tensor([[0, 1, 5, 2], [0, 0, 0, 0]])), r"gt_labels must lie in \[0, 5\)"),
    (dict(gt_labels=torch.tensor([[0, 1, -1, 2], [0, 0, 0, 0]])),
     r"gt_labels must lie in \[0, 5\)"),
    (dict(pred_logits=torch.full((2, 6, 5), float("nan"))), "pred_logits must be finite"),
    (dict(pred_boxes=torch.full((2, 6, 4), float("inf"))), "pred_boxes must be finite"),
    (dict(gt_boxes=torch.full((2, 4, 4), float("nan"))), "gt_boxes must be finite"),
])
def test_errors(change, message):
    case = make_case(8, 2, 6, 4, 5)
    with pytest.raises((ValueError, TypeError, RuntimeError), match=message):
        _bad(case, **change)()


def test_errors_labels_focal_and_padding():
    case = make_case(9, 2, 6, 4, 5, pad=0.5)
    ops.detr_match_cost(*args_of(case), **DINO)  # padded gts: NaN boxes, -1 labels are fine
    labels = case["gt_labels"].clone()
    labels[case["gt_mask"]] = 5  # K = C = 5 for focal: label 5 is out of range
    if case["gt_mask"].any():
        with pytest.raises(ValueError, match=r"gt_labels must lie in \[0, 5\)"):
            _bad(case, gt_labels=labels, **DINO)()
    with pytest.raises(ValueError, match="pred_logits must have at least one class"):
        _bad(case, pred_logits=torch.zeros(2, 6, 0))()
    with ops.value_checks(False):  # checks off: bad values are not looked at
        ops.detr_match_cost(*args_of(dict(case, gt_labels=labels)), **DINO)


# ----------------------------------------------------------------------------------------
# Triton kernel (interpreter on the CPU) vs the reference
# ----------------------------------------------------------------------------------------

def _focal_slack(logits, labels, alpha, gamma, eps, weight, ulps=2):
    """(B, Q, G): how much mmdet's focal cost moves when the fp32 p = sigmoid(x) at the gt's
    label moves by `ulps` ulps either way (0 where |x| >= 20: p is exactly 0 or 1 there)."""
    B, Q, _ = logits.shape
    labels = labels.clamp(0, max(logits.shape[2] - 1, 0))  # (padded slots may hold anything)
    x = torch.gather(logits.float(), 2, labels[:, None, :].expand(B, Q, -1))

    def f(p):
        neg = -(1 - p + eps).log() * (1 - alpha) * p.pow(gamma)
        pos = -(p + eps).log() * alpha * (1 - p).pow(gamma)
        return pos - neg

    p = x.sigmoid()
    up, down = p, p
    for _ in range(ulps):
        up = torch.nextafter(up, torch.ones_like(up)).clamp(max=1.0)
        down = torch.nextafter(down, torch.zeros_like(down)).clamp(min=0.0)
    slack = torch.maximum((f(up) - f(p)).abs(), (f(down) - f(p)).abs()) * abs(weight)
    return torch.where(x.abs() >= 20, torch.zeros_like(slack), slack)


def assert_costs_close(out, ref, case, weights, *, rtol, ulps, context=""):
    """|out - ref| <= rtol * (1 + |ref|), plus for focal the `ulps` slack, on real columns."""
    out = out.cpu()
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert torch.isfinite(out).all(), context
    tol = rtol * (1 + ref.abs())
    if weights.get("cls_cost") == "focal":
        tol = tol + _focal_slack(case["pred_logits"], case["gt_labels"],
                                 weights.get("focal_alpha", 0.25), weights.get("focal_gamma", 2.0),
                                 weights.get("eps", 1e-12), weights["cls_weight"], ulps=ulps)
    bad = ~((out - ref).abs() <= tol)  # (NaN in ref: bad)
    bad &= case["gt_mask"][:, None, :]  # padded columns: finite (checked above), any value
    if bad.any():
        i = tuple(bad.nonzero()[0].tolist())
        raise AssertionError(f"{context}: {int(bad.sum())} of {bad.numel()} costs differ, e.g. "
                             f"at {i}: got {out[i].item()}, expected {ref[i].item()}")
    return out


def assert_kernel_matches(case, weights, out=None, context=""):
    if out is None:
        out = kernel.detr_match_cost_triton(*args_of(on(case)), **weights)
    ref = detr_match_cost_ref(*args_of(case), **weights)
    return assert_costs_close(out, ref, case, weights, rtol=1e-5, ulps=2, context=context)


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks smaller than the tests' shapes: several query blocks, gt tiles, gt spans and
    class chunks (online softmax statistics) per image, and partial ones of each."""
    monkeypatch.setitem(kernel.TUNING, "block_q", 8)
    monkeypatch.setitem(kernel.TUNING, "block_g", 4)
    monkeypatch.setitem(kernel.TUNING, "g_tiles", 2)
    monkeypatch.setitem(kernel.TUNING, "block_k", 16)


@needs_triton
@pytest.mark.parametrize("cls_cost", ["softmax", "focal"])
@pytest.mark.parametrize("shape", [(2, 19, 11, 92), (1, 1, 1, 1), (3, 1, 9, 37), (2, 21, 1, 16),
                                   (1, 8, 8, 2)])
def test_kernel_matches_reference(small_blocks, shape, cls_cost):
    B, Q, G, K = shape
    weights = DETR if cls_cost == "softmax" else DINO
    for seed, pad in ((10, 0.0), (11, 0.4)):
        case = make_case(seed, B, Q, G, K, pad=pad)
        assert_kernel_matches(case, weights, context=f"{shape} seed {seed}")


@needs_triton
@pytest.mark.parametrize("kind", ["degenerate", "border", "duplicate"])
def test_kernel_special_boxes(small_blocks, kind):
    case = make_case(12, 2, 13, 10, 7, kind=kind, pad=0.2)
    for weights in (DETR, DINO):
        assert_kernel_matches(case, weights, context=kind)


@needs_triton
def test_kernel_default_blocks_dino_like():
    # default TUNING: one query block, two gt spans (G > block_g * g_tiles = 256), K = 80
    case = make_case(13, 1, 33, 260, 80, pad=0.1)
    for weights in (DETR, DINO):
        assert_kernel_matches(case, weights, context="default blocks")


@needs_triton
@pytest.mark.parametrize("G", [1, 16, 17, 33, 64, 65, 129, 193])
def test_kernel_tiles_sized_to_g(G):
    """Default TUNING: the launch picks 16/32/64 gts a tile and 1-4 tiles a program from G;
    every bucket and its edges give the reference's costs (every column written once)."""
    from rtmdet.kernels.detr_cost import TUNING
    assert (TUNING["block_g"], TUNING["g_tiles"]) == (64, 4)   # the buckets this test spans
    case = make_case(20 + G, 2, 3, G, 11, pad=0.3)
    for weights in (DETR, DINO):
        assert_kernel_matches(case, weights, context=f"G={G}")


@needs_triton
@pytest.mark.parametrize("params", [dict(focal_alpha=0.0, focal_gamma=0.0),
                                    dict(focal_alpha=1.0, focal_gamma=1.5, eps=1e-6),
                                    dict(focal_alpha=0.4, focal_gamma=2.5, eps=1e-9)])
def test_kernel_focal_parameters_and_saturated_logits(small_blocks, params):
    case = make_case(14, 2, 16, 7, 9, logit_scale=12.0)
    case["pred_logits"][0, :4] = torch.tensor([-100.0, -30.0, 30.0, 100.0])[:, None]
    assert_kernel_matches(case, dict(DINO, **params), context=str(params))
    assert_kernel_matches(case, DETR, context="softmax, large logits")


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_kernel_dtypes(small_blocks, dtype):
    case = make_case(15, 2, 12, 6, 11, pad=0.3)
    for key in ("pred_logits", "pred_boxes", "gt_boxes"):
        case[key] = case[key].to(dtype)
    case["gt_labels"] = case["gt_labels"].int()
    case["image_sizes"] = case["image_sizes"].to(dtype)
    for weights in (DETR, DINO):
        assert_kernel_matches(case, weights, context=str(dtype))
        # the low-precision inputs are upcast exactly: same result as from fp32 copies
        as32 = {k: (v.float() if v.is_floating_point() else v) for k, v in case.items()}
        torch.testing.assert_close(detr_match_cost_ref(*args_of(case), **weights),
                                   detr_match_cost_ref(*args_of(as32), **weights),
                                   rtol=0, atol=0)


def non_contiguous(case):
    """The same case with every tensor a non-contiguous view of equal values."""
    B, Q, K = case["pred_logits"].shape
    device = case["pred_logits"].device
    nc = dict(case)
    nc["pred_logits"] = torch.randn(B, K, Q, device=device).transpose(1, 2)
    nc["pred_logits"].copy_(case["pred_logits"])
    nc["pred_boxes"] = torch.cat([case["pred_boxes"], case["pred_boxes"]], -1)[..., ::2]
    nc["pred_boxes"][..., :] = case["pred_boxes"]
    nc["gt_boxes"] = case["gt_boxes"].transpose(0, 1).contiguous().transpose(0, 1)
    nc["gt_labels"] = torch.stack([case["gt_labels"]] * 2, -1)[..., 1]
    nc["gt_mask"] = torch.stack([case["gt_mask"]] * 3, 1)[:, 2]
    nc["image_sizes"] = case["image_sizes"].t().contiguous().t()
    assert not any(t.is_contiguous() for t in nc.values())
    return nc


@needs_triton
def test_kernel_non_contiguous(small_blocks):
    case = on(make_case(16, 2, 14, 9, 20, pad=0.3))
    nc = non_contiguous(case)
    for weights in (DETR, DINO):
        out = kernel.detr_match_cost_triton(*args_of(nc), **weights)
        contiguous = kernel.detr_match_cost_triton(*args_of(case), **weights)
        torch.testing.assert_close(out, contiguous, rtol=0, atol=0)
        assert_kernel_matches(on(case, "cpu"), weights, out=out, context="non-contiguous")


@needs_triton
def test_public_backend_triton(small_blocks):
    case = make_case(17, 2, 9, 5, 6, pad=0.3)
    out = ops.detr_match_cost(*args_of(on(case)), backend="triton", **DINO)
    assert_kernel_matches(case, DINO, out=out, context="backend='triton'")
    one = [t[0] for t in args_of(on(case))]
    torch.testing.assert_close(ops.detr_match_cost(*one, backend="triton", **DINO), out[0],
                               rtol=0, atol=0)
    if KERNEL_DEVICE == "cuda":  # "auto" picks the kernel for CUDA tensors
        torch.testing.assert_close(ops.detr_match_cost(*args_of(on(case)), **DINO), out,
                                   rtol=0, atol=0)


@needs_triton
def test_opcheck_interpreter(small_blocks):
    case = on(make_case(18, 2, 9, 6, 5, pad=0.3))
    case["gt_boxes"] = case["gt_boxes"].nan_to_num(0.0)  # opcheck compares with NaN-free inputs
    # test_aot_dispatch_dynamic traces the op's body, where the interpreter would read the
    # functional tensors' data: it runs in test_gpu_opcheck
    for focal in (False, True):
        torch.library.opcheck(torch.ops.rtmdet.detr_match_cost_triton.default,
                              (*args_of(case), focal, 2.0, 5.0, 2.0, 0.25, 2.0, 1e-12),
                              test_utils=("test_schema", "test_faketensor",
                                          "test_autograd_registration"))


# ----------------------------------------------------------------------------------------
# C++ kernel (csrc/cpu/detr_cost_cpu.cpp) vs the reference
# ----------------------------------------------------------------------------------------

def assert_cpp_matches(case, weights, out=None, context=""):
    """The C++ cost against the reference (module docstring: CPP_RTOL and a 2-ulp focal slack),
    padded columns included: both read a padded gt as the zero box with label 0."""
    if out is None:
        out = detr_match_cost_cpp(*args_of(case), **weights)
    pad = ~case["gt_mask"]
    read = dict(case, gt_boxes=case["gt_boxes"].masked_fill(pad[..., None], 0),
                gt_labels=case["gt_labels"].masked_fill(pad, 0), gt_mask=~pad | pad)
    ref = detr_match_cost_ref(*args_of(case), **weights)
    torch.testing.assert_close(ref, detr_match_cost_ref(*args_of(read), **weights), rtol=0, atol=0)
    return assert_costs_close(out, ref, read, weights, rtol=CPP_RTOL, ulps=2, context=context)


# (B, Q, G, K): one query, one gt, one class, G > Q, several query blocks of 32, DINO-like
CPP_SHAPES = [(2, 19, 11, 92), (1, 1, 1, 1), (3, 1, 9, 37), (2, 21, 1, 16), (1, 8, 8, 2),
              (2, 5, 40, 7), (3, 70, 33, 91), (1, 130, 300, 80), (2, 64, 3, 1)]


@needs_cpp
@pytest.mark.parametrize("cls_cost", ["softmax", "focal"])
@pytest.mark.parametrize("shape", CPP_SHAPES)
def test_cpp_matches_reference(shape, cls_cost):
    B, Q, G, K = shape
    weights = DETR if cls_cost == "softmax" else DINO
    for seed, pad, scale in ((30, 0.0, 3.0), (31, 0.4, 3.0), (32, 0.2, 12.0)):
        case = make_case(seed, B, Q, G, K, pad=pad, logit_scale=scale)
        assert_cpp_matches(case, weights, context=f"{shape} seed {seed}")


@needs_cpp
@pytest.mark.parametrize("kind", ["degenerate", "border", "duplicate", "huge", "point"])
def test_cpp_special_boxes(kind):
    for seed in (33, 34):
        case = make_case(seed, 2, 37, 10, 7, kind=kind, pad=0.2)
        for weights in (DETR, DINO, dict(DINO, l1_weight=0.0, giou_weight=1.0)):
            assert_cpp_matches(case, weights, context=f"{kind} seed {seed}")


@needs_cpp
@pytest.mark.parametrize("cls_cost", ["softmax", "focal"])
def test_cpp_extreme_logits(cls_cost):
    weights = DETR if cls_cost == "softmax" else DINO
    case = make_case(35, 4, 40, 9, 13, pad=0.3)
    x = case["pred_logits"]
    x[0] = 1e4 * torch.sign(torch.randn(x[0].shape, generator=torch.Generator().manual_seed(0)))
    x[1] = 0.0  # all equal: softmax 1 / K, sigmoid 1 / 2
    x[2] = -1e4
    x[3, :20] = 7.5
    x[3, 20:] = torch.linspace(-40, 40, 20 * 13).reshape(20, 13)  # through the focal range
    out = assert_cpp_matches(case, weights, context="extreme logits")
    if cls_cost == "softmax":  # one row of equal logits: exactly the reference
        torch.testing.assert_close(out[1], detr_match_cost_ref(*args_of(case), **weights)[1],
                                   rtol=0, atol=0)


@needs_cpp
@pytest.mark.parametrize("params", [dict(focal_alpha=0.0, focal_gamma=0.0),
                                    dict(focal_alpha=1.0, focal_gamma=1.5, eps=1e-6),
                                    dict(focal_alpha=0.4, focal_gamma=2.5, eps=1e-9),
                                    dict(focal_alpha=0.3, focal_gamma=0.5),
                                    dict(focal_alpha=0.3, focal_gamma=1.0),
                                    dict(focal_alpha=0.6, focal_gamma=3.0),
                                    dict(cls_weight=-1.0, l1_weight=0.0, giou_weight=-0.5)])
def test_cpp_focal_parameters_and_saturated_logits(params):
    case = make_case(36, 2, 40, 7, 9, logit_scale=12.0, pad=0.2)
    case["pred_logits"][0, :4] = torch.tensor([-100.0, -30.0, 30.0, 100.0])[:, None]
    assert_cpp_matches(case, dict(DINO, **params), context=str(params))
    assert_cpp_matches(case, dict(DETR, **{k: v for k, v in params.items() if "focal" not in k
                                           and k != "eps"}), context=f"softmax {params}")


@needs_cpp
@pytest.mark.parametrize("cls_cost", ["softmax", "focal"])
def test_cpp_padding_garbage_and_unchecked_labels(cls_cost):
    weights = DETR if cls_cost == "softmax" else DINO
    case = make_case(37, 3, 35, 12, 9, pad=0.5)
    g = torch.Generator().manual_seed(1)
    pad = ~case["gt_mask"]
    junk = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e38])
    case["gt_boxes"][pad] = junk[torch.randint(0, 4, (int(pad.sum()), 4), generator=g)]
    case["gt_labels"][pad] = torch.tensor([-(2 ** 40), -1, 9, 2 ** 40])[
        torch.randint(0, 4, (int(pad.sum()),), generator=g)]
    out = ops.detr_match_cost(*args_of(case), backend="cpp", **weights)  # checks pass: padding
    assert_cpp_matches(case, weights, out=out, context="padding garbage")
    # real gts with out-of-range labels, value checks off: clamped to [0, K), as the reference
    real = case["gt_mask"].clone()
    case["gt_labels"][real] = torch.tensor([-5, 9, 10 ** 6, 3])[
        torch.randint(0, 4, (int(real.sum()),), generator=g)]
    with ops.value_checks(False):
        out = ops.detr_match_cost(*args_of(case), backend="cpp", **weights)
    assert_cpp_matches(case, weights, out=out, context="unchecked labels")


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_cpp_dtypes(dtype):
    case = make_case(38, 2, 40, 6, 11, pad=0.3, logit_scale=6.0)
    low = dict(case)
    for key in ("pred_logits", "pred_boxes", "gt_boxes", "image_sizes"):
        low[key] = case[key].to(dtype)
    low["gt_labels"] = case["gt_labels"].int()
    # read in place and converted as .float() converts: the result of fp32 copies, bitwise
    as32 = {k: (v.float() if v.is_floating_point() else v) for k, v in low.items()}
    for weights in (DETR, DINO):
        out = ops.detr_match_cost(*args_of(low), backend="cpp", **weights)
        torch.testing.assert_close(out, detr_match_cost_cpp(*args_of(as32), **weights),
                                   rtol=0, atol=0)
        assert_cpp_matches(as32, weights, out=out, context=str(dtype))


@needs_cpp
def test_cpp_non_contiguous():
    case = make_case(39, 2, 45, 9, 20, pad=0.3)
    nc = non_contiguous(case)
    # a slice with a storage offset and an expanded (stride 0) batch
    offset = torch.randn(3, 45, 20)[1:]
    offset.copy_(case["pred_logits"])
    expanded = case["pred_logits"][:1].expand(2, -1, -1)
    for weights in (DETR, DINO):
        contiguous = detr_match_cost_cpp(*args_of(case), **weights)
        torch.testing.assert_close(detr_match_cost_cpp(*args_of(nc), **weights), contiguous,
                                   rtol=0, atol=0)
        torch.testing.assert_close(
            detr_match_cost_cpp(*args_of(dict(case, pred_logits=offset)), **weights),
            contiguous, rtol=0, atol=0)
        torch.testing.assert_close(
            detr_match_cost_cpp(*args_of(dict(case, pred_logits=expanded)), **weights),
            detr_match_cost_cpp(*args_of(dict(case, pred_logits=expanded.contiguous())),
                                **weights), rtol=0, atol=0)


@needs_cpp
def test_cpp_threads_and_mask_none():
    # the same costs with one thread and with the pool (several tasks per image), and with
    # gt_mask None (= all real) as with an all-True mask
    case = make_case(40, 3, 200, 25, 30)
    for weights in (DETR, DINO):
        pooled = detr_match_cost_cpp(*args_of(case), **weights)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            single = detr_match_cost_cpp(*args_of(case), **weights)
        finally:
            torch.set_num_threads(threads)
        torch.testing.assert_close(pooled, single, rtol=0, atol=0)
        none = detr_match_cost_cpp(*args_of(case)[:5], None, **weights)
        torch.testing.assert_close(none, pooled, rtol=0, atol=0)


@needs_cpp
def test_cpp_op_errors():
    case = make_case(41, 2, 6, 4, 5)
    op = torch.ops.rtmdet.detr_match_cost
    rest = (2.0, 5.0, 2.0, 0.25, 2.0, 1e-12)
    with pytest.raises(RuntimeError, match="cls_cost must be 'softmax' or 'focal'"):
        op(*args_of(case), "sigmoid", *rest)
    with pytest.raises(RuntimeError, match="gt_labels must be"):
        op(*args_of(dict(case, gt_labels=case["gt_labels"][:, :3])), "focal", *rest)
    with pytest.raises(RuntimeError, match="at least one class"):
        op(*args_of(dict(case, pred_logits=torch.zeros(2, 6, 0))), "focal", *rest)
    with pytest.raises(RuntimeError, match="gt_mask must be"):
        op(*args_of(dict(case, gt_mask=case["gt_mask"].int())), "focal", *rest)


@needs_cpp
def test_cpp_opcheck():
    case = make_case(42, 2, 9, 6, 5, pad=0.3)
    case["gt_boxes"] = case["gt_boxes"].nan_to_num(0.0)  # opcheck compares with NaN-free inputs
    for cls_cost in ("softmax", "focal"):
        for mask in (case["gt_mask"], None):
            torch.library.opcheck(torch.ops.rtmdet.detr_match_cost.default,
                                  (*args_of(case)[:5], mask, cls_cost, 2.0, 5.0, 2.0, 0.25, 2.0,
                                   1e-12))
    logits = case["pred_logits"].clone().requires_grad_()  # test_autograd_registration runs
    args = (logits, *args_of(case)[1:], "focal", 2.0, 5.0, 2.0, 0.25, 2.0, 1e-12)
    torch.library.opcheck(torch.ops.rtmdet.detr_match_cost.default, args)
    assert not torch.ops.rtmdet.detr_match_cost(*args).requires_grad  # no gradient, by design


@needs_cpp
@pytest.mark.parametrize("cls_cost", ["softmax", "focal"])
def test_cpp_matching_is_optimal_for_the_reference(cls_cost):
    """The matching solved on the C++ costs is optimal for the reference's costs."""
    from scipy.optimize import linear_sum_assignment
    weights = DETR if cls_cost == "softmax" else DINO
    for seed, (B, Q, G) in ((43, (4, 100, 20)), (44, (2, 300, 60)), (45, (3, 15, 40))):
        case = make_case(seed, B, Q, G, 92 if cls_cost == "softmax" else 80, pad=0.2,
                         logit_scale=6.0)
        mask = case["gt_mask"]
        match = ops.hungarian_match(ops.detr_match_cost(*args_of(case), backend="cpp", **weights),
                                    mask)
        ref = detr_match_cost_ref(*args_of(case), **weights).double()
        for b in range(B):
            real = mask[b].nonzero()[:, 0]
            c = ref[b][:, real].numpy()
            rows, cols = linear_sum_assignment(c)
            q = (match[b] >= 0).nonzero()[:, 0]
            assert len(q) == len(rows) and mask[b, match[b, q]].all()
            total = ref[b][q, match[b, q]].sum().item()
            optimum = c[rows, cols].sum()
            scale = abs(c[rows, cols]).sum()
            # ties and the 1-ulp focal cases may pick another optimum-within-tolerance
            assert abs(total - optimum) <= 1e-5 * scale, (seed, b, total, optimum)


# ----------------------------------------------------------------------------------------
# GPU
# ----------------------------------------------------------------------------------------

def dino_case(seed, cls_cost, B=16, Q=900, G=300, pad=0.3):
    K = 92 if cls_cost == "softmax" else 80
    case = make_case(seed, B, Q, G, K, pad=pad)
    return {k: v.cuda() for k, v in case.items()}


def _cpu(case):
    return {k: v.cpu() for k, v in case.items()}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cls_cost", ["softmax", "focal"])
def test_gpu_dino_size_matches_reference(cls_cost, dtype):
    case = dino_case(20, cls_cost)
    for key in ("pred_logits", "pred_boxes"):
        case[key] = case[key].to(dtype)
    weights = DETR if cls_cost == "softmax" else DINO
    out = ops.detr_match_cost(*args_of(case), **weights)  # auto: triton on CUDA
    assert_kernel_matches(_cpu(case), weights, out=out.cpu(), context="DINO size")
    ref_gpu = ops.detr_match_cost(*args_of(case), backend="torch", **weights)
    assert_kernel_matches(_cpu(case), weights, out=ref_gpu.cpu(), context="torch on GPU")


@pytest.mark.gpu
def test_gpu_opcheck():
    case = dino_case(21, "focal", B=2, Q=50, G=20)
    case["gt_boxes"] = case["gt_boxes"].nan_to_num(0.0)
    # test_aot_dispatch_dynamic traces the op's body, where the interpreter would read the
    # functional tensors' data: it runs in test_gpu_opcheck
    for focal in (False, True):
        torch.library.opcheck(torch.ops.rtmdet.detr_match_cost_triton.default,
                              (*args_of(case), focal, 2.0, 5.0, 2.0, 0.25, 2.0, 1e-12),
                              test_utils=("test_schema", "test_faketensor",
                                          "test_autograd_registration"))


@pytest.mark.gpu
@pytest.mark.parametrize("cls_cost", ["softmax", "focal"])
def test_gpu_compile_fullgraph_and_cuda_graph(cls_cost):
    weights = DETR if cls_cost == "softmax" else DINO

    def cost(*args):
        return ops.detr_match_cost(*args, **weights)

    static = dino_case(22, cls_cost)
    eager = cost(*args_of(static))
    with ops.value_checks(False):
        compiled = torch.compile(cost, fullgraph=True)
        torch.testing.assert_close(compiled(*args_of(static)), eager, rtol=1e-5, atol=1e-5)

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            cost(*args_of(static))
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = cost(*args_of(static))
        fresh = dino_case(23, cls_cost)
        for key in static:
            static[key].copy_(fresh[key])
        graph.replay()
    torch.testing.assert_close(captured, cost(*args_of(fresh)), rtol=0, atol=0)
