"""The reduced ("sum" / "mean") fused losses (rtmdet::qfl_triton_sum, rtmdet::giou_loss_triton_sum)
and the loss edge cases of issue 15: hyper-parameter checks, avg_factor, C = 0, inverted boxes,
double backward, meta tensors.

CPU tests run the kernels under the Triton interpreter on small shapes; `gpu` tests add opcheck
and the realistic size.
"""
import pytest
import torch

pytest.importorskip("triton")

from rtmdet import ops  # noqa: E402
from rtmdet.kernels import giou as giou_mod  # noqa: E402
from rtmdet.kernels import qfl as qfl_mod  # noqa: E402
from rtmdet.ops import _backend  # noqa: E402
from tests.test_losses_triton import qfl_inputs as _qfl_inputs, random_boxes  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")
HAS_CPP = "giou_loss" in _backend.native_ops()


def qfl_inputs(M, C, seed, **kw):
    """tests.test_losses_triton's inputs with labels in the public range [-1, C]."""
    x, labels, scores = _qfl_inputs(M, C, seed, **kw)
    return x, labels.clamp(max=C), scores


def loss_and_grad(fn, x, *args, **kwargs):
    x = x.detach().clone().requires_grad_()
    loss = fn(x, *args, **kwargs)
    loss.backward()
    return loss.detach(), x.grad


REDUCTIONS = [dict(reduction="sum"), dict(reduction="mean"),
              dict(reduction="mean", avg_factor=37.5),
              dict(reduction="mean", avg_factor=torch.tensor(3.25))]


@pytest.mark.parametrize("kw", REDUCTIONS, ids=["sum", "mean", "avg-float", "avg-tensor"])
@pytest.mark.parametrize("M,C,seed,weighted", [(37, 11, 0, True), (200, 80, 1, False),
                                               (6, 3, 2, True)])
def test_qfl_reduced_matches_reference(M, C, seed, weighted, kw):
    x, labels, scores = qfl_inputs(M, C, seed)
    weight = torch.rand(M, generator=torch.Generator().manual_seed(seed)) if weighted else None
    got, g_got = loss_and_grad(ops.quality_focal_loss, x, labels, scores, weight=weight,
                               backend="triton", **kw)
    want, g_want = loss_and_grad(ops.quality_focal_loss, x, labels, scores, weight=weight,
                                 backend="torch", **kw)
    assert got.shape == () and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(g_got, g_want, rtol=1e-5, atol=1e-7)


def test_qfl_reduced_low_precision_and_beta():
    x, labels, scores = qfl_inputs(50, 20, 3, dtype=torch.bfloat16)
    for beta in (2.0, 1.5):
        got, g_got = loss_and_grad(ops.quality_focal_loss, x, labels, scores, beta=beta,
                                   reduction="sum", backend="triton")
        want, g_want = loss_and_grad(ops.quality_focal_loss, x, labels, scores, beta=beta,
                                     reduction="sum", backend="torch")
        assert g_got.dtype == torch.bfloat16
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(g_got, g_want, rtol=2 ** -7, atol=1e-6)


def test_qfl_reduced_is_deterministic_and_eager_equals_op():
    x, labels, scores = qfl_inputs(300, 7, 4)
    x.requires_grad_()
    a = qfl_mod.quality_focal_loss_triton_sum(x, labels, scores, None, None, 2.0, 0.25)
    b = torch.ops.rtmdet.qfl_triton_sum(x, labels, scores, None, None, 2.0, 0.25)
    assert torch.equal(a, b)
    ga, = torch.autograd.grad(a, x)
    gb, = torch.autograd.grad(b, x)
    assert torch.equal(ga, gb)
    assert torch.equal(ga, torch.autograd.grad(
        qfl_mod.quality_focal_loss_triton_sum(x, labels, scores, None, None, 2.0, 0.25), x)[0])


def test_qfl_reduced_empty_and_no_classes():
    for M, C in [(0, 5), (4, 0), (0, 0)]:
        x = torch.randn(M, C)
        labels = torch.zeros(M, dtype=torch.long)
        for backend in ["torch", "triton"] + (["cpp"] if HAS_CPP else []):
            for reduction in ("sum", "mean", "none"):
                loss, grad = loss_and_grad(
                    lambda t: ops.quality_focal_loss(t, labels, torch.zeros(M), reduction=reduction,
                                                     backend=backend).sum(), x)
                assert float(loss) == 0.0, (M, C, backend, reduction)
                assert grad.shape == (M, C) and bool((grad == 0).all())


@pytest.mark.parametrize("M,seed,kw", [(53, 0, kw) for kw in REDUCTIONS]
                         + [(9000, 1, REDUCTIONS[3])],  # 9000: two programs + a sum
                         ids=["sum", "mean", "avg-float", "avg-tensor", "two-programs"])
def test_giou_reduced_matches_reference(M, seed, kw):
    pred, target = random_boxes(M, seed)
    pred, target = pred.float(), target.float()
    weight = torch.rand(M, generator=torch.Generator().manual_seed(seed))
    got, g_got = loss_and_grad(ops.giou_loss, pred, target, weight=weight, backend="triton", **kw)
    want, g_want = loss_and_grad(ops.giou_loss, pred, target, weight=weight, backend="torch", **kw)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_got, g_want, rtol=1e-5, atol=1e-6)


def test_giou_gathered_targets_match_explicit_targets():
    """index (B, N) into (B, G, 4) gts, -1 = background: as gathering the targets first."""
    g = torch.Generator().manual_seed(5)
    B, N, G = 3, 40, 6
    xy = torch.rand(B * N, 2, generator=g) * 50
    pred = torch.cat([xy, xy + torch.rand(B * N, 2, generator=g) * 30 - 2], 1)
    gts = torch.rand(B, G, 4, generator=g) * 50
    gts[..., 2:] += gts[..., :2]
    gts[1, 4] = float("nan")  # a padded gt no positive points at: never read
    index = torch.randint(-1, G, (B, N), generator=g)
    index[1][index[1] == 4] = -1
    weight = torch.rand(B * N, generator=g) * (index.reshape(-1) >= 0)
    divisor = torch.tensor(2.5)
    fg = (index >= 0).reshape(-1, 1)
    target = torch.gather(gts.nan_to_num(), 1, index.clamp(min=0)[..., None].expand(B, N, 4))
    target = torch.where(fg, target.reshape(-1, 4), pred)
    got, g_got = loss_and_grad(giou_mod.giou_loss_triton_sum_public, pred, gts, weight, divisor,
                               1e-6, 2.0, index=index)
    want, g_want = loss_and_grad(lambda p: (ops.giou_loss_ref(p, target) * weight).sum() * 2.0
                                 / divisor, pred)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_got, g_want, rtol=1e-5, atol=1e-6)
    assert bool((g_got[~fg[:, 0]] == 0).all())


# ---- issue 15: hyper-parameters and edge cases -----------------------------------------------

def _qfl(**kw):
    x, labels, scores = qfl_inputs(6, 3, 0)
    return ops.quality_focal_loss(x, labels, scores, **kw)


def _giou(**kw):
    pred, target = random_boxes(6, 0)
    return ops.giou_loss(pred.float(), target.float(), **kw)


@pytest.mark.parametrize("fn,kw,match", [
    (_qfl, dict(beta=float("nan")), r"beta must be a finite real number > 0, got nan"),
    (_qfl, dict(beta=0.0), r"beta must be > 0, got 0.0"),
    (_qfl, dict(beta=-2), r"beta must be > 0"),
    (_qfl, dict(avg_factor=0.0), r"avg_factor must be > 0, got 0.0"),
    (_qfl, dict(avg_factor=-4), r"avg_factor must be > 0"),
    (_qfl, dict(avg_factor=float("nan")), r"avg_factor must be a finite real number"),
    (_qfl, dict(avg_factor=float("inf")), r"avg_factor must be a finite real number"),
    (_qfl, dict(avg_factor=torch.tensor(0.0)), r"avg_factor must be finite and > 0, found 0.0"),
    (_qfl, dict(avg_factor=torch.tensor([float("nan")])), r"avg_factor must be finite and > 0"),
    (_qfl, dict(avg_factor=torch.ones(2)), r"avg_factor must be a number or a one-element"),
    (_qfl, dict(avg_factor="3"), r"avg_factor must be a finite real number"),
    (_giou, dict(eps=0.0), r"eps must be > 0"),
    (_giou, dict(eps=float("nan")), r"eps must be a finite real number"),
    (_giou, dict(avg_factor=-1.0), r"avg_factor must be > 0"),
    (_giou, dict(avg_factor=torch.tensor(-2.0)), r"avg_factor must be finite and > 0"),
])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_loss_hyper_parameters_are_checked(fn, kw, match, backend):
    with pytest.raises(ValueError, match=match):
        fn(backend=backend, **kw)


def test_avg_factor_integer_likes_and_numpy():
    np = pytest.importorskip("numpy")
    want = _qfl(avg_factor=4.0, backend="torch")
    for avg in (4, np.float32(4.0), np.int64(4), torch.tensor(4.0), torch.tensor([4])):
        torch.testing.assert_close(_qfl(avg_factor=avg, backend="torch"), want)
        torch.testing.assert_close(_qfl(avg_factor=avg, backend="triton"), want)


INVERTED = [  # pred, target: finite loss in [0, 2] for every one
    ([3.0, 3.0, 1.0, 1.0], [0.0, 0.0, 4.0, 4.0]),       # pred inverted in x and y
    ([3.0, 0.0, 1.0, 4.0], [0.0, 0.0, 4.0, 4.0]),       # pred inverted in x only
    ([5.0, 5.0, 1.0, 1.0], [6.0, 6.0, 2.0, 2.0]),       # both inverted (mmdet: about -9.2e9)
    ([0.0, 0.0, 4.0, 4.0], [3.0, 3.0, 1.0, 1.0]),       # target inverted
    ([2.0, 2.0, 2.0, 2.0], [9.0, 9.0, 1.0, 1.0]),       # a point against an inverted target
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_giou_inverted_boxes_are_empty(dtype):
    from tests.oracle import giou_loss_oracle
    pred = torch.tensor([p for p, _ in INVERTED], dtype=dtype)
    target = torch.tensor([t for _, t in INVERTED], dtype=dtype)
    want = giou_loss_oracle(pred, target)
    assert bool(((want >= 0) & (want <= 2)).all())
    ref, g_ref = loss_and_grad(lambda p: ops.giou_loss(p, target, reduction="none",
                                                       backend="torch").sum(), pred)
    backends = ["triton"] + (["cpp"] if HAS_CPP else [])
    for backend in backends:
        for reduction in ("none", "sum"):
            got, g_got = loss_and_grad(lambda p: ops.giou_loss(p, target, reduction=reduction,
                                                               backend=backend).sum(), pred)
            torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(g_got, g_ref, rtol=1e-5, atol=1e-6)
            assert bool(torch.isfinite(g_got).all())
    torch.testing.assert_close(ops.giou_loss(pred, target, reduction="none", backend="torch").double(),
                               want, rtol=1e-6, atol=1e-6)
    # box_iou keeps mmdetection's signed areas (the assigner's IoU must match upstream)
    both = ops.box_iou(pred[2:3], target[2:3], mode="giou", aligned=True)
    assert abs(float(both)) > 1e6  # unbounded: why the loss defines inverted boxes as empty


@pytest.mark.parametrize("backend", ["triton"] + (["cpp"] if HAS_CPP else []))
def test_double_backward_raises(backend):
    x, labels, scores = qfl_inputs(8, 4, 1, dtype=torch.float64 if backend == "cpp" else torch.float32)
    x.requires_grad_()
    for reduction in ("sum", "none"):
        loss = ops.quality_focal_loss(x, labels, scores, reduction=reduction, backend=backend).sum()
        g, = torch.autograd.grad(loss, x, create_graph=False)  # first order: fine
        assert g.shape == x.shape
        loss = ops.quality_focal_loss(x, labels, scores, reduction=reduction, backend=backend).sum()
        with pytest.raises(RuntimeError, match="double backward"):
            torch.autograd.grad(loss, x, create_graph=True)
    pred, target = random_boxes(5, 2)
    pred = pred.to(x.dtype).requires_grad_()
    for reduction in ("sum", "none"):
        loss = ops.giou_loss(pred, target.to(x.dtype), reduction=reduction, backend=backend).sum()
        with pytest.raises(RuntimeError, match="double backward"):
            torch.autograd.grad(loss, pred, create_graph=True)


def test_torch_backend_double_backward_works():
    x, labels, scores = qfl_inputs(6, 3, 2, dtype=torch.float64)
    x.requires_grad_()
    assert torch.autograd.gradgradcheck(
        lambda t: ops.quality_focal_loss(t, labels, scores, reduction="sum", backend="torch"), (x,))


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_losses_on_meta_tensors_with_value_checks_on(backend):
    meta = torch.device("meta")
    with ops.value_checks(True):
        x = torch.empty(10, 4, device=meta, requires_grad=True)
        loss = ops.quality_focal_loss(x, torch.zeros(10, dtype=torch.long, device=meta),
                                      torch.empty(10, device=meta), avg_factor=torch.ones((), device=meta),
                                      backend=backend)
        assert loss.shape == () and loss.device == meta
        box = ops.giou_loss(torch.empty(10, 4, device=meta), torch.empty(10, 4, device=meta),
                            weight=torch.empty(10, device=meta), reduction="none", backend=backend)
        assert box.shape == (10,) and box.device == meta


@pytest.mark.gpu
def test_gpu_reduced_ops_opcheck_and_realistic():
    x, labels, scores = qfl_inputs(3000, 80, 0, device="cuda")
    x.requires_grad_()
    w = torch.rand(3000, device="cuda")
    d = torch.tensor(7.0, device="cuda")
    torch.library.opcheck(qfl_mod.qfl_triton_sum, (x, labels, scores, w, d, 2.0, 0.5))
    torch.library.opcheck(qfl_mod.qfl_triton_sum, (x, labels, scores, None, None, 1.5, 1.0))
    torch.library.opcheck(qfl_mod.qfl_triton_sum_backward,
                          (torch.tensor(1.5, device="cuda"), x.detach(), labels, scores, w, d, 2.0, 0.5))
    pred, target = random_boxes(9000, 0)
    pred, target = pred.float().cuda().requires_grad_(), target.float().cuda()
    w = torch.rand(9000, device="cuda")
    torch.library.opcheck(giou_mod.giou_loss_triton_sum, (pred, target, w, d, None, 1e-6, 2.0, True))
    gts = target[:64].reshape(4, 16, 4).contiguous()
    index = torch.randint(-1, 16, (4, 2250), device="cuda")
    torch.library.opcheck(giou_mod.giou_loss_triton_sum, (pred, gts, w, None, index, 1e-6, 2.0, True))
    for kw in REDUCTIONS:
        kw = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
        got, g_got = loss_and_grad(ops.giou_loss, pred, target, weight=w, backend="triton", **kw)
        want, g_want = loss_and_grad(ops.giou_loss, pred, target, weight=w, backend="torch", **kw)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(g_got, g_want, rtol=1e-4, atol=1e-6)
        got, g_got = loss_and_grad(ops.quality_focal_loss, x, labels, scores, backend="triton", **kw)
        want, g_want = loss_and_grad(ops.quality_focal_loss, x, labels, scores, backend="torch", **kw)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(g_got, g_want, rtol=1e-5, atol=1e-7)
