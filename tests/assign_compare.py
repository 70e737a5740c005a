"""Compare two DSLA assignments, allowing only differences that a float tie explains.

Two correct implementations of SPEC section 2 may round a cost or an IoU sum differently.
A prior's assignment may then differ, but only when
  * conflict tie: both sides matched it, to gts whose costs for it agree within `rtol`
    (step 6 decided by rounding), or
  * selection tie: for some real gt, the prior's cost agrees within `rtol` with the cost of
    the gt's k-th / (k+1)-th candidate, so rounding decides whether it is among the k
    cheapest (step 5), or the gt's dynamic-k sum lies within `k_atol` of an integer (step 4).
Everything else must be equal, and explained differences must be rare.

    from tests.assign_compare import assert_same_assignment, reference_costs
    assert_same_assignment(expected, actual, **reference_costs(case, semantics="mmdet"), rtol=1e-6)
"""
import math

import torch

from rtmdet import ops
from rtmdet.ops.dsla import dsl_cost_ref


def reference_costs(case, semantics="mmdet", *, topk=13, soft_center_radius=3.0, iou_weight=3.0):
    """valid, iou, cost of `ops.dsl_cost_ref` for a case dict (tests/cases.py), plus what the
    comparison needs: keyword arguments for `assert_same_assignment`."""
    valid, iou, cost = dsl_cost_ref(case["priors"], case["pred_bboxes"], case["pred_logits"],
                                    case["gt_bboxes"], case["gt_labels"], case["gt_mask"],
                                    soft_center_radius=soft_center_radius, iou_weight=iou_weight,
                                    semantics=semantics)
    return dict(cost=cost, iou=iou, valid=valid, gt_mask=case["gt_mask"],
                gt_labels=case["gt_labels"], topk=topk, semantics=semantics)


def _fields(a):
    if isinstance(a, dict):
        return a["gt_index"], a["labels"], a["ious"]
    return a.gt_index, a.labels, a.ious


def _close(a, b, rtol, atol=0.0):
    """Elementwise: equal, or both finite and within atol + rtol of the larger magnitude."""
    both_finite = torch.isfinite(a) & torch.isfinite(b)
    near = (a - b).abs() <= atol + rtol * torch.maximum(a.abs(), b.abs())
    return (a == b) | (both_finite & near)


def _k_range(iou_col, valid_col, topk, semantics, k_atol):
    """(k_lo, k_hi) of one gt's dynamic k, widened where its IoU sum is near an integer."""
    pool = iou_col[valid_col] if semantics == "mmdet" else iou_col
    m = min(topk, pool.numel())
    s = float(pool.double().topk(m).values.sum()) if m else 0.0
    return max(1, math.floor(s - k_atol)), max(1, math.floor(s + k_atol))


def _selection_ambiguous(b, n, g, cost, valid, k_range, rtol, atol):
    """Whether rounding can decide if gt g selects prior n (n valid)."""
    col = cost[b, :, g][valid[b]]
    c = cost[b, n, g].expand_as(col)
    close = _close(col, c, rtol, torch.maximum(atol[b][valid[b]], atol[b, n]))
    lower = (col < c) & ~close
    lo, hi = int(lower.sum()), int((lower | close).sum())
    k_lo, k_hi = k_range
    return hi > k_lo and lo < k_hi


def assert_same_assignment(expected, actual, cost, iou, *, valid, gt_mask, gt_labels, topk=13,
                           semantics="mmdet", rtol=1e-6, k_atol=2e-5, iou_atol=1e-6,
                           max_frac=0.005, max_abs=1, cost_atol=0.0, context=""):
    """Assert that `actual` equals `expected` up to ties decided by float rounding.

    expected, actual: DSLAssignment or dicts with gt_index, labels, ious of shape (B, N) or (N,).
    cost, iou (B, N, G) float32 and valid (B, N) bool: `ops.dsl_cost_ref` for the same inputs
    (see `reference_costs`); gt_mask (B, G) bool; gt_labels (B, G).
    rtol: relative tolerance under which two costs count as tied (1e-6 kernel vs reference,
    ~1e-5 for an oracle that sums the class cost literally). cost_atol: an absolute tolerance
    added to it, a number or (B, N) per prior (for costs that cancel large terms, e.g. the
    mmdet class cost with extreme logits). At most max(max_abs,
    max_frac * foreground) priors may differ, each for a reason above.
    Returns a dict with the number of differences of each kind.
    """
    e_idx, e_lab, e_iou = (t.cpu() for t in _fields(expected))
    a_idx, a_lab, a_iou = _fields(actual)
    where = f" ({context})" if context else ""
    if e_idx.dim() == 1:
        e_idx, e_lab, e_iou = e_idx[None], e_lab[None], e_iou[None]
        a_idx, a_lab, a_iou = a_idx[None], a_lab[None], a_iou[None]
    for name, t in (("gt_index", a_idx), ("labels", a_lab), ("ious", a_iou)):
        assert t.shape == e_idx.shape, f"{name}: shape {tuple(t.shape)} != {tuple(e_idx.shape)}{where}"
    assert a_idx.dtype == torch.long and a_lab.dtype == torch.long, \
        f"gt_index/labels must be int64, got {a_idx.dtype}/{a_lab.dtype}{where}"
    assert a_iou.dtype == torch.float32, f"ious must be float32, got {a_iou.dtype}{where}"
    a_idx, a_lab, a_iou = a_idx.cpu(), a_lab.cpu(), a_iou.cpu()
    cost, iou, valid = cost.cpu(), iou.cpu(), valid.cpu()
    gt_mask, gt_labels = gt_mask.cpu(), gt_labels.cpu().long()
    B, N = e_idx.shape
    G = cost.shape[-1] if cost.dim() == 3 else 0
    atol = torch.as_tensor(cost_atol, dtype=torch.float32).cpu().expand(B, N)

    # The actual assignment must be self-consistent, whatever the ties.
    fg = a_idx >= 0
    assert bool(((a_idx >= -1) & (a_idx < max(G, 1))).all()), f"gt_index out of [-1, G){where}"
    if bool(fg.any()):
        b_fg, n_fg = fg.nonzero(as_tuple=True)
        g_fg = a_idx[fg]
        assert bool(valid[b_fg, n_fg].all()), f"an invalid prior is foreground{where}"
        assert bool(gt_mask[b_fg, g_fg].all()), f"a prior is matched to a padded gt{where}"
        assert torch.equal(a_lab[fg], gt_labels[b_fg, g_fg]), f"labels != gt_labels[gt_index]{where}"
        got, want = a_iou[fg], iou[b_fg, n_fg, g_fg]
        bad = (got - want).abs() > iou_atol
        assert not bool(bad.any()), (f"ious differ from IoU(pred, matched gt) by up to "
                                     f"{float((got - want).abs().max()):.3g}{where}")
    assert bool((a_lab[~fg] == -1).all()) and bool((a_iou[~fg] == 0).all()), \
        f"background priors must have label -1 and iou 0{where}"

    same = e_idx == a_idx
    both = same & (e_idx >= 0)
    if bool(both.any()):
        diff = (e_iou[both] - a_iou[both]).abs().max()
        assert float(diff) <= iou_atol, f"ious of equally matched priors differ by {float(diff):.3g}{where}"
        assert torch.equal(e_lab[both], a_lab[both]), f"labels differ for equally matched priors{where}"

    reasons = {"conflict_tie": 0, "selection_tie": 0}
    unexplained = []
    k_ranges = {}
    for b, n in (~same).nonzero().tolist():
        e, a = int(e_idx[b, n]), int(a_idx[b, n])
        if e >= 0 and a >= 0 and bool(_close(cost[b, n, e], cost[b, n, a], rtol, atol[b, n])):
            reasons["conflict_tie"] += 1
            continue
        explained = False
        if bool(valid[b, n]):
            order = [g for g in (e, a) if g >= 0] + [g for g in range(G) if g not in (e, a)]
            for g in order:
                if not bool(gt_mask[b, g]):
                    continue
                if (b, g) not in k_ranges:
                    k_ranges[b, g] = _k_range(iou[b, :, g], valid[b], topk, semantics, k_atol)
                if _selection_ambiguous(b, n, g, cost, valid, k_ranges[b, g], rtol, atol):
                    explained = True
                    break
        if explained:
            reasons["selection_tie"] += 1
        else:
            c = {g: float(cost[b, n, g]) for g in (e, a) if g >= 0}
            unexplained.append(f"image {b} prior {n}: expected gt {e}, got {a} (costs {c})")
    assert not unexplained, (f"{len(unexplained)} assignment differences not explained by a float "
                             f"tie (rtol={rtol}){where}:\n  " + "\n  ".join(unexplained[:10]))
    n_diff = sum(reasons.values())
    n_fg = int((e_idx >= 0).sum())
    allowed = max(max_abs, max_frac * n_fg)
    assert n_diff <= allowed, (f"{n_diff} of {n_fg} foreground priors differ; each is explained by "
                               f"a float tie ({reasons}) but at most {allowed:g} may{where}")
    return dict(reasons, n_diff=n_diff, n_fg=n_fg)


def assert_matches_reference(case, actual, semantics="mmdet", *, rtol=1e-6, topk=13, **kwargs):
    """`assert_same_assignment` of `actual` against `ops.dsl_assign(..., backend="torch")`."""
    from tests.cases import case_args
    expected = ops.dsl_assign(*case_args(case), topk=topk, semantics=semantics, backend="torch")
    return assert_same_assignment(expected, actual, **reference_costs(case, semantics, topk=topk),
                                  rtol=rtol, **kwargs)
