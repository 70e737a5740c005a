"""ops.hungarian_match (SPEC section 4): every backend against scipy's optimum on random and
adversarial problems, the C++ and Triton solvers against each other, errors, torch.library."""
import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from rtmdet import ops
from rtmdet.ops import _backend

HAS_CPP = "hungarian_match" in _backend.native_ops()
CPU_BACKENDS = ["torch"] + (["cpp"] if HAS_CPP else []) + ["triton"]  # triton: interpreter
needs_cpp = pytest.mark.skipif(not HAS_CPP, reason="rtmdet._C without hungarian_match (rebuild)")
pytestmark = pytest.mark.filterwarnings("ignore:.*fast path.*")


# ---- problems -------------------------------------------------------------------------------

def make_problem(kind, B, Q, G, seed, pad=False):
    """(cost (B, Q, G) float32, gt_mask (B, G) bool) of one adversarial kind."""
    g = torch.Generator().manual_seed(seed)
    if kind == "normal":
        cost = torch.randn(B, Q, G, generator=g)
    elif kind == "ties":  # integer costs in {0, 1, 2}: massive ties, many optima
        cost = torch.randint(0, 3, (B, Q, G), generator=g).float()
    elif kind == "constant":
        cost = torch.full((B, Q, G), 0.5)
    elif kind == "dup_gts":  # every gt repeated: the optimum is never unique
        cost = torch.rand(B, Q, max(1, (G + 1) // 2), generator=g).repeat_interleave(2, dim=2)[..., :G]
    elif kind == "dup_queries":
        cost = torch.rand(B, max(1, (Q + 1) // 2), G, generator=g).repeat_interleave(2, dim=1)[:, :Q]
    elif kind == "huge":
        cost = torch.rand(B, Q, G, generator=g) * 1e30
    elif kind == "tiny":
        cost = torch.rand(B, Q, G, generator=g) * 1e-30
    elif kind == "mixed_scale":  # 1e-6 .. 1e6 in one matrix, both signs
        cost = torch.randn(B, Q, G, generator=g) * 10.0 ** torch.randint(-6, 7, (B, Q, G), generator=g)
    elif kind == "forbidden":  # +inf pairs, still feasible: a finite diagonal-ish band remains
        cost = torch.rand(B, Q, G, generator=g)
        keep = torch.rand(B, Q, G, generator=g) < 0.4
        q = torch.arange(Q)[:, None] % max(G, 1)
        keep |= (q == torch.arange(G)[None, :]) | (torch.arange(Q)[:, None] == torch.arange(G)[None, :] % max(Q, 1))
        cost = cost.masked_fill(~keep, float("inf"))
    elif kind == "detr":  # the cost formula on random boxes and logits (SPEC 4, focal + L1 + GIoU)
        cost = _detr_like(B, Q, G, g)
    else:
        raise ValueError(kind)
    cost = cost.contiguous()
    if pad:
        mask = torch.rand(B, G, generator=g) < 0.6
        mask[0] = True  # one image with every gt, one (if B > 1) with none
        if B > 1:
            mask[1] = False
        # padded slots hold garbage: it must be ignored, NaN and -inf included
        garbage = torch.tensor([float("nan"), -float("inf"), -1e30, 0.0])
        fill = garbage[torch.randint(0, 4, (B, Q, G), generator=g)]
        cost = torch.where(mask[:, None, :], cost, fill)
    else:
        mask = torch.ones(B, G, dtype=torch.bool)
    return cost, mask


def _detr_like(B, Q, G, g):
    def boxes(n):
        xy = torch.rand(B, n, 2, generator=g) * 600
        wh = torch.rand(B, n, 2, generator=g) * 200 + 4
        return torch.cat([xy, xy + wh], -1)
    pred, gt = boxes(Q), boxes(G)
    p = torch.rand(B, Q, G, generator=g).clamp(1e-4, 1 - 1e-4)
    neg = -(1 - p + 1e-12).log() * 0.75 * p ** 2
    pos = -(p + 1e-12).log() * 0.25 * (1 - p) ** 2
    l1 = (pred[:, :, None, :] - gt[:, None, :, :]).abs().sum(-1) / 640
    giou = torch.stack([ops.box_iou(pred[b], gt[b], mode="giou") for b in range(B)])
    return 2 * (pos - neg) + 5 * l1 - 2 * giou


def scipy_optimum(cost, mask):
    """Per image: (optimal total, scale = sum |c| over scipy's pairs, number of pairs)."""
    out = []
    for b in range(cost.shape[0]):
        real = np.flatnonzero(mask[b].numpy())
        c = cost[b].double().numpy()[:, real]
        if c.size == 0:
            out.append((0.0, 0.0, 0))
            continue
        r, k = linear_sum_assignment(c)
        out.append((c[r, k].sum(), np.abs(c[r, k]).sum(), len(r)))
    return out


def assert_optimal(match, cost, mask, context=""):
    """A valid one-to-one matching of min(Q, G_b) pairs on real gts with scipy's total cost."""
    B, Q, G = cost.shape
    assert match.shape == (B, Q) and match.dtype == torch.int64, context
    match = match.cpu()
    for b, (opt, scale, pairs) in enumerate(scipy_optimum(cost, mask)):
        m = match[b]
        q = (m >= 0).nonzero()[:, 0]
        gts = m[q]
        assert ((m >= -1) & (m < G)).all(), f"{context} image {b}: index outside [-1, G)"
        assert len(q) == pairs, f"{context} image {b}: {len(q)} pairs, expected min(Q, G_b) = {pairs}"
        assert len(torch.unique(gts)) == len(gts), f"{context} image {b}: a gt matched twice"
        assert mask[b, gts].all(), f"{context} image {b}: a padded gt was matched"
        total = cost[b].double()[q, gts].sum().item()
        assert abs(total - opt) <= 1e-5 * scale, (
            f"{context} image {b}: total {total!r} vs scipy's optimum {opt!r}")


KINDS = ["normal", "ties", "constant", "dup_gts", "dup_queries", "huge", "tiny", "mixed_scale",
         "forbidden", "detr"]
SHAPES = [(3, 9, 4), (2, 4, 9), (2, 6, 6), (2, 1, 5), (2, 5, 1), (2, 1, 1), (2, 13, 0), (1, 0, 3)]


# ---- optimality -----------------------------------------------------------------------------

@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_optimal_small(backend, kind):
    for i, (B, Q, G) in enumerate(SHAPES):
        for pad in (False, True):
            cost, mask = make_problem(kind, B, Q, G, seed=100 * i + pad, pad=pad)
            out = ops.hungarian_match(cost, mask if pad else None, backend=backend)
            assert_optimal(out, cost, mask, f"{backend} {kind} {(B, Q, G)} pad={pad}")


@pytest.mark.parametrize("kind", ["ties", "detr", "forbidden"])
def test_triton_interpreter_medium(kind):
    """Rectangular both ways, padded, with enough rows to need long augmenting paths."""
    for B, Q, G, pad in [(2, 30, 13, True), (2, 15, 22, True), (1, 24, 24, False)]:
        cost, mask = make_problem(kind, B, Q, G, seed=7, pad=pad)
        out = ops.hungarian_match(cost, mask, backend="triton")
        assert_optimal(out, cost, mask, f"triton {kind} {(B, Q, G)}")
        if HAS_CPP:  # same algorithm, same float64 arithmetic and tie rules: the same matching
            assert torch.equal(out, ops.hungarian_match(cost, mask, backend="cpp"))


@pytest.mark.parametrize("tuning", [dict(transpose=False), dict(pack=False),
                                    dict(greedy_elems_per_thread=1, elems_per_thread=1)])
def test_triton_kernel_variants(tuning, monkeypatch):
    """The kernel's other code paths (strided rows, unpacked reduction, one-row greedy steps)."""
    from rtmdet.kernels import hungarian as kernel
    monkeypatch.setattr(kernel, "TUNING", {**kernel.TUNING, **tuning})
    for B, Q, G in [(2, 20, 9), (2, 9, 14)]:
        cost, mask = make_problem("ties", B, Q, G, seed=Q, pad=True)
        out = ops.hungarian_match(cost, mask, backend="triton")
        assert_optimal(out, cost, mask, f"triton {tuning} {(B, Q, G)}")
        if HAS_CPP:
            assert torch.equal(out, ops.hungarian_match(cost, mask, backend="cpp"))


@needs_cpp
@pytest.mark.parametrize("kind", KINDS)
def test_cpp_detr_sizes(kind):
    """Deformable-DETR-like (Q=300) with G up to 100, padded; one G > Q batch."""
    for B, Q, G, pad in [(4, 300, 100, True), (2, 120, 150, True), (3, 100, 7, False)]:
        cost, mask = make_problem(kind, B, Q, G, seed=11, pad=pad)
        out = ops.hungarian_match(cost, mask, backend="cpp")
        assert_optimal(out, cost, mask, f"cpp {kind} {(B, Q, G)}")


@needs_cpp
def test_cpp_large():
    """Q=2000, G=1000 (one image) and a batch with G > Q that mixes both orientations."""
    cost, mask = make_problem("detr", 1, 2000, 1000, seed=3)
    assert_optimal(ops.hungarian_match(cost, backend="cpp"), cost, mask, "cpp 2000x1000")
    cost, mask = make_problem("normal", 4, 300, 500, seed=4, pad=True)  # G_b below and above Q
    assert ((mask.sum(1) > 300) & (mask.sum(1) < 500)).any() and (mask.sum(1) < 300).any()
    assert_optimal(ops.hungarian_match(cost, mask, backend="cpp"), cost, mask, "cpp 300x500")


@needs_cpp
def test_cpp_matches_triton_orientation_mix():
    """Padded batch where some images have G_b > Q (rows = queries) and some G_b <= Q."""
    cost, _ = make_problem("ties", 4, 12, 20, seed=5)
    mask = torch.rand(4, 20, generator=torch.Generator().manual_seed(5)) < 0.5
    mask[2] = True
    mask[3, :10] = False
    assert (mask.sum(1) > 12).any() and (mask.sum(1) <= 12).any()
    out = ops.hungarian_match(cost, mask, backend="triton")
    assert torch.equal(out, ops.hungarian_match(cost, mask, backend="cpp"))
    assert_optimal(out, cost, mask, "orientation mix")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_layouts_dtypes_unbatched(backend):
    cost, mask = make_problem("normal", 3, 10, 6, seed=9, pad=True)
    ref = ops.hungarian_match(cost, mask, backend=backend)
    assert_optimal(ref, cost, mask, backend)
    # non-contiguous cost and mask (views of transposed buffers), float64, half precision
    nc = cost.transpose(1, 2).contiguous().transpose(1, 2)
    ncm = mask.t().contiguous().t()
    assert not nc.is_contiguous() and not ncm.is_contiguous()
    assert torch.equal(ops.hungarian_match(nc, ncm, backend=backend), ref)
    assert torch.equal(ops.hungarian_match(cost.double(), mask, backend=backend), ref)
    half = cost.masked_fill(~mask[:, None, :], 0).half()
    assert_optimal(ops.hungarian_match(half, mask, backend=backend), half.float(), mask, "half")
    # unbatched (Q, G) with (G,) mask or none
    for b in range(3):
        out = ops.hungarian_match(cost[b], mask[b], backend=backend)
        assert out.shape == (10,) and torch.equal(out, ref[b])
    assert ops.hungarian_match(cost[0], backend=backend).shape == (10,)


def test_deterministic_and_backends_agree():
    cost, mask = make_problem("ties", 3, 16, 8, seed=12, pad=True)
    outs = [ops.hungarian_match(cost, mask, backend=b) for b in CPU_BACKENDS if b != "torch"]
    outs += [ops.hungarian_match(cost, mask, backend=b) for b in CPU_BACKENDS if b != "torch"]
    for o in outs[1:]:
        assert torch.equal(o, outs[0])


def test_auto_picks_cpp_on_cpu():
    cost, mask = make_problem("normal", 2, 5, 3, seed=1)
    if HAS_CPP:
        assert _backend.resolve_backend("hungarian_match", "auto", "cpu", ops.hungarian._implementations()) == "cpp"
    assert_optimal(ops.hungarian_match(cost), cost, mask, "auto")


def test_hand_computed():
    """Small problems whose optimum is known by hand."""
    c = torch.tensor([[4.0, 1.0, 3.0], [2.0, 0.0, 5.0], [3.0, 2.0, 2.0]])  # scipy docs' example: 5
    for backend in CPU_BACKENDS:
        out = ops.hungarian_match(c, backend=backend)
        assert out.tolist() == [1, 0, 2], backend
        # greedy would take (0, 1) first: 1 + 9 > 2 + 3
        g = torch.tensor([[1.0, 2.0], [9.0, 3.0]])
        assert ops.hungarian_match(g, backend=backend).tolist() == [0, 1], backend
        g = torch.tensor([[2.0, 1.0], [1.0, 9.0]])
        assert ops.hungarian_match(g, backend=backend).tolist() == [1, 0], backend
        # rectangular: 1 gt, the cheapest query wins; 1 query, the cheapest gt
        assert ops.hungarian_match(torch.tensor([[3.0], [1.0], [2.0]]), backend=backend).tolist() == [-1, 0, -1]
        assert ops.hungarian_match(torch.tensor([[3.0, -1.0, 2.0]]), backend=backend).tolist() == [1]


# ---- values: inf, NaN, infeasible -----------------------------------------------------------

@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_invalid_values(backend):
    cost, mask = make_problem("normal", 2, 5, 4, seed=2)
    bad = cost.clone()
    bad[1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"cost must not contain NaN.*\(1, 2, 3\)"):
        ops.hungarian_match(bad, backend=backend)
    bad[1, 2, 3] = -float("inf")
    with pytest.raises(ValueError, match="cost must not contain NaN or -inf"):
        ops.hungarian_match(bad, backend=backend)
    # ... but a padded gt's column may hold anything
    m = mask.clone()
    m[1, 3] = False
    assert_optimal(ops.hungarian_match(bad, m, backend=backend), bad, m, "NaN in padding")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_infeasible(backend):
    cost, _ = make_problem("normal", 3, 4, 3, seed=2)
    inf = float("inf")
    bad = cost.clone()
    bad[1, :, 0] = inf  # gt 0 of image 1 has no finite query
    with pytest.raises(ValueError, match="infeasible for image 1"):
        ops.hungarian_match(bad, backend=backend)
    bad = cost.clone()
    bad[2, :, :2] = inf  # gts 0 and 1 may only take query... none; 2 gts, finite only at gt 2
    bad[2, 0, 0] = bad[2, 0, 1] = 1.0  # both gts want query 0 only: no complete matching
    with pytest.raises(ValueError, match="infeasible for image 2"):
        ops.hungarian_match(bad, backend=backend)
    # forbidding all but a perfect matching is feasible and gives exactly that matching
    eye = torch.full((4, 4), inf)
    perm = [2, 0, 3, 1]
    eye[torch.arange(4), perm] = 1.0
    assert ops.hungarian_match(eye, backend=backend).tolist() == perm


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "torch"])
def test_infeasible_without_checks_gives_minus_one(backend):
    cost, _ = make_problem("normal", 3, 4, 3, seed=2)
    cost[1, :, 0] = float("inf")
    with ops.value_checks(False):
        out = ops.hungarian_match(cost, backend=backend)
    assert (out[1] == -1).all()
    keep = torch.tensor([0, 2])
    assert_optimal(out[keep], cost[keep], torch.ones(2, 3, dtype=torch.bool), "feasible rest")


# ---- errors -------------------------------------------------------------------------------

def test_bad_arguments():
    cost = torch.rand(2, 5, 3)
    with pytest.raises(ValueError, match="cost must have"):
        ops.hungarian_match(torch.rand(5))
    with pytest.raises(TypeError, match="cost must be a floating-point"):
        ops.hungarian_match(torch.ones(2, 5, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="cost must be a torch.Tensor"):
        ops.hungarian_match(np.ones((5, 3)))
    with pytest.raises(TypeError, match="gt_mask must be a bool"):
        ops.hungarian_match(cost, torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"gt_mask dimension 1 must be 3"):
        ops.hungarian_match(cost, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"gt_mask dimension 0 must be 2"):
        ops.hungarian_match(cost, torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="gt_mask must have 1 dimensions"):
        ops.hungarian_match(cost[0], torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.hungarian_match(cost, backend="scipy")
    with pytest.raises(RuntimeError, match="backend='cuda' is not available"):
        ops.hungarian_match(cost, backend="cuda")
    from rtmdet.kernels.hungarian import hungarian_match_triton
    with pytest.raises(ValueError, match="supports at most 16384 queries"):  # before any launch
        hungarian_match_triton(torch.rand(1, 16385, 2), torch.ones(1, 2, dtype=torch.bool))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_triton_needs_cuda_or_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="Triton kernels need CUDA tensors"):
        ops.hungarian_match(torch.rand(2, 3), backend="triton")


# ---- torch.library ------------------------------------------------------------------------

@needs_cpp
def test_opcheck_cpp():
    cost, mask = make_problem("normal", 3, 7, 4, seed=0, pad=True)
    cost = cost.nan_to_num(0.0, 0.0, 0.0)
    torch.library.opcheck(torch.ops.rtmdet.hungarian_match.default, (cost, mask))


def test_opcheck_triton():
    cost, mask = make_problem("normal", 2, 5, 3, seed=0, pad=True)
    cost = cost.nan_to_num(0.0, 0.0, 0.0)
    import rtmdet.kernels.hungarian  # noqa: F401  (registers the op)
    torch.library.opcheck(torch.ops.rtmdet.hungarian_match_triton.default, (cost, mask),
                          test_utils=("test_schema", "test_faketensor"))


@needs_cpp
def test_compile_fullgraph_cpp():
    cost, mask = make_problem("normal", 2, 6, 4, seed=0, pad=True)
    fn = torch.compile(lambda c, m: ops.hungarian_match(c, m, backend="cpp"),
                       backend="aot_eager", fullgraph=True)
    assert torch.equal(fn(cost, mask), ops.hungarian_match(cost, mask, backend="cpp"))


# ---- GPU ----------------------------------------------------------------------------------

GPU_CASES = [(16, 100, 7), (16, 100, 50), (16, 300, 30), (16, 300, 100),
             (112, 900, 20), (112, 900, 100), (16, 900, 300)]


@pytest.mark.gpu
@pytest.mark.parametrize("B,Q,G", GPU_CASES)
def test_gpu_optimal_and_equal_to_cpp(B, Q, G):
    for kind in ("detr", "ties", "dup_gts"):
        cost, mask = make_problem(kind, B, Q, G, seed=B + Q + G, pad=True)
        out = ops.hungarian_match(cost.cuda(), mask.cuda())  # auto -> triton
        sub = slice(0, 8)
        assert_optimal(out[sub].cpu(), cost[sub], mask[sub], f"triton {kind} {(B, Q, G)}")
        if HAS_CPP:
            assert torch.equal(out.cpu(), ops.hungarian_match(cost, mask, backend="cpp")), kind


@pytest.mark.gpu
def test_gpu_large_and_g_above_q():
    for B, Q, G, pad in [(2, 2000, 1000, False), (4, 900, 1000, True), (4, 100, 300, True)]:
        cost, mask = make_problem("detr", B, Q, G, seed=1, pad=pad)
        out = ops.hungarian_match(cost.cuda(), mask.cuda(), backend="triton")
        assert_optimal(out.cpu(), cost, mask, f"triton {(B, Q, G)}")


@pytest.mark.gpu
def test_gpu_errors_and_empty():
    cost, _ = make_problem("normal", 3, 6, 4, seed=2)
    cost[2, :, 1] = float("inf")
    with pytest.raises(ValueError, match="infeasible for image 2"):
        ops.hungarian_match(cost.cuda())
    cost[2, 0, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        ops.hungarian_match(cost.cuda())
    assert (ops.hungarian_match(torch.rand(2, 5, 0, device="cuda")) == -1).all()
    assert ops.hungarian_match(torch.rand(2, 0, 5, device="cuda")).shape == (2, 0)


@pytest.mark.gpu
def test_gpu_cuda_graph_and_compile():
    cost, mask = make_problem("detr", 16, 300, 30, seed=5, pad=True)
    cost, mask = cost.cuda(), mask.cuda()
    expect = ops.hungarian_match(cost, mask)
    static = cost.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up (compiles the kernel) outside the capture
        ops.hungarian_match(static, mask)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.hungarian_match(static, mask)
    static.copy_(cost.flip(1))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, ops.hungarian_match(cost.flip(1), mask))
    fn = torch.compile(lambda c, m: ops.hungarian_match(c, m), fullgraph=True)
    assert torch.equal(fn(cost, mask), expect)


# ---- against stock mmdetection --------------------------------------------------------------

def test_matches_stock_mmdet_hungarian_assigner():
    """On mmdet's own cost (its match-cost classes), our matching is as cheap as stock's."""
    pytest.importorskip("mmdet")
    from tests.mmcv_stub import install_mmcv_ext_stub
    install_mmcv_ext_stub()
    from mmdet.models.task_modules.assigners import HungarianAssigner
    from mmengine.structures import InstanceData
    assigner = HungarianAssigner(match_costs=[
        dict(type="FocalLossCost", weight=2.0), dict(type="BBoxL1Cost", weight=5.0, box_format="xywh"),
        dict(type="IoUCost", iou_mode="giou", weight=2.0)])
    g = torch.Generator().manual_seed(0)
    for Q, G in [(30, 7), (12, 12), (6, 9)]:
        xy = torch.rand(Q + G, 2, generator=g) * 400
        boxes = torch.cat([xy, xy + torch.rand(Q + G, 2, generator=g) * 200 + 2], -1)
        pred = InstanceData(scores=torch.randn(Q, 20, generator=g), bboxes=boxes[:Q])
        gt = InstanceData(bboxes=boxes[Q:], labels=torch.randint(0, 20, (G,), generator=g))
        meta = dict(img_shape=(640, 640))
        stock = assigner.assign(pred, gt, img_meta=meta).gt_inds - 1      # -1 = background
        cost = sum(mc(pred_instances=pred, gt_instances=gt, img_meta=meta) for mc in assigner.match_costs)
        for backend in CPU_BACKENDS:
            ours = ops.hungarian_match(cost, backend=backend)
            assert ((ours >= 0).sum() == (stock >= 0).sum() == min(Q, G)), backend
            q, qs = (ours >= 0).nonzero()[:, 0], (stock >= 0).nonzero()[:, 0]
            total, stock_total = cost[q, ours[q]].double().sum(), cost[qs, stock[qs]].double().sum()
            assert abs(total - stock_total) <= 1e-5 * cost.abs().max() * min(Q, G), backend
