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
"""
import math

import pytest
import torch

from rtmdet import ops
from rtmdet.ops.detr_cost import detr_match_cost_ref

try:
    from rtmdet.kernels import detr_cost as kernel
except ImportError:  # no triton here: the kernel tests are skipped
    kernel = None

needs_triton = pytest.mark.skipif(kernel is None, reason="triton is not importable")
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


@pytest.mark.parametrize("weights", [DETR, DINO, dict(cls_cost="focal", cls_weight=1.5,
                                                      l1_weight=0.5, giou_weight=3.0)])
@pytest.mark.parametrize("shape", [(2, 30, 7, 92), (3, 1, 5, 81), (1, 50, 1, 2), (2, 17, 40, 80)])
def test_reference_matches_mmdet(mmdet_costs, shape, weights):
    B, Q, G, K = shape
    for seed, pad in ((0, 0.0), (1, 0.4)):
        case = make_case(seed, B, Q, G, K, pad=pad)
        ours = ops.detr_match_cost(*args_of(case), **weights)
        ref = mmdet_cost(mmdet_costs, case, **weights)
        mask = case["gt_mask"]
        assert ours.shape == (B, Q, G) and ours.dtype == torch.float32
        assert torch.isfinite(ours).all()  # padded columns included
        torch.testing.assert_close(real_columns(ours, mask), real_columns(ref, mask),
                                   rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["degenerate", "border", "duplicate"])
@pytest.mark.parametrize("cls_cost", ["softmax", "focal"])
def test_reference_matches_mmdet_special_boxes(mmdet_costs, kind, cls_cost):
    case = make_case(2, 2, 24, 9, 12, kind=kind)
    weights = DETR if cls_cost == "softmax" else DINO
    ours = ops.detr_match_cost(*args_of(case), **weights)
    ref = mmdet_cost(mmdet_costs, case, **weights)
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("params", [dict(focal_alpha=0.0, focal_gamma=0.0),
                                    dict(focal_alpha=1.0, focal_gamma=1.5, eps=1e-6),
                                    dict(focal_alpha=0.5, focal_gamma=3.0, eps=1e-8)])
def test_reference_matches_mmdet_focal_parameters(mmdet_costs, params):
    case = make_case(3, 2, 20, 6, 10, logit_scale=8.0)  # saturated sigmoids included
    weights = dict(DINO, **params)
    ours = ops.detr_match_cost(*args_of(case), **weights)
    ref = mmdet_cost(mmdet_costs, case, **weights)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)


def test_hand_computed_values():
    # one 100 x 200 (h x w) image; query box = gt 0, gt 1 shifted right by its width.
    logits = torch.tensor([[0.0, math.log(3.0)]])             # softmax (0.25, 0.75)
    pred = torch.tensor([[10.0, 20.0, 50.0, 60.0]])
    gt = torch.tensor([[10.0, 20.0, 50.0, 60.0], [50.0, 20.0, 90.0, 60.0]])
    labels = torch.tensor([1, 0])
    size = torch.tensor([100, 200])
    cost = ops.detr_match_cost(logits, pred, gt, labels, size, **DETR)
    # gt 0: -0.75 + 5 * 0 - 2 * 1. gt 1: touching boxes, IoU 0, enclose 80 x 40 = union:
    # GIoU 0; L1 = |dcx| / w = 40 / 200 -> -0.25 + 5 * 0.2 - 0.
    torch.testing.assert_close(cost, torch.tensor([[-2.75, 0.75]]), rtol=0, atol=1e-6)

    # focal at logit 0: p = 1/2, pos = neg * alpha / (1 - alpha) -> pos - neg = -log(1/2) * (
    # 0.25 - 0.75) / 4 with eps negligible; disjoint boxes 1 px apart vertically.
    logits = torch.tensor([[0.0]])
    pred = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    gt = torch.tensor([[0.0, 11.0, 10.0, 21.0]])
    cost = ops.detr_match_cost(logits, pred, gt, torch.tensor([0]), torch.tensor([100, 100]),
                               cls_cost="focal", cls_weight=1.0, l1_weight=1.0, giou_weight=1.0)
    cls = math.log(2.0) * (0.25 - 0.75) / 4
    l1 = 11.0 / 100
    giou = 0.0 - (10 * 21 - 200) / (10 * 21)
    torch.testing.assert_close(cost, torch.tensor([[cls + l1 - giou]]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["random", "degenerate", "border"])
def test_pairwise_giou_equals_box_iou(kind):
    from rtmdet.ops.detr_cost import pairwise_giou
    case = make_case(19, 3, 11, 8, 2, kind=kind)
    pred, gt = case["pred_boxes"], case["gt_boxes"]
    torch.testing.assert_close(pairwise_giou(pred, gt), ops.box_iou(pred, gt, mode="giou"),
                               rtol=0, atol=0)


def test_unbatched_and_sequence_sizes():
    case = make_case(4, 1, 12, 5, 9)
    batched = ops.detr_match_cost(*args_of(case), **DINO)
    one = [t[0] for t in args_of(case)]
    torch.testing.assert_close(ops.detr_match_cost(*one, **DINO), batched[0], rtol=0, atol=0)
    seq = args_of(case)[:4] + ([[int(v) for v in case["image_sizes"][0]]],)
    torch.testing.assert_close(ops.detr_match_cost(*seq, **DINO), batched, rtol=0, atol=0)


def test_padded_columns_do_not_change_real_ones():
    # the same real gts with and without padding slots (NaN boxes, -1 labels) between them
    case = make_case(5, 2, 15, 12, 7, pad=0.5)
    full = ops.detr_match_cost(*args_of(case), **DETR)
    for b in range(2):
        real = case["gt_mask"][b]
        alone = ops.detr_match_cost(case["pred_logits"][b], case["pred_boxes"][b],
                                    case["gt_boxes"][b][real], case["gt_labels"][b][real],
                                    case["image_sizes"][b], **DETR)
        torch.testing.assert_close(full[b][:, real], alone, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_empty_inputs(backend):
    for B, Q, G, K in ((2, 5, 0, 4), (2, 0, 3, 4), (0, 5, 3, 4), (2, 5, 0, 0)):
        case = make_case(6, B, Q, G, K)
        if backend == "triton":
            case = on(case)
        out = ops.detr_match_cost(*args_of(case), backend=backend)
        assert out.shape == (B, Q, G) and out.dtype == torch.float32


def test_no_gradient_and_auto_on_cpu_is_reference(recwarn):
    case = make_case(7, 2, 6, 4, 5)
    logits = case["pred_logits"].requires_grad_()
    out = ops.detr_match_cost(logits, *args_of(case)[1:])
    assert not out.requires_grad
    assert not [w for w in recwarn if "detr_match_cost" in str(w.message)]  # no fallback warning
    torch.testing.assert_close(out, ops.detr_match_cost(*args_of(case), backend="torch"),
                               rtol=0, atol=0)


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
    x = torch.gather(logits.float(), 2, labels.clamp(min=0)[:, None, :].expand(B, Q, -1))

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


def assert_kernel_matches(case, weights, out=None, context=""):
    args = args_of(case)
    if out is None:
        out = kernel.detr_match_cost_triton(*args_of(on(case)), **weights)
    out = out.cpu()
    ref = detr_match_cost_ref(*args, **weights)
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert torch.isfinite(out).all(), context
    tol = 1e-5 * (1 + ref.abs())
    if weights.get("cls_cost") == "focal":
        tol = tol + _focal_slack(case["pred_logits"], case["gt_labels"],
                                 weights.get("focal_alpha", 0.25), weights.get("focal_gamma", 2.0),
                                 weights.get("eps", 1e-12), weights["cls_weight"])
    bad = (out - ref).abs() > tol
    bad &= case["gt_mask"][:, None, :]  # padded columns: finite (checked above), any value
    if bad.any():
        i = tuple(bad.nonzero()[0].tolist())
        raise AssertionError(f"{context}: {int(bad.sum())} of {bad.numel()} costs differ, e.g. "
                             f"at {i}: kernel {out[i].item()}, reference {ref[i].item()}")
    return out


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


@needs_triton
def test_kernel_non_contiguous(small_blocks):
    case = on(make_case(16, 2, 14, 9, 20, pad=0.3))
    nc = dict(case)
    nc["pred_logits"] = torch.randn(2, 20, 14, device=KERNEL_DEVICE).transpose(1, 2)
    nc["pred_logits"].copy_(case["pred_logits"])
    nc["pred_boxes"] = torch.cat([case["pred_boxes"], case["pred_boxes"]], -1)[..., ::2]
    nc["pred_boxes"][..., :] = case["pred_boxes"]
    nc["gt_boxes"] = case["gt_boxes"].transpose(0, 1).contiguous().transpose(0, 1)
    nc["gt_labels"] = torch.stack([case["gt_labels"]] * 2, -1)[..., 1]
    nc["gt_mask"] = torch.stack([case["gt_mask"]] * 3, 1)[:, 2]
    nc["image_sizes"] = case["image_sizes"].t().contiguous().t()
    assert not any(t.is_contiguous() for t in nc.values())
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
