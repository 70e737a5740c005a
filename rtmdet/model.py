"""RTMDet (SPEC section 5) in plain PyTorch: CSPNeXt backbone, CSPNeXtPAFPN neck, SepBN head.

Module and attribute names follow mmdetection 3.x (`backbone.stage1.1.blocks.0.conv2.
depthwise_conv.bn.weight`, `bbox_head.cls_convs.2.1.conv.weight`, ...) so that its
checkpoints load key for key (`rtmdet.checkpoint.load_mmdet_state_dict`).

Shapes: images (B, 3, H, W), already normalised (`normalize_images`); the head returns
per-level lists of (B, C, H/s, W/s) logits and (B, 4, H/s, W/s) ltrb distances in input
pixels (already multiplied by the stride s), levels of strides 8, 16, 32.
"""
import dataclasses
import math
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import ops

# ----------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------

# (in, out, blocks, add_identity, spp) of the four CSPNeXt "P5" stages before scaling
P5_STAGES = ((64, 128, 3, True, False), (128, 256, 6, True, False),
             (256, 512, 6, True, False), (512, 1024, 3, False, True))


@dataclasses.dataclass(frozen=True)
class RTMDetConfig:
    """Hyper-parameters of one RTMDet model; `RTMDetConfig.from_name("s")` for the presets."""
    deepen_factor: float
    widen_factor: float
    neck_channels: int           # neck output = head in/feature channels
    num_csp_blocks: int          # CSPNeXt blocks per neck CSP layer
    exp_on_reg: bool             # head regression output goes through exp() before x stride
    num_classes: int = 80
    expand_ratio: float = 0.5
    channel_attention: bool = True   # in the backbone's CSP layers (the neck has none)
    stacked_convs: int = 2
    strides: Tuple[int, ...] = (8, 16, 32)
    # mmyolo's and SPEC's BatchNorm; mmdetection's own configs use SyncBN defaults (0.1, 1e-5)
    bn_momentum: float = 0.03
    bn_eps: float = 1e-3

    @classmethod
    def from_name(cls, name: str, **overrides) -> "RTMDetConfig":
        if name not in _PRESETS:
            raise ValueError(f"RTMDetConfig.from_name: unknown size {name!r}, "
                             f"expected one of {sorted(_PRESETS)}")
        return dataclasses.replace(_PRESETS[name], **overrides)

    def stage_channels(self) -> List[int]:
        """Output channels of the stem and the four backbone stages."""
        w = self.widen_factor
        return [int(P5_STAGES[0][0] * w)] + [int(s[1] * w) for s in P5_STAGES]


_PRESETS: Dict[str, RTMDetConfig] = {
    "tiny": RTMDetConfig(0.167, 0.375, 96, 1, False),
    "s": RTMDetConfig(0.33, 0.5, 128, 1, False),
    "m": RTMDetConfig(0.67, 0.75, 192, 2, True),
    "l": RTMDetConfig(1.0, 1.0, 256, 3, True),
    "x": RTMDetConfig(1.33, 1.25, 320, 4, True),
}

# ----------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------


class ConvModule(nn.Module):
    """conv (no bias) -> BatchNorm -> SiLU, like mmcv's ConvModule with BN and SiLU."""

    def __init__(self, cin, cout, kernel_size, stride=1, groups=1, *, bn_momentum, bn_eps):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride, kernel_size // 2, groups=groups,
                              bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=bn_eps, momentum=bn_momentum)
        self.activate = nn.SiLU(inplace=True)

    def forward(self, x):
        return self.activate(self.bn(self.conv(x)))


class DepthwiseSeparableConvModule(nn.Module):
    def __init__(self, cin, cout, kernel_size, **bn):
        super().__init__()
        self.depthwise_conv = ConvModule(cin, cin, kernel_size, groups=cin, **bn)
        self.pointwise_conv = ConvModule(cin, cout, 1, **bn)

    def forward(self, x):
        return self.pointwise_conv(self.depthwise_conv(x))


class CSPNeXtBlock(nn.Module):
    """3x3 conv, then 5x5 depthwise-separable conv, plus the input when `add_identity`."""

    def __init__(self, channels, add_identity, **bn):
        super().__init__()
        self.conv1 = ConvModule(channels, channels, 3, **bn)
        self.conv2 = DepthwiseSeparableConvModule(channels, channels, 5, **bn)
        self.add_identity = add_identity

    def forward(self, x):
        out = self.conv2(self.conv1(x))
        return out + x if self.add_identity else out


class ChannelAttention(nn.Module):
    """x * hardsigmoid(fc(global average of x)), fc a 1x1 conv with bias."""

    def __init__(self, channels):
        super().__init__()
        self.fc = nn.Conv2d(channels, channels, 1, bias=True)
        self.act = nn.Hardsigmoid(inplace=True)

    def forward(self, x):
        return x * self.act(self.fc(x.mean((2, 3), keepdim=True)))


class CSPLayer(nn.Module):
    """Cross-stage-partial layer: blocks on one half, a 1x1 shortcut on the other, fuse."""

    def __init__(self, cin, cout, num_blocks, *, add_identity, expand_ratio=0.5,
                 channel_attention=False, **bn):
        super().__init__()
        mid = int(cout * expand_ratio)
        self.main_conv = ConvModule(cin, mid, 1, **bn)
        self.short_conv = ConvModule(cin, mid, 1, **bn)
        self.final_conv = ConvModule(2 * mid, cout, 1, **bn)
        self.blocks = nn.Sequential(*[CSPNeXtBlock(mid, add_identity, **bn)
                                      for _ in range(num_blocks)])
        self.attention = ChannelAttention(2 * mid) if channel_attention else None

    def forward(self, x):
        y = torch.cat([self.blocks(self.main_conv(x)), self.short_conv(x)], 1)
        if self.attention is not None:
            y = self.attention(y)
        return self.final_conv(y)


class SPPFBottleneck(nn.Module):
    """1x1 conv to half width, concat with 5x5 max pools applied 1-3 times, 1x1 conv.

    Three chained 5x5 pools equal mmdet's parallel 5/9/13 pools (max over nested windows,
    -inf padding), at a fraction of the cost; the parameters are the same.
    """

    def __init__(self, cin, cout, kernel_size=5, **bn):
        super().__init__()
        mid = cin // 2
        self.conv1 = ConvModule(cin, mid, 1, **bn)
        self.pool = nn.MaxPool2d(kernel_size, 1, kernel_size // 2)
        self.conv2 = ConvModule(mid * 4, cout, 1, **bn)

    def forward(self, x):
        x = self.conv1(x)
        p1 = self.pool(x)
        p2 = self.pool(p1)
        return self.conv2(torch.cat([x, p1, p2, self.pool(p2)], 1))


# ----------------------------------------------------------------------------------------
# Backbone, neck, head
# ----------------------------------------------------------------------------------------


class CSPNeXt(nn.Module):
    """CSPNeXt P5 backbone: stem (stride 2) + four stride-2 stages; returns stages 2-4."""

    def __init__(self, cfg: RTMDetConfig):
        super().__init__()
        bn = dict(bn_momentum=cfg.bn_momentum, bn_eps=cfg.bn_eps)
        stem = cfg.stage_channels()[0]
        self.stem = nn.Sequential(ConvModule(3, stem // 2, 3, 2, **bn),
                                  ConvModule(stem // 2, stem // 2, 3, **bn),
                                  ConvModule(stem // 2, stem, 3, **bn))
        for i, (cin, cout, n, add_identity, spp) in enumerate(P5_STAGES):
            cin, cout = int(cin * cfg.widen_factor), int(cout * cfg.widen_factor)
            layers = [ConvModule(cin, cout, 3, 2, **bn)]
            if spp:
                layers.append(SPPFBottleneck(cout, cout, **bn))
            layers.append(CSPLayer(cout, cout, max(round(n * cfg.deepen_factor), 1),
                                   add_identity=add_identity, expand_ratio=cfg.expand_ratio,
                                   channel_attention=cfg.channel_attention, **bn))
            self.add_module(f"stage{i + 1}", nn.Sequential(*layers))

    def forward(self, x) -> List[torch.Tensor]:
        x = self.stage1(self.stem(x))
        c3 = self.stage2(x)
        c4 = self.stage3(c3)
        return [c3, c4, self.stage4(c4)]


class CSPNeXtPAFPN(nn.Module):
    """Top-down then bottom-up path aggregation with CSP layers, then 3x3 output convs."""

    def __init__(self, cfg: RTMDetConfig):
        super().__init__()
        bn = dict(bn_momentum=cfg.bn_momentum, bn_eps=cfg.bn_eps)
        chans = cfg.stage_channels()[2:]
        n = cfg.num_csp_blocks
        csp = dict(add_identity=False, expand_ratio=cfg.expand_ratio, **bn)
        self.in_channels = chans
        # index 0 of the top-down lists works on the coarsest level (as mmdet orders them)
        self.reduce_layers = nn.ModuleList(
            ConvModule(chans[i], chans[i - 1], 1, **bn) for i in range(len(chans) - 1, 0, -1))
        self.top_down_blocks = nn.ModuleList(
            CSPLayer(chans[i - 1] * 2, chans[i - 1], n, **csp) for i in range(len(chans) - 1, 0, -1))
        self.downsamples = nn.ModuleList(
            ConvModule(chans[i], chans[i], 3, 2, **bn) for i in range(len(chans) - 1))
        self.bottom_up_blocks = nn.ModuleList(
            CSPLayer(chans[i] * 2, chans[i + 1], n, **csp) for i in range(len(chans) - 1))
        self.out_convs = nn.ModuleList(
            ConvModule(c, cfg.neck_channels, 3, **bn) for c in chans)

    def forward(self, feats: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        L = len(self.in_channels)
        inner = [feats[-1]]
        for j, i in enumerate(range(L - 1, 0, -1)):
            top = self.reduce_layers[j](inner[0])
            inner[0] = top
            up = F.interpolate(top, scale_factor=2.0, mode="nearest")
            inner.insert(0, self.top_down_blocks[j](torch.cat([up, feats[i - 1]], 1)))
        outs = [inner[0]]
        for i in range(L - 1):
            down = self.downsamples[i](outs[-1])
            outs.append(self.bottom_up_blocks[i](torch.cat([down, inner[i + 1]], 1)))
        return [conv(x) for conv, x in zip(self.out_convs, outs)]


class RTMDetSepBNHead(nn.Module):
    """Two stacked 3x3 convs per branch whose conv weights are shared across levels while
    every level keeps its own BatchNorm; per-level 1x1 `rtm_cls` / `rtm_reg` predictions.

    Sharing is done as in mmdet (level n's ConvModule holds level 0's `.conv`), so the state
    dict lists the shared weights once per level and `parameters()` lists them once.
    """

    def __init__(self, cfg: RTMDetConfig):
        super().__init__()
        bn = dict(bn_momentum=cfg.bn_momentum, bn_eps=cfg.bn_eps)
        ch, L = cfg.neck_channels, len(cfg.strides)
        self.num_classes = cfg.num_classes
        self.strides = tuple(cfg.strides)
        self.exp_on_reg = cfg.exp_on_reg

        def branch():
            return nn.ModuleList(ConvModule(ch, ch, 3, **bn) for _ in range(cfg.stacked_convs))

        self.cls_convs = nn.ModuleList(branch() for _ in range(L))
        self.reg_convs = nn.ModuleList(branch() for _ in range(L))
        for convs in (self.cls_convs, self.reg_convs):
            for level in convs[1:]:
                for shared, own in zip(convs[0], level):
                    own.conv = shared.conv
        self.rtm_cls = nn.ModuleList(nn.Conv2d(ch, cfg.num_classes, 1) for _ in range(L))
        self.rtm_reg = nn.ModuleList(nn.Conv2d(ch, 4, 1) for _ in range(L))

    def forward(self, feats):
        cls_scores, bbox_preds = [], []
        for i, (x, stride) in enumerate(zip(feats, self.strides)):
            c, r = x, x
            for layer in self.cls_convs[i]:
                c = layer(c)
            for layer in self.reg_convs[i]:
                r = layer(r)
            reg = self.rtm_reg[i](r)
            cls_scores.append(self.rtm_cls[i](c))
            bbox_preds.append((reg.exp() if self.exp_on_reg else reg) * stride)
        return cls_scores, bbox_preds


def init_weights(model: "RTMDet", prior_prob: float = 0.01):
    """mmdetection's initialisation.

    ConvModule convs: Kaiming normal (fan_out, relu); BN weight 1, bias 0; channel-attention
    fc: Kaiming uniform (a=sqrt(5), fan_in), bias 0; every head conv: normal(0, 0.01), bias 0,
    except the classification bias -log((1 - p) / p) for a prior probability p.
    """
    for m in model.modules():
        if isinstance(m, ConvModule):
            nn.init.kaiming_normal_(m.conv.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, ChannelAttention):
            nn.init.kaiming_uniform_(m.fc.weight, a=math.sqrt(5), mode="fan_in",
                                     nonlinearity="leaky_relu")
            nn.init.zeros_(m.fc.bias)
    for m in model.bbox_head.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, 0.0, 0.01)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    for conv in model.bbox_head.rtm_cls:
        nn.init.constant_(conv.bias, -math.log((1 - prior_prob) / prior_prob))


# ----------------------------------------------------------------------------------------
# Input normalisation
# ----------------------------------------------------------------------------------------

BGR_MEAN = (103.53, 116.28, 123.675)
BGR_STD = (57.375, 57.12, 58.395)


def normalize_images(images: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """RGB images 0..255 (B, 3, H, W) float or uint8 -> the BGR, mean/std-normalised input
    that mmdetection's RTMDet checkpoints expect (SPEC section 5), in `dtype`."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        got = (f"shape {tuple(images.shape)}" if isinstance(images, torch.Tensor)
               else type(images).__name__)
        raise ValueError(f"normalize_images: images must be (B, 3, H, W) RGB, got {got}")
    x = images.flip(1).to(dtype)
    mean, std = _mean_std(dtype, x.device)
    return (x - mean) / std


_MEAN_STD = {}


def _mean_std(dtype, device):
    """(1, 3, 1, 1) BGR mean and std, kept per (dtype, device): building them per call is a
    pageable host-to-device copy, which can make the host wait every training step."""
    if torch.compiler.is_compiling():   # traced: constants, no cache
        return tuple(torch.tensor(v, dtype=dtype, device=device).view(1, 3, 1, 1)
                     for v in (BGR_MEAN, BGR_STD))
    key = (dtype, device)
    if key not in _MEAN_STD:
        _MEAN_STD[key] = tuple(torch.tensor(v, dtype=dtype).view(1, 3, 1, 1).to(device)
                               for v in (BGR_MEAN, BGR_STD))
    return _MEAN_STD[key]


# ----------------------------------------------------------------------------------------
# Detector
# ----------------------------------------------------------------------------------------


class RTMDet(nn.Module):
    """RTMDet detector: `model(images)` -> (cls_scores, bbox_preds) per level (see module doc);
    `model.loss(images, targets)` -> {"loss_cls", "loss_bbox"}; `model.predict(images)`."""

    def __init__(self, cfg: RTMDetConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = CSPNeXt(cfg)
        self.neck = CSPNeXtPAFPN(cfg)
        self.bbox_head = RTMDetSepBNHead(cfg)
        init_weights(self)

    @classmethod
    def from_name(cls, size: str, num_classes: int = 80, **overrides) -> "RTMDet":
        return cls(RTMDetConfig.from_name(size, num_classes=num_classes, **overrides))

    @property
    def strides(self):
        return self.cfg.strides

    def forward(self, images: torch.Tensor):
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"RTMDet: images must be (B, 3, H, W), got shape {tuple(images.shape)}")
        return self.bbox_head(self.neck(self.backbone(images)))

    def loss(self, images: torch.Tensor, targets: Dict[str, torch.Tensor], backend="auto"):
        """targets: {"boxes" (B, G, 4) xyxy input pixels, "labels" (B, G) int64,
        "mask" (B, G) bool (optional, True = real gt)} -> {"loss_cls", "loss_bbox"}."""
        from .loss import head_loss
        cls_scores, bbox_preds = self(images)
        return head_loss(cls_scores, bbox_preds, targets["boxes"], targets["labels"],
                         targets.get("mask"), strides=self.strides, backend=backend)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, *, scale_factors=None, score_thr=0.05,
                nms_pre=30000, iou_thr=0.65, max_per_img=300, min_bbox_size=0.0,
                backend="auto"):
        """Detections per image: list of B dicts {"boxes" (K, 4) xyxy, "scores" (K,),
        "labels" (K,) int64}, by decreasing score.

        As mmdetection: sigmoid scores; per level the (prior, class) pairs above
        `score_thr`, at most `nms_pre` of them (highest first); decode and clip to the
        input size; divide by the image's scale factor (sx, sy) (padding is bottom/right);
        drop boxes not wider and taller than `min_bbox_size` (None: keep all); class-aware
        NMS (IoU > iou_thr suppresses); keep `max_per_img`.
        """
        cls_scores, bbox_preds = self(images)
        return postprocess(cls_scores, bbox_preds, self.strides, tuple(images.shape[-2:]),
                           scale_factors=scale_factors, score_thr=score_thr, nms_pre=nms_pre,
                           iou_thr=iou_thr, max_per_img=max_per_img,
                           min_bbox_size=min_bbox_size, backend=backend)


def postprocess(cls_scores, bbox_preds, strides, input_hw, *, scale_factors=None,
                score_thr=0.05, nms_pre=30000, iou_thr=0.65, max_per_img=300,
                min_bbox_size=0.0, backend="auto"):
    """Head outputs -> detections (see `RTMDet.predict`); loops over images (inference only)."""
    B = cls_scores[0].shape[0]
    device = cls_scores[0].device
    sizes = [tuple(s.shape[-2:]) for s in cls_scores]
    level_priors = ops.grid_priors(sizes, strides, offset=0.0, device=device).split(
        [h * w for h, w in sizes])
    if scale_factors is not None:
        scale_factors = torch.as_tensor(scale_factors, dtype=torch.float32, device=device)
        if scale_factors.shape != (B, 2):
            raise ValueError(f"predict: scale_factors must be (B, 2) = ({B}, 2) (sx, sy), "
                             f"got shape {tuple(scale_factors.shape)}")
    H, W = input_hw
    results = []
    for b in range(B):
        boxes, scores, labels = [], [], []
        for logits, dist, priors in zip(cls_scores, bbox_preds, level_priors):
            C = logits.shape[1]
            s = logits[b].float().sigmoid().permute(1, 2, 0).reshape(-1)
            keep = (s > score_thr).nonzero().squeeze(1)
            sc, order = s[keep].sort(descending=True)
            sc, keep = sc[:nms_pre], keep[order[:nms_pre]]
            prior = keep // C
            d = dist[b].float().permute(1, 2, 0).reshape(-1, 4)[prior]
            boxes.append(ops.distance2bbox(priors[prior], d))
            scores.append(sc)
            labels.append(keep % C)
        boxes, scores, labels = torch.cat(boxes), torch.cat(scores), torch.cat(labels)
        boxes = torch.stack([boxes[:, 0].clamp(0, W), boxes[:, 1].clamp(0, H),
                             boxes[:, 2].clamp(0, W), boxes[:, 3].clamp(0, H)], 1)
        if scale_factors is not None:
            boxes = boxes / scale_factors[b].repeat(2)
        if min_bbox_size is not None:
            big = ((boxes[:, 2] - boxes[:, 0]) > min_bbox_size) & \
                  ((boxes[:, 3] - boxes[:, 1]) > min_bbox_size)
            boxes, scores, labels = boxes[big], scores[big], labels[big]
        keep = ops.batched_nms(boxes, scores, labels, iou_thr, backend=backend)[:max_per_img]
        results.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
    return results
