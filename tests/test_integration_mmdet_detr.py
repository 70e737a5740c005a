"""FusedHungarianAssigner and the DETR-family heads against real mmdetection 3.3.

`install_mmcv_ext_stub()` stands in for mmcv-lite's missing compiled extension `mmcv._ext`
(imported by `import mmdet.models`); nothing here calls a compiled op: the head losses are
plain PyTorch (deformable attention lives in the transformer, not in the heads), FocalLoss
takes its Python path on CPU tensors, and the stand-in raises if an op is ever called.
"""
import copy

import pytest
import torch

pytest.importorskip("mmdet", reason="mmdetection 3.x is not installed (scripts/test.sh installs it)")
pytest.importorskip("scipy", reason="mmdet's HungarianAssigner needs scipy")
from tests.mmcv_stub import install_mmcv_ext_stub  # noqa: E402

install_mmcv_ext_stub()
from mmdet.models.task_modules.assigners import HungarianAssigner  # noqa: E402
from mmdet.registry import MODELS, TASK_UTILS  # noqa: E402
from mmdet.structures.bbox import bbox_cxcywh_to_xyxy  # noqa: E402
from mmengine.structures import InstanceData  # noqa: E402

import rtmdet.integrations.mmdet as mm  # noqa: E402
from rtmdet import ops  # noqa: E402

SOFTMAX_COSTS = [dict(type="ClassificationCost", weight=1.0),
                 dict(type="BBoxL1Cost", weight=5.0, box_format="xywh"),
                 dict(type="IoUCost", iou_mode="giou", weight=2.0)]
FOCAL_COSTS = [dict(type="FocalLossCost", weight=2.0),
               dict(type="BBoxL1Cost", weight=5.0, box_format="xywh"),
               dict(type="IoUCost", iou_mode="giou", weight=2.0)]


def random_gts(g, h, w, C, gen):
    xy = torch.rand(g, 2, generator=gen) * torch.tensor([w, h]) * 0.8
    wh = 2 + torch.rand(g, 2, generator=gen) * torch.tensor([w, h]) * 0.5
    boxes = torch.cat([xy, torch.minimum(xy + wh, torch.tensor([w, h], dtype=torch.float32))], 1)
    return InstanceData(bboxes=boxes, labels=torch.randint(0, C, (g,), generator=gen))


def random_queries(Q, K, h, w, gen):
    """Logits (Q, K), normalised cxcywh (Q, 4) and the xyxy pixel boxes stock's heads derive."""
    logits = torch.randn(Q, K, generator=gen) * 2
    cxcywh = torch.rand(Q, 4, generator=gen) * torch.tensor([1.0, 1.0, 0.5, 0.5]) + torch.tensor([0, 0, 0.02, 0.02])
    return logits, cxcywh, bbox_cxcywh_to_xyxy(cxcywh) * torch.tensor([w, h, w, h])


def stock_cost(assigner, pred, gts, meta):
    return torch.stack([c(pred_instances=pred, gt_instances=gts, img_meta=meta)
                        for c in assigner.match_costs]).sum(0)


# ----------------------------------------------------------------------------------------
# FusedHungarianAssigner
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("costs", ["softmax", "focal"])
@pytest.mark.parametrize("Q,G", [(20, 5), (12, 12), (6, 9), (30, 1)])
@pytest.mark.parametrize("seed", range(3))
def test_hungarian_assigner_matches_stock(costs, Q, G, seed):
    gen = torch.Generator().manual_seed(seed * 7 + Q + G)
    h, w, C = 60, 90, 5
    K = C + 1 if costs == "softmax" else C
    match_costs = SOFTMAX_COSTS if costs == "softmax" else FOCAL_COSTS
    logits, _, boxes = random_queries(Q, K, h, w, gen)
    pred = InstanceData(scores=logits, bboxes=boxes)
    gts = random_gts(G, h, w, C, gen)
    meta = dict(img_shape=(h, w))
    stock_a = HungarianAssigner(match_costs)
    stock = stock_a.assign(pred, gts, meta)
    ours = mm.FusedHungarianAssigner(match_costs).assign(pred, gts, meta)
    assert ours.num_gts == stock.num_gts and ours.max_overlaps is None
    assert ours.gt_inds.dtype == ours.labels.dtype == torch.long
    # an optimal matching: the same total cost under stock's own cost classes ...
    cost = stock_cost(stock_a, pred, gts, meta)
    total = [cost[r.gt_inds > 0, r.gt_inds[r.gt_inds > 0] - 1].sum() for r in (ours, stock)]
    torch.testing.assert_close(total[0], total[1], rtol=1e-5, atol=1e-5)
    assert int((ours.gt_inds > 0).sum()) == min(Q, G)
    # ... and, random costs having a unique optimum, the same assignment
    assert torch.equal(ours.gt_inds, stock.gt_inds)
    assert torch.equal(ours.labels, stock.labels)


def test_hungarian_assigner_early_returns_match_stock():
    gen = torch.Generator().manual_seed(1)
    logits, _, boxes = random_queries(7, 4, 40, 40, gen)
    gts = random_gts(3, 40, 40, 3, gen)
    meta = dict(img_shape=(40, 40))
    for pred, g in [(InstanceData(scores=logits, bboxes=boxes), gts[:0]),
                    (InstanceData(scores=logits[:0], bboxes=boxes[:0]), gts)]:
        stock = HungarianAssigner(SOFTMAX_COSTS).assign(pred, g, meta)
        ours = mm.FusedHungarianAssigner(SOFTMAX_COSTS).assign(pred, g, meta)
        assert ours.num_gts == stock.num_gts and ours.max_overlaps is None
        assert torch.equal(ours.gt_inds, stock.gt_inds) and torch.equal(ours.labels, stock.labels)


CLS = dict(type="ClassificationCost", weight=1.0)


@pytest.mark.parametrize("costs,name", [
    ([CLS, dict(type="BBoxL1Cost", weight=5.0)], "box_format='xyxy'"),
    ([CLS, dict(type="IoUCost", iou_mode="iou", weight=2.0)], "iou_mode='iou'"),
    ([CLS, dict(type="DiceCost", weight=1.0)], "DiceCost"),
    ([dict(type="FocalLossCost", weight=1.0, binary_input=True)], "binary_input=True"),
    ([CLS, dict(type="FocalLossCost", weight=1.0)], "one classification cost"),
    ([CLS, dict(type="ClassificationCost", weight=2.0)], "each cost once"),
])
def test_unsupported_match_cost_raises_naming_it(costs, name):
    with pytest.raises(ValueError, match=name):
        TASK_UTILS.build(dict(type="FusedHungarianAssigner", match_costs=costs))


# ----------------------------------------------------------------------------------------
# The DETR-family heads: loss_by_feat values and gradients vs stock
# ----------------------------------------------------------------------------------------

C, EMBED, LAYERS, Q = 3, 16, 3, 10
FOCAL = dict(type="FocalLoss", use_sigmoid=True, gamma=2.0, alpha=0.25, loss_weight=2.0)


def head_cfg(kind, as_two_stage=False):
    if kind == "DETRHead":  # loss_cls given: DETRHead's default dict is mutated when it is built
        return dict(num_classes=C, embed_dims=EMBED,
                    loss_cls=dict(type="CrossEntropyLoss", bg_cls_weight=0.1, use_sigmoid=False,
                                  loss_weight=1.0, class_weight=1.0),
                    train_cfg=dict(assigner=dict(type="HungarianAssigner", match_costs=SOFTMAX_COSTS)))
    cfg = dict(num_classes=C, embed_dims=EMBED, num_pred_layer=LAYERS + as_two_stage,
               as_two_stage=as_two_stage, sync_cls_avg_factor=True, loss_cls=FOCAL,
               loss_bbox=dict(type="L1Loss", loss_weight=5.0),
               loss_iou=dict(type="GIoULoss", loss_weight=2.0),
               train_cfg=dict(assigner=dict(type="HungarianAssigner", match_costs=FOCAL_COSTS)))
    return cfg


def build_pair(kind, **kw):
    torch.manual_seed(0)
    stock = MODELS.build(dict(type=kind, **head_cfg(kind, **kw)))
    ours = MODELS.build(dict(type="Fused" + kind, **head_cfg(kind, **kw)))
    ours.load_state_dict(stock.state_dict())
    assert isinstance(ours, type(stock))
    return stock, ours


def batch(gen, K, queries, counts=(4, 0, 12), enc_queries=None):
    shapes = [(60, 80), (50, 70), (64, 64)][:len(counts)]
    gts = [random_gts(g, h, w, C, gen) for g, (h, w) in zip(counts, shapes)]
    metas = [dict(img_shape=s, batch_input_shape=(64, 80)) for s in shapes]
    B = len(counts)
    cls = torch.randn(LAYERS, B, queries, K, generator=gen) * 2
    box = torch.rand(LAYERS, B, queries, 4, generator=gen) * 0.5 + 0.2
    enc = None
    if enc_queries:
        enc = (torch.randn(B, enc_queries, K, generator=gen) * 2,
               torch.rand(B, enc_queries, 4, generator=gen) * 0.5 + 0.2)
    return cls, box, enc, gts, metas


def run(head, args, gts, metas, **kw):
    args = [None if a is None else a.detach().clone().requires_grad_(True) for a in args]
    losses = head.loss_by_feat(*args, copy.deepcopy(gts), metas, **kw)
    sum(losses.values()).backward()
    return losses, [a.grad for a in args if a is not None]


def assert_same(ours, stock):
    (o_losses, o_grads), (s_losses, s_grads) = ours, stock
    assert o_losses.keys() == s_losses.keys()
    for k in s_losses:
        torch.testing.assert_close(o_losses[k], s_losses[k], rtol=1e-5, atol=1e-7, msg=k)
    for o, s in zip(o_grads, s_grads):
        torch.testing.assert_close(o, s, rtol=1e-4, atol=1e-7)


@pytest.fixture
def count_solves(monkeypatch):
    calls = []
    solve = ops.hungarian_match

    def counting(cost, *args, **kwargs):
        calls.append(tuple(cost.shape))
        return solve(cost, *args, **kwargs)
    monkeypatch.setattr(ops, "hungarian_match", counting)
    return calls


@pytest.mark.parametrize("seed", range(2))
def test_detr_head_loss_matches_stock(seed, count_solves):
    stock, ours = build_pair("DETRHead")
    cls, box, _, gts, metas = batch(torch.Generator().manual_seed(seed), C + 1, Q)
    s = run(stock, [cls, box], gts, metas)
    o = run(ours, [cls, box], gts, metas)
    assert_same(o, s)
    assert "d0.loss_cls" in o[0] and o[0]["loss_bbox"] > 0
    assert ours.bg_cls_weight == stock.bg_cls_weight == 0.1  # no-object weight applied as stock
    assert count_solves == [(LAYERS * 3, Q, 12)]  # every layer and image in one call


@pytest.mark.parametrize("as_two_stage", [False, True])
def test_deformable_detr_head_loss_matches_stock(as_two_stage, count_solves):
    stock, ours = build_pair("DeformableDETRHead", as_two_stage=as_two_stage)
    cls, box, enc, gts, metas = batch(torch.Generator().manual_seed(3), C, Q,
                                      enc_queries=16 if as_two_stage else None)
    args = [cls, box] + (list(enc) if enc else [None, None])
    s = run(stock, args, gts, metas)
    o = run(ours, args, gts, metas)
    assert_same(o, s)
    assert ("enc_loss_cls" in o[0]) == as_two_stage
    # decoder layers in one call; the encoder proposals (another query count, label-0 gts) in one
    assert count_solves == [(LAYERS * 3, Q, 12)] + ([(3, 16, 12)] if as_two_stage else [])


def test_dino_head_loss_matches_stock(count_solves):
    stock, ours = build_pair("DINOHead", as_two_stage=True)
    groups, per_group = 2, 24
    dn = groups * per_group
    cls, box, _, gts, metas = batch(torch.Generator().manual_seed(4), C, dn + Q)
    enc = (torch.randn(3, Q, C), torch.rand(3, Q, 4) * 0.5 + 0.2)
    dn_meta = dict(num_denoising_queries=dn, num_denoising_groups=groups)
    s = run(stock, [cls, box, *enc], gts, metas, dn_meta=dn_meta)
    o = run(ours, [cls, box, *enc], gts, metas, dn_meta=dn_meta)
    assert_same(o, s)
    assert {"enc_loss_cls", "dn_loss_cls", "d0.dn_loss_bbox"} <= set(o[0])
    # decoder layers (matching queries only) and encoder proposals in a single call
    assert count_solves == [((LAYERS + 1) * 3, Q, 12)]


def test_detr_get_targets_matches_stock():
    stock, ours = build_pair("DETRHead")
    cls, box, _, gts, metas = batch(torch.Generator().manual_seed(9), C + 1, Q)
    s = stock.get_targets(list(cls[0]), list(box[0]), gts, metas)
    o = ours.get_targets(list(cls[0]), list(box[0]), gts, metas)
    assert o[4:] == s[4:]  # num_total_pos, num_total_neg (host ints)
    for o_list, s_list in zip(o[:4], s[:4]):
        for x, y in zip(o_list, s_list):
            assert x.dtype == y.dtype
            torch.testing.assert_close(x, y)


def test_detr_head_rejects_a_non_hungarian_assigner():
    cfg = head_cfg("DETRHead")
    cfg["train_cfg"] = dict(assigner=dict(type="DynamicSoftLabelAssigner"))
    with pytest.raises(TypeError, match="HungarianAssigner"):
        MODELS.build(dict(type="FusedDETRHead", **cfg))
