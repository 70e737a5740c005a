"""Random and special cases for the Dynamic Soft Label Assigner (SPEC section 2).

Shared by the reference, Triton and C++ parity tests:

    case = make_case(seed=0, B=2, img_size=(640, 640), G=7, C=80, pad="anywhere", kind="mixed")
    a = ops.dsl_assign(*case_args(case), semantics="mmdet")

A case is a dict with priors (N, 4) from `ops.grid_priors`, pred_bboxes (B, N, 4) float32
(predictions near priors and near gts, so that many IoUs are > 0), pred_logits (B, N, C) in
`dtype`, gt_bboxes (B, G, 4) float32, gt_labels (B, G) int64, gt_mask (B, G) bool, plus
featmaps, strides, kind, seed. Padded gt rows hold garbage (zeros, -1 or out-of-range labels,
NaN boxes, or boxes that would make priors valid) that an assigner must ignore.

kinds:
  random      realistic boxes anywhere in the image
  crowded     many overlapping gts in a small region (conflicts in step 6)
  tiny        gts smaller than a stride, most with no prior centre strictly inside
  duplicate   pairs of identical gts (same or different labels: exact cost ties)
  zero_width  gts with x1 == x2 or y1 == y2
  border      gts touching (or crossing) the image border
  far         one large gt in a corner and tiny gts far away: +inf centre costs (> 41.6 strides)
  no_valid    gts that contain no prior centre at all: every prior is background
  no_gt       no real gt (all rows padded, or G = 0 with pad="none")
  mixed       a bit of every kind above in each image
  early       early training: large gts (up to half the image, so most priors are valid),
              predictions not tied to any gt (boxes a few strides around each prior) and
              bias-initialised logits (prior probability 0.01, small noise)
"""
import math

import torch

from rtmdet import ops

KINDS = ("random", "crowded", "tiny", "duplicate", "zero_width", "border", "far", "no_valid",
         "no_gt", "mixed", "early")
BIAS_INIT = -4.59511985  # -log((1 - 0.01) / 0.01): RTMDet's classification bias at start
PADS = ("none", "end", "anywhere")
TENSORS = ("priors", "pred_bboxes", "pred_logits", "gt_bboxes", "gt_labels", "gt_mask")


def featmaps_for(img_size, strides=(8, 16, 32)):
    """Feature map sizes of an (h, w) input: [(ceil(h/s), ceil(w/s)) for s in strides]."""
    h, w = img_size
    return [(math.ceil(h / s), math.ceil(w / s)) for s in strides]


def case_args(case):
    """The six tensors of a case in `ops.dsl_assign` order."""
    return tuple(case[name] for name in TENSORS)


def image_args(case, b):
    """Image b of a case as an unbatched call with its real gts only.

    Returns (args, real) where args = (priors, pred_bboxes (N, 4), pred_logits (N, C),
    gt_bboxes (G_b, 4), gt_labels (G_b,)) and real (G_b,) are their indices into G.
    """
    real = case["gt_mask"][b].nonzero()[:, 0]
    return (case["priors"], case["pred_bboxes"][b], case["pred_logits"][b],
            case["gt_bboxes"][b][real], case["gt_labels"][b][real]), real


def make_case(seed, B=2, *, img_size=(640, 640), featmaps=None, strides=(8, 16, 32), G=7, C=80,
              dtype=torch.float32, pad="none", kind="random", device="cpu"):
    """A random DSLA batch (see the module docstring). featmaps overrides img_size.

    pad: "none" (every image has G real gts), "end" (image b > 0 has a random number of real
    gts first, then padding), "anywhere" (real gts in random positions).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if pad not in PADS:
        raise ValueError(f"pad must be one of {PADS}, got {pad!r}")
    gen = torch.Generator().manual_seed(seed)
    if featmaps is None:
        featmaps = featmaps_for(img_size, strides)
    strides = tuple(strides[:len(featmaps)])
    priors = ops.grid_priors(featmaps, strides)
    N = priors.shape[0]
    W = float(max([w * s for (h, w), s in zip(featmaps, strides)], default=1))
    H = float(max([h * s for (h, w), s in zip(featmaps, strides)], default=1))
    smin = float(min(strides, default=8))
    if kind == "no_gt" and pad == "none":
        G = 0

    gt_bboxes = torch.zeros(B, G, 4)
    gt_labels = torch.zeros(B, G, dtype=torch.long)
    gt_mask = torch.zeros(B, G, dtype=torch.bool)
    for b in range(B):
        n_real = G if (pad == "none" or b == 0) else int(torch.randint(0, G + 1, (1,), generator=gen))
        if kind == "no_gt":
            n_real = 0
        if pad == "anywhere":
            slots = torch.randperm(G, generator=gen)[:n_real].sort().values
        else:
            slots = torch.arange(n_real)
        boxes, labels = _gt_boxes(kind, n_real, W, H, smin, C, gen)
        pad_boxes, pad_labels = _garbage(G, W, H, C, gen)
        gt_bboxes[b], gt_labels[b] = pad_boxes, pad_labels
        gt_bboxes[b, slots], gt_labels[b, slots] = boxes, labels
        gt_mask[b, slots] = True

    early = kind == "early"
    pred_bboxes = torch.stack([_predictions(priors, gt_bboxes[b][gt_mask[b]], gen, tied=not early)
                               for b in range(B)]) if B else torch.zeros(0, N, 4)
    if early:
        pred_logits = torch.randn(B, N, C, generator=gen) * 0.2 + BIAS_INIT
    else:
        pred_logits = torch.randn(B, N, C, generator=gen) * 1.5 - 4.0
    for b in range(B if not early else 0):
        # Half the priors score some real gt's class higher, as a trained head would.
        lab = gt_labels[b][gt_mask[b]]
        if len(lab) and N and C:
            pick = lab[torch.randint(0, len(lab), (N,), generator=gen)]
            boost = (torch.rand(N, generator=gen) < 0.5).float() * 4.0
            pred_logits[b, torch.arange(N), pick] += boost
    case = dict(priors=priors, pred_bboxes=pred_bboxes, pred_logits=pred_logits.to(dtype),
                gt_bboxes=gt_bboxes, gt_labels=gt_labels, gt_mask=gt_mask)
    case = {k: v.to(device) for k, v in case.items()}
    case.update(featmaps=list(featmaps), strides=strides, kind=kind, seed=seed, pad=pad)
    return case


def _uniform(gen, n, low, high):
    return torch.rand(n, generator=gen) * (high - low) + low


def _boxes(gen, n, cx_range, cy_range, size_range):
    """n boxes with centres uniform in the ranges and log-uniform widths/heights."""
    cx = _uniform(gen, n, *cx_range)
    cy = _uniform(gen, n, *cy_range)
    lo, hi = math.log(size_range[0]), math.log(size_range[1])
    w = _uniform(gen, n, lo, hi).exp()
    h = _uniform(gen, n, lo, hi).exp()
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)


def _clip(boxes, W, H):
    return torch.stack([boxes[:, 0].clamp(0, W), boxes[:, 1].clamp(0, H),
                        boxes[:, 2].clamp(0, W), boxes[:, 3].clamp(0, H)], -1)


def _gt_boxes(kind, n, W, H, smin, C, gen):
    """(n, 4) float32 gt boxes and (n,) labels of one kind for a W x H image."""
    labels = torch.randint(0, max(C, 1), (n,), generator=gen)
    big = max(W, H)
    if n == 0:
        return torch.zeros(0, 4), labels
    if kind == "random":
        boxes = _clip(_boxes(gen, n, (0, W), (0, H), (smin * 0.5, 0.6 * big + smin)), W, H)
    elif kind == "crowded":
        cx, cy = float(_uniform(gen, 1, 0.2 * W, 0.8 * W)), float(_uniform(gen, 1, 0.2 * H, 0.8 * H))
        r = 0.1 * big + smin
        boxes = _clip(_boxes(gen, n, (cx - r, cx + r), (cy - r, cy + r), (smin, 0.3 * big + 2 * smin)), W, H)
    elif kind == "tiny":
        # Corner on a grid point (the point lies on the border: not strictly inside) or
        # straddling one (exactly one stride-8 prior inside).
        j = torch.randint(0, max(int(W // smin), 1), (n,), generator=gen).float() * smin
        i = torch.randint(0, max(int(H // smin), 1), (n,), generator=gen).float() * smin
        w = _uniform(gen, n, 0.1, 0.9) * smin
        h = _uniform(gen, n, 0.1, 0.9) * smin
        shift = (torch.rand(n, generator=gen) < 0.3).float()  # straddle the grid point
        x1, y1 = j - shift * w / 2, i - shift * h / 2
        boxes = torch.stack([x1, y1, x1 + w, y1 + h], -1)
    elif kind == "duplicate":
        m = (n + 1) // 2
        base = _clip(_boxes(gen, m, (0, W), (0, H), (smin, 0.5 * big + smin)), W, H)
        boxes = torch.cat([base, base])[:n]
        other = torch.randint(0, max(C, 1), (m,), generator=gen)
        twin = torch.where(torch.rand(m, generator=gen) < 0.5, labels[:m], other)
        labels = torch.cat([labels[:m], twin])[:n]
        perm = torch.randperm(n, generator=gen)
        boxes, labels = boxes[perm], labels[perm]
    elif kind == "zero_width":
        boxes = _clip(_boxes(gen, n, (0, W), (0, H), (smin, 0.5 * big + smin)), W, H)
        # 0: zero width, 1: zero height, 2: both, 3: an ordinary box for the others to compete with
        which = torch.randint(0, 4, (n,), generator=gen)
        boxes[(which == 0) | (which == 2), 2] = boxes[(which == 0) | (which == 2), 0]
        boxes[(which == 1) | (which == 2), 3] = boxes[(which == 1) | (which == 2), 1]
    elif kind == "border":
        boxes = _boxes(gen, n, (0, W), (0, H), (smin, 0.5 * big + smin))
        side = torch.randint(0, 4, (n,), generator=gen)
        edge = torch.tensor([0.0, 0.0, W, H])
        boxes[torch.arange(n), side] = edge[side]
        cross = torch.rand(n, generator=gen) < 0.25  # some run past the border
        boxes[cross, 0] -= smin
        boxes[cross, 3] += smin
        boxes = torch.stack([torch.minimum(boxes[:, 0], boxes[:, 2]), torch.minimum(boxes[:, 1], boxes[:, 3]),
                             torch.maximum(boxes[:, 0], boxes[:, 2]), torch.maximum(boxes[:, 1], boxes[:, 3])], -1)
    elif kind == "far":
        # One large gt near the top-left corner, the rest tiny near the bottom-right one:
        # for stride 8 the centre cost overflows float32 beyond ~333 px.
        first = torch.tensor([[1.0, 1.0, 0.35 * W, 0.35 * H]])
        rest = _boxes(gen, n - 1, (0.9 * W, W), (0.9 * H, H), (0.2 * smin, 2 * smin))
        boxes = torch.cat([first, rest])
    elif kind == "no_valid":
        j = torch.randint(0, max(int(W // smin), 1), (n,), generator=gen).float() * smin
        i = torch.randint(0, max(int(H // smin), 1), (n,), generator=gen).float() * smin
        w = _uniform(gen, n, 0.0, 0.95) * smin
        h = _uniform(gen, n, 0.0, 0.95) * smin
        boxes = torch.stack([j, i, j + w, i + h], -1)  # the grid point is on the border
        flat = torch.rand(n, generator=gen) < 0.3
        boxes[flat, 2] = boxes[flat, 0] + 0.5 * smin  # or zero-height boxes through grid points
        boxes[flat, 1] = boxes[flat, 3] = i[flat] + 0.5 * smin
        boxes[flat, 0] -= 10 * smin
    elif kind == "early":
        boxes = _clip(_boxes(gen, n, (0, W), (0, H), (0.1 * big, 0.5 * big)), W, H)
    elif kind == "mixed":
        parts = ("random", "crowded", "tiny", "duplicate", "zero_width", "border", "far")
        which = torch.randint(0, len(parts), (n,), generator=gen)
        boxes = torch.zeros(n, 4)
        for p, name in enumerate(parts):
            sel = (which == p).nonzero()[:, 0]
            if len(sel):
                boxes[sel], labels[sel] = _gt_boxes(name, len(sel), W, H, smin, C, gen)
    else:  # no_gt
        boxes = torch.zeros(n, 4)
    return boxes.float(), labels


def _garbage(G, W, H, C, gen):
    """Padding rows: zeros, NaN boxes, or boxes that would contain priors; labels -1, 0 or C + 3."""
    boxes = torch.zeros(G, 4)
    choice = torch.randint(0, 3, (G,), generator=gen)
    boxes[choice == 1] = float("nan")
    boxes[choice == 2] = torch.tensor([1.0, 1.0, W - 1.0, H - 1.0])
    labels = torch.tensor([-1, 0, C + 3])[torch.randint(0, 3, (G,), generator=gen)]
    return boxes, labels


def _predictions(priors, gts, gen, tied=True):
    """(N, 4) decoded boxes: ~60% jittered copies of a random real gt (tied), the rest (all when
    not tied) around the prior, a few strides on each side."""
    N = priors.shape[0]
    stride = priors[:, 2]
    d = torch.exp(_uniform(gen, 4 * N, -0.5, 2.5)).view(N, 4) * stride[:, None]
    around = torch.stack([priors[:, 0] - d[:, 0], priors[:, 1] - d[:, 1],
                          priors[:, 0] + d[:, 2], priors[:, 1] + d[:, 3]], -1)
    if len(gts) == 0 or N == 0 or not tied:
        return around
    g = gts[torch.randint(0, len(gts), (N,), generator=gen)]
    size = torch.stack([g[:, 2] - g[:, 0], g[:, 3] - g[:, 1]] * 2, -1).clamp(min=1.0)
    jitter = g + torch.randn(N, 4, generator=gen) * 0.15 * size
    jitter = torch.stack([torch.minimum(jitter[:, 0], jitter[:, 2]), torch.minimum(jitter[:, 1], jitter[:, 3]),
                          torch.maximum(jitter[:, 0], jitter[:, 2]), torch.maximum(jitter[:, 1], jitter[:, 3])], -1)
    use = (torch.rand(N, generator=gen) < 0.6)[:, None]
    return torch.where(use, jitter, around)
