"""RTMDet model: architecture (parameter counts of SPEC 5), mmdet checkpoints, inference."""
import math

import pytest
import torch

import rtmdet
from rtmdet.checkpoint import to_mmdet_state_dict
from rtmdet.model import RTMDetConfig, postprocess

pytestmark = pytest.mark.filterwarnings("ignore:rtmdet.ops.*:RuntimeWarning")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return rtmdet.RTMDet.from_name("tiny").eval()


@pytest.mark.parametrize("size,millions", [("tiny", 4.90), ("s", 8.89), ("m", 24.71),
                                           ("l", 52.32), ("x", 94.86)])
def test_parameter_counts_match_spec(size, millions):
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = rtmdet.RTMDet(RTMDetConfig.from_name(size))
    count = sum(p.numel() for p in model.parameters())  # shared head convs counted once
    assert abs(count / 1e6 - millions) <= 0.01, count


@pytest.mark.parametrize("size,blocks", [("tiny", (1, 1, 1, 1, 1)), ("s", (1, 2, 2, 1, 1)),
                                         ("m", (2, 4, 4, 2, 2)), ("x", (4, 8, 8, 4, 4))])
def test_depth_and_width(size, blocks):
    with torch.device("meta"):
        model = rtmdet.RTMDet.from_name(size)
    cfg = model.cfg
    got = [len(getattr(model.backbone, f"stage{i}")[-1].blocks) for i in range(1, 5)]
    got.append(len(model.neck.top_down_blocks[0].blocks))
    assert tuple(got) == blocks
    assert model.neck.out_convs[0].conv.out_channels == cfg.neck_channels
    assert model.bbox_head.rtm_cls[0].in_channels == cfg.neck_channels
    assert model.backbone.stage4[1].__class__.__name__ == "SPPFBottleneck"
    assert model.backbone.stage3[1].attention is not None          # backbone CSP: attention
    assert model.neck.top_down_blocks[0].attention is None         # neck CSP: none


def test_forward_shapes_and_stride_scaling(tiny):
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        cls, reg = tiny(x)
        feats = tiny.neck(tiny.backbone(x))
    assert [tuple(c.shape) for c in cls] == [(2, 80, 8, 12), (2, 80, 4, 6), (2, 80, 2, 3)]
    assert [tuple(r.shape) for r in reg] == [(2, 4, 8, 12), (2, 4, 4, 6), (2, 4, 2, 3)]
    # the regression output is the raw 1x1 conv output times the level's stride
    head = tiny.bbox_head
    with torch.no_grad():
        r = feats[1]
        for layer in head.reg_convs[1]:
            r = layer(r)
        torch.testing.assert_close(reg[1], head.rtm_reg[1](r) * 16)


def test_exp_on_reg_gives_positive_distances():
    torch.manual_seed(0)
    model = rtmdet.RTMDet(RTMDetConfig.from_name("tiny", exp_on_reg=True, num_classes=2)).eval()
    with torch.no_grad():
        _, reg = model(torch.randn(1, 3, 64, 64))
    assert all((r > 0).all() for r in reg)
    assert RTMDetConfig.from_name("m").exp_on_reg and not RTMDetConfig.from_name("s").exp_on_reg


def test_head_shares_convs_but_not_norms(tiny):
    head = tiny.bbox_head
    for convs in (head.cls_convs, head.reg_convs):
        for level in range(1, 3):
            for i in range(2):
                assert convs[level][i].conv is convs[0][i].conv
                assert convs[level][i].bn is not convs[0][i].bn
    assert head.cls_convs[0][0].conv is not head.reg_convs[0][0].conv


def test_initialisation_and_norm_settings(tiny):
    bias = -math.log((1 - 0.01) / 0.01)
    for conv in tiny.bbox_head.rtm_cls:
        torch.testing.assert_close(conv.bias, torch.full_like(conv.bias, bias))
        assert conv.weight.std().item() == pytest.approx(0.01, rel=0.2)
    for conv in tiny.bbox_head.rtm_reg:
        assert (conv.bias == 0).all()
    bns = [m for m in tiny.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(m.momentum == 0.03 and m.eps == 1e-3 for m in bns)
    assert all(isinstance(m, torch.nn.SiLU) for m in (tiny.backbone.stem[0].activate,))


def test_normalize_images():
    rgb = torch.tensor([123.675, 116.28, 103.53]).view(1, 3, 1, 1).expand(2, 3, 4, 5)
    torch.testing.assert_close(rtmdet.normalize_images(rgb), torch.zeros(2, 3, 4, 5))
    img = torch.randint(0, 256, (1, 3, 6, 7), dtype=torch.uint8)
    out = rtmdet.normalize_images(img)
    torch.testing.assert_close(out, rtmdet.normalize_images(img.float()))
    # channel 0 of the output is blue: (B - 103.53) / 57.375
    torch.testing.assert_close(out[:, 0], (img[:, 2].float() - 103.53) / 57.375)
    torch.testing.assert_close(out[:, 2], (img[:, 0].float() - 123.675) / 58.395)
    with pytest.raises(ValueError, match="images"):
        rtmdet.normalize_images(torch.zeros(3, 4, 4))


# ----------------------------------------------------------------------------------------
# mmdetection checkpoints
# ----------------------------------------------------------------------------------------

def randomised(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in model.state_dict().values():  # shared tensors are filled once per level:
            if t.is_floating_point():          # the last fill wins, identically everywhere
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
    return model


def test_key_layout_is_mmdetection():
    sd = to_mmdet_state_dict(rtmdet.RTMDet.from_name("tiny"))
    expected = {  # (key, shape) for RTMDet-tiny as mmdetection 3.x names them
        "backbone.stem.0.conv.weight": (12, 3, 3, 3),
        "backbone.stem.2.bn.running_var": (24,),
        "backbone.stage1.0.conv.weight": (48, 24, 3, 3),
        "backbone.stage1.1.blocks.0.conv2.depthwise_conv.conv.weight": (24, 1, 5, 5),
        "backbone.stage1.1.blocks.0.conv2.pointwise_conv.bn.weight": (24,),
        "backbone.stage1.1.attention.fc.weight": (48, 48, 1, 1),
        "backbone.stage4.1.conv1.conv.weight": (192, 384, 1, 1),
        "backbone.stage4.1.conv2.conv.weight": (384, 768, 1, 1),
        "backbone.stage4.2.final_conv.bn.num_batches_tracked": (),
        "neck.reduce_layers.0.conv.weight": (192, 384, 1, 1),
        "neck.top_down_blocks.1.short_conv.conv.weight": (48, 192, 1, 1),
        "neck.downsamples.1.conv.weight": (192, 192, 3, 3),
        "neck.bottom_up_blocks.1.final_conv.conv.weight": (384, 384, 1, 1),
        "neck.out_convs.2.conv.weight": (96, 384, 3, 3),
        "bbox_head.cls_convs.2.1.conv.weight": (96, 96, 3, 3),
        "bbox_head.reg_convs.1.0.bn.running_mean": (96,),
        "bbox_head.rtm_cls.1.weight": (80, 96, 1, 1),
        "bbox_head.rtm_reg.2.bias": (4,),
    }
    for key, shape in expected.items():
        assert key in sd, key
        assert tuple(sd[key].shape) == shape, key
    assert not any("attention" in k for k in sd if k.startswith("neck."))


def test_checkpoint_round_trip_is_exact():
    torch.manual_seed(0)
    src = randomised(rtmdet.RTMDet.from_name("tiny", num_classes=3), 1).eval()
    sd = to_mmdet_state_dict(src)
    sd["data_preprocessor.mean"] = torch.zeros(3, 1, 1)
    sd["ema_backbone_stem_0_conv_weight"] = torch.zeros(12, 3, 3, 3)
    dst = rtmdet.RTMDet.from_name("tiny", num_classes=3).eval()
    assert rtmdet.load_mmdet_state_dict(dst, {"state_dict": sd, "meta": {}}, bn_eps=None) is dst
    for (k, a), (k2, b) in zip(src.state_dict().items(), dst.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(sum(src(x), []), sum(dst(x), [])):
            assert torch.equal(a, b)


def test_checkpoint_ema_weights():
    src = randomised(rtmdet.RTMDet.from_name("tiny", num_classes=2), 2)
    ema = randomised(rtmdet.RTMDet.from_name("tiny", num_classes=2), 3)
    ckpt = {"state_dict": to_mmdet_state_dict(src),
            "ema_state_dict": {"steps": torch.tensor(5),
                               **{"module." + k: v for k, v in to_mmdet_state_dict(ema).items()}}}
    dst = rtmdet.RTMDet.from_name("tiny", num_classes=2)
    rtmdet.load_mmdet_state_dict(dst, ckpt, use_ema=True)
    assert all(torch.equal(a, b) for a, b in zip(ema.state_dict().values(), dst.state_dict().values()))
    rtmdet.load_mmdet_state_dict(dst, ckpt)
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values()))
    # mmdet 2.x style: "ema_" buffers beside the raw weights (parameters only)
    sd = to_mmdet_state_dict(src)
    w = torch.full_like(sd["bbox_head.rtm_reg.0.weight"], 7.0)
    sd["ema_bbox_head_rtm_reg_0_weight"] = w
    rtmdet.load_mmdet_state_dict(dst, sd, use_ema=True)
    assert torch.equal(dst.bbox_head.rtm_reg[0].weight, w)
    assert torch.equal(dst.bbox_head.rtm_cls[0].weight, src.bbox_head.rtm_cls[0].weight)
    with pytest.raises(ValueError, match="no EMA"):
        rtmdet.load_mmdet_state_dict(dst, to_mmdet_state_dict(src), use_ema=True)


def test_checkpoint_errors(tiny):
    sd = to_mmdet_state_dict(tiny)
    bad = dict(sd)
    del bad["neck.out_convs.0.bn.weight"]
    bad["neck.extra.weight"] = torch.zeros(1)
    with pytest.raises(KeyError, match=r"missing keys: \[neck.out_convs.0.bn.weight\].*"
                                       r"unexpected keys: \[neck.extra.weight\]"):
        rtmdet.load_mmdet_state_dict(rtmdet.RTMDet.from_name("tiny"), bad)
    bad = dict(sd)
    bad["bbox_head.cls_convs.2.0.conv.weight"] = sd["bbox_head.cls_convs.2.0.conv.weight"] + 1
    with pytest.raises(ValueError, match="cls_convs.2.0.conv.weight differs"):
        rtmdet.load_mmdet_state_dict(rtmdet.RTMDet.from_name("tiny"), bad)
    with pytest.raises(ValueError, match="num_classes"):
        rtmdet.load_mmdet_state_dict(rtmdet.RTMDet.from_name("tiny", num_classes=3), sd)


# ----------------------------------------------------------------------------------------
# Inference
# ----------------------------------------------------------------------------------------

def synthetic_head(B, C, size, strides=(8, 16, 32)):
    """All logits -20 (score ~2e-9), distances 2 px: nothing passes a threshold until set."""
    cls = [torch.full((B, C, size // s, size // s), -20.0) for s in strides]
    reg = [torch.full((B, 4, size // s, size // s), 2.0) for s in strides]
    return cls, reg


def test_postprocess_decodes_and_rescales_per_image():
    cls, reg = synthetic_head(2, 3, 64)
    # image 0: level 0 prior (row 2, col 3) at (24, 16), class 1, box ltrb (4, 6, 10, 8)
    cls[0][0, 1, 2, 3] = 3.0
    reg[0][0, :, 2, 3] = torch.tensor([4.0, 6.0, 10.0, 8.0])
    # image 1: level 1 prior (1, 2) at (32, 16), class 2
    cls[1][1, 2, 1, 2] = 1.0
    reg[1][1, :, 1, 2] = torch.tensor([8.0, 8.0, 8.0, 8.0])
    out = postprocess(cls, reg, (8, 16, 32), (64, 64), scale_factors=[[2.0, 0.5], [1.0, 4.0]])
    assert len(out) == 2
    torch.testing.assert_close(out[0]["boxes"], torch.tensor([[20 / 2, 10 / 0.5, 34 / 2, 24 / 0.5]]))
    torch.testing.assert_close(out[0]["scores"], torch.sigmoid(torch.tensor([3.0])))
    assert out[0]["labels"].tolist() == [1] and out[0]["labels"].dtype == torch.int64
    torch.testing.assert_close(out[1]["boxes"], torch.tensor([[24.0, 8 / 4, 40.0, 24 / 4]]))
    assert out[1]["labels"].tolist() == [2]


def test_postprocess_nms_is_class_aware_and_clips():
    cls, reg = synthetic_head(1, 2, 64)
    # two neighbouring priors (8 px apart) with big, nearly identical boxes
    reg[0][0, :, 3, 3] = torch.tensor([20.0, 20.0, 20.0, 20.0])     # (24, 24): [4, 4, 44, 44]
    reg[0][0, :, 3, 4] = torch.tensor([28.0, 20.0, 12.0, 20.0])     # (32, 24): [4, 4, 44, 44]
    cls[0][0, 0, 3, 3] = 2.0
    cls[0][0, 0, 3, 4] = 1.0
    out = postprocess(cls, reg, (8, 16, 32), (64, 64))[0]
    assert out["scores"].tolist() == pytest.approx([torch.sigmoid(torch.tensor(2.0)).item()])
    cls[0][0, 1, 3, 4] = 1.0  # the same box in another class survives NMS
    cls[0][0, 0, 3, 4] = -20.0
    out = postprocess(cls, reg, (8, 16, 32), (64, 64))[0]
    assert sorted(out["labels"].tolist()) == [0, 1]
    assert (out["scores"][:-1] >= out["scores"][1:]).all()
    # a box beyond the input is clipped to it (before rescaling)
    reg[2][0, :, 1, 1] = torch.tensor([10.0, 10.0, 100.0, 100.0])  # (32, 32): [22, 22, 132, 132]
    cls[2][0, 1, 1, 1] = 5.0
    out = postprocess(cls, reg, (8, 16, 32), (64, 64), scale_factors=torch.tensor([[0.5, 0.5]]))[0]
    torch.testing.assert_close(out["boxes"][0], torch.tensor([44.0, 44.0, 128.0, 128.0]))


def test_postprocess_limits_and_empty():
    cls, reg = synthetic_head(2, 4, 64)
    out = postprocess(cls, reg, (8, 16, 32), (64, 64))
    for d in out:
        assert d["boxes"].shape == (0, 4) and d["scores"].shape == (0,) and d["labels"].shape == (0,)
    # every (prior, class) passes: nms_pre caps per level, max_per_img the final count
    cls = [torch.randn(1, 4, *c.shape[-2:]) + 5 for c in cls]
    reg = [torch.rand(1, 4, *r.shape[-2:]) * 20 + 1 for r in reg]
    out = postprocess(cls, reg, (8, 16, 32), (64, 64), nms_pre=5, iou_thr=1.0, max_per_img=100)[0]
    assert len(out["scores"]) == 15                        # 5 per level, none suppressed
    out = postprocess(cls, reg, (8, 16, 32), (64, 64), iou_thr=1.0, max_per_img=7)[0]
    top = torch.cat([c.sigmoid().flatten() for c in cls]).sort(descending=True).values[:7]
    torch.testing.assert_close(out["scores"], top)
    with pytest.raises(ValueError, match="scale_factors"):
        postprocess(cls, reg, (8, 16, 32), (64, 64), scale_factors=[[1.0, 1.0], [1.0, 1.0]])


def test_predict_runs_on_a_batch(tiny):
    x = torch.randn(2, 3, 64, 64)
    out = tiny.predict(x, score_thr=0.0, max_per_img=20, scale_factors=[[1.0, 1.0], [0.5, 0.25]])
    assert len(out) == 2
    for d, (sx, sy) in zip(out, [(1.0, 1.0), (0.5, 0.25)]):
        assert 0 < len(d["boxes"]) <= 20
        assert (d["boxes"][:, 2] <= 64 / sx + 1e-4).all() and (d["boxes"][:, 3] <= 64 / sy + 1e-4).all()
        assert (d["scores"][:-1] >= d["scores"][1:]).all()
        assert d["labels"].dtype == torch.int64 and (d["labels"] < 80).all()


def test_loading_mmdet_weights_sets_mmdet_batchnorm_eps():
    src = rtmdet.RTMDet.from_name("tiny", num_classes=3)
    assert {m.eps for m in src.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {1e-3}
    dst = rtmdet.load_mmdet_state_dict(rtmdet.RTMDet.from_name("tiny", num_classes=3),
                                       to_mmdet_state_dict(src))
    assert {m.eps for m in dst.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {1e-5}
