"""rtmdet.head_loss against SPEC section 3, computed image by image in plain formulas."""
import math

import pytest
import torch
import torch.nn.functional as F

import rtmdet
from rtmdet import ops

pytestmark = pytest.mark.filterwarnings("ignore:rtmdet.ops.*:RuntimeWarning")

STRIDES = (8, 16, 32)


def random_head(B, C, size, seed, requires_grad=True):
    """Head outputs with plausible ltrb distances (so assignments have real IoUs)."""
    g = torch.Generator().manual_seed(seed)
    cls, reg = [], []
    for s in STRIDES:
        h = w = size // s
        cls.append((torch.randn(B, C, h, w, generator=g) * 2 - 3).requires_grad_(requires_grad))
        reg.append((torch.rand(B, 4, h, w, generator=g) * 5 + 0.5).mul(s).requires_grad_(requires_grad))
    return cls, reg


def random_gts(counts, C, size, seed):
    g = torch.Generator().manual_seed(seed)
    boxes, labels = [], []
    for n in counts:
        xy = torch.rand(n, 2, generator=g) * size * 0.7
        wh = torch.rand(n, 2, generator=g) * size * 0.5 + 6
        boxes.append(torch.cat([xy, (xy + wh).clamp(max=size)], 1))
        labels.append(torch.randint(0, C, (n,), generator=g))
    return boxes, labels


def reference_loss(cls_scores, bbox_preds, boxes, labels, strides=STRIDES):
    """SPEC 3 per image: unbatched assignment, dense QFL, GIoU on the positives."""
    B, C = cls_scores[0].shape[:2]
    priors = ops.grid_priors([c.shape[-2:] for c in cls_scores], strides)
    cls_sum = bbox_sum = 0.0
    metric_sum = pos_weight_sum = 0.0
    for b in range(B):
        x = torch.cat([c[b].permute(1, 2, 0).reshape(-1, C) for c in cls_scores])
        d = torch.cat([r[b].permute(1, 2, 0).reshape(-1, 4) for r in bbox_preds])
        px, py = priors[:, 0], priors[:, 1]
        pred = torch.stack([px - d[:, 0], py - d[:, 1], px + d[:, 2], py + d[:, 3]], 1)
        a = ops.dsl_assign(priors, pred.detach(), x.detach(), boxes[b], labels[b],
                           backend="torch")
        fg = a.gt_index >= 0
        metric = torch.where(fg, a.ious, torch.zeros_like(a.ious))
        s = x.sigmoid()
        loss = F.binary_cross_entropy_with_logits(x, torch.zeros_like(x), reduction="none") * s ** 2
        for n in fg.nonzero().flatten().tolist():
            c, q = a.labels[n], metric[n]
            pos = F.binary_cross_entropy_with_logits(x[n, c], q) * (q - s[n, c]).abs() ** 2
            loss = loss.index_put((torch.tensor(n), c), pos)
        cls_sum = cls_sum + loss.sum()
        metric_sum += float(metric.sum())
        pos = fg.nonzero().flatten()
        if len(pos):
            p, t = pred[pos], boxes[b][a.gt_index[pos]]
            inter = ((torch.min(p[:, 2], t[:, 2]) - torch.max(p[:, 0], t[:, 0])).clamp(min=0) *
                     (torch.min(p[:, 3], t[:, 3]) - torch.max(p[:, 1], t[:, 1])).clamp(min=0))
            union = ((p[:, 2] - p[:, 0]) * (p[:, 3] - p[:, 1]) +
                     (t[:, 2] - t[:, 0]) * (t[:, 3] - t[:, 1]) - inter).clamp(min=1e-6)
            enclose = ((torch.max(p[:, 2], t[:, 2]) - torch.min(p[:, 0], t[:, 0])) *
                       (torch.max(p[:, 3], t[:, 3]) - torch.min(p[:, 1], t[:, 1]))).clamp(min=1e-6)
            giou = inter / union - (enclose - union) / enclose
            bbox_sum = bbox_sum + (metric[pos] * (1 - giou)).sum()
            pos_weight_sum += float(metric[pos].sum())
    return (cls_sum / max(metric_sum, 1.0),
            2.0 * bbox_sum / max(pos_weight_sum, 1.0) if pos_weight_sum else torch.tensor(0.0))


def padded(boxes, labels, G, seed):
    """Pad lists to (B, G) with garbage in the padding, real gts at scattered positions."""
    g = torch.Generator().manual_seed(seed)
    B = len(boxes)
    out_b = torch.rand(B, G, 4, generator=g) * 1000 - 500   # junk, also inverted boxes
    out_l = torch.randint(-5, 500, (B, G), generator=g)
    mask = torch.zeros(B, G, dtype=torch.bool)
    for i, (bx, lb) in enumerate(zip(boxes, labels)):
        slots = torch.randperm(G, generator=g)[:len(bx)].sort().values
        out_b[i, slots], out_l[i, slots], mask[i, slots] = bx, lb, True
    return out_b, out_l, mask


@pytest.mark.parametrize("seed", [0, 1])
def test_matches_per_image_reference(seed):
    C, size = 5, 128
    cls, reg = random_head(3, C, size, seed)
    boxes, labels = random_gts([4, 1, 7], C, size, seed + 10)
    got = rtmdet.head_loss(cls, reg, boxes, labels, backend="torch")
    ref_cls, ref_bbox = reference_loss(cls, reg, boxes, labels)
    assert got["loss_bbox"] > 0  # the case has positives with real overlaps
    torch.testing.assert_close(got["loss_cls"], ref_cls.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["loss_bbox"], ref_bbox.float(), rtol=1e-5, atol=1e-6)


def test_lists_and_padded_give_the_same_loss_and_gradients():
    C, size = 4, 96
    boxes, labels = random_gts([3, 0, 5], C, size, 3)
    pb, pl, pm = padded(boxes, labels, 9, 4)
    results = []
    for gts in ((boxes, labels, None), (pb, pl, pm)):
        cls, reg = random_head(3, C, size, 2)
        out = rtmdet.head_loss(cls, reg, *gts, backend="torch")
        (out["loss_cls"] + out["loss_bbox"]).backward()
        results.append((out, cls[0].grad, reg[1].grad))
    (a, ga, ra), (b, gb, rb) = results
    torch.testing.assert_close(a["loss_cls"], b["loss_cls"])
    torch.testing.assert_close(a["loss_bbox"], b["loss_bbox"])
    torch.testing.assert_close(ga, gb)
    torch.testing.assert_close(ra, rb)


def test_hand_computed_values():
    # One level of stride 8, 2x2 priors at (0,0), (8,0), (0,8), (8,8), one class, logits 0.
    # gt [1, 1, 12, 12] holds only prior (8, 8) strictly inside: it is the only positive.
    # Its prediction ltrb (7, 7, 2, 4) is [1, 1, 10, 12]: IoU = GIoU = 99/121 = 9/11.
    cls = [torch.zeros(1, 1, 2, 2, requires_grad=True)]
    d = torch.full((1, 4, 2, 2), 3.0)
    d[0, :, 1, 1] = torch.tensor([7.0, 7.0, 2.0, 4.0])
    reg = [d.requires_grad_()]
    out = rtmdet.head_loss(cls, reg, torch.tensor([[[1.0, 1.0, 12.0, 12.0]]]),
                           torch.tensor([[0]]), strides=(8,), backend="torch")
    iou = 9 / 11
    # BCE(0, y) = ln 2 for any y; negatives: ln2 * sigmoid(0)^2; positive: ln2 * (iou - 0.5)^2
    expected_cls = math.log(2) * (3 * 0.25 + (iou - 0.5) ** 2) / 1.0   # avg factor max(iou, 1)
    expected_bbox = 2.0 * iou * (1 - iou) / 1.0
    assert out["loss_cls"].item() == pytest.approx(expected_cls, rel=1e-6)
    assert out["loss_bbox"].item() == pytest.approx(expected_bbox, rel=1e-6)


def test_gradients_flow_to_the_model():
    torch.manual_seed(0)
    model = rtmdet.RTMDet.from_name("tiny", num_classes=3)
    for conv in model.bbox_head.rtm_reg:  # boxes of ~2 strides, so positives overlap their gts
        torch.nn.init.constant_(conv.bias, 2.0)
    images = torch.randn(2, 3, 64, 64)
    boxes, labels = random_gts([2, 3], 3, 64, 5)
    pb, pl, pm = padded(boxes, labels, 3, 6)
    out = model.loss(images, {"boxes": pb, "labels": pl, "mask": pm}, backend="torch")
    assert out["loss_bbox"] > 0
    (out["loss_cls"] + out["loss_bbox"]).backward()
    for name in ("backbone.stem.0.conv.weight", "bbox_head.rtm_cls.0.bias",
                 "bbox_head.rtm_reg.0.weight", "bbox_head.reg_convs.0.1.conv.weight",
                 "bbox_head.cls_convs.0.1.conv.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


@pytest.mark.parametrize("counts", [[0, 0], [0, 3]])
def test_images_without_gts(counts):
    C, size = 3, 64
    cls, reg = random_head(2, C, size, 7)
    boxes, labels = random_gts(counts, C, size, 8)
    out = rtmdet.head_loss(cls, reg, boxes, labels, backend="torch")
    ref_cls, ref_bbox = reference_loss(cls, reg, boxes, labels)
    assert torch.isfinite(out["loss_cls"]) and torch.isfinite(out["loss_bbox"])
    torch.testing.assert_close(out["loss_cls"], ref_cls.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["loss_bbox"], ref_bbox.float(), rtol=1e-5, atol=1e-6)
    if sum(counts) == 0:
        assert out["loss_bbox"].item() == 0.0
        # padded form with G = 0
        out0 = rtmdet.head_loss(cls, reg, torch.zeros(2, 0, 4), torch.zeros(2, 0, dtype=torch.long),
                                backend="torch")
        torch.testing.assert_close(out0["loss_cls"], out["loss_cls"])
        assert out0["loss_bbox"].item() == 0.0
    (out["loss_cls"] + out["loss_bbox"]).backward()
    assert all(torch.isfinite(t.grad).all() for t in cls + reg)


def test_auto_backend_matches_torch():
    C, size = 4, 64
    cls, reg = random_head(2, C, size, 11, requires_grad=False)
    boxes, labels = random_gts([3, 2], C, size, 12)
    a = rtmdet.head_loss(cls, reg, boxes, labels, backend="auto")
    t = rtmdet.head_loss(cls, reg, boxes, labels, backend="torch")
    torch.testing.assert_close(a["loss_cls"], t["loss_cls"], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(a["loss_bbox"], t["loss_bbox"], rtol=1e-4, atol=1e-6)


def test_distributed_averages_the_normalisers(monkeypatch):
    # Pretend to be one of 2 processes whose peer's sum of metrics is 7.5.
    import torch.distributed as dist
    C, size = 3, 64
    cls, reg = random_head(2, C, size, 13, requires_grad=False)
    boxes, labels = random_gts([3, 4], C, size, 14)
    single = rtmdet.head_loss(cls, reg, boxes, labels, backend="torch")
    fg_sum = {}

    def all_reduce(t, op=None):
        fg_sum["local"] = t.clone()
        t.add_(7.5)

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    multi = rtmdet.head_loss(cls, reg, boxes, labels, backend="torch")
    local = float(fg_sum["local"])
    assert local > 0
    scale = max(local, 1.0) / max((local + 7.5) / 2, 1.0)
    torch.testing.assert_close(multi["loss_cls"], single["loss_cls"] * scale)
    torch.testing.assert_close(multi["loss_bbox"], single["loss_bbox"] * scale)


def test_bad_inputs_raise_clear_errors():
    cls, reg = random_head(2, 3, 64, 0, requires_grad=False)
    boxes, labels = random_gts([1, 1], 3, 64, 1)
    with pytest.raises(ValueError, match="strides"):
        rtmdet.head_loss(cls, reg, boxes, labels, strides=(8, 16))
    with pytest.raises(ValueError, match="gt_labels"):
        rtmdet.head_loss(cls, reg, boxes, labels[:1])
    with pytest.raises(ValueError, match="gt_mask"):
        rtmdet.head_loss(cls, reg, torch.zeros(2, 3, 4), torch.zeros(2, 3, dtype=torch.long),
                         torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="bbox_preds"):
        rtmdet.head_loss(cls, [r[:, :2] for r in reg], boxes, labels)
    with pytest.raises(ValueError, match="batch"):
        rtmdet.head_loss(cls, reg, boxes[:1], labels[:1])


def test_fused_triton_path_matches_torch():
    """backend="triton" (CPU interpreter here): the fused loss ops with in-kernel target
    gathering and normalisation give the reference's losses and gradients."""
    pytest.importorskip("triton")
    cls, reg = random_head(2, 5, 64, 3)
    boxes, labels = random_gts([3, 0], 5, 64, 4)
    b, l, m = padded(boxes, labels, 4, 5)
    results = []
    for backend in ("torch", "triton"):
        for t in cls + reg:
            t.grad = None
        out = rtmdet.head_loss(cls, reg, b, l, m, backend=backend)
        (out["loss_cls"] + 3 * out["loss_bbox"]).backward()
        results.append((out, [t.grad.clone() for t in cls + reg]))
    (want, g_want), (got, g_got) = results
    assert float(want["loss_bbox"].detach()) > 0
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)
    for a, c in zip(g_got, g_want):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)


def test_prior_tables_are_cached_and_decode_like_distance2bbox():
    from rtmdet.loss import _prior_tables
    sizes, strides = [(4, 6), (2, 3), (1, 2)], STRIDES
    first = _prior_tables(sizes, strides, torch.device("cpu"))
    assert _prior_tables(sizes, strides, torch.device("cpu"))[0] is first[0]
    priors, corners, signs = first
    torch.testing.assert_close(priors, ops.grid_priors(sizes, strides), rtol=0, atol=0)
    d = torch.rand(3, priors.shape[0], 4) * 40 - 5
    assert torch.equal(torch.addcmul(corners, d, signs), ops.distance2bbox(priors[None, :, :2], d))
