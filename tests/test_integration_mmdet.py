"""rtmdet.integrations.mmdet against real mmdetection 3.3: stock class beside ours, same inputs.

mmcv-lite ships no compiled ops and `import mmdet.models` imports `mmcv.ops`, which loads
`mmcv._ext`: `install_mmcv_ext_stub()` registers a stand-in for it first (tests/mmcv_stub.py;
nothing on these code paths calls a compiled op, and the stand-in raises if one is called).
"""
import copy
import os
import subprocess
import sys
import warnings

import pytest
import torch

pytest.importorskip("mmdet", reason="mmdetection 3.x is not installed (scripts/test.sh installs it)")
from tests.mmcv_stub import install_mmcv_ext_stub  # noqa: E402

install_mmcv_ext_stub()
import numpy as np  # noqa: E402
from mmdet.models.task_modules.assigners import DynamicSoftLabelAssigner  # noqa: E402
from mmdet.registry import MODELS  # noqa: E402
from mmdet.structures.bbox import HorizontalBoxes  # noqa: E402
from mmdet.structures.mask import BitmapMasks  # noqa: E402
from mmengine.structures import InstanceData  # noqa: E402

import rtmdet.integrations.mmdet as mm  # noqa: E402
from rtmdet import ops  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STRIDES = (8, 16, 32)


def random_gts(g, size, C, gen):
    """g boxes inside a size x size image (some tiny, some large), labels in [0, C)."""
    xy = torch.rand(g, 2, generator=gen) * size * 0.85
    wh = 2 + torch.rand(g, 2, generator=gen) ** 2 * size * 0.6
    boxes = torch.cat([xy, (xy + wh).clamp(max=size)], 1)
    return InstanceData(bboxes=boxes, labels=torch.randint(0, C, (g,), generator=gen))


def random_preds(priors, C, gen, spread=3.0):
    """Per-prior logits and decoded boxes around the prior (ltrb of a few strides)."""
    N = priors.shape[0]
    dist = torch.rand(N, 4, generator=gen) * spread * priors[:, 2:3] + 0.5
    return torch.randn(N, C, generator=gen) * 2, ops.distance2bbox(priors[:, :2], dist)


def assert_same_result(ours, stock):
    assert ours.num_gts == stock.num_gts
    assert torch.equal(ours.gt_inds, stock.gt_inds)
    assert torch.equal(ours.labels, stock.labels)
    assert ours.max_overlaps.dtype == stock.max_overlaps.dtype
    torch.testing.assert_close(ours.max_overlaps, stock.max_overlaps, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------
# FusedDynamicSoftLabelAssigner
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("G", [0, 1, 4, 25])
def test_assigner_matches_stock(seed, G):
    gen = torch.Generator().manual_seed(seed * 31 + G)
    size, C = 128, 5
    priors = ops.grid_priors([(size // s, size // s) for s in STRIDES], STRIDES)
    scores, boxes = random_preds(priors, C, gen)
    pred = InstanceData(priors=priors, bboxes=boxes, scores=scores)
    gts = random_gts(G, size, C, gen)
    kw = dict(topk=[13, 5, 1][seed % 3], soft_center_radius=[3.0, 2.0][seed % 2], iou_weight=3.0)
    stock = DynamicSoftLabelAssigner(**kw).assign(pred, gts)
    ours = mm.FusedDynamicSoftLabelAssigner(**kw).assign(pred, gts)
    assert_same_result(ours, stock)
    if G >= 4:  # (one gt may contain no prior point: then stock's early return, overlaps 0)
        assert (ours.gt_inds > 0).any()
        assert (ours.max_overlaps == -1e8).any()  # stock's fill once matching ran


def test_assigner_early_returns_match_stock():
    gen = torch.Generator().manual_seed(0)
    priors = ops.grid_priors([(8, 8), (4, 4), (2, 2)], STRIDES)
    scores, boxes = random_preds(priors, 3, gen)
    pred = InstanceData(priors=priors, bboxes=boxes, scores=scores)
    # a gt containing no prior point strictly: no valid prior -> all background, overlaps 0
    tiny = InstanceData(bboxes=torch.tensor([[1.0, 1.0, 7.0, 7.0], [8.0, 8.0, 8.0, 20.0]]),
                        labels=torch.tensor([0, 2]))
    empty_pred = InstanceData(priors=priors[:0], bboxes=boxes[:0], scores=scores[:0])
    for p, g in [(pred, tiny), (empty_pred, tiny), (pred, tiny[:0])]:
        stock = DynamicSoftLabelAssigner().assign(p, g)
        ours = mm.FusedDynamicSoftLabelAssigner().assign(p, g)
        assert_same_result(ours, stock)
        assert (ours.gt_inds == 0).all() and (ours.max_overlaps == 0).all()


def test_assigner_registered_and_built_from_config():
    from mmdet.registry import TASK_UTILS
    a = TASK_UTILS.build(dict(type="FusedDynamicSoftLabelAssigner", topk=7, iou_weight=2.0))
    assert isinstance(a, mm.FusedDynamicSoftLabelAssigner) and a.topk == 7 and a.iou_weight == 2.0


def test_assigner_limitations_raise_clearly():
    priors = ops.grid_priors([(4, 4)], (8,))
    pred = InstanceData(priors=priors, bboxes=torch.rand(16, 4) * 8 + torch.tensor([0, 0, 8, 8.0]),
                        scores=torch.randn(16, 2))
    gts = InstanceData(bboxes=torch.tensor([[2.0, 2.0, 20.0, 20.0]]), labels=torch.tensor([1]))
    with_masks = gts.clone()
    with_masks.masks = torch.ones(1, 32, 32, dtype=torch.bool)
    with pytest.raises(NotImplementedError, match="mask centre of mass"):
        mm.FusedDynamicSoftLabelAssigner().assign(pred, with_masks)
    boxed = InstanceData(bboxes=HorizontalBoxes(gts.bboxes), labels=gts.labels)
    with pytest.raises(TypeError, match="boxtype2tensor"):
        mm.FusedDynamicSoftLabelAssigner().assign(pred, boxed)
    with pytest.raises(ValueError, match="iou_calculator"):
        mm.FusedDynamicSoftLabelAssigner(iou_calculator=dict(type="BboxOverlaps2D", scale=512.0,
                                                             dtype="fp16"))


# ----------------------------------------------------------------------------------------
# The RTMDet heads: loss_by_feat values and gradients, get_targets
# ----------------------------------------------------------------------------------------

def head_cfg(kind, C=4, ch=8, **over):
    cfg = dict(
        num_classes=C, in_channels=ch, feat_channels=ch, stacked_convs=1,
        anchor_generator=dict(type="MlvlPointGenerator", offset=0, strides=list(STRIDES)),
        bbox_coder=dict(type="DistancePointBBoxCoder"),
        loss_cls=dict(type="QualityFocalLoss", use_sigmoid=True, beta=2.0, loss_weight=1.0),
        loss_bbox=dict(type="GIoULoss", loss_weight=2.0),
        train_cfg=dict(assigner=dict(type="DynamicSoftLabelAssigner", topk=13),
                       allowed_border=-1, pos_weight=-1, debug=False),
        test_cfg=dict(nms_pre=100, score_thr=0.05, nms=dict(type="nms", iou_threshold=0.6),
                      max_per_img=10))
    if kind == "RTMDetHead":
        cfg.update(with_objectness=False, norm_cfg=dict(type="GN", num_groups=4))
    if kind == "RTMDetInsSepBNHead":
        cfg.update(num_prototypes=4, dyconv_channels=4, num_dyconvs=2)
    cfg.update(over)
    return cfg


def build_pair(kind, **over):
    torch.manual_seed(0)
    stock = MODELS.build(dict(type=kind, **head_cfg(kind, **over)))
    ours = MODELS.build(dict(type="Fused" + kind, **head_cfg(kind, **over)))
    ours.load_state_dict(stock.state_dict())
    assert isinstance(ours, type(stock))
    return stock, ours


def batch_inputs(head, B, size, gen, counts=None, masks=False, pad_shapes=None):
    """Random head outputs (leaves) and gts for B images of size x size."""
    C = head.cls_out_channels
    sizes = [(size // s, size // s) for s in STRIDES]
    cls = [torch.randn(B, C, h, w, generator=gen) * 2 for h, w in sizes]
    reg = [(torch.rand(B, 4, h, w, generator=gen) * 3 + 0.2) * s for (h, w), s in zip(sizes, STRIDES)]
    counts = counts or [int(torch.randint(1, 12, (1,), generator=gen)) for _ in range(B)]
    gts, metas = [], []
    for b, g in enumerate(counts):
        gt = random_gts(g, size, C, gen)
        if masks:  # the boxes' top-left quarters: the centre of mass is far from the box centre
            m = np.zeros((g, size, size), dtype=np.uint8)
            for i, (x1, y1, x2, y2) in enumerate(gt.bboxes.tolist()):
                m[i, int(y1):int(y1 + (y2 - y1) / 4) + 1, int(x1):int(x1 + (x2 - x1) / 4) + 1] = 1
            gt.masks = BitmapMasks(m, size, size)
        gts.append(gt)
        pad = pad_shapes[b] if pad_shapes else (size, size)
        metas.append(dict(img_shape=pad, pad_shape=pad, batch_input_shape=(size, size)))
    return cls, reg, gts, metas


def leaves(ts):
    return [t.detach().clone().requires_grad_(True) for t in ts]


def run_loss(head, args, gts, metas):
    args = [leaves(a) if isinstance(a, (list, tuple)) else leaves([a])[0] for a in args]
    losses = head.loss_by_feat(*args, copy.deepcopy(gts), metas)
    total = sum(sum(v) if isinstance(v, list) else v for v in losses.values())
    total.backward()
    grads = [t.grad for a in args for t in (a if isinstance(a, list) else [a])]
    return losses, grads


def assert_same_losses(ours, stock):
    assert ours.keys() == stock.keys()
    for k in stock:
        a, b = ours[k], stock[k]
        assert isinstance(a, list) == isinstance(b, list), k
        a, b = (a, b) if isinstance(a, list) else ([a], [b])
        assert len(a) == len(b), k
        for x, y in zip(a, b):
            torch.testing.assert_close(x.detach().float(), y.detach().float(), rtol=1e-5, atol=1e-7)


def assert_same_grads(ours, stock):
    for x, y in zip(ours, stock):
        assert x is not None and y is not None
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("kind", ["RTMDetHead", "RTMDetSepBNHead"])
@pytest.mark.parametrize("seed", range(3))
def test_rtmdet_head_loss_matches_stock(kind, seed):
    stock, ours = build_pair(kind)
    gen = torch.Generator().manual_seed(seed)
    counts = [[3, 0, 9], [1, 14], [6, 6, 2, 11]][seed]   # an image without gts included
    cls, reg, gts, metas = batch_inputs(stock, len(counts), 128, gen, counts)
    s_losses, s_grads = run_loss(stock, [cls, reg], gts, metas)
    o_losses, o_grads = run_loss(ours, [cls, reg], gts, metas)
    assert_same_losses(o_losses, s_losses)
    assert_same_grads(o_grads, s_grads)
    assert sum(s_losses["loss_bbox"]) > 0  # the case has positives


def test_rtmdet_head_pad_shapes_and_pos_weight_match_stock():
    # images padded to different shapes: stock gives priors outside an image's pad_shape
    # label weight 0; a positive weight of 2 changes the positives' label weights
    stock, ours = build_pair("RTMDetSepBNHead", train_cfg=dict(
        assigner=dict(type="FusedDynamicSoftLabelAssigner", topk=9),
        allowed_border=-1, pos_weight=2.0, debug=False))
    gen = torch.Generator().manual_seed(5)
    cls, reg, gts, metas = batch_inputs(stock, 2, 128, gen, [5, 7], pad_shapes=[(128, 128), (96, 64)])
    for m, g in zip(metas, gts):  # gts inside their own image
        g.bboxes = torch.minimum(g.bboxes, torch.tensor(m["img_shape"][::-1] * 2, dtype=torch.float32))
    assert ours._inside_flags([c.shape[-2:] for c in cls], torch.zeros(336, 4), metas) is not None
    s_losses, s_grads = run_loss(stock, [cls, reg], gts, metas)
    o_losses, o_grads = run_loss(ours, [cls, reg], gts, metas)
    assert_same_losses(o_losses, s_losses)
    assert_same_grads(o_grads, s_grads)


def test_rtmdet_get_targets_matches_stock():
    stock, ours = build_pair("RTMDetSepBNHead")
    gen = torch.Generator().manual_seed(11)
    cls, reg, gts, metas = batch_inputs(stock, 3, 128, gen, [4, 0, 8])
    B, C = 3, stock.cls_out_channels
    sizes = [c.shape[-2:] for c in cls]
    outs = []
    for head in (stock, ours):
        anchors, valid = head.get_anchors(sizes, metas, device="cpu")
        flat = torch.cat([c.permute(0, 2, 3, 1).reshape(B, -1, C) for c in cls], 1)
        dec = torch.cat([ops.distance2bbox(a.reshape(-1, 4)[None, :, :2], r.permute(0, 2, 3, 1).reshape(B, -1, 4))
                         for a, r in zip(anchors[0], reg)], 1)
        outs.append(head.get_targets(flat, dec, anchors, valid, copy.deepcopy(gts), metas))
    (s_anchor, *s_levels, s_sampling), (o_anchor, *o_levels, o_sampling) = outs
    for s_list, o_list in zip([s_anchor] + s_levels, [o_anchor] + o_levels):
        assert len(s_list) == len(o_list) == 3
        for s, o in zip(s_list, o_list):
            assert s.shape == o.shape and s.dtype == o.dtype
            torch.testing.assert_close(o, s, rtol=1e-6, atol=1e-6)
    assert len(o_sampling) == len(s_sampling) == B
    for s, o in zip(s_sampling, o_sampling):
        for name in ("pos_inds", "neg_inds", "pos_assigned_gt_inds", "pos_gt_labels"):
            assert torch.equal(getattr(o, name), getattr(s, name)), name
        torch.testing.assert_close(o.pos_gt_bboxes, s.pos_gt_bboxes)
        torch.testing.assert_close(o.pos_priors, s.pos_priors)


@pytest.mark.parametrize("seed", range(2))
def test_rtmdet_ins_head_loss_matches_stock(seed):
    stock, ours = build_pair("RTMDetInsSepBNHead")
    gen = torch.Generator().manual_seed(seed + 100)
    B, size = 2, 64
    cls, reg, gts, metas = batch_inputs(stock, B, size, gen, [[6, 9], [0, 8]][seed], masks=True)
    feats = [torch.randn(B, 8, size // s, size // s, generator=gen) for s in STRIDES]
    _, _, kernels, mask_feat = stock(feats)
    args = [cls, reg, [k.detach() for k in kernels], mask_feat.detach()]
    s_losses, s_grads = run_loss(stock, args, gts, metas)
    o_losses, o_grads = run_loss(ours, args, gts, metas)
    assert set(s_losses) == {"loss_cls", "loss_bbox", "loss_mask"} and s_losses["loss_mask"] > 0
    assert_same_losses(o_losses, s_losses)
    assert_same_grads(o_grads, s_grads)


def test_unsupported_loss_falls_back_to_stock_loss():
    kw = dict(loss_bbox=dict(type="DIoULoss", loss_weight=2.0))
    with pytest.warns(UserWarning, match="DIoULoss"):
        stock, ours = build_pair("RTMDetSepBNHead", **kw)
    gen = torch.Generator().manual_seed(3)
    cls, reg, gts, metas = batch_inputs(stock, 2, 128, gen, [4, 6])
    s_losses, s_grads = run_loss(stock, [cls, reg], gts, metas)
    o_losses, o_grads = run_loss(ours, [cls, reg], gts, metas)
    assert_same_losses(o_losses, s_losses)
    assert_same_grads(o_grads, s_grads)


def test_head_rejects_a_non_dsl_assigner():
    with pytest.raises(TypeError, match="DynamicSoftLabelAssigner"):
        MODELS.build(dict(type="FusedRTMDetSepBNHead", **head_cfg("RTMDetSepBNHead", train_cfg=dict(
            assigner=dict(type="ATSSAssigner", topk=9), allowed_border=-1, pos_weight=-1))))


# ----------------------------------------------------------------------------------------
# The ready config, the import rule
# ----------------------------------------------------------------------------------------

@pytest.fixture
def mmengine_package_lookup(monkeypatch):
    """mmengine 0.10.7 finds `mmdet::` config bases through pkg_resources, which setuptools >= 81
    no longer ships; where it is missing, answer the same question through importlib."""
    try:
        import pkg_resources  # noqa: F401
        return
    except ImportError:
        pass
    import importlib.util
    import mmengine.config.config as mc

    def installed_path(package):
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            raise ModuleNotFoundError(package)
        return os.path.dirname(spec.origin)

    monkeypatch.setattr(mc, "is_installed", lambda p: importlib.util.find_spec(p) is not None)
    monkeypatch.setattr(mc, "get_installed_path", installed_path)


def test_ready_config_builds_and_trains_like_stock(mmengine_package_lookup):
    from mmengine.config import Config
    from mmdet.structures import DetDataSample
    from mmdet.utils import register_all_modules
    register_all_modules()
    cfg = Config.fromfile(os.path.join(ROOT, "configs/mmdet/rtmdet_s_fused.py"))
    assert cfg.model.bbox_head.type == "FusedRTMDetSepBNHead"
    assert cfg.model.bbox_head.feat_channels == 128  # RTMDet-s, inherited from mmdet's config
    stock_cfg = copy.deepcopy(cfg.model)
    stock_cfg.bbox_head.type = "RTMDetSepBNHead"
    torch.manual_seed(0)
    stock = MODELS.build(stock_cfg)
    ours = MODELS.build(cfg.model)
    ours.load_state_dict(stock.state_dict())
    assert type(ours.bbox_head) is mm.FusedRTMDetSepBNHead
    gen = torch.Generator().manual_seed(0)
    size = 96
    images = torch.rand(2, 3, size, size, generator=gen) * 255
    samples = []
    for g in (3, 5):
        s = DetDataSample(metainfo=dict(img_shape=(size, size), pad_shape=(size, size),
                                        batch_input_shape=(size, size)))
        s.gt_instances = random_gts(g, size, 80, gen)
        samples.append(s)
    out = []
    for model in (stock, ours):
        model.train()
        losses = model.loss(images, copy.deepcopy(samples))
        sum(sum(v) for v in losses.values()).backward()
        out.append((losses, model.bbox_head.rtm_cls[0].weight.grad.clone()))
    assert_same_losses(out[1][0], out[0][0])
    torch.testing.assert_close(out[1][1], out[0][1], rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("name,head,assigner", [
    ("rtmdet_s_fused_assigner.py", "RTMDetSepBNHead", "FusedDynamicSoftLabelAssigner"),
    ("rtmdet-ins_s_fused.py", "FusedRTMDetInsSepBNHead", "DynamicSoftLabelAssigner"),
])
def test_other_ready_configs_build(mmengine_package_lookup, name, head, assigner):
    from mmengine.config import Config
    from mmdet.utils import register_all_modules
    register_all_modules()
    cfg = Config.fromfile(os.path.join(ROOT, "configs/mmdet", name))
    model = MODELS.build(cfg.model)
    assert type(model.bbox_head).__name__ == head
    assert type(model.bbox_head.assigner).__name__ == assigner
    assert model.bbox_head.feat_channels == 128


def test_importing_rtmdet_imports_no_framework():
    code = ("import sys, rtmdet, rtmdet.integrations; "
            "bad = [m for m in sys.modules if m.split('.')[0] in "
            "('mmdet', 'mmengine', 'mmcv', 'mmyolo', 'ultralytics') or m.startswith('rtmdet.integrations.')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)
