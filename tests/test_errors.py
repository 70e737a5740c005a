"""Bad input raises a clear error naming the argument; unavailable backends say why."""
import pytest
import torch

from rtmdet import ops
from rtmdet.ops import _backend

N, C = 21, 3


def _args(B=2, G=3):
    """Valid batched dsl_assign arguments: priors, preds, logits, gts, labels, mask."""
    priors = ops.grid_priors([(3, 5), (2, 3)], (8, 16))
    gen = torch.Generator().manual_seed(0)
    xy = torch.rand(B, N, 2, generator=gen) * 30
    preds = torch.cat([xy, xy + 8], -1)
    gts = torch.tensor([[2.0, 2.0, 30.0, 20.0]]).repeat(B, G, 1)
    return dict(priors=priors, pred_bboxes=preds, pred_logits=torch.randn(B, N, C, generator=gen),
                gt_bboxes=gts, gt_labels=torch.zeros(B, G, dtype=torch.long),
                gt_mask=torch.ones(B, G, dtype=torch.bool))


def _assign(**changes):
    args = _args()
    args.update(changes)
    return ops.dsl_assign(**args, backend="torch")


def test_valid_arguments_run():
    a = _assign()
    assert a.gt_index.shape == (2, N)


BAD = [  # (changes, exception, message pattern)
    (dict(priors=torch.zeros(1, N, 4)), ValueError, r"priors must have 2 dimensions"),
    (dict(priors=torch.zeros(N, 3)), ValueError, r"priors must be \(N, 4\)"),
    (dict(priors=torch.zeros(N + 1, 4)), ValueError, r"pred_bboxes dimension 1 must be 22 \(N"),
    (dict(priors=torch.zeros(N, 4, dtype=torch.long)), TypeError, r"priors must be a floating-point"),
    (dict(pred_bboxes=torch.zeros(2, N, 5)), ValueError, r"pred_bboxes must have last dimension 4"),
    (dict(pred_bboxes=torch.zeros(2, 1, N, 4)), ValueError, r"pred_bboxes must have \(2, 3\) dimensions"),
    (dict(pred_bboxes=torch.zeros(2, N, 4, dtype=torch.int32)), TypeError, r"pred_bboxes must be a floating"),
    (dict(pred_logits=torch.zeros(2, N)), ValueError, r"pred_logits must have 3 dimensions"),
    (dict(pred_logits=torch.zeros(3, N, C)), ValueError, r"pred_logits dimension 0 must be 2 \(B"),
    (dict(pred_logits=torch.zeros(2, N - 1, C)), ValueError, r"pred_logits dimension 1 must be 21 \(N"),
    (dict(pred_logits=torch.zeros(2, N, C, dtype=torch.long)), TypeError, r"pred_logits must be a floating"),
    (dict(pred_logits=torch.zeros(2, N, 0)), ValueError, r"pred_logits must have at least one class"),
    (dict(gt_bboxes=torch.zeros(3, 3, 4)), ValueError, r"gt_bboxes dimension 0 must be 2 \(B"),
    (dict(gt_bboxes=torch.zeros(2, 3, 4, dtype=torch.long)), TypeError, r"gt_bboxes must be a floating"),
    (dict(gt_bboxes=torch.zeros(2, 3, 2)), ValueError, r"gt_bboxes must have last dimension 4"),
    (dict(gt_labels=torch.zeros(2, 3)), TypeError, r"gt_labels must be an integer tensor"),
    (dict(gt_labels=torch.zeros(2, 3, dtype=torch.bool)), TypeError, r"gt_labels must be an integer tensor"),
    (dict(gt_labels=torch.zeros(2, 4, dtype=torch.long)), ValueError, r"gt_labels dimension 1 must be 3 \(G"),
    (dict(gt_labels=torch.zeros(1, 3, dtype=torch.long)), ValueError, r"gt_labels dimension 0 must be 2 \(B"),
    (dict(gt_labels=torch.zeros(2, 3, 1, dtype=torch.long)), ValueError, r"gt_labels must have 2 dimensions"),
    (dict(gt_mask=torch.ones(2, 3, dtype=torch.uint8)), TypeError, r"gt_mask must be a bool tensor"),
    (dict(gt_mask=torch.ones(2, 4, dtype=torch.bool)), ValueError, r"gt_mask dimension 1 must be 3 \(G"),
    (dict(gt_mask=torch.ones(1, 3, dtype=torch.bool)), ValueError, r"gt_mask dimension 0 must be 2 \(B"),
    (dict(gt_labels=torch.tensor([[0, 1, 3], [0, 0, 0]])), ValueError,
     r"gt_labels must lie in \[0, 3\), found 3 at index \(0, 2\)"),
    (dict(gt_labels=torch.tensor([[0, 0, 0], [-1, 0, 0]])), ValueError, r"gt_labels must lie in \[0, 3\), found -1"),
    (dict(priors=ops.grid_priors([(3, 5), (2, 3)], (8, 16)).index_fill(0, torch.tensor([4]), float("nan"))),
     ValueError, r"priors must be finite, found nan"),
    (dict(pred_bboxes=torch.full((2, N, 4), float("inf"))), ValueError, r"pred_bboxes must be finite, found inf"),
    (dict(pred_logits=torch.zeros(2, N, C).index_fill(1, torch.tensor([3]), float("nan"))), ValueError,
     r"pred_logits must be finite, found nan at index \(0, 3, 0\)"),
    (dict(pred_logits=torch.full((2, N, C), float("-inf"), dtype=torch.float16)), ValueError,
     r"pred_logits must be finite, found -inf"),
    (dict(gt_bboxes=torch.tensor([[2.0, 2.0, 30.0, float("nan")]]).repeat(2, 3, 1)), ValueError,
     r"gt_bboxes must be finite, found nan"),
]


@pytest.mark.parametrize("changes,exc,match", BAD, ids=[f"{i}-{next(iter(b[0]))}" for i, b in enumerate(BAD)])
def test_dsl_assign_bad_arguments(changes, exc, match):
    with pytest.raises(exc, match=match):
        _assign(**changes)


def test_padded_gts_may_hold_garbage():
    mask = torch.tensor([[True, False, True], [False, False, True]])
    labels = torch.tensor([[0, -1, 2], [7, -5, 1]])
    gts = _args()["gt_bboxes"].clone()
    gts[0, 1] = float("nan")
    gts[1, 0] = float("inf")
    a = _assign(gt_mask=mask, gt_labels=labels, gt_bboxes=gts)
    assert not bool((a.gt_index == 1).any())
    # The same garbage in a real gt is an error.
    with pytest.raises(ValueError, match=r"gt_bboxes must be finite"):
        _assign(gt_bboxes=gts)


def test_unbatched_shapes_are_checked():
    args = {k: v[0] if k != "priors" else v for k, v in _args().items()}
    assert ops.dsl_assign(**args, backend="torch").gt_index.shape == (N,)
    with pytest.raises(ValueError, match=r"pred_logits must have 2 dimensions"):
        ops.dsl_assign(**dict(args, pred_logits=torch.zeros(1, N, C)), backend="torch")
    with pytest.raises(ValueError, match=r"gt_labels must have 1 dimensions"):
        ops.dsl_assign(**dict(args, gt_labels=torch.zeros(1, 3, dtype=torch.long)), backend="torch")


def test_non_tensor_argument():
    with pytest.raises(TypeError, match=r"gt_bboxes must be a torch.Tensor, got list"):
        _assign(gt_bboxes=[[0.0, 0.0, 1.0, 1.0]])


def test_value_checks_can_be_switched_off():
    nan_logits = torch.full((2, N, C), float("nan"))
    with pytest.raises(ValueError, match="pred_logits must be finite"):
        _assign(pred_logits=nan_logits)
    previous = ops.set_value_checks(False)
    try:
        _assign(pred_logits=nan_logits)   # no check: runs (the result is meaningless)
        _assign(gt_labels=torch.full((2, 3), 7))
    finally:
        ops.set_value_checks(previous)
    with ops.value_checks(False):
        ops.quality_focal_loss(torch.full((2, 3), float("nan")), torch.tensor([0, 1]), torch.ones(2),
                               backend="torch")
    with pytest.raises(ValueError, match="pred_logits must be finite"):
        _assign(pred_logits=nan_logits)


def test_tensors_on_different_devices():
    meta = torch.device("meta")
    with pytest.raises(ValueError, match=r"one device.*priors on cpu.*pred_logits on meta"):
        _assign(pred_logits=torch.zeros(2, N, C, device=meta))
    with pytest.raises(ValueError, match=r"one device.*gt_mask on meta"):
        _assign(gt_mask=torch.ones(2, 3, dtype=torch.bool, device=meta))
    with pytest.raises(ValueError, match=r"one device.*target on meta"):
        ops.giou_loss(torch.zeros(2, 4), torch.zeros(2, 4, device=meta), backend="torch")
    with pytest.raises(ValueError, match=r"one device.*scores on meta"):
        ops.quality_focal_loss(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long),
                               torch.zeros(2, device=meta), backend="torch")
    with pytest.raises(ValueError, match=r"one device.*boxes2 on meta"):
        ops.box_iou(torch.zeros(2, 4), torch.zeros(2, 4, device=meta))


@pytest.mark.parametrize("kwargs,match", [
    (dict(backend="gpu"), r"backend must be one of .*got 'gpu'"),
    (dict(semantics="yolo"), r"semantics must be one of .*got 'yolo'"),
    (dict(topk=0), r"topk must be an integer >= 1, got 0"),
    (dict(topk=2.5), r"topk must be an integer >= 1, got 2.5"),
    (dict(topk=True), r"topk must be an integer >= 1, got True"),
    (dict(soft_center_radius=float("nan")), r"soft_center_radius must be a finite real number"),
    (dict(soft_center_radius=-1.0), r"soft_center_radius must be >= 0.0, got -1.0"),
    (dict(iou_weight=float("inf")), r"iou_weight must be a finite real number"),
    (dict(iou_weight=-3.0), r"iou_weight must be >= 0.0"),
    (dict(iou_weight="3"), r"iou_weight must be a finite real number"),
])
def test_dsl_assign_bad_options(kwargs, match):
    args = _args()
    kwargs.setdefault("backend", "torch")
    with pytest.raises(ValueError, match=match):
        ops.dsl_assign(**args, **kwargs)


def _qfl(**changes):
    args = dict(logits=torch.randn(4, 3), labels=torch.tensor([0, 1, 2, 3]), scores=torch.rand(4))
    args.update(changes)
    backend = args.pop("backend", "torch")
    return ops.quality_focal_loss(**args, backend=backend)


def _giou(**changes):
    args = dict(pred=torch.tensor([[0.0, 0.0, 2.0, 2.0]] * 4), target=torch.tensor([[1.0, 1.0, 3.0, 3.0]] * 4))
    args.update(changes)
    backend = args.pop("backend", "torch")
    return ops.giou_loss(**args, backend=backend)


@pytest.mark.parametrize("fn,changes,exc,match", [
    (_qfl, dict(reduction="avg"), ValueError, r"reduction must be one of .*got 'avg'"),
    (_qfl, dict(reduction="sum", avg_factor=2.0), ValueError, r"avg_factor can only be used with reduction=\"mean\""),
    (_qfl, dict(backend="fast"), ValueError, r"backend must be one of"),
    (_qfl, dict(logits=torch.zeros(4, 3, dtype=torch.long)), TypeError, r"logits must be a floating"),
    (_qfl, dict(logits=torch.zeros(4)), ValueError, r"logits must have 2 dimensions"),
    (_qfl, dict(labels=torch.zeros(4)), TypeError, r"labels must be an integer tensor"),
    (_qfl, dict(labels=torch.zeros(5, dtype=torch.long)), ValueError, r"labels dimension 0 must be 4 \(M"),
    (_qfl, dict(labels=torch.tensor([0, 1, 2, 4])), ValueError, r"labels must lie in \[-1, 4\), found 4"),
    (_qfl, dict(scores=torch.rand(3)), ValueError, r"scores dimension 0 must be 4 \(M"),
    (_qfl, dict(scores=torch.zeros(4, dtype=torch.long)), TypeError, r"scores must be a floating"),
    (_qfl, dict(weight=torch.ones(3)), ValueError, r"weight must be \(M,\) = \(4,\)"),
    (_qfl, dict(logits=torch.full((4, 3), float("inf"))), ValueError, r"logits must be finite, found inf"),
    (_qfl, dict(scores=torch.full((4,), float("nan"))), ValueError, r"scores must be finite"),
    (_giou, dict(reduction="max"), ValueError, r"reduction must be one of"),
    (_giou, dict(pred=torch.zeros(4, 5)), ValueError, r"pred must have last dimension 4"),
    (_giou, dict(pred=torch.zeros(4, 4, dtype=torch.long)), TypeError, r"pred must be a floating"),
    (_giou, dict(target=torch.zeros(3, 4)), ValueError, r"target dimension 0 must be 4 \(M"),
    (_giou, dict(target=torch.zeros(1, 4, 4)), ValueError, r"target must have 2 dimensions"),
    (_giou, dict(weight=torch.ones(4, 2)), ValueError, r"weight must be \(M,\) = \(4,\)"),
    (_giou, dict(weight=torch.ones(4, dtype=torch.long)), TypeError, r"weight must be a floating"),
    (_giou, dict(pred=torch.full((4, 4), float("nan"))), ValueError, r"pred must be finite, found nan"),
    (_giou, dict(target=torch.full((4, 4), float("-inf"))), ValueError, r"target must be finite"),
])
def test_loss_bad_arguments(fn, changes, exc, match):
    with pytest.raises(exc, match=match):
        fn(**changes)


def test_box_iou_and_priors_bad_arguments():
    box = torch.zeros(3, 4)
    with pytest.raises(ValueError, match=r"mode must be 'iou' or 'giou', got 'diou'"):
        ops.box_iou(box, box, mode="diou")
    with pytest.raises(TypeError, match=r"boxes1 must be a floating"):
        ops.box_iou(box.long(), box)
    with pytest.raises(ValueError, match=r"boxes2 must have last dimension 4"):
        ops.box_iou(box, torch.zeros(3, 2))
    with pytest.raises(ValueError, match=r"aligned=True.*same number of boxes"):
        ops.box_iou(box, torch.zeros(2, 4), aligned=True)
    with pytest.raises(ValueError, match=r"boxes must be \(\.\.\., M, 4\)"):
        ops.box_iou(torch.zeros(4), box)
    with pytest.raises(ValueError, match=r"distance must have last dimension 4"):
        ops.distance2bbox(torch.zeros(3, 2), torch.zeros(3, 2))
    with pytest.raises(ValueError, match=r"2 feature map sizes but 3 strides"):
        ops.grid_priors([(2, 2), (1, 1)], (8, 16, 32))


# ----------------------------------------------------------------------------------------
# Unavailable backends
# ----------------------------------------------------------------------------------------

def test_triton_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match=r"backend='triton' is not available"):
        ops.dsl_assign(**_args(), backend="triton")
    with pytest.raises(RuntimeError, match=r"backend='triton' is not available"):
        _qfl(backend="triton")
    with pytest.raises(RuntimeError, match=r"backend='triton' is not available"):
        _giou(backend="triton")
    # Where a Triton implementation exists, the reason is the device.
    if _backend.triton_importable():
        with pytest.raises(RuntimeError, match=r"tensors are on cpu.*CUDA tensors.*TRITON_INTERPRET=1"):
            _backend.resolve_backend("dsl_assign", "triton", "cpu", {"triton": None})
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _backend.resolve_backend("dsl_assign", "triton", "cpu", {"triton": None}) == "triton"


def test_cpp_when_not_built(monkeypatch):
    monkeypatch.setattr(_backend, "native_module", lambda: None)
    monkeypatch.setattr(_backend, "native_error", lambda: "ImportError: no module named rtmdet._C")
    for run in (lambda: ops.dsl_assign(**_args(), backend="cpp"), lambda: _qfl(backend="cpp"),
                lambda: _giou(backend="cpp")):
        with pytest.raises(RuntimeError, match=r"backend='cpp' is not available: the rtmdet._C extension "
                                               r"is not built \(ImportError.*\); reinstall"):
            run()
    with pytest.raises(RuntimeError, match=r"backend='cuda' is not available: the rtmdet._C extension is not built"):
        ops.dsl_assign(**_args(), backend="cuda")
    assert _backend.available_backends("cpu") == ["torch"]


def test_cuda_backend_on_cpu_tensors_says_device(monkeypatch):
    monkeypatch.setattr(_backend, "native_module", lambda: object())
    with pytest.raises(RuntimeError, match=r"tensors are on cpu but backend 'cuda' runs on cuda"):
        _backend.resolve_backend("dsl_assign", "cuda", "cpu", {"cuda": None})


def test_torch_backend_always_available():
    assert _backend.resolve_backend("dsl_assign", "torch", "meta", {}) == "torch"
    assert "torch" in ops.available_backends("cpu")
