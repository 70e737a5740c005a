"""The compiled C++ ops (csrc/, torch.ops.rtmdet.*) against the PyTorch references."""
import pytest
import torch

from rtmdet import ops
from rtmdet.ops import _backend
from tests.assign_compare import assert_matches_reference
from tests.cases import case_args, make_case

if _backend.native_module() is None:
    pytest.skip(f"rtmdet._C is not built ({_backend.native_error()}); build it with "
                "`python setup.py build_ext --inplace`", allow_module_level=True)

pytestmark = [pytest.mark.filterwarnings("ignore:overflow encountered"),
              pytest.mark.filterwarnings("ignore:.*fast path.*")]

SEMANTICS = ("mmdet", "mmyolo")
SMALL_IMG = (256, 320)  # 1280 + 320 + 80 priors, non-square


def cpp_assign(case, semantics, **kw):
    return ops.dsl_assign(*case_args(case), semantics=semantics, backend="cpp", **kw)


def check(case, semantics, topk=13):
    out = cpp_assign(case, semantics, topk=topk)
    assert_matches_reference(case, out, semantics, topk=topk,
                             context=f"{case['kind']} seed {case['seed']} {semantics}")
    return out


def test_module_contract():
    mod = _backend.native_module()
    # other ops (e.g. the DETR matcher) may be registered too
    assert set(mod.registered_ops()) >= {"box_iou", "dsl_assign", "quality_focal_loss", "giou_loss", "nms"}
    assert mod.with_cuda() in (True, False)
    assert "cpp" in ops.available_backends("cpu")


# ---- dsl_assign ---------------------------------------------------------------------------------

@pytest.mark.parametrize("semantics", SEMANTICS)
@pytest.mark.parametrize("kind", ["random", "crowded", "mixed", "far", "duplicate", "tiny",
                                  "zero_width", "border", "no_valid", "no_gt"])
def test_dsl_assign_matches_reference(kind, semantics):
    case = make_case(1, B=3, img_size=SMALL_IMG, G=11, C=20, kind=kind, pad="anywhere")
    check(case, semantics)


@pytest.mark.parametrize("semantics", SEMANTICS)
def test_dsl_assign_full_size_exact(semantics):
    """640x640, 80 classes: on random data the indices are bitwise those of the reference."""
    case = make_case(21, B=2, G=24, C=80, kind="mixed", pad="end")
    out = cpp_assign(case, semantics)
    ref = ops.dsl_assign(*case_args(case), semantics=semantics, backend="torch")
    assert (out.gt_index >= 0).sum() > 50
    assert torch.equal(out.gt_index, ref.gt_index)
    assert torch.equal(out.labels, ref.labels)
    assert torch.equal(out.ious, ref.ious)


@pytest.mark.parametrize("seed", range(3))
def test_dsl_assign_many_gts_conflicts(seed):
    for semantics in SEMANTICS:
        check(make_case(30 + seed, B=2, img_size=SMALL_IMG, G=40, C=7, kind="crowded", pad="anywhere"),
              semantics)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dsl_assign_logit_dtypes(dtype):
    case = make_case(9, B=2, img_size=SMALL_IMG, G=8, C=12, kind="mixed", dtype=dtype, pad="end")
    for semantics in SEMANTICS:
        check(case, semantics)


@pytest.mark.parametrize("topk", [1, 3, 40])
def test_dsl_assign_topk(topk):
    case = make_case(4, B=2, img_size=SMALL_IMG, G=6, C=5, kind="crowded", pad="anywhere")
    for semantics in SEMANTICS:
        check(case, semantics, topk=topk)


def test_dsl_assign_topk_above_n():
    case = make_case(5, B=2, featmaps=[(3, 3)], strides=(8,), G=3, C=4, kind="random")
    for semantics in SEMANTICS:
        check(case, semantics, topk=13)


def test_dsl_assign_empty():
    case = make_case(2, B=2, img_size=SMALL_IMG, G=5, C=4)
    args = list(case_args(case))
    for G in (0,):
        a = list(args)
        a[3], a[4], a[5] = a[3][:, :G], a[4][:, :G], a[5][:, :G]
        out = ops.dsl_assign(*a, backend="cpp")
        assert (out.gt_index == -1).all() and (out.labels == -1).all() and (out.ious == 0).all()
    a = list(args)  # N = 0
    a[0], a[1], a[2] = a[0][:0], a[1][:, :0], a[2][:, :0]
    out = ops.dsl_assign(*a, backend="cpp")
    assert out.gt_index.shape == (2, 0) and out.ious.dtype == torch.float32
    b = list(args)  # B = 0
    b = [b[0]] + [t[:0] for t in b[1:]]
    assert ops.dsl_assign(*b, backend="cpp").gt_index.shape == (0, case["priors"].shape[0])


def test_dsl_assign_padding_position_and_batching():
    """Padded gts anywhere change nothing: the batch equals each image alone, real gts only."""
    case = make_case(13, B=3, img_size=SMALL_IMG, G=9, C=6, kind="mixed", pad="anywhere")
    out = cpp_assign(case, "mmdet")
    for b in range(3):
        real = case["gt_mask"][b].nonzero().flatten()
        one = ops.dsl_assign(case["priors"], case["pred_bboxes"][b], case["pred_logits"][b],
                             case["gt_bboxes"][b][real], case["gt_labels"][b][real], backend="cpp")
        expect = torch.where(one.gt_index >= 0, real[one.gt_index.clamp(min=0)], one.gt_index)
        assert torch.equal(out.gt_index[b], expect)
        assert torch.equal(out.ious[b], one.ious)


def test_dsl_assign_non_contiguous_inputs():
    case = make_case(14, B=2, img_size=SMALL_IMG, G=6, C=10, kind="random")
    args = list(case_args(case))
    args[2] = args[2].transpose(1, 2).contiguous().transpose(1, 2)  # (B, N, C) view, strided
    args[1] = args[1][:, :, [0, 1, 2, 3]].transpose(0, 1).contiguous().transpose(0, 1)
    ref = ops.dsl_assign(*case_args(case), backend="cpp")
    out = ops.dsl_assign(*args, backend="cpp")
    assert all(torch.equal(x, y) for x, y in zip(ref, out))


def test_dsl_assign_errors():
    case = make_case(0, B=1, img_size=SMALL_IMG, G=2, C=3)
    p, pb, pl, gb, gl, gm = case_args(case)
    with pytest.raises(RuntimeError, match="gt_mask"):
        torch.ops.rtmdet.dsl_assign(p, pb, pl, gb, gl, gm.int(), 13, 3.0, 3.0, False)
    with pytest.raises(RuntimeError, match="priors"):
        torch.ops.rtmdet.dsl_assign(p[:-1], pb, pl, gb, gl, gm, 13, 3.0, 3.0, False)


# ---- losses --------------------------------------------------------------------------------------

def qfl_inputs(M=37, C=11, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(M, C, generator=g) * 3).to(dtype)
    labels = torch.randint(0, C + 1, (M,), generator=g)  # C = background
    labels[:3] = torch.tensor([-1, C, 0])
    scores = torch.rand(M, generator=g).to(dtype)
    return logits, labels, scores


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-5), (torch.float16, 1e-5),
                                        (torch.bfloat16, 1e-5), (torch.float64, 1e-5)])
def test_quality_focal_loss_matches_reference(dtype, rtol):
    logits, labels, scores = qfl_inputs(dtype=dtype)
    out = torch.ops.rtmdet.quality_focal_loss(logits, labels, scores, 2.0)
    ref = ops.quality_focal_loss_ref(logits, labels, scores)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(out, ref.to(out.dtype), rtol=rtol, atol=1e-6 if rtol > 1e-9 else 1e-12)
    far = labels.masked_fill(labels == logits.shape[1], logits.shape[1] + 5)
    assert torch.equal(torch.ops.rtmdet.quality_focal_loss(logits, far, scores, 2.0), out)  # any label
    for beta in (1.0, 2.5):
        torch.testing.assert_close(torch.ops.rtmdet.quality_focal_loss(logits, labels, scores, beta),
                                   ops.quality_focal_loss_ref(logits, labels, scores, beta=beta).to(out.dtype),
                                   rtol=1e-5, atol=1e-6)


def test_quality_focal_loss_public_and_grad_vs_reference():
    logits, labels, scores = qfl_inputs(M=50, C=9, seed=1)
    x1 = logits.clone().requires_grad_()
    x2 = logits.clone().requires_grad_()
    w = torch.rand(50)
    a = ops.quality_focal_loss(x1, labels, scores, weight=w, avg_factor=7.0, backend="cpp")
    b = ops.quality_focal_loss(x2, labels, scores, weight=w, avg_factor=7.0, backend="torch")
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    a.backward()
    b.backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-4, atol=1e-6)


def test_quality_focal_loss_gradcheck():
    logits, labels, scores = qfl_inputs(M=9, C=5, dtype=torch.float64, seed=2)
    logits.requires_grad_()
    scores.requires_grad_()
    for beta in (2.0, 1.5):
        assert torch.autograd.gradcheck(
            lambda x, s: torch.ops.rtmdet.quality_focal_loss(x, labels, s, beta), (logits, scores))


def giou_inputs(M=41, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(M, 2, generator=g, dtype=torch.float64) * 50
    wh = torch.rand(M, 2, generator=g, dtype=torch.float64) * 30 + 1
    pred = torch.cat([xy, xy + wh], 1)
    target = pred + torch.randn(M, 4, generator=g, dtype=torch.float64) * 8
    target[:, 2:] = torch.maximum(target[:, 2:], target[:, :2] + 0.5)
    target[0] = pred[0] + 200  # disjoint: enclosing term only
    target[1] = pred[1]        # identical
    return pred.to(dtype), target.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_giou_loss_matches_reference(dtype):
    pred, target = giou_inputs(dtype=dtype)
    out = torch.ops.rtmdet.giou_loss(pred, target, 1e-6)
    ref = ops.giou_loss_ref(pred.double(), target.double()).to(dtype)
    assert out.dtype == dtype
    tol = dict(rtol=1e-3, atol=2e-3) if dtype == torch.float16 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out, ref, **tol)
    assert out[1] == 0  # identical boxes
    # degenerate boxes stay finite
    z = torch.tensor([[1.0, 1.0, 1.0, 1.0]], dtype=dtype)
    assert torch.isfinite(torch.ops.rtmdet.giou_loss(z, z, 1e-6)).all()


def test_giou_loss_gradcheck_and_grad_vs_reference():
    pred, target = giou_inputs(M=12, dtype=torch.float64, seed=3)
    pred.requires_grad_()
    target.requires_grad_()
    assert torch.autograd.gradcheck(lambda p, t: torch.ops.rtmdet.giou_loss(p, t, 1e-6), (pred, target))
    p1, p2 = (pred.detach().float().requires_grad_() for _ in range(2))
    w = torch.rand(12)
    ops.giou_loss(p1, target.detach().float(), weight=w, backend="cpp").backward()
    ops.giou_loss(p2, target.detach().float(), weight=w, backend="torch").backward()
    torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-4, atol=1e-6)


# ---- box_iou and nms ------------------------------------------------------------------------------

@pytest.mark.parametrize("giou", [False, True])
def test_box_iou(giou):
    a, b = giou_inputs(M=23, dtype=torch.float32, seed=4)
    mode = "giou" if giou else "iou"
    torch.testing.assert_close(torch.ops.rtmdet.box_iou(a, b[:17], giou, False, 1e-6),
                               ops.box_iou(a, b[:17], mode=mode), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(torch.ops.rtmdet.box_iou(a, b, giou, True, 1e-6),
                               ops.box_iou(a, b, mode=mode, aligned=True), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("seed", range(4))
def test_nms_matches_reference(seed):
    g = torch.Generator().manual_seed(seed)
    M = 300
    xy = torch.rand(M, 2, generator=g) * 100
    boxes = torch.cat([xy, xy + torch.rand(M, 2, generator=g) * 40], 1)
    boxes[::17, 2] = boxes[::17, 0]  # zero-width boxes: IoU 0/0 never suppresses
    scores = (torch.rand(M, generator=g) * 10).round() / 10  # many equal scores
    for thr in (0.3, 0.65):
        assert torch.equal(ops.nms(boxes, scores, thr, backend="cpp"), ops.nms_ref(boxes, scores, thr))
    idxs = torch.randint(0, 5, (M,), generator=g)
    assert torch.equal(ops.batched_nms(boxes, scores, idxs, 0.5, backend="cpp"),
                       ops.batched_nms(boxes, scores, idxs, 0.5, backend="torch"))
    assert ops.nms(boxes[:0], scores[:0], 0.5, backend="cpp").shape == (0,)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_nms_cuda_matches_reference(dtype):
    if not _backend.cuda_built():
        pytest.skip("rtmdet._C was built without CUDA")
    g = torch.Generator().manual_seed(7)
    for M in (1, 63, 64, 65, 1000, 5000):
        xy = torch.rand(M, 2, generator=g) * 200
        boxes = torch.cat([xy, xy + torch.rand(M, 2, generator=g) * 60], 1).to(dtype)
        boxes[::13, 3] = boxes[::13, 1]
        scores = ((torch.rand(M, generator=g) * 20).round() / 20).to(dtype)
        for thr in (0.3, 0.65):
            got = torch.ops.rtmdet.nms(boxes.cuda(), scores.cuda(), thr).cpu()
            assert torch.equal(got, torch.ops.rtmdet.nms(boxes, scores, thr)), (M, thr)
            if dtype == torch.float32:
                assert torch.equal(got, ops.nms_ref(boxes, scores, thr))
    assert ops.nms(boxes[:0].cuda(), scores[:0].cuda(), 0.5, backend="cuda").shape == (0,)


# ---- dispatcher integration ---------------------------------------------------------------------------

def test_opcheck_every_op():
    case = make_case(3, B=2, featmaps=[(6, 6), (3, 3)], strides=(8, 16), G=4, C=5, kind="mixed",
                     pad="anywhere")
    args = case_args(case)
    for mmyolo in (False, True):
        torch.library.opcheck(torch.ops.rtmdet.dsl_assign.default, (*args, 13, 3.0, 3.0, mmyolo))
    logits, labels, scores = qfl_inputs(M=8, C=4)
    torch.library.opcheck(torch.ops.rtmdet.quality_focal_loss.default,
                          (logits.requires_grad_(), labels, scores, 2.0))
    pred, target = giou_inputs(M=8)
    torch.library.opcheck(torch.ops.rtmdet.giou_loss.default, (pred.requires_grad_(), target, 1e-6))
    torch.library.opcheck(torch.ops.rtmdet.box_iou.default, (pred.detach(), target[:5], True, False, 1e-6))
    torch.library.opcheck(torch.ops.rtmdet.nms.default, (pred.detach(), torch.rand(8), 0.5))
    g = torch.rand(8)
    torch.library.opcheck(torch.ops.rtmdet.quality_focal_loss_backward.default,
                          (g, logits.detach(), labels, scores, 2.0))
    torch.library.opcheck(torch.ops.rtmdet.giou_loss_backward.default,
                          (g, pred.detach(), target, 1e-6))


def test_torch_compile_fullgraph():
    """dsl_assign + both losses through the cpp backend compile into one graph on the CPU."""
    case = make_case(6, B=2, featmaps=[(8, 8), (4, 4)], strides=(8, 16), G=5, C=6, kind="random")
    priors, pred_bboxes, logits, gt_bboxes, gt_labels, gt_mask = case_args(case)

    def step(pred_bboxes, logits):
        a = ops.dsl_assign(priors, pred_bboxes.detach(), logits.detach(), gt_bboxes, gt_labels,
                           gt_mask, backend="cpp")
        C = logits.shape[-1]
        labels = torch.where(a.labels >= 0, a.labels, torch.full_like(a.labels, C))
        cls = ops.quality_focal_loss(logits.flatten(0, 1), labels.flatten(), a.ious.flatten(),
                                     reduction="sum", backend="cpp")
        targets = torch.gather(gt_bboxes, 1, a.gt_index.clamp(min=0)[..., None].expand(-1, -1, 4))
        box = ops.giou_loss(pred_bboxes.flatten(0, 1), targets.flatten(0, 1),
                            weight=a.ious.flatten(), reduction="sum", backend="cpp")
        return cls + box, a.gt_index

    x1, x2 = (logits.clone().requires_grad_() for _ in range(2))
    expect, idx = step(pred_bboxes, x1)
    compiled = torch.compile(step, fullgraph=True)
    got, idx2 = compiled(pred_bboxes, x2)
    assert torch.equal(idx, idx2)
    torch.testing.assert_close(got, expect)
    got.backward()
    expect.backward()
    torch.testing.assert_close(x2.grad, x1.grad)
