"""The PyTorch reference of the Dynamic Soft Label Assigner against the literal oracle of
SPEC section 2 (tests/oracle.py), plus hand-built cases for every rule of that section."""
import itertools

import pytest
import torch

from rtmdet import ops
from rtmdet.ops.dsla import dynamic_ks
from tests.assign_compare import assert_same_assignment, reference_costs
from tests.cases import KINDS, case_args, image_args, make_case
from tests.oracle import dsla_oracle, single_thread


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with single_thread():  # many small ops: intra-op threads only contend on a busy machine
        yield

SEMANTICS = ("mmdet", "mmyolo")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Small geometries: N = 1, 15, 21, 252, 2100.
GEOMETRIES = (dict(featmaps=[(1, 1)], strides=(8,)), dict(featmaps=[(3, 5)], strides=(8,)),
              dict(featmaps=[(3, 5), (2, 3)], strides=(8, 16)), dict(img_size=(96, 128)),
              dict(img_size=(320, 320)))


def _small_cases():
    """Every kind x semantics x pad, cycling geometry, G, C, dtype and seed through them."""
    geo, gs, cs, dts = (itertools.cycle(x) for x in
                        (GEOMETRIES, (1, 7, 300, 7, 1), (1, 3, 80, 3), DTYPES))
    cases = []
    for i, (kind, semantics, pad) in enumerate(itertools.product(KINDS, SEMANTICS,
                                                                 ("none", "end", "anywhere"))):
        cases.append(dict(seed=i, B=2, G=next(gs), C=next(cs), dtype=next(dts), pad=pad,
                          kind=kind, semantics=semantics, **next(geo)))
    return cases


def _big_cases():
    """640x640 (N = 8400): G = 300 on a few cases, G = 7 with every logit dtype."""
    cases = [dict(seed=100 + i, B=2, G=300, C=80, dtype=torch.float32, pad="anywhere",
                  kind=kind, semantics=s) for i, (kind, s) in
             enumerate([("mixed", "mmdet"), ("crowded", "mmyolo")])]
    cases += [dict(seed=200 + i, B=2, G=7, C=80, dtype=dtype, pad="end", kind=kind, semantics=s)
              for i, (dtype, kind, s) in enumerate([(torch.float16, "random", "mmdet"),
                                                    (torch.bfloat16, "border", "mmyolo"),
                                                    (torch.float32, "far", "mmdet"),
                                                    (torch.float16, "duplicate", "mmyolo")])]
    return cases


def _case_id(c):
    where = c.get("img_size", c.get("featmaps"))
    return (f"{c['kind']}-{c['semantics']}-pad_{c['pad']}-G{c['G']}-C{c['C']}-"
            f"{str(c['dtype'])[6:]}-{where}-s{c['seed']}").replace(" ", "")


def _make(c):
    c = dict(c)
    semantics = c.pop("semantics")
    return make_case(c.pop("seed"), **c), semantics


@pytest.mark.parametrize("params", _small_cases() + _big_cases(), ids=_case_id)
def test_reference_matches_oracle(params):
    case, semantics = _make(params)
    expected = dsla_oracle(*case_args(case), semantics=semantics)
    actual = ops.dsl_assign(*case_args(case), semantics=semantics, backend="torch")
    # The oracle sums the mmdet class cost over all C classes literally; the reference uses
    # the per-prior identity, so equal costs may differ by rounding.
    assert_same_assignment(expected, actual, **reference_costs(case, semantics), rtol=1e-5,
                           context=_case_id(params))
    # Dynamic k is summed in the same order by both: it must agree exactly.
    valid, iou, _ = ops.dsl_cost_ref(*case_args(case), semantics=semantics)
    k = dynamic_ks(iou, valid, case["gt_mask"], 13, semantics) if iou.numel() else None
    has_valid = valid.any(1)[:, None] & case["gt_mask"]
    if k is not None:
        assert torch.equal(k[has_valid], expected["k"][has_valid])


@pytest.mark.parametrize("semantics", SEMANTICS)
@pytest.mark.parametrize("kind,pad,dtype,seed", [("mixed", "anywhere", torch.float32, 1),
                                                 ("crowded", "end", torch.float16, 2),
                                                 ("duplicate", "anywhere", torch.bfloat16, 3),
                                                 ("far", "anywhere", torch.float32, 4)])
def test_batched_equals_per_image(kind, pad, dtype, seed, semantics):
    case = make_case(seed, B=4, img_size=(320, 256), G=12, C=5, dtype=dtype, pad=pad, kind=kind)
    batched = ops.dsl_assign(*case_args(case), semantics=semantics, backend="torch")
    for b in range(4):
        args, real = image_args(case, b)
        single = ops.dsl_assign(*args, semantics=semantics, backend="torch")
        assert single.gt_index.shape == (case["priors"].shape[0],)
        mapped = torch.where(single.gt_index >= 0, real[single.gt_index.clamp(min=0)]
                             if len(real) else single.gt_index, single.gt_index)
        assert torch.equal(batched.gt_index[b], mapped)
        assert torch.equal(batched.labels[b], single.labels)
        assert torch.equal(batched.ious[b], single.ious)
        # The same image with its padding, as an unbatched call with gt_mask.
        padded = ops.dsl_assign(case["priors"], case["pred_bboxes"][b], case["pred_logits"][b],
                                case["gt_bboxes"][b], case["gt_labels"][b], case["gt_mask"][b],
                                semantics=semantics, backend="torch")
        assert torch.equal(padded.gt_index, batched.gt_index[b])


@pytest.mark.parametrize("semantics", SEMANTICS)
def test_output_shapes_and_dtypes(semantics):
    case = make_case(5, B=3, featmaps=[(3, 5), (2, 3)], strides=(8, 16), G=4, C=3,
                     dtype=torch.bfloat16, pad="anywhere", kind="crowded")
    a = ops.dsl_assign(*case_args(case), semantics=semantics, backend="torch")
    assert isinstance(a, ops.DSLAssignment)
    for t, dtype in zip(a, (torch.int64, torch.int64, torch.float32)):
        assert t.shape == (3, 21) and t.dtype == dtype
    fg = a.gt_index >= 0
    assert bool(fg.any())
    assert bool((a.labels[~fg] == -1).all()) and bool((a.ious[~fg] == 0).all())
    b, n = fg.nonzero(as_tuple=True)
    assert torch.equal(a.labels[fg], case["gt_labels"][b, a.gt_index[fg]])


# ----------------------------------------------------------------------------------------
# Empty inputs
# ----------------------------------------------------------------------------------------

def _assert_background(a, shape):
    assert a.gt_index.shape == a.labels.shape == a.ious.shape == shape
    assert (a.gt_index.dtype, a.labels.dtype, a.ious.dtype) == (torch.int64, torch.int64, torch.float32)
    assert bool((a.gt_index == -1).all()) and bool((a.labels == -1).all()) and bool((a.ious == 0).all())


@pytest.mark.parametrize("semantics", SEMANTICS)
def test_empty_inputs_are_background(semantics):
    priors = ops.grid_priors([(3, 5), (2, 3)], (8, 16))
    N = priors.shape[0]
    run = lambda *args, **kw: ops.dsl_assign(*args, **kw, semantics=semantics, backend="torch")
    # G = 0, batched and unbatched.
    _assert_background(run(priors, torch.rand(2, N, 4) * 40, torch.randn(2, N, 3), torch.zeros(2, 0, 4),
                           torch.zeros(2, 0, dtype=torch.long)), (2, N))
    _assert_background(run(priors, torch.rand(N, 4) * 40, torch.randn(N, 3), torch.zeros(0, 4),
                           torch.zeros(0, dtype=torch.long)), (N,))
    gts = torch.tensor([[[0.0, 0.0, 30.0, 30.0]]]).repeat(2, 1, 1)
    labels = torch.zeros(2, 1, dtype=torch.long)
    # N = 0.
    _assert_background(run(priors[:0], torch.zeros(2, 0, 4), torch.zeros(2, 0, 3), gts, labels), (2, 0))
    # B = 0.
    _assert_background(run(priors, torch.zeros(0, N, 4), torch.zeros(0, N, 3), torch.zeros(0, 1, 4),
                           torch.zeros(0, 1, dtype=torch.long)), (0, N))
    # Every gt padded (garbage that would contain priors), and gts that contain no prior.
    _assert_background(run(priors, torch.rand(2, N, 4) * 40, torch.randn(2, N, 3), gts, labels - 1,
                           torch.zeros(2, 1, dtype=torch.bool)), (2, N))
    no_valid = torch.tensor([[[0.0, 0.0, 8.0, 8.0], [3.0, 3.0, 7.0, 7.0]]])  # grid points on borders
    _assert_background(run(priors, torch.rand(1, N, 4) * 40, torch.randn(1, N, 3), no_valid,
                           torch.zeros(1, 2, dtype=torch.long)), (1, N))


# ----------------------------------------------------------------------------------------
# Hand-built cases: dynamic k, tie rules, the surprising consequences
# ----------------------------------------------------------------------------------------

def _row_case(fractions, gt_box, other_box=None, n_valid=None):
    """Priors (0, 0), (8, 0), ... on one row; prior i predicts the left part of gt_box of
    width fraction[i] (IoU = fraction[i]) or other_box beyond n_valid."""
    priors = ops.grid_priors([(1, len(fractions))], (8,))
    x1, y1, x2, y2 = gt_box
    preds = torch.tensor([[x1, y1, x1 + (x2 - x1) * f, y2] for f in fractions])
    if other_box is not None:
        preds[n_valid:] = torch.tensor(other_box)
    gts = torch.tensor([gt_box])
    return priors, preds, torch.zeros(len(fractions), 2), gts, torch.zeros(1, dtype=torch.long)


@pytest.mark.parametrize("topk,k", [(13, 3), (2, 1), (4, 2), (5, 3), (1, 1)])
def test_dynamic_k_by_hand(topk, k):
    fractions = [0.9, 0.8, 0.7, 0.5, 0.25, 0.25, 0.1, 0.05]   # sum 3.55; top 2: 1.7, top 4: 2.9
    priors, preds, logits, gts, labels = _row_case(fractions, [-1.0, -4.0, 60.0, 4.0])
    for semantics in SEMANTICS:
        valid, iou, _ = ops.dsl_cost_ref(priors, preds[None], logits[None], gts[None], labels[None],
                                         torch.ones(1, 1, dtype=torch.bool), semantics=semantics)
        assert bool(valid.all())
        torch.testing.assert_close(iou[0, :, 0], torch.tensor(fractions), rtol=1e-5, atol=1e-6)
        assert dynamic_ks(iou, valid, None, topk, semantics).tolist() == [[k]]
        a = ops.dsl_assign(priors, preds, logits, gts, labels, topk=topk, semantics=semantics,
                           backend="torch")
        assert int((a.gt_index == 0).sum()) == k   # one gt, no conflicts: k positives


def test_invalid_prior_never_selected_even_when_k_exceeds_valid():
    # gt covers priors 0..3; priors 4..7 are outside it but predict the gt exactly (IoU 1).
    gt = [-1.0, -4.0, 28.0, 4.0]
    priors, preds, logits, gts, labels = _row_case([0.5, 0.4, 0.3, 0.2] * 2, gt, gt, n_valid=4)
    valid, iou, _ = ops.dsl_cost_ref(priors, preds[None], logits[None], gts[None], labels[None],
                                     torch.ones(1, 1, dtype=torch.bool))
    assert valid[0].tolist() == [True] * 4 + [False] * 4
    # mmdet sums the valid priors' IoUs (1.4 -> 1); mmyolo all priors' (4 + 1.4 -> 5 > V = 4).
    assert dynamic_ks(iou, valid, None, 13, "mmdet").item() == 1
    assert dynamic_ks(iou, valid, None, 13, "mmyolo").item() == 5
    mmdet = ops.dsl_assign(priors, preds, logits, gts, labels, semantics="mmdet", backend="torch")
    assert mmdet.gt_index.tolist() == [0] + [-1] * 7      # the highest IoU is also the cheapest
    mmyolo = ops.dsl_assign(priors, preds, logits, gts, labels, semantics="mmyolo", backend="torch")
    assert mmyolo.gt_index.tolist() == [0] * 4 + [-1] * 4


@pytest.mark.parametrize("semantics", SEMANTICS)
def test_equal_costs_pick_the_lower_prior_index(semantics):
    # Priors 8 = (16, 8) and 9 = (24, 8) are the only ones inside the gt, symmetric about its
    # centre (20, 8), with the same prediction (IoU 0.6) and logits: equal costs, k = 1.
    priors = ops.grid_priors([(3, 6)], (8,))
    gts = torch.tensor([[12.0, 4.0, 28.0, 12.0]])
    preds = torch.tensor([100.0, 100.0, 101.0, 101.0]).repeat(18, 1)
    preds[8] = preds[9] = torch.tensor([12.0, 4.0, 28.0, 8.8])
    logits = torch.zeros(18, 2)
    labels = torch.tensor([1])
    valid, iou, cost = ops.dsl_cost_ref(priors, preds[None], logits[None], gts[None], labels[None],
                                        torch.ones(1, 1, dtype=torch.bool), semantics=semantics)
    assert valid[0].nonzero()[:, 0].tolist() == [8, 9]
    assert cost[0, 8, 0] == cost[0, 9, 0]
    assert dynamic_ks(iou, valid, None, 13, semantics).item() == 1
    a = ops.dsl_assign(priors, preds, logits, gts, labels, semantics=semantics, backend="torch")
    assert (a.gt_index == 0).nonzero()[:, 0].tolist() == [8]
    assert a.labels[8] == 1 and abs(float(a.ious[8]) - 0.6) < 1e-6


@pytest.mark.parametrize("semantics", SEMANTICS)
def test_duplicate_gts_tie_to_the_lower_gt_index(semantics):
    # Padding at index 0 (garbage that contains every prior), identical gts at 1 and 2, a
    # different gt at 3. The duplicates have identical costs: every prior both select goes
    # to gt 1, so the result equals the one without gt 2.
    gen = torch.Generator().manual_seed(0)
    priors = ops.grid_priors([(8, 8)], (8,))
    xy = priors[:, :2]
    preds = torch.cat([xy - 8, xy + 8], 1) + torch.rand(64, 4, generator=gen)
    logits = torch.randn(64, 3, generator=gen)
    gts = torch.tensor([[0.0, 0.0, 64.0, 64.0], [4.0, 4.0, 30.0, 30.0], [4.0, 4.0, 30.0, 30.0],
                        [34.0, 34.0, 60.0, 60.0]])
    labels = torch.tensor([-1, 0, 0, 2])
    mask = torch.tensor([False, True, True, True])
    _, _, cost = ops.dsl_cost_ref(priors, preds[None], logits[None], gts[None], labels[None], mask[None],
                                  semantics=semantics)
    assert torch.equal(cost[0, :, 1], cost[0, :, 2])
    a = ops.dsl_assign(priors, preds, logits, gts, labels, mask, semantics=semantics, backend="torch")
    assert int((a.gt_index == 1).sum()) >= 2 and int((a.gt_index == 3).sum()) >= 1
    assert not bool((a.gt_index == 2).any()) and not bool((a.gt_index == 0).any())
    keep = torch.tensor([1, 3])
    without = ops.dsl_assign(priors, preds, logits, gts[keep], labels[keep], semantics=semantics,
                             backend="torch")
    mapped = torch.where(without.gt_index >= 0, keep[without.gt_index.clamp(min=0)], without.gt_index)
    assert torch.equal(a.gt_index, mapped)


def _far_case(grid, big, tiny_boxes, big_index):
    """Stride-8 priors on a (h, w) grid, one big gt and tiny far gts; predictions are 16x16 boxes
    around each prior and logits are zero."""
    priors = ops.grid_priors([grid], (8,))
    xy = priors[:, :2]
    preds = torch.cat([xy - 8, xy + 8], 1)
    gts = list(tiny_boxes)
    gts.insert(big_index, big)
    gts = torch.tensor(gts)
    labels = torch.arange(len(gts))
    return priors, preds, torch.zeros(len(priors), len(gts)), gts, labels


@pytest.mark.parametrize("semantics", SEMANTICS)
def test_inf_costs_tie_to_the_lower_prior_index_and_iou_0_positive(semantics):
    # A = [1, 1, 100, 100] makes priors (8..96, 8..96) valid; B, tiny and ~70 strides away,
    # contains no prior and has +inf cost for every valid prior: it takes the lowest-index
    # valid prior, 65 = (8, 8), which lies outside B, with IoU 0.
    priors, preds, logits, gts, labels = _far_case((64, 64), [1.0, 1.0, 100.0, 100.0],
                                                   [[500.0, 500.0, 503.0, 503.0]], 0)
    valid, iou, cost = ops.dsl_cost_ref(priors, preds[None], logits[None], gts[None], labels[None],
                                        torch.ones(1, 2, dtype=torch.bool), semantics=semantics)
    assert valid[0].nonzero()[0, 0] == 65
    assert bool(torch.isinf(cost[0, valid[0], 1]).all())
    assert bool(torch.isfinite(cost[0, valid[0], 0]).all())
    a = ops.dsl_assign(priors, preds, logits, gts, labels, semantics=semantics, backend="torch")
    assert a.gt_index[65] == 1 and a.labels[65] == 1 and a.ious[65] == 0
    x, y = priors[65, :2].tolist()
    bx1, by1, bx2, by2 = gts[1].tolist()
    assert not (bx1 < x < bx2 and by1 < y < by2)          # B does not contain its positive
    assert int((a.gt_index == 1).sum()) == 1 and int((a.gt_index == 0).sum()) == 1


@pytest.mark.parametrize("semantics", SEMANTICS)
def test_conflict_goes_to_the_cheapest_gt_of_the_row_even_if_it_did_not_select(semantics):
    # Two tiny far gts both take prior 65 (all their costs are +inf); A, whose cost there is
    # finite but which selected a prior near its centre, wins it on the row.
    priors, preds, logits, gts, labels = _far_case(
        (64, 64), [1.0, 1.0, 100.0, 100.0], [[500.0, 500.0, 503.0, 503.0], [490.0, 500.0, 493.0, 503.0]], 2)
    a = ops.dsl_assign(priors, preds, logits, gts, labels, semantics=semantics, backend="torch")
    assert a.gt_index[65] == 2 and a.ious[65] > 0
    assert int((a.gt_index == 2).sum()) == 2 and not bool((a.gt_index < 2).logical_and(a.gt_index >= 0).any())


@pytest.mark.parametrize("semantics", SEMANTICS)
def test_inf_row_costs_tie_to_the_lower_real_gt_index(semantics):
    # A = [1, 1, 700, 12] (index 3) makes the priors of row y = 8 valid; prior 91 = (8, 8) is
    # ~43 strides from A's centre, so its cost for A is +inf. Tiny gts B1 (index 1) and B2
    # (index 2) near (350, 500) are +inf for every valid prior: both take prior 91, whose
    # whole row is +inf. The padded gt at index 0 (finite cost there) must not win: B1 does.
    priors, preds, logits, gts, labels = _far_case(
        (64, 90), [1.0, 1.0, 700.0, 12.0],
        [[0.0, 0.0, 16.0, 16.0], [345.0, 497.0, 350.0, 502.0], [353.0, 489.0, 358.0, 494.0]], 3)
    mask = torch.tensor([False, True, True, True])
    valid, _, cost = ops.dsl_cost_ref(priors, preds[None], logits[None], gts[None], labels[None],
                                      mask[None], semantics=semantics)
    assert valid[0].nonzero()[0, 0] == 91
    assert bool(torch.isinf(cost[0, valid[0], 1:3]).all())
    assert bool(torch.isinf(cost[0, 91, 1:]).all()) and bool(torch.isfinite(cost[0, 91, 0]))
    a = ops.dsl_assign(priors, preds, logits, gts, labels, mask, semantics=semantics, backend="torch")
    assert a.gt_index[91] == 1 and a.labels[91] == 1 and a.ious[91] == 0
    assert not bool((a.gt_index == 0).any()) and not bool((a.gt_index == 2).any())


def test_assert_same_assignment_rejects_unexplained_differences():
    case = make_case(7, B=1, img_size=(160, 160), G=5, C=3, kind="duplicate")
    kw = reference_costs(case, "mmdet")
    a = ops.dsl_assign(*case_args(case), backend="torch")
    assert assert_same_assignment(a, a, **kw)["n_diff"] == 0
    fg = (a.gt_index[0] >= 0).nonzero()[:, 0]
    cost = kw["cost"][0]
    # A prior moved to a gt with a clearly different cost: not a tie.
    for n in fg.tolist():
        g = int(a.gt_index[0, n])
        others = [h for h in range(5) if not torch.isclose(cost[n, h], cost[n, g], rtol=1e-3)]
        if others:
            break
    moved = [t.clone() for t in a]
    moved[0][0, n], moved[1][0, n] = others[0], case["gt_labels"][0, others[0]]
    moved[2][0, n] = kw["iou"][0, n, others[0]]
    with pytest.raises(AssertionError, match="not explained by a float tie"):
        assert_same_assignment(a, ops.DSLAssignment(*moved), **kw)
    # A positive dropped to background.
    dropped = [t.clone() for t in a]
    dropped[0][0, n], dropped[1][0, n], dropped[2][0, n] = -1, -1, 0.0
    with pytest.raises(AssertionError, match="not explained by a float tie"):
        assert_same_assignment(a, ops.DSLAssignment(*dropped), **kw)
    # Wrong iou or label for the same gt.
    bad_iou = [t.clone() for t in a]
    bad_iou[2][0, n] += 1e-3
    with pytest.raises(AssertionError, match="ious"):
        assert_same_assignment(a, ops.DSLAssignment(*bad_iou), **kw)
    # Moving a prior to the exact duplicate of its gt is an exact conflict tie: accepted.
    dup = [(n, h) for n in fg.tolist() for h in range(5)
           if h != int(a.gt_index[0, n]) and bool(cost[n, h] == cost[n, a.gt_index[0, n]])]
    assert dup, "the duplicate kind should give exact cost ties"
    n, h = dup[0]
    tied = [t.clone() for t in a]
    tied[0][0, n], tied[1][0, n] = h, case["gt_labels"][0, h]
    assert assert_same_assignment(a, ops.DSLAssignment(*tied), **kw)["conflict_tie"] == 1
