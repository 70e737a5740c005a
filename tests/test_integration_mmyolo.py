"""rtmdet.integrations.mmyolo against the real mmyolo 0.6: stock BatchDynamicSoftLabelAssigner
beside ours on the same inputs, and mmyolo's RTMDetHead.loss_by_feat with either assigner.

mmcv-lite ships no compiled ops, but `import mmyolo.models` imports `mmcv.ops`, which loads
`mmcv._ext`; tests/mmcv_stub.py registers a stand-in for it first (nothing on these code
paths calls a compiled op; any call would raise).
"""
import pytest
import torch

from tests.mmcv_stub import install_mmcv_ext_stub

pytest.importorskip("mmyolo", reason="mmyolo 0.6 is not installed (scripts/test.sh installs it)")
install_mmcv_ext_stub()
import mmyolo.models  # noqa: E402,F401  (registers the stock classes)
from mmengine.config import ConfigDict  # noqa: E402
from mmengine.registry import DefaultScope  # noqa: E402
from mmengine.structures import InstanceData  # noqa: E402
from mmyolo.registry import MODELS, TASK_UTILS  # noqa: E402

from rtmdet import ops  # noqa: E402
from rtmdet.integrations.mmyolo import FusedBatchDynamicSoftLabelAssigner  # noqa: E402

@pytest.fixture(autouse=True)
def mmyolo_scope():
    """Build by name in mmyolo's registry scope, as mmyolo's configs (default_scope='mmyolo')
    do; other tests may have left another default scope (e.g. mmdet's) current."""
    with DefaultScope.overwrite_default_scope("mmyolo"):
        yield


KEYS = ("assigned_labels", "assigned_labels_weights", "assigned_bboxes", "assign_metrics")


def random_batch(seed, B=3, C=5, size=128, M=6, min_gts=1):
    """mmyolo-style padded batch: gts (B, M, 4) zero-padded at the end, labels and flags
    (B, M, 1) float; predictions near their prior so that IoUs are mostly > 0."""
    g = torch.Generator().manual_seed(seed)
    priors = ops.grid_priors([(size // 8,) * 2, (size // 16,) * 2, (size // 32,) * 2])
    N = priors.shape[0]
    n = torch.randint(min_gts, M + 1, (B,), generator=g)
    mask = torch.arange(M)[None] < n[:, None]
    wh = torch.rand(B, M, 2, generator=g) * 64 + 24
    xy = torch.rand(B, M, 2, generator=g) * (size - wh)
    gt = torch.cat([xy, xy + wh], -1) * mask[..., None]
    labels = torch.randint(0, C, (B, M, 1), generator=g).float() * mask[..., None]
    pwh = torch.rand(B, N, 2, generator=g) * 60 + 8
    centre = priors[None, :, :2] + (torch.rand(B, N, 2, generator=g) - 0.5) * 16
    pred = torch.cat([centre - pwh / 2, centre + pwh / 2], -1)
    logits = torch.randn(B, N, C, generator=g) * 2
    return pred, logits, priors, labels, gt, mask[..., None].float()


def pair(num_classes=5, **kw):
    return tuple(TASK_UTILS.build(dict(type=t, num_classes=num_classes, **kw))
                 for t in ("BatchDynamicSoftLabelAssigner", "FusedBatchDynamicSoftLabelAssigner"))


def assert_same_dict(a, b):
    assert set(a) == set(b) == set(KEYS)
    for k in KEYS:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


def test_registered_with_the_stock_constructor():
    cls = FusedBatchDynamicSoftLabelAssigner
    assert TASK_UTILS.get("FusedBatchDynamicSoftLabelAssigner") is cls
    a = TASK_UTILS.build(dict(type="FusedBatchDynamicSoftLabelAssigner", num_classes=7,
                              soft_center_radius=2.5, topk=9, iou_weight=2.0,
                              iou_calculator=dict(type="BboxOverlaps2D"), batch_iou=False))
    assert isinstance(a, torch.nn.Module)
    assert (a.num_classes, a.soft_center_radius, a.topk, a.iou_weight) == (7, 2.5, 9, 2.0)


@pytest.mark.parametrize("seed", range(6))
def test_equals_stock_on_random_batches(seed):
    stock, ours = pair()
    args = random_batch(seed)
    a, b = stock(*args), ours(*args)
    assert_same_dict(a, b)
    fg = b["assigned_labels"] < 5
    assert fg.sum() > 10 and (b["assign_metrics"][fg] > 0).all()   # a non-trivial case
    assert (b["assign_metrics"][~fg] == 0).all() and (b["assigned_bboxes"][~fg] == 0).all()


def test_equals_stock_with_other_hyper_parameters():
    stock, ours = pair(num_classes=3, topk=7, soft_center_radius=2.0, iou_weight=1.5,
                       batch_iou=False)
    for seed in (10, 11):
        assert_same_dict(stock(*random_batch(seed, C=3, B=2, M=9)),
                         ours(*random_batch(seed, C=3, B=2, M=9)))


def test_empty_inputs_match_stock():
    stock, ours = pair()
    pred, logits, priors, labels, gt, flags = random_batch(0)
    # no gt slots
    assert_same_dict(stock(pred, logits, priors, labels[:, :0], gt[:, :0], flags[:, :0]),
                     ours(pred, logits, priors, labels[:, :0], gt[:, :0], flags[:, :0]))
    # gt slots, all padding
    zero = torch.zeros_like(flags)
    out = ours(pred, logits, priors, labels * 0, gt * 0, zero)
    assert_same_dict(stock(pred, logits, priors, labels * 0, gt * 0, zero), out)
    assert (out["assigned_labels"] == 5).all()
    # no priors
    assert_same_dict(stock(pred[:, :0], logits[:, :0], priors[:0], labels, gt, flags),
                     ours(pred[:, :0], logits[:, :0], priors[:0], labels, gt, flags))


def test_padding_anywhere_equals_stock_with_trailing_padding():
    """Stock only handles mmyolo's trailing padding; ours gives the same targets wherever the
    padded slots sit (targets hold labels and boxes, not slot indices)."""
    stock, ours = pair()
    pred, logits, priors, labels, gt, flags = random_batch(3, M=8, min_gts=3)
    perm = torch.tensor([7, 0, 6, 1, 5, 2, 4, 3])   # interleaves real and padded slots
    moved = ours(pred, logits, priors, labels[:, perm], gt[:, perm], flags[:, perm])
    assert_same_dict(stock(pred, logits, priors, labels, gt, flags), moved)


def one_level_priors(n=8, stride=8):
    return ops.grid_priors([(n, n)], strides=(stride,))


def test_padded_gt_never_wins_a_prior():
    """Stock defect: a contested prior goes to the row's cheapest column, padded ones
    included. Two real gts (label 1) both pick prior 18 = (16, 16); every prediction has IoU 0,
    so their costs there are 48.35 + f(3, 0) + centre ~ 51.1, while the zero-box padding slot
    (label 0, logit -10) costs 48.35 + 0 + 10^(2.83 - 3) ~ 49.0 and wins in stock."""
    priors = one_level_priors()
    N = priors.shape[0]
    pred = torch.tensor([60.0, 60.0, 61.0, 61.0]).expand(1, N, 4).clone()   # IoU 0 with all gts
    logits = torch.stack([torch.full((N,), -10.0), torch.full((N,), 10.0)], -1)[None].clone()
    logits[0, 18, 1] = 3.0                        # the cheapest prior of both real gts
    gt = torch.tensor([[[0.5, 0.5, 30.5, 30.5], [1.0, 1.0, 29.0, 29.0], [0, 0, 0, 0]]])
    labels = torch.tensor([[[1.0], [1.0], [0.0]]])
    flags = torch.tensor([[[1.0], [1.0], [0.0]]])
    stock, ours = pair(num_classes=2)
    args = (pred, logits, priors, labels, gt, flags)
    a, b = stock(*args), ours(*args)
    # stock: the padded gt's label 0 and zero box
    assert a["assigned_labels"][0, 18] == 0 and (a["assigned_bboxes"][0, 18] == 0).all()
    # ours: the cheaper real gt (centre (15.5, 15.5) is nearer to (16, 16) than (15, 15))
    assert b["assigned_labels"][0, 18] == 1
    assert torch.equal(b["assigned_bboxes"][0, 18], gt[0, 0])
    assert b["assign_metrics"][0, 18] == 0                      # IoU 0, as stock's would be
    others = torch.arange(N) != 18
    for k in KEYS:
        assert torch.equal(a[k][0, others], b[k][0, others]), k
    assert (b["assigned_labels"][0, others] == 2).all()          # k = 1: prior 18 only


def test_invalid_priors_are_never_selected():
    """Stock defect: mmyolo's dynamic k counts IoUs over all priors; a small gt that contains a
    single prior, with every prediction equal to it, gets k = 13 and stock fills the other 12
    picks with invalid priors (cost 1e8). Ours assigns the valid prior only."""
    priors = one_level_priors()
    N = priors.shape[0]
    box = torch.tensor([20.0, 20.0, 28.0, 28.0])                 # contains prior (24, 24) only
    pred = box.expand(1, N, 4).clone()
    logits = torch.zeros(1, N, 3)
    gt, labels, flags = box.view(1, 1, 4), torch.tensor([[[2.0]]]), torch.ones(1, 1, 1)
    stock, ours = pair(num_classes=3)
    args = (pred, logits, priors, labels, gt, flags)
    a, b = stock(*args), ours(*args)
    inside = ((priors[:, 0] > 20) & (priors[:, 0] < 28) & (priors[:, 1] > 20) & (priors[:, 1] < 28))
    assert inside.sum() == 1
    fg_stock, fg_ours = a["assigned_labels"][0] < 3, b["assigned_labels"][0] < 3
    assert fg_stock.sum() == 13 and fg_ours.sum() == 1
    assert torch.equal(fg_ours, inside)
    assert not inside[fg_stock & ~fg_ours].any()                 # stock's extras are invalid
    for k in KEYS:                                                # same on the valid prior
        assert torch.equal(a[k][0, inside], b[k][0, inside]), k


def test_bad_arguments():
    with pytest.raises(ValueError, match="iou_calculator"):
        FusedBatchDynamicSoftLabelAssigner(5, iou_calculator=dict(type="BboxOverlaps2D", scale=8.0))
    with pytest.raises(ValueError, match="iou_calculator"):
        FusedBatchDynamicSoftLabelAssigner(5, iou_calculator=dict(type="mmdet.RBboxOverlaps2D"))
    from mmdet.models.task_modules import BboxOverlaps2D   # a built calculator, as stock takes
    FusedBatchDynamicSoftLabelAssigner(5, iou_calculator=BboxOverlaps2D())
    with pytest.raises(ValueError, match="iou_calculator"):
        FusedBatchDynamicSoftLabelAssigner(5, iou_calculator=BboxOverlaps2D(scale=8.0))
    pred, logits, priors, labels, gt, flags = random_batch(0)
    ours = FusedBatchDynamicSoftLabelAssigner(5)
    with pytest.raises(ValueError, match=r"gt_labels must be \(B, M, 1\)"):
        ours(pred, logits, priors, labels[..., 0], gt, flags)
    with pytest.raises(ValueError, match=r"pad_bbox_flag must be \(B, M, 1\)"):
        ours(pred, logits, priors, labels, gt, flags[:, :2])
    with pytest.raises(ValueError, match="gt_labels"):           # a real label outside [0, C)
        ours(pred, logits, priors, labels + 10 * flags, gt, flags)


def build_head(assigner_type, num_classes=4, channels=32):
    head = MODELS.build(dict(
        type="RTMDetHead",
        head_module=dict(type="RTMDetSepBNHeadModule", num_classes=num_classes,
                         in_channels=channels, feat_channels=channels, stacked_convs=2,
                         featmap_strides=[8, 16, 32]),
        # mmyolo reads train_cfg by attribute: a ConfigDict, as a config file gives
        train_cfg=ConfigDict(assigner=dict(type=assigner_type, num_classes=num_classes, topk=13,
                                           iou_calculator=dict(type="mmdet.BboxOverlaps2D")))))
    return head


def test_rtmdet_head_loss_and_gradients_equal_stock():
    """mmyolo's own RTMDetHead, assigner swapped by config: same losses, same gradients."""
    torch.manual_seed(0)
    stock = build_head("BatchDynamicSoftLabelAssigner")
    ours = build_head("FusedBatchDynamicSoftLabelAssigner")
    assert isinstance(ours.assigner, FusedBatchDynamicSoftLabelAssigner)
    ours.load_state_dict(stock.state_dict())
    B, size = 2, 128
    feats = [torch.randn(B, 32, size // s, size // s) for s in (8, 16, 32)]
    cls_scores, bbox_preds = stock(feats)
    cls_scores = [c.detach().requires_grad_() for c in cls_scores]
    # distances of 2-6 strides: boxes of 32-96 px that overlap the gts
    bbox_preds = [(torch.rand_like(b) * 4 + 2).requires_grad_() for b in bbox_preds]
    g = torch.Generator().manual_seed(1)
    gts = []
    for n in (3, 5):
        wh = torch.rand(n, 2, generator=g) * 60 + 24
        xy = torch.rand(n, 2, generator=g) * (size - wh)
        gts.append(InstanceData(bboxes=torch.cat([xy, xy + wh], 1),
                                labels=torch.randint(0, 4, (n,), generator=g)))
    metas = [dict(batch_input_shape=(size, size), img_shape=(size, size))] * B
    results = []
    for head in (stock, ours):
        losses = head.loss_by_feat(cls_scores, bbox_preds, gts, metas)
        total = losses["loss_cls"] + losses["loss_bbox"]
        grads = torch.autograd.grad(total, cls_scores + bbox_preds)
        results.append((losses, grads))
    (la, ga), (lb, gb) = results
    assert lb["loss_cls"] > 0 and lb["loss_bbox"] > 0
    for k in ("loss_cls", "loss_bbox"):
        torch.testing.assert_close(la[k], lb[k], rtol=0, atol=0)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_stock_config_switches_with_one_key():
    """mmyolo's RTMDet-s config with only the assigner type changed builds our assigner."""
    import os

    from mmengine.config import Config
    root = os.path.join(os.path.dirname(mmyolo.__file__), ".mim", "configs", "rtmdet")
    cfg = Config.fromfile(os.path.join(root, "rtmdet_s_syncbn_fast_8xb32-300e_coco.py"))
    cfg.merge_from_dict({"model.train_cfg.assigner.type": "FusedBatchDynamicSoftLabelAssigner"})
    head = MODELS.build(dict(cfg.model.bbox_head, train_cfg=cfg.model.train_cfg))
    assert isinstance(head.assigner, FusedBatchDynamicSoftLabelAssigner)
    assert (head.assigner.num_classes, head.assigner.topk) == (80, 13)


@pytest.mark.gpu
def test_cuda_tensors_with_backend_auto():
    stock, ours = pair()
    args = random_batch(4, B=8)
    cpu = ours(*args)
    gpu = {k: v.cpu() for k, v in ours(*(t.cuda() for t in args)).items() if v.is_cuda}
    assert set(gpu) == set(KEYS)
    for k in ("assigned_labels", "assigned_labels_weights", "assigned_bboxes"):
        assert torch.equal(cpu[k], gpu[k]), k
    # IoUs from the GPU kernel may differ from the CPU op's in the last bits
    torch.testing.assert_close(cpu["assign_metrics"], gpu["assign_metrics"], rtol=0, atol=1e-6)
    assert_same_dict(stock(*args), cpu)
