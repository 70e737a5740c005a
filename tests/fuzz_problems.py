"""Random whole problems for the fuzzed agreement of the backends (issue 15 item 2).

Used by tests/test_fuzz_ops.py (hypothesis, CI) and benches/fuzz_gpu.py (the device run):

    spec = dsla_spec(Draw.seeded(7), max_b=2)       # or, under hypothesis: dsla_specs()
    problem = build_dsla(spec)                      # tensors + keyword arguments
    out = ops.dsl_assign(*problem.args, **problem.kwargs, backend="cpp")
    check_assignment(problem, reference, out)

A spec is a small frozen dataclass of every choice (its repr is the repro of a failure);
`build_*` turns it into tensors deterministically. The choices go through a `Draw`, backed
by hypothesis (which then shrinks a failure to a minimal spec) or by random.Random (no
hypothesis needed). Bulk values (logits, predictions, box coordinates) come from a
torch.Generator seeded by one choice; the structure that matters for a bug (sizes, box
kinds, padding, dtypes, layouts, extremes, hyper-parameters) is drawn choice by choice.
"""
import dataclasses
import math
import random
import time
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from rtmdet import ops
from tests.assign_compare import assert_same_assignment, reference_costs

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
          "fp64": torch.float64}
# Real-gt kinds; "random" first so that shrinking goes towards ordinary boxes.
GT_KINDS = ("random", "degenerate", "duplicate", "nested", "tiny", "huge", "far", "grid")
PRED_MODES = ("jitter", "copy", "around", "degenerate", "huge", "inverted")
LOGIT_EXTREMES = ("none", "30", "1e4", "const")
LAYOUTS = ("contiguous", "slice", "transposed")
BOX_KINDS = ("random", "identical", "nested", "disjoint", "point", "line", "inverted", "huge",
             "tiny", "far", "grid")


class Draw:
    """Primitive choices, from hypothesis' `draw` or from a random.Random."""

    def __init__(self, draw=None, rng=None):
        self._draw, self._rng = draw, rng
        if draw is not None:
            from hypothesis import strategies as st
            self._st = st

    @classmethod
    def seeded(cls, seed):
        return cls(rng=random.Random(seed))

    def int(self, lo, hi):
        """An integer in [lo, hi]; hypothesis shrinks it towards lo."""
        if self._draw is not None:
            return self._draw(self._st.integers(lo, hi))
        return self._rng.randint(lo, hi)

    def choice(self, options):
        """One of `options`; shrinks towards the first."""
        return options[self.int(0, len(options) - 1)]

    def coin(self, p):
        """True with probability about p; shrinks towards False."""
        return self.int(0, 999) >= round(1000 * (1 - p))

    def uniform(self, lo, hi):
        """A float in [lo, hi] in 1/64 steps (exact values, so reprs round-trip)."""
        return lo + self.int(0, round((hi - lo) * 64)) / 64


def _layout(t, layout, gen):
    """The same values as t in a non-contiguous view (or t itself for "contiguous")."""
    if layout == "contiguous" or t.dim() == 0 or t.numel() == 0:
        return t
    if layout == "slice":  # a view into a wider buffer (its last dimension strided)
        wide = torch.randn(*t.shape[:-1], t.shape[-1] + 3, generator=gen).to(t.dtype)
        wide[..., 1:1 + t.shape[-1]] = t
        return wide[..., 1:1 + t.shape[-1]]
    # "transposed": stored transposed, then transposed back (column-major last two dims)
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


def _uniform(gen, shape, lo, hi):
    return torch.rand(shape, generator=gen, dtype=torch.float64) * (hi - lo) + lo


# ------------------------------------------------------------------------------------------
# DSLA
# ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DSLASpec:
    seed: int
    B: int
    C: int
    G: int
    grid: tuple            # (H, W, levels) of a real image, or () for random priors
    n_random: int          # number of random priors (when grid == ())
    gt: tuple              # per image, per slot: a GT_KINDS name, or "" for a padded slot
    pred_modes: tuple      # enabled PRED_MODES besides "jitter" and "around"
    logit_scale: float
    logit_offset: float
    extremes: str
    dtype: str
    layout: str
    topk: int
    soft_center_radius: float
    iou_weight: float
    semantics: str


class Problem(NamedTuple):
    args: tuple            # (priors, pred_bboxes, pred_logits, gt_bboxes, gt_labels, gt_mask)
    kwargs: dict           # topk, soft_center_radius, iou_weight, semantics
    case: dict             # contiguous float32 copies for the reference costs
    spec: object


def dsla_spec(d, *, max_b=3, max_side=96, max_n=128, max_g=10, max_c=12,
              dtypes=("fp32", "fp16", "bf16"), max_topk=20, cs=None, topks=None):
    """Draw a DSLASpec: batch, priors (real grids or random points), gts with padding
    anywhere, predictions, logits and hyper-parameters. cs / topks: draw C / topk from these
    values only (on a GPU every new value compiles kernels)."""
    B, G = d.int(1, max_b), d.int(0, max_g)
    C = d.choice(cs) if cs else d.int(1, max_c)
    if d.coin(0.75):
        grid, n_random = (d.int(1, max_side), d.int(1, max_side), d.int(1, 3)), 0
    else:
        grid, n_random = (), d.int(1, max_n)
    pad = d.choice(("none", "end", "anywhere", "anywhere", "end", "all"))  # all padded: rarely
    gt = []
    for b in range(B):
        n_end = d.int(0, G) if pad == "end" else G
        slots = []
        for g in range(G):
            real = {"none": True, "end": g < n_end, "all": False}.get(pad)
            if real is None:
                real = not d.coin(0.3)
            slots.append(d.choice(GT_KINDS) if real else "")
        gt.append(tuple(slots))
    pred_modes = tuple(m for m in PRED_MODES[2:] if d.coin(0.3)) if d.coin(0.6) else ()
    defaults = not d.coin(0.5)
    return DSLASpec(
        seed=d.int(0, 2 ** 31 - 1), B=B, C=C, G=G, grid=grid, n_random=n_random, gt=tuple(gt),
        pred_modes=tuple(m for m in PRED_MODES[:2] if d.coin(0.5)) + pred_modes,
        logit_scale=d.choice((1.5, 0.5, 4.0, 10.0)), logit_offset=d.choice((-4.0, 0.0, 2.0, -10.0)),
        extremes=d.choice(LOGIT_EXTREMES), dtype=d.choice(dtypes), layout=d.choice(LAYOUTS),
        topk=13 if defaults else (d.choice(topks) if topks else d.int(1, max_topk)),
        soft_center_radius=3.0 if defaults else d.uniform(0.5, 5.0),
        iou_weight=3.0 if defaults else d.uniform(0.5, 5.0),
        semantics=d.choice(("mmdet", "mmyolo")))


def _priors(spec, gen):
    """(N, 4) priors and the image size (H, W) their boxes live in."""
    if spec.grid:
        H, W, levels = spec.grid
        strides = (8, 16, 32)[:levels]
        featmaps = [(math.ceil(H / s), math.ceil(W / s)) for s in strides]
        return ops.grid_priors(featmaps, strides), (float(H), float(W))
    N = spec.n_random
    side = 8.0 * (1 + int(torch.randint(0, 12, (1,), generator=gen)))
    xy = _uniform(gen, (N, 2), -16.0, side + 16.0).float()
    stride = torch.tensor([8.0, 16.0, 32.0])[torch.randint(0, 3, (N,), generator=gen)]
    stride_h = torch.where(torch.rand(N, generator=gen) < 0.2, stride * 2, stride)
    priors = torch.cat([xy, stride[:, None], stride_h[:, None]], 1)
    dup = torch.rand(N, generator=gen) < 0.15  # repeated points: exact cost ties
    if N > 1 and bool(dup.any()):
        priors[dup] = priors[torch.randint(0, N, (int(dup.sum()),), generator=gen)]
    return priors, (side, side)


def _gt_box(kind, previous, H, W, gen):
    """One real gt box (4,) float64 of `kind`, and the index into `previous` (this image's
    earlier real gts) of the box it copies or nests in (None for the other kinds)."""
    big = max(H, W)
    r = lambda *shape: torch.rand(shape or (1,), generator=gen, dtype=torch.float64)  # noqa: E731
    if kind in ("duplicate", "nested") and previous:
        i = int(torch.randint(0, len(previous), (1,), generator=gen))
        base = previous[i]
        if kind == "duplicate":
            return base.clone(), i
        w, h = base[2] - base[0], base[3] - base[1]
        f = r(4) * 0.45
        shared = r(4) < 0.3  # share some edges exactly with the outer box
        f = torch.where(shared, torch.zeros_like(f), f)
        inner = [base[0] + f[0] * w, base[1] + f[1] * h, base[2] - f[2] * w, base[3] - f[3] * h]
        return torch.stack(inner), i
    cx, cy = float(r()) * W, float(r()) * H
    lo, hi = math.log(2.0), math.log(big + 8.0)
    w, h = (float(v) for v in (r(2) * (hi - lo) + lo).exp())
    box = torch.tensor([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dtype=torch.float64)
    if kind == "degenerate":
        which = int(torch.randint(0, 3, (1,), generator=gen))
        if which in (0, 2):
            box[2] = box[0]
        if which in (1, 2):
            box[3] = box[1]
    elif kind == "tiny":
        w, h = (float(v) for v in r(2) * 0.99 + 0.01)
        box = torch.tensor([cx, cy, cx + w, cy + h], dtype=torch.float64)
    elif kind == "huge":  # beyond the image on every side, its centre possibly far away
        a = (r(4) * math.log(2000.0)).exp() * 0.05
        box = torch.tensor([-a[0] * W, -a[1] * H, (1 + a[2]) * W, (1 + a[3]) * H], dtype=torch.float64)
    elif kind == "far":  # far outside the image: +inf centre costs for every valid prior
        off = (10 + float(r()) * 90) * big
        box = box + torch.tensor([off, off / 3, off, off / 3], dtype=torch.float64)
    elif kind == "grid":  # corners on prior points (on the border: not strictly inside)
        box = (box / 8).round() * 8
    return box, None


def build_dsla(spec, device="cpu"):
    """Tensors of a DSLASpec: a Problem whose args go straight to ops.dsl_assign."""
    gen = torch.Generator().manual_seed(spec.seed)
    priors, (H, W) = _priors(spec, gen)
    N, B, G, C = priors.shape[0], spec.B, spec.G, spec.C
    gt_bboxes = torch.zeros(B, G, 4, dtype=torch.float64)
    gt_labels = torch.randint(0, C, (B, G), generator=gen)
    gt_mask = torch.zeros(B, G, dtype=torch.bool)
    for b in range(B):
        previous, slots = [], []
        for g, kind in enumerate(spec.gt[b]):
            if kind:
                gt_bboxes[b, g], base = _gt_box(kind, previous, H, W, gen)
                previous.append(gt_bboxes[b, g])
                slots.append(g)
                gt_mask[b, g] = True
                if kind == "duplicate" and base is not None and torch.rand(1, generator=gen) < 0.5:
                    gt_labels[b, g] = gt_labels[b, slots[base]]  # same box and label: exact ties
            else:  # padding: garbage an assigner must ignore
                garbage = int(torch.randint(0, 3, (1,), generator=gen))
                gt_bboxes[b, g] = torch.tensor(([0.0] * 4, [math.nan] * 4, [-1e3, -1e3, 1e3, 1e3])[garbage])
                gt_labels[b, g] = (-1, 0, C + 3)[int(torch.randint(0, 3, (1,), generator=gen))]
    gt_bboxes = gt_bboxes.float()

    pred = _predictions(spec, priors, gt_bboxes, gt_mask, gen)
    logits = _logits(spec, B, N, C, gt_labels, gt_mask, gen)
    case = dict(priors=priors, pred_bboxes=pred, pred_logits=logits, gt_bboxes=gt_bboxes,
                gt_labels=gt_labels, gt_mask=gt_mask)
    lay = lambda t: _layout(t, spec.layout, gen)  # noqa: E731
    args = (lay(priors), lay(pred), lay(logits), lay(gt_bboxes), gt_labels, gt_mask)
    args = tuple(t.to(device) for t in args)
    kwargs = dict(topk=spec.topk, soft_center_radius=spec.soft_center_radius,
                  iou_weight=spec.iou_weight, semantics=spec.semantics)
    return Problem(args, kwargs, case, spec)


def _predictions(spec, priors, gt_bboxes, gt_mask, gen):
    """(B, N, 4) decoded boxes, per prior one of the spec's modes."""
    N, B = priors.shape[0], spec.B
    modes = ("jitter", "around") + tuple(m for m in spec.pred_modes if m not in ("jitter", "around"))
    out = torch.zeros(B, N, 4)
    px, py, stride = priors[:, 0], priors[:, 1], priors[:, 2]
    for b in range(B):
        real = gt_bboxes[b][gt_mask[b]]
        mode = torch.randint(0, len(modes), (N,), generator=gen)
        d = torch.exp(_uniform(gen, (N, 4), -1.0, 2.5)).float() * stride[:, None]
        box = torch.stack([px - d[:, 0], py - d[:, 1], px + d[:, 2], py + d[:, 3]], -1)
        for i, name in enumerate(modes):
            sel = mode == i
            if not bool(sel.any()):
                continue
            k = int(sel.sum())
            if name in ("jitter", "copy") and len(real):
                g = real[torch.randint(0, len(real), (k,), generator=gen)]
                if name == "jitter":
                    size = torch.stack([g[:, 2] - g[:, 0], g[:, 3] - g[:, 1]] * 2, -1).clamp(min=1.0)
                    g = g + torch.randn(k, 4, generator=gen) * 0.15 * size
                    g = torch.stack([torch.minimum(g[:, 0], g[:, 2]), torch.minimum(g[:, 1], g[:, 3]),
                                     torch.maximum(g[:, 0], g[:, 2]), torch.maximum(g[:, 1], g[:, 3])], -1)
                box[sel] = g
            elif name == "degenerate":
                box[sel, 2] = box[sel, 0]
                box[sel, 3] = torch.where(torch.rand(k, generator=gen) < 0.5, box[sel, 1], box[sel, 3])
            elif name == "huge":
                box[sel] = torch.tensor([-1e4, -1e4, 1e4, 1e4]) * torch.rand(k, 1, generator=gen)
            elif name == "inverted":  # x2 < x1 or y2 < y1 (a head can predict negative distances)
                box[sel] = box[sel][:, [2, 3, 0, 1]]
        out[b] = box
    return out


def _logits(spec, B, N, C, gt_labels, gt_mask, gen):
    x = torch.randn(B, N, C, generator=gen) * spec.logit_scale + spec.logit_offset
    for b in range(B):  # some priors score a real gt's class higher, as a trained head would
        lab = gt_labels[b][gt_mask[b]]
        if len(lab) and N:
            pick = lab[torch.randint(0, len(lab), (N,), generator=gen)]
            boost = (torch.rand(N, generator=gen) < 0.5).float() * 4.0
            x[b, torch.arange(N), pick] += boost
    if spec.extremes in ("30", "1e4"):
        big = float(spec.extremes)
        hit = torch.rand(B, N, C, generator=gen) < 0.2
        sign = torch.where(torch.rand(B, N, C, generator=gen) < 0.5, -1.0, 1.0)
        x = torch.where(hit, sign * big, x)
    elif spec.extremes == "const":  # every logit equal: exact ties in the class cost
        x = torch.full_like(x, float(spec.logit_offset))
    return x.to(DTYPES[spec.dtype])


def _fields(a):
    return a.gt_index, a.labels, a.ious


def check_assignment(problem, expected, actual, context=""):
    """Assert that `actual` equals `expected` (both DSLAssignment of the problem) up to ties
    that float rounding decides (tests/assign_compare.py), and that it is well formed."""
    e, a = [t.cpu() for t in _fields(expected)], [t.cpu() for t in _fields(actual)]
    if all(torch.equal(x, y) for x, y in zip(e, a)) and a[0].dtype == torch.long \
            and a[2].dtype == torch.float32:
        # Bitwise equal to the reference, which its own tests show to be SPEC section 2.
        return {"n_diff": 0}
    kw = problem.kwargs
    costs = reference_costs(problem.case, kw["semantics"], topk=kw["topk"],
                            soft_center_radius=kw["soft_center_radius"], iou_weight=kw["iou_weight"])
    return assert_same_assignment(expected, actual, **costs, rtol=1e-6,
                                  cost_atol=cost_tolerance(problem),
                                  context=f"{context}; {problem.spec!r}")


def cost_tolerance(problem):
    """(B, N) absolute error a correct float32 implementation may make in a prior's costs
    beyond 1e-6 relative: the mmdet class cost S0 - f(x_L, 0) + f(x_L, iou) cancels large
    terms when logits are extreme, and S0 = sum_c f(x_c, 0) may be summed in any order
    (C roundings) or with the Triton kernel's fast transcendentals (relative error < 2e-6);
    the gt-class term rounds products of |x| (both semantics)."""
    x = problem.case["pred_logits"].double()
    eps = 2.0 ** -23
    tol = 4 * eps * x.abs().amax(-1)
    if problem.kwargs["semantics"] == "mmdet":
        s0 = (F.softplus(x) * x.sigmoid().square()).sum(-1)
        tol = tol + (4e-6 + x.shape[-1] * eps) * s0
    return tol.float()


# ------------------------------------------------------------------------------------------
# Quality Focal Loss
# ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class QFLSpec:
    seed: int
    M: int
    C: int
    dtype: str
    layout: str
    label_dtype: str
    pos_frac: float
    background: str        # how background is written: "C", "-1" or "mixed" (the public op takes [-1, C])
    scores: str            # "uniform" or "exact" (0, 1/2, 1)
    logit_scale: float
    extremes: str
    beta: float
    weight: bool
    reduction: str         # "none" | "sum" | "mean" | "avg_factor"


def qfl_spec(d, *, max_m=96, max_c=24, dtypes=("fp32", "fp16", "bf16"), cs=None):
    return QFLSpec(
        seed=d.int(0, 2 ** 31 - 1), M=d.int(0, max_m), C=d.choice(cs) if cs else d.int(1, max_c),
        dtype=d.choice(dtypes),
        layout=d.choice(LAYOUTS + ("bnc_view",)), label_dtype=d.choice(("int64", "int32")),
        pos_frac=d.choice((0.3, 0.0, 1.0, 0.05)), background=d.choice(("C", "-1", "mixed")),
        scores=d.choice(("uniform", "exact")), logit_scale=d.choice((4.0, 1.0, 12.0)),
        extremes=d.choice(("none", "30", "1e4")), beta=d.choice((2.0, 1.5, 3.0)),
        weight=d.coin(0.5), reduction=d.choice(("none", "sum", "mean", "avg_factor")))


class LossProblem(NamedTuple):
    args: tuple            # the op's positional tensors (the first one is differentiated)
    kwargs: dict
    grad_out: torch.Tensor  # upstream gradient for reduction "none" (a scalar 1 otherwise)
    spec: object


def build_qfl(spec, device="cpu"):
    gen = torch.Generator().manual_seed(spec.seed)
    M, C = spec.M, spec.C
    x = torch.randn(M, C, generator=gen) * spec.logit_scale
    if spec.extremes != "none":
        big = float(spec.extremes)
        hit = torch.rand(M, C, generator=gen) < 0.2
        x = torch.where(hit, torch.where(torch.rand(M, C, generator=gen) < 0.5, -big, big), x)
    x = x.to(DTYPES[spec.dtype])
    if spec.layout == "bnc_view" and M:  # rows of a (B, N, C) tensor seen as (B*N, C)
        x = x.view(1, M, C).flatten(0, 1)
    else:
        x = _layout(x, spec.layout, gen)
    labels = torch.randint(0, C, (M,), generator=gen)
    bg = torch.rand(M, generator=gen) >= spec.pos_frac
    codes = {"C": [C], "-1": [-1], "mixed": [C, -1]}[spec.background]
    fill = torch.tensor(codes)[torch.randint(0, len(codes), (M,), generator=gen)]
    labels = torch.where(bg, fill, labels).to(getattr(torch, spec.label_dtype))
    if spec.scores == "exact":
        scores = torch.tensor([0.0, 0.5, 1.0])[torch.randint(0, 3, (M,), generator=gen)]
    else:
        scores = torch.rand(M, generator=gen)
    scores = torch.where(bg, torch.zeros_like(scores), scores)
    weight = torch.rand(M, generator=gen) if spec.weight else None
    kwargs = dict(weight=None if weight is None else weight.to(device), beta=spec.beta)
    kwargs.update(_reduction(spec.reduction, gen))
    grad_out = torch.rand(M, generator=gen) + 0.5 if spec.reduction == "none" else torch.tensor(1.0)
    return LossProblem((x.to(device), labels.to(device), scores.to(device)), kwargs,
                       grad_out.to(device), spec)


def _reduction(name, gen):
    if name == "avg_factor":
        return dict(reduction="mean", avg_factor=float(torch.rand(1, generator=gen)) * 50 + 0.5)
    return dict(reduction=name)


# ------------------------------------------------------------------------------------------
# GIoU loss
# ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GIoUSpec:
    seed: int
    M: int
    kinds: tuple           # enabled BOX_KINDS (rows pick one of them)
    dtype: str
    layout: str
    eps: float
    weight: str            # "none" | "row" | "coord" ((M, 4), averaged as mmdet does)
    reduction: str


def giou_spec(d, *, max_m=96, dtypes=("fp32", "fp64", "fp16", "bf16")):
    kinds = tuple(k for k in BOX_KINDS[1:] if d.coin(0.4))
    return GIoUSpec(
        seed=d.int(0, 2 ** 31 - 1), M=d.int(0, max_m), kinds=("random",) + kinds,
        dtype=d.choice(dtypes), layout=d.choice(LAYOUTS), eps=d.choice((1e-6, 1e-7, 1e-3)),
        weight=d.choice(("none", "row", "coord")), reduction=d.choice(("none", "sum", "mean", "avg_factor")))


def _box_pairs(kind, k, gen):
    """k (pred, target) pairs of xyxy boxes of one kind, float64."""
    r = lambda *s: torch.rand(s, generator=gen, dtype=torch.float64)  # noqa: E731
    c = r(k, 2) * 200
    wh = (r(k, 2) * 5).exp()
    t = torch.cat([c - wh / 2, c + wh / 2], 1)
    p = t + torch.randn(k, 4, generator=gen, dtype=torch.float64) * wh.repeat(1, 2) * 0.3
    if kind == "identical":
        p = t.clone()
    elif kind == "nested":
        f = torch.where(r(k, 4) < 0.3, torch.zeros(k, 4, dtype=torch.float64), r(k, 4) * 0.45)
        w, h = t[:, 2] - t[:, 0], t[:, 3] - t[:, 1]
        p = torch.stack([t[:, 0] + f[:, 0] * w, t[:, 1] + f[:, 1] * h, t[:, 2] - f[:, 2] * w,
                         t[:, 3] - f[:, 3] * h], 1)
        p, t = (p, t) if torch.rand(1, generator=gen) < 0.5 else (t, p)
    elif kind == "disjoint":
        p = t + torch.cat([wh, wh], 1) * (1.5 + r(k, 1))
    elif kind == "point":
        p = torch.cat([c, c], 1)
    elif kind == "line":
        p = t.clone()
        p[:, 2] = p[:, 0]
    elif kind == "inverted":
        p = p[:, [2, 3, 0, 1]]
    elif kind == "huge":
        p, t = p * 50, t * 50
    elif kind == "tiny":
        small = torch.cat([c, c + r(k, 2) * 0.9 + 0.01], 1)
        p, t = small, small + torch.randn(k, 4, generator=gen, dtype=torch.float64) * 0.05
    elif kind == "far":
        p = t + 1e4
    elif kind == "grid":  # integer corners: equal coordinates and min/max ties
        p, t = (p / 4).round() * 4, (t / 4).round() * 4
    return p, t


def build_giou(spec, device="cpu"):
    gen = torch.Generator().manual_seed(spec.seed)
    M = spec.M
    which = torch.randint(0, len(spec.kinds), (M,), generator=gen)
    pred = torch.zeros(M, 4, dtype=torch.float64)
    target = torch.zeros(M, 4, dtype=torch.float64)
    for i, kind in enumerate(spec.kinds):
        sel = which == i
        if bool(sel.any()):
            pred[sel], target[sel] = _box_pairs(kind, int(sel.sum()), gen)
    dtype = DTYPES[spec.dtype]
    pred, target = _layout(pred.to(dtype), spec.layout, gen), target.to(dtype)
    weight = {"none": None, "row": torch.rand(M, generator=gen),
              "coord": torch.rand(M, 4, generator=gen)}[spec.weight]
    kwargs = dict(weight=None if weight is None else weight.to(device), eps=spec.eps)
    kwargs.update(_reduction(spec.reduction, gen))
    grad_out = torch.rand(M, generator=gen) + 0.5 if spec.reduction == "none" else torch.tensor(1.0)
    return LossProblem((pred.to(device), target.to(device)), kwargs, grad_out.to(device), spec)


# ------------------------------------------------------------------------------------------
# Loss comparison
# ------------------------------------------------------------------------------------------

def loss_and_grad(op, problem, backend):
    """(loss, d(grad_out . loss)/d(first argument)) of `op` on `backend`."""
    x = problem.args[0].detach().requires_grad_()  # a new leaf with the same strides
    loss = op(x, *problem.args[1:], **problem.kwargs, backend=backend)
    g = None
    if loss.requires_grad:  # (not for M = 0 on every backend)
        g, = torch.autograd.grad(loss, x, problem.grad_out.to(loss.dtype), allow_unused=True)
    return loss.detach(), (torch.zeros_like(x) if g is None else g)


def check_close(name, got, want, rtol, atol, problem):
    """assert_close with the spec (the repro) in the message."""
    assert got.dtype == want.dtype and got.shape == want.shape, \
        f"{name}: {got.dtype}{tuple(got.shape)} != {want.dtype}{tuple(want.shape)}; {problem.spec!r}"
    # inf only where the true value overflows the dtype too (e.g. fp16 gradients ~1/eps)
    ok = torch.isfinite(got) | (got == want)
    assert bool(ok.all()), f"{name}: not finite: {got}; {problem.spec!r}"
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol,
                               msg=lambda m: f"{name}: {m}\n{problem.spec!r}")


def upcast(problem):
    """The same problem with low-precision boxes in float32 (what cpp and triton compute in)."""
    p, t = problem.args
    if p.dtype in (torch.float16, torch.bfloat16):
        return problem._replace(args=(p.float(), t.float()))
    return problem


EPS = {torch.float32: 2 ** -23, torch.float64: 2 ** -52, torch.float16: 2 ** -10,
       torch.bfloat16: 2 ** -7}


def loss_tol(dtype):
    """(rtol, atol relative to the largest value) for results stored in `dtype`: float32
    arithmetic on both sides in a different order (and the kernels' fast transcendentals,
    relative error < 2e-6), or a few roundings to fp16/bf16."""
    if dtype == torch.float64:
        return 1e-9, 1e-9
    if dtype == torch.float32:
        return 1e-5, 1e-5
    return 4 * EPS[dtype], 4 * EPS[dtype]


def compare_losses(op, problem, backend, reference_problem):
    """The backend's loss and gradient against the torch reference on reference_problem (the
    same inputs, or them in float32 where the reference would otherwise compute in fp16).
    QFL's loss is float32 arithmetic and result whatever the logits' dtype; the GIoU loss is
    rounded to the boxes' dtype (before a float32 weight promotes it)."""
    x = problem.args[0]
    loss_dtype = torch.float32 if op is ops.quality_focal_loss else x.dtype
    want, g_want = loss_and_grad(op, reference_problem, "torch")
    got, g_got = loss_and_grad(op, problem, backend)
    want, g_want = want.to(got.dtype), g_want.to(x.dtype)
    for name, a, b, dtype in (("loss", got, want, loss_dtype), ("gradient", g_got, g_want, x.dtype)):
        rtol, atol = loss_tol(dtype)
        scale = max(1.0, float(b.abs().max())) if b.numel() else 1.0
        check_close(f"{backend} {name}", a, b, rtol, atol * scale, problem)


# ------------------------------------------------------------------------------------------
# Shrinking without hypothesis (the device run): greedy, one simplification at a time
# ------------------------------------------------------------------------------------------

_SIMPLE = {
    DSLASpec: dict(extremes="none", dtype="fp32", layout="contiguous", topk=13,
                   soft_center_radius=3.0, iou_weight=3.0, logit_scale=1.5, logit_offset=-4.0,
                   pred_modes=()),
    QFLSpec: dict(dtype="fp32", layout="contiguous", label_dtype="int64", extremes="none",
                  beta=2.0, weight=False, reduction="none", scores="uniform", background="C"),
    GIoUSpec: dict(dtype="fp32", layout="contiguous", eps=1e-6, weight="none", reduction="none",
                   kinds=("random",)),
}


def _simpler(spec):
    """Specs one step simpler than `spec` (smaller sizes, fewer gts or kinds, plain settings)."""
    rep = lambda **kw: dataclasses.replace(spec, **kw)  # noqa: E731
    if isinstance(spec, DSLASpec):
        for b in sorted({1, spec.B - 1}):
            if 1 <= b < spec.B:
                yield rep(B=b, gt=spec.gt[:b])
        for j in range(spec.G):  # drop gt slot j in every image
            yield rep(G=spec.G - 1, gt=tuple(img[:j] + img[j + 1:] for img in spec.gt))
        for b, img in enumerate(spec.gt):
            for j, kind in enumerate(img):
                if kind not in ("", "random"):
                    new = img[:j] + ("random",) + img[j + 1:]
                    yield rep(gt=spec.gt[:b] + (new,) + spec.gt[b + 1:])
        if spec.grid:
            H, W, levels = spec.grid
            for grid in ((H, W, 1), (max(1, H // 2), W, levels), (H, max(1, W // 2), levels)):
                if grid != spec.grid:
                    yield rep(grid=grid)
        elif spec.n_random > 1:
            yield rep(n_random=max(1, spec.n_random // 2))
    else:
        for m in sorted({1, spec.M // 2, spec.M - 1}):
            if 0 <= m < spec.M:
                yield rep(M=m)
    if hasattr(spec, "C"):
        for c in sorted({1, spec.C // 2}):
            if 1 <= c < spec.C:
                yield rep(C=c)
    for field in ("pred_modes", "kinds"):
        value = getattr(spec, field, None)
        for i in range(1 if field == "kinds" else 0, len(value or ())):
            yield rep(**{field: value[:i] + value[i + 1:]})
    for field, simple in _SIMPLE[type(spec)].items():
        if getattr(spec, field) != simple:
            yield rep(**{field: simple})


def shrink(spec, fails, budget_s=30.0, max_tries=300):
    """A locally minimal spec for which fails(spec) is still True (greedy descent);
    returns (spec, tries)."""
    start, tries, improved = time.monotonic(), 0, True
    while improved:
        improved = False
        for candidate in _simpler(spec):
            if tries >= max_tries or time.monotonic() - start > budget_s:
                return spec, tries
            tries += 1
            if fails(candidate):
                spec, improved = candidate, True
                break
    return spec, tries
